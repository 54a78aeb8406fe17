"""Selective-scan benchmark: the parallel PyTorch scan (``pretrain/backbones/mamba.py``) against the step-by-step
recurrence, forward + backward, at MambaMIM's shapes (d_inner 768, d_state 16; L = 216 is its 6³ token grid,
4096 a 16³ grid).

Usage:
  python bench/scan.py                          # CPU: L 216 and 4096, batch 2
  python bench/scan.py --lengths 216 4096 --batch 16   # one GPU: also the memory-bandwidth floor

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
    print("| L | method | seconds | vs step loop |")
    print("|---|---|---|---|")
    for L in a.lengths:
        ins = inputs(a.batch, a.d_inner, a.d_state, L, device)
        loop = None
        if L <= a.loop_max_len:
            loop = median_time(fwd_bwd(selective_scan_reference, ins), a.steps, a.warmup, device)
            print(f"| {L} | step loop (reference) | {loop:.3f} | 1.00 |", flush=True)
        t = median_time(fwd_bwd(selective_scan, ins), a.steps, a.warmup, device)
        print(f"| {L} | parallel scan | {t:.4f} | {loop / t:.2f}× |" if loop else
              f"| {L} | parallel scan | {t:.4f} | – |", flush=True)
        if device.type == "cuda":
            # The floor: every input and output of the scan moved once at peak bandwidth (fp32). In units of
            # [b, d, L]: forward reads u, delta, z and writes y (4); backward reads u, delta, z, dy and writes their
            # gradients (7). In [b, n, L]: B, C forward (2); B, C read and dB, dC written backward (4).
            bdl, bnl = a.batch * a.d_inner * L, a.batch * a.d_state * L
            fwd_bytes, all_bytes = 4 * (4 * bdl + 2 * bnl), 4 * (11 * bdl + 6 * bnl)
            with torch.no_grad():
                t_fwd = median_time(lambda: selective_scan(**ins, delta_softplus=True), a.steps, a.warmup, device)
            floor_fwd, floor_all = fwd_bytes / (a.bandwidth * 1e9), all_bytes / (a.bandwidth * 1e9)
            print(f"| {L} | parallel scan, forward only | {t_fwd:.4f} | – |")
            print(f"| {L} | bandwidth floor, forward ({fwd_bytes / 1e6:.0f} MB at {a.bandwidth:.0f} GB/s) | "
                  f"{floor_fwd:.6f} | scan is {t_fwd / floor_fwd:.1f}× the floor |")
            print(f"| {L} | bandwidth floor, forward + backward ({all_bytes / 1e6:.0f} MB) | {floor_all:.6f} | "
                  f"scan is {t / floor_all:.1f}× the floor |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
