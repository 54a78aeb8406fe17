"""Pretraining command line in the first week of use: a run dir is never silently replaced, exports are
readable by the group, multi-channel shards train, logs are plain lines in files, bad input is one
message and exit 2, and the command explains itself.

One real run (a single CPU process, 4 steps of the tiny preset on a 2-channel MRI shard set, umask
0o022, output captured as in a batch job) serves every check that needs a run; the rest call the
argument phase in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medssl.pretrain.__main__ import _train_parser, main, plan_run_dir, resolve
from medssl.pretrain.checkpoint import CheckpointMismatch, complete_tags, move_aside, resume, run_items
from medssl.pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 4, 2


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory):
    """Three MRI phantoms with two sequences each (nnU-Net ``_0000``/``_0001``), built into shards."""
    from tests.conftest import two_sequence_mri_shards

    return two_sequence_mri_shards(tmp_path_factory.mktemp("mr2") / "Dataset950_TwoSeq",
                                   tmp_path_factory.mktemp("shards2"), n=3, seed=5)


def _args(shards, out, *extra):
    return ["hi_end_mae", "--preset", "tiny", "--shards", str(shards), "--out", str(out), "--steps", str(STEPS),
            "data.num_workers=0", "train.micro_batch=2", *extra]


@pytest.fixture(scope="module")
def run(two_channel, tmp_path_factory):
    """The one real run: 1 process, output to pipes (not a terminal), --no-progress, umask 0o022."""
    out = tmp_path_factory.mktemp("run") / "r1"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MEDSSL_DEBUG", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "medssl.pretrain", *_args(two_channel, out, f"train.log_every={LOG_EVERY}",
                                                            "train.checkpoint_every=2", "train.picture_every=0",
                                                            "--no-progress")]
    old = os.umask(0o022)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, r


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_size for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- point 1
def test_point1_changed_config_refused(run, two_channel, capsys):
    out, _ = run
    before = _snapshot(out)
    for change, key in (("task.decoder_dim=60", "task.decoder_dim"), ("model.backbone=vit3d_small_p16", "model.backbone")):
        capsys.readouterr()
        assert main(_args(two_channel, out, change)) == 2
        err = capsys.readouterr().err
        assert key in err and "->" in err and "--resume none --overwrite" in err and "another --out" in err, err
        assert "Traceback" not in err and err.count("error:") == 1
    assert _snapshot(out) == before, "a refused run touches nothing in the run dir"
    assert not list((out / "checkpoints").glob("damaged-*"))


def test_point1_allowed_keys_resume(run, two_channel, tmp_path):
    out, _ = run
    args = _train_parser().parse_intermixed_args(_args(two_channel, out, "train.log_every=1", "train.checkpoint_every=3"))
    args.steps = 8
    cfg, _, plan = resolve(args)
    assert plan.resume == "auto" and plan.move_aside is None
    changed = {k for k, _, _ in plan.changed}
    assert {"train.steps", "train.log_every", "train.checkpoint_every"} <= changed
    assert cfg.train.steps == 8
    # a run written before a key existed resumes: the missing key reads as its default
    older = tmp_path / "older"
    older.mkdir()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["optim"]["step_gamma"]
    (older / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg.out = str(older)
    assert plan_run_dir(cfg, "auto", False).resume == "auto"


def test_point1_resume_none_needs_overwrite_and_moves_the_old_run_aside(run, two_channel, capsys, tmp_path):
    out, _ = run
    assert main(_args(two_channel, out, "--resume", "none")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "already holds a run" in err
    assert main(_args(two_channel, out, "--overwrite")) == 2, "--overwrite goes with --resume none only"
    capsys.readouterr()
    args = _train_parser().parse_intermixed_args(_args(two_channel, out, "--resume", "none", "--overwrite"))
    _, _, plan = resolve(args)
    assert plan.resume == "none" and Path(plan.move_aside).parent == out and Path(plan.move_aside).name.startswith("previous-")
    # what train() does with that plan on rank 0, on a copy of the run
    copy = tmp_path / "r1"
    shutil.copytree(out, copy)
    before = _snapshot(copy)
    moved = move_aside(copy, copy / Path(plan.move_aside).name)
    assert "checkpoints" in moved and "export" in moved and "config.yaml" in moved
    assert run_items(copy) == [], "a new run never mixes with the old one's checkpoints"
    after = {k.split("/", 1)[1]: v for k, v in _snapshot(copy).items()}
    assert after == before, "nothing of the old run is lost"


def test_point1_resume_path_validated(run, two_channel, capsys):
    out, _ = run
    assert main(_args(two_channel, out, "--resume", "latest-please")) == 2
    err = capsys.readouterr().err
    assert "latest-please" in err and "auto, none" in err and "step00000004" in err
    args = _train_parser().parse_intermixed_args(_args(two_channel, out, "--resume", str(out / "checkpoints" / "step00000002")))
    _, _, plan = resolve(args)
    assert plan.resume == "step00000002" and Path(plan.resume_dir) == out / "checkpoints"


class _Engine:
    """Stands in for a DeepSpeed engine whose load_checkpoint fails as told."""

    def __init__(self, exc):
        self.exc = exc

    def load_checkpoint(self, *_a, **_k):
        raise self.exc


def _fake_tag(ckpt: Path, tag: str) -> None:
    (ckpt / tag).mkdir(parents=True)
    (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (ckpt / tag / "loader_rank0.json").write_text("{}")
    (ckpt / tag / "complete.json").write_text(json.dumps({"step": int(tag[4:]), "samples": 1}))


def test_point1_mismatched_checkpoint_is_not_damaged(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _fake_tag(ckpt, "step00000008")
    mismatch = RuntimeError("Error(s) in loading state_dict for HiEndMAE:\n\tsize mismatch for head.weight: copying a "
                            "param with shape torch.Size([8192, 96]) from checkpoint, the shape in current model is "
                            "torch.Size([8192, 60]).")
    with pytest.raises(CheckpointMismatch, match="does not fit the configured model"):
        resume(_Engine(mismatch), ckpt, 0, 1, log=lambda *_: None)
    assert complete_tags(ckpt) == ["step00000008"] and not list(ckpt.glob("damaged-*"))
    # a truly unreadable one is still moved aside, and the run starts over from step 0
    assert resume(_Engine(OSError("unexpected end of file")), ckpt, 0, 1, log=lambda *_: None) == (0, 0, None)
    assert (ckpt / "damaged-step00000008").is_dir()


# ------------------------------------------------------------------------------------------- point 3
def test_point3_exports_readable_by_group(run, tmp_path):
    out, _ = run
    for name in ("backbone.safetensors", "manifest.json"):
        assert (out / "export" / name).stat().st_mode & 0o777 == 0o644, name
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.export import write_component

    module = build_backbone("vit3d_tiny_p16", img_size=(32, 32, 32))
    old = os.umask(0o022)
    try:
        entry = write_component(tmp_path, "decoder", module, dict(module.state_dict()))
    finally:
        os.umask(old)
    assert (tmp_path / entry["file"]).stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------- point 7
def test_point7_channels_from_the_shards(run, two_channel, built, capsys):
    from medssl.pretrain.export import load_backbone, read_manifest

    out, r = run
    manifest = read_manifest(out / "export")
    assert manifest["in_channels"] == 2 and manifest["backbone"]["kwargs"]["in_chans"] == 2
    model = load_backbone(out / "export", log=lambda *_: None)
    crop = manifest["preprocessing"]["crop_size"]
    assert model.forward_features(torch.zeros(1, 2, *crop))[-1].shape[0] == 1
    assert "2 channel(s)" in r.stdout
    # shard sets that disagree are refused before anything starts, naming both
    assert main(_args(two_channel, out.parent / "mixed", "--shards", str(built))) == 2
    err = capsys.readouterr().err
    assert "disagree on channels" in err and str(built) in err and str(two_channel) in err
    assert not (out.parent / "mixed").exists()
    assert main(_args(two_channel, out.parent / "forced", "model.kwargs={in_chans: 1}")) == 2
    assert "in_chans=1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- point 8
def test_point8_plain_progress_lines_and_start_summary(run):
    _, r = run
    text = r.stdout + r.stderr
    assert "\r" not in text, "no carriage-return bar in a log file"
    lines = [ln for ln in text.splitlines() if re.match(r"^hi_end_mae step \d+/\d+ ", ln)]
    assert [int(re.match(r"^hi_end_mae step (\d+)/", ln).group(1)) for ln in lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert all(k in lines[-1] for k in ("loss", "lr", "samples/s", "eta")), lines[-1]
    for must in ("backbone vit3d_tiny_p16", "M parameters", "world 1", "2 micro x 1 accum x 1 world = 2 global",
                 "precision fp32", "ZeRO stage 1", "3 volumes", "crop [64, 64, 64]", f"steps 0 -> {STEPS}", "new run"):
        assert must in r.stdout, (must, r.stdout)
    for noise in ("Setting accelerator", "ds_accelerator", "[INFO]", "built successfully", "No CUDA runtime",
                  "Processing zero checkpoint", "Loading checkpoint shards"):
        assert noise not in text, noise


def test_point8_demo_does_not_announce_the_end_before_pretraining(monkeypatch, capsys, tmp_path):
    import yaml

    import medssl.pretrain.ablate as ablate
    import medssl.pretrain.demo as demo
    import medssl.shards.demo as shards_demo
    import medssl.shards.synth as synth

    def fake_shards(out, n_ct=8, seed=0, variation=0.0):
        print("[1/5] synthesising")
        print("demo finished in 2 s; outputs in " + str(out))
        return 0

    monkeypatch.setattr(shards_demo, "run", fake_shards)
    monkeypatch.setattr(synth, "synth_dataset", lambda *a, **k: {})
    calls = []
    monkeypatch.setattr(ablate, "main", lambda argv: calls.append(argv) or 3)
    assert demo.run(tmp_path, steps=2, nproc=1, ft_steps=5) == 3  # the runner's exit status
    printed = capsys.readouterr().out
    assert "[1/5] synthesising" in printed and "the ablation runner next" in printed
    assert printed.count("demo finished") == 1 and printed.rstrip().splitlines()[-1].startswith("demo finished")
    # the runner gets the packaged demo ablation with this demo's paths and the command line's budgets
    assert calls == [[str(tmp_path / "ablation.yaml"), "--out", str(tmp_path / "ablation")]]
    spec = yaml.safe_load((tmp_path / "ablation.yaml").read_text())
    assert spec["pretrain"]["steps"] == 2 and spec["pretrain"]["nproc"] == 1 and spec["finetune"]["steps"] == 5
    assert spec["shards"] == [str((tmp_path / "shards").resolve())]
    assert spec["dataset"] == str((tmp_path / "raw" / demo.LABELLED).resolve())
    assert [c["recipe"] for c in spec["cells"]] == ["hi_end_mae"] and len(spec["finetune"]["seeds"]) >= 2


# ------------------------------------------------------------------------------------------- point 9
def test_point9_bad_deepspeed_config_refused(two_channel, tmp_path, capsys):
    cases = {
        "missing.json": (None, "cannot read"),
        "bad.json": ("{\"zero_optimization\": {\"stage\": 2},}", "not valid JSON"),
        "unknown.json": (json.dumps({"zero_optimisation": {"stage": 2}}), "did you mean 'zero_optimization'"),
        "optimizer.json": (json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}), "optim.lr"),
        "scheduler.json": (json.dumps({"scheduler": {"type": "WarmupLR"}}), "optim.warmup_fraction"),
        "stage.json": (json.dumps({"zero_optimization": {"stage": 7}}), "zero_optimization"),
        "batch.json": (json.dumps({"train_batch_size": 64}), "train.micro_batch"),
    }
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        out = tmp_path / f"run-{name}"
        assert main(_args(two_channel, out, "--deepspeed-config", str(path))) == 2, name
        err = capsys.readouterr().err
        assert expect in err and str(path) in err and "Traceback" not in err, (name, err)
        assert not out.exists(), "no half-made run dir"


def test_point9_export_of_a_non_run_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "nowhere"):
        assert main(["export", str(target)]) == 2
        err = capsys.readouterr().err
        assert str(target) in err and "run dir" in err and "Traceback" not in err
    assert list(empty.iterdir()) == []


def test_point9_batch_conflict_refused(two_channel, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_args(two_channel, out, "train.global_batch=7")) == 2
    err = capsys.readouterr().err
    assert "train.global_batch=7" in err and "grad_accum" in err and not out.exists()


def test_point9_override_numbers_and_lists():
    assert load_config("hi_end_mae", ["train.steps=1e3"]).train.steps == 1000
    assert load_config("hi_end_mae", ["train.steps=2.0e+3"]).train.steps == 2000
    with pytest.raises(ConfigError, match="whole number"):
        load_config("hi_end_mae", ["train.steps=1.5"])
    with pytest.raises(ConfigError, match=re.escape("data.crop_size=[96,96,96]")):
        load_config("hi_end_mae", ["data.crop_size=64"])


# ------------------------------------------------------------------------------------------- point 13
def test_point13_no_arguments_lists_the_commands(capsys):
    assert main([]) in (0, 2)
    printed = capsys.readouterr()
    for cmd in ("train RECIPE", "export", "import", "list", "demo"):
        assert cmd in printed.out
    assert "required" not in printed.out + printed.err


def test_point13_list_shows_descriptions_presets_and_sizes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"hi_end_mae\s+Hi-End-MAE", out) and re.search(r"volume_fusion\s+Volume Fusion", out)
    assert "presets: tiny" in out
    assert re.search(r"vit3d_tiny_p16\s+0\.\d M parameters", out)


def test_point13_print_config_and_version(capsys):
    from medssl import __version__
    from medssl.cli import medssl_main

    assert main(["hi_end_mae", "--preset", "tiny", "--print-config", "train.steps=1e3", "optim.lr=2e-4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 1000 and cfg["optim"]["lr"] == 2e-4 and cfg["model"]["backbone"] == "vit3d_tiny_p16"
    assert medssl_main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"medssl {__version__}"
    r = subprocess.run([sys.executable, "-m", "medssl", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "medssl 0.1.0"


def test_point12_extended_pretraining_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Extending a run changes train.steps (and the config hash); the wandb run id must stay the same, and
    pictures are logged as images."""
    import sys
    import types

    from medssl.pretrain.config import load_config, set_dotted
    from medssl.pretrain.train import RunLog

    calls, logged = [], []

    class Run:
        def log(self, data, step=None):
            logged.append((step, sorted(data)))

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run(), Image=lambda path, caption=None: path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("hi_end_mae", preset="tiny")
    RunLog(cfg, tmp_path, True).close()
    set_dotted(cfg, "train.steps", cfg.train.steps * 2)
    log = RunLog(cfg, tmp_path, True)
    png = tmp_path / "step00000002.png"
    png.write_bytes(b"png")
    log.images(2, {"reconstruction": png})
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[1]["resume"] == "allow"
    assert logged == [(2, ["reconstruction"])]
