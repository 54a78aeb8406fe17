"""synth → build → verify: the shard set, bad inputs, resumption after an interruption."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.shards.build import BuildConfig, BuildInterrupted, build
from medssl.shards.build import main as build_main
from medssl.shards.verify import info, load_index, load_samples, verify


def test_build_writes_index_samples_and_verifies(built, phantoms):
    index = load_index(built)
    n_cases = len(list((phantoms / "imagesTr").glob("*.nii.gz")))
    assert index["samples"] == n_cases and index["errors"] == 0 and index["labelled"] == n_cases
    assert len(index["shards"]) >= 2, "the fixture uses small shards so that there are several"
    assert sum(s["samples"] for s in index["shards"]) == n_cases
    for s in index["shards"]:
        assert (built / s["name"]).stat().st_size == s["bytes"]
    samples = load_samples(built)
    assert len({s["key"] for s in samples}) == n_cases
    assert all(s["spacing"] == [1.5, 1.5, 1.5] for s in samples)
    reports = verify(built, progress=False)
    assert not [p for r in reports for p in r.problems]
    text = info(built)
    assert f"{n_cases} volume(s)" in text and "CT" in text and "stored spacing" in text


def test_cli_verify_and_info(built):
    res = subprocess.run([sys.executable, "-m", "medssl.shards", "verify", str(built), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0 and "OK:" in res.stdout, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "medssl.shards", "info", str(built)], capture_output=True, text=True)
    assert res.returncode == 0 and "stored spacing" in res.stdout, res.stderr


def _bad_inputs(root: Path, good: Path) -> dict[str, tuple[str, str]]:
    """Write one file per kind of bad input; returns name → (reason code, expected words of the message)."""
    img = nib.load(str(good))
    data = np.asarray(img.dataobj)
    bad = root / "bad"
    bad.mkdir()
    raw = good.read_bytes()
    (bad / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(data[:, :, 0].copy(), img.affine), str(bad / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), str(bad / "fourd.nii.gz"))
    nan = data.astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), str(bad / "nans.nii.gz"))
    (bad / "empty.nii.gz").write_bytes(b"")
    (bad / "notnifti.nii.gz").write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))
    (bad / "plain_text.nii").write_text("hello\n")
    return {"truncated": ("truncated", "gzip stream ends"), "flat2d": ("not_3d", "2D image"),
            "fourd": ("not_3d", "4D image"), "nans": ("non_finite", "non-finite"), "empty": ("empty", "empty file"),
            "notnifti": ("not_nifti", "not a NIfTI file"), "plain_text": ("not_nifti", "not a NIfTI file")}


def test_each_bad_input_is_reported_and_the_rest_is_built(phantoms, tmp_path):
    good = sorted((phantoms / "imagesTr").glob("*.nii.gz"))
    labels = sorted((phantoms / "labelsTr").glob("*.nii.gz"))
    expected = _bad_inputs(tmp_path, good[0])
    # an image/label shape mismatch, through a CSV list (path, modality, label)
    small = nib.load(str(labels[1]))
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj)[:-2], small.affine), str(tmp_path / "short_label.nii.gz"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,modality,label\n"
                   f"{good[1]},CT,{tmp_path / 'short_label.nii.gz'}\n"
                   f"{good[2]},CT,{labels[2]}\n")
    inputs = [str(tmp_path / "bad"), str(csv), str(good[3])]
    out = tmp_path / "out"
    from medssl.shards import dicom

    if dicom.pydicom_available():
        from .test_dicom import write_series

        series = tmp_path / "dicom_gap"
        write_series(series, n=6, skip=(3,))
        inputs.append(str(series))
        expected["dicom_gap"] = ("dicom_missing_slice", "missing")
    result = build(BuildConfig(inputs=inputs, shard_size="50MB"), out, workers=2, progress=False)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_file = {Path(e["file"]).name.split(".")[0] if "dicom" not in e["file"] else "dicom_gap": e for e in errors}
    for name, (code, words) in expected.items():
        assert name in by_file, f"{name} missing from errors.jsonl: {errors}"
        assert by_file[name]["reason"] == code and words.lower() in by_file[name]["message"].lower(), by_file[name]
        assert by_file[name]["fix"], "every error says how to fix it"
    assert "short_label" in by_file and "label shape" in by_file["short_label"]["message"]
    assert by_file["short_label"]["reason"] == "label_mismatch"
    assert len(errors) == len(expected) + 1
    # the good volumes were built: good[2] (from the CSV, labelled) and good[3]
    assert result.samples == 2 and load_index(out)["errors"] == len(errors)
    assert not [p for r in verify(out, progress=False) for p in r.problems]


def test_exit_codes_follow_strict_and_empty(phantoms, tmp_path):
    import argparse

    good = sorted((phantoms / "imagesTr").glob("*.nii.gz"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "ok.nii.gz")
    (folder / "empty.nii.gz").write_bytes(b"")
    ns = dict(spacing="1.5", codec="npy", shard_size="10MB", crop_body=False, modality="CT", include_test=False,
              no_labels=False, workers=1, overwrite=False, quiet=True, max_voxels=10**9)
    assert build_main(argparse.Namespace(inputs=[str(folder)], out=str(tmp_path / "a"), strict=False, **ns)) == 0
    assert build_main(argparse.Namespace(inputs=[str(folder)], out=str(tmp_path / "b"), strict=True, **ns)) == 1
    (folder / "ok.nii.gz").unlink()
    assert build_main(argparse.Namespace(inputs=[str(folder)], out=str(tmp_path / "c"), strict=False, **ns)) == 1


def test_interrupted_build_resumes_without_redoing_shards(phantoms, tmp_path):
    cfg = BuildConfig(inputs=[str(phantoms)], shard_size="200k")
    out = tmp_path / "resumed"
    with pytest.raises(BuildInterrupted):
        build(cfg, out, workers=2, progress=False, _stop_after_shards=2)
    assert not (out / "index.json").exists()
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    assert len(first) == 2
    (out / "shard-000002.tar.tmp").write_bytes(b"half-written shard of the killed run")
    result = build(cfg, out, workers=2, progress=False)
    assert result.resumed_from == 2
    for name, stamp in first.items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    assert not list(out.glob("*.tmp"))
    # the resumed set is byte-identical to an uninterrupted build
    fresh = build(cfg, tmp_path / "fresh", workers=1, progress=False)
    assert [s["sha256"] for s in load_index(out)["shards"]] == [s["sha256"] for s in load_index(fresh.out)["shards"]]
    # a finished build is not redone; other settings are refused
    assert build(cfg, out, progress=False).resumed_from == len(load_index(out)["shards"])
    with pytest.raises(SystemExit, match="other settings"):
        build(BuildConfig(inputs=[str(phantoms)], shard_size="200k", spacing="2"), out, progress=False)


def test_body_crop_keeps_world_coordinates(phantoms, tmp_path):
    from medssl.shards.preprocess import prepare_volume

    image = sorted((phantoms / "imagesTr").glob("*.nii.gz"))[0]
    full = prepare_volume([image], None, "CT")
    crop = prepare_volume([image], None, "CT", crop_body=True)
    box = crop.meta["body_crop"]
    assert box is not None and np.prod(crop.image.shape) < np.prod(full.image.shape)
    region = (slice(None), *(slice(a, b) for a, b in box))
    np.testing.assert_array_equal(crop.image, full.image[region])
    start = np.array([a for a, _ in box] + [1.0])
    np.testing.assert_allclose(np.array(crop.meta["affine"])[:, 3], np.array(full.meta["affine"]) @ start, atol=1e-5)
    outside = np.ones(full.image.shape[1:], bool)
    outside[region[1:]] = False
    assert (full.image[0][outside] < -500).all(), "nothing of the body lies outside the crop"


def test_mri_is_stored_as_float16_and_normalised_per_volume(tmp_path):
    from medssl.shards import stream
    from medssl.shards.synth import synth_dataset

    raw = tmp_path / "mr"
    synth_dataset(raw, n=2, seed=1, modality="MR", fov_scale=0.3, progress=False)
    out = tmp_path / "mr_shards"
    build(BuildConfig(inputs=[str(raw)], codec="blosc2"), out, workers=1, progress=False)
    assert load_index(out)["modalities"] == {"MR": 2}
    assert not [p for r in verify(out, progress=False) for p in r.problems]
    batches = list(stream(out, crop_size=(32, 32, 16), crops_per_volume=2, batch_size=2, num_workers=0,
                          mode="eval", rank=0, world_size=1))
    x = torch.cat([b["image"] for b in batches])
    assert x.shape[0] == 4 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5



def test_medssl_console_entry_dispatches_to_shards(built, capsys):
    from medssl.cli import medssl_main

    assert medssl_main(["shards", "info", str(built)]) == 0
    assert "stored spacing" in capsys.readouterr().out
    assert medssl_main(["nonsense"]) == 2
