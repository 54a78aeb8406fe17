"""The one training loop (DESIGN "The one loop"), shared by every recipe.

init distributed → build backbone → build task → stream → ``deepspeed.initialize`` → resume →
``for step in range(start, total)``: set lr → forward → ``engine.backward`` → ``engine.step`` → log
(rank 0) → maybe checkpoint → export at the end. Step-based; records samples seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, engine
from .config import RunConfig


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup from 0 (the first step's lr is 0, as the official per-iteration schedules: Hi-End-MAE's
    ``lr × epoch / warmup_epochs`` with a fractional epoch, MONAI's LinearWarmupCosineAnnealingLR from
    ``warmup_start_lr`` 0), then cosine to ``min_lr`` at the last step, or (``optim.schedule=step``)
    ``lr × step_gamma^⌊step / step_every⌋`` (updated every step), or (``constant``) ``lr``."""
    o, total = cfg.optim, max(1, cfg.train.steps)
    warmup = int(round(o.warmup_fraction * total))
    if warmup and step < warmup:
        return o.lr * step / warmup
    if getattr(o, "schedule", "cosine") == "step":
        return o.lr * o.step_gamma ** (step // max(1, o.step_every))
    if getattr(o, "schedule", "cosine") == "constant":
        return o.lr
    progress = (step - warmup) / max(1, total - warmup)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def wd_at(step: int, cfg: RunConfig) -> float | None:
    """Weight decay at ``step`` when ``optim.weight_decay_end`` is set: cosine from ``weight_decay`` at step 0 to
    ``weight_decay_end`` at the last step (MambaMIM's ``lr_control.py``); ``None`` otherwise."""
    o = cfg.optim
    if o.weight_decay_end is None:
        return None
    progress = step / max(1, cfg.train.steps - 1)
    return o.weight_decay_end + (o.weight_decay - o.weight_decay_end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_optim(cfg) -> None:
    """The optimizer settings a run can be built from, or a ConfigError naming the key and the fix (checked before
    the run folder is made, and again when the optimizer is)."""
    from .config import ConfigError

    o = cfg.optim
    if o.optimizer not in ("adamw", "adam"):
        raise ConfigError(f"optim.optimizer={o.optimizer!r}: choose adamw or adam")
    if o.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"optim.schedule={o.schedule!r}: choose cosine, step or constant")
    if o.weight_decay_end is not None and o.weight_decay == 0 and o.weight_decay_end != 0:
        # the schedule leaves groups that start at 0 at 0 (norms, biases), so this would mean no decay at all
        raise ConfigError(f"optim.weight_decay=0 with optim.weight_decay_end={o.weight_decay_end}: the cosine starts "
                          "from weight_decay and groups at 0 stay at 0; give a starting value, e.g. "
                          "optim.weight_decay=0.04")


def set_lr(optimizer, lr: float, wd: float | None, scales: dict, before: dict) -> None:
    """This step's lr (× the task's scale for the group's name) and weight decay on every parameter group. A group
    whose scale comes back from 0 starts with fresh optimizer state: while it sat at lr 0, DeepSpeed handed it zero
    gradients and Adam's step count ran on, which would skip the bias correction of its first steps (a stage starts
    as with a new optimizer, as the official code's second stage does)."""
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO / bf16 wrappers hold the torch optimizer
    for group in optimizer.param_groups:
        name = group.get("name")
        scale = scales.get(name, 1.0)
        if scale > 0 and before.get(name, 1.0) == 0:
            for p in group["params"]:
                base.state.pop(p, None)
        group["lr"] = lr * scale
        if wd is not None and group.setdefault("decays", group["weight_decay"] > 0):  # no-decay groups stay at 0
            group["weight_decay"] = wd


def make_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """A torch optimizer (DeepSpeed's fused ones need a JIT build on CPU): AdamW, or Adam with L2 decay."""
    check_optim(cfg)
    o = cfg.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas))


class RunLog:
    """Rank 0's record of a run (pretraining and fine-tuning): ``metrics.jsonl`` always, wandb beside it
    (offline unless configured). The wandb run id is kept in ``RUN/wandb_id``, so a resumed or extended
    run (another ``train.steps``, hence another config hash) continues the same wandb run."""

    def __init__(self, cfg, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        mode = os.environ.get("WANDB_MODE") or cfg.train.wandb
        if mode == "disabled":
            return
        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(f"{run_dir.name}-{cfg.hash()[:8]}\n")
        try:
            import wandb

            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), mode=mode,
                                    name=run_dir.name, config=cfg.to_dict(), resume="allow",
                                    id=id_file.read_text().strip())
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            print(f"warning: wandb disabled ({type(exc).__name__}: {exc})", file=sys.stderr)

    def images(self, step: int, pictures: dict) -> None:
        """Log PNG files (``{key: path}``) as wandb images at ``step``."""
        if self.wandb is None or not pictures:
            return
        try:
            import wandb

            self.wandb.log({k: wandb.Image(str(v), caption=Path(v).stem) for k, v in pictures.items()}, step=step)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            print(f"warning: wandb images not logged ({type(exc).__name__}: {exc})", file=sys.stderr)

    def truncate(self, step: int) -> None:
        """Keep only the rows up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError, TypeError):
                continue  # a half-written last line of a killed run
        if len(keep) != len(lines):
            tmp = self.path.with_name(".metrics.jsonl.part")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def backbone_kwargs(cfg: RunConfig) -> dict:
    """The backbone's constructor arguments: ``model.kwargs`` and ``model.checkpoint_blocks`` when set."""
    kw = dict(cfg.model.kwargs)
    if cfg.model.checkpoint_blocks:
        kw["checkpoint_blocks"] = int(cfg.model.checkpoint_blocks)
    return kw


def build_task(cfg: RunConfig):
    from .backbones import build_backbone
    from .config import task_class

    backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **backbone_kwargs(cfg))
    task = task_class(cfg.recipe)(backbone, cfg.task)
    if hasattr(task, "configure"):  # contract 3's optional hook: run settings a task reads (e.g. the data window)
        task.configure(cfg)
    return task


def stream_config(cfg: RunConfig, seed: int = 0):
    """The crop stream's settings from ``data.*``; its checks raise ``ConfigError`` naming the ``data.`` key (called
    before the run folder is made, so a bad value leaves nothing behind)."""
    from medssl.shards import StreamConfig, Window

    from .config import ConfigError

    d = cfg.data
    try:
        return StreamConfig(crop_size=tuple(d.crop_size), crops_per_volume=d.crops_per_volume,
                            batch_size=cfg.train.micro_batch, num_workers=d.num_workers, mode="train", seed=seed,
                            shuffle_buffer=d.shuffle_buffer, pool_size=d.pool_size, pos_fraction=d.pos_fraction,
                            negatives=d.negatives, window=Window(ct=tuple(d.window_ct), out=tuple(d.window_out)),
                            flip_prob=d.flip_prob, rot90_prob=d.rot90_prob, intensity_prob=d.intensity_prob,
                            intensity_scale=d.intensity_scale, intensity_shift=d.intensity_shift, labels=False,
                            partitions=d.partitions, partition_inplane=d.partition_inplane)
    except ValueError as exc:
        raise ConfigError(f"data.{exc}") from None  # the stream's messages start with the field's name


CROP_DEVICES = ("cpu", "cuda", "auto", "cpu-pool")
DEFAULT_DEVICE_POOL = "4GiB"


def device_pool(cfg: RunConfig):
    """``data.device_pool``, or the default size."""
    return DEFAULT_DEVICE_POOL if cfg.data.device_pool is None else cfg.data.device_pool


def crop_device(cfg: RunConfig, device: torch.device | None = None) -> str:
    """Where this run cuts its crops: ``workers`` (the stream's DataLoader workers) or the device pool on ``cuda`` or
    ``cpu``; checks ``data.crop_device`` and ``data.device_pool`` (``ConfigError`` naming the key and the fix)."""
    from medssl.shards.pool import parse_budget

    from .config import ConfigError

    d = cfg.data
    if d.crop_device not in CROP_DEVICES:
        raise ConfigError(f"data.crop_device={d.crop_device!r} must be one of {', '.join(CROP_DEVICES)} (cpu: the "
                          "DataLoader workers cut crops; cuda: the device pool on the training GPU)")
    try:
        parse_budget(device_pool(cfg))
    except ValueError as exc:
        raise ConfigError(f"data.{exc}") from None
    on_gpu = device is not None and device.type == "cuda"
    if d.crop_device == "cuda" and device is not None and not on_gpu:
        raise ConfigError(f"data.crop_device=cuda needs a GPU run; this run trains on {device.type}: use "
                          "data.crop_device=cpu (or auto)")
    if d.crop_device == "auto":  # partitioned crops (contrastive) are the workers' only
        return "cuda" if on_gpu and not d.partitions else "workers"
    where = {"cpu": "workers", "cpu-pool": "cpu", "cuda": "cuda"}[d.crop_device]
    if where != "workers" and d.partitions:
        raise ConfigError(f"data.crop_device={d.crop_device}: partitioned crops (data.partitions={d.partitions}) are "
                          "cut by the workers; use data.crop_device=cpu")
    return where


def crop_place(cfg: RunConfig, device: torch.device) -> str:
    """Words for the start summary: who cuts the crops."""
    where = crop_device(cfg, device)
    if where == "workers":
        return f"{cfg.data.num_workers} DataLoader worker(s) per rank"
    return f"the device pool on {where} ({device_pool(cfg)}; workers decode)"


def make_stream(cfg: RunConfig, env: engine.DistEnv, seed: int):
    """The run's batches: the crop stream (``shards.stream``), or the device pool (``data.crop_device``)."""
    from medssl import shards

    sc = stream_config(cfg, seed)
    where = crop_device(cfg, env.device)
    if where == "workers":
        return shards.stream(cfg.data.shards, sc, rank=env.rank, world_size=env.world_size)
    from medssl.shards.pool import DevicePool

    return DevicePool(cfg.data.shards, sc, device=env.device if where == "cuda" else torch.device("cpu"),
                      budget=device_pool(cfg), rank=env.rank, world_size=env.world_size)


def summary(cfg: RunConfig, env: engine.DistEnv, task, plan, start: int, resumed_from: str | None) -> str:
    """Rank 0's start summary: what runs, on what, with which batch and data, resuming from where."""
    t = cfg.train
    n_backbone = sum(p.numel() for p in task.backbone.parameters())
    n_task = sum(p.numel() for p in task.parameters())
    data = getattr(plan, "data", None) or {}
    global_batch = engine.check_batch(cfg, env.world_size)
    if resumed_from:
        state = f"resumed from {resumed_from} at step {start}"
    elif plan is not None and plan.resume == "none":
        state = "new run (--resume none)"
    else:
        state = "new run (no checkpoint in the run dir)"
    lines = [
        f"medssl pretrain {cfg.recipe}: backbone {cfg.model.backbone} ({n_backbone / 1e6:.2f} M parameters; "
        f"{n_task / 1e6:.2f} M with the pretext heads)",
        f"  world {env.world_size} x {env.device.type}; batch {t.micro_batch} micro x {t.grad_accum} accum x "
        f"{env.world_size} world = {global_batch} global; precision {engine.precision(cfg, env.device)}; "
        f"ZeRO stage {t.zero_stage}{'; torch.compile' if t.compile else ''}"
        f"{f'; activation checkpointing in {cfg.model.checkpoint_blocks} block(s)' if cfg.model.checkpoint_blocks else ''}",
        f"  data: {len(cfg.data.shards)} shard set(s) ({', '.join(cfg.data.shards)}), "
        f"{data.get('volumes', '?')} volumes, {data.get('channels', cfg.model.kwargs.get('in_chans', 1))} channel(s), "
        f"crop {list(cfg.data.crop_size)}; crops cut by {crop_place(cfg, env.device)}",
        f"  steps {start} -> {t.steps}; run dir {cfg.out}; {state}",
    ]
    for key, old, new in getattr(plan, "changed", None) or []:
        if key != "out":
            lines.append(f"  changed on resume: {key} {old!r} -> {new!r}")
    return "\n".join(lines)


def train(cfg: RunConfig, resume: str = "auto", ds_user: dict | None = None, progress: bool = True,
          plan=None) -> Path:
    """Run (or continue) a pretraining run; returns the run dir. Call on every rank.

    ``resume``: ``auto`` | ``none`` | a checkpoint tag (``plan.resume_dir`` holds its folder). ``plan``
    (from ``python -m medssl.pretrain``'s argument phase) may name a folder to move the old run into.
    ``progress=False`` drops the terminal bar; the plain lines every ``train.log_every`` steps stay.

    Exact resume: every random draw of a step comes from torch's, numpy's and python's global generators
    (saved per rank in each checkpoint) or from the stream's own generators (saved per worker), so a run
    resumed from step N continues as the uninterrupted run would have. SIGTERM / SIGUSR1 save a checkpoint
    at the end of the current step and return (exit 0); a step that outlives ``train.collective_timeout``
    ends the process through :class:`engine.Watchdog`."""
    from .progress import Progress

    # DeepSpeed's ZeRO-1/2 still calls a collective torch marks deprecated; say it once in the docs, not per step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    t = cfg.train
    # torch's own per-collective timeout stays above the watchdog's, so the watchdog speaks first
    env = engine.init_distributed(timeout=t.collective_timeout + 120)
    stopper = engine.StopRequest(env.rank)
    with engine.quiet():
        import deepspeed
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if elastic_restart() and plan is not None and plan.move_aside:
        # a restart of the same job (torchrun --max-restarts, a requeue) continues what its first attempt began
        plan.move_aside, plan.resume, resume = None, "auto", "auto"
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    if env.is_main:
        if plan is not None and plan.move_aside:
            moved = checkpoint.move_aside(run_dir, Path(plan.move_aside))
            print(f"--overwrite: moved the previous run's {', '.join(moved)} to {plan.move_aside}", flush=True)
        (run_dir / "pictures").mkdir(parents=True, exist_ok=True)
        cfg.dump(run_dir / "config.yaml")
    engine.barrier()
    torch.manual_seed(t.seed + env.rank)
    np.random.seed(t.seed + env.rank)
    random.seed(t.seed + env.rank)

    task = build_task(cfg)
    optimizer = make_optimizer(task.param_groups(cfg.optim.weight_decay), cfg)
    if t.compile:
        task.compile()  # in place: the module keeps its parameter names, so checkpoints and exports do not change
    ds_config = engine.deepspeed_config(cfg, env.world_size, env.device, ds_user)
    with engine.quiet():
        eng, optimizer, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)

    watch = engine.Watchdog(env.rank, env.world_size, t.collective_timeout)
    start, samples, loader_state = (0, 0, None)
    resumed_from, info = None, {}
    if resume != "none":
        from medssl.shards.loader import check_state

        tag = None if resume == "auto" else resume
        src = Path(plan.resume_dir) if (tag and plan is not None and plan.resume_dir) else ckpt_dir
        with watch.armed(0, "loading a checkpoint", limit=3 * t.collective_timeout):
            start, samples, loader_state = checkpoint.resume(eng, src, env.rank, env.world_size,
                                                              log=lambda *_: None, tag=tag, check_loader=check_state,
                                                              info=info, zero_stage=t.zero_stage)
        if start:
            resumed_from = str(src / info["tag"])
    if env.is_main:
        print(summary(cfg, env, task, plan, start, resumed_from), flush=True)
        if info.get("changed"):
            print(f"  changed on resume: {info['changed']}", flush=True)
    loader = make_stream(cfg, env, t.seed)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    batches = iter(loader)
    global_batch = engine.check_batch(cfg, env.world_size)
    log = RunLog(cfg, run_dir, env.is_main)
    log.truncate(start)  # rows past the checkpoint are replaced, not repeated
    bar = Progress(t.steps, initial=start, desc=cfg.recipe, every=t.log_every, enabled=env.is_main,
                   bar=None if progress else False)
    prec = engine.precision(cfg, env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    if info.get("rng"):
        checkpoint.set_rng_state(info["rng"])  # last, so that nothing above draws from the restored generators
    elif start:
        torch.manual_seed(t.seed * 1_000_003 + env.rank * 7919 + start)  # another world: fresh, reproducible draws
    batch_log = _batch_log(run_dir, env)
    t_last, s_last, bad_in_row = time.time(), samples, 0
    step, saved_at, stopped = start, start, False
    batch = None
    shown: dict = {}
    # contract 3's optional hook: a task with stages says which parameter groups train at each step
    staged = hasattr(eng.module, "begin_step")
    scales = eng.module.begin_step(start - 1, t.steps) if staged and start > 0 else {}  # the step before this one
    while step < t.steps:
        lr, wd = lr_at(step, cfg), wd_at(step, cfg)
        scales, before = (eng.module.begin_step(step, t.steps) if staged else {}), scales
        set_lr(optimizer, lr, wd, scales, before)
        scalars: dict[str, float] = {}
        for _ in range(t.grad_accum):
            watch.note(step + 1, "waiting for data")
            batch = _to_device(next(batches), env.device)
            if batch_log is not None:
                batch_log.write(json.dumps({"step": step + 1, "rank": env.rank, "local_rank": env.local_rank,
                                            "world": env.world_size, "keys": list(batch.get("key", []))}) + "\n")
            with watch.armed(step + 1, "forward, backward, gradient all-reduce and optimizer step"):
                with autocast:
                    out = eng(batch)
                loss = out["loss"]
                # the step's one host wait: a non-finite loss is skipped before its backward, on every rank alike
                bad, stop = engine.all_reduce_flags(0.0 if torch.isfinite(loss.detach()).all() else 1.0,
                                                    1.0 if stopper.requested else 0.0)
                stopped = stopped or bool(stop)
                if bad:
                    keys = engine.all_gather_object(batch["key"])
                    if env.is_main:
                        bar.write(f"warning: non-finite loss at step {step}; batch volumes per rank: {keys} — skipped")
                    bad_in_row += 1
                    if bad_in_row >= 10:
                        raise FloatingPointError(f"10 non-finite losses in a row at step {step}: lower optim.lr, "
                                                 "check the data (python -m medssl.shards verify) or use precision fp32")
                    continue
                bad_in_row = 0
                eng.backward(loss)
                eng.step()
            for k, v in out.items():  # kept on the device: read at logging, not every step (no host wait here)
                scalars[k] = scalars.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v)) / t.grad_accum
        step += 1
        samples += global_batch
        if step % t.log_every == 0 or step == t.steps or stopped:
            scalars = {k: float(v) for k, v in scalars.items()}
            errors = stream_errors(loader)
            if env.is_main:
                now = time.time()
                rate = (samples - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, samples
                record = {"step": step, "lr": lr, "samples": samples, "samples_per_s": rate, **scalars,
                          "stream_errors": sum(sum(k.values()) for k in errors.values())}
                if errors:
                    record["stream_errors_by_shard"] = errors
                log.write(record)
                shown = {"loss": float(scalars.get("loss", float("nan"))), "lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
        bar.update(step, **shown)
        if env.is_main and t.picture_every and (step % t.picture_every == 0 or step == t.steps):
            png = run_dir / "pictures" / f"step{step:08d}.png"
            _picture(eng.module, batch, png)
            if png.exists():
                log.images(step, {"reconstruction": png})
        if step % t.checkpoint_every == 0 or step == t.steps or stopped:
            with watch.armed(step, "saving a checkpoint", limit=3 * t.collective_timeout):
                if checkpoint.save(eng, ckpt_dir, step, samples, loader.state_dict(), env.rank, t.keep_last,
                                   config=cfg.to_dict(), world=env.world_size):
                    saved_at = step
        if stopped:
            break
    watch.close()
    stopper.close()
    if batch_log is not None:
        batch_log.close()
    bar.close()
    errors = stream_errors(loader)
    log.close()
    if env.is_main and errors:
        print("stream errors over all ranks (shard: kind x count): " + "; ".join(
            f"{s}: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()) for s, kinds in errors.items()), flush=True)
    if stopped and step < t.steps:
        if env.is_main:
            where = (f"checkpoint {ckpt_dir / checkpoint.tag_for(saved_at)}" if saved_at == step
                     else f"the save failed; the newest checkpoint is step {saved_at}")
            print(f"stopped by {stopper.signal or 'a signal on another rank'} at step {step} ({where}); run the same "
                  "command to continue", flush=True)
        engine.barrier()
        return run_dir
    # Data parallel: one set of weights. At stage 0 every rank steps its own optimizer, so agreement shows that the
    # gradients were averaged alike; from stage 1 on each partition is stepped on one rank and gathered, so the
    # weights agree by construction. Buffers (BatchNorm statistics) are per rank and not compared.
    digests = engine.all_gather_object(checkpoint.param_digest(eng.module))
    if env.is_main and None not in digests:
        same = len(set(digests)) == 1
        how = "parameter digest" + ("" if t.zero_stage == 0 else f"; ZeRO stage {t.zero_stage} gathers them from one update")
        print(f"weights at step {step}: " + (f"identical on all {len(digests)} ranks ({how})" if same else
              f"DIFFER between ranks ({len(set(digests))} distinct digests): gradients were not averaged alike; the "
              "export holds rank 0's"), flush=True)
    if env.is_main:
        from .export import export_run

        export_run(run_dir, tag=checkpoint.tag_for(step))
    engine.barrier()
    return run_dir


def _batch_log(run_dir: Path, env: engine.DistEnv):
    """``MEDSSL_BATCH_LOG=1`` (tests, checking a launch's data split): every rank appends one line per micro-batch,
    ``{"step", "rank", "local_rank", "world", "keys"}`` (the volume key of each crop), to
    ``RUN/batches_rank{r}.jsonl``; line-buffered, so a killed run keeps what it read. Off (None) otherwise."""
    if os.environ.get("MEDSSL_BATCH_LOG", "") in ("", "0"):
        return None
    return open(run_dir / f"batches_rank{env.rank}.jsonl", "a", buffering=1)


def stream_errors(loader) -> dict:
    """Stream error counts per shard and kind, summed over every rank (a collective: call on all ranks)."""
    from medssl.shards.loader import merge_error_counts

    return merge_error_counts(engine.all_gather_object(loader.errors_by_shard))


def elastic_restart() -> bool:
    """Whether this process is a restart of the same job: torchrun --max-restarts, or a SLURM requeue."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def _picture(task, batch, path: Path) -> None:
    if batch is None or not hasattr(task, "reconstruct"):
        return
    try:
        # pictures draw from their own generators: drawing one (or changing train.picture_every on resume)
        # never shifts the training run's random draws
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            task.reconstruct(batch, path=path)
    except Exception as exc:  # noqa: BLE001 - a picture must never stop training
        print(f"warning: could not draw {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
