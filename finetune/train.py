"""The fine-tuning loop, on the same DeepSpeed engine as pretraining.

prepare (checks every volume before any training) → split → build model + load report → DeepSpeed →
``for step``: lr (warm-up + cosine, scaled per layer group) → crops → DiceCE → backward → step → log →
every ``train.eval_every`` steps: sliding-window Dice on the validation volumes (spread over the
processes), keep the best weights → test with the best weights: predictions in the original geometry,
Dice per class, overlays → ``metrics.json``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medssl.pretrain import engine
from medssl.pretrain.train import RunLog, lr_at


def _log0(env):
    return print if env.is_main else (lambda *a, **k: None)


def _nanmean(values) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(text: str) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy()))


def _network_spec(model, arch: str, in_ch: int, n_classes: int, classes: dict, pre, cfg, component,
                  modality: str | None) -> dict:
    """Everything ``finetune predict`` needs to rebuild the network and repeat the preprocessing."""
    return {"format": 1, "backbone": {"name": getattr(model, "backbone_name", arch),
                                      "kwargs": getattr(model, "backbone_kwargs", None)},
            "decoder": {"arch": arch, "component": component,
                        "kwargs": {"feature_size": cfg.model.feature_size, "norm": cfg.model.norm,
                                   "res_block": cfg.model.res_block}},
            "in_channels": in_ch, "out_channels": n_classes, "classes": {str(k): v for k, v in classes.items()},
            "crop_size": list(cfg.data.crop_size), "preprocessing": pre.to_dict(), "modality": modality,
            "eval": {"overlap": cfg.eval.overlap, "sw_batch": cfg.eval.sw_batch, "mode": cfg.eval.mode}}


def _save_best(path: Path, state: dict, best: dict, spec: dict) -> None:
    from medssl.pretrain.export import save_safetensors

    save_safetensors({k: v.contiguous() for k, v in state.items()}, path,
                     metadata={"step": str(best["step"]), "val_dice": str(best["dice"]), "network": json.dumps(spec)})


def _dice_line(step: int, total: int, score: float, per_class: dict, best: dict) -> str:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in per_class.items())
    return (f"val step {step}/{total}: mean Dice {score:.4f} ({parts}); best {best['dice']:.4f} at step "
            f"{best['step']}")


def _data_plan(cfg):
    """What a run reads before any volume: the export's manifest (None without one), the preprocessing, the
    discovered cases with their declared classes, and the seeded split."""
    from . import data as D

    manifest = None
    if cfg.export and Path(cfg.export).is_dir():
        from medssl.pretrain.export import read_manifest

        manifest = read_manifest(cfg.export)
    pre = D.preprocessing(manifest, cfg)
    sources, declared = D.discover(cfg.dataset, cfg.data.labels)
    split = D.split_cases([s.key for s in sources], cfg.data.n_val, cfg.data.test_fraction, cfg.data.n_train,
                          cfg.data.split_seed)
    return manifest, pre, sources, declared, split


def dry_run(cfg) -> dict:
    """``--dry-run``: the dataset discovered and split, the first training volume prepared (its channels; the classes
    from dataset.json, else that volume's labels), the network built and the export's weights loaded as a real run
    would, then parameters per part and each decoder level's shape for one crop (``pretrain.summary``), written as
    ``OUT/model_summary.json``. Nothing else is written; nothing is trained."""
    from medssl.pretrain.summary import SUMMARY_FILE, summarize, summary_text

    from . import data as D
    from .loading import build

    manifest, pre, sources, declared, split = _data_plan(cfg)
    first = D.prepare([next(s for s in sources if s.key == split["train"][0])], pre, declared, False)[0]
    classes = declared or {0: "background", **{int(v): f"class{int(v)}" for v in np.unique(first.label) if v}}
    n_classes = max(classes) + 1
    in_ch = cfg.model.in_channels or int(first.image.shape[0])
    notes: list[str] = []
    model, report, _, arch = build(cfg, in_ch, n_classes, log=notes.append)
    levels = [(f"decoder.{n}", m) for n, m in getattr(model.decoder, "summary_levels", lambda: [])()] \
        if hasattr(model, "decoder") else []
    crop = [int(c) for c in cfg.data.crop_size]
    summary = summarize(model, levels, model, [1, in_ch, *crop], cfg.out, kind="finetune", init=cfg.init,
                        export=cfg.export, backbone=getattr(model, "backbone_name", arch), arch=arch,
                        classes={str(k): v for k, v in classes.items()},
                        split={k: len(v) for k, v in split.items() if isinstance(v, list)}, load_report=report.to_dict(),
                        config_hash=cfg.hash())
    print(f"data: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test volumes of "
          f"{cfg.dataset}; {n_classes - 1} foreground classes; {in_ch} input channel(s)"
          + ("" if declared else " (classes found in the first training volume)"))
    print(f"model: {getattr(model, 'backbone_name', arch)} + {arch} decoder; init {cfg.init}\n{report.summary()}")
    print(summary_text(summary))
    print(f"dry run: nothing trained; wrote {Path(cfg.out) / SUMMARY_FILE}")
    return summary


def finetune(cfg, progress: bool = True, resume: str = "auto", overwrite: bool = False) -> dict:
    """Run one fine-tuning job (call on every process); returns the metrics rank 0 wrote.

    ``resume``: ``auto`` continues from the newest complete checkpoint of ``cfg.out`` (a finished run
    with as many steps returns its metrics without training); ``none`` starts over (``overwrite`` moves
    a previous run aside)."""
    import deepspeed
    from monai.losses import DiceCELoss

    from medssl.pretrain import checkpoint as ckpt
    from medssl.pretrain.progress import Progress

    from .rundir import RunDirError, plan

    from . import data as D
    from .evaluate import dice_per_class, overlay_png, predict_probs, resample_to_original, write_nifti
    from .loading import build
    from .models import param_groups
    from medssl.pretrain.checkpoint import param_digest

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    env = engine.init_distributed()
    say = _log0(env)
    run = Path(cfg.out)
    t0 = time.time()
    decision: dict = {}
    if env.is_main:
        try:
            decision = plan(cfg, resume, overwrite)
        except RunDirError as exc:
            decision = {"error": str(exc)}
    decision = engine.all_gather_object(decision)[0]
    if "error" in decision:
        raise RunDirError(decision["error"])
    if decision.get("moved"):
        say(f"--overwrite: the previous run was moved to {decision['moved']}")
    if decision["action"] == "finished":
        say(f"{run} is a finished run ({decision['steps']} steps, metrics.json); nothing to do (pass a larger "
            "--steps to continue it, or a new --out)")
        return json.loads((run / "metrics.json").read_text())

    # ---- data: discover, split, prepare (all checks happen here, before any training) -----------------
    manifest, pre, sources, declared, split = _data_plan(cfg)
    by_key = {s.key: s for s in sources}
    mine = lambda keys: keys[env.rank::env.world_size]  # noqa: E731 - evaluation volumes of this process
    train_cases = D.prepare([by_key[k] for k in split["train"]], pre, declared, progress and env.is_main, "prepare train")
    val_cases = D.prepare([by_key[k] for k in mine(split["val"])], pre, declared, False)
    test_cases = D.prepare([by_key[k] for k in mine(split["test"])], pre, declared, progress and env.is_main,
                           "prepare test")
    found = sorted(set().union(*(set(np.unique(c.label).tolist()) for c in train_cases)))
    classes = declared or {0: "background", **{int(v): f"class{int(v)}" for v in found if v}}
    n_classes = max(classes) + 1
    in_ch = cfg.model.in_channels or int(train_cases[0].image.shape[0])
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        cfg.dump(run / "config.yaml")
        (run / "split.json").write_text(json.dumps(split, indent=1))
        if manifest is not None:  # the run folder records what it was fine-tuned from
            shutil.copyfile(Path(cfg.export) / "manifest.json", run / "manifest.json")
    say(f"data: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test volumes of "
        f"{cfg.dataset}; {n_classes - 1} foreground classes ({', '.join(f'{k} {v}' for k, v in classes.items() if k)}); "
        f"spacing {pre.spacing or 'native'} mm, CT window {list(pre.window.ct)} -> {list(pre.window.out)}")

    # ---- model -----------------------------------------------------------------------------------------
    model, report, _, arch = build(cfg, in_ch, n_classes, log=say)
    spec = _network_spec(model, arch, in_ch, n_classes, classes, pre, cfg, getattr(model, "component", None),
                         train_cases[0].meta.get("modality") or train_cases[0].source.modality)
    if env.is_main:
        (run / "network.json").write_text(json.dumps(spec, indent=1))
    decoder_digest = param_digest(model.decoder)[:16] if hasattr(model, "decoder") else None
    say(f"model: {getattr(model, 'backbone_name', arch)} + {arch} decoder, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; init {cfg.init}\n{report.summary()}")
    groups = param_groups(model, cfg.optim.weight_decay, cfg.model.layer_decay, cfg.model.freeze_encoder)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    ds_config = engine.deepspeed_config(cfg, env.world_size, env.device)
    eng, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    prec = engine.precision(cfg, env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6,
                         lambda_dice=cfg.loss.dice_weight, lambda_ce=cfg.loss.ce_weight)

    # ---- resume: the newest complete checkpoint of this run folder ----------------------------------
    ckpt_dir = run / "checkpoints"
    best = {"dice": -1.0, "step": 0}
    best_state = None
    history = []
    start = 0
    if decision["action"] == "continue":
        start, _, state = ckpt.resume(eng, ckpt_dir, env.rank, env.world_size, log=say)
        if state is not None:
            best, history = state["best"], state["history"]
            _set_rng_state(state["torch_rng"])
            best_file = ckpt_dir / ckpt.tag_for(start) / "best.safetensors"
            if best_file.exists():
                from safetensors.torch import load_file

                best_state = load_file(str(best_file))
            say(f"continuing {run} from step {start} (best validation Dice {best['dice']:.4f} at step {best['step']})")
    sampler = D.CropSampler(train_cases, pre.window, cfg, cfg.train.micro_batch, cfg.train.seed, env.rank, start)
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=cfg.data.num_workers,
                                         persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)
    log = RunLog(cfg, run, env.is_main)
    bar = Progress(cfg.train.steps, initial=start, desc=f"finetune {cfg.init}", every=cfg.train.log_every,
                   enabled=env.is_main and progress)

    def validate() -> tuple[float, dict]:
        scores = {}
        for c in val_cases:
            probs = predict_probs(eng.module, c.normalised(pre.window), cfg, env.device, autocast)
            scores[c.key] = dice_per_class(probs.argmax(0).numpy(), c.label, n_classes)["dice"]
        merged = {k: v for part in engine.all_gather_object(scores) for k, v in part.items()}
        per_class = {classes.get(c, f"class{c}"): _nanmean(d[c] for d in merged.values()) for c in range(1, n_classes)}
        return (_nanmean(_nanmean(d.values()) for d in merged.values()) if merged else float("nan")), per_class

    def save_checkpoint(step: int) -> None:
        def best_weights(folder: Path) -> None:  # rank 0, into the checkpoint before it is published
            if best_state is not None:
                from medssl.pretrain.export import save_safetensors

                save_safetensors({k: v.contiguous() for k, v in best_state.items()}, folder / "best.safetensors")

        ckpt.save(eng, ckpt_dir, step, step * global_batch,
                  {"best": best, "history": history, "torch_rng": _rng_state(), "sampler_start": step},
                  env.rank, cfg.train.keep_last, config=cfg.to_dict(), extra=best_weights)

    global_batch = engine.check_batch(cfg, env.world_size)
    t_train = time.time()
    for step in range(start + 1, cfg.train.steps + 1):
        lr = lr_at(step - 1, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        losses = []
        for _ in range(cfg.train.grad_accum):
            b = next(batches)
            x, y = b["image"].to(env.device), b["label"].to(env.device)
            with autocast:
                logits = eng(x)
            loss = loss_fn(logits.float(), y)
            eng.backward(loss)
            eng.step()
            losses.append(float(loss.detach()))
        record = None
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = {"step": step, "lr": lr, "loss": float(np.mean(losses)),
                      "steps_per_s": (step - start) / max(time.time() - t_train, 1e-9)}
        bar.update(step, loss=float(np.mean(losses)), lr=lr)
        if split["val"] and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            score, per_class = validate()
            history.append({"step": step, "val_dice": score, "val_dice_per_class": per_class})
            record = {**(record or {"step": step}), "val_dice": score,
                      **{f"val_dice/{k}": v for k, v in per_class.items()}}
            if score > best["dice"] or best_state is None:
                best = {"dice": score, "step": step}
                best_state = {k: v.detach().float().cpu().clone() for k, v in eng.module.state_dict().items()}
                if env.is_main:
                    _save_best(run / "model_best.safetensors", best_state, best, spec)
            if env.is_main:
                bar.write(_dice_line(step, cfg.train.steps, score, per_class, best))
        if record is not None:
            log.write(record)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save_checkpoint(step)
    bar.close()
    train_s = time.time() - t_train
    if best_state is None:  # no validation volumes: the last weights
        best = {"dice": float("nan"), "step": cfg.train.steps}
        best_state = {k: v.detach().float().cpu().clone() for k, v in eng.module.state_dict().items()}
    eng.module.load_state_dict(best_state)
    if env.is_main:
        _save_best(run / "model_best.safetensors", best_state, best, spec)

    # ---- test: original geometry, Dice per class, overlays ------------------------------------------
    t_test = time.time()
    results = {}
    for c in test_cases:
        img = c.normalised(pre.window)
        probs = predict_probs(eng.module, img, cfg, env.device, autocast)
        pred = probs.argmax(0).numpy().astype(np.uint8)
        res = {"grid": dice_per_class(pred, c.label, n_classes, c.meta["spacing"], cfg.eval.hd95)}
        orig = c.meta["original"]
        pred_o = resample_to_original(probs, c.meta["affine"], orig["affine"], orig["shape"])
        ref = c.source.images[0] if c.source.images else None
        out_path = run / "predictions" / f"{c.key}.nii.gz"
        write_nifti(pred_o, orig["affine"], out_path, reference=ref)
        res["prediction"] = str(out_path)
        if c.source.label is not None:
            import nibabel as nib

            truth_o = np.rint(np.asanyarray(nib.load(c.source.label).dataobj)).astype(np.uint8)
            res["original"] = dice_per_class(pred_o, truth_o, n_classes, orig["spacing"], cfg.eval.hd95)
        if cfg.eval.overlays:
            res["overlay"] = str(run / "overlays" / f"{c.key}.png")
            space_now = "original" if "original" in res else "grid"
            overlay_png(img[0], c.label, pred, Path(res["overlay"]),
                        f"{c.key} — {cfg.init}, step {best['step']} — mean Dice "
                        f"{_nanmean(res[space_now]['dice'].values()):.3f} ({space_now} space)", n_classes,
                        cfg.eval.overlays, classes=classes)
        results[c.key] = res
    results = {k: v for part in engine.all_gather_object(results) for k, v in part.items()}
    test_s = time.time() - t_test

    metrics = {}
    if env.is_main:
        space = "original" if all("original" in r for r in results.values()) else "grid"
        per_class = {classes.get(c, f"class{c}"): _nanmean(r[space]["dice"][c] for r in results.values())
                     for c in range(1, n_classes)}
        metrics = {
            "init": cfg.init, "export": cfg.export, "network": spec, "arch": arch, "dataset": cfg.dataset,
            "dice_space": space, "mean_dice": _nanmean(per_class.values()), "dice": per_class,
            "cases": {k: {"dice": {classes.get(c, str(c)): v for c, v in r[space]["dice"].items()},
                          "dice_grid": {classes.get(c, str(c)): v for c, v in r["grid"]["dice"].items()},
                          **({"hd95": {classes.get(c, str(c)): v for c, v in r[space]["hd95"].items()}}
                             if "hd95" in r[space] else {}),
                          "prediction": r["prediction"], "overlay": r.get("overlay")} for k, r in sorted(results.items())},
            "best": best, "val_history": history, "split": split, "classes": classes,
            "seeds": {"train": cfg.train.seed, "split": cfg.data.split_seed}, "decoder_init_digest": decoder_digest,
            "load_report": report.to_dict(), "preprocessing": pre.to_dict(),
            "steps": cfg.train.steps, "global_batch": global_batch, "world_size": env.world_size,
            "train_seconds": train_s, "train_steps_per_s": cfg.train.steps / max(train_s, 1e-9),
            "test_seconds": test_s, "test_volumes_per_s": len(results) / max(test_s, 1e-9),
            "total_seconds": time.time() - t0, "config_hash": cfg.hash(),
        }
        (run / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        log.write({"step": cfg.train.steps, "test_mean_dice": metrics["mean_dice"],
                   **{f"test_dice/{k}": v for k, v in per_class.items()}})
        log.images(cfg.train.steps, {f"overlay/{k}": c["overlay"] for k, c in metrics["cases"].items() if c.get("overlay")})
        say(f"test Dice ({space} space, {len(results)} volumes): mean {metrics['mean_dice']:.4f} — "
            + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items())
            + f"; best validation {best['dice']:.4f} at step {best['step']}; {run / 'metrics.json'}")
    log.close()
    engine.barrier()
    sys.stdout.flush()
    return metrics
