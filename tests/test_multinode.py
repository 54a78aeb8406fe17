"""A multi-node launch on one machine: two torchrun agents (``--nnodes 2``, one process each) meet through a c10d
rendezvous on 127.0.0.1 and run ``hi_end_mae --preset tiny`` with DeepSpeed on CPU (gloo) into one shared run
folder, as two nodes of a cluster on one shared filesystem. (torchrun ignores ``--node_rank`` under c10d and says
so: the rendezvous numbers the nodes, so either agent may hold rank 0.) The same config also runs as one node
(``--standalone --nproc_per_node 2``: the same world size, so the same global batch), at the same time.

Checked: both agents exit 0 within a time limit (on any failure or overrun every process of both launches is
killed); the two ranks read disjoint volumes that together cover the set, each exactly what the same rank of the
one-node run read (``MEDSSL_BATCH_LOG=1`` makes every rank log the volume keys of each micro-batch); the weights
agree on both ranks at the end (the loop's parameter digest line); each checkpoint step is published once, whole,
holding both ranks' parts; every exported tensor, the checkpoints' weight digests and every logged loss equal the
one-node run's bit for bit. Not covered: NCCL, real networks, several processes per node, ``--max-restarts``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from itertools import islice
from pathlib import Path

import psutil
import pytest
import torch

from medssl import shards
from medssl.pretrain.checkpoint import complete_tags, read_complete

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 3  # checkpoints at steps 3 and 6
MICRO, CROPS_PER_VOLUME, WORLD = 4, 8, 2  # the tiny preset's micro batch, the recipe's crops per volume
TIMEOUT = 300  # seconds for both launches together (they take ~1 min on 2 CPU cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_seed(built) -> tuple[int, list[list[str]]]:
    """A ``train.seed`` whose first epoch gives both ranks disjoint volumes, and those volumes per rank in reading
    order. The stream gives every rank ``volumes // world`` volumes per epoch; when the shards of a rank's slice hold
    fewer (uneven shards: this set holds 2, 1, 1 and 2), the rank reads on into the next round's slice, which may
    hold a volume that the other rank already read in this epoch. So the split is disjoint for some seeds only."""
    n = sum(s["samples"] for s in json.loads((Path(built) / "index.json").read_text())["shards"])
    per_rank = STEPS * MICRO // CROPS_PER_VOLUME
    assert per_rank * WORLD == n, "the run should read exactly one epoch: each rank its share, once"
    for seed in range(32):
        order = [[b["key"][0] for b in islice(shards.stream(
            built, crop_size=(8, 8, 8), crops_per_volume=1, batch_size=1, num_workers=0, pool_size=1,
            shuffle_buffer=1, seed=seed, rank=r, world_size=WORLD), per_rank)] for r in range(WORLD)]
        if len({k for keys in order for k in keys}) == n:
            return seed, order
    raise AssertionError("no seed in 0..31 splits the phantom set into disjoint halves")


def _popen(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and everything below it. torchrun starts each worker in a session of its own, so the
    workers (and their DataLoader workers) are found as the agent's descendants before it goes, then killed by
    process group."""
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    groups = {proc.pid}
    for p in below:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never the test's own group
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in below:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _wait(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait for every launch; the first failure or the time limit ends all of them. Returns what became of each:
    ``exit 0``, ``exit N``, ``killed (…)``."""
    deadline = time.monotonic() + timeout
    fate: dict[str, str] = {}
    why = None
    while why is None and len(fate) < len(procs):
        for name, p in procs.items():
            if name not in fate and p.poll() is not None:
                fate[name] = f"exit {p.returncode}"
                if p.returncode != 0:
                    why = f"{name} exited {p.returncode}"
        if time.monotonic() > deadline:
            why = f"time limit of {timeout:g} s"
        time.sleep(0.2)
    for name, p in procs.items():
        _kill(p)  # also reaps what a finished agent might have left
        fate.setdefault(name, f"killed ({why})")
    return fate


@pytest.fixture(scope="module")
def launches(built, tmp_path_factory):
    """One two-node launch (two agents, one shared run folder) and one one-node launch of the same config, side by
    side; returns their folders, logs, exit states and the expected volume split."""
    base = tmp_path_factory.mktemp("multinode")
    seed, order = _split_seed(built)
    multi, single = base / "multi", base / "single"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MEDSSL_BATCH_LOG": "1"}
    train = ["-m", "medssl.pretrain", "hi_end_mae", "--shards", str(built), "--preset", "tiny", "--steps", str(STEPS),
             "--no-progress", "train.log_every=1", f"train.checkpoint_every={EVERY}", f"train.picture_every={STEPS}",
             "data.num_workers=1", f"train.seed={seed}",
             # one volume at a time: a rank's crops come from its volumes in reading order, one epoch in all
             "data.pool_size=1", "data.shuffle_buffer=1"]
    port, rdzv = _free_port(), f"medssl-test-{uuid.uuid4().hex[:8]}"
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", rdzv]
    logs = {"node0": base / "node0.log", "node1": base / "node1.log", "single": base / "single.log"}
    t0 = time.monotonic()
    procs = {
        "node0": _popen([*node, "--node_rank", "0", *train, "--out", str(multi)], logs["node0"], env),
        "node1": _popen([*node, "--node_rank", "1", *train, "--out", str(multi)], logs["node1"], env),
        "single": _popen(["--standalone", "--nproc_per_node", str(WORLD), *train, "--out", str(single)],
                         logs["single"], env),
    }
    fate = _wait(procs, TIMEOUT)
    seconds = time.monotonic() - t0
    return {"multi": multi, "single": single, "fate": fate, "seconds": seconds, "order": order, "seed": seed,
            "out": {k: v.read_text(errors="replace") for k, v in logs.items()}}


def _need(launches, *names: str) -> None:
    bad = [n for n in names if launches["fate"][n] != "exit 0"]
    if bad:
        pytest.fail("; ".join(f"{n}: {launches['fate'][n]}" for n in bad) + "\n" + "\n".join(
            f"--- {n} (last lines) ---\n{launches['out'][n][-4000:]}" for n in bad))


def _batches(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"batches_rank{rank}.jsonl").read_text().splitlines()]


def test_both_agents_exit_0_in_time(launches):
    _need(launches, "node0", "node1")
    assert launches["seconds"] < TIMEOUT
    # rank 0's summary is printed once, by the agent whose process the rendezvous made rank 0
    said = [n for n in ("node0", "node1") if "medssl pretrain hi_end_mae" in launches["out"][n]]
    assert len(said) == 1, said
    assert f"world {WORLD} x cpu" in launches["out"][said[0]]


def test_ranks_read_disjoint_volumes(launches, built):
    _need(launches, "node0", "node1", "single")
    multi, single = launches["multi"], launches["single"]
    every = {json.loads(line)["key"] for line in (Path(built) / "samples.jsonl").read_text().splitlines() if line.strip()}
    read = []
    for r in range(WORLD):
        rows = _batches(multi, r)
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), "one micro-batch per step"
        # a process of its own node: global rank r of 2, local rank 0 (the one-node run has local ranks 0 and 1)
        assert all((row["rank"], row["world"], row["local_rank"]) == (r, WORLD, 0) for row in rows)
        keys = [k for row in rows for k in row["keys"]]
        assert len(keys) == STEPS * MICRO
        # pool_size 1: each volume's crops come one after another, so the volume order is the reading order
        volumes = list(dict.fromkeys(keys))
        assert volumes == launches["order"][r], f"rank {r} read {volumes}, its stream slice is {launches['order'][r]}"
        read.append(set(volumes))
        assert [row["keys"] for row in rows] == [row["keys"] for row in _batches(single, r)], \
            f"rank {r} read other crops than rank {r} of the one-node run"
        assert {row["local_rank"] for row in _batches(single, r)} == {r}
    assert not read[0] & read[1], f"both ranks read {sorted(read[0] & read[1])}"
    assert read[0] | read[1] == every, "one epoch covers the set"
    # the saved stream states say the same: rank r of 2 in the first epoch, equal to the one-node run's
    for r in range(WORLD):
        state = json.loads((multi / "checkpoints" / f"step{STEPS:08d}" / f"loader_rank{r}.json").read_text())
        assert (state["rank"], state["world_size"]) == (r, WORLD)
        assert state == json.loads((single / "checkpoints" / f"step{STEPS:08d}" / f"loader_rank{r}.json").read_text())


def test_weights_agree_on_both_ranks(launches):
    _need(launches, "node0", "node1")
    text = launches["out"]["node0"] + launches["out"]["node1"]
    assert f"weights at step {STEPS}: identical on all {WORLD} ranks" in text, text[-3000:]
    assert "DIFFER between ranks" not in text


def test_one_checkpoint_per_checkpoint_step(launches):
    _need(launches, "node0", "node1", "single")
    ckpts, single = launches["multi"] / "checkpoints", launches["single"] / "checkpoints"
    tags = [f"step{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]
    names = sorted(p.name for p in ckpts.iterdir())
    assert [n for n in names if not n.endswith(".py")] == sorted([*tags, "latest"]), "no .tmp-, damaged- or extra entry"
    assert names == sorted(p.name for p in single.iterdir()), "the same as the one-node run's (DeepSpeed's scripts too)"
    assert complete_tags(ckpts) == sorted(tags, reverse=True)
    assert (ckpts / "latest").read_text() == tags[-1]
    for tag in tags:
        folder = ckpts / tag
        rec = read_complete(folder)
        assert (rec["step"], rec["world_size"], rec["samples"]) == (int(tag[4:]), WORLD, int(tag[4:]) * MICRO * WORLD)
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"complete.json"}
        assert files == set(rec["files"]), "complete.json lists every file, and only those"
        for rel, want in rec["files"].items():
            assert (folder / rel).stat().st_size == want["bytes"], rel
        for r in range(WORLD):
            assert {f"loader_rank{r}.json", f"rng_rank{r}.json"} <= files
        assert len([f for f in files if f.endswith("model_states.pt")]) == 1, sorted(files)
        assert len([f for f in files if f.endswith("optim_states.pt")]) == WORLD, "one ZeRO-1 partition per rank"
        # the same files as the one-node run's checkpoint: one checkpoint, not one per node
        assert files == {str(p.relative_to(single / tag)) for p in (single / tag).rglob("*") if p.is_file()} - {
            "complete.json"}


def test_export_equals_the_one_node_run(launches):
    from safetensors.torch import load_file

    _need(launches, "node0", "node1", "single")
    multi, single = launches["multi"], launches["single"]
    a, b = load_file(multi / "export" / "backbone.safetensors"), load_file(single / "export" / "backbone.safetensors")
    assert sorted(a) == sorted(b)
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else float("inf")
            for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
    # where they part, if they do: the first step whose loss differs
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (multi, single)]
    first = next((i + 1 for i, (x, y) in enumerate(zip(*losses)) if x != y), None)
    assert not diff, (f"{len(diff)} of {len(a)} tensors differ, max |diff| {max(diff.values()):.3g}; "
                      f"first step with another loss: {first}")
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    # the files: the same header (as JSON) and the same tensor bytes. Not always the same file bytes: safetensors
    # writes the header's __metadata__ (format, version) in a per-process hash order, so the sha256 of two exports
    # of equal weights differs about every other time
    fa, fb = ((run / "export" / "backbone.safetensors").read_bytes() for run in (multi, single))
    na, nb = (int.from_bytes(f[:8], "little") for f in (fa, fb))
    assert json.loads(fa[8:8 + na]) == json.loads(fb[8:8 + nb]) and fa[8 + na:] == fb[8 + nb:]
    ma, mb = (json.loads((run / "export" / "manifest.json").read_text()) for run in (multi, single))
    for m in (ma, mb):  # the run folder, the time of writing, the file's sha256 (above)
        m.pop("source"), m.pop("created"), m["config"].pop("out", None), m["weights"].pop("sha256")
    assert ma == mb, "the same manifest: step, samples seen, config hash, weights' keys and parameter count"
    for tag in complete_tags(multi / "checkpoints"):
        assert read_complete(multi / "checkpoints" / tag)["param_digest"] == \
            read_complete(single / "checkpoints" / tag)["param_digest"]


def test_the_same_tensors_give_the_same_file_in_every_process(tmp_path):
    """safetensors writes its header's metadata in an order that changes from process to process; exports sort it,
    so the same weights give the same bytes (and the same sha256 in the manifest) on every node."""
    code = ("import sys, torch; from medssl.pretrain.export import save_safetensors; torch.manual_seed(0); "
            "save_safetensors({'b': torch.randn(5), 'a': torch.ones(2, 3)}, sys.argv[1], "
            "metadata={'format': 'medssl', 'version': '1', 'component': 'decoder'})")
    files = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, timeout=120)
    assert len({f.read_bytes() for f in files}) == 1
