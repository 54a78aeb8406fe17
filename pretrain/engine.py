"""Everything distributed lives here: process-group start, the DeepSpeed config, collectives.

Backbones and recipes never import DeepSpeed or ``torch.distributed``; the loop goes through these
helpers. One code path serves a plain process (we set the rank variables ourselves, otherwise
DeepSpeed falls into MPI discovery and asks for mpi4py), ``torchrun`` and the ``deepspeed`` launcher,
on CPU (gloo, DeepSpeed's CPU accelerator, a torch AdamW) and on GPUs (NCCL, bf16, ZeRO).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes ``--local_rank=N``; the rank variables it also sets are what we read."""
    for a in [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]:
        argv.remove(a)
        os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
    return argv


def launcher_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def verbose() -> bool:
    """``MEDSSL_DEBUG=1`` (or ``--verbose``) shows DeepSpeed's and torch's start-up messages."""
    return os.environ.get("MEDSSL_DEBUG", "") not in ("", "0")


def quiet_libraries() -> None:
    """DeepSpeed's INFO lines, its accelerator detection and torch's CUDA_HOME notice, printed once per
    process, become debug output: hidden unless :func:`verbose`."""
    if verbose():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no detection, so no "Setting accelerator to CPU" warning
    for name in ("DeepSpeed", "deepspeed", "torch.utils.cpp_extension", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR if "torch" in name else logging.WARNING)


@contextlib.contextmanager
def quiet():
    """Hold back what libraries print (op builds, checkpoint parsing, their tqdm bars) unless
    :func:`verbose`; on an error the held text is printed before it propagates."""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def init_distributed() -> DistEnv:
    """Start (or join) the process group: NCCL on GPUs, gloo on CPU."""
    quiet_libraries()
    with quiet():
        import deepspeed

    quiet_libraries()  # deepspeed's logger exists now
    if "RANK" not in os.environ:  # a plain `python -m medssl.pretrain …`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    with quiet():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def precision(cfg: RunConfig, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={p!r}: choose auto, bf16 or fp32")
    return p


def check_batch(cfg: RunConfig, world: int) -> int:
    """Global batch = micro × accumulation × world; refuse what does not add up, naming the fix."""
    t = cfg.train
    if t.micro_batch < 1 or t.grad_accum < 1:
        raise ConfigError(f"train.micro_batch={t.micro_batch} and train.grad_accum={t.grad_accum} must be >= 1")
    derived = t.micro_batch * t.grad_accum * world
    if t.global_batch is not None:
        if t.global_batch % world:
            raise ConfigError(f"train.global_batch={t.global_batch} does not divide by the world size {world}: "
                              f"use a multiple of {world}")
        if t.global_batch != derived:
            per = t.global_batch // world
            raise ConfigError(
                f"train.global_batch={t.global_batch} != micro_batch {t.micro_batch} x grad_accum {t.grad_accum} "
                f"x world {world} = {derived}: set train.grad_accum={max(1, per // t.micro_batch)} "
                f"with train.micro_batch={t.micro_batch}, or drop train.global_batch")
    return derived


def deepspeed_config(cfg: RunConfig, world: int, device: torch.device, user: dict | None = None) -> dict:
    """The DeepSpeed JSON derived from the run config (a user's --deepspeed-config is merged on top)."""
    t = cfg.train
    prec = precision(cfg, device)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": check_batch(cfg, world),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "bf16": {"enabled": prec == "bf16"},
        "steps_per_print": 10**9,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage}: choose 0, 1, 2 or 3")
    for key, value in (user or {}).items():
        if key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps") \
                and value != ds[key]:
            raise ConfigError(f"--deepspeed-config sets {key}={value}, but train.micro_batch {t.micro_batch} x "
                              f"train.grad_accum {t.grad_accum} x world {world} gives {ds[key]}: drop {key} from the "
                              f"JSON and set train.micro_batch / train.grad_accum instead")
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


# top-level keys of a DeepSpeed config that a user's JSON may set (DeepSpeed itself ignores unknown ones)
DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16", "amp",
    "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "communication_data_type",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler",
    "activation_checkpointing", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity",
    "data_efficiency", "curriculum_learning", "checkpoint", "aio", "compile", "data_types", "nebula", "autotuning",
    "compression_training", "pipeline", "disable_allgather", "dataloader_drop_last", "gradient_allreduce_op",
    "seq_parallel_communication_data_type", "use_data_before_expert_parallelism", "timers", "weight_quantization",
    "hybrid_engine", "eigenvalue", "progressive_layer_drop", "graph_harvesting", "use_node_local_storage",
    "load_universal", "fp16_master_weights_and_grads", "bf16_master_weights_and_grads", "tensor_parallel",
    "disable_python_gc", "zero_quantized_weights", "zero_quantized_gradients",
}
# blocks that the loop owns: it builds the optimizer and sets the learning rate every step
DS_OWNED = {"optimizer": "optim.optimizer, optim.lr, optim.betas, optim.weight_decay",
            "scheduler": "optim.schedule, optim.warmup_fraction, optim.min_lr, optim.step_every, optim.step_gamma"}


def read_deepspeed_json(path: str | Path) -> dict:
    """A user's ``--deepspeed-config``: readable, a JSON object, known top-level keys, no optimizer or
    scheduler block, valid ZeRO / precision sections. Raises :class:`ConfigError` naming the fix."""
    path = Path(path)
    where = f"--deepspeed-config {path}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc}); give a readable JSON file") from None
    try:
        user = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{where}: must hold a JSON object ({{\"zero_optimization\": {{\"stage\": 2}}}}), "
                          f"not a {type(user).__name__}")
    for key, fix in DS_OWNED.items():
        if key in user:
            raise ConfigError(f"{where}: an {key!r} block is not used: medssl builds the optimizer and the learning-rate "
                              f"schedule itself; remove it and set {fix} instead (e.g. optim.lr=2e-4)")
    for key in user:
        if key not in DS_KEYS:
            close = difflib.get_close_matches(key, sorted(DS_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown DeepSpeed key {key!r}{hint}; see "
                              "https://www.deepspeed.ai/docs/config-json/")
    for key in ("fp16", "bf16", "zero_optimization", "activation_checkpointing", "flops_profiler"):
        if key in user and not isinstance(user[key], dict):
            raise ConfigError(f"{where}: {key!r} must be an object, e.g. \"{key}\": {{\"enabled\": true}}, "
                              f"not {user[key]!r}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user and (not isinstance(user[key], int) or isinstance(user[key], bool) or user[key] < 1):
            raise ConfigError(f"{where}: {key}={user[key]!r} must be a positive whole number")
    if "gradient_clipping" in user and not isinstance(user["gradient_clipping"], (int, float)):
        raise ConfigError(f"{where}: gradient_clipping={user['gradient_clipping']!r} must be a number (or set "
                          "optim.grad_clip)")
    if "zero_optimization" in user:
        from pydantic import ValidationError

        with quiet():
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        try:
            DeepSpeedZeroConfig(**user["zero_optimization"])
        except (ValidationError, TypeError, ValueError) as exc:
            first = str(exc).splitlines()
            raise ConfigError(f"{where}: zero_optimization is not valid: {' '.join(first[:3])}") from None
    return user


def all_reduce_max(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
