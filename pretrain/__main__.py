"""``python -m medssl.pretrain``: train a recipe, export a run, import an official checkpoint.

    python -m medssl.pretrain RECIPE [section.key=value …] --shards DIR [DIR …] --out RUN [--steps N] [--preset tiny]
    python -m medssl.pretrain export RUN_DIR [--tag stepNNNNNNNN] [--out DIR]
    python -m medssl.pretrain import hi_end_mae CHECKPOINT --out DIR
    python -m medssl.pretrain list

The same command runs as a plain process, under ``torchrun --nproc_per_node …`` and under the
``deepspeed`` launcher (``deepspeed --hostfile hosts --module medssl.pretrain RECIPE …``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medssl.pretrain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a recipe on shard sets with DeepSpeed (one CPU, or N nodes x M GPUs).\n"
                    "Defaults are the paper's setting; `--preset tiny` is a CPU-sized model and crop.\n"
                    "Other commands: `python -m medssl.pretrain export RUN_DIR`, `python -m medssl.pretrain import NAME CKPT "
                    "--out DIR`, `python -m medssl.pretrain list`, `python -m medssl.pretrain demo` (the README's demo).",
        epilog="example: torchrun --nproc_per_node 2 -m medssl.pretrain hi_end_mae --shards demo/shards --out runs/mae "
               "--preset tiny --steps 200 optim.lr=2e-4",
    )
    p.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.micro_batch=8")
    p.add_argument("--shards", nargs="+", required=True, help="shard set folders (python -m medssl.shards build)")
    p.add_argument("--out", required=True, help="run dir: config, metrics.jsonl, checkpoints, pictures, export")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--preset", help="a named preset of the recipe, e.g. tiny")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint in the run dir) or none")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON merged over the derived one (checked)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(args) -> tuple:
    """Config + checks that must fail before any process starts work."""
    import torch

    from .backbones import build_backbone
    from .config import load_config, set_dotted
    from .engine import check_batch, launcher_world_size

    cfg = load_config(args.recipe, args.overrides, args.preset)
    cfg.data.shards = [str(Path(s)) for s in args.shards]
    cfg.out = str(Path(args.out))
    if args.steps is not None:
        set_dotted(cfg, "train.steps", args.steps)
    for d in cfg.data.shards:
        if not (Path(d) / "index.json").exists():
            raise ValueError(f"--shards {d}: no index.json (build it with `python -m medssl.shards build … --out {d}`)")
    with torch.device("meta"):  # constructor checks (crop vs patch, widths, heads) without allocating
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        from .config import task_class

        task_class(cfg.recipe)(backbone, cfg.task)
    check_batch(cfg, launcher_world_size())
    ds_user = json.loads(Path(args.deepspeed_config).read_text()) if args.deepspeed_config else None
    return cfg, ds_user


def main(argv=None) -> int:
    from medssl.pretrain.engine import strip_launcher_args

    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m medssl.pretrain export",
                                    description="Consolidate a run's checkpoint (ZeRO shards) to fp32 and write "
                                                "export/backbone.safetensors + export/manifest.json")
        p.add_argument("run_dir")
        p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
        p.add_argument("--out", help="export folder (default RUN_DIR/export)")
        a = p.parse_args(argv[1:])
        from .export import export_run

        export_run(a.run_dir, a.tag, a.out)
        return 0
    if argv and argv[0] == "import":
        from .importers import main as import_main

        return import_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "list":
        from .backbones import BACKBONES
        from .config import RECIPES_DIR

        print("recipes:  ", ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))))
        print("backbones:", ", ".join(BACKBONES.names()))
        return 0
    args = _train_parser().parse_intermixed_args(argv)
    # `--shards DIR key=value` : argparse hands the override to --shards; give it back
    args.overrides += [s for s in args.shards if "=" in s]
    args.shards = [s for s in args.shards if "=" not in s]
    try:
        cfg, ds_user = resolve(args)
    except (ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    from .train import train

    train(cfg, resume=args.resume, ds_user=ds_user, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
