"""``python -m medssl.pretrain ablate FILE``: which pretext task helps my segmentation task? One command, one
table, error bars.

    python -m medssl.pretrain ablate recipes/ablations/NAME.yaml [--out DIR]  run here, one run after another
    python -m medssl.pretrain ablate FILE [--out DIR] --dry-run                 the plan + a measured time estimate
    python -m medssl.pretrain ablate FILE [--out DIR] --slurm                   sbatch arrays + submit.sh
    python -m medssl.pretrain ablate FILE [--out DIR] --collect                 results.csv / results.md / plots

An ablation file (``recipes/ablations/*.yaml``) names pretraining *cells* (a recipe + overrides, listed or
expanded from a grid), the unlabelled shard sets, the labelled downstream dataset and the fine-tuning budget.
Every cell is pretrained once (``OUT/pretrain/<cell>/``, the pretraining command line's own run folder) and its
export fine-tuned for every labelled-set size × seed (``OUT/finetune/<cell>/n<k>-s<seed>/``). For every network
among the cells the same fine-tuning runs start from scratch (``OUT/finetune/scratch-<network>/…``: the same
network, nothing loaded). A pretrained run and its scratch run with equal ``n_train`` and seed share the split and
the decoder init (``train.seed`` = ``data.split_seed`` = seed), so the table compares them pair by pair.

Schema (relative paths are read from the working directory the command runs in, not from the file's folder)::

    name: my_ablation                 # optional (default: the file name); OUT defaults to ablations/<name>
    shards: [demo/shards]             # unlabelled shard sets of every cell (a cell may name its own)
    dataset: demo/raw/Dataset902_...  # labelled data for fine-tuning (nnU-Net/MSD folder, CSV or labelled shards)
    pretrain:
      preset: tiny                    # recipe preset (optional)
      steps: 100                      # optimizer steps per cell
      nproc: 1                        # processes per run (>1: python -m torch.distributed.run --standalone)
      seed: 0                         # train.seed of every cell
      overrides: {train.log_every: 1} # dotted overrides of every cell (before the cell's own)
      timeout: 86400                  # seconds a run may take before it is stopped (checkpoint kept)
    finetune:
      preset: tiny                    # fine-tuning preset (optional)
      steps: 60
      nproc: 1
      overrides: {data.crop_size: [48, 48, 48]}
      n_train: [1, 2, 4]              # labelled training volumes
      seeds: [0, 1, 2]                # train.seed and data.split_seed of each fine-tuning run
      vary_split: true                # false: data.split_seed stays 0 (one test set; seeds only vary the training)
      timeout: 21600
    cells:                            # listed cells ...
      - {name: mae, recipe: hi_end_mae, overrides: {task.mask_ratio: 0.75}}
    grid:                             # ... and/or grids (a mapping or a list of them): one cell per combination
      recipe: hi_end_mae
      overrides: {}                   # fixed for every cell of the grid
      axes:
        task.mask_ratio: [0.6, 0.75, 0.9]                     # one key, its values
        decoding: {hier: {task.cross_depth: 3}, final: {task.self_depth: 5, task.cross_depth: 0}}  # named settings
    slurm:                            # only for --slurm (all optional)
      partition: null
      account: null
      extra: []                       # more "#SBATCH" options, e.g. ["--qos=high"]
      pretrain: {time: "24:00:00", gpus: 1, cpus: 8, mem: null}
      finetune: {time: "04:00:00", gpus: 1, cpus: 8, mem: null}

Grid cells are named from their settings (``mask_ratio-0.6_decoding-hier``). Runs the runner owns
(``train.steps``, ``train.seed``, ``data.split_seed``, ``data.n_train``) may not be overridden.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOP_KEYS = ("name", "shards", "dataset", "pretrain", "finetune", "cells", "grid", "slurm")
PRETRAIN_KEYS = ("preset", "steps", "nproc", "seed", "overrides", "timeout")
FINETUNE_KEYS = ("preset", "steps", "nproc", "overrides", "n_train", "seeds", "vary_split", "timeout")
CELL_KEYS = ("name", "recipe", "overrides", "shards")
GRID_KEYS = ("name", "recipe", "overrides", "axes", "shards")
SLURM_KEYS = ("partition", "account", "extra", "pretrain", "finetune")
SLURM_STAGE_KEYS = ("time", "gpus", "cpus", "mem")
OWNED = {"pretrain": ("train.steps", "train.seed"),
         "finetune": ("train.steps", "train.seed", "data.split_seed", "data.n_train")}
DEFAULT_TIMEOUT = {"pretrain": 86400, "finetune": 21600}
STOP_GRACE_S = 180  # after SIGTERM: time to save a checkpoint before SIGKILL
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0
# start-up and wrap-up per run (interpreter, torch/DeepSpeed/MONAI imports, export, volume preparation):
# the part of a run the measured step does not cover (calibrated on 2 CPU cores)
START_S = {"pretrain": 20.0, "finetune": 15.0}
START_PER_PROCESS_S = 8.0  # each further process of a torchrun start (imports and DeepSpeed set-up share the cores)
# CPU, several processes: gloo all-reduce, loader workers and DeepSpeed's step per step (the demo's 300 tiny
# hi_end_mae steps on 2 processes take ~2.5 min where one process computes a step in ~0.1 s)
DIST_STEP_S = 0.3
PREPARE_S_PER_VOLUME = 1.0  # fine-tuning: load + resample a labelled volume, write its prediction and overlay
DONE, FAILED, SKIPPED, LOG = "done.json", "failed.json", "skipped.json", "run.log"
OUT_ITEMS = {"plan.json", "ablation.yaml", "pretrain", "finetune", "slurm", "results.csv", "results.md",
             "dice_vs_n_train.png", "pretext_loss.png"}


class AblationError(ValueError):
    """An ablation file or output folder that does not fit; the message says what and how to fix it."""


# ============================================================================================ the file
@dataclass
class Cell:
    name: str
    recipe: str
    overrides: dict  # dotted key -> value (the cell's own, after the common pretraining overrides)
    shards: list  # absolute shard set folders
    settings: dict = field(default_factory=dict)  # what names it (grid axes) or its overrides
    network: str = ""  # fine-tuning network name, e.g. vit3d_tiny_p16+unetr
    net_key: str = ""  # network + preprocessing identity: cells with one key share a scratch baseline
    config: object = None  # resolved pretraining RunConfig


@dataclass
class Ablation:
    name: str
    file: str
    shards: list
    dataset: str
    pre: dict
    ft: dict
    cells: list
    slurm: dict
    data: dict = field(default_factory=dict)  # downstream facts: classes, volumes, split sizes
    spec_hash: str = ""


def _check_keys(d, valid, where: str) -> dict:
    import difflib

    if d is None:
        return {}
    if not isinstance(d, dict):
        raise AblationError(f"{where} must be a mapping of {', '.join(valid)}; got {d!r}")
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            raise AblationError(f"unknown key {where + '.' if where else ''}{k}"
                                + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; valid keys{' under ' + where if where else ''}: {', '.join(valid)}")
    return d


def _overrides(value, where: str) -> dict:
    """A mapping ``{task.mask_ratio: 0.6}`` (or a list of ``"key=value"`` strings) → dotted dict."""
    from .config import parse_override

    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for text in value:
            if not isinstance(text, str):
                raise AblationError(f"{where}: {text!r} is not a key=value string (or give a mapping)")
            k, v = parse_override(text)
            out[k] = v
        return out
    if not isinstance(value, dict):
        raise AblationError(f"{where} must be a mapping of dotted keys to values, e.g. {{task.mask_ratio: 0.6}}")
    for k in value:
        if not isinstance(k, str) or "." not in k:
            raise AblationError(f"{where}: {k!r} is not a dotted key such as task.mask_ratio")
    return dict(value)


def override_args(overrides: dict) -> list[str]:
    """``{"data.crop_size": [32, 32, 32]}`` → ``["data.crop_size=[32,32,32]"]`` (JSON is valid YAML flow)."""
    return [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides.items()]


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt_value(x) for x in v)
    return str(v)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text).strip("-.") or "cell"


def _paths(value, where: str, base: Path) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise AblationError(f"{where} must be a folder or a list of folders, got {value!r}")
    out = []
    for s in items:
        p = (base / Path(s).expanduser()).resolve()
        if not (p / "index.json").is_file():
            raise AblationError(f"{where}: {s} ({p}) is not a shard set (no index.json); build it with "
                                f"`python -m medssl.shards build … --out {s}` (relative paths are read from the "
                                f"working directory {base})")
        out.append(str(p))
    return out


def _int_list(value, where: str, minimum: int) -> list[int]:
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not items or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                                                       for v in items):
        raise AblationError(f"{where} must be a list of integers >= {minimum}, e.g. [1, 2, 4]; got {value!r}")
    if len(set(items)) != len(items):
        raise AblationError(f"{where}={items} lists a value twice")
    return list(items)


def _grid_cells(grid: dict, where: str) -> list[tuple[str, str, dict, dict, object]]:
    """(name, recipe, overrides, settings, shards) for every combination of a grid's axes."""
    _check_keys(grid, GRID_KEYS, where)
    if not isinstance(grid.get("recipe"), str):
        raise AblationError(f"{where}.recipe: name the recipe of the grid, e.g. recipe: hi_end_mae")
    fixed = _overrides(grid.get("overrides"), f"{where}.overrides")
    axes = grid.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise AblationError(f"{where}.axes: give at least one axis, e.g. axes: {{task.mask_ratio: [0.6, 0.75, 0.9]}}")
    lasts = [k.split(".")[-1] for k in axes]
    levels = []
    for key, values in axes.items():
        label = key.split(".")[-1] if lasts.count(key.split(".")[-1]) == 1 else key
        if "." in key:  # one key and its values
            if not isinstance(values, list) or not values:
                raise AblationError(f"{where}.axes.{key} must be a list of values, e.g. [0.6, 0.75, 0.9]")
            levels.append([(f"{label}-{_fmt_value(v)}", {label: v}, {key: v}) for v in values])
        else:  # a named axis: label -> a set of overrides
            if not isinstance(values, dict) or not values:
                raise AblationError(f"{where}.axes.{key}: a named axis maps labels to overrides, e.g. "
                                    "{hier: {task.cross_depth: 3}, final: {task.cross_depth: 0}} (or use a dotted key)")
            levels.append([(f"{key}-{lab}", {key: lab}, _overrides(ov, f"{where}.axes.{key}.{lab}"))
                           for lab, ov in values.items()])
    cells = []
    for combo in itertools.product(*levels):
        parts, settings, ov = [], {}, dict(fixed)
        for part, s, o in combo:
            parts.append(part)
            settings.update(s)
            ov.update(o)
        name = "_".join(parts)
        if grid.get("name"):
            name = f"{grid['name']}_{name}"
        cells.append((safe_name(name), grid["recipe"], ov, settings, grid.get("shards")))
    return cells


def _network(cfg, ft_cfg, in_chans: int) -> tuple[str, str, dict]:
    """(display name, identity key, facts) of the network fine-tuning builds from this cell's export."""
    import torch

    from .backbones import build_backbone
    from .config import task_class

    with torch.device("meta"):  # constructor checks without allocating
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        task = task_class(cfg.recipe)(backbone, cfg.task)
    kwargs = {k: v for k, v in dict(getattr(backbone, "config", {}) or {}).items() if k != "img_size"}
    components = {}
    for name, module in (task.export_components() if hasattr(task, "export_components") else {}).items():
        ckw = {k: v for k, v in dict(getattr(module, "config", {}) or {}).items() if k != "out_channels"}
        components[name] = {"registry": getattr(module, "registry_name", type(module).__name__), "kwargs": ckw}
    arch = ft_cfg.model.arch
    if "decoder" in components and arch in ("auto", "pretrained"):
        decoder = components["decoder"]["registry"]
    elif arch in ("auto", "pretrained"):
        decoder = "unetr" if len(set(backbone.feature_strides)) == 1 else "unet"
    else:
        decoder = arch
        components = {}
    ident = {"backbone": cfg.model.backbone, "kwargs": kwargs, "components": components, "decoder": decoder,
             "in_chans": in_chans, "window_ct": list(cfg.data.window_ct), "window_out": list(cfg.data.window_out)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.model.backbone}+{decoder}", key, ident


def load(file: str | Path, base: Path | None = None) -> Ablation:
    """Read and check an ablation file; every problem raises :class:`AblationError` before anything is made."""
    import yaml

    from .__main__ import shard_channels
    from .config import ConfigError, load_config, set_dotted
    from .engine import check_batch

    from .config import RECIPES_DIR

    base = Path(base or Path.cwd()).resolve()
    path = Path(file)
    if not path.is_file() and (RECIPES_DIR / "ablations" / f"{file}.yaml").is_file():
        path = RECIPES_DIR / "ablations" / f"{file}.yaml"  # a shipped example by name: compare_recipes
    if not path.is_file():
        known = sorted(p.name for p in (RECIPES_DIR / "ablations").glob("*.yaml"))
        raise AblationError(f"ablation file {file} not found" + (f" (examples in recipes/ablations/: {', '.join(known)})"
                                                                  if known else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AblationError(f"{file}: not valid YAML ({exc})") from None
    _check_keys(raw, TOP_KEYS, "")
    name = safe_name(str(raw.get("name") or path.stem))
    if "shards" not in raw:
        raise AblationError("shards: name the unlabelled shard set(s) every cell pretrains on")
    shards = _paths(raw["shards"], "shards", base)
    if not isinstance(raw.get("dataset"), str):
        raise AblationError("dataset: name the labelled downstream dataset (an nnU-Net/MSD folder, a CSV or "
                            "labelled shards)")
    dataset = str((base / Path(raw["dataset"]).expanduser()).resolve())
    if not Path(dataset).exists():
        raise AblationError(f"dataset: {raw['dataset']} ({dataset}) does not exist (relative paths are read from the "
                            f"working directory {base})")

    pre = dict(_check_keys(raw.get("pretrain") or {}, PRETRAIN_KEYS, "pretrain"))
    ft = dict(_check_keys(raw.get("finetune") or {}, FINETUNE_KEYS, "finetune"))
    for where, sect in (("pretrain", pre), ("finetune", ft)):
        if "steps" not in sect:
            raise AblationError(f"{where}.steps: give the optimizer steps of each {where} run")
        sect.setdefault("nproc", 1)
        sect.setdefault("timeout", DEFAULT_TIMEOUT[where])
        for key, low in (("steps", 1), ("nproc", 1), ("timeout", 1)):
            v = sect[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low or (key != "timeout" and int(v) != v):
                raise AblationError(f"{where}.{key}={v!r} must be a {'number' if key == 'timeout' else 'whole number'} "
                                    f">= {low}")
            sect[key] = int(v) if key != "timeout" else float(v)
        sect["overrides"] = _overrides(sect.get("overrides"), f"{where}.overrides")
        if sect.get("preset") is not None and not isinstance(sect["preset"], str):
            raise AblationError(f"{where}.preset must be a preset name such as tiny")
        for key in sect["overrides"]:
            if key in OWNED[where]:
                raise AblationError(f"{where}.overrides: {key} is set by the runner (use {where}.steps / seeds) ")
    seed = pre.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AblationError(f"pretrain.seed={seed!r} must be an integer")
    pre["seed"] = seed
    ft["n_train"] = _int_list(ft.get("n_train"), "finetune.n_train", 1)
    ft["seeds"] = _int_list(ft.get("seeds", [0]), "finetune.seeds", 0)
    if not isinstance(ft.get("vary_split", True), bool):
        raise AblationError("finetune.vary_split must be true or false")
    ft["vary_split"] = ft.get("vary_split", True)

    slurm = dict(_check_keys(raw.get("slurm") or {}, SLURM_KEYS, "slurm"))
    for stage in ("pretrain", "finetune"):
        slurm[stage] = dict(_check_keys(slurm.get(stage) or {}, SLURM_STAGE_KEYS, f"slurm.{stage}"))
    if not isinstance(slurm.get("extra") or [], list):
        raise AblationError("slurm.extra must be a list of sbatch options, e.g. [\"--qos=high\"]")

    # ---- fine-tuning: overrides through its own config loader, the dataset and its split ----------------
    from medssl.finetune.config import load_config as ft_load

    try:
        ft_cfg = ft_load(override_args(ft["overrides"]), ft.get("preset"))
        set_dotted(ft_cfg, "train.steps", ft["steps"])
        check_batch(ft_cfg, ft["nproc"])
    except (ConfigError, KeyError) as exc:
        raise AblationError(f"finetune: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
    from medssl.finetune.data import discover, split_cases

    try:
        sources, classes = discover(dataset, ft_cfg.data.labels)
        splits = {s: split_cases([c.key for c in sources], ft_cfg.data.n_val, ft_cfg.data.test_fraction, None,
                                 s if ft["vary_split"] else 0) for s in ft["seeds"]}
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise AblationError(f"dataset {raw['dataset']}: {exc}") from None
    available = min(len(sp["train"]) for sp in splits.values())
    too_many = [n for n in ft["n_train"] if n > available]
    if too_many:
        raise AblationError(f"finetune.n_train {too_many}: {dataset} gives {available} training volumes per split "
                            f"({len(sources)} labelled, {len(next(iter(splits.values()))['test'])} test, "
                            f"{ft_cfg.data.n_val} validation); use n_train <= {available}")
    data = {"volumes": len(sources), "classes": classes, "train": available,
            "test": len(next(iter(splits.values()))["test"]), "val": ft_cfg.data.n_val, "sources": sources}

    # ---- cells: listed and grids, each resolved through the pretraining config loader ------------------
    entries = []
    cells_raw = raw.get("cells") or []
    if not isinstance(cells_raw, list):
        raise AblationError("cells must be a list of {name, recipe, overrides} mappings")
    for i, c in enumerate(cells_raw):
        _check_keys(c, CELL_KEYS, f"cells[{i}]")
        if not isinstance(c.get("recipe"), str):
            raise AblationError(f"cells[{i}].recipe: name the recipe, e.g. recipe: hi_end_mae")
        ov = _overrides(c.get("overrides"), f"cells[{i}].overrides")
        nm = c.get("name") or (c["recipe"] + "".join(f"_{k.split('.')[-1]}-{_fmt_value(v)}" for k, v in ov.items()))
        entries.append((safe_name(str(nm)), c["recipe"], ov, dict(ov) or {}, c.get("shards")))
    grids = raw.get("grid") or []
    for i, g in enumerate(grids if isinstance(grids, list) else [grids]):
        entries.extend(_grid_cells(g, f"grid[{i}]" if isinstance(grids, list) else "grid"))
    if not entries:
        raise AblationError("no cells: give `cells:` (a list) and/or `grid:` (a recipe and axes)")
    names = [e[0] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AblationError(f"cell names {dup} occur twice; give the cells distinct names")
    if any(n.startswith("scratch") for n in names):
        raise AblationError("cell names starting with 'scratch' are reserved for the baselines")
    cells = []
    channels_of: dict = {}
    n_classes = max(classes or {1: "class1"}) + 1
    for cname, recipe, ov, settings, cell_shards in entries:
        for k in ov:
            if k in OWNED["pretrain"]:
                raise AblationError(f"cell {cname}: {k} is set by the runner (pretrain.steps / pretrain.seed)")
        cshards = _paths(cell_shards, f"cell {cname}: shards", base) if cell_shards is not None else shards
        try:
            merged = {**pre["overrides"], "train.seed": seed, **ov}
            cfg = load_config(recipe, override_args(merged), pre.get("preset"))
            set_dotted(cfg, "train.steps", pre["steps"])
            cfg.data.shards = cshards
            key = tuple(cshards)
            if key not in channels_of:
                channels_of[key] = shard_channels(cshards)["channels"]
            if channels_of[key] != 1:
                cfg.model.kwargs["in_chans"] = channels_of[key]
            check_batch(cfg, pre["nproc"])
            network, net_key, _ = _network(cfg, ft_cfg, channels_of[key])
            cell = Cell(cname, recipe, ov, cshards, settings, network, net_key, cfg)
        except (ConfigError, KeyError, ValueError, TypeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
            raise AblationError(f"cell {cname} (recipe {recipe}): {msg}") from None
        try:  # the fine-tuning network of its export (crop vs patch, decoder), on the meta device
            import torch

            with torch.device("meta"):
                _ft_network(cell, ft_cfg, n_classes)
        except (ConfigError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise AblationError(f"cell {cname}: fine-tuning its export with these finetune settings fails: "
                                f"{exc.args[0] if isinstance(exc, KeyError) else exc}") from None
        cells.append(cell)
    # one display name per network identity
    shown: dict = {}
    for c in cells:
        shown.setdefault(c.network, set()).add(c.net_key)
    for c in cells:
        if len(shown[c.network]) > 1:
            c.network = f"{c.network}-{c.net_key[:6]}"
    spec = {"name": name, "shards": shards, "dataset": dataset, "pre": pre, "ft": ft,
            "cells": [[c.name, c.recipe, c.overrides, c.shards] for c in cells]}
    abl = Ablation(name, str(path.resolve()), shards, dataset, pre, ft, cells, slurm, data)
    abl.data["ft_config"] = ft_cfg
    abl.spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return abl


# ============================================================================================ the plan
def _key(args: list, out: Path, extra=None) -> str:
    text = json.dumps([[str(a).replace(str(out), "<OUT>") for a in args], extra], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(abl: Ablation, out: Path) -> dict:
    """Every run as a JSON-able entry: stage, folder, command arguments, identity key (the plan file)."""
    out = Path(out).resolve()
    pre_runs, ft_runs = [], []
    for c in abl.cells:
        d = out / "pretrain" / c.name
        args = [c.recipe, "--shards", *c.shards, "--out", str(d), "--steps", str(abl.pre["steps"]), "--no-progress",
                *(["--preset", abl.pre["preset"]] if abl.pre.get("preset") else []),
                *override_args({**abl.pre["overrides"], "train.seed": abl.pre["seed"], **c.overrides})]
        pre_runs.append({"stage": "pretrain", "id": f"pretrain/{c.name}", "dir": str(d), "cell": c.name,
                         "recipe": c.recipe, "overrides": c.overrides, "settings": c.settings, "network": c.network,
                         "net_key": c.net_key, "module": "medssl.pretrain", "args": args, "nproc": abl.pre["nproc"],
                         "timeout": abl.pre["timeout"], "key": _key(args, out, abl.pre["nproc"])})
    groups = [(c.name, "pretrained", c.network, [c.name], out / "pretrain" / c.name / "export") for c in abl.cells]
    nets: dict = {}
    for c in abl.cells:
        nets.setdefault(c.net_key, (c.network, []))[1].append(c.name)
    for _, (network, sources) in nets.items():
        folder = f"scratch-{safe_name(network)}"
        groups.append((folder, "scratch", network, sources, out / "finetune" / folder / "export"))
    for folder, init, network, sources, export in groups:
        for n in abl.ft["n_train"]:
            for s in abl.ft["seeds"]:
                d = out / "finetune" / folder / f"n{n}-s{s}"
                args = ["--export", str(export), "--data", abl.dataset, "--out", str(d), "--init", init,
                        "--steps", str(abl.ft["steps"]), "--n-train", str(n), "--no-progress",
                        *(["--preset", abl.ft["preset"]] if abl.ft.get("preset") else []),
                        *override_args({**abl.ft["overrides"], "train.seed": s,
                                        "data.split_seed": s if abl.ft["vary_split"] else 0})]
                ft_runs.append({"stage": "finetune", "id": f"finetune/{folder}/n{n}-s{s}", "dir": str(d),
                                "cell": folder, "init": init, "network": network, "n_train": n, "seed": s,
                                "sources": sources, "export": str(export), "module": "medssl.finetune", "args": args,
                                "nproc": abl.ft["nproc"], "timeout": abl.ft["timeout"],
                                "key": _key(args, out, abl.ft["nproc"])})
    return {"ablation": abl.name, "file": abl.file, "spec_hash": abl.spec_hash, "out": str(out),
            "pretrain": pre_runs, "finetune": ft_runs}


def command(entry: dict) -> list[str]:
    """The run's command line: a plain process, or the same module under torchrun (the single run's launcher)."""
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(entry["nproc"])]
                if entry["nproc"] > 1 else [])
    return [sys.executable, *launcher, "-m", entry["module"], *entry["args"]]


# ============================================================================================ markers
def write_json(path: Path, data) -> None:
    """Atomic: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _say(*args) -> None:
    print(*args, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def export_sha(export: Path) -> str | None:
    m = read_json(Path(export) / "manifest.json")
    return ((m or {}).get("weights") or {}).get("sha256") if m else None


def pretext_losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every logged row of a pretraining run's ``metrics.jsonl``."""
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r.get("loss"), (int, float)) and "step" in r:
            rows.append((int(r["step"]), float(r["loss"])))
    return rows


def final_loss(run_dir: Path) -> float | None:
    """Mean of the last 10 logged pretext losses."""
    rows = pretext_losses(run_dir)[-10:]
    return sum(v for _, v in rows) / len(rows) if rows else None


def status(entry: dict) -> tuple[str, str]:
    """(done | failed | skipped | missing | stale, detail) of a run from its folder."""
    d = Path(entry["dir"])
    done = read_json(d / DONE)
    if done is not None:
        if done.get("key") != entry["key"]:
            return "stale", "settings changed since it was done"
        if entry["stage"] == "pretrain":
            if export_sha(d / "export") is None:
                return "stale", "its export is gone"
            return "done", ""
        if not (d / "metrics.json").is_file():
            return "stale", "its metrics.json is gone"
        if entry["init"] == "pretrained" and done.get("export_sha256") != export_sha(Path(entry["export"])):
            return "stale", "the cell's export changed since"
        return "done", ""
    failed = read_json(d / FAILED)
    if failed is not None:
        return "failed", failed.get("reason", "")
    skipped = read_json(d / SKIPPED)
    if skipped is not None:
        return "skipped", skipped.get("reason", "")
    return "missing", "not run yet"


# ============================================================================================ running
class Runner:
    """Runs plan entries one at a time; a signal stops the current run (SIGTERM to its process group: a
    pretraining run saves a checkpoint) and no other run starts."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stopping: str | None = None

    @contextlib.contextmanager
    def signals(self):
        old = {}

        def handle(signum, _frame):
            self.stopping = signal.Signals(signum).name
            self._stop_child()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                old[sig] = signal.signal(sig, handle)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child.pid, signal.SIGTERM)

    def _wait(self, timeout: float) -> tuple[int | None, bool]:
        """(exit code, timed out); after a stop request or the timeout: SIGTERM, a grace period, SIGKILL."""
        deadline = time.monotonic() + timeout
        asked = None
        while True:
            try:
                return self.child.wait(timeout=1.0), False if asked is None else asked == "timeout"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if asked is None and (now > deadline or self.stopping):
                asked = "timeout" if now > deadline else "stop"
                self._stop_child()
                kill_at = now + STOP_GRACE_S
            if asked is not None and now > kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.child.pid, signal.SIGKILL)
                return self.child.wait(), asked == "timeout"

    def execute(self, entry: dict, extra_args=(), timeout: float | None = None) -> tuple[int | None, bool, float, list]:
        """Run one entry's command with its output appended to ``run.log``; (exit code, timed out, seconds, cmd)."""
        d = Path(entry["dir"])
        d.mkdir(parents=True, exist_ok=True)
        cmd = command(entry) + list(extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RESTART_COUNT"):
            env.pop(k, None)  # a run is its own job, whatever launched the runner
        t0 = time.time()
        with open(d / LOG, "a") as log:
            log.write(f"\n===== {_now()} {' '.join(cmd)}\n")
            log.flush()
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                          start_new_session=True, preexec_fn=_die_with_parent)
            try:
                rc, timed_out = self._wait(timeout or entry["timeout"])
            finally:
                self.child = None
        seconds = time.time() - t0
        with open(d / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start": t0, "seconds": seconds, "exit_code": rc, "timed_out": timed_out}) + "\n")
        return rc, timed_out, seconds, cmd


def _die_with_parent() -> None:
    """In the child: SIGTERM when the runner dies (Linux prctl PR_SET_PDEATHSIG), so a killed runner leaves no
    run behind writing into its folder."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 40, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def failure_reason(tail: str) -> str:
    """The line that says what went wrong: the command's ``error:`` line, else the last exception (not the
    launcher's summary of a failed child), else the last line."""
    lines = [re.sub(r"^\[(default|rank)\d+\]:\s*", "", ln.strip()) for ln in tail.splitlines()
             if ln.strip() and not ln.startswith("=====")]  # without torchrun's / torch's "[rank0]:" prefixes
    for test in (lambda ln: ln.startswith("error:"),
                 lambda ln: re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) and "ChildFailedError" not in ln):
        for ln in reversed(lines):
            if test(ln):
                return ln[:300]
    return lines[-1][:300] if lines else "no output"


@contextlib.contextmanager
def folder_lock(d: Path):
    """An advisory lock on the run folder (released when the process dies): two runners never run one run."""
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    fh = open(d / ".lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        fh.close()


def _all_wall(d: Path) -> float:
    total = 0.0
    with contextlib.suppress(OSError):
        for line in (d / "attempts.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                total += float(json.loads(line).get("seconds", 0.0))
    return total


def scratch_export(entry: dict, plan_: dict) -> Path | None:
    """The scratch runs' export folder: hard links (or copies) of the first finished export among the cells of
    that network, made once, so its path (recorded in the run's config) never changes."""
    import shutil

    dest = Path(entry["export"])
    if (dest / "manifest.json").is_file():
        return dest
    for pre in plan_["pretrain"]:
        if pre["cell"] in entry["sources"] and status(pre)[0] == "done":
            src = Path(pre["dir"]) / "export"
            tmp = dest.with_name(f".export.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
            write_json(tmp / "source.json", {"cell": pre["cell"], "export": str(src)})
            try:
                os.rename(tmp, dest)
            except OSError:  # another task made it first
                shutil.rmtree(tmp, ignore_errors=True)
            return dest if (dest / "manifest.json").is_file() else None
    return None


def run_entry(entry: dict, plan_: dict, runner: Runner, say=None, tag: str = "") -> str:
    """Run one entry unless it is done; write its marker. Returns done | failed | skipped | stopped | busy."""
    say = say or _say
    d = Path(entry["dir"])
    st, why = status(entry)
    if st == "done":
        say(f"{tag}{entry['id']}: skipped: done before")
        return "done"
    # what it needs: an export (pretrained: its cell's; scratch: any cell of its network)
    if entry["stage"] == "finetune":
        if entry["init"] == "pretrained":
            pre = next(p for p in plan_["pretrain"] if p["cell"] == entry["cell"])
            ok = status(pre)[0] == "done"
            reason = f"pretraining of cell {entry['cell']} " + ("failed" if status(pre)[0] == "failed" else "not done")
        else:
            ok = scratch_export(entry, plan_) is not None
            reason = f"no finished export among the cells of {entry['network']} ({', '.join(entry['sources'])})"
        if not ok:
            write_json(d / SKIPPED, {"status": "skipped", "time": _now(), "reason": reason})
            say(f"{tag}{entry['id']}: skipped: {reason}")
            return "skipped"
    with folder_lock(d) as mine:
        if not mine:
            say(f"{tag}{entry['id']}: skipped: another runner is running it")
            return "busy"
        extra = []
        if st == "stale" and entry["stage"] == "finetune":
            extra = ["--resume", "none", "--overwrite"]  # the previous run moves into previous-<time>/
        for name in (FAILED, SKIPPED, DONE):  # DONE only when stale: a done run returned above
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        say(f"{tag}{entry['id']}: started" + (f" ({why}: running again)" if st == "stale" else "")
            + f"; log {d / LOG}")
        rc, timed_out, seconds, cmd = runner.execute(entry, extra)
        tail = log_tail(d / LOG)
        if runner.stopping and not timed_out:
            say(f"{tag}{entry['id']}: stopped by {runner.stopping} after {seconds:.0f} s (exit {rc}); the same command "
                "continues it")
            return "stopped"
        results = {}
        problem = None
        if timed_out:
            problem = f"timeout after {seconds:.0f} s (limit {entry['timeout']:g} s; stopped, the next run resumes)"
        elif rc != 0:
            problem = f"exit {rc}: {failure_reason(tail)}"
        elif entry["stage"] == "pretrain":
            man = read_json(d / "export" / "manifest.json")
            steps = int(entry["args"][entry["args"].index("--steps") + 1])
            if not man or int(man.get("step", -1)) != steps:
                problem = (f"exit 0 but no export at step {steps} (stopped early? export step "
                           f"{(man or {}).get('step')})")
            else:
                results = {"steps": man.get("step"), "export": str(d / "export"), "export_sha256": export_sha(d / "export"),
                           "pretext_loss": final_loss(d), "samples_seen": man.get("samples_seen")}
        else:
            m = read_json(d / "metrics.json")
            if not m:
                problem = "exit 0 but no metrics.json"
            else:
                results = {"mean_dice": m.get("mean_dice"), "dice": m.get("dice"),
                           "export_sha256": export_sha(Path(entry["export"])) if entry["init"] == "pretrained" else None}
        if problem:
            write_json(d / FAILED, {"status": "failed", "time": _now(), "command": cmd, "key": entry["key"],
                                    "exit_code": rc, "timed_out": timed_out, "reason": problem, "seconds": seconds,
                                    "log": str(d / LOG), "log_tail": tail})
            say(f"{tag}{entry['id']}: failed: {problem} (log {d / LOG})")
            return "failed"
        write_json(d / DONE, {"status": "done", "time": _now(), "command": cmd, "key": entry["key"],
                              "seconds": seconds, "wall_s": _all_wall(d), **results})
        detail = (f"loss {results['pretext_loss']:.4f}" if entry["stage"] == "pretrain" and results.get("pretext_loss")
                  is not None else f"mean Dice {results['mean_dice']:.3f}" if results.get("mean_dice") is not None else "")
        say(f"{tag}{entry['id']}: done in {seconds:.0f} s" + (f" ({detail})" if detail else ""))
        return "done"


def run_all(plan_: dict, say=None) -> int:
    """Every run here, one after another (pretraining first); failures are recorded and the rest go on."""
    say = say or _say
    runner = Runner()
    counts: dict = {}
    entries = plan_["pretrain"] + plan_["finetune"]
    with runner.signals():
        for i, entry in enumerate(entries):
            if runner.stopping:
                break
            r = run_entry(entry, plan_, runner, say, tag=f"[{i + 1}/{len(entries)}] ")
            counts[r] = counts.get(r, 0) + 1
    if runner.stopping:
        say(f"stopped ({runner.stopping}); run the same command to continue: finished runs are skipped, an "
            "interrupted pretraining resumes from its newest checkpoint")
        return 128 + int(getattr(signal, runner.stopping, signal.SIGTERM))
    say("runs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if counts.get("failed") else 0


# ============================================================================================ statistics
def paired_interval(diffs, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its percentile bootstrap interval. Each resample
    draws ``len(diffs)`` pairs with replacement (``numpy.random.default_rng(seed).integers``, one
    ``[resamples, n]`` draw), so the interval is reproducible."""
    import numpy as np

    d = np.asarray(list(diffs), dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))  # [B, n]
    means = d[idx].mean(axis=1)  # [B]
    a = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [a, 100 - a])
    return float(d.mean()), float(low), float(high)


def case_means(metrics: dict) -> dict:
    """Per test case, the mean foreground Dice (classes absent from both truth and prediction left out)."""
    out = {}
    for key, case in (metrics.get("cases") or {}).items():
        vals = [v for v in (case.get("dice") or {}).values() if isinstance(v, (int, float)) and v == v]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def paired_diffs(pairs: list[tuple[dict, dict]]) -> tuple[list[float], list[str]]:
    """Differences pretrained − scratch over every (seed, test case) pair; notes on pairs that do not fit."""
    diffs, notes = [], []
    for a, b in pairs:
        if (a.get("split") or {}).get("test") != (b.get("split") or {}).get("test"):
            notes.append(f"seed {a.get('seeds', {}).get('train')}: test sets differ, not paired")
            continue
        ca, cb = case_means(a), case_means(b)
        for k in sorted(set(ca) & set(cb)):
            diffs.append(ca[k] - cb[k])
    return diffs, notes


# ============================================================================================ results
def _fnum(v, nd: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def collect(abl: Ablation, out: Path, say=None) -> dict:
    """results.csv, results.md and the two plots from whatever the run folders hold (atomic writes)."""
    say = say or _say
    import numpy as np

    out = Path(out).resolve()
    p = plan(abl, out)
    ft_cfg = abl.data["ft_config"]
    pre_by_cell = {e["cell"]: e for e in p["pretrain"]}
    pre_info = {}
    for e in p["pretrain"]:
        st, why = status(e)
        done = read_json(Path(e["dir"]) / DONE) or {}
        pre_info[e["cell"]] = {"status": st, "why": why, "steps": done.get("steps") if st == "done" else None,
                               "wall_s": done.get("wall_s") if st == "done" else None,
                               "loss": final_loss(Path(e["dir"])) if st == "done" else None}
    rows, metrics = [], {}
    classes: list = []
    for e in p["finetune"]:
        st, why = status(e)
        m = read_json(Path(e["dir"]) / "metrics.json") if st == "done" else None
        if m:
            metrics[e["id"]] = m
            classes += [c for c in m.get("dice", {}) if c not in classes]
        rows.append((e, st, why, m))
    hd95 = bool(ft_cfg.eval.hd95)
    head = ["run", "cell", "recipe", "overrides", "init", "network", "n_train", "seed", "pretrain_steps",
            "pretrain_wall_s", "pretext_loss", *[f"dice_{c}" for c in classes], "mean_dice",
            *([f"hd95_{c}" for c in classes] + ["mean_hd95"] if hd95 else []), "status", "folder"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for e, st, why, m in rows:
        pre = pre_by_cell.get(e["cell"]) if e["init"] == "pretrained" else None
        info = pre_info.get(e["cell"], {}) if pre else {}
        dice = (m or {}).get("dice", {})
        hd = {}
        if m and hd95:
            for c in classes:
                vals = [case.get("hd95", {}).get(c) for case in m.get("cases", {}).values()]
                vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
                hd[c] = sum(vals) / len(vals) if vals else None
        hd_vals = [v for v in hd.values() if v is not None]
        w.writerow([e["id"], e["cell"], pre["recipe"] if pre else "",
                    json.dumps(pre["overrides"], separators=(",", ":")) if pre else "", e["init"], e["network"],
                    e["n_train"], e["seed"], info.get("steps") or "", _fnum(info.get("wall_s"), 1),
                    _fnum(info.get("loss"), 5), *[_fnum(dice.get(c), 4) for c in classes],
                    _fnum((m or {}).get("mean_dice"), 4),
                    *([_fnum(hd.get(c), 2) for c in classes] + [_fnum(sum(hd_vals) / len(hd_vals), 2) if hd_vals else ""]
                      if hd95 else []),
                    st if st != "failed" else f"failed: {why}", e["dir"]])
    write_text(out / "results.csv", buf.getvalue())

    # ---- per cell and n_train: mean ± std over seeds, the paired difference to scratch ------------------
    by_cell: dict = {}
    for e, st, why, m in rows:
        by_cell.setdefault((e["cell"], e["n_train"]), {})[e["seed"]] = (e, m)
    scratch_of = {c.name: f"scratch-{safe_name(c.network)}" for c in abl.cells}
    order = [c.name for c in abl.cells] + sorted(set(scratch_of.values()))
    summary: dict = {}
    for (cell, n), seeds in by_cell.items():
        vals = [m["mean_dice"] for e, m in seeds.values() if m and m.get("mean_dice") is not None]
        s = {"mean": float(np.mean(vals)) if vals else None,
             "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "seeds": len(vals),
             "of": len(seeds), "delta": None}
        if cell in scratch_of:
            ref = by_cell.get((scratch_of[cell], n), {})
            pairs = [(m, ref[sd][1]) for sd, (e, m) in sorted(seeds.items()) if m and sd in ref and ref[sd][1]]
            diffs, notes = paired_diffs(pairs)
            if diffs:
                mean, lo, hi = paired_interval(diffs)
                s["delta"] = {"mean": mean, "low": lo, "high": hi, "pairs": len(diffs), "seeds": len(pairs),
                              "excludes_zero": lo > 0 or hi < 0, "notes": notes}
        summary[(cell, n)] = s
    lines = [f"# Ablation `{abl.name}`", "",
             f"From `{abl.file}` on {_now()}. Pretraining: {len(abl.cells)} cell(s), {abl.pre['steps']} steps"
             f"{' (preset ' + abl.pre['preset'] + ')' if abl.pre.get('preset') else ''}, {abl.pre['nproc']} process(es), "
             f"seed {abl.pre['seed']}. Fine-tuning on `{abl.dataset}` ({abl.data['volumes']} labelled volumes, "
             f"{abl.data['test']} test / {abl.data['val']} validation per split): {abl.ft['steps']} steps"
             f"{' (preset ' + abl.ft['preset'] + ')' if abl.ft.get('preset') else ''}, n_train {abl.ft['n_train']}, "
             f"seeds {abl.ft['seeds']} (each seed sets train.seed and "
             f"{'data.split_seed' if abl.ft['vary_split'] else 'not the split: data.split_seed 0'}).", "",
             "Mean test Dice = the mean over foreground classes and test volumes of one run; ± is the standard "
             "deviation over seeds. Δ vs scratch: pretrained − scratch (same network, n_train and seed: same split and "
             "decoder init), per test volume its mean foreground Dice, averaged over every (seed, test volume) pair; "
             f"95 % percentile bootstrap over those pairs ({BOOTSTRAP_RESAMPLES} resamples, generator seed "
             f"{BOOTSTRAP_SEED}). ★ = the highest mean Dice at that n_train.", "",
             "| n_train | cell | recipe | settings | network | seeds | mean Dice ± std | Δ vs scratch [95 % CI] | "
             "CI excludes 0 |", "|---|---|---|---|---|---|---|---|---|"]
    for n in abl.ft["n_train"]:
        present = [(c, summary[(c, n)]) for c in order if (c, n) in summary]
        best = max((s["mean"] for _, s in present if s["mean"] is not None), default=None)
        for cell, s in present:
            c = next((x for x in abl.cells if x.name == cell), None)
            star = " ★" if best is not None and s["mean"] == best else ""
            mean = "–" if s["mean"] is None else (f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None
                                                   else f"{s['mean']:.3f} ± –")
            dl = s["delta"]
            delta = "–" if not dl else f"{dl['mean']:+.3f} [{dl['low']:+.3f}, {dl['high']:+.3f}] ({dl['pairs']} pairs)"
            excl = ("–" if not dl else "**yes**, better" if dl["low"] > 0 else "**yes**, worse" if dl["high"] < 0
                    else "no")
            settings = ", ".join(f"{k}={_fmt_value(v)}" for k, v in (c.settings if c else {}).items()) or "–"
            name = f"**{cell}**{star}" if star else cell
            net = c.network if c else cell.removeprefix("scratch-")
            lines.append(f"| {n} | {name} | {c.recipe if c else 'scratch'} | {settings} | {net} | {s['seeds']}/{s['of']} "
                         f"| {mean} | {delta} | {excl} |")
    lines.append("")
    problems = []
    for e in p["pretrain"]:
        info = pre_info[e["cell"]]
        if info["status"] != "done":
            problems.append(f"- `{e['id']}`: {info['status']}" + (f": {info['why']}" if info["why"] else "")
                            + (f" (log `{Path(e['dir']) / LOG}`)" if info["status"] == "failed" else ""))
    for e, st, why, m in rows:
        if st != "done":
            problems.append(f"- `{e['id']}`: {st}" + (f": {why}" if why else "")
                            + (f" (log `{Path(e['dir']) / LOG}`)" if st == "failed" else ""))
    notes = sorted({n for s in summary.values() if s["delta"] for n in s["delta"]["notes"]})
    if problems or notes:
        lines += ["## Failed, skipped or missing runs", "", *problems, *[f"- note: {n}" for n in notes], ""]
    pre_rows = [f"| {e['cell']} | {e['recipe']} | {i['status']} | {i['steps'] or '–'} | {_fnum(i['wall_s'], 0) or '–'} "
                f"| {_fnum(i['loss'], 4) or '–'} |" for e in p["pretrain"] for i in [pre_info[e["cell"]]]]
    lines += ["## Pretraining", "", "| cell | recipe | status | steps | wall s | final pretext loss (mean of last 10) |",
              "|---|---|---|---|---|---|", *pre_rows, ""]
    plots = _plots(abl, p, summary, order, out)
    for png, caption in plots:
        lines += [f"![{caption}]({png})", ""]
    write_text(out / "results.md", "\n".join(lines))
    say(f"results: {out / 'results.csv'} ({len(rows)} rows), {out / 'results.md'}"
        + "".join(f", {out / png}" for png, _ in plots))
    return {"summary": summary, "rows": rows}


def _plots(abl: Ablation, p: dict, summary: dict, order: list, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for cell in order:
        pts = [(n, summary[(cell, n)]) for n in abl.ft["n_train"] if (cell, n) in summary and summary[(cell, n)]["mean"]
               is not None]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        ax.errorbar(xs, [s["mean"] for _, s in pts], yerr=[s["std"] or 0.0 for _, s in pts], marker="o", capsize=3,
                    linestyle="--" if cell.startswith("scratch") else "-", label=cell)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xticks(abl.ft["n_train"], [str(n) for n in abl.ft["n_train"]])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("mean test Dice (error bars: std over seeds)")
        ax.set_title(f"{abl.name}: Dice vs labelled volumes (dashed: scratch)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out / "dice_vs_n_train.png")
        made.append(("dice_vs_n_train.png", "mean test Dice vs labelled volumes"))
    plt.close(fig)
    curves = {}
    for e in p["pretrain"]:
        rows = pretext_losses(Path(e["dir"]))
        if rows:
            curves.setdefault(e["recipe"], []).append((e["cell"], rows))
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        for ax, (recipe, cs) in zip(axes[0], sorted(curves.items())):
            for cell, rows in cs:
                ax.plot([s for s, _ in rows], [v for _, v in rows], label=cell, linewidth=1)
            ax.set_title(recipe)
            ax.set_xlabel("step")
            ax.set_ylabel("pretext loss")
            ax.legend(fontsize=7)
        fig.suptitle("pretext loss per cell: one panel per recipe (raw values; the recipes' losses differ in scale)")
        fig.tight_layout()
        _save(fig, out / "pretext_loss.png")
        plt.close(fig)
        made.append(("pretext_loss.png", "pretext loss curves, one panel per recipe"))
    return made


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


# ============================================================================================ SLURM
def _sbatch_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}-{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:00" if s >= 86400 else \
        f"{s // 3600:02d}:{s % 3600 // 60:02d}:00"


def write_slurm(abl: Ablation, p: dict, out: Path, file: str) -> list[Path]:
    """OUT/slurm/{pretrain,finetune,collect}.sbatch + submit.sh; the array tasks run entries of OUT/plan.json."""
    import shlex

    d = Path(out) / "slurm"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    made = []
    py, abl_file, cwd = shlex.quote(sys.executable), shlex.quote(str(Path(file).resolve())), shlex.quote(os.getcwd())
    outq = shlex.quote(str(Path(out).resolve()))
    for stage, runs in (("pretrain", p["pretrain"]), ("finetune", p["finetune"])):
        conf = abl.slurm.get(stage) or {}
        nproc = abl.pre["nproc"] if stage == "pretrain" else abl.ft["nproc"]
        gpus = conf.get("gpus", nproc)
        head = ["#!/bin/bash",
                f"# medssl ablation {abl.name}, stage {1 if stage == 'pretrain' else 2}: one {stage} run per array task "
                f"({len(runs)} runs, listed in {Path(out).resolve() / 'plan.json'}).",
                "# Each task runs `python -m medssl.pretrain ablate FILE --run-index $SLURM_ARRAY_TASK_ID --stage "
                f"{stage}`: the runner's own code path (folder, log, done/failed marker).",
                "# Time limit: SLURM sends SIGUSR1 5 minutes before it (B:); the runner passes SIGTERM to the run (a "
                "pretraining run saves a checkpoint), then the task is requeued and resumes.",
                f"#SBATCH --job-name=medssl-ablate-{abl.name}-{stage}",
                f"#SBATCH --array=0-{len(runs) - 1}",
                "#SBATCH --nodes=1",
                "#SBATCH --ntasks-per-node=1"]
        if gpus:
            head.append(f"#SBATCH --gpus-per-node={int(gpus)}")
        head.append(f"#SBATCH --cpus-per-task={int(conf.get('cpus') or 8)}")
        if conf.get("mem"):
            head.append(f"#SBATCH --mem={conf['mem']}")
        limit = conf.get("time") or _sbatch_time((abl.pre if stage == "pretrain" else abl.ft)["timeout"] + 600)
        head += [f"#SBATCH --time={limit}", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={Path(out).resolve() / 'slurm' / 'logs'}/%x-%A_%a.out",
                 f"#SBATCH --chdir={os.getcwd()}"]
        if abl.slurm.get("partition"):
            head.append(f"#SBATCH --partition={abl.slurm['partition']}")
        if abl.slurm.get("account"):
            head.append(f"#SBATCH --account={abl.slurm['account']}")
        head += [f"#SBATCH {x}" for x in abl.slurm.get("extra") or []]
        body = f"""
set -uo pipefail
cd {cwd}
threads=$(( ${{SLURM_CPUS_PER_TASK:-8}} / {nproc} ))
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}}  # per process

requeue=0
run_pid=""
notice() {{  # SIGUSR1 (time limit) or SIGTERM (pre-emption): the run checkpoints and stops, the task is requeued
  requeue=1
  echo "$(date -Is) $1: stopping run $SLURM_ARRAY_TASK_ID of {stage} (it saves what it can)"
  if [ -n "$run_pid" ]; then kill -TERM "$run_pid" 2>/dev/null; fi
}}
trap 'notice SIGUSR1' USR1
trap 'notice SIGTERM' TERM

{py} -m medssl.pretrain ablate {abl_file} --out {outq} --run-index "$SLURM_ARRAY_TASK_ID" --stage {stage} &
run_pid=$!
status=0
while kill -0 "$run_pid" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait again until the runner ends
  wait "$run_pid"
  status=$?
done
if [ "$requeue" = 1 ]; then
  echo "$(date -Is) requeueing $SLURM_JOB_ID (the run continues from its checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
"""
        path = d / f"{stage}.sbatch"
        write_text(path, "\n".join(head) + "\n" + body)
        made.append(path)
    collect_sh = "\n".join([
        "#!/bin/bash", f"# medssl ablation {abl.name}, stage 3: results.csv / results.md / plots from every run folder",
        f"#SBATCH --job-name=medssl-ablate-{abl.name}-collect", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2", "#SBATCH --time=00:30:00", "#SBATCH --open-mode=append",
        f"#SBATCH --output={Path(out).resolve() / 'slurm' / 'logs'}/%x-%j.out", f"#SBATCH --chdir={os.getcwd()}",
        *([f"#SBATCH --partition={abl.slurm['partition']}"] if abl.slurm.get("partition") else []),
        *([f"#SBATCH --account={abl.slurm['account']}"] if abl.slurm.get("account") else []),
        "", "set -uo pipefail", f"cd {cwd}", f"{py} -m medssl.pretrain ablate {abl_file} --out {outq} --collect", ""])
    write_text(d / "collect.sbatch", collect_sh)
    made.append(d / "collect.sbatch")
    submit = f"""#!/bin/bash
# Submit the ablation {abl.name}: stage 1 (pretraining, {len(p['pretrain'])} array tasks), stage 2 (fine-tuning,
# {len(p['finetune'])} array tasks) after ALL of stage 1 has ended (afterany: a failed cell must not block the
# others; its fine-tuning tasks find no export and record "skipped"), stage 3 (results) after stage 2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
jid=$(sbatch --parsable "$here/pretrain.sbatch")
jid=${{jid%%;*}}
echo "stage 1 (pretraining): job $jid"
jid2=$(sbatch --parsable --dependency=afterany:$jid "$here/finetune.sbatch")
jid2=${{jid2%%;*}}
echo "stage 2 (fine-tuning): job $jid2 (after $jid)"
jid3=$(sbatch --parsable --dependency=afterany:$jid2 "$here/collect.sbatch")
jid3=${{jid3%%;*}}
echo "stage 3 (results): job $jid3 (after $jid2); results in {Path(out).resolve()}/results.md"
"""
    write_text(d / "submit.sh", submit)
    os.chmod(d / "submit.sh", 0o755)
    made.append(d / "submit.sh")
    return made


# ============================================================================================ estimate
def _time_it(fn, repeats: int = 2) -> float:
    fn()  # warm-up (allocations, lazy inits)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(abl: Ablation) -> dict:
    """Seconds per optimizer step of every cell (pretraining) and network (fine-tuning), measured here: the task
    (or segmentation network) built for real, forward + backward + optimizer step on a random batch."""
    import torch

    from .backbones import build_backbone
    from .config import task_class
    from .train import make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = {"device": dev.type, "pretrain": {}, "finetune": {}, "window": {}}
    for c in abl.cells:
        cfg = c.config
        torch.manual_seed(0)
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        task = task_class(cfg.recipe)(backbone, cfg.task).to(dev).train()
        opt = make_optimizer(task.param_groups(cfg.optim.weight_decay), cfg)
        chans = int(cfg.model.kwargs.get("in_chans", 1))
        mb = cfg.train.micro_batch
        batch_n = mb if (dev.type == "cuda" or mb * math.prod(cfg.data.crop_size) <= 4 * 64 ** 3) else 1
        x = torch.rand(batch_n, chans, *cfg.data.crop_size, device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            task({"image": x, "key": ["x"] * batch_n})["loss"].backward()
            opt.step()
            sync()

        res["pretrain"][c.name] = _time_it(step) * mb / batch_n * cfg.train.grad_accum
        res.setdefault("data", {})[c.name] = _time_data(cfg) * cfg.train.grad_accum
    ft_cfg = abl.data["ft_config"]
    n_classes = max(abl.data["classes"] or {1: "x"}) + 1
    seen = {}
    for c in abl.cells:
        if c.net_key in seen:
            res["finetune"][c.network], res["window"][c.network] = seen[c.net_key]
            continue
        model = _ft_network(c, ft_cfg, n_classes).to(dev)
        chans = int(c.config.model.kwargs.get("in_chans", 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mb = ft_cfg.train.micro_batch
        x = torch.rand(mb, chans, *ft_cfg.data.crop_size, device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().logsumexp(1).mean().backward()
            opt.step()
            sync()

        xs = torch.rand(ft_cfg.eval.sw_batch, chans, *ft_cfg.data.crop_size, device=dev)

        def window():
            with torch.no_grad():
                model.eval()
                model(xs)
                model.train()
            sync()

        seen[c.net_key] = (_time_it(step) * ft_cfg.train.grad_accum, _time_it(window) / ft_cfg.eval.sw_batch)
        res["finetune"][c.network], res["window"][c.network] = seen[c.net_key]
    return res


def _time_data(cfg, batches: int = 4) -> float:
    """Seconds per micro-batch of the cell's real stream (decode, crops, augmentation), read in this process."""
    import copy

    import torch

    from .engine import DistEnv
    from .train import make_stream

    c = copy.deepcopy(cfg)
    c.data.num_workers = 0
    try:
        it = iter(make_stream(c, DistEnv(0, 1, 0, torch.device("cpu")), 0))
        next(it)  # the first volumes: decode + pool
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - t) / batches
    except Exception:  # noqa: BLE001 - an estimate: leave the data out rather than fail the dry run
        return 0.0


def _ft_network(cell: Cell, ft_cfg, n_classes: int):
    """The fine-tuning network of a cell's export, built as ``finetune.loading.build`` builds it."""
    import torch

    from medssl.finetune.models import SegmentationNet, make_decoder

    from .backbones import build_backbone
    from .config import task_class
    from .registry import DECODERS

    cfg = cell.config
    crop = list(ft_cfg.data.crop_size)
    chans = int(cfg.model.kwargs.get("in_chans", 1))
    with torch.device("meta"):
        b = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        comps = task_class(cfg.recipe)(b, cfg.task).export_components() if hasattr(task_class(cfg.recipe),
                                                                                    "export_components") else {}
    kwargs = dict(getattr(b, "config", {}) or {})
    if "img_size" in kwargs:
        kwargs["img_size"] = crop
    kwargs["in_chans"] = chans
    if hasattr(b, "num_prefix_tokens"):
        kwargs["cls_token"] = ft_cfg.model.cls_token == "keep" and bool(kwargs.get("cls_token", True))
        kwargs["pos_embed"] = ft_cfg.model.pos_embed
    backbone = build_backbone(cfg.model.backbone, **kwargs)
    comp = comps.get("decoder")
    if comp is not None and ft_cfg.model.arch in ("auto", "pretrained"):
        reg = getattr(comp, "registry_name", type(comp).__name__)
        decoder = DECODERS.build(reg, **{**dict(comp.config), "out_channels": n_classes})
        return SegmentationNet(backbone, decoder, takes_image=False)
    _, decoder = make_decoder(backbone, "auto" if ft_cfg.model.arch == "pretrained" else ft_cfg.model.arch, chans,
                              n_classes, ft_cfg)
    return SegmentationNet(backbone, decoder)


def _windows_per_volume(abl: Ablation) -> float:
    """Mean sliding windows per prepared labelled volume (headers only: shape × voxel size / target spacing)."""
    ft = abl.data["ft_config"]
    spacing = None
    idx = read_json(Path(abl.shards[0]) / "index.json") or {}
    sp = (idx.get("config") or {}).get("spacing")
    with contextlib.suppress(TypeError, ValueError):
        spacing = [float(sp)] * 3 if isinstance(sp, (int, float, str)) else [float(v) for v in sp]
    roi, step = ft.data.crop_size, [max(1, int(r * (1 - ft.eval.overlap))) for r in ft.data.crop_size]
    counts = []
    try:
        import nibabel as nib

        for src in abl.data["sources"][:20]:
            if not src.images:
                continue
            h = nib.load(src.images[0]).header
            shape, zooms = h.get_data_shape()[:3], h.get_zooms()[:3]
            size = [s * z / (spacing[i] if spacing else z) for i, (s, z) in enumerate(zip(shape, zooms))]
            counts.append(math.prod(1 + max(0, math.ceil((s - r) / st)) for s, r, st in zip(size, roi, step)))
    except Exception:  # noqa: BLE001 - an estimate: fall back to a guess
        pass
    return sum(counts) / len(counts) if counts else 8.0


def estimate(abl: Ablation, p: dict, meas: dict) -> dict:
    """Seconds per run and in all, here, one run after another (runs already done count 0)."""
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    ft = abl.data["ft_config"]
    wins = _windows_per_volume(abl)

    def crowd(nproc):  # processes × threads beyond the cores share them
        return 1.0 if meas["device"] == "cuda" else max(1.0, nproc * threads / cores)

    per = {}
    for e, c in zip(p["pretrain"], abl.cells):
        compute, data = meas["pretrain"][e["cell"]], meas["data"][e["cell"]]
        workers = max(1, c.config.data.num_workers)
        if meas["device"] == "cuda":  # the loader workers prepare the next batch while the GPU computes
            step = max(compute, data / workers)
        else:  # every process and loader worker shares the cores; several processes also all-reduce over gloo
            step = max(compute + data / min(workers, cores), e["nproc"] * (compute + data) * threads / cores)
            step += DIST_STEP_S if e["nproc"] > 1 else 0.0
        per[e["id"]] = START_S["pretrain"] + START_PER_PROCESS_S * (e["nproc"] - 1) + abl.pre["steps"] * step
    evals = math.ceil(abl.ft["steps"] / ft.train.eval_every) if abl.data["val"] else 0
    vols = abl.data["test"] + abl.data["val"]
    for e in p["finetune"]:
        step, win = meas["finetune"][e["network"]], meas["window"][e["network"]]
        per[e["id"]] = (START_S["finetune"] + PREPARE_S_PER_VOLUME * (e["n_train"] + vols)
                        + (abl.ft["steps"] * step + (evals * abl.data["val"] + abl.data["test"]) * wins * win)
                        * crowd(e["nproc"]))
    by_id = {e["id"]: e for e in p["pretrain"] + p["finetune"]}
    todo = {k: v for k, v in per.items() if status(by_id[k])[0] != "done"}
    return {"per_run": per, "total": sum(todo.values()),
            "pretrain": sum(v for k, v in todo.items() if k.startswith("pretrain/")),
            "finetune": sum(v for k, v in todo.items() if k.startswith("finetune/")), "windows": wins}


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def dry_run(abl: Ablation, out: Path, say=None) -> int:
    say = say or _say
    p = plan(abl, out)
    say(f"ablation {abl.name} ({abl.file}) -> {Path(out).resolve()}")
    say(f"  shards: {', '.join(abl.shards)}")
    say(f"  downstream: {abl.dataset}: {abl.data['volumes']} labelled volumes, "
        f"{len([k for k in abl.data['classes'] if k])} foreground classes; per split {abl.data['test']} test / "
        f"{abl.data['val']} validation / up to {abl.data['train']} training")
    say(f"cells ({len(abl.cells)}), pretrained {abl.pre['steps']} steps each"
        + (f" (preset {abl.pre['preset']})" if abl.pre.get("preset") else "")
        + f" on {abl.pre['nproc']} process(es), seed {abl.pre['seed']}:")
    width = max(len(c.name) for c in abl.cells)
    for c in abl.cells:
        ov = " ".join(override_args(c.overrides)) or "(recipe defaults)"
        say(f"  {c.name:<{width}}  {c.recipe:<14} {ov}   network {c.network}")
    nets = sorted({(f"scratch-{safe_name(c.network)}", c.network) for c in abl.cells})
    say(f"scratch baselines ({len(nets)}): "
        + ", ".join(f"{f} (cells {', '.join(x.name for x in abl.cells if x.network == n)})" for f, n in nets))
    sts = {e["id"]: status(e) for e in p["pretrain"] + p["finetune"]}
    n_done = lambda es: sum(sts[e["id"]][0] == "done" for e in es)  # noqa: E731
    say(f"runs: {len(p['pretrain'])} pretraining ({n_done(p['pretrain'])} done), {len(p['finetune'])} fine-tuning "
        f"({n_done(p['finetune'])} done) = ({len(abl.cells)} cells + {len(nets)} scratch) x n_train {abl.ft['n_train']} x "
        f"seeds {abl.ft['seeds']}, {abl.ft['steps']} steps each" + (f" (preset {abl.ft['preset']})" if abl.ft.get("preset")
                                                                    else ""))
    for e in p["pretrain"] + p["finetune"]:
        st, why = sts[e["id"]]
        if st != "missing":
            say(f"  {e['id']}: {st}" + (f" ({why})" if why else ""))
    t0 = time.time()
    meas = measure(abl)
    est = estimate(abl, p, meas)
    import torch

    say(f"measured on this machine ({meas['device']}, {torch.get_num_threads()} thread(s) per process, "
        f"{os.cpu_count()} cores; {time.time() - t0:.0f} s to measure):")
    for c in abl.cells:
        say(f"  pretrain {c.name}: {meas['pretrain'][c.name]:.3f} s/step compute + {meas['data'][c.name]:.3f} s data -> "
            f"{_dur(est['per_run']['pretrain/' + c.name])} per run with start-up and export")
    for net in sorted(meas["finetune"]):
        one = next(e for e in p["finetune"] if e["network"] == net)
        say(f"  finetune {net}: {meas['finetune'][net]:.3f} s/step, {meas['window'][net]:.3f} s per evaluation "
            f"window ({est['windows']:.0f} windows per volume) -> about {_dur(est['per_run'][one['id']])} per run")
    say(f"estimated wall time here, one run after another (not done yet): {_dur(est['total'])} "
        f"(pretraining {_dur(est['pretrain'])}, fine-tuning {_dur(est['finetune'])})")
    say("dry run: nothing run, nothing written")
    return 0


# ============================================================================================ CLI
def _check_out(out: Path, abl: Ablation) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AblationError(f"--out {out} is a file; give a new folder or this ablation's earlier folder")
    items = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    old = read_json(out / "plan.json")
    if items and old is None:
        raise AblationError(f"--out {out} holds other files ({', '.join(sorted(items)[:5])}); give a new or empty "
                            "folder, or the folder of an earlier run of this ablation")
    if old is not None and old.get("ablation") != abl.name:
        raise AblationError(f"--out {out} holds the ablation {old.get('ablation')!r}, not {abl.name!r}; give another --out")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain ablate",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("Schema (")[0].rstrip(),
                                epilog="Schema (" + __doc__.split("Schema (", 1)[1])
    p.add_argument("file", help="ablation YAML (recipes/ablations/*.yaml)")
    p.add_argument("--out", help="output folder (default: ablations/<name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="print the plan and a measured time estimate; run nothing")
    g.add_argument("--slurm", action="store_true", help="write OUT/slurm/*.sbatch (arrays) + submit.sh; run nothing")
    g.add_argument("--collect", action="store_true", help="write results.csv / results.md / plots from the run folders")
    g.add_argument("--run-index", type=int, help=argparse.SUPPRESS)  # one entry of OUT/plan.json (SLURM array task)
    p.add_argument("--stage", choices=["pretrain", "finetune"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if (a.run_index is None) != (a.stage is None):
        print("error: --run-index and --stage go together", file=sys.stderr)
        return 2
    try:
        abl = load(a.file)
        out = Path(a.out or Path("ablations") / abl.name).resolve()
        _check_out(out, abl)
        if a.dry_run:
            return dry_run(abl, out)
        if a.run_index is not None:
            saved = read_json(out / "plan.json")
            if not saved or saved.get("spec_hash") != abl.spec_hash:
                raise AblationError(f"{out / 'plan.json'} is missing or was written from another version of {a.file}; "
                                    "write the scripts again with --slurm")
            runs = saved[a.stage]
            if not 0 <= a.run_index < len(runs):
                raise AblationError(f"--run-index {a.run_index}: the {a.stage} stage has runs 0-{len(runs) - 1}")
    except AblationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.run_index is not None:
        runner = Runner()
        with runner.signals():
            r = run_entry(runs[a.run_index], saved, runner, tag=f"[{a.stage} {a.run_index}] ")
        return {"done": 0, "skipped": 0, "busy": 0, "stopped": 0}.get(r, 1)
    if a.collect:
        collect(abl, out)
        return 0
    pl = plan(abl, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", pl)
    write_text(out / "ablation.yaml", Path(a.file).read_text())
    if a.slurm:
        made = write_slurm(abl, pl, out, a.file)
        _say(f"wrote {', '.join(str(m) for m in made)}\n{len(pl['pretrain'])} pretraining + {len(pl['finetune'])} "
              f"fine-tuning runs; submit with: bash {out / 'slurm' / 'submit.sh'}")
        return 0
    _say(f"ablation {abl.name}: {len(pl['pretrain'])} pretraining + {len(pl['finetune'])} fine-tuning runs into {out}")
    rc = run_all(pl)
    collect(abl, out)
    return rc
