"""The plan (one entry per pretraining and fine-tuning run), run folders and their markers, and running
them here one after another with timeouts, signals and a per-folder lock."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .spec import Ablation, DONE, FAILED, LOG, SKIPPED, STOP_GRACE_S, override_args, safe_name


# ============================================================================================ the plan
def _key(args: list, out: Path, extra=None) -> str:
    text = json.dumps([[str(a).replace(str(out), "<OUT>") for a in args], extra], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(abl: Ablation, out: Path) -> dict:
    """Every run as a JSON-able entry: stage, folder, command arguments, identity key (the plan file)."""
    out = Path(out).resolve()
    pre_runs, ft_runs = [], []
    for c in abl.cells:
        d = out / "pretrain" / c.name
        args = [c.recipe, "--shards", *c.shards, "--out", str(d), "--steps", str(c.steps), "--no-progress",
                *(["--preset", abl.pre["preset"]] if abl.pre.get("preset") else []),
                *override_args({**abl.pre["overrides"], "train.seed": abl.pre["seed"], **c.overrides})]
        pre_runs.append({"stage": "pretrain", "id": f"pretrain/{c.name}", "dir": str(d), "cell": c.name,
                         "recipe": c.recipe, "overrides": c.overrides, "settings": c.settings, "network": c.network,
                         "net_key": c.net_key, "module": "medssl.pretrain", "args": args, "nproc": abl.pre["nproc"],
                         "timeout": abl.pre["timeout"], "key": _key(args, out, abl.pre["nproc"])})
    groups = [(c.name, "pretrained", c.network, [c.name], out / "pretrain" / c.name / "export") for c in abl.cells]
    nets: dict = {}
    for c in abl.cells:
        nets.setdefault(c.net_key, (c.network, []))[1].append(c.name)
    for _, (network, sources) in nets.items():
        folder = f"scratch-{safe_name(network)}"
        groups.append((folder, "scratch", network, sources, out / "finetune" / folder / "export"))
    for folder, init, network, sources, export in groups:
        for n in abl.ft["n_train"]:
            for s in abl.ft["seeds"]:
                d = out / "finetune" / folder / f"n{n}-s{s}"
                args = ["--export", str(export), "--data", abl.dataset, "--out", str(d), "--init", init,
                        "--steps", str(abl.ft["steps"]), "--n-train", str(n), "--no-progress",
                        *(["--preset", abl.ft["preset"]] if abl.ft.get("preset") else []),
                        *override_args({**abl.ft["overrides"], "train.seed": s,
                                        "data.split_seed": s if abl.ft["vary_split"] else 0})]
                ft_runs.append({"stage": "finetune", "id": f"finetune/{folder}/n{n}-s{s}", "dir": str(d),
                                "cell": folder, "init": init, "network": network, "n_train": n, "seed": s,
                                "sources": sources, "export": str(export), "module": "medssl.finetune", "args": args,
                                "nproc": abl.ft["nproc"], "timeout": abl.ft["timeout"],
                                # the network's identity too: a scratch run of an edited network is not "done"
                                "key": _key(args, out, [abl.ft["nproc"], next(c.net_key for c in abl.cells
                                                                               if c.network == network)])})
    return {"ablation": abl.name, "file": abl.file, "spec_hash": abl.spec_hash, "out": str(out),
            "pretrain": pre_runs, "finetune": ft_runs}


def command(entry: dict) -> list[str]:
    """The run's command line: a plain process, or the same module under torchrun (the single run's launcher)."""
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(entry["nproc"])]
                if entry["nproc"] > 1 else [])
    return [sys.executable, *launcher, "-m", entry["module"], *entry["args"]]


# ============================================================================================ markers
def write_json(path: Path, data) -> None:
    """Atomic: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _say(*args) -> None:
    print(*args, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def export_sha(export: Path) -> str | None:
    m = read_json(Path(export) / "manifest.json")
    return ((m or {}).get("weights") or {}).get("sha256") if m else None


def pretext_losses(run_dir: Path, with_stage: bool = False) -> list[tuple]:
    """``(step, loss)`` of every logged row of a pretraining run's ``metrics.jsonl``; ``with_stage``: ``(step,
    loss, stage)``, the stage being the row's ``stage`` value (a recipe with stages logs it) or None."""
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r.get("loss"), (int, float)) and "step" in r:
            rows.append((int(r["step"]), float(r["loss"])) + ((r.get("stage"),) if with_stage else ()))
    return rows


def final_loss(run_dir: Path) -> float | None:
    """Mean of the last 10 logged pretext losses of the run's last stage (contrastive's global and local losses
    are different quantities, not one curve)."""
    rows = pretext_losses(run_dir, with_stage=True)
    if rows:
        last = rows[-1][2]
        rows = [r for r in rows if r[2] == last]
    rows = rows[-10:]
    return sum(r[1] for r in rows) / len(rows) if rows else None


def status(entry: dict) -> tuple[str, str]:
    """(done | failed | skipped | missing | stale, detail) of a run from its folder."""
    d = Path(entry["dir"])
    done = read_json(d / DONE)
    if done is not None:
        if done.get("key") != entry["key"]:
            return "stale", "settings changed since it was done"
        if entry["stage"] == "pretrain":
            if export_sha(d / "export") is None:
                return "stale", "its export is gone"
            return "done", ""
        if not (d / "metrics.json").is_file():
            return "stale", "its metrics.json is gone"
        if entry["init"] == "pretrained" and done.get("export_sha256") != export_sha(Path(entry["export"])):
            return "stale", "the cell's export changed since"
        return "done", ""
    failed = read_json(d / FAILED)
    if failed is not None:
        return "failed", failed.get("reason", "")
    skipped = read_json(d / SKIPPED)
    if skipped is not None:
        return "skipped", skipped.get("reason", "")
    return "missing", "not run yet"


# ============================================================================================ running
class Runner:
    """Runs plan entries one at a time; a signal stops the current run (SIGTERM to its process group: a
    pretraining run saves a checkpoint) and no other run starts. Runners made with ``parent=`` run beside it
    (``finetune.jobs``): the parent's signal handler stops their runs too, and they see its stop request."""

    def __init__(self, parent: Runner | None = None, threads: int | None = None):
        self.child: subprocess.Popen | None = None
        self._stopping: str | None = None
        self.parent, self.peers, self.threads = parent, [], threads  # threads: OMP_NUM_THREADS of its runs
        self.gpus: str | None = None  # CUDA_VISIBLE_DEVICES of its runs (one slice of the GPUs per worker)
        if parent is not None:
            parent.peers.append(self)

    @property
    def stopping(self) -> str | None:
        return self.parent.stopping if self.parent is not None else self._stopping

    @contextlib.contextmanager
    def signals(self):
        old = {}

        def handle(signum, _frame):
            self._stopping = signal.Signals(signum).name
            for r in (self, *self.peers):
                r._stop_child()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                old[sig] = signal.signal(sig, handle)
            except ValueError:  # not the main thread
                pass
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _stop_child(self) -> None:
        child = self.child  # read once: a worker thread may clear it meanwhile
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)

    def _wait(self, timeout: float) -> tuple[int | None, bool]:
        """(exit code, timed out); after a stop request or the timeout: SIGTERM, a grace period, SIGKILL."""
        deadline = time.monotonic() + timeout
        asked = None
        while True:
            try:
                return self.child.wait(timeout=1.0), False if asked is None else asked == "timeout"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if asked is None and (now > deadline or self.stopping):
                asked = "timeout" if now > deadline else "stop"
                self._stop_child()
                kill_at = now + STOP_GRACE_S
            if asked is not None and now > kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.child.pid, signal.SIGKILL)
                return self.child.wait(), asked == "timeout"

    def execute(self, entry: dict, extra_args=(), timeout: float | None = None) -> tuple[int | None, bool, float, list]:
        """Run one entry's command with its output appended to ``run.log``; (exit code, timed out, seconds, cmd)."""
        d = Path(entry["dir"])
        d.mkdir(parents=True, exist_ok=True)
        cmd = command(entry) + list(extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RESTART_COUNT"):
            env.pop(k, None)  # a run is its own job, whatever launched the runner
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        t0 = time.time()
        with open(d / LOG, "a") as log:
            log.write(f"\n===== {_now()} {' '.join(cmd)}\n")
            log.flush()
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                          start_new_session=True, preexec_fn=_die_with_parent)
            try:
                rc, timed_out = self._wait(timeout or entry["timeout"])
            finally:
                self.child = None
        seconds = time.time() - t0
        with open(d / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start": t0, "seconds": seconds, "exit_code": rc, "timed_out": timed_out}) + "\n")
        return rc, timed_out, seconds, cmd


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here, in the parent: the child of a threaded parent only calls it


def _die_with_parent() -> None:
    """In the child: SIGTERM when the runner dies (Linux prctl PR_SET_PDEATHSIG), so a killed runner leaves no
    run behind writing into its folder."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def log_tail(path: Path, lines: int = 40, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def failure_reason(tail: str) -> str:
    """The line that says what went wrong: the command's ``error:`` line, else the last exception (not the
    launcher's summary of a failed child), else the last line."""
    lines = [re.sub(r"^\[(default|rank)\d+\]:\s*", "", ln.strip()) for ln in tail.splitlines()
             if ln.strip() and not ln.startswith("=====")]  # without torchrun's / torch's "[rank0]:" prefixes
    for test in (lambda ln: ln.startswith("error:"),
                 lambda ln: re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) and "ChildFailedError" not in ln):
        for ln in reversed(lines):
            if test(ln):
                return ln[:300]
    return lines[-1][:300] if lines else "no output"


@contextlib.contextmanager
def folder_lock(d: Path):
    """An advisory lock on the run folder (released when the process dies): two runners never run one run."""
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    fh = open(d / ".lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        fh.close()


def _all_wall(d: Path) -> float:
    total = 0.0
    with contextlib.suppress(OSError):
        for line in (d / "attempts.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                total += float(json.loads(line).get("seconds", 0.0))
    return total


def scratch_export(entry: dict, plan_: dict) -> Path | None:
    """The scratch runs' export folder: hard links (or copies) of the first finished export among the cells of
    that network, made once, so its path (recorded in the run's config) never changes."""
    import shutil

    dest = Path(entry["export"])
    if (dest / "manifest.json").is_file():
        return dest
    for pre in plan_["pretrain"]:
        if pre["cell"] in entry["sources"] and status(pre)[0] == "done":
            src = Path(pre["dir"]) / "export"
            tmp = dest.with_name(f".export.{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
            write_json(tmp / "source.json", {"cell": pre["cell"], "export": str(src)})
            try:
                os.rename(tmp, dest)
            except OSError:  # another task made it first
                shutil.rmtree(tmp, ignore_errors=True)
            return dest if (dest / "manifest.json").is_file() else None
    return None


def _cores() -> int:
    """Cores this process may use (the CPU affinity a scheduler such as SLURM or taskset set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _gpu_slices(jobs: int, nproc: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES per worker when the GPUs go round (each run gets its own ``nproc`` GPUs); None
    without GPUs or when there are fewer than jobs × nproc (then the runs share what CUDA_VISIBLE_DEVICES shows)."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return None
    if n < jobs * nproc:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(n)]
    return [",".join(ids[i * nproc:(i + 1) * nproc]) for i in range(jobs)]


def _locked(say):
    lock = threading.Lock()

    def locked_say(*args) -> None:
        with lock:
            say(*args)

    return locked_say


def run_entry(entry: dict, plan_: dict, runner: Runner, say=None, tag: str = "") -> str:
    """Run one entry unless it is done; write its marker. Returns done | failed | skipped | stopped | busy."""
    say = say or _say
    d = Path(entry["dir"])
    st, why = status(entry)
    if st == "done":
        say(f"{tag}{entry['id']}: skipped: done before")
        return "done"
    # what it needs: an export (pretrained: its cell's; scratch: any cell of its network)
    if entry["stage"] == "finetune":
        if entry["init"] == "pretrained":
            pre = next(p for p in plan_["pretrain"] if p["cell"] == entry["cell"])
            pre_status = status(pre)[0]
            ok = pre_status == "done"
            reason = f"pretraining of cell {entry['cell']} " + ("failed" if pre_status == "failed" else "not done")
        else:
            ok = scratch_export(entry, plan_) is not None
            reason = f"no finished export among the cells of {entry['network']} ({', '.join(entry['sources'])})"
        if not ok:
            write_json(d / SKIPPED, {"status": "skipped", "time": _now(), "reason": reason})
            say(f"{tag}{entry['id']}: skipped: {reason}")
            return "skipped"
    with folder_lock(d) as mine:
        if not mine:
            say(f"{tag}{entry['id']}: skipped: another runner is running it")
            return "busy"
        extra = []
        if st == "stale":  # other settings than the folder's run: start afresh (the old run moves aside)
            extra = ["--resume", "none", "--overwrite"]
        if runner.stopping:  # a stop that came while this run waited for its turn
            return "stopped"
        for name in (FAILED, SKIPPED, DONE):  # DONE only when stale: a done run returned above
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        say(f"{tag}{entry['id']}: started" + (f" ({why}: running again)" if st == "stale" else "")
            + f"; log {d / LOG}")
        rc, timed_out, seconds, cmd = runner.execute(entry, extra)
        tail = log_tail(d / LOG)
        if runner.stopping and not timed_out:
            say(f"{tag}{entry['id']}: stopped by {runner.stopping} after {seconds:.0f} s (exit {rc}); the same command "
                "continues it")
            return "stopped"
        results = {}
        problem = None
        if timed_out:
            problem = f"timeout after {seconds:.0f} s (limit {entry['timeout']:g} s; stopped, the next run resumes)"
        elif rc != 0:
            problem = f"exit {rc}: {failure_reason(tail)}"
        elif entry["stage"] == "pretrain":
            man = read_json(d / "export" / "manifest.json")
            steps = int(entry["args"][entry["args"].index("--steps") + 1])
            if not man or int(man.get("step", -1)) != steps:
                problem = (f"exit 0 but no export at step {steps} (stopped early? export step "
                           f"{(man or {}).get('step')})")
            else:
                results = {"steps": man.get("step"), "export": str(d / "export"), "export_sha256": export_sha(d / "export"),
                           "pretext_loss": final_loss(d), "samples_seen": man.get("samples_seen")}
        else:
            m = read_json(d / "metrics.json")
            if not m:
                problem = "exit 0 but no metrics.json"
            else:
                results = {"mean_dice": m.get("mean_dice"), "dice": m.get("dice"),
                           "export_sha256": export_sha(Path(entry["export"])) if entry["init"] == "pretrained" else None}
        if problem:
            write_json(d / FAILED, {"status": "failed", "time": _now(), "command": cmd, "key": entry["key"],
                                    "exit_code": rc, "timed_out": timed_out, "reason": problem, "seconds": seconds,
                                    "log": str(d / LOG), "log_tail": tail})
            say(f"{tag}{entry['id']}: failed: {problem} (log {d / LOG})")
            return "failed"
        write_json(d / DONE, {"status": "done", "time": _now(), "command": cmd, "key": entry["key"],
                              "seconds": seconds, "wall_s": _all_wall(d), **results})
        detail = (f"loss {results['pretext_loss']:.4f}" if entry["stage"] == "pretrain" and results.get("pretext_loss")
                  is not None else f"mean Dice {results['mean_dice']:.3f}" if results.get("mean_dice") is not None else "")
        say(f"{tag}{entry['id']}: done in {seconds:.0f} s" + (f" ({detail})" if detail else ""))
        return "done"


def run_all(plan_: dict, say=None, jobs: int = 1) -> int:
    """Every run here, pretraining one after another, then fine-tuning ``jobs`` runs at a time (each with
    cores / jobs threads); failures are recorded and the rest go on."""
    say = _locked(say or _say)
    runner = Runner()
    counts: dict = {}
    entries = plan_["pretrain"] + plan_["finetune"]
    n_pre = len(plan_["pretrain"])
    tags = {id(e): f"[{i + 1}/{len(entries)}] " for i, e in enumerate(entries)}
    jobs = max(1, min(jobs, len(plan_["finetune"])))
    with runner.signals():
        for entry in entries[:n_pre] if jobs > 1 else entries:
            if runner.stopping:
                break
            r = run_entry(entry, plan_, runner, say, tag=tags[id(entry)])
            counts[r] = counts.get(r, 0) + 1
        if jobs > 1 and not runner.stopping:
            nproc = max(1, int(plan_["finetune"][0]["nproc"]))
            threads = max(1, _cores() // (jobs * nproc))
            gpus = _gpu_slices(jobs, nproc)
            pending = list(entries[n_pre:])
            lock = threading.Lock()

            def worker(mine: Runner) -> None:
                while not runner.stopping:
                    with lock:
                        if not pending:
                            return
                        entry = pending.pop(0)
                    try:
                        r = run_entry(entry, plan_, mine, say, tag=tags[id(entry)])
                    except Exception as exc:  # noqa: BLE001 - one run's bookkeeping error must not end the others
                        say(f"{tags[id(entry)]}{entry['id']}: failed in the runner: {type(exc).__name__}: {exc}")
                        r = "failed"
                    with lock:
                        counts[r] = counts.get(r, 0) + 1

            # the workers' children get SIGTERM when their thread ends (PR_SET_PDEATHSIG): the threads outlive them
            pool = []
            for i in range(jobs):
                mine = Runner(runner, threads)
                mine.gpus = gpus[i] if gpus else None
                pool.append(threading.Thread(target=worker, args=(mine,), daemon=True))
            for t in pool:
                t.start()
            for t in pool:
                while t.is_alive():  # short joins: the main thread stays free to take a signal
                    t.join(0.5)
    if runner.stopping:
        say(f"stopped ({runner.stopping}); run the same command to continue: finished runs are skipped, an "
            "interrupted pretraining resumes from its newest checkpoint")
        return 128 + int(getattr(signal, runner.stopping, signal.SIGTERM))
    say("runs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if counts.get("failed") else 0
