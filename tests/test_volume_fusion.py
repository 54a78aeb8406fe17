"""Volume Fusion: the fusion routines against naive references written here, the augmentation, and the task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.recipes.volume_fusion import (VolumeFusionConfig, augment_pair, box_labels, contrast_map, fuse,
                                          gamma_correction, grid_labels, random_resized_crops)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(4))
def test_grid_labels_tile_whole_blocks_and_fuse_the_expected_fraction(seed):
    size, k = (40, 36, 30), 4
    rec = {}
    lab = grid_labels(3, size, k, [5, 4, 6], [12, 10, 9], 0.7, _gen(seed), record=rec).numpy()
    assert lab.shape == (3, *size) and lab.min() >= 0 and lab.max() <= k
    for b in range(3):
        bs, nb, off = (rec[x][b].tolist() for x in ("block", "blocks", "offset"))
        assert all(5 <= bs[0] <= 12 and 4 <= bs[1] <= 10 and 6 <= bs[2] <= 9 for _ in [0])
        assert all(n == s // q for n, s, q in zip(nb, size, bs)) and all(0 <= o <= s % q for o, s, q in zip(off, size, bs))
        covered = np.zeros(size, dtype=bool)
        fused = 0
        for i in range(nb[0]):  # naive: walk every block
            for j in range(nb[1]):
                for m in range(nb[2]):
                    sl = tuple(slice(o + t * q, o + (t + 1) * q) for o, t, q in zip(off, (i, j, m), bs))
                    block = lab[b][sl]
                    assert (block == block.flat[0]).all(), "one class per block"
                    fused += int(block.flat[0] > 0)
                    covered[sl] = True
        assert fused == math.floor(0.7 * nb[0] * nb[1] * nb[2])
        assert (lab[b][~covered] == 0).all(), "margins outside the whole blocks stay background"


@pytest.mark.parametrize("seed", range(3))
def test_box_labels_match_a_naive_painter(seed):
    size, k = (24, 20, 16), 4
    rec = {}
    lab = box_labels(2, size, k, [2, 6], [1, 1, 1], [8, 8, 4], _gen(seed), record=rec).numpy()
    for b in range(2):
        ref = np.zeros(size, dtype=np.int64)
        for j in range(int(rec["n"][b])):  # later boxes overwrite earlier ones
            lo, hi = rec["lo"][b, j].tolist(), rec["hi"][b, j].tolist()
            ref[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = int(rec["cls"][b, j])
        assert np.array_equal(lab[b], ref)
        assert 2 <= int(rec["n"][b]) <= 6 and lab[b].max() <= k


def test_fuse_every_voxel():
    g = _gen(0)
    fg, bg = torch.rand(2, 1, 6, 5, 4, generator=g), torch.rand(2, 1, 6, 5, 4, generator=g)
    lab = torch.randint(0, 5, (2, 6, 5, 4), generator=g)
    out = fuse(fg, bg, lab, 4).numpy()
    f, b_, l_ = fg.numpy(), bg.numpy(), lab.numpy()
    for idx in np.ndindex(l_.shape):
        a = l_[idx] / 4
        assert out[idx[0], 0, idx[1], idx[2], idx[3]] == pytest.approx(a * f[idx[0], 0, idx[1], idx[2], idx[3]]
                                                                        + (1 - a) * b_[idx[0], 0, idx[1], idx[2], idx[3]], abs=1e-6)


def test_random_resized_crop_is_a_crop_then_a_resize():
    g = _gen(1)
    view = torch.rand(3, 1, 30, 28, 26, generator=g)
    assert torch.allclose(random_resized_crops(view, (30, 28, 26), [1.0, 1.0]), view, atol=1e-5), "scale 1 = identity"
    rec = {}
    out = random_resized_crops(view, (16, 16, 16), [0.7, 1.5], _gen(2), record=rec)
    for b in range(3):
        (c0, c1, c2), (o0, o1, o2) = rec["crop"][b].tolist(), rec["origin"][b].tolist()
        box = view[b:b + 1, :, o0:o0 + c0, o1:o1 + c1, o2:o2 + c2]
        ref = F.interpolate(box, size=(16, 16, 16), mode="trilinear", align_corners=False)
        assert torch.allclose(out[b:b + 1, :, 2:-2, 2:-2, 2:-2], ref[..., 2:-2, 2:-2, 2:-2], atol=1e-5)


def test_contrast_map_piecewise_reference():
    x = torch.linspace(-1, 1, 1001).view(1, 1, 1001, 1, 1)
    y = contrast_map(x, torch.tensor([1.0]), torch.tensor([99.0]))[0, 0, :, 0, 0].numpy()
    v = x.flatten().numpy()
    v0, v1 = v[10], v[990]  # 1st and 99th percentiles of 1001 evenly spaced values
    ref = np.where(v < v0, 0.1 * (v + 1) / (v0 + 1), np.where(v < v1, 0.1 + 0.8 * (v - v0) / (v1 - v0),
                                                              0.9 + 0.1 * (v - v1) / (1 - v1)))
    assert np.allclose(y, ref, atol=1e-5) and y.min() == 0.0 and y.max() == pytest.approx(1.0)


def _gamma_reference(x: np.ndarray, gammas) -> np.ndarray:
    """PyMIC ``intensity.gamma_correction`` sample by sample, with the given gammas."""
    out = x.copy()
    for b, g in enumerate(gammas):
        v_min, v_max = x[b].min(), x[b].max()
        if v_min < v_max:
            out[b] = np.power((x[b] - v_min) / (v_max - v_min), g) * (v_max - v_min) + v_min
    return out


def test_gamma_correction_within_each_samples_range():
    g = _gen(3)
    x = torch.rand(5, 1, 9, 8, 7, generator=g) * 0.8 + 0.1  # values in [0.1, 0.9], like contrast-mapped air at 0.1
    x[1] = x[1] * 3 - 2  # another range, negative values included
    x[2] = 0.1  # constant: left unchanged
    x[3, 0, :4] = 0.1  # a floor at 0.1 (many voxels at the minimum) stays at 0.1
    gammas = torch.tensor([0.7, 1.5, 1.2, 0.9, 1.0])
    out = gamma_correction(x, gammas)
    ref = _gamma_reference(x.numpy().astype(np.float64), gammas.tolist())
    assert np.allclose(out.numpy(), ref, atol=1e-5)
    assert torch.equal(out[2], x[2]) and (out[3, 0, :4] == 0.1).all()
    assert torch.equal(out.flatten(1).min(1).values, x.flatten(1).min(1).values)
    assert torch.allclose(out.flatten(1).max(1).values, x.flatten(1).max(1).values)
    assert torch.allclose(out[4], x[4]) and not torch.allclose(out[0], x[0])


def test_augment_pair_keeps_the_contrast_maps_range():
    """Gamma works inside each view's [min, max]: without flips and inversion, the view's range after the contrast
    map (here floored at 0.1, as when the low percentile lies at the minimum) survives the gamma step."""
    cfg = VolumeFusionConfig(flip_prob=0.0, invert_prob=0.0, out_range=[0.0, 1.0], p0=[0.1, 2.0])
    x = torch.rand(4, 1, 12, 12, 12, generator=_gen(4))
    x[:, :, :6] = 0.0  # half of each view at its minimum: the low percentile is the minimum → mapped to 0.1
    fg, bg = augment_pair(x, x.clone(), cfg, _gen(5))
    for v in (fg, bg):
        assert torch.allclose(v.flatten(1).min(1).values, torch.full((4,), 0.1))
        assert torch.allclose(v.flatten(1).max(1).values, torch.ones(4))


# ----------------------------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def task():
    from medssl.pretrain.config import load_config
    from medssl.pretrain.train import build_task

    torch.manual_seed(0)
    return build_task(load_config("volume_fusion", [], "tiny"))


@pytest.mark.parametrize("variant", ["grid", "batch"])
def test_task_inputs_obey_the_fusion_rule_and_train(task, variant):
    task.cfg.variant = variant
    view = torch.rand(3, 1, 48, 48, 48, generator=_gen(5))
    x, lab, fg, bg = task.make_inputs(view, _gen(6))
    assert x.shape == (3, 1, 32, 32, 32) and lab.shape == (3, 32, 32, 32)
    assert int(lab.min()) >= 0 and int(lab.max()) <= task.cfg.fusion_classes and (lab > 0).any()
    a = lab.numpy()[:, None] / task.cfg.fusion_classes
    assert np.allclose(x.numpy(), a * fg.numpy() + (1 - a) * bg.numpy(), atol=1e-6)
    lo, hi = task.cfg.out_range
    assert float(fg.min()) >= lo - 1e-6 and float(fg.max()) <= hi + 1e-6
    out = task({"image": view})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in task.parameters() if p.requires_grad)
    task.zero_grad()
    task.cfg.variant = "grid"


def test_the_default_decoder_is_fmunets(task):
    from medssl.pretrain.backbones.resenc3d import FMUNetDecoder3D
    from medssl.pretrain.config import load_config

    assert VolumeFusionConfig().decoder == "fmunet" and load_config("volume_fusion", [], None).task.decoder == "fmunet"
    assert isinstance(task.decoder, FMUNetDecoder3D) and task.decoder.registry_name == "fmunet"
    assert task.decoder.out_channels == task.cfg.fusion_classes + 1 == 5
    assert task.export_components() == {"decoder": task.decoder}


def test_bad_task_settings_are_refused():
    from medssl.pretrain.backbones import build_backbone
    from medssl.recipes.volume_fusion import VolumeFusion

    bb = build_backbone("resenc3d_tiny", img_size=[32] * 3)
    with pytest.raises(ValueError, match="variant"):
        VolumeFusion(bb, VolumeFusionConfig(variant="boxes"))
    with pytest.raises(ValueError, match="deepest stride 16"):
        VolumeFusion(bb, VolumeFusionConfig(patch_size=[40, 40, 40]))
    with pytest.raises(ValueError, match="block_min"):
        VolumeFusion(bb, VolumeFusionConfig(patch_size=[32, 32, 32], block_min=[40, 4, 4], block_max=[48, 8, 8]))


def test_reconstruct_picture(task, tmp_path):
    rgb = task.reconstruct({"image": torch.rand(2, 1, 48, 48, 48)}, tmp_path / "p.png")
    assert rgb.ndim == 3 and (tmp_path / "p.png").stat().st_size > 1000
