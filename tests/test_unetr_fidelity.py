"""The fine-tuning UNETR is the official network, part for part.

* patch 16: MONAI's ``UNETR`` (what the Hi-End-MAE downstream code builds for ViT-B/16) — the same modules under
  our names, tensor for tensor, and the same output for the same ViT features;
* patch 12 (the released Hi-End-MAE ``vit3d_large_p12``): the official ``downstream/models/UNETR/unetr.py`` —
  four ×2 levels from the 8³ grid, skips from blocks 3/6/9 at 64³/32³/16³, a trilinear resize to the crop
  and a 3³ conv at the end.

Networks the size of the paper's are built on the meta device: counts and shapes without memory.
"""

from __future__ import annotations

import pytest
import torch

from medssl.finetune.config import load_config
from medssl.finetune.models import ResizeUpBlock, SegmentationNet, make_decoder
from medssl.pretrain.backbones import build_backbone

# MONAI UNETR module → our key prefix
MONAI_NAMES = {"encoder1": "stem", "encoder2": "lifts.0", "encoder3": "lifts.1", "encoder4": "lifts.2",
               "decoder5": "ups.3", "decoder4": "ups.2", "decoder3": "ups.1", "decoder2": "ups.0", "out": "head"}

# Parameters of the official patch-12 network, counted from FengheTan9/Hi-End-MAE
# downstream/models/UNETR/unetr.py at commit b0df9c6e6cc86bfff5b6e83beb4ea6a2e9f39b1c, built as its __main__ and
# downstream/factory.py do (in 1, out 14, img 96, feature_size 32, hidden 1536, mlp 6144, 16 heads, perceptron,
# instance norm, conv_block and res_block, qkv_bias) with MONAI 1.6.1 (pos_embed= renamed proj_type=): per module,
# sum(p.numel()).
OFFICIAL_P12 = {"encoder1": 28_544, "encoder2": 1_294_336, "encoder3": 2_588_672, "encoder4": 3_145_728,
                "decoder5": 8_585_216, "decoder4": 1_622_016, "decoder3": 405_504, "decoder2": 140_320, "out": 462}
OFFICIAL_P12_DECODER = 17_810_798  # the sum above: total 361_271_150 − vit 343_460_352
# The official ViT (MONAI ViT) is 343_460_352: ours is 36_864 = 12 × 2 × 1536 smaller, the affine of the
# ``norm_cross_attn`` LayerNorm MONAI's TransformerBlock builds in every block and never uses without
# cross-attention.
OFFICIAL_P12_VIT = 343_460_352
MONAI_UNUSED_PER_BLOCK = 2  # × hidden: norm_cross_attn weight + bias


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def level_shapes(net: SegmentationNet, crop) -> dict[str, tuple]:
    shapes = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n, m in net.decoder.summary_levels()]
    try:
        out = net(torch.empty(1, 1, *crop, device="meta" if next(net.parameters()).is_meta else "cpu"))
    finally:
        for h in hooks:
            h.remove()
    shapes["out"] = tuple(out.shape[1:])
    return shapes


def test_feature_size_default_is_the_official_32():
    assert load_config([]).model.feature_size == 32
    assert load_config([]).model.pos_embed == "learned" and load_config([]).model.cls_token == "drop"


def test_patch16_decoder_is_monai_unetr_tensor_for_tensor():
    from monai.networks.nets import UNETR

    cfg = load_config([])
    with torch.device("meta"):
        ref = UNETR(in_channels=1, out_channels=14, img_size=96, feature_size=32, hidden_size=768, mlp_dim=3072,
                    num_heads=12, proj_type="perceptron", norm_name="instance", res_block=True, qkv_bias=True)
        bb = build_backbone("vit3d_base_p16", img_size=[96] * 3, cls_token=False, pos_embed="learned")
        _, dec = make_decoder(bb, "auto", 1, 14, cfg)
        net = SegmentationNet(bb, dec)
        shapes = level_shapes(net, (96, 96, 96))
    assert not dec.resize, "16 × 6 = 96: UNETR's transposed conv, no resize"
    want = {}
    for name, t in ref.state_dict().items():
        top, _, rest = name.partition(".")
        if top in MONAI_NAMES:
            want[f"{MONAI_NAMES[top]}.{rest}"] = tuple(t.shape)
    got = {k: tuple(t.shape) for k, t in dec.state_dict().items()}
    assert got == want, "every MONAI UNETR decoder tensor, same name (mapped) and shape"
    assert count(dec) == count(ref) - count(ref.vit) == 13_446_478
    # the ViT: the same parameters but MONAI's unused norm_cross_attn, and no cls token (as MONAI's)
    assert count(bb) == count(ref.vit) - 12 * MONAI_UNUSED_PER_BLOCK * 768
    assert "cls_token" not in dict(bb.named_parameters()) and bb.pos_embed.requires_grad
    assert shapes == {"stem": (32, 96, 96, 96), "lifts.2": (256, 12, 12, 12), "lifts.1": (128, 24, 24, 24),
                      "lifts.0": (64, 48, 48, 48), "ups.3": (256, 12, 12, 12), "ups.2": (128, 24, 24, 24),
                      "ups.1": (64, 48, 48, 48), "ups.0": (32, 96, 96, 96), "head": (14, 96, 96, 96),
                      "out": (14, 96, 96, 96)}


def test_patch16_decoder_computes_what_monai_unetr_computes():
    """Same weights, same ViT features → the same logits as MONAI UNETR's forward (tiny widths, real tensors)."""
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    cfg = load_config(["model.feature_size=4"])
    ref = UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4,
                proj_type="perceptron", norm_name="instance", res_block=True).eval()  # 12 blocks
    bb = build_backbone("vit3d_tiny_p16", img_size=[32] * 3, embed_dim=48, depth=12, num_heads=4, cls_token=False)
    _, dec = make_decoder(bb, "auto", 1, 3, cfg)
    mapped = {f"{MONAI_NAMES[k.partition('.')[0]]}.{k.partition('.')[2]}": v for k, v in ref.state_dict().items()
              if k.partition(".")[0] in MONAI_NAMES}
    dec.load_state_dict(mapped, strict=True)
    dec.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    hidden = [torch.randn(2, 8, 48) for _ in range(12)]  # 12 block outputs [B, L, D]
    final = torch.randn(2, 8, 48)

    def grid(t):  # MONAI's proj_feat: [B, L, D] → [B, D, 2, 2, 2]
        return ref.proj_feat(t)

    enc1, enc2 = ref.encoder1(x), ref.encoder2(grid(hidden[3]))
    enc3, enc4 = ref.encoder3(grid(hidden[6])), ref.encoder4(grid(hidden[9]))
    want = ref.out(ref.decoder2(ref.decoder3(ref.decoder4(ref.decoder5(grid(final), enc4), enc3), enc2), enc1))
    got = dec(x, [bb.tokens_to_grid(hidden[i]) for i in (3, 6, 9)] + [bb.tokens_to_grid(final)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch12_decoder_is_the_official_network():
    cfg = load_config([])
    with torch.device("meta"):
        bb = build_backbone("vit3d_large_p12", img_size=[96] * 3, cls_token=False, pos_embed="learned")
        _, dec = make_decoder(bb, "auto", 1, 14, cfg)
        net = SegmentationNet(bb, dec)
        shapes = level_shapes(net, (96, 96, 96))
    assert dec.resize and isinstance(dec.ups[0], ResizeUpBlock), "16 × 8 = 128 ≠ 96: resize + 3³ conv"
    assert dec.tap_index == [0, 1, 2] and bb.out_indices == (3, 6, 9), "skips from blocks 3, 6, 9"
    for name, ours in MONAI_NAMES.items():
        assert count(dec.get_submodule(ours)) == OFFICIAL_P12[name], name
    assert count(dec) == OFFICIAL_P12_DECODER
    assert count(bb) == OFFICIAL_P12_VIT - 12 * MONAI_UNUSED_PER_BLOCK * 1536
    # four ×2 levels from the 8³ grid: skips at 64³ (block 3), 32³ (block 6), 16³ (block 9), then 96³
    assert shapes == {"stem": (32, 96, 96, 96), "lifts.2": (256, 16, 16, 16), "lifts.1": (128, 32, 32, 32),
                      "lifts.0": (64, 64, 64, 64), "ups.3": (256, 16, 16, 16), "ups.2": (128, 32, 32, 32),
                      "ups.1": (64, 64, 64, 64), "ups.0": (32, 96, 96, 96), "head": (14, 96, 96, 96),
                      "out": (14, 96, 96, 96)}


@pytest.mark.parametrize("patch,crop,resize", [(16, 32, False), (12, 24, True), (8, 32, True), (12, 48, True)])
def test_unetr_rule_for_any_patch(patch, crop, resize):
    """One rule: four ×2 levels from the grid, a resize when 16 × grid ≠ crop; real tensors, tiny widths."""
    cfg = load_config([], "tiny")
    bb = build_backbone("vit3d_tiny_p16", img_size=[crop] * 3, patch_size=patch, in_chans=2)
    _, dec = make_decoder(bb, "auto", 2, 5, cfg)
    assert dec.resize is resize
    assert SegmentationNet(bb, dec)(torch.randn(1, 2, crop, crop, crop)).shape == (1, 5, crop, crop, crop)


def test_unetr_needs_three_taps():
    cfg = load_config([], "tiny")
    bb = build_backbone("vit3d_tiny_p16", img_size=[32] * 3, out_indices=(1, 2))
    with pytest.raises(ValueError, match="needs 3 intermediate features.*out_indices"):
        make_decoder(bb, "auto", 1, 2, cfg)


def test_learned_pos_embed_starts_as_the_sincos_and_learns():
    fixed = build_backbone("vit3d_tiny_p16", img_size=[32] * 3)
    learned = build_backbone("vit3d_tiny_p16", img_size=[32] * 3, pos_embed="learned", cls_token=False)
    assert "pos_embed" not in fixed.state_dict() and "pos_embed" in learned.state_dict()
    torch.testing.assert_close(learned.pos_embed.detach(), fixed.pos_embed)
    learned.forward_features(torch.randn(1, 1, 32, 32, 32))[-1].sum().backward()
    assert learned.pos_embed.grad is not None and learned.pos_embed.grad.abs().sum() > 0
    assert learned.config["pos_embed"] == "learned" and "pos_embed" not in fixed.config
    with pytest.raises(ValueError, match="pos_embed 'sine'"):
        build_backbone("vit3d_tiny_p16", img_size=[32] * 3, pos_embed="sine")
