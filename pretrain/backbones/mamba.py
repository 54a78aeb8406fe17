"""Mamba (v1) in plain PyTorch: the selective scan as a parallel (associative) scan over time, and the ``Mamba``
mixer with ``mamba_ssm``'s parameter names, so MambaMIM runs on any device; ``mamba_ssm``'s CUDA kernels are used
when they import and the input is on a CUDA device (optional extra ``mamba``).

The recurrence (Gu & Dao 2023, S6), per channel d and state n::

    dt_t = softplus(dt_t + dt_bias)                   (delta_softplus)
    h_t  = exp(dt_t · A) ⊙ h_{t-1} + dt_t · B_t · u_t
    y_t  = C_t · h_t + D · u_t,   then y · SiLU(z)

Parallel scan: h_t = a_t ⊙ h_{t−1} + x_t is associative in the pairs (a, x) — (a1, x1) then (a2, x2) is
(a1·a2, a2·x1 + x2) — so the whole sequence is solved by odd–even reduction: combine neighbouring pairs, solve
the half-length sequence the same way, fill the even steps from their odd neighbours. That is log2(L) levels of
whole-tensor operations and about 2·L combines in all, with no Python loop over time. It only ever multiplies
decays (each ≤ 1) and never divides by one, so no step size or chunk length can overflow it: the cumulative-sum
form exp(S_t)·Σ exp(−S_s)·x_s overflows fp32 once the decay over a chunk passes e^−88 (64 steps at dt·A = −1.4;
mamba_ssm's initial A alone reaches −16). Gradients come from the reverse recurrence (g_t = C_t·dy_t + a_{t+1} ⊙ g_{t+1},
the same scan run backwards) in a hand-written backward that keeps only the states h, not every level's
intermediates. The scan runs in float32 at least (float64 stays float64), autocast or not.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import fp32_region


def _scan_time_first(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t−1} + x_t with h_{−1} = 0, along dim 0 of [L, ...] tensors, by odd–even reduction."""
    L = x.shape[0]
    if L == 1:
        return x
    a_even, a_odd = a[0:L - 1:2], a[1::2]  # the pairs (0, 1), (2, 3), ...; an odd L leaves the last step unpaired
    h_odd = _scan_time_first(a_odd * a_even, torch.addcmul(x[1::2], a_odd, x[0:L - 1:2]))  # h_1, h_3, ...
    h = torch.empty_like(x)
    h[1::2] = h_odd
    h[0] = x[0]
    if L > 2:  # h_2k = a_2k ⊙ h_{2k−1} + x_2k
        h[2::2] = torch.addcmul(x[2::2], a[2::2], h_odd[:(L - 1) // 2])
    return h


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t · h_t with h_t = exp(delta_t·A) ⊙ h_{t−1} + delta_t·B_t·u_t. u, delta [b, d, L]; A [d, n];
    B, C [b, n, L] -> y [b, d, L]. Works time-first ([L, b, d, n]) so that the scan's slices are contiguous."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        dt = delta.permute(2, 0, 1)  # [L, b, d]
        Bl = B.permute(2, 0, 1).unsqueeze(2)  # [L, b, 1, n]
        x = (dt * u.permute(2, 0, 1)).unsqueeze(-1) * Bl  # [L, b, d, n] dt·B·u
        h = _scan_time_first(torch.exp(dt.unsqueeze(-1) * A), x)
        del x
        ctx.save_for_backward(u, delta, A, B, C, h)
        return (h * C.permute(2, 0, 1).unsqueeze(2)).sum(-1).permute(1, 2, 0)

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, h = ctx.saved_tensors
        dt, ul, gyl = delta.permute(2, 0, 1), u.permute(2, 0, 1), gy.permute(2, 0, 1)  # [L, b, d]
        Bl, Cl = B.permute(2, 0, 1).unsqueeze(2), C.permute(2, 0, 1).unsqueeze(2)  # [L, b, 1, n]
        gC = (gyl.unsqueeze(-1) * h).sum(2).permute(1, 2, 0)
        a = torch.exp(dt.unsqueeze(-1) * A)  # [L, b, d, n] the decays
        # g_t = C_t·dy_t + a_{t+1} ⊙ g_{t+1}: the forward scan on the reversed sequence, decays shifted by one
        a_next = torch.cat((a[1:], torch.ones_like(a[:1]))).flip(0)
        g = _scan_time_first(a_next, gyl.flip(0).unsqueeze(-1) * Cl.flip(0)).flip(0)  # dL/dh_t, [L, b, d, n]
        del a_next
        du = dt * ul  # [L, b, d]
        gB = (g * du.unsqueeze(-1)).sum(2).permute(1, 2, 0)
        gdu = (g * Bl).sum(-1)  # [L, b, d]
        # dL/d(dt·A)_t = g_t ⊙ a_t ⊙ h_{t−1}, formed as a product: h_t − x_t would cancel when a_t is tiny
        g_log_decay = torch.zeros_like(g)
        torch.mul(g[1:] * a[1:], h[:-1], out=g_log_decay[1:])
        del a
        gA = (g_log_decay * dt.unsqueeze(-1)).sum((0, 1))
        gdelta = ((g_log_decay * A).sum(-1) + gdu * ul).permute(1, 2, 0)
        gu = (gdu * dt).permute(1, 2, 0)
        return gu, gdelta, gA, gB, gC


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False) -> torch.Tensor:
    """``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s arguments and result, in PyTorch.

    u, delta, z: [b, d, L]; A: [d, n] (real, negative); B, C: [b, n, L]; D, delta_bias: [d]. Returns [b, d, L]
    in u's dtype, computed in float32 at least (as mamba_ssm's kernel does, also under bf16 autocast)."""
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)
    with fp32_region(u.device):
        u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(work)[None, :, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y = _SelectiveScan.apply(u, delta, A, B, C)
        if D is not None:
            y = y + D.to(work)[None, :, None] * u
        if z is not None:
            y = y * F.silu(z.to(work))
    return y.to(dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence one step at a time (tests' reference; slow)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


@functools.lru_cache(maxsize=1)
def _cuda_scan():
    """mamba_ssm's fused kernel when it imports (CUDA builds only), else None; tried once per process."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - not installed, or built for another torch / no CUDA
        return None
    return selective_scan_fn


class Mamba(nn.Module):
    """Mamba v1 mixer (``mamba_ssm.modules.mamba_simple.Mamba``: the same parameter names, shapes and defaults):
    in_proj → (x, z); depthwise causal conv1d (k ``d_conv``) → SiLU; x_proj → (dt, B, C); dt_proj; the selective
    scan with D and the SiLU(z) gate; out_proj. Input and output [b, L, d_model]."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, use_kernels: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_kernels = use_kernels
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        # mamba_ssm's init: dt_proj uniform ±dt_rank^-0.5; its bias the inverse softplus of dt ~ logU[dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, L, _ = hidden.shape
        xz = self.in_proj(hidden).transpose(1, 2)  # [b, 2·d_inner, L]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])
        dbc = self.x_proj(x.transpose(1, 2))  # [b, L, dt_rank + 2·d_state]
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # [b, d_inner, L]; the bias goes into the scan
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # [b, d_state, L]
        A = -torch.exp(self.A_log.float())
        scan = _cuda_scan() if self.use_kernels and hidden.is_cuda else None
        if scan is not None:
            y = scan(x.contiguous(), dt.contiguous(), A, B, C, self.D.float(), z=z.contiguous(),
                     delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        else:
            y = selective_scan(x, dt, A, B, C, self.D, z=z, delta_bias=self.dt_proj.bias, delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))
