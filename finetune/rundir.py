"""A fine-tuning run folder: what is in it, whether a command may continue it, and moving it aside.

Re-running the command of a finished run says so and exits without training; the same command with a
larger ``--steps`` continues from the last checkpoint; a different config into an existing run folder is
refused with the keys that differ (a new ``--out``, or ``--resume none --overwrite``, which moves the
previous run into ``RUN/previous-<time>/``; nothing is deleted).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

RUN_ITEMS = ("config.yaml", "split.json", "checkpoints", "metrics.json", "metrics.jsonl", "model_best.safetensors",
             "network.json", "manifest.json", "predictions", "overlays", "resume.json", "wandb", "wandb_id")
# keys that may change between a run and its continuation
CONTINUABLE = ("train.steps", "train.checkpoint_every", "train.keep_last", "train.log_every", "train.wandb",
               "data.num_workers")


class RunDirError(ValueError):
    """The run folder holds another run (or needs --overwrite)."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for every key that differs, leaving out the ones a continuation may change."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in CONTINUABLE and k != "out" and a.get(k) != b.get(k)]


def run_items(run: Path) -> list[str]:
    from medssl.pretrain.checkpoint import run_items as items_in

    return items_in(run, RUN_ITEMS)


def move_aside(run: Path) -> tuple[Path, list[str]]:
    dest = run / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = run / (time.strftime("previous-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    names = run_items(run)
    dest.mkdir(parents=True)
    for name in names:
        (run / name).rename(dest / name)
    return dest, names


def plan(cfg, resume: str = "auto", overwrite: bool = False) -> dict:
    """What to do with ``cfg.out``: ``{"action": "new" | "continue" | "finished", "moved": path | None}``.

    Raises :class:`RunDirError` (the message names the differing keys and the way out)."""
    run = Path(cfg.out)
    items = run_items(run) if run.exists() else []
    if not items:
        return {"action": "new", "moved": None}
    if resume == "none":
        if not overwrite:
            raise RunDirError(f"{run} already holds a fine-tuning run ({', '.join(items)}); --resume none starts "
                              "over only with --overwrite (which moves the previous run into "
                              f"{run}/previous-<time>/), or pass a new --out")
        dest, _ = move_aside(run)
        return {"action": "new", "moved": str(dest)}
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise RunDirError(f"{run} holds {', '.join(items)} but no config.yaml, so it cannot be continued; pass a new "
                          "--out, or --resume none --overwrite to move it aside")
    old = yaml.safe_load(cfg_path.read_text()) or {}
    try:  # keys this version added read as their defaults, so an older run still continues
        from .config import config_from_dict

        old = config_from_dict(old).to_dict()
    except (ValueError, KeyError, TypeError):
        pass  # a key this version does not know: compare as written
    diff = config_diff(old, cfg.to_dict())
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (run) -> {b!r} (now)" for k, a, b in diff)
        raise RunDirError(f"{run} holds a fine-tuning run with another config:\n{lines}\nPass a new --out, or "
                          "--resume none --overwrite to move the previous run aside (into "
                          f"{run}/previous-<time>/) and start over")
    metrics = run / "metrics.json"
    if metrics.exists():
        done = json.loads(metrics.read_text()).get("steps", 0)
        if done >= cfg.train.steps:
            return {"action": "finished", "moved": None, "steps": done}
    return {"action": "continue", "moved": None}
