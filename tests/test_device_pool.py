"""The device pool (``data.crop_device``, ``shards/pool.py``) on CPU tensors: its crops are the worker path's voxel
for voxel for the same origins, flips and jitter; a fixed seed draws the same crops twice; the arena never holds more
than its budget; a saved state continues the very same sequence; and a 2-process pretraining run on the pool lowers
the loss and resumes where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.shards.loader import StreamConfig, check_state
from medssl.shards.pool import DevicePool, parse_budget, prepare
from medssl.shards.verify import iter_tar, load_index

CROP = (24, 24, 24)


def _cfg(**kw) -> StreamConfig:
    base = dict(crop_size=CROP, crops_per_volume=2, batch_size=4, num_workers=0, flip_prob=0.5, rot90_prob=0.5,
                intensity_prob=0.5, seed=11, labels=False)
    return StreamConfig(**{**base, **kw})


def _take(pool: DevicePool, n: int) -> list[dict]:
    it = iter(pool)
    return [next(it) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["image"], b["image"]) and a["key"] == b["key"] and torch.equal(a["origin"], b["origin"])
            and torch.equal(a["flip"], b["flip"]) and torch.equal(a["rot90"], b["rot90"])
            and torch.equal(a["intensity"], b["intensity"]))


@pytest.fixture(scope="module")
def two_sequence_mri(tmp_path_factory):
    """Three float16 MRI phantoms with two sequences each, own window per channel."""
    from tests.conftest import two_sequence_mri_shards

    return two_sequence_mri_shards(tmp_path_factory.mktemp("pool_mr") / "Dataset951_TwoSeq",
                                   tmp_path_factory.mktemp("pool_mr_shards"), n=3, seed=6)


@pytest.mark.parametrize("case", ["ct-cube", "ct-not-square", "ct-padded", "mri-two-sequences"])
def test_pool_crops_equal_the_worker_path_voxel_for_voxel(built, two_sequence_mri, case):
    """Every volume of the set made resident; each crop of the worker path (origins, flips, quarter turns and jitter
    as it drew them) cut again from the pool by index arithmetic: equal voxel for voxel. Cases: a cube (all quarter
    turns), a crop whose X–Y plane is not square (half turns only), a crop larger than the volumes (padding), and
    float16 MRI with two sequences (a window per channel)."""
    from medssl import shards

    crop, root = {"ct-cube": (CROP, built), "ct-not-square": ((20, 28, 16), built), "ct-padded": ((56, 56, 48), built),
                  "mri-two-sequences": (CROP, two_sequence_mri)}[case]
    cfg = _cfg(crop_size=crop)
    pool = DevicePool(root, cfg, budget="256MiB", rank=0, world_size=1)
    raws = [raw for s in load_index(root)["shards"] for raw in iter_tar(Path(root) / s["name"], print)]
    by_key = {}
    for i, raw in enumerate(raws):
        vol = (0, i, *pool.source._decode(raw, None))
        pool._admit(prepare(pool.source, vol, (0, i), 0))
        by_key[pool.residents[-1].key] = pool.residents[-1]
    assert len(by_key) == len(pool.residents) == len(raws)
    turns, flips, jittered, padded, n = set(), 0, 0, 0, 0
    for _, batch in zip(range(12), shards.stream([str(root)], cfg, rank=0, world_size=1)):
        for b in range(len(batch["key"])):
            e = by_key[batch["key"][b]]
            origin = batch["origin"][b].numpy() + e.pad
            factor, offset = batch["intensity"][b].tolist()
            draw = (e, origin, batch["flip"][b].numpy(), int(batch["rot90"][b]), factor, offset)
            got = pool.cut([draw])[0]
            assert torch.equal(got, batch["image"][b]), (batch["key"][b], batch["flip"][b], batch["rot90"][b])
            turns.add(int(batch["rot90"][b]))
            flips += int(batch["flip"][b].any())
            jittered += factor != 1.0 or offset != 0.0
            padded += int(e.pad.any())
            n += 1
    assert n == 48 and flips > 10 and jittered > 10  # every case was exercised
    assert turns == ({0, 2} if case == "ct-not-square" else {0, 1, 2, 3})
    assert (padded > 0) == (case == "ct-padded")
    if case == "mri-two-sequences":
        e = next(iter(by_key.values()))
        assert pool.arena.dtype == torch.float16 and e.shape[0] == 2 and e.scale[0] != e.scale[1]


def test_a_fixed_seed_draws_the_same_crops_twice_and_another_seed_others(built):
    first = _take(DevicePool(built, _cfg(num_workers=1), budget=3, rank=0, world_size=1), 8)
    again = _take(DevicePool(built, _cfg(num_workers=1), budget=3, rank=0, world_size=1), 8)
    other = _take(DevicePool(built, _cfg(num_workers=1, seed=12), budget=3, rank=0, world_size=1), 8)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not all(_same(a, b) for a, b in zip(first, other))
    b = first[0]
    assert b["image"].shape == (4, 1, *CROP) and b["image"].dtype == torch.float32
    assert float(b["image"].min()) >= -0.2 and float(b["image"].max()) <= 1.2  # window [0, 1], jitter ±10 %
    assert len({k for x in first for k in x["key"]}) >= 4  # the refresh brings new volumes in


def test_the_pool_never_exceeds_its_budget(built):
    sizes = []
    for s in load_index(built)["shards"]:
        for raw in iter_tar(Path(built) / s["name"], print):
            sizes.append(np.prod([max(c, v) for c, v in zip(CROP, json.loads(raw["json"])["shape"][1:])]) * 2)
    budget = int(2.5 * max(sizes))  # bytes: two of the largest volumes, not three
    pool = DevicePool(built, _cfg(), budget=f"{budget}B", rank=0, world_size=1)
    it = iter(pool)
    for _ in range(20):
        next(it)
        spans = sorted((e.start, e.start + e.size) for e in pool.residents)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "resident volumes overlap in the arena"
        assert pool.arena_bytes <= budget and pool.resident_bytes <= budget
        assert spans[-1][1] * 2 <= budget
    counted = DevicePool(built, _cfg(), budget=2, rank=0, world_size=1)  # a number of volumes
    it = iter(counted)
    for _ in range(12):
        next(it)
        assert 1 <= len(counted.residents) <= 2
    assert counted.arena_bytes == 2 * max(sizes)  # two of the set's largest volume (samples.jsonl)
    with pytest.raises(ValueError, match="raise data.device_pool"):
        next(iter(DevicePool(built, _cfg(), budget=f"{int(min(sizes)) - 2}B", rank=0, world_size=1)))


def test_budget_forms():
    assert parse_budget(32) == ("volumes", 32) and parse_budget("32") == ("volumes", 32)
    assert parse_budget("4GiB") == ("bytes", 4 * 2**30) and parse_budget("500 MB") == ("bytes", 500_000_000)
    for bad in ("4 parsecs", 0, "-1", "1.5"):
        with pytest.raises(ValueError, match="device_pool"):
            parse_budget(bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_saved_state_continues_the_sequence(built, workers, capsys):
    pool = DevicePool(built, _cfg(num_workers=workers), budget="24MiB", rank=0, world_size=1)
    it = iter(pool)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(pool.state_dict()))  # what a checkpoint stores
    check_state(state)
    rest = [next(it) for _ in range(6)]
    del it
    resumed = DevicePool(built, _cfg(num_workers=workers), budget="24MiB", rank=0, world_size=1)
    resumed.load_state_dict(state)
    again = _take(resumed, 6)
    assert all(_same(a, b) for a, b in zip(rest, again))
    # another pool size cannot continue slot for slot: a fresh pool at the next epoch
    other = DevicePool(built, _cfg(num_workers=workers), budget="12MiB", rank=0, world_size=1)
    other.load_state_dict(state)
    assert not other.loader.resumed_exact
    next(iter(other))
    saved_epoch = max(st["epoch"] for st in state["workers"].values())
    assert min(st["epoch"] for st in other.state_dict()["workers"].values()) >= saved_epoch + 1
    assert f"starting at epoch {saved_epoch + 1}" in capsys.readouterr().err
    # a saved pool that no longer fits its arena (here: its capacity altered) is dropped for a fresh one, not trusted
    bad = json.loads(json.dumps(state))
    bad["pool"]["capacity"] += 1
    refilled = DevicePool(built, _cfg(num_workers=workers), budget="24MiB", rank=0, world_size=1)
    refilled.load_state_dict(bad)
    assert refilled.loader.resumed_exact
    next(iter(refilled))
    assert "the saved pool cannot be restored" in capsys.readouterr().err and refilled.residents


def test_partitions_and_eval_are_refused(built):
    with pytest.raises(ValueError, match="crop_device=cpu"):
        DevicePool(built, _cfg(partitions=2, crops_per_volume=2), rank=0, world_size=1)
    with pytest.raises(ValueError, match="mode='train'"):
        DevicePool(built, _cfg(mode="eval"), rank=0, world_size=1)


# ---------------------------------------------------------------------------------------- a run on the pool
STEPS = 24


@pytest.fixture(scope="module")
def pool_runs(built, tmp_path_factory):
    """hi_end_mae on 2 CPU processes with the pool: 24 steps straight (checkpoints at 12 and 24); then a copy of the
    run without its step-24 checkpoint resumed from step 12 to 24."""
    from tests.conftest import run_pretrain_2proc

    root = tmp_path_factory.mktemp("pool_run")
    extra = ["data.crop_device=cpu-pool", "data.device_pool=3", "optim.lr=1e-3", "optim.warmup_fraction=0.1",
             "task.norm_pix_loss=false", "train.checkpoint_every=12"]
    straight, log = run_pretrain_2proc("hi_end_mae", built, root / "straight", STEPS, *extra)
    resumed = root / "resumed"
    shutil.copytree(straight, resumed)
    last = sorted(p for p in (resumed / "checkpoints").iterdir() if p.is_dir())
    shutil.rmtree(last[-1])  # the step-24 checkpoint: the resumed run starts from step 12
    _, log2 = run_pretrain_2proc("hi_end_mae", built, resumed, STEPS, *extra)
    return straight, resumed, log, log2


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_on_the_pool_lowers_the_loss(pool_runs):
    straight, _, log, _ = pool_runs
    m = _metrics(straight)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first, last = sum(r["loss"] for r in m[:4]) / 4, sum(r["loss"] for r in m[-4:]) / 4
    assert last < 0.9 * first, f"loss did not fall on the pool: {first:.4f} -> {last:.4f}"  # as the worker path's test


def test_a_run_on_the_pool_resumes_the_same_sequence(pool_runs):
    straight, resumed, _, log2 = pool_runs
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [round(r["loss"], 6) for r in a[12:]] == [round(r["loss"], 6) for r in b[12:]], log2[-2000:]
