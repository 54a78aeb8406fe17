"""The PyTorch selective scan against the step-by-step recurrence, and the Mamba mixer's names and shapes
against mamba_ssm v1's."""

from __future__ import annotations

import pytest
import torch

from medssl.pretrain.backbones.mamba import Mamba, selective_scan, selective_scan_reference


def _inputs(b, d, n, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"u": r(b, d, L), "delta": r(b, d, L) * 0.5, "A": -torch.exp(r(d, n) * 0.5) * 4,
            "B": r(b, n, L), "C": r(b, n, L), "D": r(d), "z": r(b, d, L), "delta_bias": r(d) * 0.1}


@pytest.mark.parametrize("L, chunk", [(7, 4), (32, 8), (45, 8), (50, 64), (33, 1)])
def test_chunked_scan_equals_the_recurrence_forward_and_gradients(L, chunk):
    """Lengths that are and are not multiples of the chunk, a chunk longer than the sequence, chunks of one."""
    ins = _inputs(2, 5, 3, L)
    for t in ins.values():
        t.requires_grad_(True)
    got = selective_scan(**ins, delta_softplus=True, chunk=chunk)
    ref = selective_scan_reference(**ins, delta_softplus=True)
    assert got.dtype == torch.float64
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-10
    w = torch.randn_like(ref)
    g_got = torch.autograd.grad((got * w).sum(), list(ins.values()))
    g_ref = torch.autograd.grad((ref * w).sum(), list(ins.values()))
    for name, a, b in zip(ins, g_got, g_ref):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < 1e-5, name


def test_long_chunks_with_strong_decay_do_not_overflow_in_float32():
    """Sum of dt·A over a 128-step chunk near -2000: exp(-S) alone would be inf in fp32."""
    ins = _inputs(1, 4, 16, 256, dtype=torch.float32, seed=1)
    ins["delta"] = ins["delta"].abs() + 1.0
    ins["A"] = -torch.full((4, 16), 16.0)
    got = selective_scan(**ins, delta_softplus=True, chunk=128)
    ref = selective_scan_reference(**{k: v.double() for k, v in ins.items()}, delta_softplus=True)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_mamba_mixer_has_mamba_ssm_names_shapes_and_init():
    m = Mamba(384)  # MambaMIM's d_model: d_inner 768, dt_rank 24, d_state 16, d_conv 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"A_log": (768, 16), "D": (768,), "in_proj.weight": (1536, 384),
                      "conv1d.weight": (768, 1, 4), "conv1d.bias": (768,), "x_proj.weight": (56, 768),
                      "dt_proj.weight": (768, 24), "dt_proj.bias": (768,), "out_proj.weight": (384, 768)}
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert 0.001 * 0.99 <= dt.min() and dt.max() <= 0.1 * 1.01  # softplus(bias) in [dt_min, dt_max]
    assert torch.allclose(-torch.exp(m.A_log[0]), -torch.arange(1.0, 17.0))
    x = torch.randn(2, 10, 384)
    y = m(x)
    assert y.shape == x.shape
    # causal: changing the last token leaves every earlier output as it was
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert torch.allclose(m(x2)[:, :-1], y[:, :-1], atol=1e-6)
    assert not torch.allclose(m(x2)[:, -1], y[:, -1])
