"""Training-step benchmark on the training device: samples/s, FLOPs, MFU, peak memory and the attention kernel of
one recipe's step, fed by random tensors, by the shard stream, or by the device pool.

Usage:
  python bench/gpu_step.py                          # hi_end_mae on vit3d_base_p16 and vit3d_large_p12, volume_fusion
                                                    # on resenc3d; 96³, bf16 on a GPU; data synthetic, stream, pool
  python bench/gpu_step.py --models vit3d_base_p16 --batch 64 --checkpoint-blocks -1 --compile --data synthetic
  python bench/gpu_step.py --models vit3d_tiny_p16 resenc3d_tiny --crop 32 --batch 2 --steps 2 --warmup 1 \\
      --data synthetic stream                       # CPU smoke test
  python bench/gpu_step.py --shards /data/shards/ct1 /data/shards/ct2 --data stream pool --json gpu_step.json

What one row times: ``--steps`` training steps after ``--warmup`` ones — forward and loss under the recipe's
precision (``bf16`` = ``torch.autocast(dtype=torch.bfloat16)`` as the training loop runs it), backward, AdamW step —
of a recipe's task (``hi_end_mae`` for ``vit3d_*``, ``volume_fusion`` for ``resenc3d*``, ``mambamim`` for
``hymamba3d*``; ``--recipes`` to choose) with the recipe YAML's task settings (its ``tiny`` preset's for a
``*_tiny*`` backbone). The step is timed as throughput:
the device is synchronised before the first and after the last timed step only, so the host runs ahead as it does
in training. The data paths (``--data``):

  synthetic  random crops made once on the device: the model's ceiling, no input cost;
  stream     ``medssl.shards.stream`` with the recipe's data settings (crops cut, windowed and flipped by
             DataLoader workers on the CPU), each batch moved with ``.to(device, non_blocking=True)``;
  pool       ``medssl.shards.pool.DevicePool``: volumes resident on the device, crops cut there (``image`` arrives
             on the device); a row says so when this medssl has no device pool.

Real-data rows give samples/s and the ratio to the synthetic row of the same model (1.00 = the data path keeps up).
Shard sets come from ``--shards``; without it a small set of the project's CT phantoms is built once into
``--bench-dir`` (``--phantoms``, ``--fov-scale``) and reused.

FLOPs per sample are counted once, on one eager step with synthetic crops, by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward). Attention: every
``F.scaled_dot_product_attention`` call of the step is recorded, and for each distinct call shape a probe asks
FlopCounterMode whether it counts that call on this device and dtype (it has formulas for the CUDA flash,
memory-efficient and cuDNN kernels, none for the CPU's fused kernel). Where it counts nothing, the attention
matmuls are added by hand, 4·B·heads·Nq·Nk·head_dim forward and twice that backward, and the output says so. These
are the model's FLOPs: the forward that ``--checkpoint-blocks`` recomputes in the backward pass is not counted. MFU
= counted FLOPs per second / the peak: ``--peak-tflops``, else the table below by GPU name (dense bf16 tensor-core
peaks; for fp32 the non-tensor-core peak — cuDNN convolutions use TF32 by default, so an fp32 CNN can exceed it).
Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the growth of the process's peak RSS during
the row (DataLoader workers not included).

The attention kernel: one forward is profiled with ``torch.profiler``; the SDPA operator that ran (flash,
memory-efficient, cuDNN, math, or the CPU's fused flash kernel) and, on CUDA, the attention kernels' names
(``flash``; ``fmha`` / ``cutlass`` = memory-efficient; ``cudnn``) go into the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_step import device_and_name, recipe_for  # noqa: E402  (bench/pretrain_step.py)

# Peak dense (no sparsity) TFLOP/s per GPU, from NVIDIA's datasheets (H100/H200, A100, L40S, L4, A10): (substring of
# torch.cuda.get_device_name(), bf16 tensor core, fp32 without tensor cores). The first match wins, so the PCIe/NVL
# parts precede the SXM names they contain. H200 SXM has the H100 SXM's compute (same Hopper GPU, more memory).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H200 NVL", 835.0, 60.0),
    ("GH200", 989.0, 67.0),
    ("H100", 989.0, 67.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
]

DEFAULT_MODELS = ["vit3d_base_p16", "vit3d_large_p12", "resenc3d"]
DATA_PATHS = ("synthetic", "stream", "pool")
POOL_MISSING = "not available (medssl.shards.pool missing)"


# --------------------------------------------------------------------------------------------- peaks and FLOPs
def peak_tflops(device: torch.device, name: str, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak MFU divides by, and where it comes from."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        for key, bf16, fp32 in PEAK_TFLOPS:
            if key in name:
                peak = bf16 if precision == "bf16" else fp32
                kind = "dense bf16 tensor core" if precision == "bf16" else "fp32 without tensor cores"
                return peak, f"{key} {kind}, NVIDIA datasheet"
    return None, "unknown (give --peak-tflops)"


def attention_flops(q_shape, k_shape, v_shape) -> int:
    """Forward FLOPs of one attention: Q·Kᵀ and P·V, 2·B·h·Nq·Nk·(d + d_v) = 4·B·h·N²·d for self-attention."""
    *bh, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    b = 1
    for s in bh:
        b *= int(s)
    return 2 * b * nq * nk * d + 2 * b * nq * nk * dv


@contextlib.contextmanager
def record_sdpa(calls: list):
    """Record ``(q, k, v shapes, dtype, device, grad)`` of every ``F.scaled_dot_product_attention`` call (timm's
    ``Attention`` and the recipes call it through the module attribute)."""
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, grad))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = real


def sdpa_probe(q_shape, k_shape, v_shape, dtype, device, grad: bool) -> tuple[int, int, list[str]]:
    """What FlopCounterMode counts for one SDPA call of these shapes on this device (forward, and backward when
    ``grad``), the hand formula for it, and the operators it counted."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=grad) for s in (q_shape, k_shape, v_shape))
    with FlopCounterMode(display=False) as fc:
        out = F.scaled_dot_product_attention(q, k, v)
        if grad:
            out.sum().backward()
    ops = sorted(str(op) for op, n in fc.get_flop_counts().get("Global", {}).items() if n)
    return fc.get_total_flops(), attention_flops(q_shape, k_shape, v_shape) * (3 if grad else 1), ops


def count_flops(step, device: torch.device) -> dict:
    """FLOPs of one call of ``step()``: FlopCounterMode's count, plus attention FlopCounterMode does not count on
    this device (added by hand); ``attention`` = the attention part, ``attention_note`` says how it was counted."""
    from torch.utils.flop_counter import FlopCounterMode

    calls: list = []
    with record_sdpa(calls), FlopCounterMode(display=False) as fc:
        step()
    counted = fc.get_total_flops()
    shapes: dict = {}
    for q, k, v, dtype, dev, grad in calls:
        shapes[(q, k, v, dtype, dev, grad)] = shapes.get((q, k, v, dtype, dev, grad), 0) + 1
    attention = by_hand = seen = seen_formula = 0
    counted_ops, missing = set(), set()
    for (q, k, v, dtype, dev, grad), n in shapes.items():
        got, formula, ops = sdpa_probe(q, k, v, dtype, dev, grad)
        attention += n * formula
        if got >= 0.95 * formula:  # FlopCounterMode has a formula for the kernel that ran (or saw its matmuls)
            counted_ops.update(ops)
            seen, seen_formula = seen + n * got, seen_formula + n * formula
        else:
            by_hand += n * (formula - got)
            missing.add(f"{dev.type} {str(dtype).removeprefix('torch.')}")
    if not calls:
        note = "no attention"
    elif by_hand == 0:
        # its fused-kernel backward formula recomputes Q·Kᵀ: 3.5x the forward where the hand formula says 3x
        note = (f"attention counted by FlopCounterMode ({', '.join(sorted(counted_ops)) or 'matmuls'}; "
                f"{seen / seen_formula:.2f}x the 4·B·heads·Nq·Nk·head_dim (x3 with backward) formula)")
    else:
        note = (f"attention added by hand: FlopCounterMode counts no FLOPs for scaled_dot_product_attention on "
                f"{', '.join(sorted(missing))}, so 4·B·heads·Nq·Nk·head_dim forward FLOPs per call (x3 with backward) "
                f"were added")
    return {"total": counted + by_hand, "counted": counted, "attention": attention, "attention_by_hand": by_hand,
            "attention_calls": len(calls), "attention_note": note}


# --------------------------------------------------------------------------------------------- SDPA kernel
SDPA_OPS = {  # the aten operator scaled_dot_product_attention dispatched to -> its name in the table
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu flash (fused CPU kernel)",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (device backend)",
}


def classify_sdpa(names: list[str]) -> str:
    """Which SDPA implementation ran, from profiler event names: the operator(s), and on CUDA the attention
    kernels (``flash``; ``fmha`` / ``cutlass`` = memory-efficient; ``cudnn``)."""
    ops = list(dict.fromkeys(SDPA_OPS[n] for n in names if n in SDPA_OPS))
    kernels = {}
    for n in names:
        low = n.lower()
        if low.startswith("aten::") or "scaled_dot_product" in low:
            continue
        if "flash" in low:
            kernels.setdefault(n, "flash")
        elif "fmha" in low or ("cutlass" in low and ("attention" in low or "mem_eff" in low)):
            kernels.setdefault(n, "mem-efficient")
        elif "cudnn" in low and ("sdpa" in low or "attention" in low or "fmha" in low):
            kernels.setdefault(n, "cudnn")
    if not ops and not kernels:
        return "none (no attention)"
    text = ", ".join(ops) if ops else ", ".join(sorted(set(kernels.values())))
    if kernels:
        shown = sorted(kernels, key=len)[:2]
        text += "; kernels: " + ", ".join(k if len(k) <= 60 else k[:57] + "..." for k in shown)
    return text


def profile_sdpa(forward, device: torch.device) -> str:
    """Profile one ``forward()`` and name the attention implementation that ran."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return classify_sdpa([e.key for e in prof.key_averages()])


# --------------------------------------------------------------------------------------------- model and data
def build(model: str, recipe: str, crop: int, checkpoint_blocks: int, device: torch.device):
    """The task on ``device`` (recipe YAML's task settings, its ``tiny`` preset for a ``*_tiny*`` backbone; backbone
    ``model`` at ``crop``³), the run config whose ``data`` the stream reads, and the side of the crop the task takes
    as input (volume_fusion cuts its network input out of a larger view: the recipe's view / patch ratio)."""
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.config import load_config, task_class

    name, _, stage = recipe.partition(":")  # contrastive:global, contrastive:local — one stage's step
    cfg = load_config(name, preset="tiny" if "_tiny" in model else None)
    view = crop
    if hasattr(cfg.task, "patch_size"):  # volume_fusion: the network input is the patch, cut from a larger view
        ratio = cfg.data.crop_size[0] / cfg.task.patch_size[0]
        cfg.task.patch_size = [crop] * 3
        view = int(round(crop * ratio))
    if stage:
        cfg.task.stage = stage
    cfg.model.backbone = model
    cfg.data.crop_size = [view] * 3
    backbone = build_backbone(model, img_size=(crop,) * 3, checkpoint_blocks=checkpoint_blocks)
    task = task_class(name)(backbone, cfg.task)
    if hasattr(task, "configure"):
        task.configure(cfg)
    if hasattr(task, "begin_step"):
        task.begin_step(0, 1)
    return task.to(device).train(), cfg, view


def phantom_shards(bench_dir: Path, n: int, fov_scale: float) -> Path:
    """A shard set of ``n`` CT phantoms (the project's generator and builder, as bench/loader.py uses them), built
    once under ``bench_dir`` and reused."""
    from medssl.shards.build import BuildConfig, build as build_shards
    from medssl.shards.synth import synth_dataset

    tag = f"n{n}_fov{fov_scale:g}"
    raw, out = bench_dir / f"raw_{tag}", bench_dir / f"shards_{tag}"
    if not (out / "index.json").exists():
        if not (raw / "dataset.json").exists():
            synth_dataset(raw, n=n, seed=0, modality="CT", fov_scale=fov_scale, progress=False)
        build_shards(BuildConfig(inputs=[str(raw)], shard_size="256MB"), out, overwrite=True, progress=False)
    return out


def stream_config(cfg, batch: int, workers: int | None):
    """The training loop's stream settings for this run config (pretrain.train.stream_config)."""
    from medssl.pretrain.train import stream_config as from_run_config

    cfg.train.micro_batch = batch
    if workers is not None:
        cfg.data.num_workers = workers
    return from_run_config(cfg, seed=0)


def batches(kind: str, dirs: list[Path], sc, device: torch.device, synthetic: dict, pool_budget):
    """An endless iterator of batch dicts with ``image`` on ``device``, and its closer."""
    if kind == "synthetic":
        def forever():
            while True:
                yield synthetic
        return forever(), lambda: None
    if kind == "stream":
        from medssl import shards

        loader = shards.stream(dirs, sc, rank=0, world_size=1)
        it = iter(loader)

        def moved():
            for b in it:
                yield {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
        return moved(), lambda: _close(it)
    from medssl.shards.pool import DevicePool  # ImportError: the caller prints the row without numbers

    pool = DevicePool(dirs, sc, device=device, budget=pool_budget, rank=0, world_size=1)
    it = iter(pool)
    return it, lambda: _close(it)


def _close(it) -> None:
    close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


# --------------------------------------------------------------------------------------------- timing
def make_step(task, opt, amp):
    def step(batch: dict):
        with amp:
            loss = task(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def throughput(step, data, steps: int, warmup: int, device: torch.device) -> dict:
    """Seconds per step over ``steps`` steps after ``warmup`` (the batch fetch included), the device synchronised
    at both ends only; peak memory of the timed steps."""
    for _ in range(warmup):
        step(next(data))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    for _ in range(steps):
        step(next(data))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    return {"step_s": dt, "peak_mem_mb": mem / 1e6}


def bench_model(model: str, recipe: str, crop: int, batch: int, args, device: torch.device, dirs, peak) -> list[dict]:
    """One row per data path of ``args.data`` for one model."""
    torch.manual_seed(0)
    task, cfg, view = build(model, recipe, crop, args.checkpoint_blocks_for(model), device)
    opt = torch.optim.AdamW(task.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.prec == "bf16")
    eager_step = make_step(task, opt, amp)
    x = torch.rand(batch, 1, view, view, view, device=device)
    synthetic = {"image": x}
    # the model's FLOPs: counted with checkpointing off, so a recomputed forward is not counted as useful work
    task.backbone.checkpoint_blocks = 0
    flops = count_flops(lambda: eager_step(synthetic), device)
    task.backbone.checkpoint_blocks = args.checkpoint_blocks_for(model)

    def forward():
        with amp:
            task(synthetic)["loss"].detach()

    kernel = profile_sdpa(forward, device)
    opt.zero_grad(set_to_none=True)
    if args.compile:
        task.compile()  # in place, as the training loop's train.compile
    step = make_step(task, opt, amp)
    base = {"model": model, "recipe": recipe, "crop": crop, "view": view, "batch": batch, "precision": args.prec,
            "checkpoint_blocks": args.checkpoint_blocks_for(model), "compile": bool(args.compile),
            "params_m": sum(p.numel() for p in task.parameters()) / 1e6, "sdpa": kernel,
            "gflop_per_sample": flops["total"] / batch / 1e9,
            "attention_gflop_per_sample": flops["attention"] / batch / 1e9,
            "attention_by_hand_gflop_per_sample": flops["attention_by_hand"] / batch / 1e9,
            "attention_note": flops["attention_note"], "counted_gflop_per_sample": flops["counted"] / batch / 1e9}
    rows, synthetic_rate = [], None
    for kind in args.data:
        row = dict(base, data=kind)
        close = lambda: None  # noqa: E731
        try:
            sc = stream_config(cfg, batch, args.workers) if kind != "synthetic" else None
            data, close = batches(kind, dirs, sc, device, synthetic, args.pool_budget)
            r = throughput(step, data, args.steps, args.warmup, device)
        except ImportError as exc:
            if kind != "pool":
                raise
            missing = "medssl.shards.pool" in str(exc)
            rows.append(dict(row, status=POOL_MISSING if missing else f"not available (import failed: {exc})"))
            continue
        except Exception as exc:  # noqa: BLE001 — one failed data path should not hide the other rows
            rows.append(dict(row, status=f"failed: {type(exc).__name__}: {exc}"))
            continue
        finally:
            close()
        row.update(r, status="ok", samples_s=batch / r["step_s"], tflops=flops["total"] / r["step_s"] / 1e12)
        row["mfu"] = row["tflops"] / peak if peak else None
        if kind == "synthetic":
            synthetic_rate = row["samples_s"]
        row["vs_synthetic"] = row["samples_s"] / synthetic_rate if synthetic_rate else None
        rows.append(row)
    del task, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------- output
COLUMNS = ["recipe", "model", "data", "crop", "batch", "ckpt", "compile", "samples/s", "vs synthetic", "step ms",
           "GFLOP/sample", "attention GFLOP/sample", "TFLOP/s", "MFU", "peak mem MB", "SDPA"]


def table_row(r: dict) -> list[str]:
    crop = f"{r['crop']}³" + (f" (view {r['view']}³)" if r["view"] != r["crop"] else "")
    head = [r["recipe"], r["model"], r["data"], crop, str(r["batch"]), str(r["checkpoint_blocks"]),
            "yes" if r["compile"] else "no"]
    if r["status"] != "ok":
        return head + [f"{r['data']}: {r['status']}"] + ["-"] * 7 + [r["sdpa"]]
    attn = f"{r['attention_gflop_per_sample']:.3g}" + (" (by hand)" if r["attention_by_hand_gflop_per_sample"] else "")
    return head + [f"{r['samples_s']:.2f}", f"{r['vs_synthetic']:.2f}" if r["vs_synthetic"] else "-",
                   f"{1e3 * r['step_s']:.1f}", f"{r['gflop_per_sample']:.3g}", attn, f"{r['tflops']:.3f}",
                   f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-", f"{r['peak_mem_mb']:.0f}", r["sdpa"]]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])


def machine() -> str:
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node() or 'host'}: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB"


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help=f"registered backbones, one row group each (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--recipes", nargs="+", default=None,
                    help="recipe per model, one value or one each (default from the name: hi_end_mae for vit3d_*, "
                         "volume_fusion for resenc3d*, mambamim for hymamba3d*; contrastive:global|local for a stage)")
    ap.add_argument("--crop", type=int, nargs="+", default=[96],
                    help="network input side per model, one value or one each (default 96; volume_fusion cuts it "
                         "from a view 1.5x larger, as its recipe)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="crops per step per model (default 16)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="bf16 = torch.autocast bfloat16 as the training loop; auto = bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps first (default 3; compilation and DataLoader start-up happen here)")
    ap.add_argument("--checkpoint-blocks", type=int, nargs="+", default=[0],
                    help="backbone activation checkpointing per model: 0 off, N the first N blocks, -1 all (default 0)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the task (in place, as train.compile)")
    ap.add_argument("--data", nargs="+", default=list(DATA_PATHS), choices=DATA_PATHS,
                    help="data paths, one row each: synthetic (random crops on the device), stream (shards.stream, "
                         "CPU workers), pool (shards.pool.DevicePool) (default: all three)")
    ap.add_argument("--shards", nargs="+", default=None,
                    help="shard set folders for stream and pool (default: phantoms built into --bench-dir)")
    ap.add_argument("--bench-dir", default=".bench/gpu_step", help="where the phantom shard set is built and kept")
    ap.add_argument("--phantoms", type=int, default=8, help="phantoms in the built shard set (default 8)")
    ap.add_argument("--fov-scale", type=float, default=1.0,
                    help="phantom field of view (default 1.0, adult-sized; 0.3 for a fast test set)")
    ap.add_argument("--workers", type=int, default=None,
                    help="stream/pool DataLoader workers (default: the recipe's data.num_workers)")
    ap.add_argument("--pool-budget", default="2GiB",
                    help="device pool size: bytes ('2GiB', '512MiB') or a number of volumes (default 2GiB)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU (default: a table of NVIDIA datasheet peaks by GPU name — H100/H200 "
                         "SXM 989 bf16 dense, A100 312 —, none on the CPU)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the header and rows as JSON")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, name = device_and_name()
    args.prec = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    pick = lambda xs, i: xs[i] if len(xs) > i else xs[-1]  # noqa: E731
    ckpt = {m: pick(args.checkpoint_blocks, i) for i, m in enumerate(args.models)}
    args.checkpoint_blocks_for = ckpt.__getitem__
    peak, peak_src = peak_tflops(device, name, args.prec, args.peak_tflops)
    dirs = []
    if any(d != "synthetic" for d in args.data):
        dirs = [Path(d) for d in args.shards] if args.shards else [
            phantom_shards(Path(args.bench_dir), args.phantoms, args.fov_scale)]
    header = {"machine": machine(), "torch": torch.__version__, "device": name, "precision": args.prec,
              "peak_tflops": peak, "peak_source": peak_src, "shards": [str(d) for d in dirs],
              "steps": args.steps, "warmup": args.warmup}
    print(f"machine: {header['machine']}; torch {torch.__version__}; device: {name}; precision: {args.prec}; "
          f"peak for MFU: {f'{peak:g} TFLOP/s' if peak else '-'} ({peak_src})", flush=True)
    if dirs:
        print(f"shards: {', '.join(header['shards'])}", flush=True)
    rows = []
    for i, m in enumerate(args.models):
        recipe = pick(args.recipes, i) if args.recipes else recipe_for(m)
        got = bench_model(m, recipe, pick(args.crop, i), pick(args.batch, i), args, device, dirs, peak)
        for r in got:
            print("  " + " | ".join(table_row(r)), flush=True)
        rows += got
    print()
    print(markdown([table_row(r) for r in rows]))
    print()
    for note in dict.fromkeys(f"{r['model']}: {r['attention_note']}" for r in rows):
        print(note)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))
    failed = [r for r in rows if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
