"""What one training slot (a DataLoader worker of one rank) reads, and the state it resumes from.

``_RawReader`` walks the slot's shard sequence and keeps its position; ``_TrainVolumes`` turns it into
decoded volumes through a shuffle buffer; ``_ErrorLog`` counts what was skipped, per shard and kind.
``check_state`` is the schema of a saved stream state (checkpoint sidecars are read as untrusted).
``shards.loader`` owns the stream itself and uses these.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from .loader import ShardStream


class _RawReader:
    """The raw (undecoded) samples of one training slot: its infinite sequence of ``(shard, stride,
    offset)`` parts, read in order, with a position (``part``, ``next`` tar ordinal) that a checkpoint
    keeps. A shard that is missing, empty or unreadable is counted and, for the rest of the worker's
    life, replaced by the next readable shard of the set (with the same stride and offset), so a slot
    whose shards are gone still feeds its rank; when no shard is readable the reader raises naming each
    shard's problem."""

    def __init__(self, stream: ShardStream, parts: Iterator, errors, part: int = 0, next_: int = 0,
                 bad: Sequence[int] = ()):
        self.stream, self.parts, self.errors = stream, parts, errors
        self.part, self.next = int(part), int(next_)
        self.bad = set(int(b) for b in bad)
        self._it = self._samples()

    def position(self) -> dict:
        return {"part": self.part, "next": self.next}

    def __next__(self) -> dict:
        return next(self._it)

    def _readable(self, sid: int) -> int | None:
        n = len(self.stream.shards)
        for j in range(n):
            cand = (sid + j) % n
            if cand not in self.bad:
                return cand
        return None

    def _samples(self) -> Iterator[dict]:
        s = self.stream
        for _ in range(self.part):  # parts are (shard, stride, offset) tuples: skipping them reads nothing
            next(self.parts)
        idle, limit = 0, 2 * len(s.shards) + 2
        while True:
            sid, stride, offset = next(self.parts)
            got = 0
            while True:
                use = self._readable(sid)
                if use is None:
                    problems = "; ".join(self.errors.messages) or "?"
                    raise RuntimeError(f"shards.stream: no readable sample in any of the {len(s.shards)} shards "
                                       f"({problems}); check the set with `python -m medssl.shards verify DIR`")
                count = s.shards[use][1]
                seen = 0
                for n, raw in s._shard_samples(use, self.errors, start=self.next):
                    seen += 1
                    if s.reads(n, count, stride, offset):
                        self.next = n + 1
                        got += 1
                        yield raw
                if seen or self.next:
                    break
                self.bad.add(use)  # nothing at all in it: read the next readable shard in its place
            self.part += 1
            self.next = 0
            idle = 0 if got else idle + 1
            if idle > limit * max(1, stride):
                raise RuntimeError(f"shards.stream: rank {s.rank}: {idle} shard parts in a row gave no sample "
                                   f"(last problems: {'; '.join(self.errors.messages) or '?'}); check the set "
                                   "with `python -m medssl.shards verify DIR`")


class _TrainVolumes:
    """The decoded volumes of one training worker, epoch after epoch: ``worker_budget`` volumes per epoch
    popped at random from a shuffle buffer of raw samples filled by a :class:`_RawReader`. Its state
    (epoch, volumes taken, the buffer's samples and generator, the reader's position) is small and
    JSON-able; a worker built from it continues with the very same volumes."""

    def __init__(self, stream: ShardStream, worker: int, workers: int, errors, saved: dict):
        self.stream, self.worker, self.workers, self.errors = stream, worker, workers, errors
        self.budget = stream.worker_budget(worker, workers)
        if self.budget < 1:  # cannot happen with worker_budget's floor; never loop without yielding
            raise RuntimeError(f"shards.stream: rank {stream.rank} worker {worker} has no volume to read")
        self.epoch = int(saved.get("epoch", 0))
        self.ordinal = int(saved.get("ordinal", 0))
        self.damaged = int(saved.get("damaged", 0))
        # a worker that meets nothing but damaged samples raises instead of searching forever
        self.limit = max(2 * stream.total, 16)
        self._open(saved)

    def _open(self, saved: dict) -> None:
        s, cfg = self.stream, self.stream.cfg
        self.rng = np.random.default_rng([cfg.seed, s.rank, self.worker, self.epoch, 1])
        if saved.get("buffer_rng"):
            self.rng.bit_generator.state = saved["buffer_rng"]
        pos = saved.get("raw") or {}
        self.reader = _RawReader(s, s.train_shards(self.epoch, self.worker, self.workers), self.errors,
                                 pos.get("part", 0), pos.get("next", 0), saved.get("bad", ()))
        ids = [tuple(i) for i in saved.get("buffer", [])]
        fetched = s._fetch(ids) if ids else {}
        self.buf = [fetched[i] for i in ids if i in fetched]

    def state(self) -> dict:
        return {"epoch": self.epoch, "ordinal": self.ordinal, "damaged": self.damaged,
                "buffer_rng": self.rng.bit_generator.state, "raw": self.reader.position(),
                "bad": sorted(self.reader.bad), "buffer": [[r["__shard__"], r["__ordinal__"]] for r in self.buf]}

    def next(self) -> tuple[tuple, tuple[int, int]]:
        """The next decoded volume ``(epoch, ordinal, image, label, meta)`` and its ``(shard, ordinal)``."""
        s = self.stream
        while True:
            if self.ordinal >= self.budget:
                self.epoch, self.ordinal = self.epoch + 1, 0
                self._open({"bad": sorted(self.reader.bad)})
            while len(self.buf) < s.cfg.shuffle_buffer:
                self.buf.append(next(self.reader))
            raw = self.buf.pop(int(self.rng.integers(len(self.buf))))
            dec = s._decode(raw, self.errors)
            if dec is None:
                self.damaged += 1
                if self.damaged >= self.limit:
                    raise RuntimeError(
                        f"shards.stream: rank {s.rank} worker {self.worker}: the last {self.damaged} samples were "
                        f"all damaged (last: {self.errors.messages[-1] if self.errors.messages else '?'}); check "
                        f"the shard set with `python -m medssl.shards verify DIR`")
                continue  # damaged: the budget is filled from the next sample
            self.damaged = 0
            vol = (self.epoch, self.ordinal, *dec)
            self.ordinal += 1
            return vol, (raw["__shard__"], raw["__ordinal__"])


class _ErrorLog:
    """Per-worker count of skipped data — damaged samples, and missing, empty, unreadable or truncated
    shards — per shard and kind, with the latest messages (also printed to stderr)."""

    def __init__(self, keep: int = 5, echo: bool = True):
        self.count = 0
        self.messages: deque = deque(maxlen=keep)
        self.by_shard: dict[str, dict[str, int]] = {}
        self.echo = echo

    def add(self, message: str, shard: str | None = None, kind: str = "damaged") -> None:
        self.count += 1
        self.messages.append(message)
        if shard is not None:
            kinds = self.by_shard.setdefault(shard, {})
            kinds[kind] = kinds.get(kind, 0) + 1
        if self.echo:
            print(f"shards.stream: skipped {kind} data: {message}", file=sys.stderr, flush=True)

    def state(self) -> dict:
        return {"count": self.count, "by_shard": {k: dict(v) for k, v in self.by_shard.items()}}

    def restore(self, state: dict | None) -> None:
        if state:
            self.count = int(state.get("count", 0))
            self.by_shard = {k: dict(v) for k, v in state.get("by_shard", {}).items()}

    def tags(self, worker: int) -> dict:
        """What every sample carries to the main process: the worker and its error record so far."""
        return {"_worker": worker, "_errors": self.count, "_messages": list(self.messages),
                "_by_shard": {k: dict(v) for k, v in self.by_shard.items()}}


STATE_VERSION = 2


def check_state(state) -> None:
    """Raise ``ValueError`` with the reason when ``state`` is not a stream state this version can use
    (checkpoint side files are read as untrusted: a damaged one means an older checkpoint)."""
    if not isinstance(state, dict):
        raise ValueError(f"stream state is a {type(state).__name__}, not an object")
    if state.get("version") not in (1, STATE_VERSION):
        raise ValueError(f"stream state version {state.get('version')!r} is not 1 or {STATE_VERSION}")
    for key, kind in (("mode", str), ("rank", int), ("world_size", int), ("num_workers", int)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"stream state field {key!r} is missing or not a {kind.__name__}")
    workers = state.get("workers" if state["version"] == 2 else "cursors", {})
    if not isinstance(workers, dict):
        raise ValueError("stream state: its workers are not an object")
    for w, st in workers.items():
        if not (isinstance(w, str) and w.isdigit() and isinstance(st, dict)):
            raise ValueError(f"stream state: worker entry {w!r} is malformed")
        if state["version"] == 2:
            for key in ("epoch", "ordinal"):
                if not isinstance(st.get(key), int) or st[key] < 0:
                    raise ValueError(f"stream state: worker {w} field {key!r} is not a count")
            for e in st.get("pool", []):
                if not (isinstance(e, dict) and isinstance(e.get("id"), list) and len(e["id"]) == 2
                        and isinstance(e.get("left"), int) and isinstance(e.get("rng"), dict)):
                    raise ValueError(f"stream state: worker {w} has a malformed pool entry")


def merge_error_counts(records) -> dict[str, dict[str, int]]:
    """Sum ``{shard: {kind: count}}`` records (of workers, or of ranks)."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        for shard, kinds in (rec or {}).items():
            dst = out.setdefault(shard, {})
            for kind, n in kinds.items():
                dst[kind] = dst.get(kind, 0) + int(n)
    return dict(sorted(out.items()))
