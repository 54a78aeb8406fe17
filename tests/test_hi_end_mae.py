"""``hi_end_mae``: masking counts, patch order against loops and against the backbone's conv, the loss against a
naive reference, gradients and the deep-to-shallow cross-attention wiring, position alignment against the
official shuffled formulation, AdamW groups, the picture, config messages and the recipe YAML."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from medssl.pretrain.backbones import ViT3D, build_backbone, sincos_pos_embed_3d
from medssl.pretrain.config import ConfigError, load_config
from medssl.pretrain.registry import TASKS
from medssl.recipes.hi_end_mae import HiEndMAE, HiEndMAEConfig, num_visible


def small_vit(img=32, patch=8, chans=1, depth=4) -> ViT3D:
    """64 tokens at 32³/p8: enough tokens for masking statistics, cheap on the CPU."""
    torch.manual_seed(0)
    return ViT3D(img_size=img, patch_size=patch, in_chans=chans, embed_dim=48, depth=depth, num_heads=4,
                 out_indices=(1, 2, 3) if depth == 4 else (0,))


def small_task(**cfg) -> HiEndMAE:
    cfg = {"decoder_dim": 24, "decoder_heads": 2, **cfg}
    return HiEndMAE(small_vit(), cfg)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.75, 0.9, 0.95])
def test_masking_keeps_exactly_floor_tokens(ratio):
    task, B, L = small_task(), 32, 64
    K = math.floor(L * (1 - Fraction(str(ratio))))
    assert num_visible(L, ratio) == K
    keep, mask, restore = task.random_masking(B, L, ratio, generator=torch.Generator().manual_seed(1))
    assert keep.shape == (B, K) and keep.dtype == torch.long and mask.shape == (B, L) and mask.dtype == torch.bool
    assert (mask.sum(1) == L - K).all(), "every sample masks the same number of tokens"
    assert not mask.gather(1, keep).any(), "kept tokens are not masked"
    assert all(len(set(row.tolist())) == K for row in keep), "no token kept twice"
    assert (restore.sort(1).values == torch.arange(L)).all(), "ids_restore is a permutation"
    assert len({tuple(row.tolist()) for row in mask}) > B // 2, "samples get different masks"
    again = task.random_masking(B, L, ratio, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(again, keep), "a seeded generator reproduces the mask"


def test_patchify_target_matches_loops_and_the_backbone_token_order():
    vit = ViT3D(img_size=(16, 24, 8), patch_size=8, in_chans=2, embed_dim=48, depth=1, num_heads=4, out_indices=(0,))
    task = HiEndMAE(vit, {"decoder_dim": 24, "decoder_heads": 2, "cross_depth": 1})
    x = torch.randn(2, 2, 16, 24, 8)
    out = task.patchify_target(x)
    p, (g0, g1, g2), C = 8, vit.grid_size, 2
    ref = torch.zeros(2, g0 * g1 * g2, p ** 3 * C)
    for b in range(2):
        for i in range(g0):
            for j in range(g1):
                for k in range(g2):
                    for a in range(p):
                        for e in range(p):
                            for f in range(p):
                                for c in range(C):
                                    ref[b, (i * g1 + j) * g2 + k, ((a * p + e) * p + f) * C + c] = \
                                        x[b, c, i * p + a, j * p + e, k * p + f]
    assert torch.equal(out, ref)
    assert torch.equal(task.unpatchify(out), x)
    # the same tokens as the backbone's conv: a Linear on (px, py, pz, c)-flattened patches
    w = vit.patch_embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(48, -1)  # [D, p³·C]
    tokens = out @ w.T + vit.patch_embed.proj.bias + vit.pos_embed
    torch.testing.assert_close(tokens, vit.patchify(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_a_naive_reference(norm_pix):
    task = small_task(norm_pix_loss=norm_pix).double()
    x = torch.rand(3, 1, 32, 32, 32, dtype=torch.float64)
    torch.manual_seed(7)
    loss = task({"image": x})["loss"]
    torch.manual_seed(7)  # the same draw as inside forward
    keep, mask, _ = task.random_masking(3, 64, 0.75)
    with torch.no_grad():
        pred = task.predict(x, keep)  # [B, L, p³]
    total, count = 0.0, 0
    for b in range(3):
        for i in range(4):
            for j in range(4):
                for k in range(4):
                    tok = (i * 4 + j) * 4 + k
                    if not mask[b, tok]:
                        continue
                    v = x[b, 0, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, k * 8:(k + 1) * 8].reshape(-1)
                    if norm_pix:
                        mean = v.sum() / v.numel()
                        var = ((v - mean) ** 2).sum() / v.numel()
                        v = (v - mean) / torch.sqrt(var + 1e-6)
                    total += float(((pred[b, tok] - v) ** 2).sum())
                    count += v.numel()
    assert count == 3 * 48 * 512
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-9)


def test_forward_backward_reaches_the_encoder_and_every_tap_projection():
    task = small_task()
    out = task({"image": torch.rand(2, 1, 32, 32, 32)})
    assert set(out) >= {"loss", "mask_ratio", "target_std"} and torch.isfinite(out["loss"])
    assert out["mask_ratio"] == 0.75 and not out["target_std"].requires_grad
    out["loss"].backward()
    for name, p in [("final_proj", task.final_proj.weight), ("mask_token", task.mask_token),
                    ("head", task.head.weight), ("block 0", task.backbone.blocks[0].attn.qkv.weight),
                    ("patch embed", task.backbone.patch_embed.proj.weight),
                    *[(f"tap_proj.{i}", m.weight) for i, m in enumerate(task.tap_proj)]]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_cross_blocks_read_the_taps_deep_to_shallow():
    with torch.device("meta"):
        base = HiEndMAE(build_backbone("vit3d_base_p16"))
    assert base.tap_blocks == (9, 6, 3), "blocks 10, 7, 4 (one-based), as the paper"
    assert (base.decoder_dim, base.decoder_heads, len(base.self_blocks), len(base.cross_blocks)) == (384, 12, 2, 3)
    with torch.device("meta"):
        large = HiEndMAE(build_backbone("vit3d_large_p12"))
    assert (large.decoder_dim, large.decoder_heads, large.head.out_features) == (528, 16, 12 ** 3)
    assert small_task(cross_depth=2).tap_blocks == (3, 2), "fewer cross blocks read the deepest taps"

    task = small_task()
    assert task.tap_blocks == (3, 2, 1)
    blocks_out, cross_y = {}, []
    for j, blk in enumerate(task.backbone.blocks):
        blk.register_forward_hook(lambda m, a, o, j=j: blocks_out.__setitem__(j, o))
    for blk in task.cross_blocks:
        blk.register_forward_hook(lambda m, a, o: cross_y.append(a[1]))
    x = torch.rand(2, 1, 32, 32, 32)
    keep = task.random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        pred = task.predict(x, keep)
        assert len(cross_y) == 3
        for i, j in enumerate(task.tap_blocks):  # cross block i reads the projected output of block j
            torch.testing.assert_close(cross_y[i], task.tap_proj[i](blocks_out[j]))
        # zeroing one tap's projection changes the prediction (the level is really read)
        for proj in task.tap_proj:
            saved = proj.weight.clone(), proj.bias.clone()
            proj.weight.zero_()
            proj.bias.zero_()
            assert not torch.allclose(task.predict(x, keep), pred)
            proj.weight.copy_(saved[0])
            proj.bias.copy_(saved[1])


def test_decoder_positions_match_the_official_shuffled_formulation():
    """The official code decodes in shuffled order (visible, then mask tokens) with the position embedding
    gathered by the shuffle; ours scatters into grid order. Attention does not care about order, so both must
    give the same prediction per grid position; and the order of ``keep`` must not matter."""
    task = small_task().eval()
    x, B, L = torch.rand(2, 1, 32, 32, 32), 2, 64
    keep, _, restore = task.random_masking(B, L, 0.75, generator=torch.Generator().manual_seed(3))
    shuffle = restore.argsort(1)  # [B, L], starts with keep
    assert torch.equal(shuffle[:, :keep.shape[1]], keep)
    with torch.no_grad():
        ours = task.predict(x, keep)  # [B, L, p³]
        feats = task.backbone.forward_features(x, keep)
        q = task.final_proj(feats[-1])  # [B, 1 + K, d]
        d = q.shape[-1]
        stream = torch.cat([q[:, 1:], task.mask_token.expand(B, L - keep.shape[1], d)], 1)  # shuffled order
        stream = stream + task.decoder_pos_embed[0][shuffle]  # [B, L, d]
        h = torch.cat([q[:, :1], stream], 1)
        for blk in task.self_blocks:
            h = blk(h)
        for blk, proj, i in zip(task.cross_blocks, task.tap_proj, (2, 1, 0)):
            h = blk(h, proj(feats[i]))
        ref = task.head(task.decoder_norm(h))[:, 1:].gather(1, restore[..., None].expand(-1, -1, ours.shape[-1]))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        perm = torch.randperm(keep.shape[1])
        torch.testing.assert_close(task.predict(x, keep[:, perm]), ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.decoder_pos_embed[0], sincos_pos_embed_3d((4, 4, 4), 24))


def test_param_groups_split_decay_and_no_decay():
    task = small_task()
    decay, plain = task.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    ids_d, ids_n = {id(p) for p in decay["params"]}, {id(p) for p in plain["params"]}
    named = dict(task.named_parameters())
    assert not ids_d & ids_n and ids_d | ids_n == {id(p) for p in named.values() if p.requires_grad}
    for name, p in named.items():
        expect_plain = p.ndim < 2 or name in ("backbone.cls_token", "mask_token")
        assert (id(p) in ids_n) == expect_plain, name
    assert id(task.mask_token) in ids_n and id(task.backbone.cls_token) in ids_n
    assert id(task.backbone.patch_embed.proj.weight) in ids_d and id(task.tap_proj[0].weight) in ids_d


def test_reconstruct_writes_a_png_and_keeps_the_mode(tmp_path):
    import matplotlib.image

    task = small_task().train()
    rgb = task.reconstruct({"image": torch.rand(6, 1, 32, 32, 32)}, path=tmp_path / "pics" / "r.png")
    assert task.training
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert 4 * 150 < rgb.shape[0] < 4 * 300 and rgb.shape[1] > rgb.shape[0] // 2, "4 rows (≤ 4 samples), 4 columns"
    back = matplotlib.image.imread(tmp_path / "pics" / "r.png")
    assert back.shape[:2] == rgb.shape[:2]
    task.eval()
    task.reconstruct({"image": torch.rand(1, 1, 32, 32, 32)})
    assert not task.training


def test_config_messages():
    with pytest.raises(ConfigError, match=r"mask_ratio=1.0 must lie strictly between 0 and 1"):
        HiEndMAEConfig(mask_ratio=1.0)
    with pytest.raises(ConfigError, match=r"decoder_dim=100 is not divisible by 6.*e.g. 96"):
        HiEndMAEConfig(decoder_dim=100, decoder_heads=4)
    with pytest.raises(ConfigError, match=r"decoder_dim=96 is not divisible by task.decoder_heads=5.*decoder_heads=4"):
        HiEndMAEConfig(decoder_dim=96, decoder_heads=5)
    with pytest.raises(ConfigError, match=r"cross_depth=4 needs 4 encoder taps.*has 3.*cross_depth <= 3"):
        small_task(cross_depth=4)
    with pytest.raises(ConfigError, match=r"unknown hi_end_mae task keys \['mask_rate'\].*mask_ratio"):
        HiEndMAE(small_vit(), {"mask_rate": 0.5})
    with pytest.raises(ConfigError, match=r"keeps 0 of 8 tokens visible"):
        HiEndMAE(build_backbone("vit3d_tiny_p16", img_size=32), {"decoder_dim": 96, "mask_ratio": 0.9})
    cfg = HiEndMAEConfig()
    cfg.mask_ratio = 0  # as a merged config would set it: the task validates again
    with pytest.raises(ConfigError, match="mask_ratio=0"):
        HiEndMAE(small_vit(), cfg)
    with pytest.raises(ValueError, match=r"expected \[B, 1, 32, 32, 32\].*crop_size"):
        small_task()({"image": torch.rand(1, 1, 32, 32, 16)})


def test_recipe_yaml_holds_the_paper_values_and_the_tiny_preset_runs():
    cfg = load_config("hi_end_mae")
    assert cfg.task == HiEndMAEConfig() and cfg.model.backbone == "vit3d_large_p12"
    assert cfg.data.crops_per_volume == 8 and list(cfg.optim.betas) == [0.9, 0.95]
    tiny = load_config("hi_end_mae", preset="tiny")
    backbone = build_backbone(tiny.model.backbone, img_size=tuple(tiny.data.crop_size))
    task = TASKS.build("hi_end_mae", backbone, tiny.task)
    assert task.stream_overrides() == {"crop_size": tuple(tiny.data.crop_size)}
    out = task({"image": torch.rand(2, 1, *tiny.data.crop_size)})
    assert torch.isfinite(out["loss"])
