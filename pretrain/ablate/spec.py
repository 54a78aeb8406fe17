"""The ablation file: its schema checks, cells and grids, and the network each cell's export fine-tunes into."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


TOP_KEYS = ("name", "shards", "dataset", "pretrain", "finetune", "cells", "grid", "slurm")
PRETRAIN_KEYS = ("preset", "steps", "nproc", "seed", "overrides", "timeout")
FINETUNE_KEYS = ("preset", "steps", "nproc", "overrides", "n_train", "seeds", "vary_split", "timeout", "jobs")
CELL_KEYS = ("name", "recipe", "overrides", "shards", "steps")
GRID_KEYS = ("name", "recipe", "overrides", "axes", "shards", "steps")
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
# CPU, several processes: gloo all-reduce and DeepSpeed's bookkeeping per step, beyond each process's own compute
# on its share of the cores (calibrated on compare_recipes, 2 cores: hi_end_mae tiny 1000 steps in 170 s, measured
# 0.034 s/step on 2 threads; volume_fusion tiny 300 steps in 219 s, measured 0.261 s/step)
DIST_STEP_S = 0.07
PREPARE_S_PER_VOLUME = 1.0  # fine-tuning: load + resample a labelled volume, write its prediction and overlay
DONE, FAILED, SKIPPED, LOG = "done.json", "failed.json", "skipped.json", "run.log"


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
    steps: int = 0  # pretraining steps (the cell's own `steps`, else pretrain.steps)


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

    if d is None and where.startswith(("cells[", "grid")):
        raise AblationError(f"{where} is empty: give a mapping of {', '.join(valid)}")
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
    from ..config import parse_override

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
    """(name, recipe, overrides, settings, shards, steps) for every combination of a grid's axes."""
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
        cells.append((safe_name(name), grid["recipe"], ov, settings, grid.get("shards"), grid.get("steps")))
    return cells


def _network(cfg, ft_cfg, in_chans: int) -> tuple[str, str, dict]:
    """(display name, identity key, facts) of the network fine-tuning builds from this cell's export."""
    import torch

    from ..backbones import build_backbone
    from ..config import task_class

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
        decoder = getattr(backbone, "downstream_decoder", None) or (
            "unetr" if len(set(backbone.feature_strides)) == 1 else "unet")
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

    from ..__main__ import shard_channels
    from ..config import RECIPES_DIR, ConfigError, load_config, set_dotted
    from ..engine import check_batch

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
    jobs = ft.setdefault("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise AblationError(f"finetune.jobs={jobs!r} must be a whole number >= 1 (fine-tuning runs at once here)")
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
        entries.append((safe_name(str(nm)), c["recipe"], ov, dict(ov) or {}, c.get("shards"), c.get("steps")))
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
    for cname, recipe, ov, settings, cell_shards, cell_steps in entries:
        if cell_steps is not None and (isinstance(cell_steps, bool) or not isinstance(cell_steps, int) or cell_steps < 1):
            raise AblationError(f"cell {cname}: steps={cell_steps!r} must be a whole number >= 1 (this cell's "
                                "pretraining steps; without it pretrain.steps)")
        csteps = pre["steps"] if cell_steps is None else cell_steps
        for k in ov:
            if k in OWNED["pretrain"]:
                raise AblationError(f"cell {cname}: {k} is set by the runner (the cell's steps or pretrain.steps / "
                                    "pretrain.seed)")
        cshards = _paths(cell_shards, f"cell {cname}: shards", base) if cell_shards is not None else shards
        try:
            merged = {**pre["overrides"], "train.seed": seed, **ov}
            cfg = load_config(recipe, override_args(merged), pre.get("preset"))
            set_dotted(cfg, "train.steps", csteps)
            cfg.data.shards = cshards
            key = tuple(cshards)
            if key not in channels_of:
                channels_of[key] = shard_channels(cshards)["channels"]
            if channels_of[key] != 1:
                cfg.model.kwargs["in_chans"] = channels_of[key]
            check_batch(cfg, pre["nproc"])
            network, net_key, _ = _network(cfg, ft_cfg, channels_of[key])
            cell = Cell(cname, recipe, ov, cshards, settings, network, net_key, cfg, csteps)
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
    spec = {"name": name, "shards": shards, "dataset": dataset, "pre": pre,
            "ft": {k: v for k, v in ft.items() if k != "jobs"},  # how many run at once changes no run
            "cells": [[c.name, c.recipe, c.overrides, c.shards] + ([c.steps] if c.steps != pre["steps"] else [])
                      for c in cells]}
    abl = Ablation(name, str(path.resolve()), shards, dataset, pre, ft, cells, slurm, data)
    abl.data["ft_config"] = ft_cfg
    abl.spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return abl


def _ft_network(cell: Cell, ft_cfg, n_classes: int):
    """The fine-tuning network of a cell's export, built as ``finetune.loading.build`` builds it."""
    import torch

    from medssl.finetune.models import SegmentationNet, make_decoder

    from ..backbones import build_backbone
    from ..config import task_class
    from ..registry import DECODERS

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
