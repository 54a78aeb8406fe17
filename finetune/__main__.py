"""``python -m medssl.finetune``: an export (or a MONAI checkpoint) becomes a segmentation model; Dice vs scratch.

    python -m medssl.finetune --export RUN/export --data DATASET --out RUNS/pre [--n-train 4] [--preset tiny] [key=value …]
    python -m medssl.finetune --export RUN/export --data DATASET --out RUNS/scratch --init scratch …
    python -m medssl.finetune --export RUN/export --data DATASET --out RUNS/pre --dry-run   (network + summary only)
    python -m medssl.finetune report RUNS/pre RUNS/scratch --out report.md
    python -m medssl.finetune predict RUNS/pre --images DIR|FILE --out DIR [--tta no]

A run folder keeps its work: checkpoints every ``train.checkpoint_every`` steps, and the same command
continues it (``--resume auto``); a finished run is not trained again (a larger ``--steps`` extends it).

Runs as a plain process (one CPU or GPU) or under ``torchrun`` / ``deepspeed`` on several GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medssl.finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a pretrained export on a labelled dataset (DiceCE, DeepSpeed) and report test Dice.\n"
                    "The preprocessing (orientation, spacing, intensity window) is read from the export's manifest.\n"
                    "Run it twice, with the default --init pretrained and with --init scratch (same split, same\n"
                    "seeds, same decoder init), then `python -m medssl.finetune report RUN_A RUN_B --out report.md`.\n"
                    "Defaults follow the official UNETR/Hi-End-MAE downstream setting; --preset tiny is CPU-sized.",
        epilog="example: python -m medssl.finetune --export demo/runs/hi_end_mae_tiny/export --data demo/raw/Dataset902_PhantomCTLabelled "
               "--out demo/ft/pretrained --preset tiny --n-train 4 optim.lr=5e-4")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 model.freeze_encoder=true "
                                                "model.layer_decay=0.75 data.crop_size=[96,96,96]")
    p.add_argument("--export", help="medssl export folder (manifest.json + backbone.safetensors), or a MONAI "
                                    "SwinUNETR/UNETR self-supervised checkpoint file (.pt/.pth/.safetensors)")
    p.add_argument("--data", required=True, help="labelled data: nnU-Net/MSD folder (dataset.json), CSV "
                                                 "(path,label[,modality]) or a labelled shard set")
    p.add_argument("--out", required=True, help="run folder: config, split, metrics.json, predictions/, overlays/")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                   help="load the export's weights, or the same network from random init (the baseline)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--n-train", type=int, help="few-shot: train on the first N volumes of the seeded split")
    p.add_argument("--preset", help="tiny: a CPU-sized crop, decoder and schedule")
    p.add_argument("--resume", default="auto", choices=["auto", "none"],
                   help="auto: continue the run in --out from its newest complete checkpoint (a finished run is "
                        "left as it is); none: start over (needs --overwrite when --out holds a run)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move the previous run into OUT/previous-<time>/ (nothing is deleted)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the data, build the network and load the export's weights without training: print "
                        "parameters per part and each decoder level's shape for one crop, write OUT/model_summary.json, "
                        "exit 0")
    p.add_argument("--no-progress", action="store_true")
    return p


def _predict_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.finetune predict",
                                description="Segment NIfTI images with a fine-tuning run's model_best.safetensors; "
                                            "the network and preprocessing come from the run folder alone")
    p.add_argument("run", help="fine-tuning run folder (model_best.safetensors + network.json)")
    p.add_argument("--images", required=True, help="a NIfTI file (.nii/.nii.gz) or a folder of them")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz label maps (each in its image's geometry)")
    p.add_argument("--tta", default="no", choices=["no"], help="test-time augmentation (not offered yet)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="predict even if the run's weights hold NaN/inf (refused by default)")
    a = p.parse_args(argv)
    from medssl.pretrain.manifest import ExportError
    from medssl.shards.errors import InputError

    from .predict import PredictError, predict_run

    try:
        for line in predict_run(a.run, a.images, a.out, device=a.device, allow_nonfinite=a.allow_nonfinite):
            print(line, flush=True)
    except (PredictError, InputError, ExportError) as exc:
        if os.environ.get("MEDSSL_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _report_main(argv) -> int:
    from .report import write_report

    p = argparse.ArgumentParser(prog="python -m medssl.finetune report",
                                description="One Dice table (per class, per run) and the overlays of several runs")
    p.add_argument("runs", nargs="+", help="fine-tuning run folders (metrics.json)")
    p.add_argument("--out", default="report.md")
    a = p.parse_args(argv)
    try:
        print(write_report(a.runs, a.out))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from medssl.pretrain.engine import strip_launcher_args

    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    if argv and argv[0] == "predict":
        return _predict_main(argv[1:])
    args = _parser().parse_intermixed_args(argv)
    from medssl.pretrain.config import ConfigError

    from .config import load_config, set_dotted

    try:
        absolute = lambda v: str(Path(v).expanduser().resolve()) if v else v  # noqa: E731 - a self-contained run dir
        cfg = load_config(args.overrides, args.preset, out=absolute(args.out), export=absolute(args.export),
                          init=args.init, dataset=absolute(args.data))
        if args.steps is not None:
            set_dotted(cfg, "train.steps", args.steps)
        if args.n_train is not None:
            set_dotted(cfg, "data.n_train", args.n_train)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from medssl.pretrain.export import ExportError
    from medssl.shards.errors import InputError

    try:
        from .loading import check_export

        check_export(cfg, log=lambda *a: None)  # a refused export leaves --out untouched (nothing made or moved)
        if args.dry_run:
            from .train import dry_run

            if int(os.environ.get("RANK", 0)) == 0:
                dry_run(cfg)
            return 0
        from .train import finetune

        finetune(cfg, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
    except (InputError, ExportError, ValueError, FileNotFoundError) as exc:  # bad input: the message says the fix
        if os.environ.get("MEDSSL_TRACEBACK"):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
