"""Everything distributed lives here: process-group start, the DeepSpeed config, collectives.

Backbones and recipes never import DeepSpeed or ``torch.distributed``; the loop goes through these
helpers. One code path serves a plain process (we set the rank variables ourselves, otherwise
DeepSpeed falls into MPI discovery and asks for mpi4py), ``torchrun`` and the ``deepspeed`` launcher,
on CPU (gloo, DeepSpeed's CPU accelerator, a torch AdamW) and on GPUs (NCCL, bf16, ZeRO).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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


def init_distributed() -> DistEnv:
    """Start (or join) the process group: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m medssl.pretrain …`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
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
            raise ConfigError(f"--deepspeed-config sets {key}={value}, the recipe gives {ds[key]}: "
                              f"set it through train.micro_batch / train.grad_accum instead")
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


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
