"""``python -m medssl.pretrain ablate``'s command line: run, ``--dry-run``, ``--slurm``, ``--collect`` and the
internal ``--run-index`` of one SLURM array task."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .spec import Ablation, AblationError, load, override_args, safe_name
from .runner import Runner, _say, plan, read_json, run_all, run_entry, status, write_json, write_text
from .results import collect
from .slurm import write_slurm
from .estimate import _dur, estimate, measure
from . import __doc__ as _DOC


def dry_run(abl: Ablation, out: Path, say=None, jobs: int = 1) -> int:
    say = say or _say
    p = plan(abl, out)
    say(f"ablation {abl.name} ({abl.file}) -> {Path(out).resolve()}")
    say(f"  shards: {', '.join(abl.shards)}")
    say(f"  downstream: {abl.dataset}: {abl.data['volumes']} labelled volumes, "
        f"{len([k for k in abl.data['classes'] if k])} foreground classes; per split {abl.data['test']} test / "
        f"{abl.data['val']} validation / up to {abl.data['train']} training")
    say(f"cells ({len(abl.cells)}), pretrained {abl.pre['steps']} steps each unless the cell says"
        + (f" (preset {abl.pre['preset']})" if abl.pre.get("preset") else "")
        + f" on {abl.pre['nproc']} process(es), seed {abl.pre['seed']}:")
    width = max(len(c.name) for c in abl.cells)
    for c in abl.cells:
        ov = " ".join(override_args(c.overrides)) or "(recipe defaults)"
        say(f"  {c.name:<{width}}  {c.recipe:<14} {c.steps:>6} steps  {ov}   network {c.network}")
    nets = sorted({(f"scratch-{safe_name(c.network)}", c.network) for c in abl.cells})
    say(f"scratch baselines ({len(nets)}): "
        + ", ".join(f"{f} (cells {', '.join(x.name for x in abl.cells if x.network == n)})" for f, n in nets))
    sts = {e["id"]: status(e) for e in p["pretrain"] + p["finetune"]}
    n_done = lambda es: sum(sts[e["id"]][0] == "done" for e in es)  # noqa: E731
    say(f"runs: {len(p['pretrain'])} pretraining ({n_done(p['pretrain'])} done), {len(p['finetune'])} fine-tuning "
        f"({n_done(p['finetune'])} done) = ({len(abl.cells)} cells + {len(nets)} scratch) x n_train {abl.ft['n_train']} x "
        f"seeds {abl.ft['seeds']}, {abl.ft['steps']} steps each" + (f" (preset {abl.ft['preset']})" if abl.ft.get("preset")
                                                                    else ""))
    for e in p["pretrain"] + p["finetune"]:
        st, why = sts[e["id"]]
        if st != "missing":
            say(f"  {e['id']}: {st}" + (f" ({why})" if why else ""))
    t0 = time.time()
    meas = measure(abl)
    est = estimate(abl, p, meas, jobs)
    import torch

    say(f"measured on this machine ({meas['device']}, {torch.get_num_threads()} thread(s) per process, "
        f"{os.cpu_count()} cores; {time.time() - t0:.0f} s to measure):")
    for c in abl.cells:
        say(f"  pretrain {c.name}: {meas['pretrain'][c.name]:.3f} s/step compute + {meas['data'][c.name]:.3f} s data -> "
            f"{_dur(est['per_run']['pretrain/' + c.name])} per run with start-up and export")
    for net in sorted(meas["finetune"]):
        one = next(e for e in p["finetune"] if e["network"] == net)
        say(f"  finetune {net}: {meas['finetune'][net]:.3f} s/step, {meas['window'][net]:.3f} s per evaluation "
            f"window ({est['windows']:.0f} windows per volume) -> about {_dur(est['per_run'][one['id']])} per run")
    how = "one run after another" if jobs == 1 else f"fine-tuning {jobs} runs at a time"
    say(f"estimated wall time here, {how} (not done yet): {_dur(est['total'])} "
        f"(pretraining {_dur(est['pretrain'])}, fine-tuning {_dur(est['finetune'])})")
    say("dry run: nothing run, nothing written")
    return 0


# ============================================================================================ CLI
def _check_out(out: Path, abl: Ablation) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AblationError(f"--out {out} is a file; give a new folder or this ablation's earlier folder")
    items = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    old = read_json(out / "plan.json")
    if items and old is None:
        raise AblationError(f"--out {out} holds other files ({', '.join(sorted(items)[:5])}); give a new or empty "
                            "folder, or the folder of an earlier run of this ablation")
    if old is not None and old.get("ablation") != abl.name:
        raise AblationError(f"--out {out} holds the ablation {old.get('ablation')!r}, not {abl.name!r}; give another --out")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain ablate",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=_DOC.split("Schema (")[0].rstrip(),
                                epilog="Schema (" + _DOC.split("Schema (", 1)[1])
    p.add_argument("file", help="ablation YAML (recipes/ablations/*.yaml)")
    p.add_argument("--out", help="output folder (default: ablations/<name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="print the plan and a measured time estimate; run nothing")
    g.add_argument("--slurm", action="store_true", help="write OUT/slurm/*.sbatch (arrays) + submit.sh; run nothing")
    g.add_argument("--collect", action="store_true", help="write results.csv / results.md / plots from the run folders")
    g.add_argument("--run-index", type=int, help=argparse.SUPPRESS)  # one entry of OUT/plan.json (SLURM array task)
    p.add_argument("--stage", choices=["pretrain", "finetune"], help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, help="fine-tuning runs at once here, each with cores / N threads "
                                            "(default: the file's finetune.jobs, else 1)")
    a = p.parse_args(argv)
    if a.jobs is not None and a.jobs < 1:
        print(f"error: --jobs {a.jobs}: give 1 or more fine-tuning runs at once", file=sys.stderr)
        return 2
    if (a.run_index is None) != (a.stage is None):
        print("error: --run-index and --stage go together", file=sys.stderr)
        return 2
    try:
        abl = load(a.file)
        out = Path(a.out or Path("ablations") / abl.name).resolve()
        _check_out(out, abl)
        jobs = a.jobs or abl.ft["jobs"]
        if a.dry_run:
            return dry_run(abl, out, jobs=jobs)
        if a.run_index is not None:
            saved = read_json(out / "plan.json")
            if not saved or saved.get("spec_hash") != abl.spec_hash:
                raise AblationError(f"{out / 'plan.json'} is missing or was written from another version of {a.file}; "
                                    "write the scripts again with --slurm")
            runs = saved[a.stage]
            if not 0 <= a.run_index < len(runs):
                raise AblationError(f"--run-index {a.run_index}: the {a.stage} stage has runs 0-{len(runs) - 1}")
    except AblationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.run_index is not None:
        runner = Runner()
        with runner.signals():
            r = run_entry(runs[a.run_index], saved, runner, tag=f"[{a.stage} {a.run_index}] ")
        return {"done": 0, "skipped": 0, "busy": 0, "stopped": 0}.get(r, 1)
    if a.collect:
        collect(abl, out)
        return 0
    pl = plan(abl, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", pl)
    write_text(out / "ablation.yaml", Path(abl.file).read_text())
    if a.slurm:
        made = write_slurm(abl, pl, out, abl.file)
        _say(f"wrote {', '.join(str(m) for m in made)}\n{len(pl['pretrain'])} pretraining + {len(pl['finetune'])} "
              f"fine-tuning runs; submit with: bash {out / 'slurm' / 'submit.sh'}")
        return 0
    _say(f"ablation {abl.name}: {len(pl['pretrain'])} pretraining + {len(pl['finetune'])} fine-tuning runs into {out}")
    rc = run_all(pl, jobs=jobs)
    collect(abl, out)
    return rc
