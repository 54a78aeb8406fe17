"""Fine-tuning runs that keep their work and can be used afterwards: resume and extension, refusal of a
different config, predict from the run folder alone, permissions, validation lines and wandb logging.

One short scratch run (tiny preset, 32³ crops) is shared by every assertion: 6 steps with a checkpoint
every 3, the same command again (finished: no training), then ``--steps 10`` (continues from step 6)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# wandb.init replaced by a recorder that appends every init / log call to $WANDB_RECORD (JSON lines)
LAUNCH = r"""
import json, os, sys
import wandb
REC = os.environ["WANDB_RECORD"]
def _put(rec):
    with open(REC, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
class _Run:
    def log(self, data, step=None):
        _put({"call": "log", "step": step,
              "data": {k: (type(v).__name__ if isinstance(v, wandb.Image) else v) for k, v in data.items()}})
    def finish(self):
        _put({"call": "finish"})
def _init(**kw):
    _put({"call": "init", "id": kw.get("id"), "resume": kw.get("resume"), "mode": kw.get("mode")})
    return _Run()
wandb.init = _init
from medssl.finetune.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _ft(args, record: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_RECORD": str(record), "OMP_NUM_THREADS": "2",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def ft(phantoms, tmp_path_factory):
    base = tmp_path_factory.mktemp("ftweek")
    run = base / "run"
    common = ["--data", str(phantoms), "--init", "scratch", "--preset", "tiny", "model.backbone=vit3d_tiny_p16",
              "data.crop_size=[32,32,32]", "data.crops_per_volume=2", "train.micro_batch=2", "train.eval_every=3",
              "train.checkpoint_every=3", "train.log_every=2", "train.keep_last=1", "data.test_fraction=0.34",
              "--out", str(run)]
    out = {"run": run, "common": common, "base": base}
    old = os.umask(0o022)
    try:
        for name, steps in (("first", 6), ("again", 6), ("extend", 10)):
            rec = base / f"wandb_{name}.jsonl"
            proc = _ft([*common, "--steps", str(steps)], rec)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            out[name] = (proc, _records(rec))
    finally:
        os.umask(old)
    return out


def test_point2_finetune_resumes(ft):
    run = ft["run"]
    first, _ = ft["first"]
    again, again_rec = ft["again"]
    extend, _ = ft["extend"]
    assert "finished run" in again.stdout and "nothing to do" in again.stdout
    assert "val step" not in again.stdout + again.stderr and not again_rec, "a finished run is not trained again"
    assert "continuing" in extend.stdout and "from step 6" in extend.stdout
    assert json.loads((run / "resume.json").read_text())["step"] == 6
    # the extension trained steps 7..10 only: its validations are at 9 and 10, not 3 and 6
    ext_vals = [line for line in (extend.stdout + extend.stderr).splitlines() if line.startswith("val step")]
    assert [line.split()[2] for line in ext_vals] == ["9/10:", "10/10:"], ext_vals
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 10 and [h["step"] for h in m["val_history"]] == [3, 6, 9, 10]
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step00000010"], tags  # keep_last 1
    assert (run / "checkpoints" / tags[0] / "complete.json").exists()
    # self-contained: absolute paths, the export's manifest (none here: scratch) / network beside the weights
    cfg_text = (run / "config.yaml").read_text()
    assert f"out: {run}" in cfg_text and str(Path(m["dataset"])) == m["dataset"] and Path(m["dataset"]).is_absolute()
    assert (run / "network.json").exists()


def test_point2_different_config_is_refused(ft, tmp_path):
    run = ft["run"]
    before = (run / "metrics.json").read_bytes()
    proc = _ft([*ft["common"], "--steps", "10", "optim.lr=1e-3"], tmp_path / "w.jsonl")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "optim.lr" in proc.stderr and "--overwrite" in proc.stderr and "new --out" in proc.stderr
    assert "Traceback" not in proc.stderr and (run / "metrics.json").read_bytes() == before


def test_point2_overwrite_moves_the_old_run_aside(ft, tmp_path):
    import shutil

    from medssl.finetune.config import load_config
    from medssl.finetune.rundir import RunDirError, plan

    copy = tmp_path / "copy"
    shutil.copytree(ft["run"], copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = load_config(["model.backbone=vit3d_tiny_p16"], "tiny", out=str(copy), init="scratch", dataset="x")
    with pytest.raises(RunDirError, match="--overwrite"):
        plan(cfg, "none", overwrite=False)
    moved = Path(plan(cfg, "none", overwrite=True)["moved"])
    assert moved.parent == copy and (moved / "metrics.json").exists() and not (copy / "metrics.json").exists()


def test_point3_model_best_is_readable_by_the_group(ft):
    for f in (ft["run"] / "model_best.safetensors", ):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, oct(f.stat().st_mode)


def test_point8_validation_lines_and_plain_progress(ft):
    first, _ = ft["first"]
    vals = [line for line in (first.stdout + first.stderr).splitlines() if line.startswith("val step")]
    assert len(vals) == 2 and vals[0].startswith("val step 3/6: mean Dice") and "best" in vals[1]
    assert "liver" in vals[0], vals  # per-class Dice by name
    m = json.loads((ft["run"] / "metrics.json").read_text())
    assert f"{m['val_history'][0]['val_dice']:.4f}" in vals[0]
    assert "\r" not in first.stderr and "\r" not in first.stdout
    bar = [line for line in first.stderr.splitlines() if "finetune scratch step" in line]
    assert [line.split()[3] for line in bar] == ["2/6", "4/6", "6/6"], bar


def test_point10_predict_reproduces_the_runs_prediction(ft, phantoms, tmp_path):
    run = ft["run"]
    m = json.loads((run / "metrics.json").read_text())
    key = sorted(m["cases"])[0]
    src = phantoms / "imagesTr" / f"{key.split('_', 1)[1]}_0000.nii.gz"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "medssl.finetune", "predict", str(run), "--images", str(src),
                           "--out", str(out), "--tta", "no"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine = nib.load(str(out / f"{key.split('_', 1)[1]}.nii.gz"))
    theirs = nib.load(m["cases"][key]["prediction"])
    ref = nib.load(str(src))
    assert mine.shape == ref.shape and np.allclose(mine.affine, ref.affine, atol=1e-5)
    a, b = np.asanyarray(mine.dataobj), np.asanyarray(theirs.dataobj)
    fg = (a > 0) | (b > 0)
    agree = float((a[fg] == b[fg]).mean()) if fg.any() else 1.0
    assert agree >= 0.99, agree
    # bad input: one message, exit 2, nothing written
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    for images in (bad, tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "medssl.finetune", "predict", str(run), "--images", str(images),
                               "--out", str(tmp_path / "none")], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(images) in proc.stderr, proc.stderr
        assert not (tmp_path / "none").exists()


def test_point12_dice_and_overlays_reach_wandb(ft):
    _, rec = ft["first"]
    _, ext = ft["extend"]
    inits = [r for r in rec if r["call"] == "init"]
    assert len(inits) == 1 and inits[0]["resume"] == "allow" and inits[0]["mode"] == "offline"
    logged = {k: v for r in rec if r["call"] == "log" for k, v in r["data"].items()}
    assert isinstance(logged.get("val_dice"), float) and isinstance(logged.get("val_dice/liver"), float)
    m6 = [r for r in rec if r["call"] == "log" and "test_mean_dice" in r["data"]]
    assert m6 and all(isinstance(v, float) for v in m6[0]["data"].values())
    assert any(v == "Image" for k, v in logged.items() if k.startswith("overlay/")), logged.keys()
    # the extension continues the same wandb run
    ext_inits = [r for r in ext if r["call"] == "init"]
    assert ext_inits and ext_inits[0]["id"] == inits[0]["id"] and ext_inits[0]["resume"] == "allow"
    m = json.loads((ft["run"] / "metrics.json").read_text())
    final = [r for r in ext if r["call"] == "log" and "test_mean_dice" in r["data"]][0]["data"]
    assert final["test_mean_dice"] == pytest.approx(m["mean_dice"])


def test_point11_report_flags_runs_that_do_not_compare(ft, tmp_path):
    import shutil

    from medssl.finetune.report import write_report

    run = ft["run"]
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    m = json.loads((other / "metrics.json").read_text())
    m["steps"], m["network"]["backbone"]["name"] = 99, "resenc3d_tiny"
    (other / "metrics.json").write_text(json.dumps(m))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("out: x\n")
    table = write_report([run, other, unfinished], tmp_path / "report.md")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "vit3d_tiny_p16 + unetr" in rows["run"] and rows["run"].rstrip().endswith("| yes |")
    assert "**no**: other network, steps" in rows["other"] and "resenc3d_tiny + unetr" in rows["other"]
    assert "incomplete" in rows["unfinished"]
    text = (tmp_path / "report.md").read_text()
    assert "not comparable" in text and "incomplete" in text
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "medssl.finetune", "report", str(unfinished), "--out",
                           str(tmp_path / "r2.md")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "metrics.json" in proc.stderr and "Traceback" not in proc.stderr


def test_point12_pictures_share_one_orientation_and_explain_themselves(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from medssl.finetune.evaluate import overlay_png
    from medssl.pretrain.pictures import VIEW, draw_grid

    said = []
    real_suptitle, real_legend = Figure.suptitle, Figure.legend
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **k: said.append(("title", t)) or real_suptitle(self, t, **k))
    monkeypatch.setattr(Figure, "legend", lambda self, *a, **k: said.append(
        ("legend", [h.get_label() for h in k.get("handles", [])])) or real_legend(self, *a, **k))
    vol = np.zeros((1, 24, 24), dtype=np.float32)
    vol[:, 16:, :] = 1.0  # the patient's right (RAS +x) is bright
    rgb = draw_grid({"input": vol}, path=tmp_path / "step00000200.png", legend={"masked patch": (0.4, 0.4, 0.6)})
    gray = rgb.mean(-1)
    rows = gray[gray.shape[0] // 4: 3 * gray.shape[0] // 4]
    dark = np.where(rows.mean(0) < 60)[0]  # the dark columns of the panel: the patient's left
    bright_cols = np.where(rows.mean(0) > 250)[0]
    assert dark.size and dark.mean() > gray.shape[1] / 2, "radiological: the patient's right is drawn on the left"
    assert ("legend", ["masked patch"]) in said
    assert any(k == "title" and t.startswith("step 200") and VIEW in t for k, t in said), said
    said.clear()
    lab = np.zeros((24, 24, 4), dtype=np.uint8)
    lab[16:, 4:10, 2] = 1
    overlay_png(np.repeat(vol[0][..., None], 4, -1), lab, lab, tmp_path / "o.png", "c1 — mean Dice 0.500", 3,
                classes={0: "background", 1: "liver", 2: "spleen"})
    assert ("legend", ["1 liver", "2 spleen"]) in said
    assert any(k == "title" and "mean Dice 0.500" in t and "radiological" in t for k, t in said)
    assert bright_cols.size
