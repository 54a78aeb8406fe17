"""Everything distributed lives here: process-group start, the DeepSpeed config, collectives.

Backbones and recipes never import DeepSpeed or ``torch.distributed``; the loop goes through these
helpers. One code path serves a plain process (we set the rank variables ourselves, otherwise
DeepSpeed falls into MPI discovery and asks for mpi4py), ``torchrun`` and the ``deepspeed`` launcher,
on CPU (gloo, DeepSpeed's CPU accelerator, a torch AdamW) and on GPUs (NCCL, bf16, ZeRO).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
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


def init_distributed(timeout: float | None = None) -> DistEnv:
    """Start (or join) the process group: NCCL on GPUs, gloo on CPU. ``timeout`` (seconds) bounds each
    collective inside torch; the loop's :class:`Watchdog` fires first with a clearer message."""
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
    backend = "nccl" if cuda else "gloo"
    kw = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _join_agent_store(backend, kw.get("timeout", datetime.timedelta(minutes=30)))
    with quiet():
        deepspeed.init_distributed(dist_backend=backend, **kw)  # joins the group above when there is one
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def _join_agent_store(backend: str, timeout: datetime.timedelta) -> None:
    """Under torchrun the store is the agent's and outlives a restart (``--max-restarts``): the keys of the
    failed attempt (the dead ranks' addresses) would be read again and the new ranks would wait for ever to
    connect to them. Each attempt gets its own key prefix."""
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"medssl/attempt{attempt}/", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


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
    return all_reduce_flags(value)[0]


def all_gather_object(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor (one all_reduce) and keeps
    this rank's slice, so a loss over all ranks' rows trains each rank's own rows. all_reduce works on every
    backend (gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, t):
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rows, ctx.rank = t.shape[0], dist.get_rank()
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()  # reduced in place: never alias autograd's buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on all ranks) concatenated along dim 0 in rank order; gradients flow
    back to each rank's own rows when ``grad``. ``t`` itself in a world of one. Contrastive losses use it to
    take their negatives from the whole data-parallel batch."""
    if world_size() == 1:
        return t
    if grad and t.requires_grad:
        return _GatherWithGrad.apply(t)
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_flags(*flags: float) -> list[float]:
    """Element-wise maximum of a few numbers over every rank, in one collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# --------------------------------------------------------------------------------- pre-emption
class StopRequest:
    """SIGTERM and SIGUSR1 — a scheduler's pre-emption notice, or torchrun passing on its own SIGTERM — ask
    the loop to save a checkpoint at the end of the current step and exit 0. Repeats of the signal are
    ignored (SLURM signals every process of a step and torchrun forwards its own copy); a launcher that
    runs out of patience still ends the process with SIGKILL."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, rank: int):
        self.rank = rank
        self.signal: str | None = None
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            if self.rank == 0:
                print(f"{self.signal} received: saving a checkpoint at the end of this step, then exiting "
                      "(resume with the same command)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ------------------------------------------------------------------------------------ watchdog
class Watchdog:
    """A thread per rank that turns a hang into an exit with a reason.

    The loop marks what it does (:meth:`armed` around each step's forward, backward, gradient all-reduce
    and optimizer step, and around checkpoint saves; :meth:`note` elsewhere). Every few seconds the thread
    writes a heartbeat ``(beat, step, what)`` of its rank into the job's rendezvous store (the TCP store at
    ``MASTER_ADDR:MASTER_PORT``, hosted by torchrun or by rank 0). When an armed phase outlives its limit
    (``train.collective_timeout``), it reads every rank's heartbeat twice, names the ranks whose heartbeat
    stood still (a stopped, dead or hung process) and where the others are, and ends the process with exit
    code 3, so that ``torchrun --max-restarts`` or a requeued job resumes from the newest checkpoint
    instead of waiting for ever. A world of one has no other rank to wait for and runs no thread."""

    EXIT_CODE = 3
    PREFIX = "medssl/heartbeat/"

    def __init__(self, rank: int, world: int, timeout: float, enabled: bool | None = None):
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.interval = max(0.5, min(5.0, self.timeout / 6))
        self._phase: tuple | None = None  # (step, what, started, limit) while armed
        self._where = (0, "starting")
        self._beat = 0
        self._stop = threading.Event()
        self._store = None
        self._thread = None
        if enabled is False or (enabled is None and world < 2):
            return
        self._store = self._connect()
        self._thread = threading.Thread(target=self._run, name="medssl-watchdog", daemon=True)
        self._thread.start()

    def _connect(self):
        from torch.distributed import TCPStore

        try:
            return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                            timeout=datetime.timedelta(seconds=max(5.0, self.interval * 2)))
        except Exception as exc:  # noqa: BLE001 - the watchdog still ends a hang, it only names fewer ranks
            print(f"warning: rank {self.rank}: the watchdog cannot reach the rendezvous store ({exc}); a hang "
                  f"still ends after train.collective_timeout, without naming the silent ranks", file=sys.stderr)
            return None

    def note(self, step: int, what: str) -> None:
        self._where = (step, what)

    @contextlib.contextmanager
    def armed(self, step: int, what: str, limit: float | None = None):
        self._where = (step, what)
        self._phase = (step, what, time.monotonic(), float(limit or self.timeout))
        try:
            yield
        finally:
            self._phase = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)

    def _heartbeat(self) -> None:
        if self._store is None:
            return
        self._beat += 1
        step, what = self._where
        try:
            self._store.set(f"{self.PREFIX}{self.rank}", json.dumps([self._beat, step, what]))
        except Exception:  # noqa: BLE001 - a missed heartbeat is not an error of this rank
            pass

    def _read(self) -> dict[int, list] | None:
        if self._store is None:
            return None
        out = {}
        try:
            for r in range(self.world):
                key = f"{self.PREFIX}{r}"
                if self._store.check([key]):
                    out[r] = json.loads(self._store.get(key))
        except Exception:  # noqa: BLE001 - the store itself may live in a stopped process
            return None
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._heartbeat()
            phase = self._phase
            if phase is not None and time.monotonic() - phase[2] > phase[3]:
                self._fire(*phase)

    def _fire(self, step: int, what: str, started: float, limit: float) -> None:
        waited = time.monotonic() - started
        lines = [f"medssl: rank {self.rank}: step {step}: '{what}' has waited {waited:.0f} s, longer than "
                 f"train.collective_timeout ({limit:g} s)."]
        first = self._read()
        time.sleep(2.5 * self.interval)
        second = self._read()
        if first is None or second is None:
            lines.append(f"The rendezvous store ({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) did not "
                         "answer either: the launcher or rank 0, which host it, may be stopped or gone.")
        else:
            silent = [r for r in range(self.world) if r != self.rank
                      and (r not in second or second[r][0] == first.get(r, [None])[0])]
            alive = [r for r in range(self.world) if r != self.rank and r not in silent]
            if silent:
                lines.append("Rank(s) that did not answer (stopped, dead or hung): " + ", ".join(
                    f"{r}" + (f" (last seen at step {second[r][1]}, {second[r][2]})" if r in second else " (never seen)")
                    for r in silent[:16]) + (" …" if len(silent) > 16 else ""))
            else:
                lines.append("Every other rank still answers: one of them is slow or stuck inside a collective.")
            if alive:
                lines.append("Still answering: " + ", ".join(f"rank {r} at step {second[r][1]} ({second[r][2]})"
                                                            for r in alive[:16]) + (" …" if len(alive) > 16 else ""))
        lines.append(f"Exiting with code {self.EXIT_CODE} so that the job can restart (torchrun --max-restarts, or a "
                     "requeue) and resume from the newest checkpoint; raise train.collective_timeout if steps "
                     "legitimately take this long.")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        os._exit(self.EXIT_CODE)
