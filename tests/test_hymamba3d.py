"""``hymamba3d`` against MambaMIM's official encoder: the state-dict keys and shapes of the released
``*_mambamim_timm_style.pth`` (listed below from the official ``Encoder``/``SparseEncoder`` classes at 96³, blocks
1-3 of ``mae`` repeat block 0), parameter counts, feature shapes per level, and the masked (SparK-style) path."""

from __future__ import annotations

import json

import pytest
import torch

from medssl.pretrain.backbones import build_backbone
from medssl.pretrain.backbones.hymamba3d import OFFICIAL_UNUSED

OFFICIAL_KEYS = """
embeddings.stem.weight (32,1,3,3,3)
embeddings.stem.bias (32,)
embeddings.layer2.0.conv1.weight (64,1,3,3,3)
embeddings.layer2.0.conv1.bias (64,)
embeddings.layer2.0.norm.weight (64,)
embeddings.layer2.0.norm.bias (64,)
embeddings.layer2.0.conv2.weight (128,64,1,1,1)
embeddings.layer2.0.conv2.bias (128,)
embeddings.layer2.0.conv3.weight (64,128,1,1,1)
embeddings.layer2.0.conv3.bias (64,)
embeddings.layer2.1.conv1.weight (64,1,3,3,3)
embeddings.layer2.1.conv1.bias (64,)
embeddings.layer2.1.norm.weight (64,)
embeddings.layer2.1.norm.bias (64,)
embeddings.layer2.1.conv2.weight (128,64,1,1,1)
embeddings.layer2.1.conv2.bias (128,)
embeddings.layer2.1.conv3.weight (64,128,1,1,1)
embeddings.layer2.1.conv3.bias (64,)
embeddings.layer3.0.conv1.weight (128,1,3,3,3)
embeddings.layer3.0.conv1.bias (128,)
embeddings.layer3.0.norm.weight (128,)
embeddings.layer3.0.norm.bias (128,)
embeddings.layer3.0.conv2.weight (512,128,1,1,1)
embeddings.layer3.0.conv2.bias (512,)
embeddings.layer3.0.conv3.weight (128,512,1,1,1)
embeddings.layer3.0.conv3.bias (128,)
embeddings.layer3.1.conv1.weight (128,1,3,3,3)
embeddings.layer3.1.conv1.bias (128,)
embeddings.layer3.1.norm.weight (128,)
embeddings.layer3.1.norm.bias (128,)
embeddings.layer3.1.conv2.weight (512,128,1,1,1)
embeddings.layer3.1.conv2.bias (512,)
embeddings.layer3.1.conv3.weight (128,512,1,1,1)
embeddings.layer3.1.conv3.bias (128,)
embeddings.layer4.0.conv1.weight (192,1,3,3,3)
embeddings.layer4.0.conv1.bias (192,)
embeddings.layer4.0.norm.weight (192,)
embeddings.layer4.0.norm.bias (192,)
embeddings.layer4.0.conv2.weight (768,192,1,1,1)
embeddings.layer4.0.conv2.bias (768,)
embeddings.layer4.0.conv3.weight (192,768,1,1,1)
embeddings.layer4.0.conv3.bias (192,)
embeddings.layer4.1.conv1.weight (192,1,3,3,3)
embeddings.layer4.1.conv1.bias (192,)
embeddings.layer4.1.norm.weight (192,)
embeddings.layer4.1.norm.bias (192,)
embeddings.layer4.1.conv2.weight (768,192,1,1,1)
embeddings.layer4.1.conv2.bias (768,)
embeddings.layer4.1.conv3.weight (192,768,1,1,1)
embeddings.layer4.1.conv3.bias (192,)
embeddings.layer5.0.conv1.weight (384,1,3,3,3)
embeddings.layer5.0.conv1.bias (384,)
embeddings.layer5.0.norm.weight (384,)
embeddings.layer5.0.norm.bias (384,)
embeddings.layer5.0.conv2.weight (1536,384,1,1,1)
embeddings.layer5.0.conv2.bias (1536,)
embeddings.layer5.0.conv3.weight (384,1536,1,1,1)
embeddings.layer5.0.conv3.bias (384,)
embeddings.expend1.weight (64,32,3,3,3)
embeddings.expend1.bias (64,)
embeddings.expend2.weight (128,64,3,3,3)
embeddings.expend2.bias (128,)
embeddings.expend3.weight (192,128,3,3,3)
embeddings.expend3.bias (192,)
embeddings.expend4.weight (384,192,3,3,3)
embeddings.expend4.bias (384,)
embeddings.encoder1.conv1.weight (64,64,3,3,3)
embeddings.encoder1.conv1.bias (64,)
embeddings.encoder1.conv2.weight (64,64,3,3,3)
embeddings.encoder1.conv2.bias (64,)
embeddings.encoder1.norm1.weight (64,)
embeddings.encoder1.norm1.bias (64,)
embeddings.encoder1.norm2.weight (64,)
embeddings.encoder1.norm2.bias (64,)
embeddings.encoder2.conv1.weight (128,128,3,3,3)
embeddings.encoder2.conv1.bias (128,)
embeddings.encoder2.conv2.weight (128,128,3,3,3)
embeddings.encoder2.conv2.bias (128,)
embeddings.encoder2.norm1.weight (128,)
embeddings.encoder2.norm1.bias (128,)
embeddings.encoder2.norm2.weight (128,)
embeddings.encoder2.norm2.bias (128,)
embeddings.encoder3.conv1.weight (192,192,3,3,3)
embeddings.encoder3.conv1.bias (192,)
embeddings.encoder3.conv2.weight (192,192,3,3,3)
embeddings.encoder3.conv2.bias (192,)
embeddings.encoder3.norm1.weight (192,)
embeddings.encoder3.norm1.bias (192,)
embeddings.encoder3.norm2.weight (192,)
embeddings.encoder3.norm2.bias (192,)
embeddings.encoder4.conv1.weight (384,384,3,3,3)
embeddings.encoder4.conv1.bias (384,)
embeddings.encoder4.conv2.weight (384,384,3,3,3)
embeddings.encoder4.conv2.bias (384,)
embeddings.encoder4.norm1.weight (384,)
embeddings.encoder4.norm1.bias (384,)
embeddings.encoder4.norm2.weight (384,)
embeddings.encoder4.norm2.bias (384,)
mae.pos_embed (1,216,384)
mae.mask_token (1,1,384)
mae.blocks.0.norm1.weight (384,)
mae.blocks.0.norm1.bias (384,)
mae.blocks.0.mamba.A_log (768,16)
mae.blocks.0.mamba.D (768,)
mae.blocks.0.mamba.A_b_log (768,16)
mae.blocks.0.mamba.D_b (768,)
mae.blocks.0.mamba.in_proj.weight (1536,384)
mae.blocks.0.mamba.conv1d.weight (768,1,4)
mae.blocks.0.mamba.conv1d.bias (768,)
mae.blocks.0.mamba.x_proj.weight (56,768)
mae.blocks.0.mamba.dt_proj.weight (768,24)
mae.blocks.0.mamba.dt_proj.bias (768,)
mae.blocks.0.mamba.conv1d_b.weight (768,1,4)
mae.blocks.0.mamba.conv1d_b.bias (768,)
mae.blocks.0.mamba.x_proj_b.weight (56,768)
mae.blocks.0.mamba.dt_proj_b.weight (768,24)
mae.blocks.0.mamba.dt_proj_b.bias (768,)
mae.blocks.0.mamba.out_proj.weight (384,768)
mae.blocks.0.mlp.fc1.weight (768,384)
mae.blocks.0.mlp.fc1.bias (768,)
mae.blocks.0.mlp.fc2.weight (384,768)
mae.blocks.0.mlp.fc2.bias (384,)
mae.blocks.0.norm2.weight (384,)
mae.blocks.0.norm2.bias (384,)
"""


def official_state_shapes() -> dict:
    out = {}
    for line in OFFICIAL_KEYS.strip().splitlines():
        key, shape = line.split()
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d)
        if key.startswith("mae.blocks.0."):
            for i in range(4):
                out[key.replace("mae.blocks.0.", f"mae.blocks.{i}.")] = dims
        else:
            out[key] = dims
    return out


def test_keys_and_shapes_match_the_official_encoder():
    official = official_state_shapes()
    assert sum(torch.Size(s).numel() for s in official.values()) == 22_725_760  # the released file, 86.7 MiB fp32
    with torch.device("meta"):
        model = build_backbone("hymamba3d", img_size=96)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unused = {k for k in official if any(u in k for u in OFFICIAL_UNUSED)}
    assert len(unused) == 4 * 7 + 2  # the backward branch of 4 Mamba blocks (7 tensors each), mask token, pos_embed
    assert ours == {k: v for k, v in official.items() if k not in unused}
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == 22_725_760 - 82_944 - 384 - 4 * 79_104  # less pos_embed (fixed), mask_token, backward branch


def test_features_per_level_and_the_sin_cos_table():
    model = build_backbone("hymamba3d_tiny", img_size=32)
    assert model.feature_channels == [16, 32, 48, 96, 96] and model.feature_strides == [1, 2, 4, 8, 16]
    feats = model.forward_features(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32, 32), (2, 32, 16, 16, 16), (2, 48, 8, 8, 8),
                                               (2, 96, 4, 4, 4), (2, 96, 2, 2, 2)]
    pe = build_backbone("hymamba3d", img_size=96).mae.pos_embed  # [1, 216, 384]: x slowest, z fastest
    k = torch.arange(64, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / 64)
    x, y, z = 1, 2, 3
    want = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega),
                      torch.sin(z * omega), torch.cos(z * omega)]).float()
    assert torch.allclose(pe[0, 36 * x + 6 * y + z], want, atol=1e-6)


def test_masked_path_keeps_masked_positions_at_zero_and_runs_visible_tokens_first():
    torch.manual_seed(0)
    model = build_backbone("hymamba3d_tiny", img_size=32).eval()
    x = torch.randn(3, 1, 32, 32, 32)
    active = torch.zeros(3, 8, dtype=torch.bool)
    for b in range(3):
        active[b, torch.randperm(8)[:2 + b]] = True  # 2, 3 and 4 of 8 visible: the keep count may differ per sample
    active = active.view(3, 1, 2, 2, 2)
    feats = model.forward_features(x, active)
    for f, stride in zip(feats[:4], model.feature_strides):
        m = active.repeat_interleave(16 // stride, 2).repeat_interleave(16 // stride, 3).repeat_interleave(16 // stride, 4)
        assert (f * (~m)).abs().max() == 0, stride  # masked positions stay zero at every convolution level
        assert (f * m).abs().sum() > 0
    # the Mamba stage runs each sample's visible tokens first (raster order), then its masked ones: a visible
    # token's output is that of a run on the visible tokens alone, a masked one's has seen them all
    deep = model.embeddings(x, active)[-1]
    for b in range(3):
        vis = active[b].flatten()
        t = deep[b:b + 1].flatten(2).transpose(1, 2) + model.mae.pos_embed
        alone = t[:, vis]
        for blk in model.mae.blocks:
            alone = blk(alone)
        seq = torch.cat([t[:, vis], t[:, ~vis]], 1)
        for blk in model.mae.blocks:
            seq = blk(seq)
        got = feats[-1][b].flatten(1).transpose(0, 1)
        assert torch.allclose(got[vis], alone[0], atol=1e-5)
        assert torch.allclose(got[~vis], seq[0, int(vis.sum()):], atol=1e-5)
        assert torch.allclose(t[0, ~vis], model.mae.pos_embed[0, ~vis])  # masked tokens: the position alone
    skipped = model.forward_features(x, active, skip=(0,))
    assert skipped[0] is None and all(torch.equal(a, b) for a, b in zip(skipped[1:], feats[1:]))
    with pytest.raises(ValueError, match="at least one visible token"):
        model.forward_features(x, torch.zeros_like(active))


def test_downstream_network_is_the_official_build_hybird():
    """hymamba3d + HyMambaDecoder = build_hybird(1, 14, 96): decoder 19,115,758 parameters, total 41,841,134 with
    the fixed pos_embed (the official counts, from a meta build of the official class); logits at the crop."""
    from types import SimpleNamespace

    from medssl.finetune.models import HyMambaDecoder, SegmentationNet, make_decoder

    with torch.device("meta"):
        bb = build_backbone("hymamba3d", img_size=96)
        arch, dec = make_decoder(bb, "auto", 1, 14, SimpleNamespace(model=SimpleNamespace()))
    assert arch == "hymamba" and isinstance(dec, HyMambaDecoder)
    n_dec = sum(p.numel() for p in dec.parameters())
    assert n_dec == 19_115_758
    n_all = n_dec + sum(t.numel() for t in bb.state_dict().values()) + bb.mae.pos_embed.numel()
    assert n_all == 41_841_134 - 4 * 79_104  # the official total less the backward branch we do not build
    small = build_backbone("hymamba3d_tiny", img_size=32)
    net = SegmentationNet(small, make_decoder(small, "auto", 1, 3, SimpleNamespace(model=SimpleNamespace()))[1])
    assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_official_encoder_file_imports_key_for_key(tmp_path):
    """A state dict with the released file's names and shapes (random values) → ``pretrain import mambamim`` →
    an export whose backbone holds every kept tensor unchanged; the report names what was left out."""
    from medssl.pretrain.__main__ import main as pretrain_main
    from medssl.pretrain.export import load_backbone

    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in official_state_shapes().items()}
    ckpt = tmp_path / "mambamim_ct_pretrained_mambamim_timm_style.pth"
    torch.save(official, ckpt)
    assert pretrain_main(["import", "mambamim", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    model = load_backbone(tmp_path / "export")
    state = model.state_dict()
    kept = [k for k in official if not any(u in k for u in OFFICIAL_UNUSED)]
    assert sorted(state) == sorted(kept)
    for k in kept:
        assert torch.equal(state[k], official[k]), k
    # a DDP-wrapped file pretrained on 64³ crops: the grid comes from its (prefix-stripped) position table
    wrapped = {f"module.{k}": (torch.zeros(1, 64, 384) if k == "mae.pos_embed" else v) for k, v in official.items()}
    torch.save(wrapped, tmp_path / "ddp.pth")
    assert pretrain_main(["import", "mambamim", str(tmp_path / "ddp.pth"), "--out", str(tmp_path / "ddp")]) == 0
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["backbone"]["kwargs"]["img_size"] == 64
    # a file that is not a MambaMIM encoder is refused with exit 2
    torch.save({"encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert pretrain_main(["import", "mambamim", str(tmp_path / "other.pth"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_layer_decay_depths_follow_the_network():
    """Layer-wise lr decay on hymamba3d: the convolution levels by resolution, then the Mamba layers on top, so a
    layer_decay < 1 slows the shallow stem most (every parameter gets a depth)."""
    from medssl.finetune.models import layer_id

    names = [n for n, _ in build_backbone("hymamba3d_tiny", img_size=32).named_parameters()]
    depth = {n: layer_id(n) for n in names}
    assert None not in depth.values()
    assert depth["embeddings.stem.weight"] == 0 and depth["embeddings.expend1.weight"] == 0
    level = lambda k: {v for n, v in depth.items() if n.startswith(f"embeddings.layer{k}.")}  # noqa: E731
    assert [level(k) for k in range(2, 6)] == [{1}, {2}, {3}, {4}]
    assert {v for n, v in depth.items() if n.startswith("mae.blocks.1.")} == {6}


def test_layer_norm_is_the_official_sparse_formula():
    """LayerNorm3d against the official formula written out (biased variance over channels, eps 1e-6, affine),
    zero at masked voxels whatever the input holds there."""
    from medssl.pretrain.backbones.hymamba3d import LayerNorm3d

    torch.manual_seed(0)
    ln = LayerNorm3d(16).double()
    ln.weight.data.normal_()
    ln.bias.data.normal_()
    x = torch.randn(2, 16, 6, 6, 6, dtype=torch.float64) * 3 + 1
    m = torch.rand(2, 1, 6, 6, 6) > 0.5
    u = x.mean(1, keepdim=True)
    var = (x - u).pow(2).mean(1, keepdim=True)
    want = (ln.weight[:, None, None, None] * (x - u) / torch.sqrt(var + 1e-6) + ln.bias[:, None, None, None]) * m
    got = ln(x, m)
    assert torch.allclose(got, want, atol=1e-12)
    assert (got * ~m).abs().max() == 0
