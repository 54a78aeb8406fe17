"""``resenc3d`` and its ``fmunet`` / ``unet3d`` decoders: contract 2 (features, strides, channels), a parameter
count done by hand, the pre-activation order, He init, rebuilding from ``config``, the decoders' class heads,
constructor messages and the registries (FMUNet's own counts and shapes: tests/test_fmunet_fidelity.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medssl.pretrain.backbones import BACKBONES, build_backbone
from medssl.pretrain.backbones.resenc3d import FMUNetDecoder3D, PreActResBlock3d, ResEnc3D, UNetDecoder3D
from medssl.pretrain.registry import DECODERS

SIZES = {"resenc3d": ([32, 64, 128, 256, 512], 2), "resenc3d_tiny": ([8, 16, 32, 64, 128], 1)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unet_pair(out_channels=5, decoder="unet3d", **kw):
    torch.manual_seed(0)
    enc = build_backbone("resenc3d_tiny", img_size=32, **kw)
    dec = DECODERS.build(decoder, feature_channels=enc.feature_channels, feature_strides=enc.feature_strides,
                         out_channels=out_channels)
    return enc, dec


def test_sizes_are_registered():
    assert sorted(SIZES) == [n for n in BACKBONES.names() if n.startswith("resenc3d")]
    assert DECODERS.get("unet3d") is UNetDecoder3D and DECODERS.get("fmunet") is FMUNetDecoder3D


@pytest.mark.parametrize("name", sorted(SIZES))
def test_features_shapes_and_strides(name):
    """One feature per level at strides 1, 2, 4, 8, 16 (full size on the meta device, tiny on CPU)."""
    chans, blocks = SIZES[name]
    device = "meta" if name == "resenc3d" else "cpu"
    with torch.device(device):
        m = build_backbone(name, img_size=(32, 64, 48))
        x = torch.randn(2, 1, 32, 64, 48)
        feats = m.forward_features(x)
        assert len(m(x)) == 5
    assert m.feature_channels == chans and m.feature_strides == [1, 2, 4, 8, 16]
    assert [len(s.blocks) for s in m.stages] == [blocks] * 5
    for f, c, s in zip(feats, m.feature_channels, m.feature_strides):
        assert f.shape == (2, c, 32 // s, 64 // s, 48 // s)
    assert m.no_weight_decay() == set()


def test_parameter_count_by_hand():
    """Level 1 of resenc3d counted by hand: pre-activated strided conv 32→64 and 2 single-conv units of 64
    (FMUNet's layout); the 2-conv blocks are counted too."""
    with torch.device("meta"):
        m = build_backbone("resenc3d", convs_per_block=2)
        fmunet = build_backbone("resenc3d")  # the registered default: 2 single-conv residual units per level
    n = {k: v.numel() for k, v in m.named_parameters()}
    down = (32 + 32) + 32 * 64 * 27 + 64  # InstanceNorm(32) weight + bias, conv weight, conv bias
    unit = (64 + 64) + 64 * 64 * 27 + 64  # InstanceNorm(64), conv 3³ 64→64
    assert sum(v for k, v in n.items() if k.startswith("stages.1.")) == down + 2 * 2 * unit == 498_560

    def total(chans, blocks, convs=2, in_chans=1):
        count = in_chans * chans[0] * 27 + chans[0]  # stem
        for i, c in enumerate(chans):
            if i:
                count += 2 * chans[i - 1] + chans[i - 1] * c * 27 + c
            count += blocks * convs * (2 * c + 27 * c * c + c)
        return count

    print(f"resenc3d: {sum(n.values()):,} parameters")
    assert sum(n.values()) == total([32, 64, 128, 256, 512], 2) == 42_426_752
    assert sum(p.numel() for p in build_backbone("resenc3d_tiny").parameters()) == total(*SIZES["resenc3d_tiny"])
    assert total(*SIZES["resenc3d_tiny"]) == 1_474_448
    assert sum(p.numel() for p in fmunet.parameters()) == total([32, 64, 128, 256, 512], 2, convs=1) == 23_564_864


def test_blocks_are_pre_activation():
    """norm → act → dropout → conv inside every branch: the branch ignores a per-channel affine change of its
    input (InstanceNorm comes first), and a block whose last conv is zero with bias b returns x + b (conv last)."""
    torch.manual_seed(0)
    m = build_backbone("resenc3d_tiny").eval()
    block = m.stages[1].blocks[0]
    assert [n for n, _ in block.layers[0].named_children()] == ["norm", "act", "drop", "conv"]
    assert isinstance(block.layers[0].norm, torch.nn.InstanceNorm3d) and block.layers[0].norm.affine
    assert block.layers[0].act.negative_slope == 0.01 and isinstance(block.skip, torch.nn.Identity)
    x = torch.randn(2, 16, 8, 8, 8)
    scale, shift = torch.rand(2, 16, 1, 1, 1) * 3 + 0.5, torch.randn(2, 16, 1, 1, 1) * 5
    with torch.no_grad():
        branch = block(x) - x
        moved = scale * x + shift
        torch.testing.assert_close(block(moved) - moved, branch, atol=1e-3, rtol=1e-3)
        assert branch.abs().mean() > 0.1
        block.layers[-1].conv.weight.zero_()
        block.layers[-1].conv.bias.copy_(torch.arange(16.0))
        torch.testing.assert_close(block(x), x + torch.arange(16.0).view(1, 16, 1, 1, 1))
    # the strided downsampling is pre-activated too; channels that change get a 1×1 projection
    assert [n for n, _ in m.stages[2].down.named_children()] == ["norm", "act", "drop", "conv"]
    assert m.stages[2].down.conv.stride == (2, 2, 2) and not hasattr(m.stages[0], "down")
    proj = PreActResBlock3d(16, 8)
    assert isinstance(proj.skip, torch.nn.Conv3d) and proj.skip.kernel_size == (1, 1, 1)
    assert proj(torch.randn(1, 16, 4, 4, 4)).shape == (1, 8, 4, 4, 4)


def test_dropout_at_deep_levels_only():
    m = build_backbone("resenc3d_tiny")
    drops = [[mod.p for mod in s.modules() if isinstance(mod, torch.nn.Dropout)] for s in m.stages]
    assert drops == [[], [], [0.2] * 2, [0.2] * 2, [0.2] * 2]  # 1 block × 2 convs
    assert m.config["dropout"] == [0.0, 0.0, 0.2, 0.2, 0.2]
    assert build_backbone("resenc3d_tiny", channels=[8, 16, 32]).config["dropout"] == [0.0, 0.0, 0.2]


def test_he_init():
    torch.manual_seed(0)
    m = build_backbone("resenc3d_tiny")
    sd = m.state_dict()
    assert all(sd[k].abs().sum() == 0 for k in sd if k.endswith("bias"))
    assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in sd if k.endswith("norm.weight"))
    w = m.stages[4].blocks[0].layers[0].conv.weight  # [128, 128, 3, 3, 3]: fan_out = 128·27
    expected = math.sqrt(2 / (1 + 0.01**2)) / math.sqrt(128 * 27)
    assert abs(w.std().item() / expected - 1) < 0.02


@pytest.mark.parametrize("name", sorted(SIZES))
def test_rebuild_from_config(name):
    with torch.device("meta"):
        m = build_backbone(name, img_size=(64, 32, 48), in_chans=2)
        cfg = json.loads(json.dumps(m.config))  # as in the export manifest
        again = build_backbone(name, **cfg)
    assert cfg["img_size"] == [64, 32, 48] and cfg["in_chans"] == 2 and again.config == m.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert again.stem.weight.shape[1] == 2


def _three_and_five_classes(name: str, cls):
    """A decoder for 3 and one for 5 classes on the same features: logits at full resolution, same keys; their
    state dicts and the 5-class decoder."""
    enc, dec3 = unet_pair(3, name)
    dec5 = cls(enc.feature_channels, enc.feature_strides, out_channels=5)
    with torch.no_grad():
        feats = enc(torch.randn(2, 1, 32, 32, 32))
        assert dec3(feats).shape == (2, 3, 32, 32, 32) and dec5(feats).shape == (2, 5, 32, 32, 32)
    s3, s5 = dec3.state_dict(), dec5.state_dict()
    assert set(s3) == set(s5)
    return s3, s5, dec5


def test_decoder_output_and_class_head():
    """Logits at full resolution; only ``head.*`` depends on the number of classes."""
    s3, s5, dec5 = _three_and_five_classes("unet3d", UNetDecoder3D)
    differ = {k for k in s3 if s3[k].shape != s5[k].shape}
    assert differ == {"head.weight", "head.bias"}
    assert s5["head.weight"].shape == (5, 8, 1, 1, 1)
    # rebuild from config
    cfg = json.loads(json.dumps(dec5.config))
    assert cfg == {"feature_channels": [8, 16, 32, 64, 128], "feature_strides": [1, 2, 4, 8, 16], "out_channels": 5,
                   "blocks_per_level": 1, "dropout": [0.0] * 5, "convs_per_block": 2}
    for again in (UNetDecoder3D.from_config(cfg), DECODERS.build("unet3d", **cfg)):
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in s5.items()}


def test_decoder_fits_other_backbones():
    """Any features whose strides double: here strides 2, 4, 8 with odd widths and a non-cubic crop."""
    torch.manual_seed(0)
    dec = UNetDecoder3D([24, 40, 56], [2, 4, 8], out_channels=4, blocks_per_level=2, dropout=[0.0, 0.1, 0.1])
    feats = [torch.randn(1, 24, 16, 8, 4), torch.randn(1, 40, 8, 4, 2), torch.randn(1, 56, 4, 2, 1)]
    assert dec(feats).shape == (1, 4, 16, 8, 4)
    with pytest.raises(ValueError, match=r"feature_strides \[16, 16, 16, 16\] .*twice the previous.*UNETR"):
        UNetDecoder3D([96] * 4, [16] * 4, 2)
    with pytest.raises(ValueError, match=r"expects 3 features .*C = \[24, 40, 56\]"):
        dec(feats[:2])


def test_fmunet_decoder_output_and_class_head():
    """Logits at full resolution; only ``head.conv.*`` changes shape with the number of classes, and it is what
    fine-tuning re-initialises (the head's norm keeps its pretrained affine, as PyMIC loads what still fits)."""
    s3, s5, dec5 = _three_and_five_classes("fmunet", FMUNetDecoder3D)
    assert {k for k in s3 if s3[k].shape != s5[k].shape} == {"head.conv.weight", "head.conv.bias"}
    assert {k for k in s5 if k.startswith(dec5.head_prefix)} == {"head.conv.weight", "head.conv.bias"}
    assert s5["head.conv.weight"].shape == (5, 8, 3, 3, 3)
    cfg = json.loads(json.dumps(dec5.config))
    assert cfg == {"feature_channels": [8, 16, 32, 64, 128], "feature_strides": [1, 2, 4, 8, 16], "out_channels": 5,
                   "blocks_per_level": 2, "dropout": [0.0, 0.0, 0.2, 0.2, 0.2]}
    for again in (FMUNetDecoder3D.from_config(cfg), DECODERS.build("fmunet", **cfg)):
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in s5.items()}


def test_fmunet_decoder_fits_other_backbones():
    torch.manual_seed(0)
    dec = FMUNetDecoder3D([24, 40, 56], [2, 4, 8], out_channels=4, blocks_per_level=1, dropout=0.1).eval()
    feats = [torch.randn(1, 24, 16, 8, 4), torch.randn(1, 40, 8, 4, 2), torch.randn(1, 56, 4, 2, 2)]
    assert [tuple(y.shape) for y in dec.forward_levels(feats)] == [tuple(f.shape) for f in feats]
    assert dec(feats).shape == (1, 4, 16, 8, 4) and dec.config["dropout"] == [0.1] * 3
    with pytest.raises(ValueError, match=r"feature_strides \[16, 16\] .*twice the previous.*UNETR"):
        FMUNetDecoder3D([96] * 2, [16] * 2, 2)
    with pytest.raises(ValueError, match=r"dropout \[0\.2\] must be .* 3 of them"):
        FMUNetDecoder3D([24, 40, 56], [2, 4, 8], 2, dropout=[0.2])
    with pytest.raises(ValueError, match=r"expects 3 features .*C = \[24, 40, 56\]"):
        dec(feats[:2])


@pytest.mark.parametrize("decoder", ["unet3d", "fmunet"])
def test_backward_reaches_every_parameter(decoder):
    enc, dec = unet_pair(3, decoder)
    x = torch.randn(2, 1, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    torch.nn.functional.cross_entropy(dec(enc(x)), y).backward()
    for n, p in list(enc.named_parameters()) + list(dec.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert enc.stem.weight.grad.abs().sum() > 0


def test_keep_is_refused():
    m = build_backbone("resenc3d_tiny", img_size=32)
    with pytest.raises(ValueError, match="keep is not supported.*masks the input"):
        m.forward_features(torch.zeros(1, 1, 32, 32, 32), keep=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    ({"img_size": 100}, r"img_size 100 is not divisible by 16 .*multiple of 16, e\.g\. 96"),
    ({"img_size": (96, 100, 64)}, r"img_size \(96, 100, 64\) is not divisible by 16.* e\.g\. \(96, 96, 64\)"),
    ({"img_size": 20, "channels": [8, 16, 32, 64]}, r"img_size 20 is not divisible by 8 .*halves the resolution 3 times"),
    ({"dropout": [0.0, 0.2]}, r"dropout \[0\.0, 0\.2\] must be .* 5 of them"),
    ({"channels": []}, r"channels \[\] must be a non-empty list"),
    ({"blocks_per_level": 0}, r"blocks_per_level 0 .* must be >= 1"),
    ({"in_chans": 0}, r"in_chans 0 must be >= 1"),
])
def test_constructor_messages_say_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        ResEnc3D(**kwargs)


def test_input_size_and_channels_are_checked():
    m = build_backbone("resenc3d_tiny", img_size=32)
    with pytest.raises(ValueError, match=r"input of spatial size \(44, 32, 32\) is not divisible by 16.*\(48, 32, 32\)"):
        m(torch.zeros(1, 1, 44, 32, 32))
    with pytest.raises(ValueError, match=r"in_chans=2"):
        m(torch.zeros(1, 2, 32, 32, 32))


def test_misspelt_names_suggest_the_right_one():
    with pytest.raises(KeyError, match="did you mean 'resenc3d'"):
        BACKBONES.get("resenc3")
    with pytest.raises(KeyError, match="did you mean 'unet3d'"):
        DECODERS.build("unet_3d", feature_channels=[8], feature_strides=[1], out_channels=2)
    with pytest.raises(KeyError, match="did you mean 'fmunet'"):
        DECODERS.build("fm_unet", feature_channels=[8], feature_strides=[1], out_channels=2)
