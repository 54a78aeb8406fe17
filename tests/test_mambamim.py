"""``mambamim``: exact per-sample masking, TOKI against a per-sample loop written from the official algorithm, the
loss against a naive reference, the decoder's shapes, and one CPU forward/backward of the tiny preset."""

from __future__ import annotations

import math

import torch

from medssl.pretrain.backbones import build_backbone
from medssl.recipes.mambamim import (LightDecoder, MambaMIM, MambaMIMConfig, masked_patch_mse, num_keep,
                                     patchify, random_active, toki, unpatchify)


def test_keep_count_is_exact_per_sample():
    for B in (1, 8):
        a = random_active(B, (6, 6, 6), 0.75, generator=torch.Generator().manual_seed(B))
        assert a.shape == (B, 1, 6, 6, 6) and a.dtype == torch.bool
        assert a.flatten(1).sum(1).tolist() == [num_keep(216, 0.75)] * B == [54] * B
    a = random_active(8, (6, 6, 6), 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r.nonzero().flatten().tolist()) for r in a.flatten(1)}) == 8  # each sample its own mask


def toki_reference(feat: torch.Tensor, active: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """One sample at a time, gap by gap, as ``mask_token_every_batch`` of the official code (with the transpose
    where it reshapes): anchors = visible ∪ {0, L−1}; in a gap [a, b) of length g, V_k = (1−α_k) y_a + α_k y_b,
    α = linspace(0, 1, g); z_{a+j} = Σ_{k≤j} A^(g−1−k) V_k; the last position A · y_{L−1}."""
    B, C = feat.shape[:2]
    out = torch.zeros_like(feat).flatten(2)  # [B, C, L]
    L = out.shape[-1]
    for b in range(B):
        y = feat[b].flatten(1).T  # [L, C]
        flag = active[b].flatten().clone()
        flag[0] = flag[-1] = True
        idx = flag.nonzero().flatten().tolist()
        z = torch.zeros(L, C, dtype=feat.dtype)
        for a, e in zip(idx[:-1], idx[1:]):
            g = e - a
            alpha = torch.linspace(0, 1, g, dtype=feat.dtype)
            acc = torch.zeros(C, dtype=feat.dtype)
            for k in range(g):
                v = (1 - alpha[k]) * y[a] + alpha[k] * y[e]
                acc = acc + torch.linalg.matrix_power(A, g - 1 - k) @ v
                z[a + k] = acc
        z[L - 1] = A @ y[L - 1]
        out[b] = z.T
    return out.view_as(feat)


def test_toki_equals_the_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 5, 3, 3, 3, generator=g, dtype=torch.float64)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.3
    active = torch.zeros(3, 27, dtype=torch.bool)
    active[0, [0, 4, 5, 20]] = True  # position 0 visible
    active[1, [3, 26]] = True  # the last visible, a long first gap
    active[2, [13]] = True  # one visible token
    active = active.view(3, 1, 3, 3, 3)
    got = toki(feat, active, A)
    assert torch.allclose(got, toki_reference(feat, active, A), atol=1e-10)
    # zero-initialised A: A^0 = I only, so each gap's last slot holds the next anchor, everything else 0
    z0 = toki(feat, active, torch.zeros(5, 5, dtype=torch.float64)).flatten(2)[0]
    y = feat.flatten(2)[0]
    assert torch.allclose(z0[:, 3], y[:, 4]) and torch.allclose(z0[:, 19], y[:, 20]) and z0[:, 6].abs().max() == 0


def test_masked_loss_against_a_naive_reference():
    g = torch.Generator().manual_seed(1)
    x, rec = torch.randn(2, 1, 32, 32, 32, generator=g), torch.randn(2, 1, 32, 32, 32, generator=g)
    active = random_active(2, (2, 2, 2), 0.75, generator=g)
    got = masked_patch_mse(rec, x, active)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    if active[b, 0, i, j, k]:
                        continue
                    sl = (b, 0, slice(16 * i, 16 * i + 16), slice(16 * j, 16 * j + 16), slice(16 * k, 16 * k + 16))
                    t = x[sl].double()
                    t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)  # unbiased, eps inside the sqrt
                    total += ((rec[sl].double() - t) ** 2).mean().item()
                    n += 1
    assert abs(got.item() - total / n) < 1e-5
    assert torch.equal(unpatchify(patchify(x), (2, 2, 2)), x)


def test_decoder_widths_and_the_tiny_task_trains_on_cpu():
    dec = LightDecoder(768, 4)
    assert [d.conv[0].out_channels for d in dec.dec] == [384, 192, 96, 48]
    assert sorted(dec.fuse) == ["1", "2", "3"] and dec.fuse["1"].conv[0].in_channels == 768
    torch.manual_seed(0)
    backbone = build_backbone("hymamba3d_tiny", img_size=64)
    task = MambaMIM(backbone, MambaMIMConfig(decoder_width=96))
    x = torch.rand(2, 1, 64, 64, 64)
    out = task({"image": x})
    assert torch.isfinite(out["loss"]) and abs(out["mask_ratio"].item() - 0.75) < 1e-6
    out["loss"].backward()
    assert task.A_interpolation.grad is not None  # TOKI's matrix learns through the A^1 terms
    assert task.mask_tokens[1].grad is not None
    assert backbone.mae.blocks[0].mamba.A_log.grad is not None
    # every trainable parameter gets a gradient (DeepSpeed would hand the others zeros and AdamW decay them); the
    # frozen ones are the never-read 96³ skip and the deepest mask token, which TOKI replaces
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad}
    assert frozen == {"mask_tokens.0"} | {f"backbone.embeddings.encoder1.{n}" for n, _ in
                                          backbone.embeddings.encoder1.named_parameters()}
    assert [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None] == []
    no_toki = MambaMIM(build_backbone("hymamba3d_tiny", img_size=64), MambaMIMConfig(decoder_width=96, toki=False))
    no_toki({"image": x})["loss"].backward()
    assert not no_toki.A_interpolation.requires_grad and no_toki.mask_tokens[0].grad is not None
    assert [n for n, p in no_toki.named_parameters() if p.requires_grad and p.grad is None] == []
    # masked stages leave masked positions at zero: the encoder sees zeros there, whatever the input holds
    active = random_active(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    a_full = active.repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    noisy = torch.where(a_full, x, torch.randn_like(x) * 100)
    f1 = backbone.forward_features(x * a_full, active)
    f2 = backbone.forward_features(noisy * a_full, active)
    for a, b in zip(f1, f2):
        assert torch.equal(a, b)
    assert task.trace(x).shape == (2, 1, 64, 64, 64)


def test_two_channel_input_bad_ratios_and_bf16_pictures(tmp_path):
    """A 2-channel (multi-sequence MRI) crop is reconstructed channel for channel; a ratio that leaves no patch
    visible (or none masked) is refused when the task is built; pictures work on a bf16 model."""
    import pytest

    from medssl.pretrain.config import ConfigError

    torch.manual_seed(0)
    two = MambaMIM(build_backbone("hymamba3d_tiny", img_size=32, in_chans=2), MambaMIMConfig(decoder_width=32))
    out = two({"image": torch.rand(2, 2, 32, 32, 32)})
    assert torch.isfinite(out["loss"]) and two.decoder.proj.out_channels == 2
    for ratio in (0.99, 0.01):  # 8 patches at 32³: round(8 × 0.01) = 0 visible, round(8 × 0.99) = 8 visible
        with pytest.raises(ConfigError, match="at least one must be visible and one masked"):
            MambaMIM(build_backbone("hymamba3d_tiny", img_size=32), MambaMIMConfig(mask_ratio=ratio, decoder_width=32))
    task = MambaMIM(build_backbone("hymamba3d_tiny", img_size=32), MambaMIMConfig(decoder_width=32)).to(torch.bfloat16)
    picture = task.reconstruct({"image": torch.rand(2, 1, 32, 32, 32)}, path=tmp_path / "p.png")
    assert picture.ndim == 3 and (tmp_path / "p.png").stat().st_size > 1000
