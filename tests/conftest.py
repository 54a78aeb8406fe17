"""Shared fixtures: one small synthetic phantom dataset and its shard set, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids thread hand-off costs on small CPUs (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """Six small CT phantoms (nnU-Net v2 layout), mixed RAS/LPS affines and anisotropic spacing."""
    from medssl.shards.synth import synth_dataset

    out = tmp_path_factory.mktemp("phantoms")
    synth_dataset(out, n=6, seed=3, modality="CT", fov_scale=0.3, progress=False)
    return out


@pytest.fixture(scope="session")
def built(phantoms, tmp_path_factory):
    """The phantoms built into shards of a few samples each (so that shards hold uneven counts)."""
    from medssl.shards.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shards")
    build(BuildConfig(inputs=[str(phantoms)], shard_size="200k"), out, workers=2, progress=False)
    return out


def naive_trilinear(vol: np.ndarray, spacing, target) -> np.ndarray:
    """Reference resampler written independently of shards.preprocess: for every output voxel, the
    8-corner trilinear weights at position i * target / spacing (first voxel centres aligned, edges
    repeated), in float64."""
    shape_out = [max(1, int(round(n * s / t))) for n, s, t in zip(vol.shape, spacing, target)]
    grids = np.meshgrid(*[np.minimum(np.arange(n) * (t / s), m - 1)
                          for n, s, t, m in zip(shape_out, spacing, target, vol.shape)], indexing="ij")
    out = np.zeros(shape_out, dtype=np.float64)
    lo = [np.floor(g).astype(int) for g in grids]
    fr = [g - l for g, l in zip(grids, lo)]
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                idx = [np.minimum(l + d, m - 1) for l, d, m in zip(lo, (dx, dy, dz), vol.shape)]
                w = ((fr[0] if dx else 1 - fr[0]) * (fr[1] if dy else 1 - fr[1]) * (fr[2] if dz else 1 - fr[2]))
                out += w * vol[idx[0], idx[1], idx[2]]
    return out


def run_pretrain_2proc(recipe: str, shards, out, steps: int, *overrides: str, timeout: int = 900):
    """``recipe``'s tiny preset on 2 DeepSpeed CPU processes under torchrun, logging every step and checkpointing
    (and drawing) at the last; returns the run folder and its stdout + stderr, or fails with their tails."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medssl.pretrain",
           recipe, "--shards", str(shards), "--out", str(out), "--preset", "tiny", "--steps", str(steps),
           "--no-progress", "train.log_every=1", f"train.checkpoint_every={steps}", f"train.picture_every={steps}",
           "data.num_workers=1", *overrides]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, r.stdout + r.stderr


def two_sequence_mri_shards(raw: Path, out: Path, n: int, seed: int) -> Path:
    """``n`` MRI phantoms with two sequences each (nnU-Net ``_0000`` T1-like, ``_0001`` the same flipped at half scale:
    an unrelated intensity scale, so each channel gets its own window) in ``raw``, built into shards in ``out``."""
    import json

    import nibabel as nib

    from medssl.shards.build import BuildConfig, build
    from medssl.shards.synth import synth_dataset

    synth_dataset(raw, n=n, seed=seed, modality="MR", fov_scale=0.3, progress=False)
    for f in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        img = nib.load(str(f))
        second = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32)[::-1] * 0.5)
        nib.save(nib.Nifti1Image(second, img.affine), str(f).replace("_0000.nii.gz", "_0001.nii.gz"))
    desc = json.loads((raw / "dataset.json").read_text())
    desc["channel_names"] = {"0": "T1", "1": "T2"}
    (raw / "dataset.json").write_text(json.dumps(desc))
    build(BuildConfig(inputs=[str(raw)], shard_size="200k"), out, workers=1, progress=False)
    return out
