"""``python -m medssl.pretrain ablate``: the file's checks, the plan, the paired interval, SLURM scripts, and one
small real grid (2 cells + a failing one, pretrained vs scratch) shared by the end-to-end assertions."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medssl.pretrain import ablate
from medssl.pretrain.__main__ import main as pretrain_main

ROOT = Path(__file__).resolve().parent.parent
# tiny everything: 4 pretraining steps on one process, 4 fine-tuning steps on 32^3 crops, validation every step
PRE = {"preset": "tiny", "steps": 4, "nproc": 1, "seed": 0, "timeout": 600,
       "overrides": {"data.num_workers": 0, "train.picture_every": 0, "train.log_every": 1}}
FT = {"preset": "tiny", "steps": 4, "nproc": 1, "n_train": [1, 2], "seeds": [0], "timeout": 600,
      "overrides": {"data.crop_size": [32, 32, 32], "data.crops_per_volume": 2, "train.eval_every": 1,
                    "data.test_fraction": 0.34, "eval.overlays": 0}}


def spec(built, phantoms, **changes) -> dict:
    s = {"name": "t", "shards": [str(built)], "dataset": str(phantoms), "pretrain": dict(PRE), "finetune": dict(FT),
         "grid": {"recipe": "hi_end_mae", "axes": {"task.mask_ratio": [0.6, 0.9]}}}
    s.update(changes)
    return s


def write(tmp_path: Path, s: dict, name: str = "abl.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(s, sort_keys=False))
    return p


def run_main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pretrain_main(["ablate", *args])
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------- statistics
def naive_interval(diffs, resamples, seed, level=0.95):
    """Plain-Python reference: the same generator draws, a double loop for the means, percentiles by hand."""
    n = len(diffs)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()
    means = []
    for b in range(resamples):
        total = 0.0
        for j in range(n):
            total += diffs[draws[b][j]]
        means.append(total / n)
    means.sort()

    def pct(q):  # linear interpolation between order statistics (numpy's default)
        pos = q / 100 * (resamples - 1)
        lo = int(pos)
        hi = min(lo + 1, resamples - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    a = (1 - level) / 2 * 100
    return sum(diffs) / n, pct(a), pct(100 - a)


def test_paired_interval_matches_naive_reference():
    diffs = [0.05, -0.02, 0.11, 0.03, 0.0, 0.07, -0.04, 0.09]
    got = ablate.paired_interval(diffs, resamples=2000, seed=7)
    want = naive_interval(diffs, 2000, 7)
    assert np.allclose(got, want, atol=1e-12), (got, want)
    assert got[1] < got[0] < got[2]
    # the runner's defaults: 10 000 resamples, a fixed generator -> the same interval every time
    assert ablate.paired_interval(diffs) == ablate.paired_interval(diffs)
    mean, lo, hi = ablate.paired_interval([0.1] * 5)
    assert mean == lo == hi == pytest.approx(0.1)
    assert all(np.isnan(ablate.paired_interval([])))


def test_paired_diffs_pair_cases_of_the_same_seed():
    a = {"split": {"test": ["x", "y"]}, "cases": {"x": {"dice": {"liver": 0.8, "spleen": 0.6}},
                                                   "y": {"dice": {"liver": 0.5, "spleen": float("nan")}}}}
    b = {"split": {"test": ["x", "y"]}, "cases": {"x": {"dice": {"liver": 0.6, "spleen": 0.4}},
                                                   "y": {"dice": {"liver": 0.6, "spleen": 0.2}}}}
    diffs, notes = ablate.paired_diffs([(a, b)])
    assert diffs == pytest.approx([0.7 - 0.5, 0.5 - 0.4]) and not notes
    c = {**b, "split": {"test": ["x", "z"]}}
    assert ablate.paired_diffs([(a, c)])[0] == [] and ablate.paired_diffs([(a, c)])[1]


def test_final_loss_is_the_mean_of_the_last_stage(tmp_path):
    """A staged recipe (contrastive: global, then local) logs two different losses; the table's final pretext loss
    averages the last stage's rows only, and a recipe without stages its last 10 rows."""
    from medssl.pretrain.ablate.runner import final_loss

    rows = [{"step": s, "loss": 3.0, "stage": 0.0} for s in range(1, 16)]
    rows += [{"step": s, "loss": 0.1, "stage": 1.0} for s in range(16, 21)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert final_loss(tmp_path) == pytest.approx(0.1)
    plain = [{"step": s, "loss": float(s)} for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    assert final_loss(tmp_path) == pytest.approx(sum(range(11, 21)) / 10)


def test_a_run_past_its_timeout_is_stopped_and_recorded(tmp_path, monkeypatch):
    (tmp_path / "sleeper.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    entry = {"stage": "pretrain", "id": "pretrain/x", "dir": str(tmp_path / "run"), "module": "sleeper", "args": [],
             "nproc": 1, "timeout": 1.0, "key": "k"}
    t0 = time.time()
    rc, timed_out, seconds, cmd = ablate.Runner().execute(entry)
    assert timed_out and rc != 0 and time.time() - t0 < 30
    assert "sleeping" in (tmp_path / "run" / "run.log").read_text()
    assert json.loads((tmp_path / "run" / "attempts.jsonl").read_text())["timed_out"] is True


# ------------------------------------------------------------------------------------------- the file
def test_axes_expand_into_named_cells():
    cells = ablate._grid_cells({"recipe": "hi_end_mae", "overrides": {"optim.lr": 1e-3},
                                "axes": {"task.mask_ratio": [0.6, 0.75],
                                         "decoding": {"hier": {"task.cross_depth": 3},
                                                      "final": {"task.self_depth": 5, "task.cross_depth": 0}}}}, "grid")
    names = [c[0] for c in cells]
    assert names == ["mask_ratio-0.6_decoding-hier", "mask_ratio-0.6_decoding-final",
                     "mask_ratio-0.75_decoding-hier", "mask_ratio-0.75_decoding-final"]
    assert cells[1][2] == {"optim.lr": 1e-3, "task.mask_ratio": 0.6, "task.self_depth": 5, "task.cross_depth": 0}
    assert cells[1][3] == {"mask_ratio": 0.6, "decoding": "final"}


@pytest.mark.parametrize("change, needle", [
    ({"pretrian": {}}, "unknown key pretrian (did you mean 'pretrain'?)"),
    ({"shards": ["/nonexistent/shards"]}, "is not a shard set"),
    ({"dataset": "/nonexistent/data"}, "does not exist"),
    ({"grid": {"recipe": "hi_end_mea", "axes": {"task.mask_ratio": [0.6]}}}, "unknown recipe 'hi_end_mea'"),
    ({"grid": {"recipe": "hi_end_mae", "axes": {"task.mask_rato": [0.6]}}}, "unknown key 'task.mask_rato'"),
    ({"grid": {"recipe": "volume_fusion", "axes": {"task.mask_ratio": [0.6]}}}, "unknown key 'task.mask_ratio'"),
    ({"cells": [{"name": "a", "recipe": "hi_end_mae", "overrides": {"train.steps": 3}}], "grid": None},
     "set by the runner"),
    ({"finetune": {**FT, "n_train": [1, 9]}}, "finetune.n_train [9]"),
    ({"finetune": {**FT, "overrides": {"data.crop_sise": [32, 32, 32]}}}, "unknown key 'data.crop_sise'"),
    ({"grid": {"recipe": "hi_end_mae", "axes": {"task.mask_ratio": [1.5]}}}, "task.mask_ratio=1.5"),
    ({"grid": None}, "no cells"),
    ({"cells": [{"name": "a", "recipe": "hi_end_mae", "steps": 0}], "grid": None}, "steps=0 must be a whole number"),
])
def test_bad_files_exit_2_with_one_message_and_nothing_made(tmp_path, built, phantoms, change, needle):
    f = write(tmp_path, spec(built, phantoms, **change))
    out = tmp_path / "out"
    rc, stdout, stderr = run_main([str(f), "--out", str(out)])
    assert rc == 2, (stdout, stderr)
    assert needle in stderr and stderr.count("error:") == 1, stderr
    assert not out.exists()


def test_plan_pairs_pretrained_and_scratch_runs(tmp_path, built, phantoms):
    abl = ablate.load(write(tmp_path, spec(built, phantoms, finetune={**FT, "seeds": [0, 3]})))
    p = ablate.plan(abl, tmp_path / "out")
    assert [e["cell"] for e in p["pretrain"]] == ["mask_ratio-0.6", "mask_ratio-0.9"]
    assert {c.network for c in abl.cells} == {"vit3d_tiny_p16+unetr"}  # one network -> one scratch baseline
    assert len(p["finetune"]) == 3 * 2 * 2
    runs = {(e["cell"], e["n_train"], e["seed"]): e for e in p["finetune"]}
    pre, scr = runs[("mask_ratio-0.9", 2, 3)], runs[("scratch-vit3d_tiny_p16+unetr", 2, 3)]
    strip = lambda args: [a for a in args if "/" not in a and a not in ("pretrained", "scratch")]  # noqa: E731
    assert strip(pre["args"]) == strip(scr["args"])  # the same settings apart from the export and init
    assert "train.seed=3" in pre["args"] and "data.split_seed=3" in pre["args"]
    assert pre["dir"].endswith("finetune/mask_ratio-0.9/n2-s3") and scr["init"] == "scratch"
    assert ablate.command(p["pretrain"][0])[1:3] == ["-m", "medssl.pretrain"]
    two = dict(p["pretrain"][0], nproc=2)
    assert ablate.command(two)[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    # a cell's own steps (recipes differ in step cost) replace pretrain.steps for that cell only
    s = spec(built, phantoms, grid=None, cells=[{"name": "a", "recipe": "hi_end_mae"},
                                                {"name": "b", "recipe": "hi_end_mae", "steps": 7}])
    p = ablate.plan(ablate.load(write(tmp_path, s, "steps.yaml")), tmp_path / "out2")
    steps = {e["cell"]: e["args"][e["args"].index("--steps") + 1] for e in p["pretrain"]}
    assert steps == {"a": str(s["pretrain"]["steps"]), "b": "7"}


def test_slurm_scripts_chain_the_stages(tmp_path, built, phantoms):
    f = write(tmp_path, spec(built, phantoms, slurm={"partition": "gpu", "extra": ["--qos=high"]}))
    out = tmp_path / "out"
    rc, stdout, stderr = run_main([str(f), "--out", str(out), "--slurm"])
    assert rc == 0, stderr
    d = out / "slurm"
    n_pre, n_ft = 2, 3 * 2  # 2 cells; (2 cells + scratch) x n_train [1, 2] x seed [0]
    for name, n in (("pretrain.sbatch", n_pre), ("finetune.sbatch", n_ft)):
        text = (d / name).read_text()
        assert subprocess.run(["bash", "-n", str(d / name)]).returncode == 0
        assert f"#SBATCH --array=0-{n - 1}\n" in text
        for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                     "set -uo pipefail", "#SBATCH --partition=gpu", "#SBATCH --qos=high"):
            assert line in text, (name, line)
        assert f"--run-index \"$SLURM_ARRAY_TASK_ID\" --stage {name.split('.')[0]}" in text
    submit = (d / "submit.sh").read_text()
    assert subprocess.run(["bash", "-n", str(d / "submit.sh")]).returncode == 0
    assert "sbatch --parsable \"$here/pretrain.sbatch\"" in submit
    assert "sbatch --parsable --dependency=afterany:$jid \"$here/finetune.sbatch\"" in submit
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["pretrain"]) == n_pre and len(plan["finetune"]) == n_ft
    assert not (out / "pretrain").exists()  # nothing run
    # an array task index outside the plan is refused
    rc, _, stderr = run_main([str(f), "--out", str(out), "--run-index", "7", "--stage", "pretrain"])
    assert rc == 2 and "runs 0-1" in stderr
    # a stage-2 task whose cell has no export (its pretraining failed or never ran) records "skipped" and exits 0
    rc, stdout, _ = run_main([str(f), "--out", str(out), "--run-index", "0", "--stage", "finetune"])
    first = plan["finetune"][0]
    assert rc == 0 and f"{first['id']}: skipped: pretraining of cell {first['cell']} not done" in stdout
    assert json.loads((Path(first["dir"]) / "skipped.json").read_text())["status"] == "skipped"


def test_dry_run_prints_the_plan_and_makes_nothing(tmp_path, built, phantoms):
    f = write(tmp_path, spec(built, phantoms))
    out = tmp_path / "out"
    rc, stdout, stderr = run_main([str(f), "--out", str(out), "--dry-run"])
    assert rc == 0, stderr
    assert "mask_ratio-0.6" in stdout and "task.mask_ratio=0.6" in stdout
    assert "2 pretraining (0 done), 6 fine-tuning (0 done)" in stdout
    assert "s/step" in stdout and "estimated wall time" in stdout
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl.yaml"]


def test_example_ablation_files_load(tmp_path, built, phantoms, monkeypatch):
    """The shipped examples resolve (their relative paths pointed at the test data)."""
    for f in sorted((ROOT / "recipes" / "ablations").glob("*.yaml")):
        s = yaml.safe_load(f.read_text())
        s["shards"], s["dataset"] = [str(built)], str(phantoms)
        s["finetune"]["n_train"] = [1, 2]
        s["finetune"]["overrides"] = {**(s["finetune"].get("overrides") or {}), "data.test_fraction": 0.34}
        abl = ablate.load(write(tmp_path, s, f.name))
        assert abl.cells, f
    assert {f.name for f in (ROOT / "recipes" / "ablations").glob("*.yaml")} >= {
        "hi_end_mae_mask_ratio.yaml", "volume_fusion_k.yaml", "compare_recipes.yaml"}


# ------------------------------------------------------------------------------------------- a real grid
def _env() -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def grid(built, phantoms, tmp_path_factory):
    """2 hi_end_mae cells (mask ratio 0.6 / 0.9) + a cell whose shard files vanished (it fails at run time),
    n_train [1, 2] x seed 0. The runner is stopped (SIGTERM) once the first run is done, then run again."""
    base = tmp_path_factory.mktemp("ablate")
    broken = base / "broken_shards"
    shutil.copytree(built, broken)
    for tar in broken.glob("*.tar"):
        tar.unlink()  # index.json still lists them: the stream finds every shard missing and gives up
    s = spec(built, phantoms)
    s["finetune"]["jobs"] = 2  # the second run fine-tunes two runs at a time
    s["grid"] = [s["grid"], {"name": "broken", "recipe": "hi_end_mae", "shards": [str(broken)],
                             "axes": {"task.mask_ratio": [0.75]}}]
    f = write(base, s)
    out = base / "out"
    first_done = out / "pretrain" / "mask_ratio-0.6" / "done.json"
    proc = subprocess.Popen([sys.executable, "-m", "medssl.pretrain", "ablate", str(f), "--out", str(out)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not first_done.exists() and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    first_out = proc.communicate(timeout=300)[0]
    before = _mtimes(first_done.parent)
    old = dict(os.environ)
    os.environ.update({k: v for k, v in _env().items() if k in ("WANDB_MODE", "OMP_NUM_THREADS")})
    try:  # the second run in this process (its runs are subprocesses all the same)
        rc, second_out, err = run_main([str(f), "--out", str(out)])
    finally:
        os.environ.clear()
        os.environ.update(old)
    return {"out": out, "first": (proc.returncode, first_out), "second": (rc, second_out, err), "before": before,
            "first_dir": first_done.parent}


def test_grid_completes_with_results_table(grid):
    out = grid["out"]
    rc, text, err = grid["second"]
    assert rc == 1, text + err  # one cell failed: the runner says so in its exit code, after finishing the rest
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    cells = ["mask_ratio-0.6", "mask_ratio-0.9", "scratch-vit3d_tiny_p16+unetr", "broken_mask_ratio-0.75"]
    assert sorted((r["cell"], int(r["n_train"])) for r in rows) == sorted((c, n) for c in cells for n in (1, 2))
    for col in ("recipe", "overrides", "init", "seed", "pretrain_steps", "pretrain_wall_s", "pretext_loss", "dice_liver",
                "mean_dice", "status"):
        assert col in rows[0], col
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == 6
    for r in done:
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
        if r["init"] == "pretrained":
            assert r["pretrain_steps"] == "4" and float(r["pretext_loss"]) > 0 and float(r["pretrain_wall_s"]) > 0
            assert json.loads(r["overrides"])["task.mask_ratio"] in (0.6, 0.9)
        else:
            assert r["recipe"] == "" and r["pretext_loss"] == ""
    md = (out / "results.md").read_text()
    for c in cells:
        for n in (1, 2):
            assert f"| {n} | {c} |" in md or f"| {n} | **{c}** ★ |" in md, (c, n)
    assert md.count("★ |") == 2  # one best cell per n_train
    assert "pairs)" in md and "CI excludes 0" in md
    assert (out / "dice_vs_n_train.png").stat().st_size > 5000 and (out / "pretext_loss.png").stat().st_size > 5000
    # paired: a pretrained run and its scratch run share the split and the decoder init
    a = json.loads((out / "finetune" / "mask_ratio-0.9" / "n2-s0" / "metrics.json").read_text())
    b = json.loads((out / "finetune" / "scratch-vit3d_tiny_p16+unetr" / "n2-s0" / "metrics.json").read_text())
    assert a["split"] == b["split"] and a["decoder_init_digest"] == b["decoder_init_digest"]
    assert a["init"] == "pretrained" and b["init"] == "scratch"
    marker = json.loads((out / "finetune" / "mask_ratio-0.9" / "n2-s0" / "done.json").read_text())
    assert {"time", "command", "key", "mean_dice"} <= set(marker)


def test_grid_rerun_after_a_kill_redoes_nothing_finished(grid):
    rc, first = grid["first"]
    assert "mask_ratio-0.6: done in" in first and "stopped" in first, first
    _, second, _ = grid["second"]
    assert "pretrain/mask_ratio-0.6: skipped: done before" in second
    assert "pretrain/mask_ratio-0.6: started" not in second
    assert _mtimes(grid["first_dir"]) == grid["before"]  # not a file of the finished run was touched
    # the run stopped mid-way was started again (its folder holds both attempts) and finished
    attempts = (grid["out"] / "pretrain" / "mask_ratio-0.9" / "attempts.jsonl").read_text().splitlines()
    assert (grid["out"] / "pretrain" / "mask_ratio-0.9" / "done.json").is_file()
    assert len(attempts) in (1, 2)  # 2 when the stop reached it after it had started


def test_grid_failing_cell_is_reported_and_the_others_complete(grid):
    out = grid["out"]
    d = out / "pretrain" / "broken_mask_ratio-0.75"
    failed = json.loads((d / "failed.json").read_text())
    assert failed["exit_code"] not in (0, None) and failed["log_tail"] and (d / "run.log").is_file()
    assert "missing" in failed["log_tail"] or "missing" in failed["reason"], failed["reason"]
    _, second, _ = grid["second"]
    assert "pretrain/broken_mask_ratio-0.75: failed: exit" in second
    assert "finetune/broken_mask_ratio-0.75/n1-s0: skipped: pretraining of cell broken_mask_ratio-0.75 failed" in second
    with open(out / "results.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["cell"] == "broken_mask_ratio-0.75"]
    assert {r["status"] for r in rows} == {"skipped"}
    md = (out / "results.md").read_text()
    assert "## Failed, skipped or missing runs" in md and "`pretrain/broken_mask_ratio-0.75`: failed" in md
    # --collect writes the same table again from the folders alone
    os.remove(out / "results.md")
    rc, _, _ = run_main([str(out.parent / "abl.yaml"), "--out", str(out), "--collect"])
    assert rc == 0 and (out / "results.md").is_file()


def test_a_shipped_example_runs_by_name(tmp_path, built, phantoms, monkeypatch):
    """`ablate compare_recipes --slurm` (no path): the shipped file is found, copied into OUT and named in the
    scripts, with its relative data paths read from the working directory."""
    (tmp_path / "demo" / "raw").mkdir(parents=True)
    (tmp_path / "demo" / "shards").symlink_to(built, target_is_directory=True)
    (tmp_path / "demo" / "raw" / "Dataset902_PhantomCTLabelled").symlink_to(phantoms, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    rc, stdout, stderr = run_main(["compare_recipes", "--out", str(tmp_path / "out"), "--slurm"])
    assert rc == 0, stderr
    shipped = ROOT / "recipes" / "ablations" / "compare_recipes.yaml"
    assert (tmp_path / "out" / "ablation.yaml").read_text() == shipped.read_text()
    assert str(shipped.resolve()) in (tmp_path / "out" / "slurm" / "pretrain.sbatch").read_text()
