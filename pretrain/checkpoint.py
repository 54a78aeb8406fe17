"""Resume checkpoints (kept apart from exports): DeepSpeed's own format plus our small JSON sidecars.

Layout of a run dir::

    checkpoints/step00001000/            DeepSpeed files (model states, ZeRO optimizer partitions)
    checkpoints/step00001000/loader_rank{r}.json   each rank's stream state (every worker, at crop granularity)
    checkpoints/step00001000/rng_rank{r}.json      each rank's random generators (torch CPU/CUDA, numpy, python)
    checkpoints/step00001000/complete.json         written last, by rank 0, after every rank saved: step,
                                                   world size, weights digest, size (and sha256 of the
                                                   sidecars) of every file
    checkpoints/latest                   the newest published tag (text)

A save is written under ``checkpoints/.tmp-stepNNNNNNNN``; only when every rank has written its part
does rank 0 write ``complete.json``, publish the folder by renaming it to ``stepNNNNNNNN``, point
``latest`` at it and drop old tags beyond ``keep_last``. A kill or a full disk during a save leaves at most
a ``.tmp-*`` folder, which no resume reads and the next save removes; the previous checkpoint stays usable.

``--resume auto`` tries complete tags newest first and falls back to an older one, saying why, when a newer
one is missing files, has a damaged sidecar, does not load on some rank, or loads weights whose digest
differs from the one saved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
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


# ------------------------------------------------------------------------------------- random state
def rng_state() -> dict:
    """Every global generator a training step may draw from (MAE masks, dropout, fusion boxes): JSON-able."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": b64(torch.get_rng_state()),
        "cuda": b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def check_rng_state(state) -> None:
    """Raise ``ValueError`` naming what is wrong with a saved generator state."""
    if not isinstance(state, dict):
        raise ValueError("generator state is not an object")
    try:
        torch_bytes = base64.b64decode(state["torch"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise ValueError("generator state: 'torch' is missing or not base64") from None
    if len(torch_bytes) != torch.get_rng_state().numel():
        raise ValueError(f"generator state: torch state has {len(torch_bytes)} bytes, not {torch.get_rng_state().numel()}")
    np_state, py_state = state.get("numpy"), state.get("python")
    if not (isinstance(np_state, list) and len(np_state) == 5 and isinstance(np_state[1], list) and len(np_state[1]) == 624):
        raise ValueError("generator state: 'numpy' is not a Mersenne-Twister state")
    if not (isinstance(py_state, list) and len(py_state) == 3 and isinstance(py_state[1], list) and len(py_state[1]) == 625):
        raise ValueError("generator state: 'python' is not a Mersenne-Twister state")


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------------------- saving
def _write_json(path: Path, obj) -> None:
    """Write beside, flush to disk, rename into place: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    from medssl.shards.verify import sha256_file

    return sha256_file(path)


SIDECARS = ("loader_rank", "rng_rank", "best.")  # small files whose sha256 complete.json records


def _inventory(folder: Path) -> dict:
    """Size of every file of a checkpoint folder, and the sha256 of the small sidecars."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "complete.json":
            rel = str(p.relative_to(folder))
            entry = {"bytes": p.stat().st_size}
            if p.name.startswith(SIDECARS):
                entry["sha256"] = _sha256(p)
            files[rel] = entry
    return files


def _space_problem(ckpt_dir: Path) -> str | None:
    """Why the next checkpoint will not fit (free space below the size of the newest one), or None."""
    newest = complete_tags(ckpt_dir)
    try:
        need = sum(int(f["bytes"]) for f in read_complete(ckpt_dir / newest[0])["files"].values()) if newest else 0
    except (ValueError, KeyError, TypeError):
        return None
    if not need:
        return None
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        return None
    if need and free < 1.05 * need:
        return f"{free / 1e9:.2f} GB free, the last checkpoint took {need / 1e9:.2f} GB"
    return None


def save(eng, ckpt_dir: Path, step: int, samples: int, loader_state: dict, rank: int, keep_last: int,
         config: dict | None = None, world: int | None = None, extra=None, log=None) -> bool:
    """Save and publish the checkpoint of ``step`` (call on every rank); True when it was published.

    ``extra(folder)`` (rank 0) writes more files into the checkpoint before it is published. A save that
    fails on any rank (a full disk, a vanished mount) is reported by rank 0 and removed; the previous
    checkpoints stay as they were and training goes on."""
    ckpt_dir = Path(ckpt_dir)
    tag, world = tag_for(step), world or engine.world_size()
    tmp_tag = f".tmp-{tag}"
    tmp = ckpt_dir / tmp_tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-step*"):  # a save killed before it was published
            shutil.rmtree(stale, ignore_errors=True)
    problem = _space_problem(ckpt_dir)
    if any(engine.all_gather_object(problem)):  # not even started: DeepSpeed's collectives stay in step
        problem = problem or "another rank's disk is full"
    else:
        problem = None
    try:
        if problem:
            raise OSError(28, problem)
        with engine.quiet():
            eng.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False,
                                client_state={"step": step, "samples": samples, "config": config})
    except OSError as exc:
        if not problem:
            engine.barrier()  # DeepSpeed's own closing barrier, which the other ranks are waiting in
        problem = problem or f"{type(exc).__name__}: {exc}"
    if problem is None:
        try:
            _write_json(tmp / f"loader_rank{rank}.json", loader_state)
            _write_json(tmp / f"rng_rank{rank}.json", rng_state())
            if rank == 0 and extra is not None:
                extra(tmp)
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc}"
    problems = engine.all_gather_object(problem)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if not failed and rank == 0:
        try:
            record = {"step": step, "samples": samples, "world_size": world, "param_digest": param_digest(eng.module),
                      "files": _inventory(tmp)}
            _write_json(tmp / "complete.json", record)
            final = ckpt_dir / tag
            if final.exists():  # the same step saved again (a resumed run stopped at once): the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            (ckpt_dir / ".latest.part").write_text(tag)
            os.replace(ckpt_dir / ".latest.part", ckpt_dir / "latest")
            for old in complete_tags(ckpt_dir)[keep_last:]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        except OSError as exc:
            failed = [(0, f"{type(exc).__name__}: {exc}")]
    failed = engine.all_gather_object(failed)[0]
    if failed and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        newest = complete_tags(ckpt_dir)
        why = "; ".join(f"rank {r}: {p}" for r, p in failed)
        print(f"warning: checkpoint of step {step} NOT saved ({why}). "
              f"{'The previous checkpoint ' + str(ckpt_dir / newest[0]) + ' is still usable' if newest else 'No earlier checkpoint exists'}; "
              f"free space in {ckpt_dir} (or lower train.keep_last): training goes on and the next save tries again",
              file=sys.stderr, flush=True)
    engine.barrier()
    return not failed


# ------------------------------------------------------------------------------------------ resuming
class CheckpointMismatch(ValueError):
    """A whole checkpoint that does not fit the configured model (another backbone, width, recipe)."""


class CheckpointUnusable(ValueError):
    """The checkpoint named with ``--resume PATH`` cannot be loaded."""


_MISMATCH = ("size mismatch", "Missing key(s)", "Unexpected key(s)", "Error(s) in loading state_dict")


def _is_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, KeyError, ValueError)) and any(m in str(exc) for m in _MISMATCH)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name} is not readable JSON ({type(exc).__name__}: {exc})") from None


def read_complete(path: Path) -> dict:
    """``complete.json`` of a checkpoint folder, validated; raises ``ValueError`` with the reason."""
    rec = _read_json(path / "complete.json")
    if not isinstance(rec, dict):
        raise ValueError("complete.json is not an object")
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"complete.json: step {step!r} is not a step number")
    if path.name.startswith("step") and path.name != tag_for(step):
        raise ValueError(f"complete.json says step {step}, the folder is {path.name}")
    if not isinstance(rec.get("samples", 0), int):
        raise ValueError("complete.json: samples is not a number")
    files = rec.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())):
        raise ValueError("complete.json: files is not a table of file records")
    return rec


def _check_folder(path: Path, rank: int, world: int, check_loader) -> tuple[str | None, int | None]:
    """Why this rank cannot use the checkpoint folder (or None), and the world size it was saved with."""
    try:
        rec = read_complete(path)
    except ValueError as exc:
        return str(exc), None
    saved_world = rec.get("world_size")
    if not isinstance(saved_world, int):  # saved before complete.json named it: count the cursors
        saved_world = len(list(path.glob("loader_rank*.json"))) or None
    if not any(path.glob("*model_states.pt")):
        return "no model states file", saved_world
    for rel, want in (rec.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing", saved_world
        if f.stat().st_size != want.get("bytes"):
            return f"{rel} has {f.stat().st_size} bytes, {want.get('bytes')} were saved (truncated or replaced)", saved_world
        if "sha256" in want and _sha256(f) != want["sha256"]:
            return f"{rel} differs from the one saved (sha256)", saved_world
    same_world = saved_world == world
    if same_world or (path / f"loader_rank{rank}.json").exists():
        try:
            state = _read_json(path / f"loader_rank{rank}.json")
            if check_loader is not None:
                check_loader(state)
            elif not isinstance(state, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return f"loader_rank{rank}.json: {exc}", saved_world
    if same_world or (path / f"rng_rank{rank}.json").exists():
        rng = path / f"rng_rank{rank}.json"
        if rng.exists() or rec.get("files") is not None:  # checkpoints older than the generator files have none
            try:
                check_rng_state(_read_json(rng))
            except ValueError as exc:
                return f"rng_rank{rank}.json: {exc}", saved_world
    return None, saved_world


def resume(eng, ckpt_dir: Path, rank: int, world: int, log=print, tag: str | None = None,
           check_loader=None, info: dict | None = None, zero_stage: int = 0) -> tuple[int, int, dict | None]:
    """Load the newest complete checkpoint that loads on every rank: returns (step, samples, loader state).

    With ``tag`` only that checkpoint is tried, and one that does not load ends the run. A checkpoint
    that is whole but does not fit the model raises :class:`CheckpointMismatch` and is left as it is;
    unreadable, incomplete or damaged ones are moved aside as ``damaged-<tag>`` with the reason.
    ``info`` (a dict) receives the tag, this rank's generator state (``rng``), the saved world size and
    what changed when the world size differs."""
    explicit = tag is not None
    info = {} if info is None else info
    for tag in ([tag] if explicit else complete_tags(ckpt_dir)):
        path = ckpt_dir / tag
        problem, saved_world = _check_folder(path, rank, world, check_loader)
        # every rank must agree on the world the checkpoint came from before DeepSpeed reads it
        saved_world = int(engine.all_reduce_max(float(saved_world or world)))
        other_world = saved_world != world
        ok, mismatch = 0.0, 0.0
        if engine.all_reduce_max(1.0 if problem else 0.0):  # all ranks load, or none does
            problem = problem or "a file of another rank is damaged"
        else:
            try:
                # ZeRO-1/2 optimizer partitions cannot be re-cut for another world size by DeepSpeed: the
                # weights, step and schedule are restored and the Adam moments start again
                moments = not other_world or zero_stage == 0
                with engine.quiet():
                    _, client = eng.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=moments,
                                                    load_lr_scheduler_states=moments)
                if client is None:
                    problem = "DeepSpeed could not load it"
                else:
                    ok = 1.0
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not end the run
                problem = f"{type(exc).__name__}: {exc}"
                mismatch = 1.0 if _is_mismatch(exc) else 0.0
        if engine.all_reduce_max(mismatch):
            first = (problem or "").splitlines()
            raise CheckpointMismatch(
                f"checkpoint {path} does not fit the configured model ({' '.join(first[:3])[:400]}); it was "
                f"saved by another config. Resume with that run's config ({ckpt_dir.parent / 'config.yaml'}), "
                f"or start a new run with another --out")
        if engine.all_reduce_max(0.0 if ok else 1.0) == 0.0:
            record = read_complete(path)
            saved = record.get("param_digest")
            now = param_digest(eng.module) if rank == 0 else None
            if engine.all_reduce_max(1.0 if rank == 0 and saved and now != saved else 0.0):
                problem = "the weights loaded differ from the ones saved (parameter digest)"
            else:
                loader_file = path / f"loader_rank{rank}.json"
                state = json.loads((loader_file if loader_file.exists() else path / "loader_rank0.json").read_text())
                rng_file = path / f"rng_rank{rank}.json"
                info.update(tag=tag, saved_world=saved_world,
                            rng=json.loads(rng_file.read_text()) if rng_file.exists() and not other_world else None)
                if other_world:
                    info["changed"] = (f"world size {saved_world} -> {world}: weights, step, samples and the learning-"
                                       f"rate schedule are restored; "
                                       + ("the optimizer state too (ZeRO stage 0)" if zero_stage == 0 else
                                          "the Adam moments restart (DeepSpeed cannot re-partition ZeRO-"
                                          f"{zero_stage} optimizer states)")
                                       + "; the random generators are re-seeded and the stream starts the next epoch")
                client_step = record["step"]
                log(f"resumed from {path} (step {client_step}, weights digest {'matches' if now == saved else 'n/a'})")
                if rank == 0:
                    _write_json(ckpt_dir.parent / "resume.json",
                                {"tag": tag, "step": client_step, "saved_digest": saved, "loaded_digest": now,
                                 "saved_world": saved_world, "world": world})
                return client_step, int(record.get("samples", 0)), state
        why = problem or "failed on another rank"
        if explicit:
            raise CheckpointUnusable(f"--resume {path}: this checkpoint cannot be used ({why}); pick another tag "
                                     f"in {ckpt_dir} or --resume auto")
        if rank == 0:
            print(f"warning: checkpoint {path} cannot be used ({why}); falling back to an older one (moved aside as "
                  f"damaged-{tag})", file=sys.stderr, flush=True)
            target = ckpt_dir / f"damaged-{tag}"
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)  # or it would shadow the new ones of this run
        engine.barrier()
    return 0, 0, None


# ------------------------------------------------------------------------------------- run dirs
RUN_ITEMS = ("config.yaml", "checkpoints", "export", "metrics.jsonl", "pictures", "resume.json", "wandb")


def run_items(run_dir: Path, items: tuple[str, ...] = RUN_ITEMS) -> list[str]:
    """What in ``run_dir`` belongs to a run (``items``: a pretraining run's by default; empty: a new or
    foreign folder)."""
    run_dir = Path(run_dir)
    found = []
    for name in items:
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
