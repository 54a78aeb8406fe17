"""Shard sets in a user's first week: few volumes on many ranks and workers, MRI without a declared
modality, multi-channel inputs, and output folders that must not be raw dataset folders."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.shards.verify import channel_counts


def test_point7_channel_counts_reads_samples_jsonl(built):
    counts = channel_counts([built])
    assert counts == {1: 6}
    assert channel_counts(built) == counts
    with pytest.raises(FileNotFoundError, match="not a finished shard set"):
        channel_counts([built / "nope"])


# ---------------------------------------------------------------------------------- few volumes
@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """Shard sets of 1 and of 4 small CT phantoms (one volume per shard in the 4-volume set)."""
    from medssl.shards.build import BuildConfig, build
    from medssl.shards.synth import synth_dataset

    root = tmp_path_factory.mktemp("few")
    synth_dataset(root / "raw", n=4, seed=5, modality="CT", fov_scale=0.25, progress=False)
    one = root / "one"
    first = sorted((root / "raw" / "imagesTr").iterdir())[0]
    build(BuildConfig(inputs=[str(first)]), one, workers=1, progress=False)
    four = root / "four"
    build(BuildConfig(inputs=[str(root / "raw")], shard_size="1k"), four, workers=1, progress=False)
    return {"one": one, "four": four}


_STREAM_RANKS = """
import itertools, sys, json
from medssl import shards
d, world, workers, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
got = []
for rank in range(world):
    loader = shards.stream(d, crop_size=(16, 16, 16), crops_per_volume=2, batch_size=2, num_workers=workers,
                           pool_size=1, shuffle_buffer=1, rank=rank, world_size=world, timeout=60)
    got.append([b["image"].shape[0] for b in itertools.islice(loader, n)])
print(json.dumps(got))
"""


def _stream_ranks(d, world, workers, n, deadline=150):
    """Batches per rank from a fresh interpreter, killed after ``deadline`` s so that a hang fails the test."""
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _STREAM_RANKS, str(d), str(world), str(workers), str(n)],
                              capture_output=True, text=True, timeout=deadline)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stream of {d} over {world} ranks × {workers} workers hung for {deadline} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_point4_one_volume_two_workers_two_ranks_streams(few):
    got, err = _stream_ranks(few["one"], world=2, workers=2, n=6)
    assert got == [[2] * 6, [2] * 6]
    assert "volumes repeat" in err, "the stream says that it repeats volumes"


def test_point4_four_volumes_world_four_two_workers_streams(few):
    got, _ = _stream_ranks(few["four"], world=4, workers=2, n=5)
    assert got == [[2] * 5] * 4


def test_point4_every_slot_reads_a_volume_every_epoch(few):
    """In process, per slot: at least one volume per epoch, equal totals per rank, over several epochs."""
    import itertools
    from collections import Counter

    from medssl.shards.loader import ShardStream, StreamConfig, _ErrorLog

    for d, world, workers in ((few["one"], 2, 2), (few["four"], 4, 2), (few["four"], 3, 4)):
        per_rank = []
        for rank in range(world):
            ds = ShardStream([d], StreamConfig(crop_size=(16, 16, 16), num_workers=workers, shuffle_buffer=1),
                             rank, world)
            epochs = Counter()
            for w in range(workers):
                budget = ds.worker_budget(w, workers)
                assert budget >= 1
                for epoch, *_ in itertools.islice(ds._train_volumes(w, workers, _ErrorLog()), 3 * budget):
                    epochs[epoch] += 1
            assert set(epochs) == {0, 1, 2}
            per_rank.append(epochs)
        assert all(p == per_rank[0] for p in per_rank)


def test_point4_eval_mode_still_exactly_once(few):
    from medssl import shards
    from medssl.shards.verify import load_samples

    keys = []
    for rank in range(4):
        loader = shards.stream(few["four"], crop_size=(16, 16, 16), crops_per_volume=1, batch_size=1,
                               num_workers=2, mode="eval", rank=rank, world_size=4)
        keys += [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(s["key"] for s in load_samples(few["four"]))


def test_point4_a_stuck_worker_raises_after_the_timeout(few):
    """A DataLoader worker that delivers nothing (here: decoding takes far longer than the timeout) makes
    the loader raise with a message naming the timeout, instead of waiting forever."""
    import subprocess
    import sys

    code = """
import sys, time
from medssl import shards
from medssl.shards.loader import ShardStream
ShardStream._decode = lambda self, raw, errors: time.sleep(3600)
loader = shards.stream(sys.argv[1], crop_size=(16, 16, 16), batch_size=1, num_workers=1, timeout=3)
try:
    next(iter(loader))
except RuntimeError as exc:
    print(exc)
    sys.exit(3)
"""
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(few["one"])], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a stuck worker was waited for 120 s")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no batch from a DataLoader worker within 3 s" in proc.stdout and "StreamConfig.timeout" in proc.stdout


def test_point4_a_worker_with_only_damaged_data_raises(few, tmp_path):
    """A shard set whose every sample fails its checksum: the stream raises with the reason, no spinning."""
    import shutil
    import subprocess
    import sys
    import tarfile

    bad = tmp_path / "bad"
    shutil.copytree(few["one"], bad)
    path = next(bad.glob("shard-*.tar"))
    with tarfile.open(path) as tf:
        m = next(m for m in tf.getmembers() if ".npy" in m.name and ".seg." not in m.name)
    blob = bytearray(path.read_bytes())
    for off in range(m.offset_data + 100, m.offset_data + 160):
        blob[off] ^= 0x5A
    path.write_bytes(bytes(blob))
    code = ("import sys\nfrom medssl import shards\n"
            "next(iter(shards.stream(sys.argv[1], crop_size=(16, 16, 16), batch_size=1, num_workers=0)))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a stream of damaged samples searched for 120 s instead of raising")
    assert proc.returncode != 0 and "all damaged" in proc.stderr and "checksum" in proc.stderr


# ---------------------------------------------------------------------------------- multi-channel
@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    """A 2-channel nnU-Net dataset (CASE_0000 T1-like, CASE_0001 a second contrast) built into shards."""
    import json

    import nibabel as nib
    import numpy as np

    from medssl.shards.build import BuildConfig, build
    from medssl.shards.synth import synth_dataset

    root = tmp_path_factory.mktemp("twochan")
    raw = root / "Dataset950_TwoChannel"
    synth_dataset(raw, n=2, seed=8, modality="MR", fov_scale=0.25, progress=False)
    for f in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        img = nib.load(f)
        second = np.asarray(img.dataobj, np.float32)[::-1] * 10.0  # another image, on another scale
        nib.save(nib.Nifti1Image(second, img.affine), str(f).replace("_0000.nii.gz", "_0001.nii.gz"))
    desc = json.loads((raw / "dataset.json").read_text())
    desc["channel_names"] = {"0": "T1", "1": "T2"}
    (raw / "dataset.json").write_text(json.dumps(desc))
    out = root / "shards"
    build(BuildConfig(inputs=[str(raw)]), out, workers=1, progress=False)
    return out


def test_point7_two_channel_set_builds_and_streams_two_channel_crops(two_channel):
    from medssl import shards
    from medssl.shards.verify import info

    assert channel_counts(two_channel) == {2: 2}
    text = info(two_channel)
    assert "channels per volume: 2 (2 volumes)" in text
    row = next(line for line in text.splitlines() if line.startswith("MR "))
    assert row.split()[1:3] == ["2", "2"], row  # 2 volumes, 2 channels
    batch = next(iter(shards.stream(two_channel, crop_size=(16, 16, 16), crops_per_volume=2, batch_size=2,
                                    num_workers=0, rank=0, world_size=1)))
    assert tuple(batch["image"].shape) == (2, 2, 16, 16, 16)
    assert tuple(batch["label"].shape) == (2, 1, 16, 16, 16)
    # the two channels are different images of the same region, not one channel repeated
    assert not np.allclose(batch["image"][:, 0].numpy(), batch["image"][:, 1].numpy())


def test_point7_each_mri_channel_is_windowed_on_its_own_scale(two_channel):
    """Channel 1 is stored on a 10x larger scale than channel 0: each is mapped by its own percentiles,
    so both fill [0, 1] instead of one being squashed toward 0 by a shared window."""
    from medssl import shards
    from medssl.shards.format import decode_sample
    from medssl.shards.verify import iter_tar, load_index

    index = load_index(two_channel)
    _, _, meta = decode_sample(next(iter_tar(two_channel / index["shards"][0]["name"], print)))
    per = meta["intensity"]["channels"]
    assert len(per) == 2 and per[1]["fg_p99_5"] > 5 * per[0]["fg_p99_5"]
    batches = list(shards.stream(two_channel, crop_size=None, batch_size=1, num_workers=0, mode="eval",
                                 rank=0, world_size=1))
    for b in batches:
        x = b["image"][0].numpy()  # [2, X, Y, Z] whole volume
        for c in range(2):
            assert 0.0 <= x[c].min() and x[c].max() <= 1.0
            assert np.percentile(x[c], 99) > 0.5, f"channel {c} squashed: 99th percentile {np.percentile(x[c], 99)}"


def test_point7_info_flags_sets_that_mix_channel_counts(two_channel, few, tmp_path, capsys):
    from medssl.shards.__main__ import main
    from medssl.shards.build import BuildConfig, build

    assert channel_counts([two_channel, few["one"]]) == {1: 1, 2: 2}
    assert main(["info", str(few["one"])]) == 0
    out = capsys.readouterr().out
    assert "channels per volume: 1 (1 volume)" in out and "MIXED" not in out
    mixed = tmp_path / "mixed"
    one_ct = sorted((few["one"].parent / "raw" / "imagesTr").iterdir())[0]
    build(BuildConfig(inputs=[str(two_channel.parent / "Dataset950_TwoChannel"), str(one_ct)]), mixed, workers=1, progress=False)
    assert main(["info", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "channels per volume: 1 (1 volume), 2 (2 volumes)  -- MIXED" in out


# ---------------------------------------------------------------------------------- modality
@pytest.fixture(scope="module")
def mr_folder(tmp_path_factory):
    """A plain folder of float32 MRI-like volumes (no dataset.json, no CSV): nothing declares the modality."""
    import shutil

    from medssl.shards.synth import synth_dataset

    root = tmp_path_factory.mktemp("mrfolder")
    synth_dataset(root / "raw", n=2, seed=4, modality="MR", fov_scale=0.25, progress=False)
    folder = root / "scans"
    folder.mkdir()
    for f in sorted((root / "raw" / "imagesTr").iterdir()):
        shutil.copy(f, folder / f.name.replace("_0000", ""))
    return folder


def _cli_build(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "medssl.shards", "build", *map(str, args), "--quiet", "--workers", "1"],
                          capture_output=True, text=True, timeout=300)


def test_point5_undeclared_float_mri_folder_is_refused_not_stored_as_ct(mr_folder, tmp_path):
    import nibabel as nib

    first = sorted(mr_folder.iterdir())[0]
    assert nib.load(first).get_data_dtype() == np.float32
    out = tmp_path / "out"
    res = _cli_build(mr_folder, "--out", out)
    assert res.returncode == 2, res.stdout + res.stderr
    assert first.name in res.stderr and "--modality MR" in res.stderr and "--modality CT" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists(), "no half-made output"


def test_point5_declared_mr_folder_is_stored_as_float16_mr(mr_folder, tmp_path):
    from medssl.shards.format import decode_sample
    from medssl.shards.verify import iter_tar, load_index

    out = tmp_path / "out"
    res = _cli_build(mr_folder, "--out", out, "--modality", "MR")
    assert res.returncode == 0, res.stderr
    index = load_index(out)
    assert index["modalities"] == {"MR": 2}
    raw = next(iter_tar(out / index["shards"][0]["name"], print))
    image, _, meta = decode_sample(raw)
    assert image.dtype == np.float16 and meta["modality"] == "MR" and "modality_inferred" not in meta


def test_point5_nnunet_channel_names_t2_give_mr(mr_folder, tmp_path):
    import json
    import shutil

    from medssl.shards.build import BuildConfig, build
    from medssl.shards.verify import load_index

    ds = tmp_path / "Dataset951_T2"
    (ds / "imagesTr").mkdir(parents=True)
    for f in sorted(mr_folder.iterdir()):
        shutil.copy(f, ds / "imagesTr" / f.name.replace(".nii.gz", "_0000.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0},
                                                 "numTraining": 2, "file_ending": ".nii.gz"}))
    build(BuildConfig(inputs=[str(ds)]), tmp_path / "out", workers=1, progress=False)
    assert load_index(tmp_path / "out")["modalities"] == {"MR": 2}


def test_point5_undeclared_hu_volumes_are_ct_and_a_stray_mri_is_skipped(few, mr_folder, tmp_path):
    """A folder of HU volumes without --modality is stored as CT (and says it was inferred); one
    MRI-like volume among them is reported with the fix and skipped, the rest is built."""
    import shutil

    from medssl.shards.build import BuildConfig, build
    from medssl.shards.format import decode_sample
    from medssl.shards.verify import iter_tar, load_index

    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((few["one"].parent / "raw" / "imagesTr").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    stray = folder / "zz_mri.nii.gz"
    shutil.copy(sorted(mr_folder.iterdir())[0], stray)
    result = build(BuildConfig(inputs=[str(folder)]), tmp_path / "out", workers=1, progress=False)
    assert result.samples == 2 and [e["file"] for e in result.errors] == [str(stray)]
    assert "--modality MR" in result.errors[0]["fix"]
    index = load_index(tmp_path / "out")
    assert index["modalities"] == {"CT": 2}
    _, _, meta = decode_sample(next(iter_tar(tmp_path / "out" / index["shards"][0]["name"], print)))
    assert "stored as CT from its intensities" in meta["modality_inferred"]


def test_point5_hu_verdict_on_typical_intensities():
    from medssl.shards.preprocess import hu_verdict

    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1024, np.int16)
    ct[5:15, 5:15, 5:15] = rng.integers(-100, 1500, (10, 10, 10))
    assert hu_verdict(ct)[0] == "CT"
    padded = ct.copy()
    padded[:3] = -3024  # outside the scanner's field of view
    assert hu_verdict(padded)[0] == "CT"
    assert hu_verdict(rng.uniform(0, 800, (20, 20, 20)).astype(np.float32))[0] == "MR"
    assert hu_verdict(rng.normal(0, 1, (20, 20, 20)).astype(np.float32))[0] == "MR"  # z-scored
    assert hu_verdict(ct.astype(np.float32) + 0.37)[0] == "ambiguous"


# ---------------------------------------------------------------------------------- --out
def test_point9_build_out_into_a_raw_dataset_folder_is_refused(few, tmp_path):
    import shutil

    raw = tmp_path / "Dataset952_Raw"
    shutil.copytree(few["one"].parent / "raw", raw)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.json").write_text("{}")
    (other / "imagesTr").mkdir()
    before_other = sorted(p.name for p in other.iterdir())
    for out, words in ((raw, "is the input"), (raw / "shards", "inside the input folder"),
                       (raw / "imagesTr", "inside the input folder"), (tmp_path, "contains the input"),
                       (other, "not part of a shard set")):
        res = _cli_build(raw, "--out", out, "--modality", "CT")
        assert res.returncode == 2, (out, res.stdout, res.stderr)
        assert words in res.stderr and str(out) in res.stderr and "empty or new folder" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "other" not in p.parts) == before
    assert sorted(p.name for p in other.iterdir()) == before_other


def test_point9_existing_shard_sets_keep_their_rules(few, tmp_path):
    """Re-running the same build is a no-op; building other inputs into an existing set is refused."""
    import shutil

    raw = few["one"].parent / "raw"
    out = tmp_path / "set"
    shutil.copytree(few["one"], out)
    first = sorted(raw.rglob("*_0000.nii.gz"))[0]
    res = _cli_build(first, "--out", out)
    assert res.returncode == 0 and "already complete" in res.stdout, res.stdout + res.stderr
    res = _cli_build(raw, "--out", out)
    assert res.returncode != 0 and "other settings or inputs" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in few["one"].iterdir())
