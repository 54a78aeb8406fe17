"""``shards.stream``: random 3D crops from shard sets, for every rank and worker of a multi-node job.

webdataset reads the tars; this module owns which rank and which DataLoader worker reads what,
because webdataset's defaults do not fit DDP training (its default node splitter raises on several
GPUs, uneven shards give ranks uneven sample counts — the classic end-of-epoch hang — and fewer shards
than ranks × workers raises).

Assignment
    *Training* (``mode="train"``) is infinite. Epoch ``e`` draws a permutation of all shards from
    ``(seed, e)`` — the same on every rank — and slices it by rank, then by worker. When there are
    fewer shards than ranks × workers the permutation is repeated (with fresh draws) until every slot
    has shards; slots sharing a shard split its samples, and a slot whose split would be empty (fewer
    samples in the shard than slots on it) reuses one, ``offset % samples``. Every rank takes exactly
    ``max(samples_per_epoch // world_size, num_workers)`` volumes per epoch (split evenly across its
    workers, so every worker has at least one: with fewer volumes than ranks × workers, volumes repeat
    within an epoch, and the stream says so once on stderr), reading further shards of its slice when
    its first ones run out, so ranks never run dry at different times. Any number of volumes ≥ 1 works
    for any number of ranks and workers. *Evaluation* (``mode="eval"``) passes over every sample
    exactly once across all ranks and workers, in index order: contiguous ranges of the global sample
    list, by rank then by worker (rank counts differ by at most one).

Per worker
    raw samples → shuffle buffer (training) → decode + checksum → pool of ``pool_size`` decoded
    volumes → ``crops_per_volume`` crops each (decode once, crop many), biased toward the body →
    padding of small volumes → intensity window → flips/rot90 → batches ``[B, C, X, Y, Z]``.
    Every random draw comes from generators seeded by ``(seed, rank, worker, epoch, volume)``, so a
    run is reproducible and a volume's crops do not depend on what else was in the pool.

Damaged data
    A tar member that does not decode or fails its checksum is skipped and counted; the stream goes on
    and the count reaches the caller (``loader.errors``, ``loader.error_messages``). A training worker
    that meets only damaged or unreadable data raises with the last error instead of searching forever.

Waiting
    Nothing waits without a bound: the loader raises when a DataLoader worker delivers no batch within
    ``StreamConfig.timeout`` seconds (default 600; raise it for huge volumes on slow storage).

Resumption
    ``loader.state_dict()`` is a small JSON-able cursor (per worker: epoch and next volume);
    ``load_state_dict`` before iterating continues after the last volume that reached the caller.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .crops import Window, flip_rot90, foreground_points, pad_to, sample_origins
from .format import CorruptSample, decode_sample
from .verify import iter_tar, load_index


@dataclass
class StreamConfig:
    """What a recipe asks of the stream. Defaults follow the official Hi-End-MAE/MambaMIM data recipe."""

    crop_size: tuple[int, int, int] | None = (96, 96, 96)  # None: whole volumes (eval, batch_size 1)
    crops_per_volume: int = 4
    batch_size: int = 4  # crops per batch (per rank)
    num_workers: int = 2
    mode: str = "train"  # "train" (infinite, resampled, balanced) or "eval" (each sample once)
    seed: int = 0
    shuffle_buffer: int = 4  # raw (undecoded) samples per worker
    pool_size: int = 4  # decoded volumes per worker that crops are drawn from
    pos_fraction: float = 0.75  # share of crops centred on voxels above the window's lower bound
    window: Window = field(default_factory=Window)
    flip_prob: float = 0.0  # per spatial axis
    rot90_prob: float = 0.0  # quarter turns in the X–Y plane
    labels: bool = True  # return label crops when the shards carry them
    check: bool = True  # verify each voxel member's CRC-32 when reading
    samples_per_epoch: int | None = None  # volumes per epoch over all ranks; default: all of them
    prefetch_factor: int = 2
    timeout: float = 600.0  # seconds to wait for one batch from a DataLoader worker before raising

    def __post_init__(self):
        if isinstance(self.window, dict):
            self.window = Window(**self.window)
        if self.crop_size is not None:
            cs = self.crop_size
            self.crop_size = tuple(int(c) for c in ((cs,) * 3 if isinstance(cs, int) else cs))
            if len(self.crop_size) != 3 or min(self.crop_size) < 1:
                raise ValueError(f"crop_size {cs!r} must be three positive integers, e.g. (96, 96, 96)")
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode {self.mode!r} must be 'train' or 'eval'")
        if self.crop_size is None and self.batch_size != 1:
            raise ValueError("whole-volume streaming (crop_size=None) needs batch_size=1: volumes differ in shape")
        for name in ("crops_per_volume", "batch_size", "pool_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout} must be a positive number of seconds")


def _rank_world(rank, world_size) -> tuple[int, int]:
    """Explicit values win; otherwise the launcher's RANK/WORLD_SIZE (torchrun, deepspeed, SLURM wrappers)."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world_size={w})")
    return r, w


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline described in the module docstring. Use :func:`stream` to get a loader."""

    def __init__(self, dirs: Sequence[str | Path], cfg: StreamConfig, rank: int, world_size: int):
        super().__init__()
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.shards: list[tuple[str, int]] = []
        for d in dirs:
            index = load_index(d)
            self.shards += [(str(Path(d) / s["name"]), int(s["samples"])) for s in index["shards"]]
        self.total = sum(n for _, n in self.shards)
        if self.total == 0:
            raise ValueError(f"no samples in {', '.join(map(str, dirs))}")
        per_epoch = cfg.samples_per_epoch or self.total
        if per_epoch < 1:
            raise ValueError(f"samples_per_epoch={per_epoch} must be at least 1")
        workers = max(1, cfg.num_workers)
        # every worker of every rank reads at least one volume per epoch: a worker with nothing to read
        # would never deliver a batch, and the DataLoader waits for each worker in turn
        self.rank_budget = max(per_epoch // world_size, workers)
        if cfg.mode == "train" and per_epoch // world_size < workers and rank == 0:
            print(f"shards.stream: {per_epoch} volume(s) per epoch for {world_size} rank(s) × {workers} "
                  f"worker(s): volumes repeat so that every worker has one ({self.rank_budget} per rank per "
                  f"epoch); fewer workers (num_workers) repeat less", file=sys.stderr, flush=True)
        self.cursors: dict[int, dict] = {}  # worker -> {"epoch", "next"} set by ShardLoader.load_state_dict

    # ------------------------------------------------------------------ assignment
    def worker_budget(self, worker: int, workers: int) -> int:
        """Volumes per epoch of one worker of this rank: an even split of the rank's budget, at least one."""
        budget = max(self.rank_budget, workers)
        return budget // workers + (worker < budget % workers)

    @staticmethod
    def reads(ordinal: int, count: int, stride: int, offset: int) -> bool:
        """Whether a ``(shard, stride, offset)`` part reads sample ``ordinal`` of a shard that ``index.json``
        says holds ``count`` samples: every ``stride``-th from ``offset``; when that would be none (more
        slots on the shard than samples in it), sample ``offset % count``, so that every part gives its
        slot something to read."""
        if offset < count or count == 0:
            return ordinal % stride == offset
        return ordinal == offset % count

    def train_shards(self, epoch: int, worker: int, workers: int) -> Iterator[tuple[int, int, int]]:
        """Infinite ``(shard, stride, offset)`` of one (rank, worker) slot in ``epoch``: rank slice, then
        worker slice of an epoch-seeded permutation, the same on every rank.

        With fewer shards than slots, a round concatenates ``stride`` permutations so that every slot gets
        a shard; the copies of one shard then split its samples (ordinal % stride == offset), so slots
        sharing a shard still read disjoint samples within the round."""
        n, slots = len(self.shards), self.world * workers
        stride = math.ceil(slots / n)
        rnd = 0
        while True:
            rng = np.random.default_rng([self.cfg.seed, epoch, rnd, 7])
            shift = int(rng.integers(stride))  # which copy reads which samples changes every round
            seq = [(int(sid), stride, (c + shift) % stride) for c in range(stride) for sid in rng.permutation(n)]
            yield from seq[self.rank::self.world][worker::workers]
            rnd += 1

    def eval_range(self, worker: int, workers: int) -> tuple[int, int]:
        """Global sample range ``[lo, hi)`` of this (rank, worker): split by rank, then by worker."""
        r_lo = self.rank * self.total // self.world
        r_hi = (self.rank + 1) * self.total // self.world
        n = r_hi - r_lo
        return r_lo + worker * n // workers, r_lo + (worker + 1) * n // workers

    # ------------------------------------------------------------------ reading
    def _raw(self, parts, errors) -> Iterator[dict]:
        """Raw samples of ``(shard, stride, offset)`` parts: the shard's samples with ordinal % stride == offset."""
        empty_streak = 0  # shards in a row that gave nothing: stop instead of spinning forever
        for sid, stride, offset in parts:
            path, count = self.shards[sid]
            n = 0
            for n, raw in enumerate(iter_tar(path, errors.add), start=1):
                if not self.reads(n - 1, count, stride, offset):
                    continue
                raw["__ordinal__"] = n - 1
                raw["__shard__"] = sid
                yield raw
            empty_streak = 0 if n else empty_streak + 1
            if empty_streak > len(self.shards):
                raise RuntimeError(f"no readable sample in any of the {len(self.shards)} shards; "
                                   f"last error: {errors.messages[-1] if errors.messages else '?'}")

    def _decode(self, raw: dict, errors) -> tuple | None:
        try:
            image, label, meta = decode_sample(raw, check=self.cfg.check)
        except CorruptSample as exc:
            errors.add(str(exc))
            return None
        return image, (label if self.cfg.labels else None), meta

    def _train_volumes(self, worker: int, workers: int, errors) -> Iterator[tuple]:
        cur = self.cursors.get(worker, {"epoch": 0, "next": 0})
        epoch, skip = int(cur["epoch"]), int(cur["next"])
        budget = self.worker_budget(worker, workers)
        if budget < 1:  # cannot happen with worker_budget's floor; never loop without yielding
            raise RuntimeError(f"shards.stream: rank {self.rank} worker {worker} has no volume to read")
        # a worker that meets nothing but damaged samples raises instead of searching forever
        damaged, limit = 0, max(2 * self.total, 16)
        while True:
            rng = np.random.default_rng([self.cfg.seed, self.rank, worker, epoch, 1])
            buf: list[dict] = []
            ordinal = 0
            raws = self._raw(self.train_shards(epoch, worker, workers), errors)
            while ordinal < budget:
                # shuffle buffer of undecoded samples
                while len(buf) < self.cfg.shuffle_buffer:
                    buf.append(next(raws))
                raw = buf.pop(int(rng.integers(len(buf))))
                if ordinal < skip:  # resuming: these volumes reached the caller before
                    ordinal += 1
                    continue
                dec = self._decode(raw, errors)
                if dec is None:
                    damaged += 1
                    if damaged >= limit:
                        raise RuntimeError(
                            f"shards.stream: rank {self.rank} worker {worker}: the last {damaged} samples were "
                            f"all damaged (last: {errors.messages[-1] if errors.messages else '?'}); check "
                            f"the shard set with `python -m medssl.shards verify DIR`")
                    continue  # damaged: the budget is filled from the next sample
                damaged = 0
                yield (epoch, ordinal, *dec)
                ordinal += 1
            epoch, skip = epoch + 1, 0

    def _eval_volumes(self, worker: int, workers: int, errors) -> Iterator[tuple]:
        lo, hi = self.eval_range(worker, workers)
        start = 0
        for sid, (_, count) in enumerate(self.shards):
            if start + count > lo and start < hi:
                for raw in self._raw([(sid, 1, 0)], errors):
                    g = start + raw["__ordinal__"]
                    if lo <= g < hi:
                        dec = self._decode(raw, errors)
                        if dec is not None:
                            yield (0, g - lo, *dec)
            start += count

    # ------------------------------------------------------------------ crops
    def _admit(self, vol: tuple, worker: int) -> dict:
        """Prepare a decoded volume for cropping: pad, find the body, draw its crops' origins and flips."""
        cfg = self.cfg
        epoch, ordinal, image, label, meta = vol
        rng = np.random.default_rng([cfg.seed, self.rank, worker, epoch, ordinal + 1_000_003])
        entry = {"epoch": epoch, "ordinal": ordinal, "meta": meta, "rng": rng}
        if cfg.crop_size is None:
            entry.update(image=image, label=label, pad=np.zeros(3, np.int64), origins=np.zeros((1, 3), np.int64))
            return entry
        bg = meta.get("background", 0)
        image, pad = pad_to(image, cfg.crop_size, bg)
        if label is not None:
            label, _ = pad_to(label, cfg.crop_size, 0)
        lo, _ = cfg.window.channel_bounds(meta, image.shape[0])
        fg = foreground_points(image, lo) if cfg.pos_fraction > 0 else np.zeros((0, 3), np.int64)
        origins = sample_origins(image.shape[1:], cfg.crop_size, fg, cfg.pos_fraction, cfg.crops_per_volume, rng)
        entry.update(image=image, label=label, pad=pad, origins=origins)
        return entry

    def _crop(self, entry: dict, j: int) -> dict:
        cfg = self.cfg
        o = entry["origins"][j]
        if cfg.crop_size is None:
            img, lab = entry["image"], entry["label"]
        else:
            sl = (slice(None), *(slice(int(a), int(a) + c) for a, c in zip(o, cfg.crop_size)))
            img = entry["image"][sl]
            lab = entry["label"][sl] if entry["label"] is not None else None
        flips, k = np.zeros(3, bool), 0
        if cfg.mode == "train" and (cfg.flip_prob > 0 or cfg.rot90_prob > 0):
            img, lab, flips, k = flip_rot90(img, lab, entry["rng"], cfg.flip_prob, cfg.rot90_prob)
        out = {
            "image": torch.from_numpy(cfg.window.apply(img, entry["meta"])),
            "key": entry["meta"].get("key", ""),
            "origin": torch.from_numpy(o - entry["pad"]),  # in stored-volume voxels (negative: padding)
            "flip": torch.from_numpy(flips.copy()),
            "rot90": k,
            "_epoch": entry["epoch"],
            "_ordinal": entry["ordinal"],
        }
        if lab is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab))
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        errors = _ErrorLog()
        cfg = self.cfg
        if cfg.mode == "train":
            volumes = self._train_volumes(worker, workers, errors)
        else:
            volumes = self._eval_volumes(worker, workers, errors)
        k = 1 if cfg.crop_size is None else cfg.crops_per_volume
        pool_size = cfg.pool_size if cfg.mode == "train" else 1
        rng = np.random.default_rng([cfg.seed, self.rank, worker, 2])
        pool: list[dict] = []
        for vol in volumes:
            pool.append(self._admit(vol, worker) | {"left": k})
            while len(pool) >= pool_size:
                yield from self._draw(pool, rng, k, worker, errors)
        while pool:
            yield from self._draw(pool, rng, k, worker, errors)
        yield {"_sentinel": True, "_worker": worker, "_errors": errors.count, "_messages": list(errors.messages)}

    def _draw(self, pool, rng, k, worker, errors):
        i = int(rng.integers(len(pool))) if self.cfg.mode == "train" else 0
        entry = pool[i]
        sample = self._crop(entry, k - entry["left"])
        entry["left"] -= 1
        if entry["left"] == 0:
            pool.pop(i)
        sample.update(_worker=worker, _errors=errors.count, _messages=list(errors.messages))
        yield sample


class _ErrorLog:
    """Per-worker count of skipped (damaged) samples and the latest messages, also printed to stderr."""

    def __init__(self, keep: int = 5):
        self.count = 0
        self.messages: deque = deque(maxlen=keep)

    def add(self, message: str) -> None:
        self.count += 1
        self.messages.append(message)
        print(f"shards.stream: skipped damaged data: {message}", file=sys.stderr, flush=True)


def _collate(samples: list[dict]) -> dict:
    """Stack crops into ``[B, C, X, Y, Z]``; carry the worker's error count and cursor alongside."""
    real = [s for s in samples if not s.get("_sentinel")]
    last = samples[-1]
    batch: dict = {"_worker": last["_worker"], "_errors": max(s["_errors"] for s in samples),
                   "_messages": last["_messages"]}
    if not real:
        return batch
    # default_collate stacks straight into shared memory inside a worker: no extra copy on the way out
    stack = torch.utils.data.default_collate
    batch["image"] = stack([s["image"] for s in real])
    if all("label" in s for s in real):
        batch["label"] = stack([s["label"] for s in real])
    batch["key"] = [s["key"] for s in real]
    batch["origin"] = stack([s["origin"] for s in real])
    batch["flip"] = stack([s["flip"] for s in real])
    batch["rot90"] = torch.tensor([s["rot90"] for s in real])
    batch["_cursor"] = max((s["_epoch"], s["_ordinal"]) for s in real)
    return batch


class ShardLoader:
    """Iterable over batches (dicts with ``image`` ``[B, C, X, Y, Z]`` float32, ``label`` ``[B, 1, X, Y, Z]``
    uint8 when present, ``key``, ``origin``, ``flip``, ``rot90``), with a resumable cursor and error counts."""

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset
        self.cfg = dataset.cfg
        self._errors: dict[int, int] = {}
        self._messages: deque = deque(maxlen=10)
        self._cursors: dict[int, tuple[int, int]] = {}

    @property
    def errors(self) -> int:
        """Damaged samples skipped so far (all workers of this rank)."""
        return sum(self._errors.values())

    @property
    def error_messages(self) -> list[str]:
        return list(self._messages)

    @property
    def num_samples(self) -> int:
        """Volumes this rank reads per pass (eval) or per epoch (train)."""
        if self.cfg.mode == "train":
            return self.dataset.rank_budget
        workers = max(1, self.cfg.num_workers)
        return sum(hi - lo for lo, hi in (self.dataset.eval_range(w, workers) for w in range(workers)))

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world,
            "num_workers": self.cfg.num_workers,
            "cursors": {str(w): {"epoch": e, "next": o + 1} for w, (e, o) in sorted(self._cursors.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        same = (state.get("world_size"), state.get("num_workers"), state.get("seed")) == (
            self.dataset.world, self.cfg.num_workers, self.cfg.seed)
        cursors = {int(w): c for w, c in state.get("cursors", {}).items()}
        if not same and cursors:
            # another topology: volumes cannot be matched slot for slot; restart at the next epoch
            epoch = max(c["epoch"] for c in cursors.values()) + 1
            print(f"shards.stream: resuming with another world size/workers/seed; starting at epoch {epoch}",
                  file=sys.stderr)
            cursors = {w: {"epoch": epoch, "next": 0} for w in range(max(1, self.cfg.num_workers))}
        self.dataset.cursors = cursors
        self._cursors = {w: (c["epoch"], c["next"] - 1) for w, c in cursors.items()}

    def __iter__(self):
        cfg = self.cfg
        if cfg.mode == "train":  # a new iteration continues where the last one stopped
            self.dataset.cursors = {w: {"epoch": e, "next": o + 1} for w, (e, o) in self._cursors.items()}
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            collate_fn=_collate,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=False,
            timeout=cfg.timeout if cfg.num_workers else 0,
        )
        for batch in _bounded(dl, cfg.timeout, self.dataset.rank):
            w = batch.pop("_worker")
            self._errors[w] = batch.pop("_errors")
            for m in batch.pop("_messages"):
                if m not in self._messages:
                    self._messages.append(m)
            if "_cursor" in batch:
                self._cursors[w] = batch.pop("_cursor")
            if "image" in batch:
                yield batch


def _bounded(dl, timeout: float, rank: int):
    """The DataLoader's batches; its timeout error, reworded to say what was waited for and what to change."""
    it = iter(dl)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            raise RuntimeError(
                f"shards.stream: rank {rank}: no batch from a DataLoader worker within {timeout:g} s; the "
                f"worker is stuck reading or decoding (slow storage? a huge volume?). Raise "
                f"StreamConfig.timeout or use fewer, faster-to-read shards") from None
        yield batch


def stream(shards: str | Path | Sequence[str | Path], config: StreamConfig | None = None, *,
           rank: int | None = None, world_size: int | None = None, **overrides) -> ShardLoader:
    """A loader of crops from one or several shard sets (see the module docstring).

    ``config`` holds the recipe's view of the data; keyword ``overrides`` change single fields
    (``stream(dirs, crop_size=(64, 64, 64), mode="eval")``). ``rank``/``world_size`` default to the
    launcher's ``RANK``/``WORLD_SIZE`` environment variables.
    """
    dirs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    if not dirs:
        raise ValueError("no shard directories given")
    # StreamConfig.__post_init__ turns the dict that asdict() makes of the window back into a Window
    cfg = StreamConfig(**{**asdict(config or StreamConfig()), **overrides}) if overrides or config is None else config
    r, w = _rank_world(rank, world_size)
    return ShardLoader(ShardStream(dirs, cfg, r, w))
