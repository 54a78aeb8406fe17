"""``python -m medssl.pretrain``: train a recipe, export a run, import an official checkpoint.

    python -m medssl.pretrain [train] RECIPE [section.key=value …] --shards DIR [DIR …] --out RUN [--steps N] [--preset tiny]
    python -m medssl.pretrain RECIPE [--preset tiny] [section.key=value …] --print-config
    python -m medssl.pretrain RECIPE [--preset tiny] [section.key=value …] [--shards DIR] [--out RUN] --dry-run
    python -m medssl.pretrain export RUN_DIR [--tag stepNNNNNNNN] [--out DIR]
    python -m medssl.pretrain import hi_end_mae CHECKPOINT --out DIR
    python -m medssl.pretrain list
    python -m medssl.pretrain demo
    python -m medssl.pretrain ablate recipes/ablations/NAME.yaml [--out DIR] [--dry-run | --slurm | --collect] [--jobs N]

The same command runs as a plain process, under ``torchrun --nproc_per_node …`` and under the
``deepspeed`` launcher (``deepspeed --hostfile hosts --module medssl.pretrain RECIPE …``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = """commands:
  train RECIPE ...   pretrain a recipe on shard sets (`train` may be left out: python -m medssl.pretrain hi_end_mae ...)
  export RUN_DIR     consolidate a run's checkpoint into export/backbone.safetensors + manifest.json
  import NAME CKPT   convert an official released checkpoint into an export
  nnunet-overrides PLANS [CONFIGURATION]
                     the overrides that pretrain nnU-Net's own network for these plans (backbone, CT window, spacing)
  list               recipes (with presets) and backbones (with parameter counts)
  demo               the README's demo: phantoms -> shards -> pretraining -> export -> fine-tuning
  ablate FILE        a grid of pretraining cells x fine-tuning runs vs scratch: one table with error bars
                     (recipes/ablations/*.yaml; --dry-run, --slurm, --collect, --jobs N)

`python -m medssl.pretrain RECIPE --help` lists the training options."""

RESUME_HELP = """resuming (--resume):
  auto  (default) continue from the newest complete checkpoint in --out. The resolved config must equal
        the run's config.yaml, except for keys that may change on resume: train.steps (extend a run; the
        cosine schedule is spread over the new total), train.log_every, train.picture_every,
        train.checkpoint_every, train.keep_last, train.wandb, train.wandb_project. Any other difference is
        refused (exit 2) with the keys that differ.
  none  start from step 0. Into a folder that already holds a run this needs --overwrite, which moves the
        old run (config.yaml, checkpoints, export, metrics, pictures) into RUN/previous-<timestamp>/.
  PATH  continue from one checkpoint folder (RUN/checkpoints/stepNNNNNNNN, or just the tag); its run's
        config must match as for auto.

logs: on a terminal a progress bar; in a log file (SLURM, nohup, CI) one plain line every train.log_every
steps. --no-progress drops the bar but keeps the plain lines. DeepSpeed's start-up messages are shown with
--verbose or MEDSSL_DEBUG=1."""


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medssl.pretrain [train]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a recipe on shard sets with DeepSpeed (one CPU, or N nodes x M GPUs).\n"
                    "Defaults are the paper's setting; `--preset tiny` is a CPU-sized model and crop.\n\n" + COMMANDS,
        epilog=RESUME_HELP + "\n\nexample: torchrun --nproc_per_node 2 -m medssl.pretrain hi_end_mae --shards demo/shards "
               "--out runs/mae --preset tiny --steps 200 optim.lr=2e-4",
    )
    p.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.micro_batch=8")
    p.add_argument("--shards", nargs="+", action="extend", help="shard set folders (python -m medssl.shards build; "
                   "--shards A B or --shards A --shards B); required to train")
    p.add_argument("--out", help="run dir: config, metrics.jsonl, checkpoints, pictures, export; required to train")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--preset", help="a named preset of the recipe, e.g. tiny")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (newest complete checkpoint in --out, same config), none (step 0; --overwrite for a "
                        "folder holding a run) or a checkpoint folder; see below")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move the run already in --out to RUN/previous-<timestamp>/ and start anew")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON merged over the derived one (checked; no optimizer or "
                                              "scheduler blocks: those come from optim.*)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, presets and overrides applied) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model and check the config (and --shards, --out when given) without training: "
                        "print parameters per part and each decoder level's shape for one crop, write "
                        "OUT/model_summary.json, exit 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; plain lines every train.log_every steps")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's and torch's start-up messages "
                                                          "(also MEDSSL_DEBUG=1)")
    return p


@dataclass
class RunPlan:
    """What the argument phase decided, identically on every rank, before any process starts work."""
    resume: str = "auto"  # auto | none | tag
    resume_dir: str | None = None  # checkpoints folder of --resume PATH
    move_aside: str | None = None  # RUN/previous-<timestamp> with --resume none --overwrite
    changed: list = field(default_factory=list)  # (key, old, new) allowed to change on resume
    data: dict = field(default_factory=dict)  # shard sets, volumes, channels


def shard_channels(dirs: list[str]) -> dict:
    """Volumes and channels of each shard set (``samples.jsonl`` shapes ``[C, X, Y, Z]``); refuses sets whose
    volumes, or which among themselves, disagree on the channel count."""
    from .config import ConfigError

    per_set = {}
    for d in dirs:
        counts: dict[int, int] = {}
        path = Path(d) / "samples.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            if line.strip():
                shape = json.loads(line).get("shape") or [1]
                counts[int(shape[0])] = counts.get(int(shape[0]), 0) + 1
        if not counts:  # an index without samples.jsonl: count from the index, one channel
            idx = json.loads((Path(d) / "index.json").read_text())
            counts = {1: int(idx.get("samples", 0))}
        if len(counts) > 1:
            raise ConfigError(f"--shards {d}: volumes with different channel counts {sorted(counts)} "
                              f"({counts}); rebuild it from cases that all have the same sequences")
        per_set[d] = (next(iter(counts)), sum(counts.values()))
    chans = {c for c, _ in per_set.values()}
    if len(chans) > 1:
        listing = ", ".join(f"{d}: {c}" for d, (c, _) in per_set.items())
        raise ConfigError(f"--shards sets disagree on channels ({listing}); pretrain on sets with the same channels "
                          "(one run per channel layout)")
    return {"sets": list(per_set), "volumes": sum(n for _, n in per_set.values()),
            "channels": chans.pop() if chans else 1}


def _norm_shards(d: dict) -> dict:
    d = json.loads(json.dumps(d, default=str))
    d.get("data", {})["shards"] = [str(Path(s).resolve()) for s in d.get("data", {}).get("shards", [])]
    return d


def plan_run_dir(cfg, resume: str, overwrite: bool) -> RunPlan:
    """Decide resume / new run / move aside from what is in the run dir; refuses a changed config."""
    import yaml

    from .checkpoint import complete_tags, run_items
    from .config import ConfigError, config_diff

    run_dir = Path(cfg.out)
    plan = RunPlan(resume=resume)
    if resume not in ("auto", "none"):
        ck = Path(resume)
        if not ck.is_dir() and (run_dir / "checkpoints" / resume).is_dir():
            ck = run_dir / "checkpoints" / resume
        if not (ck / "complete.json").is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (one holding complete.json, e.g. "
                              f"{run_dir / 'checkpoints' / 'step00001000'}); use auto, none or such a folder"
                              + (f" (complete ones in {run_dir / 'checkpoints'}: "
                                 f"{', '.join(complete_tags(run_dir / 'checkpoints'))})"
                                 if complete_tags(run_dir / "checkpoints") else ""))
        plan.resume, plan.resume_dir = ck.name, str(ck.parent)
    items = run_items(run_dir)
    ways_out = (f"start a new run with another --out, or replace this one with --resume none --overwrite "
                f"(the old run is moved to {run_dir}/previous-<timestamp>/)")
    if resume == "none":
        if items and not overwrite:
            raise ConfigError(f"--out {run_dir} already holds a run ({', '.join(items)}) and --resume none would "
                              f"start it again from step 0: add --overwrite to move the old run aside, or use "
                              f"another --out (or --resume auto to continue it)")
        if items:
            plan.move_aside = str(run_dir / time.strftime("previous-%Y%m%d-%H%M%S"))
        return plan
    ref = run_dir / "config.yaml"
    if plan.resume_dir and (Path(plan.resume_dir).parent / "config.yaml").is_file():
        ref = Path(plan.resume_dir).parent / "config.yaml"
    if ref.is_file():
        try:
            old = yaml.safe_load(ref.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{ref}: cannot be read ({exc}); {ways_out}") from None
        try:  # keys this version added read as their defaults, so an older run still resumes
            from .config import config_from_dict

            old = config_from_dict(old).to_dict()
        except (ValueError, KeyError, TypeError):
            pass  # a recipe or key this version does not know: compare as written
        refusing, allowed = config_diff(_norm_shards(old), _norm_shards(cfg.to_dict()))
        if refusing:
            keys = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, o, n in refusing)
            raise ConfigError(f"--out {run_dir} holds a run with another config ({ref}); these keys differ "
                              f"(old -> new):\n{keys}\nA run continues only with its own config. To keep both, {ways_out}")
        plan.changed = allowed
    elif items and not plan.resume_dir:
        raise ConfigError(f"--out {run_dir} holds run files ({', '.join(items)}) but no config.yaml to compare with; "
                          f"{ways_out}")
    return plan


def resolve(args) -> tuple:
    """Config + checks that must fail before any process starts work: (config, DeepSpeed JSON, plan)."""
    import torch

    from .backbones import build_backbone
    from .config import ConfigError, load_config, set_dotted, task_class
    from .engine import check_batch, deepspeed_config, launcher_world_size, read_deepspeed_json
    from .train import backbone_kwargs

    cfg = load_config(args.recipe, args.overrides, args.preset)
    cfg.data.shards = [str(Path(s)) for s in args.shards]
    cfg.out = str(Path(args.out))
    if args.steps is not None:
        set_dotted(cfg, "train.steps", args.steps)
    for d in cfg.data.shards:
        if not (Path(d) / "index.json").exists():
            raise ConfigError(f"--shards {d}: no index.json (build it with `python -m medssl.shards build … --out {d}`)")
    from .train import check_optim

    check_optim(cfg)
    data = shard_channels(cfg.data.shards)
    given = cfg.model.kwargs.get("in_chans")
    if given is not None and int(given) != data["channels"]:
        raise ConfigError(f"model.kwargs.in_chans={given} but the shards hold {data['channels']}-channel volumes: "
                          f"drop the override (the channel count is taken from the shards)")
    if data["channels"] != 1:
        cfg.model.kwargs["in_chans"] = data["channels"]
    plan = plan_run_dir(cfg, args.resume, args.overwrite)
    plan.data = data
    with torch.device("meta"):  # constructor checks (crop vs patch, widths, heads) without allocating
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **backbone_kwargs(cfg))
        task_class(cfg.recipe)(backbone, cfg.task)
    if hasattr(task_class(cfg.recipe), "check_config"):  # what the task needs of the data and the batch
        task_class(cfg.recipe).check_config(cfg)
    from .train import crop_device, stream_config

    stream_config(cfg)  # the data.* values the crop stream checks
    crop_device(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # and where crops are cut
    world = launcher_world_size()
    check_batch(cfg, world)
    ds_user = read_deepspeed_json(args.deepspeed_config) if args.deepspeed_config else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # conflicts with the recipe's batch, precision, ZeRO stage
        deepspeed_config(cfg, world, device, ds_user)
    except ConfigError as exc:
        if not args.deepspeed_config:
            raise
        raise ConfigError(str(exc).replace("--deepspeed-config", f"--deepspeed-config {args.deepspeed_config}", 1)) from None
    return cfg, ds_user, plan


def dry_run(args) -> int:
    """``--dry-run``: the checks a launch makes (with ``--shards``/``--out``: the shard sets and the run folder
    too), the task built for real on the CPU, then :func:`pretrain.summary.summarize`. Trains nothing."""
    import torch

    from .backbones import build_backbone
    from .config import load_config, set_dotted, task_class
    from .engine import check_batch, deepspeed_config, launcher_world_size, read_deepspeed_json
    from .summary import SUMMARY_FILE, summarize, summary_text

    if args.shards and args.out:
        cfg, _, plan = resolve(args)
        notes = [f"shards: {plan.data['volumes']} volumes of {plan.data['channels']} channel(s) in "
                 f"{len(plan.data['sets'])} set(s); run folder: "
                 + ("resumes" if plan.resume == "auto" and (Path(cfg.out) / "config.yaml").is_file() else "new run")]
    else:
        cfg = load_config(args.recipe, args.overrides, args.preset)
        if args.steps is not None:
            set_dotted(cfg, "train.steps", args.steps)
        world = launcher_world_size()
        check_batch(cfg, world)
        ds_user = read_deepspeed_json(args.deepspeed_config) if args.deepspeed_config else None
        deepspeed_config(cfg, world, torch.device("cuda" if torch.cuda.is_available() else "cpu"), ds_user)
        notes = ["shards and run folder not checked (pass --shards and --out)"]
    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher: one summary
        return 0
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
    task = task_class(cfg.recipe)(backbone, cfg.task)
    in_chans = int(getattr(backbone, "in_chans", None) or backbone.config.get("in_chans", 1))
    levels = task.summary_levels() if hasattr(task, "summary_levels") else []
    run = task.trace if hasattr(task, "trace") else None
    summary = summarize(task, levels if run else [], run, [1, in_chans, *cfg.data.crop_size],
                        args.out, kind="pretrain", recipe=cfg.recipe, backbone=cfg.model.backbone,
                        config_hash=cfg.hash(),
                        batch={"micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
                               "crops_per_volume": cfg.data.crops_per_volume}, notes=notes)
    print(f"{cfg.recipe}: {cfg.model.backbone} on {list(cfg.data.crop_size)} crops, {cfg.train.micro_batch} per "
          f"process per step × grad_accum {cfg.train.grad_accum}, lr {cfg.optim.lr:g}")
    print(summary_text(summary))
    for note in notes:
        print(note)
    where = f"; wrote {Path(args.out) / SUMMARY_FILE}" if args.out else " (pass --out to write model_summary.json)"
    print(f"dry run: nothing trained{where}")
    return 0


def list_command() -> int:
    """Recipes (first comment line of the YAML, presets) and backbones (parameter counts, built on meta)."""
    import torch
    import yaml

    from .backbones import BACKBONES, build_backbone
    from .config import RECIPES_DIR

    print("recipes:")
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        text = path.read_text()
        first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        presets = sorted((yaml.safe_load(text) or {}).get("presets") or {})
        print(f"  {path.stem:<16} {first}")
        print(f"  {'':<16} presets: {', '.join(presets) or 'none'}")
    print("backbones:")
    for name in BACKBONES.names():
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in build_backbone(name).parameters())
            size = f"{n / 1e6:8.1f} M parameters (default img_size)"
        except Exception as exc:  # noqa: BLE001 - a backbone that needs arguments still gets listed
            size = f"(needs arguments: {type(exc).__name__})"
        print(f"  {name:<20} {size}")
    return 0


def _error(msg: str) -> int:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from medssl.pretrain.engine import strip_launcher_args

    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv:
        print("usage: python -m medssl.pretrain COMMAND ...\n\n" + COMMANDS)
        return 2
    if argv[0] in ("-h", "--help"):
        _train_parser().print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from medssl import __version__

        print(f"medssl {__version__}")
        return 0
    if argv[0] == "export":
        p = argparse.ArgumentParser(prog="python -m medssl.pretrain export",
                                    description="Consolidate a run's checkpoint (ZeRO shards) to fp32 and write "
                                                "export/backbone.safetensors + export/manifest.json")
        p.add_argument("run_dir")
        p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
        p.add_argument("--out", help="export folder (default RUN_DIR/export)")
        p.add_argument("--format", action="append", choices=["medssl", "nnunet", "monai"], default=[],
                       help="also write the export in another framework's format (repeatable): nnunet = "
                            "export/nnunet_pretrained.pth, the file `nnUNetv2_train … -pretrained_weights` loads "
                            "(runs with model.backbone=nnunet_resenc or nnunet_plain); monai = export/monai_unetr.pt, "
                            "the state dict of monai.networks.nets.UNETR (vit3d_base_p16 layouts; --monai-network vit "
                            "for other ViT sizes) and the lines that load it; the medssl export is always written")
        p.add_argument("--monai-network", choices=["unetr", "vit"], default="unetr",
                       help="with --format monai: UNETR (encoder filled, its decoder new) or ViT (loads strictly)")
        p.add_argument("--monai-img-size", type=int, nargs="+", metavar="N",
                       help="with --format monai: the crop the MONAI network is built for (one size or X Y Z; default "
                            "the pretraining crop); the position embedding is computed for it")
        a = p.parse_args(argv[1:])
        from .config import ConfigError
        from .export import export_run

        try:
            dest = export_run(a.run_dir, a.tag, a.out)
            if "nnunet" in a.format:
                from .nnunet_format import export_nnunet

                export_nnunet(dest)
            if "monai" in a.format:
                from .monai_format import export_monai

                size = a.monai_img_size
                if size is not None and len(size) not in (1, 3):
                    return _error(f"--monai-img-size {' '.join(map(str, size))}: give one size or three (X Y Z)")
                export_monai(dest, network=a.monai_network,
                             img_size=None if size is None else (size * 3 if len(size) == 1 else size))
        except (ConfigError, ValueError) as exc:
            return _error(str(exc))
        return 0
    if argv[0] == "nnunet-overrides":
        from .backbones.nnunet import main as nnunet_main

        return nnunet_main(argv[1:])
    if argv[0] == "import":
        from .importers import main as import_main

        return import_main(argv[1:])
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "list":
        return list_command()
    if argv[0] == "ablate":
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    if argv[0] == "train":
        argv = argv[1:]
    parser = _train_parser()
    args = parser.parse_intermixed_args(argv)
    # `--shards DIR key=value` : argparse hands the override to --shards; give it back
    args.overrides += [s for s in args.shards or [] if "=" in s]
    args.shards = [s for s in args.shards or [] if "=" not in s]
    if args.verbose:
        os.environ["MEDSSL_DEBUG"] = "1"
    from .config import ConfigError

    if args.print_config:
        import yaml

        from .config import load_config, set_dotted

        try:
            cfg = load_config(args.recipe, args.overrides, args.preset)
            if args.steps is not None:
                set_dotted(cfg, "train.steps", args.steps)
        except (ValueError, KeyError) as exc:
            return _error(exc.args[0] if isinstance(exc, KeyError) else str(exc))
        cfg.data.shards = list(args.shards)
        cfg.out = args.out or ""
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.dry_run:
        try:
            return dry_run(args)
        except (ValueError, KeyError) as exc:
            return _error(exc.args[0] if isinstance(exc, KeyError) else str(exc))
    missing = [flag for flag, v in (("--shards", args.shards), ("--out", args.out)) if not v]
    if missing:
        parser.print_usage(sys.stderr)
        return _error(f"training needs {' and '.join(missing)} (or --print-config to only show the config)")
    if args.overwrite and args.resume != "none":
        return _error(f"--overwrite only goes with --resume none (it replaces the run in --out); "
                      f"with --resume {args.resume} the run is continued, not replaced")
    try:
        cfg, ds_user, plan = resolve(args)
    except (ValueError, KeyError) as exc:  # ConfigError, and the constructors' argument checks
        return _error(exc.args[0] if isinstance(exc, KeyError) else str(exc))
    from .checkpoint import CheckpointMismatch, CheckpointUnusable
    from .train import train

    try:
        train(cfg, resume=plan.resume, ds_user=ds_user, progress=not args.no_progress, plan=plan)
    except (CheckpointMismatch, CheckpointUnusable) as exc:
        return _error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
