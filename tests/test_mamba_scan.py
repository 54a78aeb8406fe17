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


@pytest.mark.parametrize("L", [1, 2, 3, 7, 32, 45, 129, 216])
def test_parallel_scan_equals_the_recurrence_forward_and_gradients(L):
    """Lengths that are and are not powers of two (odd ones leave a step unpaired at some level), one step,
    and MambaMIM's 6³ token grid."""
    ins = _inputs(2, 5, 3, L)
    for t in ins.values():
        t.requires_grad_(True)
    got = selective_scan(**ins, delta_softplus=True)
    ref = selective_scan_reference(**ins, delta_softplus=True)
    assert got.dtype == torch.float64
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-10
    w = torch.randn_like(ref)
    g_got = torch.autograd.grad((got * w).sum(), list(ins.values()))
    g_ref = torch.autograd.grad((ref * w).sum(), list(ins.values()))
    for name, a, b in zip(ins, g_got, g_ref):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() < 1e-5, name


def test_strong_decay_does_not_overflow_in_float32():
    """dt·A near −16 per step: over 256 steps the decay reaches e^−4000, where exp(−S) alone is inf in fp32."""
    ins = _inputs(1, 4, 16, 256, dtype=torch.float32, seed=1)
    ins["delta"] = ins["delta"].abs() + 1.0
    ins["A"] = -torch.full((4, 16), 16.0)
    for t in ins.values():
        t.requires_grad_(True)
    got = selective_scan(**ins, delta_softplus=True)
    dbl = {k: v.detach().double().requires_grad_(True) for k, v in ins.items()}
    ref = selective_scan_reference(**dbl, delta_softplus=True)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4
    got.sum().backward()
    ref.sum().backward()
    for k in ins:
        assert torch.isfinite(ins[k].grad).all(), k
        assert ((ins[k].grad.double() - dbl[k].grad).abs().max() / dbl[k].grad.abs().max()).item() < 1e-3, k


def test_scan_runs_in_float32_under_bf16_autocast_and_backward_can_run_twice():
    """mamba_ssm computes the scan in fp32 whatever the autocast; a retained graph gives the same gradient twice."""
    ins = {k: v.float().requires_grad_(True) for k, v in _inputs(2, 6, 4, 40, seed=2).items()}
    plain = selective_scan(**ins, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = selective_scan(**ins, delta_softplus=True)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    g1 = torch.autograd.grad(plain.sum(), ins["A"], retain_graph=True)[0]
    g2 = torch.autograd.grad(plain.sum(), ins["A"])[0]
    assert torch.equal(g1, g2)
    bf = selective_scan(**{k: v.detach().bfloat16() for k, v in ins.items()}, delta_softplus=True)
    assert bf.dtype == torch.bfloat16  # returned in the input's dtype


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
