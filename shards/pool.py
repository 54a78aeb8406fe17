"""The device pool: training crops drawn on the training device from volumes kept resident there.

The worker path (``shards.stream``) cuts, windows and flips every crop on the CPU; a GPU that trains a ViT-B MAE
at 96³ asks for more crops per second than CPU workers make. Here the DataLoader workers only read, check and
decode volumes (and find the body on a coarse grid); each whole stored volume (int16 CT, float16 MRI, padded up to
the crop) travels to the training process, pinned, and is copied into one flat buffer on the device (an arena of
``budget`` bytes, filled as a ring: a new volume replaces the oldest ones). Every step:

* ``batch_size / crops_per_volume`` new volumes replace old ones (on average each volume gives
  ``crops_per_volume`` crops, as on the worker path), copied on their own CUDA stream;
* ``batch_size`` crops are drawn on the host from the resident volumes — body-biased origins
  (:func:`~medssl.shards.crops.sample_origins`), flips/rot90 and the intensity jitter, with the worker path's
  functions and its per-volume generator seeds (each crop's origin is drawn when the crop is, so the sequences
  differ from the worker path's, and a volume gives ``crops_per_volume`` crops on average, not exactly) — and cut
  on the device in one gather whose indices are pure arithmetic
  (flips and quarter turns included, :func:`~medssl.shards.crops.plane_map`), then windowed and jittered there.

The batch dict is the stream's (``image`` already on the device, ``key``, ``origin`` in stored-volume voxels, ``flip``,
``rot90``, ``intensity``, ``shape``; no labels: pretraining reads none). A crop equals the worker path's crop for the
same origin, flips and jitter voxel for voxel. The same code runs on CPU tensors (tests, checks).

Resumption: the state holds the workers' stream state after the last volume delivered, the resident volumes
(shard, sample, place in the arena, generator) and the pool's generator; loading it re-reads the resident volumes
from their shards into the same places, so the next batch is the one the saved run would have drawn.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .crops import draw_flips, draw_jitter, pad_to, plane_map, sample_origins
from .loader import ShardLoader, ShardStream, StreamConfig, _rank_world
from .slots import _ErrorLog, _TrainVolumes
from .verify import load_samples

BODY_STRIDE = 4  # the coarse grid body points are found on (as the worker path's body_points)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_budget(value) -> tuple[str, int]:
    """``("volumes", N)`` for a count (``16``, ``"16"``) or ``("bytes", B)`` for a size (``"4GiB"``, ``"500 MB"``);
    raises ``ValueError`` naming the accepted forms."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"device_pool={value} must be at least 1 volume")
        return "volumes", value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if m and not m.group(2) and "." not in m.group(1):
        return parse_budget(int(m.group(1)))
    if m and m.group(2).lower() in _UNITS and m.group(2):
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n < 1:
            raise ValueError(f"device_pool={value!r} is empty")
        return "bytes", n
    raise ValueError(f"device_pool={value!r} must be a number of volumes (e.g. 32) or a size (e.g. '4GiB', '512MiB')")


def _max_volume_elements(dirs: Sequence[Path], crop) -> int:
    """The largest stored volume of the shard sets, padded up to ``crop``, in elements (from ``samples.jsonl``)."""
    best = 0
    for d in dirs:
        samples = load_samples(d)
        if not samples:
            raise ValueError(f"device_pool as a number of volumes needs {Path(d) / 'samples.jsonl'} (the volume "
                             "sizes) and it is missing or empty; give the pool a size instead, e.g. '4GiB'")
        for s in samples:
            shape = [int(v) for v in s["shape"]]
            c, sp = (shape[0], shape[1:]) if len(shape) == 4 else (1, shape)
            best = max(best, c * math.prod(max(int(k), int(v)) for k, v in zip(crop, sp)))
    return best


def prepare(stream: ShardStream, vol: tuple, ident, worker: int) -> dict:
    """One decoded training volume as the pool takes it: padded up to the crop (the background value), the body on
    the coarse grid (the worker path's :func:`body_points`, as a mask), the window's per-channel float32 scale and
    shift, and what identifies it (shard and sample, the worker, epoch and ordinal that seed its generator)."""
    cfg = stream.cfg
    epoch, ordinal, image, _label, meta = vol
    stored = [int(s) for s in image.shape[1:]]
    image, pad = pad_to(image, cfg.crop_size, meta.get("background", 0))
    lo, hi = cfg.window.channel_bounds(meta, image.shape[0])
    sub = image[:, ::BODY_STRIDE, ::BODY_STRIDE, ::BODY_STRIDE]
    body = (sub > lo.reshape(-1, 1, 1, 1)).any(axis=0)
    # the window's mapping as Window.apply computes it: float64, then float32
    scale = (cfg.window.out[1] - cfg.window.out[0]) / (hi - lo)
    shift = cfg.window.out[0] - lo * scale
    return {"image": torch.from_numpy(np.ascontiguousarray(image)), "body": torch.from_numpy(body),
            "pad": [int(p) for p in pad], "shape": stored, "scale": scale.astype(np.float32).tolist(),
            "shift": shift.astype(np.float32).tolist(), "key": meta.get("key", ""), "id": [int(i) for i in ident],
            "worker": worker, "epoch": int(epoch), "ordinal": int(ordinal)}


class _VolumeSource(ShardStream):
    """Training workers that deliver whole prepared volumes (:func:`prepare`) instead of crops, each with the
    worker's stream state after it."""

    def _train(self, worker: int, workers: int):
        saved = self.resume_states.get(worker) or {}
        errors = _ErrorLog()
        errors.restore(saved.get("errors"))
        volumes = _TrainVolumes(self, worker, workers, errors, saved)
        while True:
            vol, ident = volumes.next()
            item = prepare(self, vol, ident, worker)
            yield item | errors.tags(worker) | {"_state": {**volumes.state(), "errors": errors.state()}}


def _as_is(item):
    return item


class _VolumeLoader(ShardLoader):
    """The workers' volumes one at a time (pinned for a GPU), with the stream's state, errors and timeout."""

    def __init__(self, dataset: _VolumeSource, pin: bool, layout: dict):
        super().__init__(dataset)
        self.pin, self.layout = pin, layout

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "device_pool": self.layout}  # another pool layout: start afresh

    def _dataloader(self, **kwargs):
        return super()._dataloader(batch_size=None, collate_fn=_as_is, pin_memory=self.pin, **kwargs)


class _GridPoints:
    """Body (or background) points of a volume as :func:`sample_origins` reads them (``len`` and ``[i]`` → the
    i-th point ``[3]`` in voxels, in the order of ``np.argwhere``), kept as flat grid indices."""

    def __init__(self, mask: np.ndarray):
        self.grid = mask.shape
        self.flat = np.flatnonzero(mask).astype(np.int64)

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, i) -> np.ndarray:
        return np.array(np.unravel_index(self.flat[i], self.grid), dtype=np.int64) * BODY_STRIDE


@dataclass
class _Resident:
    key: str
    id: list
    worker: int
    epoch: int
    ordinal: int
    start: int  # first element in the arena
    shape: tuple  # the padded volume's C, X, Y, Z
    pad: np.ndarray
    stored: list
    scale: list
    shift: list
    fg: _GridPoints
    bg: _GridPoints
    rng: np.random.Generator = field(repr=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class DevicePool:
    """Training batches cut on ``device`` from a pool of resident volumes (see the module docstring).

    ``budget``: the arena's size (``"4GiB"``) or a number of volumes (``32``: the arena holds that many of the
    largest volume in the shard sets, and never more than that many volumes). ``cfg`` is the stream's config
    (``crop_size``, ``batch_size``, ``crops_per_volume``, sampling, window, flips, jitter, workers); training
    mode only, without partitions.
    """

    def __init__(self, shards, cfg: StreamConfig, device="cpu", budget="4GiB", *, rank: int | None = None,
                 world_size: int | None = None):
        if cfg.mode != "train" or cfg.crop_size is None:
            raise ValueError("the device pool draws training crops: mode='train' with a crop_size")
        if cfg.partitions:
            raise ValueError(f"partitions={cfg.partitions}: partitioned crops (contrastive) are cut by the workers; "
                             "use crop_device=cpu")
        dirs = [Path(shards)] if isinstance(shards, (str, Path)) else [Path(d) for d in shards]
        self.cfg, self.device = cfg, torch.device(device)
        self.kind, amount = parse_budget(budget)
        self.volumes_max = amount if self.kind == "volumes" else None
        self.capacity = amount * _max_volume_elements(dirs, cfg.crop_size) if self.kind == "volumes" else None
        self.budget_bytes = amount if self.kind == "bytes" else None  # count: known once the stored dtype is
        r, w = _rank_world(rank, world_size)
        self.source = _VolumeSource(dirs, cfg, r, w)
        self.loader = _VolumeLoader(self.source, pin=self.device.type == "cuda",
                                    layout={"budget": [self.kind, amount], "crop_size": list(cfg.crop_size)})
        self.arena: torch.Tensor | None = None
        self.residents: list[_Resident] = []
        self.head = 0
        self.rng = np.random.default_rng([cfg.seed, r, 3])
        self.acc = 0.0  # volumes owed to the refresh (batch_size / crops_per_volume per step)
        self.steps = 0
        self._saved: dict | None = None
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._copied = None  # event: the last volume copy issued
        self._gathered = None  # event: the last gather issued (a copy must not overwrite what it still reads)
        self._copy_pending = False

    # -------------------------------------------------------------- the stream's interface
    @property
    def errors(self) -> int:
        return self.loader.errors

    @property
    def errors_by_shard(self) -> dict:
        return self.loader.errors_by_shard

    @property
    def error_messages(self) -> list[str]:
        return self.loader.error_messages

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    @property
    def resident_bytes(self) -> int:
        """Bytes of the arena that resident volumes occupy."""
        item = self.arena.element_size() if self.arena is not None else 2
        return sum(e.size for e in self.residents) * item

    @property
    def arena_bytes(self) -> int:
        """Bytes the pool holds on its device (0 before the first volume)."""
        return 0 if self.arena is None else self.arena.numel() * self.arena.element_size()

    def state_dict(self) -> dict:
        """The workers' stream state with the pool's: resident volumes (their places and generators), the pool's
        generator, the refresh owed, the steps drawn."""
        state = self.loader.state_dict()
        state["pool"] = {"residents": [{"id": e.id, "worker": e.worker, "epoch": e.epoch, "ordinal": e.ordinal,
                                        "start": e.start, "rng": e.rng.bit_generator.state} for e in self.residents],
                         "head": self.head, "rng": self.rng.bit_generator.state, "acc": self.acc,
                         "steps": self.steps, "capacity": None if self.arena is None else self.arena.numel()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch drawn before ``state_dict()`` (a state from another layout starts the next
        epoch with a fresh pool, as the stream does)."""
        self.loader.load_state_dict(state)
        pool = state.get("pool")
        self._saved = pool if (self.loader.resumed_exact and isinstance(pool, dict)) else None

    # -------------------------------------------------------------- arena
    def _allocate(self, dtype: torch.dtype) -> None:
        item = torch.empty((), dtype=dtype).element_size()
        if self.capacity is None:
            self.capacity = self.budget_bytes // item
        self.budget_bytes = self.capacity * item
        self.arena = torch.empty(self.capacity, dtype=dtype, device=self.device)

    def _admit(self, item: dict, start: int | None = None, rng_state: dict | None = None) -> bool:
        """Copy a prepared volume into the arena (at ``start``, else at the ring's head, wrapping when it does not
        fit before the end) and make it resident, evicting the volumes it overwrites (and the oldest beyond a
        volume count). Returns whether anything was evicted."""
        img = item["image"]
        if self.arena is None:
            self._allocate(img.dtype)
        if img.dtype != self.arena.dtype:
            raise ValueError(f"shards.pool: volume {item['key']!r} is {img.dtype} and the pool holds "
                             f"{self.arena.dtype}: one pool holds one stored dtype (CT int16 or MRI float16); stream "
                             "mixed sets with crop_device=cpu")
        if self.residents and img.shape[0] != self.residents[0].shape[0]:
            raise ValueError(f"shards.pool: volume {item['key']!r} has {img.shape[0]} channel(s), the pool's volumes "
                             f"{self.residents[0].shape[0]}: stream shard sets with one channel count together")
        n = img.numel()
        if n > self.capacity:
            raise ValueError(f"shards.pool: volume {item['key']!r} ({n * img.element_size() / 2**20:.0f} MiB padded) "
                             f"does not fit the device pool ({self.budget_bytes / 2**20:.0f} MiB): raise "
                             "data.device_pool")
        if start is None:
            start = self.head if self.head + n <= self.capacity else 0
        before = len(self.residents)
        self.residents = [e for e in self.residents if e.start + e.size <= start or e.start >= start + n]
        if self.volumes_max is not None:
            del self.residents[:max(0, len(self.residents) - self.volumes_max + 1)]
        evicted = len(self.residents) < before
        dst = self.arena[start:start + n]
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                if self._gathered is not None:
                    self._copy_stream.wait_event(self._gathered)
                dst.copy_(img.reshape(-1), non_blocking=True)  # pinned by the DataLoader: the host returns at once
                self._copied = torch.cuda.Event()
                self._copied.record(self._copy_stream)
            self._copy_pending = True
        else:
            dst.copy_(img.reshape(-1))
        self.head = start + n
        w, e, o = int(item["worker"]), int(item["epoch"]), int(item["ordinal"])
        rng = np.random.default_rng([self.cfg.seed, self.source.rank, w, e, o + 1_000_003])  # the worker path's seed
        if rng_state is not None:
            rng.bit_generator.state = rng_state
        body = item["body"].numpy()
        self.residents.append(_Resident(
            key=item["key"], id=list(item["id"]), worker=w, epoch=e, ordinal=o, start=start,
            shape=tuple(int(s) for s in img.shape), pad=np.asarray(item["pad"], np.int64), stored=list(item["shape"]),
            scale=list(item["scale"]), shift=list(item["shift"]), fg=_GridPoints(body), bg=_GridPoints(~body), rng=rng))
        return evicted

    def _restore(self, saved: dict) -> None:
        """Re-read the saved resident volumes from their shards into their saved places; a saved pool that does not
        fit this one (another arena size, a rebuilt shard set, a damaged state) is dropped with a message and the pool
        fills afresh from where the workers stand."""
        try:
            self._restore_exactly(saved)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            print(f"shards.pool: the saved pool cannot be restored ({exc}); filling a fresh pool from the saved stream "
                  "position", file=sys.stderr, flush=True)
            self.residents, self.head, self.acc = [], 0, 0.0

    def _restore_exactly(self, saved: dict) -> None:
        errors = _ErrorLog(echo=False)
        raws = self.source._fetch([tuple(r["id"]) for r in saved["residents"]])
        for r in saved["residents"]:
            raw = raws.get(tuple(r["id"]))
            dec = self.source._decode(raw, errors) if raw is not None else None
            if dec is None:
                print(f"shards.pool: {self.source.shard_name(int(r['id'][0]))} sample {r['id'][1]} of the resumed pool is "
                      "no longer readable; the pool goes on without it (`python -m medssl.shards verify` the set)",
                      file=sys.stderr, flush=True)
                continue
            vol = (int(r["epoch"]), int(r["ordinal"]), *dec)
            item = prepare(self.source, vol, r["id"], int(r["worker"]))
            if self.arena is None:
                self._allocate(item["image"].dtype)
            start, n = int(r["start"]), item["image"].numel()
            if self.arena.numel() != saved["capacity"] or not 0 <= start <= self.arena.numel() - n:
                raise ValueError(f"volume {r['id']} does not fit at its saved place (saved arena "
                                 f"{saved['capacity']} elements, this one {self.arena.numel()})")
            self._admit(item, start=start, rng_state=r["rng"])
        self.head = int(saved["head"])
        self.rng.bit_generator.state = saved["rng"]
        self.acc = float(saved["acc"])
        self.steps = int(saved["steps"])

    def _fill(self, volumes) -> None:
        """Fill an empty pool: up to its volume count, or until the arena is full (the volume that does not fit
        takes the oldest one's place), never more than this rank's volumes per epoch."""
        target = self.loader.num_samples if self.volumes_max is None else min(self.volumes_max, self.loader.num_samples)
        while len(self.residents) < target:
            if self._admit(next(volumes)):
                break
        per_step = math.ceil(self.cfg.batch_size / self.cfg.crops_per_volume)
        if per_step >= len(self.residents) and self.source.rank == 0:
            print(f"shards.pool: the pool holds {len(self.residents)} volume(s) and every step replaces {per_step} "
                  f"(batch {self.cfg.batch_size} / crops_per_volume {self.cfg.crops_per_volume}): volumes leave before "
                  "they give their crops; raise data.device_pool or data.crops_per_volume", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- crops
    def draw(self, n: int) -> list[tuple]:
        """``n`` crops' ``(resident, origin in the padded volume, flips, quarter turns, factor, offset)``, drawn on
        the host with the worker path's functions: the resident from the pool's generator, the rest from the
        volume's own."""
        cfg = self.cfg
        out = []
        for _ in range(n):
            e = self.residents[int(self.rng.integers(len(self.residents)))]
            o = sample_origins(e.shape[1:], cfg.crop_size, e.fg, cfg.pos_fraction, 1, e.rng,
                               bg=e.bg if cfg.negatives == "background" else None)[0]
            flips, k = np.zeros(3, bool), 0
            if cfg.flip_prob > 0 or cfg.rot90_prob > 0:
                flips, k = draw_flips(e.rng, cfg.flip_prob, cfg.rot90_prob, cfg.crop_size[0] == cfg.crop_size[1])
            factor, offset = np.float32(1.0), np.float32(0.0)
            if cfg.intensity_prob > 0:
                factor, offset = draw_jitter(e.rng, cfg.intensity_prob, cfg.intensity_scale, cfg.intensity_shift)
            out.append((e, o, flips, k, float(factor), float(offset)))
        return out

    def _small(self, rows, dtype) -> torch.Tensor:
        t = torch.tensor(rows, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self._cuda else t

    def cut(self, draws: list[tuple]) -> torch.Tensor:
        """The crops ``[B, C, X, Y, Z]`` float32 on the device for ``draws`` (as :meth:`draw` returns them): one
        gather from the arena by index arithmetic, then the window, its clip and the jitter."""
        cfg = self.cfg
        cx, cy, cz = cfg.crop_size
        chans = {e.shape[0] for e, *_ in draws}
        if len(chans) != 1:
            raise ValueError(f"shards.pool: crops of one batch have {sorted(chans)} channels; one shard set per "
                             "channel count")
        c = chans.pop()
        ints, floats = [], []
        for e, o, flips, k, factor, offset in draws:
            _, X, Y, Z = e.shape
            strides = np.array([Y * Z, Z, 1], np.int64)
            lin = strides @ plane_map(flips, k, cfg.crop_size)  # element offset per output i, j, l and constant
            ints.append([e.start + int(lin[3]) + int(strides @ np.asarray(o, np.int64)), int(lin[0]), int(lin[1]),
                         int(lin[2]), X * Y * Z])
            floats.append(list(e.scale) + list(e.shift) + [factor, offset])
        b = len(draws)
        small = torch.int32 if self.arena.numel() < 2**31 else torch.int64
        iv = self._small(ints, small).view(b, 5, 1, 1, 1, 1)
        fv = self._small(floats, torch.float32)
        ar = torch.arange(max(cx, cy, cz, c), device=self.device, dtype=small)
        # B·C·X·Y·Z indices (int32 while the arena allows: 4 bytes per voxel of the batch, beside its float32 crops)
        idx = (iv[:, 0] + iv[:, 4] * ar[:c].view(1, c, 1, 1, 1) + iv[:, 1] * ar[:cx].view(1, 1, cx, 1, 1)
               + iv[:, 2] * ar[:cy].view(1, 1, 1, cy, 1) + iv[:, 3] * ar[:cz].view(1, 1, 1, 1, cz))
        if self._cuda:
            cur = torch.cuda.current_stream(self.device)
            if self._copy_pending:  # volumes copied since the last gather must have landed
                cur.wait_event(self._copied)
                self._copy_pending = False
        img = self.arena.index_select(0, idx.view(-1)).view(idx.shape).float()
        view = (b, c, 1, 1, 1)
        img.mul_(fv[:, :c].reshape(view)).add_(fv[:, c:2 * c].reshape(view))  # Window.apply: x * scale + shift
        if cfg.window.clip:
            img.clamp_(min(cfg.window.out), max(cfg.window.out))
        img.mul_(fv[:, 2 * c].view(b, 1, 1, 1, 1)).add_(fv[:, 2 * c + 1].view(b, 1, 1, 1, 1))  # jitter
        if self._cuda:
            self._gathered = torch.cuda.Event()
            self._gathered.record(cur)
        return img

    def batch(self, draws: list[tuple]) -> dict:
        """The stream's batch dict for ``draws``."""
        return {
            "image": self.cut(draws),
            "key": [e.key for e, *_ in draws],
            "origin": torch.tensor(np.stack([np.asarray(o) - e.pad for e, o, *_ in draws]), dtype=torch.int64),
            "flip": torch.from_numpy(np.stack([f for _, _, f, *_ in draws])),
            "rot90": torch.tensor([k for *_, k, _, _ in draws]),
            "intensity": torch.tensor([[f, o] for *_, f, o in draws], dtype=torch.float32),
            "shape": torch.tensor([e.stored for e, *_ in draws], dtype=torch.int64),
        }

    def __iter__(self):
        volumes = iter(self.loader)
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self._restore(saved)
        if not self.residents:
            self._fill(volumes)
        per_step = self.cfg.batch_size / self.cfg.crops_per_volume
        while True:
            self.acc += per_step
            while self.acc >= 1.0 - 1e-9:
                self._admit(next(volumes))
                self.acc -= 1.0
            self.steps += 1
            yield self.batch(self.draw(self.cfg.batch_size))
