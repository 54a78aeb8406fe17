"""Reusable shared-memory batch buffers between the stream's DataLoader workers and the training process.

A worker used to stack every batch into a fresh shared-memory segment (``default_collate`` inside a worker), which
costs 13 ms per 4 × 96³ float32 batch against 0.65 ms into a reused one (BENCHMARKS.md). Here each worker keeps
``n`` slots, made once, and sends a slot number with each batch (a slot's tensors travel as shared-memory handles the
first time only). The training process gives a slot back (a shared flag set to 0) once no tensor outside its table
refers to the slot's memory, so a consumer that keeps a batch, or a view of it, keeps the slot; the worker then
stacks into fresh shared memory instead of waiting. Where torch does not expose storage use counts, nothing is
reused.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether this torch tells how many tensors hold a storage (needed to know when a slot is free)."""
    return hasattr(torch._C, "_storage_Use_Count")


def use_count(t: torch.Tensor) -> int:
    """How many tensors (and storage objects) hold ``t``'s memory."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


class WorkerBuffers:
    """One DataLoader worker's ``n`` slots, each with a tensor per stacked key, and a shared flag per slot (0 free,
    1 written by the worker and not yet given back by the training process)."""

    def __init__(self, n: int):
        self.n = n
        self.flags = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}
        self.flags_sent = False

    def stack(self, parts: dict[str, list[torch.Tensor]]) -> tuple | None:
        """Stack each key's tensors into a free slot; returns what the batch carries for the training process
        (:meth:`MainBuffers.receive`), or None when every slot is still held."""
        free = (self.flags == 0).nonzero()
        if not len(free):
            return None
        r = int(free[0])
        self.flags[r] = 1
        new = {}
        for key, ts in parts.items():
            shape = (len(ts), *ts[0].shape)
            t = self.tensors.get((key, r))
            if t is None or t.shape != shape or t.dtype != ts[0].dtype:
                t = self.tensors[(key, r)] = torch.empty(shape, dtype=ts[0].dtype).share_memory_()
                new[key] = t  # sent once (a shared-memory handle); later batches name the slot only
            torch.stack(ts, out=t)
        flags = None if self.flags_sent else self.flags
        self.flags_sent = True
        return r, tuple(parts), new, flags


_WORKER: WorkerBuffers | None = None  # this worker process's buffers (each worker is its own process)


def stack_in_worker(parts: dict[str, list[torch.Tensor]], n: int) -> tuple | None:
    """:meth:`WorkerBuffers.stack` with this worker process's ``n`` slots, made on first use."""
    global _WORKER
    if _WORKER is None or _WORKER.n != n:
        _WORKER = WorkerBuffers(n)
    return _WORKER.stack(parts)


class MainBuffers:
    """The training process's side: every slot's tensors with their use count when only this table holds them,
    and the slots given out in batches."""

    def __init__(self):
        self.flags: dict[int, torch.Tensor] = {}
        self.tensors: dict[tuple[int, int, str], tuple[torch.Tensor, int]] = {}
        self.out: set[tuple[int, int, tuple]] = set()

    def release(self) -> None:
        """Give back every slot given out whose memory nothing outside this table holds any more."""
        for w, r, keys in list(self.out):
            if all(use_count(self.tensors[(w, r, k)][0]) == self.tensors[(w, r, k)][1] for k in keys):
                self.flags[w][r] = 0
                self.out.discard((w, r, keys))

    def receive(self, w: int, slot: tuple, batch: dict) -> None:
        """Put worker ``w``'s slot tensors into ``batch`` as views (held by the consumer, they keep the slot out)."""
        r, keys, new, flags = slot
        if flags is not None:
            self.flags[w] = flags
        for k, t in new.items():
            self.tensors[(w, r, k)] = (t, use_count(t))
        for k in keys:
            batch[k] = self.tensors[(w, r, k)][0][:]
        self.out.add((w, r, keys))
