"""``python -m pretrain demo``: the README's first command — phantoms → shards → pretraining → export.

1. ``shards`` demo: synthesise CT/MRI phantoms, build, verify, describe, stream (see shards/demo.py);
2. pretrain ``hi_end_mae`` (``--preset tiny``) on those shards with DeepSpeed, as 2 processes under
   torchrun on the CPU (``--nproc`` to change), checkpointing and exporting at the end;
3. load the export back with ``load_backbone`` and print what it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(out: Path, steps: int, nproc: int, seed: int = 0) -> int:
    from shards.demo import run as shards_demo

    t0 = time.time()
    print(f"medssl demo: data, then {steps} pretraining steps of hi_end_mae (tiny) on {nproc} CPU process(es); "
          "expect about 3-6 minutes on 2 cores")
    rc = shards_demo(out, seed=seed)
    if rc:
        return rc
    run_dir = out / "runs" / "hi_end_mae_tiny"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "pretrain", "hi_end_mae", "--shards", str(out / "shards"), "--out", str(run_dir),
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
    print(f"demo finished in {time.time() - t0:.0f} s; outputs in {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="working folder (default: demo)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default 300, about 2.5 min on 2 cores)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return run(Path(a.out), a.steps, a.nproc, a.seed)
