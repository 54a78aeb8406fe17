"""Resume checkpoints (kept apart from exports): DeepSpeed's own format plus our small JSON sidecars.

Layout of a run dir::

    checkpoints/step00001000/            DeepSpeed files (model states, ZeRO optimizer partitions)
    checkpoints/step00001000/loader_rank{r}.json   each rank's stream cursor
    checkpoints/step00001000/complete.json         written last, by rank 0, after every rank saved
    checkpoints/latest                   DeepSpeed's pointer (text)

Only tags with ``complete.json`` count. ``--resume auto`` tries them newest first and falls back to an
older one (saying so) when a newer one is missing files or does not load on some rank.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from . import engine


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, newest first."""
    if not ckpt_dir.exists():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and p.name.startswith("step") and (p / "complete.json").exists()]
    return sorted(tags, reverse=True)


def param_digest(module: torch.nn.Module) -> str | None:
    """sha256 over every parameter (name order, fp32 bytes): proves a resumed run holds the saved weights.
    None under ZeRO-3, where a rank holds only its partition."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.numel() == 0 or hasattr(p, "ds_id"):
            return None
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(eng, ckpt_dir: Path, step: int, samples: int, loader_state: dict, rank: int, keep_last: int,
         config: dict | None = None) -> None:
    tag = tag_for(step)
    eng.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "samples": samples, "config": config})
    (ckpt_dir / tag / f"loader_rank{rank}.json").write_text(json.dumps(loader_state))
    engine.barrier()
    if rank == 0:
        record = {"step": step, "samples": samples, "param_digest": param_digest(eng.module)}
        (ckpt_dir / tag / "complete.json").write_text(json.dumps(record))
        for old in complete_tags(ckpt_dir)[keep_last:]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    engine.barrier()


def _looks_whole(path: Path, world: int) -> str | None:
    """Why a tag cannot be loaded, or None: the DeepSpeed files and every rank's cursor must exist."""
    if not any(path.glob("*model_states.pt")):
        return "no model states file"
    missing = [r for r in range(world) if not (path / f"loader_rank{r}.json").exists()]
    if missing:
        return f"no stream cursor for rank(s) {missing} (saved with another world size?)"
    return None


class CheckpointMismatch(ValueError):
    """A whole checkpoint that does not fit the configured model (another backbone, width, recipe)."""


class CheckpointUnusable(ValueError):
    """The checkpoint named with ``--resume PATH`` cannot be loaded."""


_MISMATCH = ("size mismatch", "Missing key(s)", "Unexpected key(s)", "Error(s) in loading state_dict")


def _is_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, KeyError, ValueError)) and any(m in str(exc) for m in _MISMATCH)


def resume(eng, ckpt_dir: Path, rank: int, world: int, log=print, tag: str | None = None) -> tuple[int, int, dict | None]:
    """Load the newest complete checkpoint that loads on every rank: returns (step, samples, loader state).

    With ``tag`` only that checkpoint is tried, and one that does not load ends the run. A checkpoint
    that is whole but does not fit the model raises :class:`CheckpointMismatch` and is left as it is;
    only unreadable or incomplete ones are moved aside as ``damaged-<tag>``."""
    explicit = tag is not None
    for tag in ([tag] if explicit else complete_tags(ckpt_dir)):
        path = ckpt_dir / tag
        problem = _looks_whole(path, world)
        ok, mismatch = 0.0, 0.0
        if problem is None:
            try:
                _, client = eng.load_checkpoint(str(ckpt_dir), tag=tag)
                if client is None:
                    problem = "DeepSpeed could not load it"
                else:
                    ok = 1.0
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not end the run
                problem = f"{type(exc).__name__}: {exc}"
                mismatch = 1.0 if _is_mismatch(exc) else 0.0
        # every rank must agree, or ranks would continue from different steps
        if engine.all_reduce_max(mismatch):
            first = (problem or "").splitlines()
            raise CheckpointMismatch(
                f"checkpoint {path} does not fit the configured model ({' '.join(first[:3])[:400]}); it was "
                f"saved by another config. Resume with that run's config ({ckpt_dir.parent / 'config.yaml'}), "
                f"or start a new run with another --out")
        if engine.all_reduce_max(0.0 if ok else 1.0) == 0.0:
            state = json.loads((path / f"loader_rank{rank}.json").read_text())
            saved = json.loads((path / "complete.json").read_text()).get("param_digest")
            now = param_digest(eng.module) if rank == 0 else None
            if rank == 0 and saved and now != saved:
                print(f"warning: weights loaded from {path} differ from the ones saved", file=sys.stderr)
            log(f"resumed from {path} (step {client['step']}, weights digest {'matches' if now == saved else 'n/a'})")
            if rank == 0:
                (ckpt_dir.parent / "resume.json").write_text(json.dumps(
                    {"tag": tag, "step": int(client["step"]), "saved_digest": saved, "loaded_digest": now}))
            return int(client["step"]), int(client.get("samples", 0)), state
        if explicit:
            why = problem or "failed on another rank"
            raise CheckpointUnusable(f"--resume {path}: this checkpoint cannot be used ({why}); pick another tag "
                                     f"in {ckpt_dir} or --resume auto")
        if rank == 0:
            print(f"warning: checkpoint {path} cannot be used ({problem or 'failed on another rank'}); "
                  f"falling back to an older one (moved aside as damaged-{tag})", file=sys.stderr, flush=True)
            path.rename(ckpt_dir / f"damaged-{tag}")  # or it would shadow the new ones of this run
        engine.barrier()
    return 0, 0, None


# ------------------------------------------------------------------------------------- run dirs
RUN_ITEMS = ("config.yaml", "checkpoints", "export", "metrics.jsonl", "pictures", "resume.json", "wandb")


def run_items(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to a pretraining run (empty: a new or foreign folder)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_ITEMS:
        p = run_dir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def move_aside(run_dir: Path, dest: Path) -> list[str]:
    """Move every run item of ``run_dir`` into ``dest`` (e.g. ``RUN/previous-20260101-120000``);
    returns the names moved. Nothing is deleted."""
    names = run_items(run_dir)
    dest.mkdir(parents=True, exist_ok=False)
    for name in names:
        (run_dir / name).rename(dest / name)
    return names
