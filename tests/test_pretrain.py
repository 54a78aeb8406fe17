"""The one loop on DeepSpeed: a 2-process CPU run (torchrun) of hi_end_mae on phantom shards — the loss
falls, checkpoints are kept, a resumed run continues from the saved step with identical weights, and
the export loads into the backbone key for key. One shared pair of runs serves all assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.pretrain.checkpoint import complete_tags
from medssl.pretrain.export import ExportError, load_backbone, read_manifest

STEPS, MORE = 24, 30


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medssl.pretrain", "hi_end_mae", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(built, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain") / "run"
    common = ["--shards", str(built), "--out", str(run), "--preset", "tiny", "--no-progress",
              "train.checkpoint_every=8", "train.keep_last=2", "train.log_every=1", "train.picture_every=8",
              "optim.lr=1e-3", "optim.warmup_fraction=0.1", "data.num_workers=1",
              "task.norm_pix_loss=false"]  # raw-intensity MSE: a clear fall within a few steps
    root = Path(__file__).resolve().parents[1]
    first = _torchrun([*common, "--steps", str(STEPS)], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    tags_after_first = complete_tags(run / "checkpoints")
    second = _torchrun([*common, "--steps", str(MORE)], root)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return run, first, second, tags_after_first


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_steps_are_logged(runs):
    run, *_ = runs
    m = _metrics(run)
    steps = [r["step"] for r in m]
    assert steps == list(range(1, MORE + 1)), "the resumed run continues at the saved step, no gap, no repeat"
    first = sum(r["loss"] for r in m[:4]) / 4
    last = sum(r["loss"] for r in m[STEPS - 4:STEPS]) / 4
    assert last < 0.9 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert all(r["samples"] == r["step"] * m[0]["samples"] for r in m), "samples seen = step x global batch"
    assert (run / "config.yaml").exists() and list((run / "pictures").glob("*.png"))


def test_checkpoints_are_kept_and_resume_restores_the_weights(runs):
    run, first, second, tags_after_first = runs
    assert tags_after_first == ["step00000024", "step00000016"], "keep_last=2 keeps the newest two"
    assert complete_tags(run / "checkpoints") == ["step00000030", "step00000024"]
    resumed = json.loads((run / "resume.json").read_text())
    assert resumed["step"] == STEPS and resumed["saved_digest"] and resumed["saved_digest"] == resumed["loaded_digest"]
    assert "resumed from" in second.stdout + second.stderr


def test_export_loads_every_key(runs):
    run, *_ = runs
    manifest = read_manifest(run / "export")
    assert manifest["recipe"] == "hi_end_mae" and manifest["step"] == MORE and manifest["backbone"]["name"] == "vit3d_tiny_p16"
    assert manifest["preprocessing"]["spacing"] == "1.5" and manifest["preprocessing"]["orientation"] == "RAS"
    logs = []
    model = load_backbone(run / "export", log=logs.append)
    n = len(model.state_dict())
    assert f"loaded {n}/{n}" in logs[-1]
    crop = manifest["preprocessing"]["crop_size"]
    feats = model.forward_features(torch.zeros(1, 1, *crop))
    assert len(feats) == len(manifest["feature_channels"])
    # another input size and two input channels (CT-pretrained -> two MRI sequences)
    bigger = [c * 2 for c in crop]
    model2 = load_backbone(run / "export", img_size=tuple(bigger), in_chans=2, log=logs.append)
    assert model2.forward_features(torch.zeros(1, 2, *bigger))[-1].shape[1] == 1 + model2.num_patches


def test_export_refuses_replaced_weights(runs, tmp_path):
    import shutil

    run, *_ = runs
    bad = tmp_path / "export"
    shutil.copytree(run / "export", bad)
    (bad / "backbone.safetensors").write_bytes((bad / "backbone.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ExportError, match="sha256"):
        load_backbone(bad)


def test_resume_auto_falls_back_past_a_damaged_checkpoint(runs, tmp_path):
    """The newest checkpoint lost its model states (a crash mid-copy): --resume auto says so and
    continues from the one before."""
    import shutil

    run, *_ = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / "step00000030").glob("*model_states.pt"):
        f.unlink()
    (copy / "export").rename(tmp_path / "old_export")
    built = json.loads((run / "export" / "manifest.json").read_text())["config"]["data"]["shards"]
    res = _torchrun(["--shards", *built, "--out", str(copy), "--preset", "tiny", "--no-progress", "--steps", "26",
                     "train.checkpoint_every=100", "train.log_every=1", "data.num_workers=1", "task.norm_pix_loss=false",
                     "train.keep_last=2", "optim.lr=1e-3", "optim.warmup_fraction=0.1"], Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "step00000030" in res.stderr and "falling back" in res.stderr
    assert json.loads((copy / "resume.json").read_text())["step"] == 24
    assert read_manifest(copy / "export")["step"] == 26
