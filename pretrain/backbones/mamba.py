"""Mamba (v1) in plain PyTorch: the selective scan as a chunked parallel scan, and the ``Mamba`` mixer with
``mamba_ssm``'s parameter names, so MambaMIM runs on any device; ``mamba_ssm``'s CUDA kernels are used when
they import and the input is on a CUDA device (optional extra ``mamba``).

The recurrence (Gu & Dao 2023, S6), per channel d and state n::

    dt_t = softplus(dt_t + dt_bias)                   (delta_softplus)
    h_t  = exp(dt_t · A) ⊙ h_{t-1} + dt_t · B_t · u_t
    y_t  = C_t · h_t + D · u_t,   then y · SiLU(z)

Chunked scan: the sequence is cut into chunks of ``chunk`` steps. Inside a chunk every output is a weighted sum
of the chunk's inputs with weights exp(S_t − S_s) (S the running sum of dt·A, s ≤ t), formed in log space from
differences of the running sums, so that no factor exceeds 1 and nothing overflows whatever the chunk length
(forming exp(S_t) and exp(−S_s) separately overflows fp32 from about 64 steps on). The state is carried from
chunk to chunk. Under autograd each chunk is recomputed in backward (activation checkpointing): the (T × T × N)
weights of a chunk are never stored for the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 16  # steps per chunk: the fastest of 16/32/64 at L 4096 on CPU (bench/scan.py, BENCHMARKS.md); at L 216
#           this form is still slower than the step loop: the T × T weights are to be replaced (MambaMIM issue)


def _chunk_scan(u, delta, A, B, C, h0):
    """One chunk. u, delta [b, d, T]; A [d, n]; B, C [b, n, T]; h0 [b, d, n] -> (y [b, d, T], h_T [b, d, n])."""
    a = delta.unsqueeze(-1) * A[:, None, :]  # [b, d, T, n] log decay per step (<= 0)
    s = torch.cumsum(a, dim=2)  # S_t
    T = u.shape[-1]
    diff = s.unsqueeze(3) - s.unsqueeze(2)  # [b, d, t, s, n] S_t - S_s
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
    w = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], float("-inf")))  # 0 above the diagonal
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # [b, d, T, n] dt_s · B_s · u_s
    h = torch.einsum("bdtsn,bdsn->bdtn", w, x) + torch.exp(s) * h0.unsqueeze(2)  # [b, d, T, n] every h_t
    y = torch.einsum("bdtn,bnt->bdt", h, C)
    return y, h[:, :, -1]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False, chunk: int = CHUNK) -> torch.Tensor:
    """``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s arguments and result, in PyTorch.

    u, delta, z: [b, d, L]; A: [d, n] (real, negative); B, C: [b, n, L]; D, delta_bias: [d]. Returns [b, d, L]
    in u's dtype (computed in float32 at least)."""
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for start in range(0, L, chunk):
        sl = slice(start, min(start + chunk, L))
        args = (u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], h)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            y, h = checkpoint(_chunk_scan, *args, use_reentrant=False)
        else:
            y, h = _chunk_scan(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
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


def _cuda_scan():
    """mamba_ssm's fused kernel when it imports (CUDA builds only), else None."""
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
