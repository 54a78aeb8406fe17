"""Soak: N minutes of pretraining and evaluation-mode streaming on CPU, with the memory of both watched.

Usage:  python bench/soak.py [--minutes 30] [--out .bench/soak] [--volumes 13] [--workers 2]

What it does, in one run on one machine:
1. synthesises ``--volumes`` small CT phantoms (``fov_scale`` 0.6, ~80–120 voxels a side at 1.5 mm) and
   builds them into a shard set of small shards (``--shard-size``, default 2MB: 2–3 volumes each, uneven
   counts) under ``OUT/shards`` (kept and reused by later runs with the same ``--volumes``);
2. starts a real pretraining run in a subprocess for the whole duration, a world of one on CPU::

       python -m medssl.pretrain hi_end_mae --shards OUT/shards --out OUT/run --preset tiny --no-progress \\
           --resume none train.steps=1000000 train.log_every=10 train.checkpoint_every=K \\
           train.picture_every=K data.num_workers=W        (WANDB_MODE=disabled, OMP_NUM_THREADS=1)

   so that checkpoint saves and reconstruction pictures are part of the soak (K: a checkpoint about
   every tenth of the run, 30 s to 3 min apart). The ``--minutes`` start when the trainer logs its first
   step (its start-up — imports, DeepSpeed, the first batches — is timed and bounded by
   ``--startup-timeout``, not soaked); at the deadline it gets SIGTERM (exit 0 from a handler that
   checkpoints, or the signal's exit status: both are accepted and the summary says which);
3. from then on, in this process, repeats evaluation passes ("epochs") of
   ``shards.stream(OUT/shards, mode="eval", crop_size=None, batch_size=1, num_workers=W, rank=r,
   world_size=2)`` for r = 0, 1 one after the other (a simulated world of 2), and checks after each pass
   that every sample of ``samples.jsonl`` arrived exactly once across ranks × workers, with its stored
   shape: lost, duplicated, unknown keys and shape mismatches are counted per epoch;
4. samples every second the RSS (and PSS) of the training process tree (main + DataLoader workers) and of
   this process tree (main + its eval DataLoader workers; the training tree excluded), the training step
   (from ``metrics.jsonl``) and the checkpoints saved; writes ``OUT/soak.csv``, ``OUT/soak.png`` (RSS over
   time, checkpoints and epochs marked, the training step on a second axis) and ``OUT/soak.json``.

Bounded memory, judged after a warm-up (``max(60 s, 5 %)`` of the soak, at most a third of it); the halves
are the two halves of the soak, split at its midpoint:
  * slope: a least-squares line through the second half grows by less than ``--max-slope`` MB/min
    (default 1.0), and
  * peak: the second half's maximum is at most ``--max-growth`` (default 1.1) × the first half's
    (after warm-up).
Series judged: the training tree's summed RSS at each 1 s sample; for this process's tree, the largest
RSS measured at the batches of each eval epoch (main + its eval workers, measured in the eval loop while
the workers are alive). The eval workers start and stop twice per epoch, so the 1 s samples of this tree
are a saw-tooth whose phase would dominate a line fit, and their per-epoch maxima depend on whether a
sample fell while both workers lived; the batch-time measurements do not (eval order is deterministic).
The slope's standard error (lag-1 autocorrelation allowed for) is printed too: RSS wobbles by ~20 MB over
seconds, so a window of a minute or two cannot resolve 1 MB/min — the check needs the 30-minute run.
PASS/FAIL is printed for each; the exit status is 1 on any FAIL, any lost/duplicated/unknown/mis-shaped sample, an
eval stream error, or a training process that died before the deadline.

Never hangs: every wait has a timeout, a watchdog ends the run ``--grace`` seconds after the deadline,
and the training process tree is killed at exit if it is still alive.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = 2  # simulated world of the eval stream


# ----------------------------------------------------------------------------------------- data
def make_shards(out: Path, volumes: int, shard_size: str) -> Path:
    """Phantoms → shards under ``out`` (reused when a complete set of ``volumes`` samples is there)."""
    from medssl.shards.build import BuildConfig, build
    from medssl.shards.synth import synth_dataset

    raw, shards = out / "raw", out / "shards"
    index = shards / "index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        if idx.get("samples") == volumes and idx.get("config", {}).get("shard_size") == shard_size:
            return shards
    synth_dataset(raw, n=volumes, seed=0, modality="CT", fov_scale=0.6, progress=False)
    build(BuildConfig(inputs=[str(raw)], shard_size=shard_size), shards, workers=2, overwrite=True, progress=False)
    return shards


def read_samples(shards: Path) -> dict[str, tuple]:
    """key → stored shape ``(C, X, Y, Z)`` from ``samples.jsonl``."""
    out = {}
    for line in (shards / "samples.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["key"] in out:
                raise SystemExit(f"samples.jsonl lists {rec['key']} twice")
            out[rec["key"]] = tuple(rec["shape"])
    return out


# ----------------------------------------------------------------------------------------- processes
def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def memory(procs) -> tuple[float, float, int]:
    """Summed RSS and PSS (MB) of live processes, and how many were measured."""
    rss = pss = 0
    n = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        n += 1
    return rss / 1e6, pss / 1e6, n


def kill_tree(proc: psutil.Process | None, timeout: float = 10.0) -> None:
    """SIGKILL a process and every descendant (only the ones this bench started)."""
    if proc is None:
        return
    procs = tree(proc)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


class Sampler(threading.Thread):
    """Every ``period`` s: RSS/PSS of the training tree and of this process's tree (the training tree
    excluded), the newest training step in ``metrics.jsonl``, new complete checkpoints, the eval epoch."""

    def __init__(self, train_pid: int, run: Path, t0: float, period: float = 1.0):
        super().__init__(daemon=True)
        self.train = psutil.Process(train_pid)
        self.me = psutil.Process()
        self.run_dir, self.t0, self.period = run, t0, period
        self.rows: list[dict] = []
        self.metrics: list[dict] = []  # metrics.jsonl records with the time they were first seen
        self.checkpoints: list[tuple[float, str]] = []  # (t, tag) of complete checkpoints, as they appear
        self.epoch = 0  # set by the eval loop: epochs completed so far
        self._offset = 0
        self._partial = ""
        self._halt = threading.Event()
        self._seen_tags: set[str] = set()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _poll_metrics(self, t: float) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path) as fh:
                fh.seek(self._offset)
                chunk = fh.read()
                self._offset = fh.tell()
        except OSError:
            return
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unterminated last line waits for the next poll
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rec["_t"] = t
            self.metrics.append(rec)

    def _poll_checkpoints(self, t: float) -> None:
        d = self.run_dir / "checkpoints"
        try:
            tags = [p.name for p in d.iterdir() if p.name.startswith("step") and (p / "complete.json").exists()]
        except OSError:
            return
        for tag in sorted(set(tags) - self._seen_tags):
            self._seen_tags.add(tag)
            self.checkpoints.append((t, tag))

    def sample(self) -> None:
        t = time.time() - self.t0
        train_procs = tree(self.train)
        train_pids = {p.pid for p in train_procs}
        mine = [p for p in tree(self.me) if p.pid not in train_pids]
        tr, tp, tn = memory(train_procs)
        br, bp, bn = memory(mine)
        mr, _, _ = memory([self.me])
        tm, _, _ = memory([self.train])
        self._poll_metrics(t)
        self._poll_checkpoints(t)
        self.rows.append({
            "t_s": round(t, 2), "train_rss_mb": round(tr, 1), "train_pss_mb": round(tp, 1), "train_procs": tn,
            "bench_rss_mb": round(br, 1), "bench_pss_mb": round(bp, 1), "bench_procs": bn,
            "bench_main_rss_mb": round(mr, 1), "train_main_rss_mb": round(tm, 1),
            "step": self.metrics[-1]["step"] if self.metrics else 0, "epoch": self.epoch,
        })

    def run(self) -> None:
        nxt = time.time()
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a sampling hiccup must not end the soak
                print(f"soak: sampler: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            nxt += self.period
            self._halt.wait(max(0.0, nxt - time.time()))


# ----------------------------------------------------------------------------------------- eval epochs
def eval_epoch(shards: Path, expected: dict[str, tuple], workers: int, deadline: float, measure) -> dict | None:
    """One pass of every rank of a world of ``WORLD``; None when the deadline cut it short. ``measure()``
    (RSS MB of this process and its eval workers) is called at every batch, while the workers are alive:
    the epoch's ``peak_rss_mb`` is the largest value."""
    from medssl import shards as sh

    seen: Counter = Counter()
    shape_bad, errors, per_rank, peak = 0, 0, [], 0.0
    for r in range(WORLD):
        loader = sh.stream(shards, mode="eval", crop_size=None, batch_size=1, num_workers=workers,
                           rank=r, world_size=WORLD, timeout=120.0)
        n = 0
        for batch in loader:
            for key, img in zip(batch["key"], batch["image"]):
                seen[key] += 1
                n += 1
                if key in expected and tuple(img.shape) != expected[key]:
                    shape_bad += 1
            peak = max(peak, measure())
            if time.time() > deadline:
                return None
        errors += loader.errors
        per_rank.append(n)
    lost = sum(1 for k in expected if seen[k] == 0)
    dup = sum(c - 1 for k, c in seen.items() if c > 1)
    unknown = sum(c for k, c in seen.items() if k not in expected)
    return {"seen": sum(seen.values()), "per_rank": per_rank, "lost": lost, "duplicated": dup,
            "unknown": unknown, "shape_mismatch": shape_bad, "stream_errors": errors, "peak_rss_mb": round(peak, 1)}


# ----------------------------------------------------------------------------------------- verdict
def slope_mb_min(t: np.ndarray, y: np.ndarray) -> float:
    if len(t) < 2 or np.ptp(t) == 0:
        return float("nan")
    return float(np.polyfit(t / 60.0, y, 1)[0])


def slope_se(t: np.ndarray, y: np.ndarray) -> float:
    """Standard error (MB/min) of the fitted slope, with the sample count shrunk for the residuals' lag-1
    autocorrelation (n_eff = n (1 - rho) / (1 + rho)): RSS wobbles by tens of MB over a few seconds, so a
    short window cannot resolve a slope of 1 MB/min; this says how short is too short."""
    if len(t) < 4 or np.ptp(t) == 0:
        return float("nan")
    x = t / 60.0
    res = y - np.polyval(np.polyfit(x, y, 1), x)
    rho = float(np.corrcoef(res[:-1], res[1:])[0, 1]) if res.std() > 0 else 0.0
    rho = min(max(rho, 0.0), 0.99)
    n_eff = max(3.0, len(x) * (1 - rho) / (1 + rho))
    return float(res.std(ddof=2) / (x.std() * np.sqrt(n_eff)))


def judge(t: np.ndarray, y: np.ndarray, warm: float, mid: float, max_slope: float, max_growth: float) -> dict:
    first = (t >= warm) & (t < mid)
    second = t >= mid
    res = {"n_first": int(first.sum()), "n_second": int(second.sum())}
    if res["n_first"] < 1 or res["n_second"] < 2:
        res.update(slope_mb_min=None, slope_se_mb_min=None, max_first_mb=None, max_second_mb=None, slope_ok=False, peak_ok=False,
                   note="too few samples to judge")
        return res
    s = slope_mb_min(t[second], y[second])
    se = slope_se(t[second], y[second])
    m1, m2 = float(y[first].max()), float(y[second].max())
    res.update(slope_mb_min=round(s, 3), slope_se_mb_min=None if np.isnan(se) else round(se, 3),
               max_first_mb=round(m1, 1), max_second_mb=round(m2, 1),
               growth=round(m2 / m1, 4), slope_ok=bool(s < max_slope), peak_ok=bool(m2 <= max_growth * m1))
    return res


# ----------------------------------------------------------------------------------------- picture
def plot(png: Path, rows: list[dict], epochs: list[dict], ckpts: list[tuple[float, str]], metrics: list[dict],
         win: dict, verdict: dict, title: str) -> None:
    """RSS curves over minutes since the trainer's launch, with start-up, warm-up, midpoint, checkpoints,
    eval epochs and the fitted lines of the judged second half; the training step on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = lambda s: np.asarray(s, dtype=float) / 60.0  # noqa: E731 - seconds -> minutes
    t = m([r["t_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    ax.plot(t, [r["train_rss_mb"] for r in rows], lw=1.2, color="C0", label="training tree RSS (main + DataLoader workers)")
    ax.plot(t, [r["bench_rss_mb"] for r in rows], lw=0.5, color="C1", alpha=0.5,
            label="eval stream tree RSS (bench + its workers), 1 s")
    if epochs:
        ax.plot(m([e["t_end"] for e in epochs]), [e["peak_rss_mb"] for e in epochs], ".", ms=4, color="C1",
                label="eval stream tree: peak at batches per epoch (judged)")
    ax.plot(t, [r["bench_main_rss_mb"] for r in rows], lw=1.0, color="C3", label="bench main process RSS")
    for name, color in (("train", "C0"), ("bench", "C1")):
        fit = verdict[name].get("fit")
        if fit:
            xs = m([win["mid"], win["end"]])
            ax.plot(xs, np.polyval(fit, xs), "--", color="k", lw=1.2,
                    label="linear fit, second half" if name == "train" else None)
    ax.axvspan(0, m(win["start"]), color="0.7", alpha=0.35, lw=0, label="trainer start-up (no eval)")
    ax.axvspan(m(win["start"]), m(win["warm_end"]), color="0.85", alpha=0.5, lw=0, label="warm-up (not judged)")
    ax.axvline(m(win["mid"]), color="0.3", lw=0.8, ls=":", label="midpoint (halves)")
    ax.axvline(m(win["end"]), color="C3", lw=0.8, ls="--", label="SIGTERM")
    ymax = ax.get_ylim()[1] * 1.08
    for i, (tc, tag) in enumerate(ckpts):
        ax.axvline(m(tc), color="C2", lw=0.7, alpha=0.6, label="checkpoint complete (step)" if i == 0 else None)
        ax.text(m(tc), ymax * 0.99, tag.replace("step", "").lstrip("0") or "0", rotation=90, va="top",
                ha="right", fontsize=6, color="C2")
    if epochs:
        ax.plot(m([e["t_end"] for e in epochs]), np.full(len(epochs), ymax * 0.015), "|", color="k", ms=6,
                label=f"eval epoch done ({len(epochs)})")
    ax.set_ylim(0, ymax)
    ax.set_xlim(0, max(t[-1] if len(t) else 1, m(win["end"])) * 1.01)
    ax.set_xlabel("minutes since the trainer's launch")
    ax.set_ylabel("MB")
    ax2 = ax.twinx()
    if metrics:
        ax2.plot(m([r["_t"] for r in metrics]), [r["step"] for r in metrics], color="0.55", lw=0.8)
    ax2.set_ylabel("training step (grey)", color="0.4")
    ax2.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="soak duration after the trainer's start-up (default 30; 2 for a quick check)")
    ap.add_argument("--out", default=".bench/soak", help="folder for data, run, CSV/PNG/JSON (default .bench/soak)")
    ap.add_argument("--volumes", type=int, default=13, help="phantoms in the shard set (default 13: odd, so ranks differ)")
    ap.add_argument("--shard-size", default="2MB", help="target shard size (default 2MB: 2-3 volumes per shard)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, training and eval stream (default 2)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="training steps between checkpoints (default: ~every duration/10, 30 s to 3 min, at ~3 steps/s)")
    ap.add_argument("--max-slope", type=float, default=1.0, help="MB/min allowed over the second half (default 1.0)")
    ap.add_argument("--max-growth", type=float, default=1.1,
                    help="second half's peak / first half's peak allowed (default 1.1)")
    ap.add_argument("--startup-timeout", type=float, default=600.0,
                    help="seconds for the trainer to log its first step (default 600)")
    ap.add_argument("--grace", type=float, default=180.0,
                    help="seconds after SIGTERM for the trainer to checkpoint and exit (default 180)")
    args = ap.parse_args(argv)
    if not args.minutes > 0 or args.volumes < 1 or args.workers < 0:
        ap.error("--minutes must be > 0, --volumes >= 1, --workers >= 0")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60.0
    t_setup = time.time()
    shards = make_shards(out, args.volumes, args.shard_size)
    expected = read_samples(shards)
    index = json.loads((shards / "index.json").read_text())
    shard_counts = [s["samples"] for s in index["shards"]]
    print(f"soak: {len(expected)} samples in {len(shard_counts)} shards {shard_counts} ({shards}); "
          f"set-up {time.time() - t_setup:.0f} s", flush=True)

    # the tiny preset trains at ~3 steps/s on the 2-core VM with the eval stream alongside: a checkpoint
    # (and a reconstruction picture) every duration/10, at least 30 s and at most 3 min apart
    ckpt_every = args.checkpoint_every or max(10, int(round(3.0 * min(180.0, max(30.0, duration / 10)) / 10)) * 10)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "medssl.pretrain", "hi_end_mae", "--shards", str(shards), "--out", str(run),
           "--preset", "tiny", "--no-progress", "--resume", "none", "train.steps=1000000", "train.log_every=10",
           f"train.checkpoint_every={ckpt_every}", f"train.picture_every={ckpt_every}",
           f"data.num_workers={args.workers}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a world of one, whatever launched this bench
        env.pop(k, None)
    print("soak: python " + " ".join(cmd[1:]), flush=True)
    log_path = out / "train.log"
    train_proc = psutil_proc = sampler = None
    epochs: list[dict] = []
    done = threading.Event()
    problems: list[str] = []

    def watchdog():
        if not done.wait(args.startup_timeout + duration + args.grace + 120):
            print("soak: watchdog: still running long after the deadline; killing the trainer and exiting 3",
                  file=sys.stderr, flush=True)
            kill_tree(psutil_proc)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    load_before = os.getloadavg()
    t0 = time.time()
    s0 = s1 = None  # soak window, seconds since t0
    train_exit, how_stopped = None, "?"
    try:
        with open(log_path, "w") as log:
            train_proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        psutil_proc = psutil.Process(train_proc.pid)
        sampler = Sampler(train_proc.pid, run, t0)
        sampler.start()

        # start-up: the soak's minutes begin when the trainer logs its first step (no eval stream before)
        while time.time() - t0 < args.startup_timeout and train_proc.poll() is None and not sampler.metrics:
            time.sleep(0.5)
        if sampler.metrics:
            s0 = time.time() - t0
            s1 = s0 + duration
            print(f"soak: trainer logged step {sampler.metrics[0]['step']} after {s0:.0f} s; soaking for "
                  f"{args.minutes:g} min", flush=True)
        elif train_proc.poll() is None:
            problems.append(f"the trainer logged no step within {args.startup_timeout:g} s")
        deadline = t0 + (s1 if s1 is not None else 0.0)

        me = psutil.Process()

        def eval_tree_rss() -> float:
            # this process and its children but the trainer (the eval DataLoader workers have no children)
            try:
                procs = [me, *(c for c in me.children() if c.pid != train_proc.pid)]
            except psutil.Error:
                procs = [me]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            return total / 1e6

        # eval epochs until the deadline (an epoch cut short by it is not counted)
        while time.time() < deadline and train_proc.poll() is None:
            ts = time.time() - t0
            res = eval_epoch(shards, expected, args.workers, deadline, eval_tree_rss)
            if res is None:
                break
            te = time.time() - t0
            res.update(epoch=len(epochs) + 1, t_start=round(ts, 2), t_end=round(te, 2))
            epochs.append(res)
            sampler.epoch = len(epochs)
            bad = res["lost"] + res["duplicated"] + res["unknown"] + res["shape_mismatch"] + res["stream_errors"]
            if (bad or len(epochs) % 20 == 1) and sampler.rows:
                step = sampler.metrics[-1]["step"] if sampler.metrics else 0
                print(f"soak: {(te - s0) / 60:5.1f} min  epoch {res['epoch']}: {res['seen']} seen {res['per_rank']}, "
                      f"lost {res['lost']}, duplicated {res['duplicated']}, unknown {res['unknown']}, shape "
                      f"{res['shape_mismatch']}, stream errors {res['stream_errors']}; training step {step}; RSS "
                      f"train {sampler.rows[-1]['train_rss_mb']:.0f} MB, bench {sampler.rows[-1]['bench_rss_mb']:.0f} MB",
                      flush=True)

        # stop the trainer: SIGTERM at the deadline, then wait (bounded) for it to checkpoint and exit
        if train_proc.poll() is not None:
            train_exit, how_stopped = train_proc.returncode, f"exited on its own (status {train_proc.returncode})"
            problems.append(f"the trainer exited with status {train_exit} before the deadline; see {log_path}")
        else:
            time.sleep(max(0.0, deadline - time.time()))
            t_term = time.time()
            train_proc.send_signal(signal.SIGTERM)
            try:
                train_exit = train_proc.wait(timeout=args.grace)
                how_stopped = (f"SIGTERM -> exit 0 after {time.time() - t_term:.1f} s (handler)" if train_exit == 0
                               else f"SIGTERM -> exit status {train_exit} after {time.time() - t_term:.1f} s"
                               + (" (killed by the signal: no handler)" if train_exit == -signal.SIGTERM else ""))
            except subprocess.TimeoutExpired:
                how_stopped = f"SIGTERM ignored for {args.grace:g} s -> SIGKILL"
                problems.append(how_stopped)
                kill_tree(psutil_proc)
                train_exit = train_proc.wait(timeout=30)
        kill_tree(psutil_proc)  # DataLoader workers left behind, if any
        time.sleep(1.5)  # one more row: the handler's checkpoint, the final metrics
    finally:
        if sampler is not None:
            sampler.stop()
        if train_proc is not None and train_proc.poll() is None:
            kill_tree(psutil_proc)
        done.set()

    # ------------------------------------------------------------------ figures
    rows, metrics = sampler.rows, sampler.metrics
    if s0 is None:  # no soak happened; still write what there is
        s0 = s1 = rows[-1]["t_s"] if rows else 0.0
    warm = min(max(60.0, 0.05 * duration), duration / 3)
    win = {"start": s0, "warm_end": s0 + warm, "mid": s0 + duration / 2, "end": s1}
    in_win = [r for r in rows if s0 <= r["t_s"] <= s1]
    t = np.array([r["t_s"] for r in in_win])
    train_y = np.array([r["train_rss_mb"] for r in in_win])
    alive = np.array([r["train_procs"] > 0 for r in in_win], dtype=bool)
    et = np.array([e["t_end"] for e in epochs])
    ey = np.array([e["peak_rss_mb"] for e in epochs])
    verdict = {}
    for name, xs, ys, series in (("train", t[alive] if len(t) else t, train_y[alive] if len(t) else train_y,
                                  "training tree RSS, 1 s samples"),
                                 ("bench", et, ey, "eval stream tree RSS, peak per epoch (at batches)")):
        verdict[name] = judge(xs, ys, win["warm_end"], win["mid"], args.max_slope, args.max_growth)
        verdict[name]["series"] = series
        sel = xs >= win["mid"]
        if sel.sum() >= 2:
            verdict[name]["fit"] = [float(c) for c in np.polyfit(xs[sel] / 60.0, ys[sel], 1)]
    bm = np.array([r["bench_main_rss_mb"] for r in in_win])
    sel = t >= win["mid"]
    verdict["bench_main_slope_mb_min"] = round(slope_mb_min(t[sel], bm[sel]), 3) if sel.sum() > 1 else None

    steps = max([r["step"] for r in metrics] + [0])
    tags = [tag for _, tag in sampler.checkpoints]
    last_ckpt = max([int(tag[4:]) for tag in tags] + [0])
    steps = max(steps, last_ckpt)
    wm = [r for r in metrics if s0 <= r["_t"] <= s1]
    rate = ((wm[-1]["samples"] - wm[0]["samples"]) / (wm[-1]["_t"] - wm[0]["_t"])
            if len(wm) > 1 and wm[-1]["_t"] > wm[0]["_t"] else None)
    rates = [r["samples_per_s"] for r in wm]
    totals = {k: sum(e[k] for e in epochs) for k in ("lost", "duplicated", "unknown", "shape_mismatch", "stream_errors")}
    train_errors = max([r.get("stream_errors", 0) for r in metrics] + [0])

    def stats(key):
        vals = [r[key] for r in in_win if key.startswith("bench") or r["train_procs"] > 0]
        return {"start": vals[0] if vals else None, "peak": max(vals) if vals else None, "end": vals[-1] if vals else None}

    train_ok = not problems and train_exit in (0, -signal.SIGTERM)
    data_ok = len(epochs) > 0 and not any(totals.values())
    mem_ok = all(verdict[k]["slope_ok"] and verdict[k]["peak_ok"] for k in ("train", "bench"))
    passed = train_ok and data_ok and mem_ok
    summary = {
        "command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_command": " ".join(["python", *cmd[1:]]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "minutes": args.minutes, "startup_s": round(s0, 1), "problems": problems,
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "samples": len(expected), "shards": shard_counts, "workers": args.workers, "eval_world": WORLD,
        "train": {"steps": steps, "steps_in_soak": (wm[-1]["step"] - wm[0]["step"]) if len(wm) > 1 else 0,
                  "last_checkpoint_step": last_ckpt, "checkpoints_seen": tags, "checkpoint_every": ckpt_every,
                  "crops_per_s": round(rate, 2) if rate else None,
                  "crops_per_s_median_of_logs": round(float(np.median(rates)), 2) if rates else None,
                  "crops_seen": max([r["samples"] for r in metrics] + [0]), "stream_errors": train_errors,
                  "exit": train_exit, "stopped": how_stopped, "ok": train_ok},
        "eval": {"epochs": len(epochs), "seconds_per_epoch_median":
                 round(float(np.median([e["t_end"] - e["t_start"] for e in epochs])), 2) if epochs else None,
                 **{f"{k}_total": v for k, v in totals.items()},
                 "lost_per_epoch": [e["lost"] for e in epochs], "duplicated_per_epoch": [e["duplicated"] for e in epochs],
                 "ok": data_ok},
        "rss_mb": {"train_tree": stats("train_rss_mb"), "bench_tree": stats("bench_rss_mb"),
                   "bench_main": stats("bench_main_rss_mb"), "train_main": stats("train_main_rss_mb"),
                   "train_tree_pss": stats("train_pss_mb"), "bench_tree_pss": stats("bench_pss_mb")},
        "memory": {"window_s": win, "max_slope_mb_min": args.max_slope, "max_growth": args.max_growth, **verdict,
                   "ok": mem_ok},
        "verdict": "PASS" if passed else "FAIL",
    }

    # ------------------------------------------------------------------ outputs
    with open(out / "soak.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["t_s"])
        w.writeheader()
        w.writerows(rows)
    (out / "epochs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    title = (f"soak {args.minutes:g} min: {steps} steps, {len(epochs)} eval epochs of {len(expected)} samples "
             f"(lost {totals['lost']}, duplicated {totals['duplicated']}); slope (MB/min) train "
             f"{verdict['train'].get('slope_mb_min')}, eval {verdict['bench'].get('slope_mb_min')} — {summary['verdict']}")
    if rows:
        plot(out / "soak.png", rows, epochs, sampler.checkpoints, metrics, win, verdict, title)

    pf = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    head = (f"{args.minutes:g} min after a {s0:.0f} s trainer start-up" if metrics and s1 > s0
            else "did not start (see the problems below)")
    print(f"\nsoak: {head}; {summary['machine']}; load average "
          f"{summary['load_average_1_5_15']['before']} before, {summary['load_average_1_5_15']['after']} after")
    for p in problems:
        print(f"problem: {p}")
    print(f"training: {steps} steps ({summary['train']['steps_in_soak']} in the soak window; last checkpoint step "
          f"{last_ckpt}, {len(tags)} checkpoints, every {ckpt_every} steps), {summary['train']['crops_per_s']} crops/s "
          f"(median of logs {summary['train']['crops_per_s_median_of_logs']}), stream errors {train_errors}; "
          f"stopped: {how_stopped} — {pf(train_ok)}")
    print(f"eval stream: {len(epochs)} epochs of {len(expected)} samples (world {WORLD} x {args.workers} workers), "
          f"median {summary['eval']['seconds_per_epoch_median']} s/epoch; lost {totals['lost']}, duplicated "
          f"{totals['duplicated']}, unknown {totals['unknown']}, shape mismatches {totals['shape_mismatch']}, "
          f"stream errors {totals['stream_errors']} — {pf(data_ok)}")
    for k, label in (("train_tree", "training tree"), ("train_main", "training main process"),
                     ("bench_tree", "eval stream tree"), ("bench_main", "bench main process")):
        s = summary["rss_mb"][k]
        print(f"RSS {label}: start {s['start']} MB, peak {s['peak']} MB, end {s['end']} MB")
    print(f"bounded memory (warm-up {warm:.0f} s, halves split at {duration / 2:.0f} s of the soak; slope < "
          f"{args.max_slope} MB/min, peak growth <= {args.max_growth}x):")
    for k in ("train", "bench"):
        v = verdict[k]
        se = v.get("slope_se_mb_min")
        print(f"  {v['series']}: slope {v.get('slope_mb_min')} ± {se} MB/min — {pf(v['slope_ok'])}; peak "
              f"{v.get('max_first_mb')} -> {v.get('max_second_mb')} MB — {pf(v['peak_ok'])}"
              + (f" ({v['note']})" if v.get("note") else ""))
        if se is not None and 2 * se > args.max_slope:
            print(f"    note: ±2 standard errors ({2 * se:.1f} MB/min) exceed the {args.max_slope} MB/min threshold: "
                  f"this window is too short to resolve it (noise, not necessarily growth); soak longer")
    print(f"  (bench main process alone: slope {verdict['bench_main_slope_mb_min']} MB/min, not judged)")
    print(f"verdict: {summary['verdict']}\nwrote {out / 'soak.json'}, {out / 'soak.csv'}, {out / 'soak.png'}, "
          f"{out / 'epochs.jsonl'}; trainer log {log_path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
