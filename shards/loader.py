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
    volumes → ``crops_per_volume`` crops each (decode once, crop many), centred on the body or on the
    background → padding of small volumes → intensity window → flips/rot90 → intensity scale and shift
    (training) → batches ``[B, C, X, Y, Z]``, stacked into one of the worker's reusable shared-memory
    buffers (``reuse_buffers``; the training process gives a buffer back when it holds no tensor on it).
    Every random draw comes from generators seeded by ``(seed, rank, worker, epoch, volume)``, so a
    run is reproducible and a volume's crops do not depend on what else was in the pool.

Damaged data
    A tar member that does not decode or fails its checksum is skipped and counted; the stream goes on.
    A shard file that is missing, empty or unreadable is counted and a training slot reads the next
    readable shard in its place; a tar that ends before the sample count of ``index.json`` (a truncated
    file, or a damaged header, which Python's tarfile takes for the end of the archive) is counted with
    the number of samples lost. Counts are kept per shard and kind (``loader.errors_by_shard``), with a
    total (``loader.errors``) and the latest messages (``loader.error_messages``). A training worker that
    meets only damaged or unreadable data raises with the reasons instead of searching forever.

Waiting
    Nothing waits without a bound: the loader raises when a DataLoader worker delivers no batch within
    ``StreamConfig.timeout`` seconds (default 600; raise it for huge volumes on slow storage).

Resumption
    Every training crop carries its worker's whole state to the main process (position in the shard
    sequence, the shuffle buffer's samples and generator, the pool's volumes with their crop origins and
    generators, the error record); ``loader.state_dict()`` holds the state after the last batch delivered,
    and ``load_state_dict`` before iterating continues with exactly the next crop: the pooled volumes
    are re-read from their shards, nothing is replayed. A state from another world size, worker count
    or shard set starts the next epoch instead, and says so.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import buffers
from .crops import Window, body_centre_origins, body_points, flip_rot90, intensity_jitter, pad_to, partition_origins, sample_origins
from .format import CorruptSample, decode_sample
from .slots import STATE_VERSION, _ErrorLog, _TrainVolumes, check_state, merge_error_counts  # noqa: F401 (re-exported)
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
    pos_fraction: float = 0.75  # share of crops centred on voxels above the window's lower bound, the rest below it
    negatives: str = "background"  # the other crops: centred on background (MONAI RandCropByPosNegLabeld) | uniform
    window: Window = field(default_factory=Window)
    flip_prob: float = 0.0  # per spatial axis
    rot90_prob: float = 0.0  # quarter turns in the X–Y plane
    intensity_prob: float = 0.0  # training crops, after the window: x (1 + U(±scale)), then + U(±shift), each at p
    intensity_scale: float = 0.1  # RandScaleIntensityd factors
    intensity_shift: float = 0.1  # RandShiftIntensityd offsets
    labels: bool = True  # return label crops when the shards carry them
    check: bool = True  # verify each voxel member's CRC-32 when reading
    samples_per_epoch: int | None = None  # volumes per epoch over all ranks; default: all of them
    prefetch_factor: int = 2
    # Reusable shared-memory batch buffers between DataLoader workers and the training process: each worker
    # stacks its batches into prefetch_factor + 3 buffers it made once, instead of a fresh shared segment per
    # batch (13 ms per 4 × 96³ float32 batch against 0.65 ms, BENCHMARKS.md). A buffer is written again only
    # after the training process holds no tensor on it any more; a consumer that keeps batches gets fresh ones.
    reuse_buffers: bool = True
    timeout: float = 600.0  # seconds to wait for one batch from a DataLoader worker before raising
    # S > 0: cut each volume into S equal slabs along its cranio-caudal axis (Z of the stored RAS grid, inferior
    # first) and centre crop j of the volume in slab j (crops_per_volume = S); every crop carries its
    # ``partition`` j. With pool_size 1 a volume's S crops arrive one after another, so a batch of m·S crops is
    # m whole volumes × S partitions (global + local contrastive's G^D batches).
    partitions: int = 0
    # In-plane (X, Y) centre of partitioned crops: "body" = the middle of the body's bounding box, so crops of the
    # same partition show the same anatomy in every volume (the 3D analogue of the official whole 2D slices; G^D's
    # positives rely on it); "sampled" = the pos/neg sampler's centre, as without partitions.
    partition_inplane: str = "body"

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
        if self.negatives not in ("background", "uniform"):
            raise ValueError(f"negatives={self.negatives!r} must be 'background' (centred below the window's floor, as "
                             "MONAI's RandCropByPosNegLabeld) or 'uniform' (anywhere in the volume)")
        if not 0.0 <= self.intensity_prob <= 1.0 or min(self.intensity_scale, self.intensity_shift) < 0:
            raise ValueError(f"intensity_prob={self.intensity_prob} must be in [0, 1] and intensity_scale="
                             f"{self.intensity_scale}, intensity_shift={self.intensity_shift} at least 0")
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout} must be a positive number of seconds")
        if self.partitions < 0 or (self.partitions and self.crops_per_volume != self.partitions):
            raise ValueError(f"partitions={self.partitions} must be 0 (off) or S >= 1 with crops_per_volume=S (one crop "
                             f"per partition), got crops_per_volume={self.crops_per_volume}")
        if self.partition_inplane not in ("body", "sampled"):
            raise ValueError(f"partition_inplane={self.partition_inplane!r} must be 'body' (crops centred in-plane on the "
                             "body's bounding box) or 'sampled' (the pos/neg sampler's centres)")


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
        self.resume_states: dict[int, dict] = {}  # worker -> saved state, set by ShardLoader before iterating
        self.worker_offset = 0  # which worker delivers the first batch (resuming mid-round)

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
    def shard_name(self, sid: int) -> str:
        """How errors name a shard: ``<set folder>/<file>``."""
        path = Path(self.shards[sid][0])
        return f"{path.parent.name}/{path.name}"

    def _shard_samples(self, sid: int, errors, start: int = 0) -> Iterator[tuple[int, dict]]:
        """``(ordinal, raw)`` of every tar sample of shard ``sid`` from ``start`` on. A missing file, tar data
        that cannot be read and a tar that ends before the count in ``index.json`` are counted against the
        shard (``errors``), never passed over in silence: Python's tarfile reads a damaged header as the end
        of the archive, so the count is the only witness of the samples behind it."""
        path, count = self.shards[sid]
        name = self.shard_name(sid)
        if not os.path.exists(path):
            errors.add(f"{name}: shard file missing ({count} samples listed in index.json); rebuild the set or "
                       "restore the file", shard=name, kind="missing")
            return
        unreadable = []
        seen = 0
        for n, raw in enumerate(iter_tar(path, unreadable.append)):
            seen = n + 1
            if n < start:
                continue
            raw["__ordinal__"] = n
            raw["__shard__"] = sid
            yield n, raw
        for message in unreadable:
            errors.add(message, shard=name, kind="unreadable")
        if seen == 0 and count and not unreadable:
            errors.add(f"{name}: shard holds no sample ({count} listed in index.json); rebuild the set",
                       shard=name, kind="empty")
        elif 0 < seen < count:
            errors.add(f"{name}: tar ends after {seen} of the {count} samples listed in index.json (truncated "
                       f"file or damaged tar header); {count - seen} sample(s) are not read until the shard is "
                       "rebuilt", shard=name, kind="truncated")

    def _fetch(self, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
        """Raw samples by ``(shard, ordinal)`` (resuming a worker's shuffle buffer and pool): each shard is
        read once, up to the last ordinal wanted from it."""
        by_shard: dict[int, set[int]] = {}
        for sid, ordinal in wanted:
            by_shard.setdefault(int(sid), set()).add(int(ordinal))
        found: dict[tuple[int, int], dict] = {}
        quiet = _ErrorLog(echo=False)
        for sid, ordinals in sorted(by_shard.items()):
            for n, raw in self._shard_samples(sid, quiet):
                if n in ordinals:
                    found[(sid, n)] = raw
                if n >= max(ordinals):
                    break
        return found

    def _decode(self, raw: dict, errors) -> tuple | None:
        try:
            image, label, meta = decode_sample(raw, check=self.cfg.check)
        except CorruptSample as exc:
            sid = raw.get("__shard__")
            errors.add(str(exc), shard=self.shard_name(sid) if sid is not None else None, kind="damaged")
            return None
        return image, (label if self.cfg.labels else None), meta

    def _train_volumes(self, worker: int, workers: int, errors, saved: dict | None = None) -> Iterator[tuple]:
        """The decoded volumes ``(epoch, ordinal, image, label, meta)`` of one training worker, in order."""
        volumes = _TrainVolumes(self, worker, workers, errors, saved or {})
        while True:
            yield volumes.next()[0]

    def _eval_volumes(self, worker: int, workers: int, errors) -> Iterator[tuple]:
        lo, hi = self.eval_range(worker, workers)
        start = 0
        for sid, (_, count) in enumerate(self.shards):
            if start + count > lo and start < hi:
                for n, raw in self._shard_samples(sid, errors):
                    g = start + n
                    if lo <= g < hi:
                        dec = self._decode(raw, errors)
                        if dec is not None:
                            yield (0, g - lo, *dec)
            start += count

    # ------------------------------------------------------------------ crops
    def _admit(self, vol: tuple, worker: int, saved: dict | None = None) -> dict:
        """Prepare a decoded volume for cropping: pad, find the body, draw its crops' origins and flips.
        ``saved`` (resuming) restores the origins and the generator state the entry had when saved."""
        cfg = self.cfg
        epoch, ordinal, image, label, meta = vol
        rng = np.random.default_rng([cfg.seed, self.rank, worker, epoch, ordinal + 1_000_003])
        entry = {"epoch": epoch, "ordinal": ordinal, "meta": meta, "rng": rng}
        if saved is not None:
            rng.bit_generator.state = saved["rng"]
        if cfg.crop_size is None:
            entry.update(image=image, label=label, pad=np.zeros(3, np.int64), origins=np.zeros((1, 3), np.int64),
                         shape=tuple(int(s) for s in image.shape[1:]))
            return entry
        bg = meta.get("background", 0)
        stored = tuple(int(s) for s in image.shape[1:])  # the stored volume's spatial shape, before padding
        image, pad = pad_to(image, cfg.crop_size, bg)
        if label is not None:
            label, _ = pad_to(label, cfg.crop_size, 0)
        lo, _ = cfg.window.channel_bounds(meta, image.shape[0])
        if saved is not None:
            origins = np.asarray(saved["origins"], dtype=np.int64).reshape(-1, 3)
        else:
            fg, bg = body_points(image, lo)
            origins = sample_origins(image.shape[1:], cfg.crop_size, fg, cfg.pos_fraction, cfg.crops_per_volume, rng,
                                     bg=bg if cfg.negatives == "background" else None)
            if cfg.partitions:
                if cfg.partition_inplane == "body":
                    origins[:, :2] = body_centre_origins(image.shape[1:], cfg.crop_size, fg, len(origins))[:, :2]
                origins[:, 2] = partition_origins(stored[2], cfg.crop_size[2], cfg.partitions, int(pad[2]),
                                                  image.shape[3], rng)
        entry.update(image=image, label=label, pad=pad, origins=origins, shape=stored)
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
            img, lab, flips, k = flip_rot90(img, lab, entry["rng"], cfg.flip_prob, cfg.rot90_prob, contiguous=False)
        img = cfg.window.apply(img, entry["meta"])
        jitter = (1.0, 0.0)
        if cfg.mode == "train" and cfg.intensity_prob > 0:
            img, *jitter = intensity_jitter(img, entry["rng"], cfg.intensity_prob, cfg.intensity_scale,
                                            cfg.intensity_shift)
        out = {
            "image": torch.from_numpy(img),
            "key": entry["meta"].get("key", ""),
            "origin": torch.from_numpy(o - entry["pad"]),  # in stored-volume voxels (negative: padding)
            "flip": torch.from_numpy(flips.copy()),
            "rot90": k,
            "intensity": torch.tensor(jitter, dtype=torch.float32),  # image = windowed * factor + offset
            "shape": torch.tensor(entry["shape"], dtype=torch.int64),  # the stored volume's X, Y, Z
        }
        if cfg.partitions:
            out["partition"] = j
        if lab is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab))
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        # a resumed loader's first batch comes from the worker that was next when it was saved; the
        # DataLoader always asks its worker 0 first, so ids are rotated
        worker = (wid + self.worker_offset) % workers
        if self.cfg.mode == "train":
            yield from self._train(worker, workers)
        else:
            yield from self._eval(worker, workers)

    def _eval(self, worker: int, workers: int):
        errors = _ErrorLog()
        for vol in self._eval_volumes(worker, workers, errors):
            entry = self._admit(vol, worker)
            for j in range(1 if self.cfg.crop_size is None else self.cfg.crops_per_volume):
                yield self._crop(entry, j) | errors.tags(worker)
        yield {"_sentinel": True, **errors.tags(worker)}

    def _train(self, worker: int, workers: int):
        """Crops of one training worker. After every crop the worker's whole state (volume sequence, shuffle
        buffer, pool and every generator) travels with it as ``_state``, so that a checkpoint taken after any
        batch resumes at exactly the next crop."""
        cfg = self.cfg
        saved = self.resume_states.get(worker) or {}
        errors = _ErrorLog()
        errors.restore(saved.get("errors"))
        volumes = _TrainVolumes(self, worker, workers, errors, saved)
        k = 1 if cfg.crop_size is None else cfg.crops_per_volume
        rng = np.random.default_rng([cfg.seed, self.rank, worker, 2])
        if saved.get("pool_rng"):
            rng.bit_generator.state = saved["pool_rng"]
        pool = self._restore_pool(saved.get("pool", []), worker, errors)
        while True:
            while len(pool) < cfg.pool_size:
                vol, ident = volumes.next()
                pool.append(self._admit(vol, worker) | {"left": k, "id": ident})
            i = int(rng.integers(len(pool)))
            entry = pool[i]
            sample = self._crop(entry, k - entry["left"])
            entry["left"] -= 1
            if entry["left"] == 0:
                pool.pop(i)
            state = {**volumes.state(), "pool_rng": rng.bit_generator.state, "errors": errors.state(),
                     "pool": [{"id": list(e["id"]), "epoch": e["epoch"], "ordinal": e["ordinal"], "left": e["left"],
                               "origins": e["origins"].tolist(), "rng": e["rng"].bit_generator.state} for e in pool]}
            yield sample | errors.tags(worker) | {"_state": state}

    def _restore_pool(self, saved: list[dict], worker: int, errors) -> list[dict]:
        """The decoded-volume pool of a saved worker: each volume re-read from its shard and re-admitted
        with the origins and generator state it had."""
        if not saved:
            return []
        raws = self._fetch([tuple(e["id"]) for e in saved])
        pool = []
        for e in saved:
            raw = raws.get(tuple(e["id"]))
            dec = self._decode(raw, errors) if raw is not None else None
            if dec is None:
                if raw is None:
                    errors.add(f"{self.shard_name(e['id'][0])}: sample {e['id'][1]} of the resumed pool is no longer "
                               "readable", shard=self.shard_name(e["id"][0]), kind="missing")
                continue
            entry = self._admit((e["epoch"], e["ordinal"], *dec), worker, saved=e)
            pool.append(entry | {"left": int(e["left"]), "id": tuple(e["id"])})
        return pool


def _collate(samples: list[dict], reuse: int = 0) -> dict:
    """Stack crops into ``[B, C, X, Y, Z]``; carry the worker's error record and resume state alongside. ``reuse``
    > 0 (inside a worker): stack into one of ``reuse`` shared buffers made once and send its slot number only."""
    real = [s for s in samples if not s.get("_sentinel")]
    last = samples[-1]
    batch: dict = {"_worker": last["_worker"], "_errors": max(s["_errors"] for s in samples),
                   "_messages": last["_messages"], "_by_shard": last["_by_shard"]}
    if "_state" in last:
        batch["_state"] = last["_state"]
    if not real:
        return batch
    # default_collate stacks straight into (fresh) shared memory inside a worker: no extra copy on the way out
    stack = torch.utils.data.default_collate
    big = {"image": [s["image"] for s in real]}
    if all("label" in s for s in real):
        big["label"] = [s["label"] for s in real]
    slot = None
    if reuse and torch.utils.data.get_worker_info() is not None:
        slot = buffers.stack_in_worker(big, reuse)
    if slot is None:  # no free buffer (the consumer still holds them all), or not in a worker
        batch.update({k: stack(v) for k, v in big.items()})
    else:
        batch["_slot"] = slot
    batch["key"] = [s["key"] for s in real]
    batch["origin"] = stack([s["origin"] for s in real])
    batch["flip"] = stack([s["flip"] for s in real])
    batch["rot90"] = torch.tensor([s["rot90"] for s in real])
    batch["intensity"] = stack([s["intensity"] for s in real])
    batch["shape"] = stack([s["shape"] for s in real])
    if all("partition" in s for s in real):
        batch["partition"] = torch.tensor([s["partition"] for s in real])
    return batch


class ShardLoader:
    """Iterable over batches (dicts with ``image`` ``[B, C, X, Y, Z]`` float32, ``label`` ``[B, 1, X, Y, Z]``
    uint8 when present, ``key``, ``origin``, ``flip``, ``rot90``, ``intensity`` ``[B, 2]`` = jitter factor and
    offset, ``shape`` ``[B, 3]`` the stored volume's size, ``partition`` ``[B]`` with ``partitions``), with a resume
    state and error counts."""

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset
        self.cfg = dataset.cfg
        self._errors: dict[int, int] = {}
        self._by_shard: dict[int, dict] = {}
        self._messages: deque = deque(maxlen=10)
        self._states: dict[int, dict] = {}
        self._batches = 0
        self.resumed_exact = False  # load_state_dict matched the saved state slot for slot

    @property
    def errors(self) -> int:
        """Damaged samples and unreadable shards met so far (all workers of this rank)."""
        return sum(self._errors.values())

    @property
    def errors_by_shard(self) -> dict[str, dict[str, int]]:
        """``{shard: {kind: count}}`` over this rank's workers (kinds: damaged, missing, empty, unreadable,
        truncated)."""
        return merge_error_counts(self._by_shard.values())

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

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"shards": [[Path(p).name, n] for p, n in self.dataset.shards], "crop_size": list(c.crop_size or []),
                "crops_per_volume": c.crops_per_volume, "pool_size": c.pool_size, "shuffle_buffer": c.shuffle_buffer,
                "samples_per_epoch": c.samples_per_epoch, "batch_size": c.batch_size,
                **({"partitions": c.partitions, "partition_inplane": c.partition_inplane} if c.partitions else {})}
        # absent when off: older states still fit

    def state_dict(self) -> dict:
        """A JSON-able state: every worker's full state after the last batch delivered, and how many batches
        were delivered (which worker is next)."""
        return {
            "version": STATE_VERSION,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world,
            "num_workers": self.cfg.num_workers,
            "fingerprint": self._fingerprint(),
            "batches": self._batches,
            "workers": {str(w): st for w, st in sorted(self._states.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the crop after the last one delivered before ``state_dict()``. A state from another
        world size, worker count, seed, shard set or crop settings cannot be matched slot for slot: the
        stream then starts the epoch after the saved one, and says so."""
        check_state(state)
        self.resumed_exact = False
        workers = {int(w): st for w, st in state.get("workers", state.get("cursors", {})).items()}
        same = (state.get("version") == STATE_VERSION
                and (state.get("world_size"), state.get("num_workers"), state.get("seed"), state.get("fingerprint"))
                == (self.dataset.world, self.cfg.num_workers, self.cfg.seed, self._fingerprint()))
        if not same and workers:
            epoch = max(int(st.get("epoch", 0)) for st in workers.values()) + 1
            what = [f"{k} {state.get(k)} -> {now}" for k, now in (
                ("world_size", self.dataset.world), ("num_workers", self.cfg.num_workers), ("seed", self.cfg.seed))
                if state.get(k) != now]
            if state.get("version") != STATE_VERSION:
                what.append(f"saved by an older medssl (stream state version {state.get('version')})")
            elif state.get("fingerprint") != self._fingerprint():
                what.append("shard set or crop settings changed")
            if self.dataset.rank == 0:
                print(f"shards.stream: resuming with another {', '.join(what) or 'layout'}: the saved stream position "
                      f"cannot be matched slot for slot; starting at epoch {epoch}", file=sys.stderr, flush=True)
            self._states = {w: {"epoch": epoch, "ordinal": 0} for w in range(max(1, self.cfg.num_workers))}
            self._batches = 0
        else:
            self._states = workers
            self._batches = int(state.get("batches", 0))
            self.resumed_exact = True
        for w, st in self._states.items():
            err = st.get("errors") or {}
            self._errors[w] = int(err.get("count", 0))
            self._by_shard[w] = err.get("by_shard", {})

    def _dataloader(self, **kwargs) -> torch.utils.data.DataLoader:
        """The DataLoader over the workers: batches of crops stacked by ``_collate`` (``kwargs`` replace its
        arguments, e.g. one item per decoded volume for the device pool)."""
        cfg = self.cfg
        reuse = 0
        if cfg.reuse_buffers and cfg.num_workers and cfg.crop_size is not None and buffers.available():
            reuse = (cfg.prefetch_factor or 2) + 3  # in flight per worker + the batch in use + the one before it
        args = dict(
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            collate_fn=functools.partial(_collate, reuse=reuse),
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=False,
            timeout=cfg.timeout if cfg.num_workers else 0,
            # the worker seeds come from this generator, not from torch's global one: making a loader
            # never changes the random draws of the training loop (exact resume)
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        return torch.utils.data.DataLoader(self.dataset, **{**args, **kwargs})

    def __iter__(self):
        cfg = self.cfg
        if cfg.mode == "train":  # a new iteration continues where the last one stopped
            self.dataset.resume_states = dict(self._states)
            self.dataset.worker_offset = self._batches % max(1, cfg.num_workers)
        dl = self._dataloader()
        held = buffers.MainBuffers()
        for batch in _bounded(dl, cfg.timeout, self.dataset.rank):
            held.release()  # slots of earlier batches that nothing holds any more go back to their workers
            w = batch.pop("_worker")
            if "_slot" in batch:
                held.receive(w, batch.pop("_slot"), batch)
            self._errors[w] = batch.pop("_errors")
            self._by_shard[w] = batch.pop("_by_shard")
            for m in batch.pop("_messages"):
                if m not in self._messages:
                    self._messages.append(m)
            if "_state" in batch:
                self._states[w] = batch.pop("_state")
            if "image" in batch:
                self._batches += 1
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
