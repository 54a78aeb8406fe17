"""Volume Fusion benchmark: the cost of building a fused batch next to the training step.

Usage:
  python bench/volume_fusion.py                        # CPU: the tiny preset and the paper's setting, fp32
  python bench/volume_fusion.py --precision bf16       # on a GPU

"fusion" = everything ``VolumeFusion.make_inputs`` does on the training device: two random-resized crops
of each streamed view (trilinear), flips, the percentile contrast map, gamma, inversion and the grid (or
batch) fusion labels and blend. "step" = fusion + forward + DiceCE + backward + optimizer step of the
whole encoder–decoder. Medians over ``--steps`` timed runs after ``--warmup``; the data path (decoding
volumes, cutting the streamed views) is measured by bench/loader.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import device_and_name, median_time  # noqa: E402 - one timing rule for every bench script


def bench(preset: str | None, variant: str, batch: int, precision: str, steps: int, warmup: int,
          device: torch.device) -> dict:
    from medssl.pretrain.config import load_config
    from medssl.pretrain.train import build_task, make_optimizer

    cfg = load_config("volume_fusion", [f"task.variant={variant}", f"train.micro_batch={batch}"], preset)
    task = build_task(cfg).to(device)
    opt = make_optimizer(task.param_groups(cfg.optim.weight_decay), cfg)
    view = torch.rand(batch, 1, *cfg.data.crop_size, device=device) * 2 - 1  # windowed views in [-1, 1]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def fusion():
        task.make_inputs(view)

    def step():
        with amp:
            loss = task({"image": view})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fuse_s = median_time(fusion, steps, warmup, device)
    step_s = median_time(step, steps, warmup, device)
    return {"backbone": cfg.model.backbone, "variant": variant, "view": cfg.data.crop_size[0],
            "patch": cfg.task.patch_size[0], "batch": batch, "fusion_ms": fuse_s * 1e3, "step_s": step_s,
            "share": fuse_s / step_s, "params_m": sum(p.numel() for p in task.parameters()) / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "paper"], help="recipe presets ('paper' = the defaults)")
    p.add_argument("--variants", nargs="+", default=["grid", "batch"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    device, where = device_and_name()
    print(f"# bench/volume_fusion.py on {where}; torch {torch.__version__}; {a.precision}")
    print("| backbone | variant | view → patch | batch | params (M) | fusion ms (median) | step s (median) | fusion share |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in a.presets:
        for variant in a.variants:
            r = bench(None if preset == "paper" else preset, variant, a.batch, a.precision, a.steps, a.warmup, device)
            print(f"| {r['backbone']} | {variant} | {r['view']}³ → {r['patch']}³ | {r['batch']} | {r['params_m']:.1f} | "
                  f"{r['fusion_ms']:.1f} | {r['step_s']:.3f} | {100 * r['share']:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
