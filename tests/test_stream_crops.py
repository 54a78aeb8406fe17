"""Crop centres and intensity jitter of the stream, as the official Hi-End-MAE data pipeline: MONAI's
RandCropByPosNegLabeld with the image as label (negatives centred on background), RandScaleIntensityd and
RandShiftIntensityd (factors / offsets 0.1, p 0.1) after the window."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medssl import shards
from medssl.shards.crops import body_points, intensity_jitter, sample_origins

SHAPE, CROP = (128, 128, 128), np.array([16, 16, 16])
LO, HI = 32, 96  # the foreground block [32, 96)^3, aligned with the stride-4 grid


def _block(channels: int = 1) -> np.ndarray:
    vol = np.zeros((channels, *SHAPE), np.float32)
    vol[0, LO:HI, LO:HI, LO:HI] = 1.0
    return vol


def _centres(origins: np.ndarray) -> np.ndarray:
    return origins + CROP // 2  # MONAI's crop centre: origin + size // 2


def _on_fg(vol: np.ndarray, origins: np.ndarray, thr=0.5) -> np.ndarray:
    c = _centres(origins)
    t = np.asarray(thr, np.float64).reshape(-1, 1) if np.ndim(thr) else thr
    return (vol[:, c[:, 0], c[:, 1], c[:, 2]] > t).any(axis=0)


def test_body_points_split_the_strided_grid_into_foreground_and_background():
    vol = _block()
    fg, bg = body_points(vol, 0.5)
    assert len(fg) == (64 // 4) ** 3 and len(fg) + len(bg) == (128 // 4) ** 3
    assert (vol[0, fg[:, 0], fg[:, 1], fg[:, 2]] == 1).all() and (vol[0, bg[:, 0], bg[:, 1], bg[:, 2]] == 0).all()
    # several channels: background is below the threshold in every channel
    two = _block(2)
    two[1, :16] = 5.0  # a second channel bright where the first is dark
    fg2, bg2 = body_points(two, np.array([0.5, 4.0]))
    assert len(fg2) == len(fg) + 4 * 32 * 32 and not (bg2[:, 0] < 16).any()


def test_negative_crops_are_centred_on_background_and_positive_crops_on_foreground():
    vol = _block()
    fg, bg = body_points(vol, 0.5)
    rng = np.random.default_rng(0)
    neg = sample_origins(SHAPE, CROP, fg, 0.0, 500, rng, bg=bg)
    pos = sample_origins(SHAPE, CROP, fg, 1.0, 500, rng, bg=bg)
    # the cells of the grid are either all block or all background, and clipping only moves edge centres
    # (< 8 or > 120) inward, still in the background: so every centre voxel is of its kind
    assert not _on_fg(vol, neg).any(), "negatives centred on background (uniform origins hit the block ~18 %)"
    assert _on_fg(vol, pos).all()
    for o in (neg, pos):
        assert (o >= 0).all() and (o <= np.array(SHAPE) - CROP).all(), "crops lie inside the volume"
    # negatives are uniform over the background points: both sides of the block are visited, in proportion
    below = np.mean(_centres(neg)[:, 0] < LO)
    assert abs(below - np.mean(bg[:, 0] < LO)) < 0.08
    # deterministic from the generator
    again = sample_origins(SHAPE, CROP, fg, 0.0, 500, np.random.default_rng(0), bg=bg)
    np.testing.assert_array_equal(again, neg)


def test_per_channel_thresholds_place_negatives_below_every_channel():
    two = _block(2)
    two[1, :, :, :24] = 5.0  # channel 1 bright in a slab the block does not reach
    thr = np.array([0.5, 4.0])
    fg, bg = body_points(two, thr)
    neg = sample_origins(SHAPE, CROP, fg, 0.0, 300, np.random.default_rng(1), bg=bg)
    assert not _on_fg(two, neg, thr).any()


def test_without_background_negatives_fall_back_to_foreground_and_the_reverse():
    fg, bg = body_points(np.ones((1, 32, 32, 32), np.float32), 0.5)
    assert len(bg) == 0 and len(fg) == 8 ** 3
    vol = _block()
    small_fg = body_points(vol, 0.5)[0][:20]  # a corner of the block
    rng = np.random.default_rng(2)
    org = sample_origins(SHAPE, CROP, small_fg, 0.0, 200, rng, bg=np.zeros((0, 3), np.int64))
    assert _on_fg(vol, org).all(), "no background: every crop centred on foreground (MONAI sets pos_ratio 1)"
    c = _centres(org)
    assert (c.min(0) >= small_fg.min(0)).all() and (c.max(0) < small_fg.max(0) + 4).all()
    bg = body_points(vol, 0.5)[1]
    org = sample_origins(SHAPE, CROP, np.zeros((0, 3), np.int64), 1.0, 200, rng, bg=bg)
    assert not _on_fg(vol, org).any(), "no foreground: every crop centred on background"
    none = np.zeros((0, 3), np.int64)
    org = sample_origins(SHAPE, CROP, none, 0.5, 200, rng, bg=none)
    assert (org >= 0).all() and (org <= np.array(SHAPE) - CROP).all() and len(np.unique(org[:, 0])) > 20


@pytest.mark.parametrize("pos_fraction", [0.25, 0.75])
def test_the_share_of_positive_crops_is_pos_fraction(pos_fraction):
    vol = _block()
    fg, bg = body_points(vol, 0.5)
    n = 4000
    share = _on_fg(vol, sample_origins(SHAPE, CROP, fg, pos_fraction, n, np.random.default_rng(3), bg=bg)).mean()
    # binomial sd <= 0.007; uniform negatives would add ~0.18 x (1 - pos_fraction): 0.79 / 0.39
    assert abs(share - pos_fraction) < 0.025


def _naive_jitter(x: np.ndarray, rng: np.random.Generator, p: float, s: float, o: float) -> np.ndarray:
    """RandScaleIntensity then RandShiftIntensity, written out: draw, maybe scale; draw, maybe shift (float64)."""
    y = x.astype(np.float64)
    if rng.random() < p:
        y = y * (1.0 + rng.uniform(-s, s))
    if rng.random() < p:
        y = y + rng.uniform(-o, o)
    return y


def test_intensity_jitter_matches_monai_written_out():
    crops = np.random.default_rng(4).random((50, 1, 6, 6, 6), dtype=np.float32)
    mine, ref = np.random.default_rng(5), np.random.default_rng(5)
    changed = 0
    for x in crops:
        got, factor, offset = intensity_jitter(x.copy(), mine, 0.5, 0.1, 0.2)
        want = _naive_jitter(x, ref, 0.5, 0.1, 0.2)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got, x * np.float32(factor) + np.float32(offset), rtol=1e-6, atol=1e-7)
        assert 0.9 <= factor <= 1.1 and -0.2 <= offset <= 0.2
        changed += (factor != 1.0) + (offset != 0.0)
    assert 25 < changed < 75, "each of the two transforms applied to about half of the crops"
    assert mine.random() == ref.random(), "the same number of draws as MONAI's two transforms"
    x = crops[0].copy()
    got, factor, offset = intensity_jitter(x, np.random.default_rng(6), 0.0, 0.1, 0.1)
    assert (factor, offset) == (1.0, 0.0) and np.array_equal(got, crops[0])


KW = dict(crop_size=(20, 20, 16), crops_per_volume=2, batch_size=2, num_workers=0, pool_size=2, shuffle_buffer=1,
          rank=0, world_size=1, seed=7)


def test_the_stream_jitters_each_training_crop_by_an_affine_map(built):
    plain = list(itertools.islice(shards.stream(built, **KW), 6))
    jit = list(itertools.islice(shards.stream(built, **KW, intensity_prob=1.0), 6))
    factors = []
    for p, j in zip(plain, jit):
        assert p["key"] == j["key"] and np.array_equal(p["origin"].numpy(), j["origin"].numpy())
        assert (p["intensity"].numpy() == [1.0, 0.0]).all()
        for i in range(len(p["key"])):
            a, b = j["intensity"][i].numpy()
            factors.append((a, b))
            x, y = p["image"][i].numpy(), j["image"][i].numpy()
            np.testing.assert_array_equal(y, x * np.float32(a) + np.float32(b))
            # the map is found from the voxels alone too (least squares), not only from the recorded values
            fit = np.polyfit(x.ravel().astype(np.float64), y.ravel().astype(np.float64), 1)
            np.testing.assert_allclose(fit, [a, b], atol=1e-5)
    factors = np.array(factors)
    assert (np.abs(factors[:, 0] - 1) <= 0.1).all() and (np.abs(factors[:, 1]) <= 0.1).all()
    assert len(np.unique(factors[:, 0])) == len(factors), "one draw per crop"


def test_no_jitter_in_eval_mode_or_at_prob_0(built):
    kw = {**KW, "mode": "eval"}
    plain = list(shards.stream(built, **kw))
    jit = list(shards.stream(built, **kw, intensity_prob=1.0))
    assert len(plain) == len(jit) > 0
    for p, j in zip(plain, jit):
        np.testing.assert_array_equal(p["image"].numpy(), j["image"].numpy())
        assert (j["intensity"].numpy() == [1.0, 0.0]).all()
    a = next(iter(shards.stream(built, **KW, intensity_prob=0.0, intensity_scale=0.5)))
    b = next(iter(shards.stream(built, **KW)))
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
    with pytest.raises(ValueError, match="intensity_prob"):
        shards.stream(built, **KW, intensity_prob=1.5)


def test_a_jittered_stream_resumes_exactly(built):
    kw = {**KW, "intensity_prob": 0.5, "flip_prob": 0.5, "pos_fraction": 0.5}
    full = list(itertools.islice(shards.stream(built, **kw), 7))
    first = shards.stream(built, **kw)
    head = list(itertools.islice(first, 3))
    resumed = shards.stream(built, **kw)
    resumed.load_state_dict(first.state_dict())
    tail = list(itertools.islice(resumed, 4))
    assert any((b["intensity"].numpy() != [1.0, 0.0]).any() for b in full)
    for x, y in zip(full, head + tail):
        assert x["key"] == y["key"]
        for name in ("origin", "intensity", "image"):
            np.testing.assert_array_equal(x[name].numpy(), y[name].numpy())


def test_finetune_negative_crops_are_centred_on_label_0(one_thread):
    from types import SimpleNamespace

    from medssl.finetune.data import Case, CropSampler, _background_centre
    from medssl.shards.crops import Window

    label = np.zeros((64, 64, 64), np.uint8)
    label[16:48, 16:48, 16:48] = 1  # 1/8 of the volume: uniform centres (within [8, 56]) land in it ~25 % of the time
    image = np.where(label > 0, 40, -1000).astype(np.int16)[None]
    case = Case("c", image, label, {"modality": "CT"}, None, np.argwhere(label[::2, ::2, ::2] > 0) * 2)
    data = SimpleNamespace(crop_size=[16, 16, 16], pos=0, neg=1, crops_per_volume=4, flip_prob=0.0, rot90_prob=0.0,
                           intensity_prob=0.0, pos_centres="voxels")
    sampler = CropSampler([case], Window(), SimpleNamespace(data=data), batch=40, seed=0)
    centre = next(iter(sampler))["label"][:, 0, 8, 8, 8].numpy()
    assert (centre == 0).all(), "negatives centred on background (uniform centres hit the organ)"
    data.pos, data.neg = 1, 0
    assert (next(iter(sampler))["label"][:, 0, 8, 8, 8].numpy() == 1).all()
    # uniform over the label-0 voxels, also when background is scarce (the exact list after the rejection draws)
    rng = np.random.default_rng(0)
    draws = np.array([_background_centre(label[None], rng) for _ in range(2000)])
    assert (label[tuple(draws.T)] == 0).all() and abs(np.mean(draws[:, 0] < 16) - 0.25 / 0.875) < 0.04
    scarce = np.ones((1, 20, 20, 20), np.uint8)
    scarce[0, 3, 4, 5] = scarce[0, 10, 2, 7] = 0
    got = {tuple(_background_centre(scarce, rng)) for _ in range(40)}
    assert got == {(3, 4, 5), (10, 2, 7)}
    assert _background_centre(np.ones((1, 4, 4, 4), np.uint8), rng) is None


def test_finetune_class_centres_see_small_organs_as_often_as_large(one_thread):
    """data.pos_centres=classes: each class present is a crop centre equally often (RandCropByLabelClassesd with
    equal ratios); the official voxels mode draws centres in proportion to the classes' volumes."""
    from types import SimpleNamespace

    from medssl.finetune.data import Case, CropSampler
    from medssl.shards.crops import Window

    label = np.zeros((64, 64, 64), np.uint8)
    label[8:56, 8:56, 8:40] = 1  # a large organ: 73,728 voxels
    label[44:52, 44:52, 48:56] = 2  # a small one: 512 voxels, ~0.7 % of the foreground
    image = np.where(label > 0, 40, -1000).astype(np.int16)[None]
    case = Case("c", image, label, {"modality": "CT"}, None, np.argwhere(label[::2, ::2, ::2] > 0) * 2)
    data = SimpleNamespace(crop_size=[8, 8, 8], pos=1, neg=0, crops_per_volume=4, flip_prob=0.0, rot90_prob=0.0,
                           intensity_prob=0.0, pos_centres="classes")
    centres = next(iter(CropSampler([case], Window(), SimpleNamespace(data=data), batch=400, seed=0)))["label"]
    small = (centres[:, 0, 4, 4, 4] == 2).float().mean().item()
    assert 0.4 < small < 0.6, small
    assert set(centres[:, 0, 4, 4, 4].unique().tolist()) == {1, 2}
    data.pos_centres = "voxels"
    centres = next(iter(CropSampler([case], Window(), SimpleNamespace(data=data), batch=400, seed=0)))["label"]
    assert (centres[:, 0, 4, 4, 4] == 2).float().mean().item() < 0.05
