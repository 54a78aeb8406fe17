"""shards.stream: voxel-exact crops, each sample once in eval, balanced ranks in training, resumption,
damaged members skipped and counted."""

from __future__ import annotations

import itertools
import shutil
import tarfile
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from medssl import shards
from medssl.shards.crops import Window, sample_origins
from medssl.shards.loader import ShardStream, StreamConfig, _ErrorLog
from medssl.shards.verify import load_index, load_samples, verify

from .conftest import naive_trilinear

CROP = (24, 24, 16)


def _reference(sample: dict):
    """The stored volume rebuilt independently: nibabel load → as_closest_canonical → naive trilinear."""
    src = sample["source"]
    img = nib.as_closest_canonical(nib.load(src["images"][0]))
    vol = np.asarray(img.dataobj, dtype=np.float64)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    hu = np.clip(np.rint(naive_trilinear(vol, spacing, (1.5, 1.5, 1.5))), -1024, 3071).astype(np.int16)
    lab = None
    if src.get("label"):
        limg = nib.as_closest_canonical(nib.load(src["label"]))
        ldata = np.asarray(limg.dataobj)
        idx = np.ix_(*[np.minimum(np.floor(np.arange(n) * 1.5 / s + 0.5).astype(int), m - 1)
                       for n, s, m in zip(hu.shape, spacing, ldata.shape)])
        lab = ldata[idx].astype(np.uint8)
    return hu.astype(np.float32), lab


def _meta_by_key(built):
    """Source files per key, read back from the shards' JSON (what the stream itself saw)."""
    from medssl.shards.format import decode_sample
    from medssl.shards.verify import iter_tar

    out = {}
    for s in load_index(built)["shards"]:
        for raw in iter_tar(built / s["name"], print):
            _, _, meta = decode_sample(raw)
            out[meta["key"]] = meta
    return out


def test_window_matches_the_textbook_formula():
    hu = np.random.default_rng(0).integers(-1024, 3000, (1, 8, 8, 8)).astype(np.int16)
    ref = np.clip((hu.astype(np.float64) + 175) / 425, 0, 1)
    np.testing.assert_allclose(Window(ct=(-175, 250), out=(0, 1)).apply(hu, {"modality": "CT"}), ref, atol=1e-6)
    ref = np.clip((hu.astype(np.float64) + 1000) / 2000, 0, 1) * 2 - 1
    np.testing.assert_allclose(Window(ct=(-1000, 1000), out=(-1, 1)).apply(hu, {"modality": "CT"}), ref, atol=1e-6)
    mr = {"modality": "MR", "intensity": {"fg_p0_5": 10.0, "fg_p99_5": 510.0}}
    x = np.array([0.0, 10.0, 260.0, 510.0, 900.0], np.float16)
    np.testing.assert_allclose(Window(out=(0, 1)).apply(x, mr), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_crops_equal_the_same_region_of_the_nibabel_volume(built):
    # an identity window (HU in, HU out) so that the comparison is exact, voxel for voxel
    window = Window(ct=(-1024, 3071), out=(-1024, 3071))
    metas = _meta_by_key(built)
    loader = shards.stream(built, crop_size=CROP, crops_per_volume=3, batch_size=3, num_workers=0, mode="eval",
                           window=window, rank=0, world_size=1)
    checked = 0
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            ref_img, ref_lab = _reference(metas[key])
            o = batch["origin"][i].numpy()
            region = tuple(slice(a, a + c) for a, c in zip(o, CROP))
            assert (o >= 0).all(), "phantoms are larger than the crop: no padding expected"
            np.testing.assert_array_equal(batch["image"][i, 0].numpy(), ref_img[region])
            np.testing.assert_array_equal(batch["label"][i, 0].numpy(), ref_lab[region])
            checked += 1
    assert checked == 3 * load_index(built)["samples"]


def test_eval_mode_sees_every_sample_once_over_2_ranks_x_2_workers(built):
    keys = [s["key"] for s in load_samples(built)]
    per_rank = []
    for rank in range(2):
        loader = shards.stream(built, crop_size=CROP, crops_per_volume=1, batch_size=2, num_workers=2, mode="eval",
                               rank=rank, world_size=2)
        got = [k for b in loader for k in b["key"]]
        assert len(got) == loader.num_samples
        per_rank.append(got)
    seen = Counter(per_rank[0] + per_rank[1])
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_eval_mode_with_more_slots_than_samples(built):
    n = load_index(built)["samples"]
    got = []
    for rank in range(4):
        got += [k for b in shards.stream(built, crop_size=CROP, crops_per_volume=1, batch_size=1, num_workers=2,
                                         mode="eval", rank=rank, world_size=4) for k in b["key"]]
    assert len(got) == n == len(set(got))


def test_training_is_balanced_across_ranks_and_workers(built):
    """Every rank takes exactly samples_per_epoch // world volumes per epoch, even though the shards hold
    uneven counts and there are fewer shards than ranks × workers."""
    index = load_index(built)
    counts = [s["samples"] for s in index["shards"]]
    assert len(set(counts)) > 1 or len(counts) < 4, "fixture should give uneven shards"
    world, workers = 3, 2
    cfg = StreamConfig(crop_size=CROP, num_workers=workers, mode="train", samples_per_epoch=10)
    totals = []
    for rank in range(world):
        ds = ShardStream([built], cfg, rank, world)
        per_epoch = Counter()
        for w in range(workers):
            vols = itertools.islice(ds._train_volumes(w, workers, _ErrorLog()), 3 * ds.worker_budget(w, workers))
            for epoch, ordinal, image, label, meta in vols:
                per_epoch[epoch] += 1
        assert set(per_epoch) == {0, 1, 2}
        totals.append(per_epoch)
    assert all(t == totals[0] for t in totals) and totals[0][0] == 10 // world
    # through the DataLoader: every rank keeps producing batches (no rank runs dry)
    for rank in range(2):
        loader = shards.stream(built, crop_size=CROP, batch_size=2, num_workers=2, rank=rank, world_size=2)
        assert len(list(itertools.islice(loader, 12))) == 12


def test_training_epochs_cover_all_shards_and_reshuffle(built):
    n_shards = len(load_index(built)["shards"])
    ds = ShardStream([built], StreamConfig(crop_size=CROP), 0, 1)
    e0 = [p[0] for p in itertools.islice(ds.train_shards(0, 0, 1), n_shards)]
    e1 = [p[0] for p in itertools.islice(ds.train_shards(1, 0, 1), n_shards)]
    assert sorted(e0) == sorted(e1) == list(range(n_shards)) and e0 != e1


@pytest.mark.parametrize("world,workers", [(2, 1), (3, 2), (4, 2)])
def test_slots_read_disjoint_samples_within_a_round(built, world, workers):
    """Within one round every (rank, worker) slot reads different samples, also when there are fewer
    shards than slots (then the slots sharing a shard split its samples); only a slot whose split of a
    shard would be empty (more slots on the shard than samples in it) reuses one of its samples."""
    counts = [s["samples"] for s in load_index(built)["shards"]]
    owner = {}
    for rank in range(world):
        ds = ShardStream([built], StreamConfig(crop_size=CROP, num_workers=workers), rank, world)
        n_parts = -(-world * workers // len(counts)) * len(counts)  # a round: enough permutations for every slot
        for w in range(workers):
            per_slot = len(range(n_parts)[rank::world][w::workers])
            for sid, stride, offset in itertools.islice(ds.train_shards(0, w, workers), per_slot):
                read = [i for i in range(counts[sid]) if ds.reads(i, counts[sid], stride, offset)]
                assert read, "every part gives its slot a sample"
                if offset >= counts[sid]:
                    assert read == [offset % counts[sid]]
                    continue
                assert read == [i for i in range(counts[sid]) if i % stride == offset]
                for i in read:
                    assert (sid, i) not in owner, f"sample {i} of shard {sid} read by two slots"
                    owner[(sid, i)] = (rank, w)
    assert len(owner) == sum(counts), "one round covers every sample"


def test_training_stream_is_reproducible_and_resumable(built):
    kw = dict(crop_size=CROP, crops_per_volume=2, batch_size=2, num_workers=1, pool_size=1, shuffle_buffer=1,
              flip_prob=0.5, rot90_prob=0.5, rank=0, world_size=1, seed=11)
    full = [b for b in itertools.islice(shards.stream(built, **kw), 8)]
    again = [b for b in itertools.islice(shards.stream(built, **kw), 8)]
    for x, y in zip(full, again):
        assert x["key"] == y["key"]
        np.testing.assert_array_equal(x["image"].numpy(), y["image"].numpy())
    other = [b["key"] for b in itertools.islice(shards.stream(built, **{**kw, "seed": 12}), 8)]
    assert other != [b["key"] for b in full]
    first = shards.stream(built, **kw)
    head = list(itertools.islice(first, 3))
    state = first.state_dict()
    resumed = shards.stream(built, **kw)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 5))
    for x, y in zip(full, head + tail):
        assert x["key"] == y["key"]
        np.testing.assert_array_equal(x["origin"].numpy(), y["origin"].numpy())
        np.testing.assert_array_equal(x["image"].numpy(), y["image"].numpy())
    # iterating the same loader again continues after what it already delivered
    again = list(itertools.islice(first, 5))
    assert [b["key"] for b in again] == [b["key"] for b in tail]


def test_flips_keep_image_and_label_aligned(built):
    kw = dict(crop_size=(20, 20, 20), crops_per_volume=1, batch_size=1, num_workers=0, mode="train", pool_size=1,
              shuffle_buffer=1, rank=0, world_size=1, seed=5)
    plain = next(iter(shards.stream(built, **kw)))
    flipped = next(iter(shards.stream(built, **kw, flip_prob=1.0)))
    assert plain["key"] == flipped["key"] and flipped["flip"].all()
    for name in ("image", "label"):
        np.testing.assert_array_equal(flipped[name][0].numpy(), np.flip(plain[name][0].numpy(), (1, 2, 3)))


def test_small_volumes_are_padded_with_background(built):
    big = (200, 40, 40)
    batch = next(iter(shards.stream(built, crop_size=big, crops_per_volume=1, batch_size=1, num_workers=0,
                                    mode="eval", rank=0, world_size=1)))
    assert tuple(batch["image"].shape[2:]) == big
    assert batch["origin"][0, 0] < 0, "origin is negative along the padded axis"
    assert batch["image"][0, 0, 0].max() == 0.0, "padding is air, below the window: 0 after scaling"


def test_crops_are_biased_toward_the_body():
    rng = np.random.default_rng(0)
    shape, crop = np.array([100, 100, 100]), np.array([16, 16, 16])
    fg = np.argwhere(np.ones((4, 4, 4), bool)) * 4 + 80  # a small bright corner region
    hits = lambda org: np.mean([(o + crop > 80).all() for o in org])
    assert hits(sample_origins(shape, crop, fg, 1.0, 200, rng)) == 1.0
    assert hits(sample_origins(shape, crop, fg, 0.0, 200, rng)) < 0.2


def test_a_damaged_member_mid_shard_is_skipped_and_counted(built, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    index = load_index(damaged)
    shard = max(index["shards"], key=lambda s: s["samples"])
    assert shard["samples"] >= 2
    path = damaged / shard["name"]
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if ".npy" in m.name and ".seg." not in m.name]
    victim = members[len(members) // 2]
    blob = bytearray(path.read_bytes())
    for off in range(victim.offset_data + 200, victim.offset_data + 260):
        blob[off] ^= 0x5A
    path.write_bytes(bytes(blob))
    loader = shards.stream(damaged, crop_size=CROP, crops_per_volume=1, batch_size=1, num_workers=2, mode="eval",
                           rank=0, world_size=1)
    keys = [k for b in loader for k in b["key"]]
    victim_key = victim.name.split(".")[0]
    assert victim_key not in keys and len(keys) == index["samples"] - 1
    assert loader.errors == 1 and victim_key in loader.error_messages[0]
    # verify reports it too
    assert any("checksum" in p for r in verify(damaged, progress=False) for p in r.problems)


def test_member_paths_from_a_tar_are_never_written(built, tmp_path):
    """A hostile member name ('../escape.json') is read into memory like any member, never extracted;
    the sample it forms has no voxels, so it is counted as damaged and skipped."""
    import json
    import tarfile

    evil = tmp_path / "evil"
    shutil.copytree(built, evil)
    index = load_index(evil)
    shard = evil / index["shards"][0]["name"]
    payload = json.dumps({"shape": [1, 2, 2, 2]}).encode()
    with tarfile.open(shard, "a") as tf:
        info = tarfile.TarInfo("../escape.json")
        info.size = len(payload)
        import io

        tf.addfile(info, io.BytesIO(payload))
    loader = shards.stream(evil, crop_size=CROP, crops_per_volume=1, batch_size=1, num_workers=0, mode="eval",
                           check=False, rank=0, world_size=1)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == index["samples"]
    assert not (tmp_path / "escape.json").exists() and not (evil.parent / "escape.json").exists()
    assert loader.errors == 1 and "escape" in loader.error_messages[0]
