"""Pretraining step benchmark: samples/s, FLOPs, MFU and peak memory of one recipe's training step.

Usage:
  python bench/pretrain_step.py                                   # CPU: tiny and base, fp32
  python bench/pretrain_step.py --models vit3d_base_p16 --crop 96 --batch 32 --precision bf16 \
      --peak-tflops 989                                           # one H100 (SXM, dense bf16)
  python bench/pretrain_step.py --models vit3d_large_p12 hymamba3d --crop 96 --batch 2   # hi_end_mae vs mambamim
  python bench/pretrain_step.py --models resenc3d resenc3d --recipes contrastive:global contrastive:local \
      --crop 96 --batch 12                                        # the contrastive stages

Times forward + backward + AdamW step of a recipe's task (``hi_end_mae`` for ``vit3d_*``, ``mambamim`` for
``hymamba3d*``, ``volume_fusion`` for ``resenc3d*``, each with its paper's defaults; ``--recipes`` to choose,
``contrastive:global`` / ``contrastive:local`` for one stage of the contrastive recipe)
on random crops — the data path is measured separately by bench/loader.py. FLOPs are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions of forward and backward); MFU =
counted FLOPs per second / peak FLOPs. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the
process's peak RSS growth on the CPU. Medians over ``--steps`` timed steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def device_and_name() -> tuple[torch.device, str]:
    """The GPU when there is one, else the CPU; and words for the table header."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name()
    return torch.device("cpu"), f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def median_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``steps`` runs after ``warmup`` runs (synchronised on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def recipe_for(model_name: str) -> str:
    return ("mambamim" if model_name.startswith("hymamba3d") else
            "volume_fusion" if model_name.startswith("resenc3d") else "hi_end_mae")


def bench(model_name: str, crop: int, batch: int, precision: str, steps: int, warmup: int, device: torch.device,
          recipe: str | None = None) -> dict:
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.config import task_class

    recipe = recipe or recipe_for(model_name)
    name, _, stage = recipe.partition(":")  # contrastive:global, contrastive:local — one stage's step
    backbone = build_backbone(model_name, img_size=(crop,) * 3)
    cls = task_class(name)
    cfg = cls.config_class()
    if hasattr(cfg, "patch_size"):  # volume_fusion: the network input is the crop here
        cfg.patch_size = [crop] * 3
    if stage:
        cfg.stage = stage
    task = cls(backbone, cfg).to(device)
    if hasattr(task, "begin_step"):
        task.begin_step(0, 1)  # a staged task's stage for this step (contrastive: the one asked for)
    opt = torch.optim.AdamW(task.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    x = torch.rand(batch, 1, crop, crop, crop, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with amp:
            loss = task({"image": x})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med = median_time(step, steps, warmup, device)
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": model_name, "recipe": recipe, "crop": crop, "batch": batch, "precision": precision,
            "params_m": sum(p.numel() for p in task.parameters()) / 1e6, "step_s": med,
            "samples_s": batch / med, "gflop_per_sample": flops / batch / 1e9, "tflops": flops / med / 1e12,
            "peak_mem_mb": mem / 1e6, "rss_before_mb": rss0 / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit3d_tiny_p16", "vit3d_base_p16"])
    ap.add_argument("--crop", type=int, nargs="+", default=[64, 96], help="crop per model (one value or one each)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 2], help="batch per model (one value or one each)")
    ap.add_argument("--recipes", nargs="+", default=None, help="recipe per model (default: from the model's name)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    args = ap.parse_args(argv)
    device, name = device_and_name()
    prec = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    pick = lambda xs, i: xs[i] if len(xs) > i else xs[-1]  # noqa: E731
    print(f"device: {name}; torch {torch.__version__}")
    print("| recipe | model | crop | batch | precision | params (M) | step s (median) | samples/s | GFLOP/sample | TFLOP/s | MFU | peak memory MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, m in enumerate(args.models):
        r = bench(m, pick(args.crop, i), pick(args.batch, i), prec, args.steps, args.warmup, device,
                  pick(args.recipes, i) if args.recipes else None)
        mfu = f"{100 * r['tflops'] / args.peak_tflops:.1f} %" if args.peak_tflops else "-"
        print(f"| {r['recipe']} | {m} | {r['crop']}³ | {r['batch']} | {prec} | {r['params_m']:.1f} | {r['step_s']:.3f} | "
              f"{r['samples_s']:.2f} | {r['gflop_per_sample']:.1f} | {r['tflops']:.3f} | {mfu} | {r['peak_mem_mb']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
