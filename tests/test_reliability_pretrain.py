"""Pretraining that survives its cluster (issue: reliability), on 2 CPU processes under torchrun.

One uninterrupted reference run; against it: a run whose rank is SIGKILLed at a random step and restarted
by torchrun (--max-restarts) ends bitwise equal, with each step's loss logged once; a run stopped by
SIGTERM leaves a checkpoint of the step it was on, exits 0, and resumed ends bitwise equal; a stopped rank
(SIGSTOP) makes the other exit within train.collective_timeout naming it; a run resumed with another world
size continues and says what changed; damaged checkpoint files and a failed save fall back to the previous
checkpoint with the reason."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from medssl.pretrain.checkpoint import complete_tags

STEPS, EVERY = 12, 4
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}


def _args(shards: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--preset", "tiny", "--no-progress", "--steps", str(steps),
            f"train.checkpoint_every={EVERY}", "train.keep_last=3", "train.log_every=1", "train.picture_every=0",
            "data.num_workers=2", *extra]


def _torchrun(args: list[str], *launcher: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
           "-m", "medssl.pretrain", "hi_end_mae", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish within {timeout} s:\n{out[-4000:]}")
    return out


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in _metrics(run)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"step {step} not reached within {timeout} s")


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes under torchrun, by RANK (their DataLoader workers are their children)."""
    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and child.parent().pid == proc.pid:
            ranks[int(env["RANK"])] = child
    return ranks


def _assert_same_run(run: Path, ref: Path) -> None:
    mine, theirs = load_file(str(run / "export" / "backbone.safetensors")), load_file(str(ref / "export" / "backbone.safetensors"))
    assert mine.keys() == theirs.keys()
    differ = [k for k in mine if not bool((mine[k] == theirs[k]).all())]
    assert not differ, f"exported tensors differ from the uninterrupted run: {differ[:5]}"
    rows, ref_rows = _metrics(run), _metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step logged once, none repeated"
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], "the loss curve is the uninterrupted one"


@pytest.fixture(scope="module")
def reference(built, tmp_path_factory):
    run = tmp_path_factory.mktemp("reliability") / "reference"
    out = _finish(_torchrun(_args(built, run)))
    assert (run / "export" / "backbone.safetensors").exists(), out[-4000:]
    return run


def test_sigkill_at_a_random_step_and_an_elastic_restart_end_bitwise_equal(built, reference, tmp_path):
    run = tmp_path / "killed"
    kill_at = random.Random().randint(EVERY + 1, STEPS - 1)  # after the first checkpoint: the restart resumes
    proc = _torchrun(_args(built, run), "--max-restarts", "1")
    _wait_for_step(run, kill_at, proc)
    ranks = _ranks(proc)
    victim = random.Random().choice(sorted(ranks))
    ranks[victim].kill()
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out, f"killed rank {victim} after step {kill_at}; the restart did not resume:\n{out[-3000:]}"
    _assert_same_run(run, reference)


def test_sigterm_saves_the_current_step_exits_0_and_resumes_bitwise_equal(built, reference, tmp_path):
    run = tmp_path / "stopped"
    proc = _torchrun(_args(built, run))
    _wait_for_step(run, 5, proc)
    for p in _ranks(proc).values():  # as SLURM does: every process of the job step gets the signal
        p.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    stopped = max(r["step"] for r in _metrics(run))
    assert f"stopped by SIGTERM at step {stopped}" in out, out[-3000:]
    assert complete_tags(run / "checkpoints")[0] == f"step{stopped:08d}", "the newest checkpoint is the stop step"
    assert not (run / "export").exists(), "a stopped run is not exported"
    out = _finish(_torchrun(_args(built, run)))
    assert f"resumed from {run / 'checkpoints' / f'step{stopped:08d}'}" in out, out[-3000:]
    _assert_same_run(run, reference)


def test_a_stopped_rank_makes_the_other_exit_within_the_timeout_naming_it(built, tmp_path):
    run = tmp_path / "frozen"
    timeout = 8
    proc = _torchrun(_args(built, run, f"train.collective_timeout={timeout}"))
    _wait_for_step(run, 3, proc)
    ranks = _ranks(proc)
    ranks[1].suspend()
    t0 = time.time()
    try:
        ranks[0].wait(timeout=timeout + 60)
        took = time.time() - t0
    except psutil.TimeoutExpired:
        pytest.fail(f"rank 0 still waits {timeout + 60} s after rank 1 stopped")
    finally:
        for p in ranks.values():
            try:
                p.kill()
            except psutil.Error:
                pass
    out = _finish(proc, timeout=120)
    assert took < timeout + 30, f"rank 0 exited only after {took:.0f} s"
    assert "longer than train.collective_timeout (8 s)" in out, out[-3000:]
    assert "Rank(s) that did not answer (stopped, dead or hung): 1" in out, out[-3000:]


def test_another_world_size_resumes_and_says_what_changed(built, reference, tmp_path):
    run = tmp_path / "regrown"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "export")
    proc = subprocess.run([sys.executable, "-m", "medssl.pretrain", "hi_end_mae", *_args(built, run, steps=STEPS + 2)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "changed on resume: world size 2 -> 1" in proc.stdout and "Adam moments restart" in proc.stdout
    assert "resuming with another world_size 2 -> 1" in proc.stderr
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 3))


DAMAGE = textwrap.dedent('''
    import errno, json, os, shutil, sys
    from pathlib import Path
    import yaml
    from medssl.pretrain import checkpoint, engine
    from medssl.pretrain.config import config_from_dict
    from medssl.pretrain.train import build_task, make_optimizer
    from medssl.shards.loader import check_state

    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    env = engine.init_distributed()
    import deepspeed
    cfg = config_from_dict(yaml.safe_load((src / "config.yaml").read_text()))
    task = build_task(cfg)
    opt = make_optimizer(task.param_groups(cfg.optim.weight_decay), cfg)
    with engine.quiet():
        eng, *_ = deepspeed.initialize(model=task, optimizer=opt, config=engine.deepspeed_config(cfg, 2, env.device))

    def damage(case, ck):
        newest = ck / complete_tags[0]
        if case == "empty complete.json":
            (newest / "complete.json").write_text("")
        elif case == "empty loader state":
            (newest / "loader_rank1.json").write_text("")
        elif case == "garbled rng state":
            raw = bytearray((newest / "rng_rank0.json").read_bytes()); raw[40:48] = b"########"
            (newest / "rng_rank0.json").write_bytes(bytes(raw))
        elif case == "truncated model states":
            f = next(newest.glob("*model_states.pt")); f.write_bytes(f.read_bytes()[:1000])
        elif case == "weights digest":
            rec = json.loads((newest / "complete.json").read_text()); rec["param_digest"] = "0" * 64
            (newest / "complete.json").write_text(json.dumps(rec))
        elif case == "killed during a save":
            shutil.copytree(newest, ck / ".tmp-step00000016")
            (ck / ".tmp-step00000016" / "complete.json").unlink()

    complete_tags = checkpoint.complete_tags(src / "checkpoints")
    results = {}
    for case in ["empty complete.json", "empty loader state", "garbled rng state", "truncated model states",
                 "weights digest", "killed during a save"]:
        ck = work / case.replace(" ", "_") / "checkpoints"
        if env.rank == 0:
            shutil.copytree(src / "checkpoints", ck)
            damage(case, ck)
        engine.barrier()
        step, _, state = checkpoint.resume(eng, ck, env.rank, env.world_size, log=lambda *_: None,
                                           check_loader=check_state)
        results[case] = step
    # a full disk during a save: rank 1's write fails; nothing is published, the previous one stays
    ck = work / "full_disk" / "checkpoints"
    if env.rank == 0:
        shutil.copytree(src / "checkpoints", ck)
    engine.barrier()
    import torch
    real = torch.save
    def full(obj, f, *a, **k):  # rank 1's optimizer partition hits a full disk half-way through the save
        if env.rank == 1 and str(f).endswith("optim_states.pt"):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    torch.save = full
    state = json.loads((ck / complete_tags[0] / f"loader_rank{env.rank}.json").read_text())
    ok = checkpoint.save(eng, ck, 16, 128, state, env.rank, 3, world=2)
    torch.save = real
    results["full disk"] = [ok, checkpoint.complete_tags(ck), sorted(p.name for p in ck.iterdir() if p.name.startswith(".tmp"))]
    results["after"] = checkpoint.save(eng, ck, 16, 128, state, env.rank, 3, world=2)
    if env.rank == 0:
        print("RESULTS " + json.dumps(results))
''')


def test_damaged_checkpoint_files_and_a_failed_save_fall_back_with_the_reason(reference, tmp_path):
    script = tmp_path / "damage.py"
    script.write_text(DAMAGE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(reference), str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1].splitlines()[0])
    newest, older = STEPS, STEPS - EVERY
    for case in ("empty complete.json", "empty loader state", "garbled rng state", "truncated model states",
                 "weights digest"):
        assert results[case] == older, f"{case}: resumed at {results[case]}, expected the previous checkpoint"
    assert results["killed during a save"] == newest, "a half-written save is never read"
    for reason in ("complete.json is not readable JSON", "loader_rank1.json has 0 bytes", "rng_rank0.json differs",
                   "model_states.pt has 1000 bytes", "the weights loaded differ from the ones saved"):
        assert reason in proc.stderr, reason
    ok, tags, tmp_dirs = results["full disk"]
    assert ok is False and tags[0] == f"step{newest:08d}" and not tmp_dirs
    assert "checkpoint of step 16 NOT saved (rank 1: OSError: [Errno 28] No space left on device)" in proc.stderr
    assert "is still usable" in proc.stderr
    assert results["after"] is True


def test_a_missing_shard_reaches_the_metrics_and_the_summary(built, tmp_path):
    """A world of one trains on a set with one shard deleted: the run finishes, metrics.jsonl carries the
    count per shard, and the end of the run lists it."""
    data = tmp_path / "set"
    shutil.copytree(built, data)
    gone = sorted(data.glob("shard-*.tar"))[1]
    gone.unlink()
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "medssl.pretrain", "hi_end_mae", *_args(data, run, steps=3)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = _metrics(run)[-1]
    name = f"{data.name}/{gone.name}"
    assert last["stream_errors"] >= 1 and last["stream_errors_by_shard"][name]["missing"] >= 1, last
    assert f"stream errors over all ranks (shard: kind x count): {name}: missing x" in proc.stdout
