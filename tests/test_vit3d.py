"""``vit3d``: contract 2 (multi-scale features, feature layout), timm key names, the sin-cos embedding against
a naive reference, ``keep`` gathering, token ↔ grid order, constructor messages and the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medssl.pretrain.backbones import BACKBONES, ViT3D, build_backbone, sincos_pos_embed_3d

VIT_NAMES = [n for n in BACKBONES.names() if n.startswith("vit3d_")]
SIZES = {  # name -> (embed_dim, depth, heads, patch) as registered
    "vit3d_tiny_p16": (96, 4, 4, 16), "vit3d_small_p16": (384, 12, 6, 16), "vit3d_base_p16": (768, 12, 12, 16),
    "vit3d_large_p16": (1536, 12, 16, 16), "vit3d_large_p12": (1536, 12, 16, 12),
}


def test_every_size_is_registered():
    assert sorted(SIZES) == VIT_NAMES


@pytest.mark.parametrize("name", sorted(SIZES))
def test_registered_sizes_build_at_full_size(name):
    """Full-size build on the meta device (instant): widths, depth, taps, feature layout, config."""
    dim, depth, heads, patch = SIZES[name]
    with torch.device("meta"):
        m = build_backbone(name)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.patch_size) == (dim, depth, heads, patch)
    assert m.grid_size == (96 // patch,) * 3 and m.num_patches == (96 // patch) ** 3 and m.num_prefix_tokens == 1
    assert m.out_indices == ((1, 2, 3) if depth == 4 else (3, 6, 9))
    assert m.feature_channels == [dim] * 4 and m.feature_strides == [patch] * 4
    assert m.pos_embed.shape == (1, m.num_patches, dim) and m.pos_embed.device.type == "cpu"
    cfg = json.loads(json.dumps(m.config))  # JSON round trip, as in the export manifest
    with torch.device("meta"):
        again = build_backbone(name, **cfg)
    assert again.config == m.config


@pytest.mark.parametrize("name", sorted(SIZES))
def test_forward_backward_small(name):
    """A real forward/backward on CPU at a small crop (2 blocks for the wide sizes, to stay fast)."""
    patch = SIZES[name][3]
    kw = {"img_size": (2 * patch, 2 * patch, patch)}
    if SIZES[name][0] > 384:
        kw.update(depth=2)
    torch.manual_seed(0)
    m = build_backbone(name, **kw)
    x = torch.randn(2, 1, *kw["img_size"])
    feats = m(x)
    assert isinstance(feats, list) and len(feats) == len(m.feature_channels) == len(m.out_indices) + 1
    for f, c in zip(feats, m.feature_channels):
        assert f.shape == (2, 1 + 4, c)
    sum(f.pow(2).mean() for f in feats).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0


def test_timm_parameter_names_and_no_pos_embed_in_state_dict():
    m = build_backbone("vit3d_tiny_p16", img_size=32)
    sd = m.state_dict()
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias"}
    for i in range(4):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert set(sd) == expected
    assert sd["patch_embed.proj.weight"].shape == (96, 1, 16, 16, 16) and sd["cls_token"].shape == (1, 1, 96)
    assert sd["blocks.0.attn.qkv.weight"].shape == (288, 96) and sd["blocks.0.mlp.fc1.weight"].shape == (384, 96)
    assert "pos_embed" in dict(m.named_buffers()) and not any("pos" in k for k in sd)
    assert m.no_weight_decay() == {"cls_token"}
    assert m.blocks[0].attn.fused_attn, "timm should route attention through F.scaled_dot_product_attention"
    assert m.norm.eps == 1e-6 and m.blocks[0].norm1.eps == 1e-6
    # init: zero biases, unit LayerNorms, cls ~ N(0, .02), Xavier bound on the flattened patch conv
    assert all(sd[k].abs().sum() == 0 for k in sd if k.endswith(".bias") and "norm" not in k)
    assert torch.equal(sd["norm.weight"], torch.ones(96))
    w = sd["patch_embed.proj.weight"].flatten(1)  # [D, C·p³]
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w.shape[1])) + 1e-7
    # the same weights load into another crop size: the embedding is not part of them
    other = build_backbone("vit3d_tiny_p16", img_size=(48, 32, 16))
    other.load_state_dict(sd, strict=True)
    assert other.pos_embed.shape == (1, 6, 96)


def naive_sincos(grid, dim, temperature=10000.0):
    """Position (i, j, k) of a C-ordered grid → [sin(i ω_f)…, cos(i ω_f)…, sin(j ω_f)…, …], ω_f = T^(-f/(dim/6))."""
    n = dim // 6
    rows = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                row = []
                for coord in (i, j, k):
                    row += [math.sin(coord / temperature ** (f / n)) for f in range(n)]
                    row += [math.cos(coord / temperature ** (f / n)) for f in range(n)]
                rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("grid,dim", [((2, 3, 4), 12), ((3, 3, 3), 36), ((1, 5, 2), 6)])
def test_sincos_matches_naive_reference(grid, dim):
    pe = sincos_pos_embed_3d(grid, dim)
    assert pe.shape == (math.prod(grid), dim) and pe.dtype == torch.float32
    torch.testing.assert_close(pe.double(), naive_sincos(grid, dim), atol=1e-5, rtol=1e-5)


def test_model_uses_the_sincos_buffer():
    m = build_backbone("vit3d_tiny_p16", img_size=(32, 48, 16))
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_3d((2, 3, 1), 96))
    x = torch.zeros(1, 1, 32, 48, 16)  # zero input: tokens are conv bias (0 at init) + position
    torch.testing.assert_close(m.patchify(x)[0], m.pos_embed[0])


def test_keep_all_in_order_equals_keep_none():
    torch.manual_seed(0)
    m = build_backbone("vit3d_tiny_p16", img_size=32).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    keep = torch.arange(m.num_patches).expand(2, -1)
    for a, b in zip(m.forward_features(x), m.forward_features(x, keep=keep)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_keep_gathers_per_sample_tokens():
    """Per-sample index sets reach the first block as exactly those patch tokens, after the cls token."""
    torch.manual_seed(0)
    m = build_backbone("vit3d_tiny_p16", img_size=(48, 32, 32)).eval()  # 12 tokens
    x = torch.randn(2, 1, 48, 32, 32)
    keep = torch.tensor([[0, 5, 11], [7, 2, 3]])
    seen = {}
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        feats = m.forward_features(x, keep=keep)
        tokens = m.patchify(x)  # [B, L, D]
    hook.remove()
    assert [f.shape for f in feats] == [(2, 4, 96)] * 4
    for b in range(2):
        torch.testing.assert_close(seen["x"][b, 0], m.cls_token[0, 0])
        torch.testing.assert_close(seen["x"][b, 1:], tokens[b, keep[b]])
    # without blocks, the output is the LayerNorm of the gathered tokens
    bare = ViT3D(img_size=(48, 32, 32), embed_dim=96, depth=0, num_heads=4, out_indices=())
    with torch.no_grad():
        (out,) = bare.forward_features(x, keep=keep)
        ref = bare.norm(bare.patchify(x)[torch.arange(2)[:, None], keep])
    torch.testing.assert_close(out[:, 1:], ref)


def test_tokens_to_grid_inverts_patchify_order():
    """Token n of patchify is the patch at the C-order position n of the grid; tokens_to_grid puts it back."""
    m = build_backbone("vit3d_tiny_p16", img_size=(32, 48, 64), cls_token=False)
    assert m.num_prefix_tokens == 0 and m.grid_size == (2, 3, 4)
    with torch.no_grad():
        m.patch_embed.proj.weight.zero_()
        m.patch_embed.proj.weight[:, 0] = 1.0 / 16**3  # every channel = the patch mean
    x = torch.zeros(1, 1, 32, 48, 64)
    cell = (1, 2, 3)
    x[0, 0, 16:32, 32:48, 48:64] = 1.0  # patch at grid cell (1, 2, 3)
    tokens = m.patchify(x) - m.pos_embed  # [1, 24, D]
    n = (cell[0] * 3 + cell[1]) * 4 + cell[2]
    assert torch.allclose(tokens[0, :, 0], torch.nn.functional.one_hot(torch.tensor(n), 24).float(), atol=1e-6)
    grid = m.tokens_to_grid(torch.cat([torch.zeros(1, 0, 96), tokens], dim=1))  # [1, D, 2, 3, 4]
    assert grid.shape == (1, 96, 2, 3, 4)
    assert grid[0, 0].nonzero().tolist() == [list(cell)]
    # with a cls token the prefix is dropped
    mc = build_backbone("vit3d_tiny_p16", img_size=(32, 48, 64))
    t = torch.randn(2, 1 + 24, 96)
    torch.testing.assert_close(mc.tokens_to_grid(t).flatten(2).transpose(1, 2), t[:, 1:])
    with pytest.raises(ValueError, match="without keep"):
        mc.tokens_to_grid(t[:, :10])


@pytest.mark.parametrize("kwargs,match", [
    ({"img_size": 100}, r"img_size 100 is not divisible by patch_size 16: use a crop that is a multiple of 16, e\.g\. 96"),
    ({"img_size": (96, 100, 64)}, r"img_size \(96, 100, 64\) .*multiple of 16, e\.g\. \(96, 96, 64\)"),
    ({"embed_dim": 100, "num_heads": 4}, r"embed_dim 100 is not divisible by 6 .*sin-cos.*e\.g\. 96"),
    ({"embed_dim": 96, "num_heads": 5}, r"num_heads 5 does not divide embed_dim 96: .*num_heads=4"),
    ({"depth": 4, "out_indices": (1, 2, 4)}, r"out_indices \(1, 2, 4\) has \[4\] outside \[0, depth=4\).*\(1, 2, 3\)"),
    ({"depth": 4}, r"out_indices \(3, 6, 9\) has \[6, 9\] outside"),  # the constructor's default taps
])
def test_constructor_messages_say_value_and_fix(kwargs, match):
    base = {"embed_dim": 96, "depth": 12, "num_heads": 4}
    with pytest.raises(ValueError, match=match):
        ViT3D(**{**base, **kwargs})


def test_input_size_mismatch_says_how_to_fix():
    m = build_backbone("vit3d_tiny_p16", img_size=32)
    with pytest.raises(ValueError, match=r"img_size=\(48, 32, 32\)"):
        m(torch.zeros(1, 1, 48, 32, 32))


def test_misspelt_name_suggests_the_right_one():
    with pytest.raises(KeyError, match="vit3d_base_p16"):
        BACKBONES.build("vit3d_bse_p16")
