"""Selective-scan benchmark: the chunked PyTorch scan (``pretrain/backbones/mamba.py``) against the step-by-step
recurrence, forward + backward, at MambaMIM's shapes (d_inner 768, d_state 16; L = 216 is its 6³ token grid,
4096 a 16³ grid).

Usage:
  python bench/scan.py                                   # CPU: L 216 and 4096, batch 2, chunks 16/32/64
  python bench/scan.py --lengths 4096 --chunks 32 64 128 # one GPU: also the memory-bandwidth floor

On a GPU it also prints the floor set by memory bandwidth: the bytes the scan must read (u, delta, B, C, z) and
write (y) once, forward, over the device's peak bandwidth (``--bandwidth`` GB/s; H100/H200 SXM ~3350 / 4800).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import device_and_name, median_time  # noqa: E402 - one timing rule for every bench script


def inputs(b: int, d: int, n: int, L: int, device, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    ins = {"u": r(b, d, L), "delta": r(b, d, L) * 0.5, "A": -torch.exp(r(d, n) * 0.5), "B": r(b, n, L),
           "C": r(b, n, L), "D": r(d), "z": r(b, d, L), "delta_bias": r(d) * 0.1}
    for t in ins.values():
        t.requires_grad_(True)
    return ins


def fwd_bwd(fn, ins, **kw):
    def run():
        y = fn(**ins, delta_softplus=True, **kw)
        y.sum().backward()
        for t in ins.values():
            t.grad = None
    return run


def main(argv=None) -> int:
    from medssl.pretrain.backbones.mamba import selective_scan, selective_scan_reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[216, 4096])
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-inner", type=int, default=768)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loop-max-len", type=int, default=4096, help="skip the step loop above this length")
    p.add_argument("--bandwidth", type=float, default=4800.0, help="GPU peak memory bandwidth, GB/s (H200: 4800)")
    a = p.parse_args(argv)
    device, name = device_and_name()
    print(f"# selective scan, forward + backward, {name}; batch {a.batch}, d_inner {a.d_inner}, d_state {a.d_state}, "
          f"fp32; median of {a.steps} after {a.warmup} warm-up")
    print("| L | method | chunk | seconds | vs step loop |")
    print("|---|---|---|---|---|")
    for L in a.lengths:
        ins = inputs(a.batch, a.d_inner, a.d_state, L, device)
        loop = None
        if L <= a.loop_max_len:
            loop = median_time(fwd_bwd(selective_scan_reference, ins), a.steps, a.warmup, device)
            print(f"| {L} | step loop (reference) | – | {loop:.3f} | 1.00 |", flush=True)
        for chunk in a.chunks:
            t = median_time(fwd_bwd(selective_scan, ins, chunk=chunk), a.steps, a.warmup, device)
            print(f"| {L} | chunked scan | {chunk} | {t:.3f} | {loop / t:.2f}× |" if loop else
                  f"| {L} | chunked scan | {chunk} | {t:.3f} | – |", flush=True)
        if device.type == "cuda":
            bytes_ = 4 * (4 * a.batch * a.d_inner * L + 2 * a.batch * a.d_state * L)  # u, delta, z, y + B, C
            print(f"| {L} | bandwidth floor, forward (read inputs + write y once at {a.bandwidth:.0f} GB/s) | – | "
                  f"{bytes_ / (a.bandwidth * 1e9):.6f} | – |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
