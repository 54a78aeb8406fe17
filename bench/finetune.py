"""Fine-tuning benchmark: training steps/s of a segmentation network and sliding-window volumes/s.

Usage:
  python bench/finetune.py                                        # CPU: tiny (48³) and base (96³) UNETR, fp32
  python bench/finetune.py --models vit3d_base_p16 --crop 96 --batch 4 --precision bf16    # one GPU

Train step: forward + DiceCE + backward + AdamW step of ``SegmentationNet`` (the backbone + the UNETR
decoder ``python -m medssl.finetune`` builds) on random crops with random labels (7 classes). Inference: MONAI
``sliding_window_inference`` (the harness's ``predict_probs``: overlap, softmax) over one volume of
``--volume`` voxels — 256×256×160 is an abdominal CT at 1.5 mm. Medians over ``--steps`` timed runs
after ``--warmup``. The data path (preparing volumes, drawing crops) is not included: it costs ~3 ms per
batch of 2 crops from cached volumes on this class of CPU (measured with the crop sampler alone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import device_and_name, median_time  # noqa: E402 - one timing rule for every bench script


def build(model_name: str, crop: int, feature_size: int, device: torch.device):
    from medssl.finetune.config import load_config
    from medssl.finetune.models import SegmentationNet, make_decoder
    from medssl.pretrain.backbones import build_backbone

    cfg = load_config([f"data.crop_size=[{crop},{crop},{crop}]", f"model.feature_size={feature_size}"])
    vit = {"cls_token": False, "pos_embed": "learned"} if model_name.startswith("vit3d") else {}  # as fine-tuning
    bb = build_backbone(model_name, img_size=[crop] * 3, **vit)
    return SegmentationNet(bb, make_decoder(bb, "auto", 1, 7, cfg)[1]).to(device), cfg


def bench(model_name, crop, feature_size, batch, volume, overlap, sw_batch, precision, steps, warmup, device) -> dict:
    from monai.losses import DiceCELoss

    from medssl.finetune.evaluate import predict_probs
    from medssl.finetune.models import param_groups

    model, cfg = build(model_name, crop, feature_size, device)
    cfg.eval.overlap, cfg.eval.sw_batch = overlap, sw_batch
    opt = torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    x = torch.rand(batch, 1, crop, crop, crop, device=device)
    y = torch.randint(0, 7, (batch, 1, crop, crop, crop), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with amp:
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = median_time(step, steps, warmup, device)
    vol = torch.rand(1, *volume).numpy()  # [C, X, Y, Z]
    infer_s = median_time(lambda: predict_probs(model, vol, cfg, device, amp), max(1, steps // 2), 1, device)
    return {"model": model_name, "crop": crop, "feature_size": feature_size, "batch": batch, "precision": precision,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": step_s, "steps_per_s": 1 / step_s,
            "crops_per_s": batch / step_s, "volume": "x".join(map(str, volume)), "overlap": overlap,
            "infer_s": infer_s, "volumes_per_s": 1 / infer_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="backbones (default: tiny at 48³ and base at 96³)")
    p.add_argument("--crop", type=int, help="crop / ROI size (default: 48 for tiny, 96 otherwise)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--feature-size", type=int, help="UNETR feature_size (default 12 for tiny, 32 otherwise: "
                   "the fine-tuning default)")
    p.add_argument("--volume", type=int, nargs=3, default=[256, 256, 160])
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    device, where = device_and_name()
    print(f"# bench/finetune.py on {where}; torch {torch.__version__}; volume {a.volume}, overlap {a.overlap}")
    print("| model | crop | feature_size | batch | precision | params (M) | step s (median) | steps/s | crops/s "
          "| sliding window s/volume | volumes/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models or ["vit3d_tiny_p16", "vit3d_base_p16"]:
        crop = a.crop or (48 if "tiny" in name else 96)
        fs = a.feature_size or (12 if "tiny" in name else 32)
        r = bench(name, crop, fs, a.batch, a.volume, a.overlap, a.sw_batch, a.precision, a.steps, a.warmup, device)
        print(f"| {name} | {crop}³ | {fs} | {a.batch} | {a.precision} | {r['params_m']:.1f} | {r['step_s']:.3f} | "
              f"{r['steps_per_s']:.2f} | {r['crops_per_s']:.2f} | {r['infer_s']:.2f} | {r['volumes_per_s']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
