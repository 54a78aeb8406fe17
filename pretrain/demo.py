"""``python -m medssl.pretrain demo``: the README's first command — the whole chain on synthetic phantoms.

1. ``shards`` demo: synthesise CT/MRI phantoms, build, verify, describe, stream (see shards/demo.py);
2. pretrain ``hi_end_mae`` (``--preset tiny``) on those shards with DeepSpeed, as 2 processes under
   torchrun on the CPU (``--nproc`` to change), checkpointing and exporting at the end;
3. load the export back with ``load_backbone`` and print what it holds;
4. synthesise a separate labelled phantom set and fine-tune on a few of its volumes twice — from the
   export and from scratch (same network, split and seeds) — then print the test Dice table and write
   ``report.md`` with the overlays (``--finetune-steps 0`` stops after step 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(out: Path, steps: int, nproc: int, seed: int = 0, ft_steps: int = 150, n_train: int = 4) -> int:
    from medssl.shards.demo import run as shards_demo

    t0 = time.time()
    expect = 0.5 + steps * 0.4 / 60 + (2 * (0.6 + ft_steps * 0.8 / 60) if ft_steps else 0)
    print(f"medssl demo: data, {steps} pretraining steps of hi_end_mae (tiny) on {nproc} CPU process(es)"
          + (f", then 2 x {ft_steps} fine-tuning steps (pretrained vs scratch, {n_train} labelled volumes)" if ft_steps else "")
          + f"; expect about {expect:.0f} minutes on 2 cores")
    print("[data] the shards part of the demo (python -m medssl.shards demo)")
    with _DataStageLines(sys.stdout):
        rc = shards_demo(out, seed=seed)
    if rc:
        return rc
    print(f"[data] shards ready in {time.time() - t0:.0f} s; pretraining next")
    run_dir = out / "runs" / "hi_end_mae_tiny"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "medssl.pretrain", "hi_end_mae", "--shards", str(out / "shards"), "--out", str(run_dir),
           "--preset", "tiny", "--steps", str(steps), "train.log_every=1", f"train.checkpoint_every={max(1, steps // 2)}",
           f"train.picture_every={max(1, steps // 2)}"]
    print("[pretrain]", " ".join(cmd[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("WANDB_MODE", "offline")
    rc = subprocess.call(cmd, env=env)
    if rc:
        print(f"pretraining failed (exit {rc})", file=sys.stderr)
        return rc
    from .export import load_backbone, read_manifest

    print("[export] loading it back")
    manifest = read_manifest(run_dir / "export")
    model = load_backbone(run_dir / "export")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"  {run_dir / 'export'}: {manifest['backbone']['name']} ({manifest['weights']['parameters'] / 1e6:.2f} M "
          f"parameters), step {manifest['step']}, {manifest['samples_seen']} crops seen, spacing "
          f"{manifest['preprocessing']['spacing']} mm, CT window {manifest['preprocessing']['intensity']['CT']['window']}")
    head, tail = metrics[:10], metrics[-10:]  # single-batch losses are noisy: compare means of 10 steps
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    print(f"  loss {mean(head):.4f} (steps {head[0]['step']}-{head[-1]['step']}) -> {mean(tail):.4f} "
          f"(steps {tail[0]['step']}-{tail[-1]['step']}); pictures in {run_dir / 'pictures'}")
    print(f"  features: {[tuple(f.shape) for f in model.forward_features(__import__('torch').zeros(1, 1, *manifest['preprocessing']['crop_size']))]}")
    if ft_steps:
        rc = finetune_demo(out, run_dir / "export", ft_steps, n_train, seed, env)
        if rc:
            return rc
    print(f"demo finished in {time.time() - t0:.0f} s; outputs in {out}")
    return 0


class _DataStageLines:
    """Passes the shards demo's output through, except its closing "demo finished in N s" line: here the
    shards are only the first stage, so that line would announce the end before pretraining starts."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith("demo finished in "):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __enter__(self):
        import contextlib

        self._redirect = contextlib.redirect_stdout(self)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        if self.pending and not self.pending.startswith("demo finished in "):
            self.stream.write(self.pending)
        self.stream.flush()
        return False


def finetune_demo(out: Path, export: Path, steps: int, n_train: int, seed: int, env: dict) -> int:
    """Labelled phantoms → fine-tune from the export and from scratch → Dice table + report.md."""
    from medssl.finetune.report import write_report
    from medssl.shards.synth import synth_dataset

    data = out / "raw" / "Dataset902_PhantomCTLabelled"
    print(f"[finetune] synthesising 8 labelled CT phantoms (another seed, not seen in pretraining) in {data}")
    synth_dataset(data, n=8, seed=seed + 1000, modality="CT", fov_scale=0.6)
    runs = []
    for init in ("pretrained", "scratch"):
        run_dir = out / "finetune" / init
        cmd = [sys.executable, "-m", "medssl.finetune", "--export", str(export), "--data", str(data), "--out", str(run_dir),
               "--init", init, "--preset", "tiny", "--steps", str(steps), "--n-train", str(n_train),
               "data.crop_size=[48,48,48]", f"train.eval_every={max(1, steps // 4)}", "data.test_fraction=0.25"]
        print(f"[finetune {init}]", " ".join(cmd[2:]))
        rc = subprocess.call(cmd, env={**env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))})
        if rc:
            print(f"fine-tuning ({init}) failed (exit {rc})", file=sys.stderr)
            return rc
        runs.append(run_dir)
    report = out / "report.md"
    table = write_report(runs, report, title="medssl demo: hi_end_mae (tiny) pretrained vs scratch",
                         preface=f"Pretrained on 8 CT + 2 MRI phantoms for the demo's pretraining steps; fine-tuned for "
                                 f"{steps} steps on {n_train} labelled phantoms of another seed. A CPU-sized smoke run: "
                                 "the numbers show the chain works, not what pretraining is worth at scale.")
    print(table)
    print(f"report with overlays: {report}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="working folder (default: demo)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default 300, about 2.5 min on 2 cores)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps per run (default 150; 0 skips "
                                                                     "fine-tuning)")
    p.add_argument("--n-train", type=int, default=4, help="labelled training volumes for fine-tuning (default 4)")
    a = p.parse_args(argv)
    return run(Path(a.out), a.steps, a.nproc, a.seed, a.finetune_steps, a.n_train)
