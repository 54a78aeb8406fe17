"""The stream's reusable shared batch buffers (``StreamConfig.reuse_buffers``): DataLoader workers stack batches
into a few shared buffers made once instead of a fresh shared segment per batch. The crops must be those of the
plain path, a buffer must be reused once the consumer lets go of a batch, and a consumer that keeps batches must
never see them overwritten."""

from __future__ import annotations

import pytest
import torch


def _stream(built, reuse: bool, workers: int = 1):
    from medssl import shards

    return iter(shards.stream([str(built)], crop_size=(24, 24, 24), crops_per_volume=2, batch_size=2,
                              num_workers=workers, flip_prob=0.5, seed=5, reuse_buffers=reuse, rank=0,
                              world_size=1))


@pytest.mark.parametrize("workers", [1, 2])
def test_reused_buffers_give_the_plain_path_crops_and_are_reused(built, workers):
    from medssl.shards import buffers

    if not buffers.available():
        pytest.skip("this torch does not expose storage use counts: the stream always uses fresh buffers")
    plain = [b["image"].clone() for _, b in zip(range(16), _stream(built, False, workers))]
    got, buffers = [], []
    for _, b in zip(range(16), _stream(built, True, workers)):
        base = b["image"]._base  # a view of one of the workers' buffers (None: a fresh tensor)
        buffers.append(None if base is None else id(base))
        got.append(b["image"].clone())  # a copy: the batch itself is dropped at the next draw
        del b, base
    assert all(torch.equal(a, b) for a, b in zip(plain, got))
    # prefetch_factor 2 + 3 buffers per worker: every batch in one of them, 16 batches through at most 5 per worker
    assert None not in buffers
    assert len(set(buffers)) <= 5 * workers, buffers


def test_a_consumer_that_keeps_batches_never_sees_them_overwritten(built):
    plain = [b["image"].clone() for _, b in zip(range(12), _stream(built, False))]
    kept = [b for _, b in zip(range(12), _stream(built, True))]  # every batch held: no buffer may be rewritten
    assert all(torch.equal(a, b["image"]) for a, b in zip(plain, kept))
    views = [b["image"][:1] for _, b in zip(range(12), _stream(built, True))]  # only a view of each survives
    assert all(torch.equal(a[:1], v) for a, v in zip(plain, views))
