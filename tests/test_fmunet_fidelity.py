"""``resenc3d`` + the ``fmunet`` decoder against MIS-FM's FMUNet: parameter counts (in total and part by part) and
each decoder level's shape, measured from the official class."""

from __future__ import annotations

import pytest
import torch

from medssl.pretrain.backbones import build_backbone
from medssl.pretrain.backbones.resenc3d import FMUNetDecoder3D
from medssl.pretrain.registry import DECODERS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Measured from the official class: openmedlab/MIS-FM net/fmunet.py at 1506d6591a3083575b59b53b88210a110a0a4a36,
# copied outside the repo with `from pymic.net.net_init import …` stubbed, FMUNet({in_chns 1, class_num 5 (K + 1),
# and demo/fmunet_pretrain.cfg's [network]: feature_chns [32, 64, 128, 256, 512], dropout 0.2, depth 2, res_mode 0,
# multiscale_pred False}). FMUNet builds 4 out_layers, but forward() calls out_layers[1:] (deep supervision) only
# when multiscale_pred is True: with False they never see data, so they are excluded.
FMUNET_ALL = 47_371_572  # every parameter of the class
FMUNET_UNUSED_HEADS = 61_391  # out_layers[1], [2], [3]: 8,773 + 17,541 + 35,077
FMUNET_USED = 47_310_181
FMUNET_PROJECT_ENCODER = 23_564_864  # project 896 + encoder 23,563,968
FMUNET_DECODER = 23_740_928
FMUNET_OUT0 = 4_389  # out_layers[0]: InstanceNorm(32) + Conv 3³ 32 → 5
FMUNET_DECODER_PARTS = {"de_conv4": 14_158_848, "upcat3": 3_672_576, "de_conv3": 3_540_480, "upcat2": 918_784,
                        "de_conv2": 885_504, "upcat1": 230_016, "de_conv1": 221_568, "upcat0": 57_664,
                        "de_conv0": 55_488}
# decoder outputs for a [1, 1, 96, 96, 96] input, finest first: x0_de … x3_de, then de_conv4(x4); logits
FMUNET_LEVELS_96 = [(1, 32, 96, 96, 96), (1, 64, 48, 48, 48), (1, 128, 24, 24, 24), (1, 256, 12, 12, 12),
                    (1, 512, 6, 6, 6)]
FMUNET_LOGITS_96 = (1, 5, 96, 96, 96)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_pair():
    with torch.device("meta"):
        enc = build_backbone("resenc3d", img_size=96)
        dec = DECODERS.build("fmunet", feature_channels=enc.feature_channels, feature_strides=enc.feature_strides,
                             out_channels=5)
    return enc, dec


def test_the_constants_add_up():
    assert FMUNET_USED == FMUNET_ALL - FMUNET_UNUSED_HEADS == FMUNET_PROJECT_ENCODER + FMUNET_DECODER + FMUNET_OUT0
    assert sum(FMUNET_DECODER_PARTS.values()) == FMUNET_DECODER


def test_parameter_count_is_fmunets(meta_pair):
    enc, dec = meta_pair
    assert isinstance(dec, FMUNetDecoder3D)
    assert count(enc) + count(dec) == FMUNET_USED
    assert count(enc) == FMUNET_PROJECT_ENCODER
    assert count(dec) - count(dec.head) == FMUNET_DECODER
    assert count(dec.head) == FMUNET_OUT0
    # level by level: de_conv4 = bottleneck, upcat_i = up + fuse, de_conv_i = blocks
    assert count(dec.bottleneck) == FMUNET_DECODER_PARTS["de_conv4"]
    for i, level in enumerate(dec.levels):
        assert count(level.up) + count(level.fuse) == FMUNET_DECODER_PARTS[f"upcat{i}"], i
        assert count(level.blocks) == FMUNET_DECODER_PARTS[f"de_conv{i}"], i


def test_level_shapes_are_fmunets(meta_pair):
    """96³ on the meta device (shapes only), and a real CPU forward at 32³ (every side / 3; the smallest
    input whose deepest level keeps more than one voxel for InstanceNorm)."""
    enc, dec = meta_pair
    feats = enc.forward_features(torch.empty(1, 1, 96, 96, 96, device="meta"))
    assert [tuple(y.shape) for y in dec.forward_levels(feats)] == FMUNET_LEVELS_96
    assert tuple(dec(feats).shape) == FMUNET_LOGITS_96

    torch.manual_seed(0)
    enc = build_backbone("resenc3d", img_size=32).eval()
    dec = DECODERS.build("fmunet", enc.feature_channels, enc.feature_strides, 5).eval()
    with torch.no_grad():
        feats = enc(torch.randn(1, 1, 32, 32, 32))
        levels, logits = dec.forward_levels(feats), dec(feats)
    assert [tuple(y.shape) for y in levels] == [s[:2] + tuple(v // 3 for v in s[2:]) for s in FMUNET_LEVELS_96]
    assert logits.shape == (1, 5, 32, 32, 32) and torch.isfinite(logits).all()


def test_layout_is_fmunets(meta_pair):
    """Units as ResConv (pre-activation, one conv, identity skip), dropout 0.2 on the three deepest levels only, a 3³
    fuse conv after the concatenation, a 1×1 up conv, a 3³ head."""
    _, dec = meta_pair
    drops = [[m.p for m in part.modules() if isinstance(m, torch.nn.Dropout)]
             for part in [*(lv.blocks for lv in dec.levels), dec.bottleneck]]
    assert drops == [[], [], [0.2] * 2, [0.2] * 2, [0.2] * 2]
    assert not any(isinstance(m, torch.nn.Dropout) for lv in dec.levels for m in (*lv.up.modules(), *lv.fuse.modules()))
    unit = dec.levels[0].blocks[0]
    assert len(unit.layers) == 1 and isinstance(unit.skip, torch.nn.Identity)
    assert [n for n, _ in unit.layers[0].named_children()] == ["norm", "act", "drop", "conv"]
    assert dec.levels[0].up.conv.kernel_size == (1, 1, 1) and dec.levels[0].fuse.conv.kernel_size == (3, 3, 3)
    assert dec.levels[2].fuse.conv.in_channels == 256 and dec.levels[2].fuse.conv.out_channels == 128
    assert dec.head.conv.kernel_size == (3, 3, 3) and dec.head.norm.num_features == 32
