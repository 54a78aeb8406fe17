"""Typed run configuration: dataclass defaults ← recipe YAML ← preset ← dotted CLI overrides.

A recipe YAML holds plain values in the sections of :class:`RunConfig` (``model``, ``task``, ``data``,
``optim``, ``train``) plus optional ``presets`` (named sets of dotted overrides, e.g. ``tiny`` for
CPU smoke tests). The ``task`` section is checked against the recipe's own dataclass
(``TaskClass.config_class``). Unknown keys fail with the valid keys of their section; the resolved
config is written into the run dir, every checkpoint and the export manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe, preset or override that does not fit; the message names the value and the fix."""


@dataclass
class ModelConfig:
    backbone: str = "vit3d_base_p16"
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments of the backbone
    # activation checkpointing: the first N blocks of the backbone (-1: all) keep no activations and recompute them in
    # the backward pass (less memory for a larger micro batch, ~1/3 more compute); 0 = off
    checkpoint_blocks: int = 0


@dataclass
class DataConfig:
    shards: list = field(default_factory=list)  # shard set folders (python -m medssl.shards build)
    crop_size: list = field(default_factory=lambda: [96, 96, 96])
    crops_per_volume: int = 4
    num_workers: int = 2
    window_ct: list = field(default_factory=lambda: [-175.0, 250.0])  # HU window of the official recipes
    window_out: list = field(default_factory=lambda: [0.0, 1.0])
    pos_fraction: float = 0.75
    negatives: str = "background"  # crops not on the body: background-centred (RandCropByPosNegLabeld) | uniform
    flip_prob: float = 0.5
    rot90_prob: float = 0.3
    intensity_prob: float = 0.0  # RandScale/ShiftIntensityd per crop (Hi-End-MAE: 0.1, set in its recipe)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    shuffle_buffer: int = 4
    pool_size: int = 4
    partitions: int = 0  # S > 0: crop j of each volume centred in the j-th of S cranio-caudal slabs (contrastive)
    partition_inplane: str = "body"  # partitioned crops centred in-plane on the body's bounding box | "sampled"
    # Where training crops are cut: cpu = the DataLoader workers (shards.stream); cuda = the device pool on the
    # training GPU (workers only decode; shards/pool.py); auto = cuda on a GPU run, else cpu; cpu-pool = the device
    # pool's code on CPU tensors (tests, checks). The default stays cpu until the pool has been measured on a GPU.
    crop_device: str = "cpu"
    device_pool: str | int | None = None  # the pool's size: "4GiB" (the default), "512MiB", or a number of volumes


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_fraction: float = 0.01  # of train.steps, linear from 0
    min_lr: float = 0.0  # cosine floor
    grad_clip: float = 0.0  # 0 = off (the official Hi-End-MAE trainer does not clip)
    weight_decay_end: float | None = None  # set: weight decay follows a cosine from weight_decay to this value over
    #                                        training (MambaMIM: 0.04 -> 0.2); groups without decay stay at 0
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (L2 decay added to the gradient, as PyMIC's Adam)
    schedule: str = "cosine"  # cosine: warm-up then cosine to min_lr | step: warm-up then x step_gamma every step_every
    #                           | constant: warm-up then lr
    step_every: int = 20_000
    step_gamma: float = 0.5


@dataclass
class TrainConfig:
    steps: int = 100_000  # optimizer steps
    micro_batch: int = 4  # crops per GPU per forward
    grad_accum: int = 1
    global_batch: int | None = None  # if given, must equal micro_batch × grad_accum × world size
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    zero_stage: int = 1
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    picture_every: int = 1000
    seed: int = 0
    # seconds one step (forward, backward, gradient all-reduce, optimizer) may take on a rank before its
    # watchdog ends the process naming the ranks that did not answer (checkpoint saves get 3x); NCCL's own default is 600
    collective_timeout: float = 600.0
    compile: bool = False  # torch.compile the task in place (parameter names, checkpoints and exports unchanged)
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU); CPU fp32 runs are deterministic anyway
    wandb: str = "offline"  # offline | online | disabled (WANDB_MODE wins when set)
    wandb_project: str = "medssl"


class ConfigIO:
    """What every resolved config offers: a dict, a hash (without the output folder), a YAML dump."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 of the resolved config (without the output folder), recorded in exports and metrics."""
        d = self.to_dict()
        d.pop("out", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class RunConfig(ConfigIO):
    recipe: str = ""
    out: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = None  # the recipe's config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)



# ------------------------------------------------------------------------------------- merging
def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(value, current, where: str):
    """Bring a YAML/CLI value to the type of the default it replaces (ints→floats, tuples→lists)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" and "1e3" (no dot) as strings
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number") from None
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, float):
        if not value.is_integer():  # 1e3 is 1000 steps; 1.5 steps is a mistake
            raise ConfigError(f"{where}={value!r} must be a whole number, e.g. {where}={int(current)}")
        return int(value)
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        example = "[" + ",".join(str(v) for v in current) + "]" if current else "[1,2]"
        raise ConfigError(f"{where}={value!r} must be a list: write {where}={example} (brackets, commas, "
                          "no spaces, or quote the whole override)")
    if isinstance(current, dict) and isinstance(value, dict):
        return dict(value)
    if isinstance(current, str) and isinstance(value, str):
        return value
    if type(value) is not type(current):
        raise ConfigError(f"{where}={value!r} has type {type(value).__name__}, expected {type(current).__name__}")
    return value


def _unknown(key: str, where: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {where + key!r}{hint}; valid keys{' under ' + where.rstrip('.') if where else ''}: "
                       f"{', '.join(sorted(valid))}")


def merge(obj, values: dict, where: str = ""):
    """Set ``values`` (nested dicts) on dataclass ``obj`` in place; unknown keys raise :class:`ConfigError`."""
    fields = _fields(obj)
    for key, value in values.items():
        if key not in fields:
            raise _unknown(key, where, fields)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where + key} must be a mapping of its keys, got {value!r}")
            merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, where + key))
    return obj


def set_dotted(obj, dotted: str, value) -> None:
    """``set_dotted(cfg, "optim.lr", 2e-4)``."""
    parts = dotted.split(".")
    holder = obj
    for i, name in enumerate(parts[:-1]):  # a key inside a dict field (model.kwargs.plans=…) adds to that dict
        holder = getattr(holder, name, None) if dataclasses.is_dataclass(holder) else None
        if isinstance(holder, dict):
            new = copy.deepcopy(holder)
            node = new
            for q in parts[i + 1:-1]:
                if not isinstance(node.get(q), dict):
                    node[q] = {}
                node = node[q]
            node[parts[-1]] = value
            parts, value = parts[:i + 1], new
            break
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    merge(obj, nested)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=2e-4"`` → ("optim.lr", 0.0002); values are read as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# ------------------------------------------------------------------------------------- recipes
RECIPES_DIR = Path(importlib.import_module("medssl.recipes").__file__).resolve().parent


def recipe_yaml(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(recipe, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {recipe!r}{hint} (known: {', '.join(known)})")
    return path


def task_class(recipe: str):
    """Import ``recipes.<recipe>`` (which registers its task) and return the task class."""
    from .registry import TASKS

    importlib.import_module(f"medssl.recipes.{recipe}")
    return TASKS.get(recipe)


def load_config(recipe: str, overrides: list[str] | None = None, preset: str | None = None) -> RunConfig:
    """Resolve a run config from a recipe name (or YAML path), an optional preset and dotted overrides."""
    path = recipe_yaml(recipe)
    raw = yaml.safe_load(path.read_text()) or {}
    name = raw.pop("recipe", Path(path).stem)
    presets = raw.pop("presets", {}) or {}
    cls = task_class(name)
    cfg = RunConfig(recipe=name, task=cls.config_class())
    merge(cfg, raw)
    if preset:
        if preset not in presets:
            raise ConfigError(f"recipe {name} has no preset {preset!r} (presets: {', '.join(sorted(presets)) or 'none'})")
        for key, value in presets[preset].items():
            set_dotted(cfg, key, value)
    for text in overrides or []:
        set_dotted(cfg, *parse_override(text))
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a resolved config (as written to the run dir) — used by export and resume."""
    d = dict(d)
    cls = task_class(d["recipe"])
    cfg = RunConfig(recipe=d["recipe"], task=cls.config_class())
    merge(cfg, {k: v for k, v in d.items() if k != "recipe"})
    return cfg


# ------------------------------------------------------------------------------------- resuming
# Keys a resumed run may change: the run length (extending train.steps re-spreads the cosine over the
# new total), how often it logs, draws and checkpoints, where wandb goes, and the run dir's own path.
# Any other difference makes the checkpoints a different model or data stream.
RESUMABLE_KEYS = ("out", "train.steps", "train.log_every", "train.picture_every", "train.checkpoint_every",
                  "train.keep_last", "train.wandb", "train.wandb_project", "train.collective_timeout")


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"steps": 3}}`` → ``{"train.steps": 3}`` (lists and ``model.kwargs`` entries as leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict, allowed=RESUMABLE_KEYS) -> tuple[list, list]:
    """(refusing, allowed) differences between two resolved configs, each as ``(key, old, new)``.
    A key absent on one side reads as ``None`` there."""
    a, b = flatten(old), flatten(new)
    refusing, ok = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (ok if key in allowed else refusing).append((key, a.get(key), b.get(key)))
    return refusing, ok
