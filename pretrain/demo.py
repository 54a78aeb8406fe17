"""``python -m medssl.pretrain demo``: the README's first command — the whole chain on synthetic phantoms, ending
in the question users pretrain to answer: does pretraining help my segmentation task, beyond the noise?

1. ``shards`` demo: synthesise varied CT phantoms (organ shape and position, contrast phase, vessels, texture)
   plus two MRI ones, build, verify, describe and stream them (see shards/demo.py); these are the unlabelled set;
2. synthesise a separate labelled CT set of another seed (never seen in pretraining);
3. run the ablation ``recipes/ablations/demo.yaml`` with the ablation runner (``pretrain ablate``): pretrain
   ``hi_end_mae`` (tiny) with DeepSpeed as 2 processes under torchrun on the CPU, then fine-tune its export and
   the same network from scratch on 1 labelled volume for 3 seeds (same split and seed per pair);
4. print the runner's table: mean test Dice ± std over seeds and the paired 95 % bootstrap interval of
   pretrained − scratch; ``results.md``, ``results.csv`` and the plots are in ``OUT/ablation``.

Re-running the command skips what is finished (the runner's done markers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

LABELLED = "Dataset902_PhantomCTLabelled"


def run(out: Path, steps: int | None = None, nproc: int | None = None, seed: int = 0, ft_steps: int | None = None,
        n_ct: int = 24, n_labelled: int = 12) -> int:
    import yaml

    from medssl.shards.demo import run as shards_demo
    from medssl.shards.synth import synth_dataset

    from .ablate import main as ablate_main
    from .config import RECIPES_DIR

    out = Path(out)
    spec = yaml.safe_load((RECIPES_DIR / "ablations" / "demo.yaml").read_text())
    for key, value in (("steps", steps), ("nproc", nproc)):
        if value is not None:
            spec["pretrain"][key] = value
    if ft_steps is not None:
        spec["finetune"]["steps"] = ft_steps
    t0 = time.time()
    runs = len(spec["finetune"]["seeds"]) * len(spec["finetune"]["n_train"])
    print(f"medssl demo: varied phantoms, {spec['pretrain']['steps']} pretraining steps of hi_end_mae (tiny) on "
          f"{spec['pretrain']['nproc']} CPU process(es), then {runs} pretrained + {runs} scratch fine-tuning runs of "
          f"{spec['finetune']['steps']} steps; expect about 9 minutes on 2 cores (the first DeepSpeed start on a "
          "machine adds 1-3 min to build its op)")
    print("[data] the shards part of the demo (python -m medssl.shards demo --variation 1): the unlabelled set")
    with _DataStageLines(sys.stdout):
        rc = shards_demo(out, n_ct=n_ct, seed=seed, variation=1.0)
    if rc:
        return rc
    data = out / "raw" / LABELLED
    print(f"[data] synthesising {n_labelled} labelled CT phantoms of another seed (not seen in pretraining) in {data}")
    synth_dataset(data, n=n_labelled, seed=seed + 1000, modality="CT", fov_scale=0.6, variation=1.0, progress=False)
    spec["shards"] = [str((out / "shards").resolve())]
    spec["dataset"] = str(data.resolve())
    spec["pretrain"]["seed"] = seed
    file = out / "ablation.yaml"
    file.write_text("# written by python -m medssl.pretrain demo from recipes/ablations/demo.yaml (paths filled in);\n"
                    f"# re-run or edit: python -m medssl.pretrain ablate {file} --out {out / 'ablation'}\n"
                    + yaml.safe_dump(spec, sort_keys=False))
    print(f"[data] ready in {time.time() - t0:.0f} s; the ablation runner next: {file}")
    os.environ.setdefault("WANDB_MODE", "offline")
    rc = ablate_main([str(file), "--out", str(out / "ablation")])
    results = out / "ablation" / "results.md"
    if results.is_file():
        lines = results.read_text().splitlines()
        print("\n".join(ln if ln.startswith("|") else "" for i, ln in enumerate(lines)  # the tables, a gap between
                        if ln.startswith("|") or (0 < i < len(lines) - 1 and lines[i - 1].startswith("|"))))
        print(f"Mean test Dice over the 6 organs and {spec['finetune']['overrides']['data.test_fraction']:.0%} of the "
              "labelled phantoms held out per seed; the interval is the runner's paired bootstrap over seeds × test "
              f"volumes. A CPU-sized run: the table shows how large the noise is at this scale.\nresults: {results}")
    print(f"demo finished in {time.time() - t0:.0f} s; outputs in {out}")
    return rc


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="working folder (default: demo)")
    p.add_argument("--steps", type=int, help="pretraining steps (default: recipes/ablations/demo.yaml's)")
    p.add_argument("--nproc", type=int, help="pretraining processes (default: demo.yaml's, 2)")
    p.add_argument("--seed", type=int, default=0, help="phantom and pretraining seed (labelled set: seed + 1000)")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps per run (default: demo.yaml's)")
    a = p.parse_args(argv)
    return run(Path(a.out), a.steps, a.nproc, a.seed, a.finetune_steps)
