"""Shard sets in a user's first week: few volumes on many ranks and workers, MRI without a declared
modality, multi-channel inputs, and output folders that must not be raw dataset folders."""

from __future__ import annotations

import pytest

from medssl.shards.verify import channel_counts


def test_point7_channel_counts_reads_samples_jsonl(built):
    counts = channel_counts([built])
    assert counts == {1: 6}
    assert channel_counts(built) == counts
    with pytest.raises(FileNotFoundError, match="not a finished shard set"):
        channel_counts([built / "nope"])
