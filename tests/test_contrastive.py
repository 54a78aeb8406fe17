"""``contrastive``: both losses against loops written here from the paper's definition, the positive and negative
sets of every strategy against a hand-built example, the loss over 2 gathering ranks against one process holding
the whole batch (gradients included), the stream's partitions, and the run-level checks."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from medssl.pretrain.config import ConfigError, load_config
from medssl.recipes.contrastive import (gather_regions, global_loss, local_loss, pair_masks, region_grid)


def _naive_term(sim, a, p, negs):
    return -math.log(math.exp(sim[a][p]) / (math.exp(sim[a][p]) + sum(math.exp(sim[a][n]) for n in negs)))


def _naive_global(z, crop, part, strategy, tau):
    """Loops over anchors and positives, sets from the definitions in the recipe's docstring."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    R = len(crop)
    sim = [[float(z[i] @ z[j]) / tau for j in range(R)] for i in range(R)]
    terms = []
    for a in range(R):
        for p in range(R):
            if p == a:
                continue
            if strategy in ("random", "domain_minus"):
                positive = crop[p] == crop[a]
            else:
                positive = part[p] == part[a]
            if not positive:
                continue
            if strategy == "random":
                negs = [n for n in range(R) if crop[n] != crop[a]]
            else:
                negs = [n for n in range(R) if part[n] != part[a]]
            terms.append(_naive_term(sim, a, p, negs))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("strategy,views", [("random", 2), ("domain_minus", 3), ("domain", 2)])
def test_global_loss_equals_the_loop(strategy, views):
    torch.manual_seed(0)
    crops, S = 8, 4  # 2 volumes x 4 partitions
    z = torch.randn(views * crops, 16, dtype=torch.float64)
    crop = torch.arange(crops).repeat(views)
    part = (torch.arange(crops) % S).repeat(views)
    got = global_loss(z, crop, part, strategy, 0.1)
    want = _naive_global(z, crop.tolist(), part.tolist(), strategy, 0.1)
    assert abs(got.item() - want) < 1e-9


def test_local_loss_equals_the_loop():
    torch.manual_seed(1)
    B, N, D = 2, 5, 8
    r1, r2 = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64)
    terms = []
    for b in range(B):
        v = torch.nn.functional.normalize(torch.cat([r1[b], r2[b]]), dim=1)  # 2N rows: view 1's regions, view 2's
        sim = (v @ v.t() / 0.1).tolist()
        for a in range(2 * N):
            p = (a + N) % (2 * N)  # the same region in the other view
            negs = [n for n in range(2 * N) if n % N != a % N]  # every other region of both views
            terms.append(_naive_term(sim, a, p, negs))
    assert abs(local_loss(r1, r2, 0.1).item() - sum(terms) / len(terms)) < 1e-9


def test_masks_of_every_strategy_on_a_hand_built_batch():
    """2 volumes (A, B) x 2 partitions; rows: A0 A1 B0 B1 (the crops), then A0' A1' B0' B1' (their views)."""
    crop = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    part = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    rows = ["A0", "A1", "B0", "B1", "A0'", "A1'", "B0'", "B1'"]

    def as_sets(mask):
        return {rows[i]: {rows[j] for j in range(8) if mask[i, j]} for i in range(8)}

    pos, neg = pair_masks(crop, part, "random")
    assert as_sets(pos)["A0"] == {"A0'"} and as_sets(pos)["B1'"] == {"B1"}
    assert as_sets(neg)["A0"] == {"A1", "B0", "B1", "A1'", "B0'", "B1'"}  # every other crop, both views
    pos, neg = pair_masks(crop, part, "domain_minus")
    assert as_sets(pos)["A0"] == {"A0'"}
    assert as_sets(neg)["A0"] == {"A1", "B1", "A1'", "B1'"}  # other partitions only: B0 is neither
    pos, neg = pair_masks(crop, part, "domain")
    assert as_sets(pos)["A0"] == {"A0'", "B0", "B0'"}  # the same partition of any volume, any view
    assert as_sets(pos)["B1'"] == {"A1", "B1", "A1'"}
    assert as_sets(neg)["A0"] == {"A1", "B1", "A1'", "B1'"}
    for strategy in ("random", "domain_minus", "domain"):
        pos, neg = pair_masks(crop, part, strategy)
        assert not (pos & neg).any() and not pos.diagonal().any() and not neg.diagonal().any()


def test_regions_are_the_lattice_and_quarter_points():
    starts = region_grid((24, 24, 24), 3)  # g = 24 - 4 = 20: lattice {0, 10, 20}, quarters {5, 15}
    assert starts.shape == (35, 3)
    assert {tuple(s) for s in starts.tolist()[:27]} == {(a, b, c) for a in (0, 10, 20) for b in (0, 10, 20)
                                                       for c in (0, 10, 20)}
    assert {tuple(s) for s in starts.tolist()[27:]} == {(a, b, c) for a in (5, 15) for b in (5, 15) for c in (5, 15)}
    fmap = torch.randn(2, 4, 24, 24, 24)
    reg = gather_regions(fmap, starts, 3)
    assert reg.shape == (2, 35, 4 * 27)
    x, y, z = starts[28].tolist()
    assert torch.equal(reg[1, 28], fmap[1, :, x:x + 3, y:y + 3, z:z + 3].reshape(-1))


WORKER = r'''
import os, sys, torch, torch.distributed as dist
from medssl.recipes.contrastive import global_loss
rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"), rank=rank, world_size=2)
torch.manual_seed(0)
lin = torch.nn.Linear(12, 6).double()
x = torch.load(os.path.join(out, "x.pt"), weights_only=True)  # [2 ranks x 2 views x 4 crops, 12]
half = x.view(2, 2, 4, 12)[rank].reshape(8, 12)  # this rank's crops, view-major
crop = torch.arange(4).repeat(2)
part = torch.tensor([0, 1, 0, 1]).repeat(2)
loss = global_loss(lin(half), crop, part, "domain", 0.1)
loss.backward()
for p in lin.parameters():  # what DeepSpeed does with the gradients: average over ranks
    dist.all_reduce(p.grad)
    p.grad /= 2
torch.save({"loss": loss.detach(), "grads": [p.grad for p in lin.parameters()]}, os.path.join(out, f"r{rank}.pt"))
dist.destroy_process_group()
'''


def test_two_gathering_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Each rank: 2 volumes x 2 partitions x 2 views; its negatives and positives include the other rank's rows.
    The ranks' mean loss and the averaged gradients equal one process's on the concatenated batch."""
    import subprocess

    torch.manual_seed(0)
    x = torch.randn(16, 12, dtype=torch.float64)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path)], env=env,
                              cwd=Path(__file__).resolve().parents[1]) for r in (0, 1)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 6).double()
    # one process: the same rows, crops numbered across ranks (rank r's crop c is 4r + c)
    whole = x.view(2, 2, 4, 12).permute(1, 0, 2, 3).reshape(16, 12)  # view-major over both ranks' crops
    crop = torch.arange(8).repeat(2)
    part = torch.tensor([0, 1, 0, 1]).repeat(2).repeat(2)
    loss = global_loss(lin(whole), crop, part, "domain", 0.1)
    loss.backward()
    assert abs((res[0]["loss"] + res[1]["loss"]).item() / 2 - loss.item()) < 1e-12
    for r in res:
        for got, want in zip(r["grads"], [p.grad for p in lin.parameters()]):
            assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_stream_puts_crop_j_in_partition_j_and_keeps_volumes_together(built):
    from medssl import shards
    from medssl.shards import StreamConfig

    sc = StreamConfig(crop_size=(32, 32, 32), crops_per_volume=4, partitions=4, pool_size=1, batch_size=8,
                      num_workers=1, seed=3)
    it = iter(shards.stream([str(built)], sc, rank=0, world_size=1))
    for _ in range(3):
        b = next(it)
        assert b["partition"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert len(set(b["key"][:4])) == 1 and len(set(b["key"][4:])) == 1  # m = 2 whole volumes
        centre = b["origin"][:, 2] + 16
        z = b["shape"][:, 2]
        slab = torch.div(centre * 4, z, rounding_mode="floor").clamp(0, 3)
        inside = (b["origin"][:, 2] > 0) & (b["origin"][:, 2] + 32 < z)  # not pushed back by the volume's edge
        assert (slab[inside] == b["partition"][inside]).all()
        # in-plane: a volume's 4 crops share the body's centre (partition_inplane "body"), so every partition j
        # shows the same part of the body in every volume
        assert (b["origin"][:4, :2] == b["origin"][0, :2]).all() and (b["origin"][4:, :2] == b["origin"][4, :2]).all()
    sc.partition_inplane = "sampled"  # the pos/neg sampler's centres: a volume's crops sit anywhere on the body
    b = next(iter(shards.stream([str(built)], sc, rank=0, world_size=1)))
    assert not (b["origin"][:4, :2] == b["origin"][0, :2]).all()
    with pytest.raises(ValueError, match="one crop per partition"):
        StreamConfig(crops_per_volume=2, partitions=4)


def test_body_centre_origins_centre_the_crop_on_the_body_box():
    import numpy as np

    from medssl.shards.crops import body_centre_origins, body_points

    vol = np.zeros((1, 80, 64, 40), np.float32)
    vol[:, 20:60, 8:40, 4:36] = 1.0  # the body: x 20..59, y 8..39
    fg, _ = body_points(vol, 0.5)
    o = body_centre_origins(vol.shape[1:], (32, 32, 32), fg, 3)
    assert o.shape == (3, 3) and (o == o[0]).all()
    assert o[0].tolist() == [40 - 16, 24 - 16, 20 - 16]  # box centres 40, 24, 20 (the strided box reaches its end)
    edge = body_centre_origins(vol.shape[1:], (32, 64, 32), fg, 1)[0]
    assert edge[1] == 0  # kept inside the volume
    assert body_centre_origins((50, 50, 50), (32, 32, 32), np.zeros((0, 3), np.int64), 1)[0].tolist() == [9, 9, 9]


@pytest.mark.parametrize("override,words", [
    ("data.pool_size=4", "pool_size=1"),
    ("train.micro_batch=6", "multiple of task.partitions=4"),
    ("data.partitions=0", "one crop per partition"),
    ("task.strategy=simclr", "choose one of random, domain_minus, domain"),
    ("train.steps=200", "leaves no local stage"),  # the tiny preset's global stage is 200 steps
    ("data.partition_inplane=middle", "data.partition_inplane='middle' must be 'body'"),
])
def test_cli_refuses_a_batch_the_strategy_cannot_use(built, tmp_path, capsys, override, words):
    from medssl.pretrain.__main__ import main

    rc = main(["contrastive", "--shards", str(built), "--out", str(tmp_path / "run"), "--preset", "tiny", override])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stages_train_their_own_parts():
    """stage both: the global stage trains encoder + g1, the local stage the first L decoder blocks + g2 (the
    encoder frozen); the rest of the decoder never moves."""
    from medssl.pretrain.train import build_task

    cfg = load_config("contrastive", ["data.crop_size=[32,32,32]", "task.proj_hidden=32"], preset="tiny")
    task = build_task(cfg)
    x = torch.rand(8, 1, 32, 32, 32)
    part = torch.arange(8) % 4
    names = {id(p): g["name"] for g in task.param_groups(0.0) for p in g["params"]}
    for step, stage in ((cfg.task.global_steps - 1, "global"), (cfg.task.global_steps, "local")):
        scales = task.begin_step(step, cfg.train.steps)
        assert task.stage_now == stage
        task({"image": x, "partition": part})["loss"].backward()
        with_grad = {names[id(p)] for p in task.parameters() if p.grad is not None}
        assert with_grad == ({"encoder", "global_head"} if stage == "global" else {"decoder_local", "local_head"})
        assert {n for n, s in scales.items() if s > 0} == with_grad
        task.zero_grad(set_to_none=True)
    assert sorted({g["name"] for g in task.param_groups(0.0)}) == ["decoder_local", "decoder_rest", "encoder",
                                                                 "global_head", "local_head"]
    with pytest.raises(ConfigError, match="task.stage"):
        build_task(load_config("contrastive", ["task.stage=joint"], preset="tiny"))
    z = torch.randn(16, 8)
    crop, part = torch.arange(8).repeat(2), (torch.arange(8) % 4).repeat(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the similarities stay fp32 under autocast
        auto = global_loss(z, crop, part, "domain", 0.1)
    assert auto.dtype == torch.float32 and torch.equal(auto, global_loss(z, crop, part, "domain", 0.1))


def test_a_group_back_from_lr_0_starts_with_fresh_adam_state():
    """While a stage's groups sit at lr 0 DeepSpeed hands them zero gradients and Adam counts steps; when the stage
    starts they begin with a fresh state, so their first update is lr-sized (Adam's bias correction intact)."""
    from medssl.pretrain.train import set_lr

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a], "name": "first"}, {"params": [b], "name": "second"}], lr=0.1,
                            weight_decay=0.0)
    before = {}
    for step in range(6):
        scales = {"first": 1.0, "second": 0.0} if step < 5 else {"first": 0.0, "second": 1.0}
        set_lr(opt, 0.1, None, scales, before)
        before = scales
        a.grad = torch.ones(3) if step < 5 else torch.zeros(3)
        b.grad = torch.zeros(3) if step < 5 else torch.ones(3)
        opt.step()
    assert float(opt.state[b]["step"]) == 1  # not 6: its state was reset when its stage began
    assert torch.allclose(b.detach(), torch.full((3,), -0.1), atol=1e-6)  # a full lr step, as with a new optimizer
    assert float(opt.state[a]["step"]) == 6  # a group going to lr 0 keeps its state
