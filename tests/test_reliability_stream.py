"""shards.stream under damage and interruption (issue: reliability): a loader state saved after any batch
resumes at exactly the next crop (several workers, a pool and a shuffle buffer, worker rotation); a tar
that stops early, a missing shard and an empty shard are counted per shard, never dropped in silence and
never fatal while readable data remains."""

from __future__ import annotations

import itertools
import json
import shutil
import tarfile

import numpy as np
import pytest

from medssl import shards
from medssl.shards.loader import check_state
from medssl.shards.verify import load_index, load_samples

CROP = (16, 16, 16)


def _copy(built, tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(built, dst)
    return dst


def _equal(a: dict, b: dict) -> None:
    assert a["key"] == b["key"]
    for name in ("image", "origin", "flip", "rot90"):
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy())


@pytest.mark.parametrize("cut", [3, 6])
def test_a_saved_training_stream_continues_with_exactly_the_next_crop(built, cut):
    """Two workers, a pool of 2 volumes, a shuffle buffer of 2, 3 crops per volume, flips and rot90: the
    state after ``cut`` batches (through JSON, as in a checkpoint) gives the uninterrupted run's next batches
    bit for bit — including the worker that was next in the DataLoader's round robin (cut is odd or even)."""
    kw = dict(crop_size=CROP, crops_per_volume=3, batch_size=2, num_workers=2, pool_size=2, shuffle_buffer=2,
              flip_prob=0.5, rot90_prob=0.5, rank=0, world_size=1, seed=4, samples_per_epoch=5)
    total = cut + 7
    full = list(itertools.islice(shards.stream(built, **kw), total))
    assert len({tuple(b["key"]) for b in full}) > 3, "the run should span several volumes and an epoch boundary"
    first = shards.stream(built, **kw)
    head = list(itertools.islice(first, cut))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = shards.stream(built, **kw)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, total - cut))
    for x, y in zip(full, head + tail):
        _equal(x, y)


def test_a_state_from_another_world_size_starts_the_next_epoch_and_says_so(built, capsys):
    kw = dict(crop_size=CROP, batch_size=1, num_workers=0, rank=0, seed=1)
    first = shards.stream(built, **kw, world_size=1)
    list(itertools.islice(first, 2))
    other = shards.stream(built, **kw, world_size=2)
    other.load_state_dict(first.state_dict())
    assert "world_size 1 -> 2" in capsys.readouterr().err
    check_state(other.state_dict())  # saved again before a batch arrives, it still reads back
    assert next(iter(other))["image"].shape[0] == 1


def test_a_damaged_state_is_refused_with_the_reason(built):
    loader = shards.stream(built, crop_size=CROP, batch_size=1, num_workers=0, rank=0, world_size=1)
    good = loader.state_dict()
    for bad, why in (([], "not an object"), ({**good, "version": 9}, "version"),
                     ({**good, "rank": "0"}, "rank"),
                     ({**good, "workers": {"0": {"epoch": -1, "ordinal": 0}}}, "epoch")):
        with pytest.raises(ValueError, match=why):
            loader.load_state_dict(bad)


def _break_second_sample_header(shard_path):
    """Overwrite the checksum of the tar header that starts the shard's second sample: Python's tarfile
    then reads an 'invalid header' after the first member as the end of the archive, silently."""
    with tarfile.open(shard_path) as tf:
        members = tf.getmembers()
    first_key = members[0].name.split(".")[0]
    second = next(m for m in members if m.name.split(".")[0] != first_key)
    with open(shard_path, "r+b") as fh:
        fh.seek(second.offset + 148)
        fh.write(b"garbage!")


def test_a_tar_that_stops_early_is_counted_with_its_shard(built, tmp_path):
    data = _copy(built, tmp_path)
    index = load_index(data)
    victim = next(s for s in index["shards"] if s["samples"] >= 2)
    _break_second_sample_header(data / victim["name"])
    loader = shards.stream(data, crop_size=None, batch_size=1, num_workers=0, mode="eval", rank=0, world_size=1)
    keys = [k for b in loader for k in b["key"]]
    lost = victim["samples"] - 1
    assert len(keys) == index["samples"] - lost and len(set(keys)) == len(keys)
    name = f"{data.name}/{victim['name']}"
    assert loader.errors_by_shard == {name: {"truncated": 1}}
    assert loader.errors == 1 and f"tar ends after 1 of the {victim['samples']} samples" in loader.error_messages[0]


def test_missing_and_empty_shards_are_skipped_and_counted_in_training(built, tmp_path):
    """One shard deleted, one emptied (0 bytes): both ranks of a world of 2, each with 2 workers, keep
    delivering batches from the readable shards, and each bad shard is counted under its own name."""
    data = _copy(built, tmp_path)
    names = [s["name"] for s in load_index(data)["shards"]]
    (data / names[1]).unlink()
    (data / names[2]).write_bytes(b"")
    seen_bad: dict = {}
    for rank in range(2):
        loader = shards.stream(data, crop_size=CROP, batch_size=2, num_workers=2, rank=rank, world_size=2, timeout=120)
        batches = list(itertools.islice(loader, 8))
        assert len(batches) == 8
        readable = {s["key"] for s in load_samples(data) if s["shard"] not in names[1:3]}
        assert {k for b in batches for k in b["key"]} <= readable
        for shard, kinds in loader.errors_by_shard.items():
            seen_bad.setdefault(shard, set()).update(kinds)
    assert seen_bad == {f"{data.name}/{names[1]}": {"missing"}, f"{data.name}/{names[2]}": {"unreadable"}}


def test_a_set_with_no_readable_shard_raises_naming_the_shards(built, tmp_path):
    data = _copy(built, tmp_path)
    for s in load_index(data)["shards"]:
        (data / s["name"]).unlink()
    loader = shards.stream(data, crop_size=CROP, batch_size=1, num_workers=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="no readable sample in any of the .* shards .*shard file missing"):
        next(iter(loader))


def test_the_shards_demo_streams_and_prints_the_resume_state(tmp_path):
    """`python -m medssl.shards demo` (the first half of `make demo`) end to end on a few small phantoms."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "medssl.shards", "demo", "--out", str(tmp_path / "demo"), "--n-ct", "2",
                           "--n-mr", "1", "--fov-scale", "0.3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 1: resume state after 4 batches (worker 0: epoch" in proc.stdout and "demo finished" in proc.stdout
