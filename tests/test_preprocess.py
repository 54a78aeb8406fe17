"""Build-time geometry: reorientation matches nibabel, resampling matches a naive trilinear reference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medssl.shards.preprocess import parse_spacing, reorient_ras, resample, resampled_shape, scale_affine

from .conftest import naive_trilinear


@pytest.mark.parametrize("affine", [
    np.diag([0.8, 0.8, 3.0, 1.0]),  # RAS
    np.diag([-0.7, -0.7, 2.5, 1.0]),  # LPS
    np.array([[0, 0, -2.0, 10], [0.9, 0, 0, -5], [0, -0.9, 0, 3], [0, 0, 0, 1]]),  # permuted + flipped
])
def test_reorient_matches_nibabel_canonical(affine):
    data = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    ours, our_aff = reorient_ras(data[None], affine)
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(ours[0], np.asarray(ref.dataobj))
    np.testing.assert_allclose(our_aff, ref.affine, atol=1e-9)
    assert "".join(nib.aff2axcodes(our_aff)) == "RAS"


@pytest.mark.parametrize("spacing,target", [((0.7, 0.8, 3.0), (1.5, 1.5, 1.5)), ((2.0, 1.0, 1.0), (1.0, 1.5, 0.6))])
def test_resample_matches_naive_trilinear(spacing, target):
    vol = np.random.default_rng(1).integers(-1000, 1500, (23, 17, 9)).astype(np.float32)
    ours = resample(vol[None], spacing, target, order=1)[0]
    ref = naive_trilinear(vol.astype(np.float64), spacing, target)
    assert ours.shape == ref.shape == resampled_shape(vol.shape, spacing, target)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_nearest_resampling_keeps_label_values():
    lab = np.random.default_rng(2).integers(0, 5, (10, 11, 4)).astype(np.uint8)
    out = resample(lab[None], (0.8, 0.8, 3.0), (1.5, 1.5, 1.5), order=0)[0]
    assert out.dtype == np.uint8 and set(np.unique(out)) <= set(np.unique(lab))
    # nearest neighbour: output voxel i takes input voxel round(i * t / s)
    i, j, k = 3, 4, 5
    src = [min(int(np.floor(v * t / s + 0.5)), n - 1) for v, t, s, n in zip((i, j, k), (1.5,) * 3, (0.8, 0.8, 3.0), lab.shape)]
    assert out[i, j, k] == lab[tuple(src)]


def test_scaled_affine_keeps_first_voxel_and_new_spacing():
    aff = np.diag([0.7, 0.7, 3.0, 1.0])
    aff[:3, 3] = [-50, 20, 7]
    new = scale_affine(aff, (0.7, 0.7, 3.0), (1.5, 1.5, 1.5))
    np.testing.assert_allclose(new[:3, 3], aff[:3, 3])
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), [1.5, 1.5, 1.5])


def test_parse_spacing():
    assert parse_spacing("1.5") == (1.5, 1.5, 1.5)
    assert parse_spacing("0.8,0.8,2") == (0.8, 0.8, 2.0)
    assert parse_spacing("native") is None
    with pytest.raises(ValueError):
        parse_spacing("1,2")
