"""``checkpoint_blocks`` of the backbones: activation checkpointing changes neither parameter names, outputs nor
gradients, really recomputes the checkpointed blocks in the backward pass (and keeps fewer tensors for it), covers
exactly the first N blocks, and is off in evaluation and under ``no_grad``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils.checkpoint

from medssl.pretrain.backbones import BACKBONES, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# tiny models at a 32³ crop; drop path and dropout on, so the replayed RNG state is exercised too
TINY = {"vit3d_tiny_p16": {"drop_path_rate": 0.2}, "resenc3d_tiny": {}, "hymamba3d_tiny": {}}
X = (2, 1, 32, 32, 32)
TOL = {"rtol": 1e-5, "atol": 1e-7}


def units(model) -> list[torch.nn.Module]:
    """The checkpointed units in order: transformer blocks, resenc levels, hymamba's 5 levels + the Mamba stage."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "stages"):
        return list(model.stages)
    emb = model.embeddings
    levels = [torch.nn.ModuleList([emb.stem, emb.expend1, emb.encoder1])]
    levels += [torch.nn.ModuleList([getattr(emb, f"layer{k + 1}"), *([getattr(emb, f"expend{k + 1}"),
                                    getattr(emb, f"encoder{k + 1}")] if k < 4 else [])]) for k in range(1, 5)]
    return levels + [model.mae.blocks]


def pair(name: str, n: int):
    """The same weights twice: checkpointing off and ``checkpoint_blocks=n``."""
    torch.manual_seed(0)
    plain = build_backbone(name, img_size=32, **TINY[name])
    ckpt = build_backbone(name, img_size=32, checkpoint_blocks=n, **TINY[name])
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def step(model, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
    """Features, parameter gradients and the bytes autograd saved for backward, of one forward + backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # drop path / dropout draw the same masks in both models
    # no early stop: a recomputation runs its whole unit (by default it stops once the saved tensors are back,
    # skipping a unit's last layer), so that every layer's forward calls can be counted
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            feats = model(x)
        loss = sum(f.pow(2).mean() + f.mean() for f in feats if f is not None)
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return [f.detach() for f in feats if f is not None], grads, sum(saved)


def count_calls(modules) -> list[list[int]]:
    """Forward calls of every parameterised leaf module under each of ``modules`` (hooks stay installed)."""
    counts = []
    for unit in modules:
        leaves = [m for m in unit.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
        c = [0] * len(leaves)
        for j, leaf in enumerate(leaves):
            leaf.register_forward_hook(lambda *_, j=j, c=c: c.__setitem__(j, c[j] + 1))
        counts.append(c)
    return counts


@pytest.mark.parametrize("name", sorted(TINY))
def test_all_blocks_checkpointed_equal_outputs_and_gradients(name):
    plain, ckpt = pair(name, -1)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # parameter names unchanged
    assert plain.config == ckpt.config and "checkpoint_blocks" not in json.dumps(ckpt.config)  # exports unchanged
    x = torch.randn(*X)
    plain_calls, ckpt_calls = count_calls(units(plain)), count_calls(units(ckpt))
    f0, g0, saved0 = step(plain, x)
    f1, g1, saved1 = step(ckpt, x)
    assert len(f0) == len(f1) and all(torch.allclose(a, b, **TOL) for a, b in zip(f0, f1))
    assert g0.keys() == g1.keys() and len(g0) == sum(p.requires_grad for p in plain.parameters())
    for k in g0:
        assert torch.allclose(g0[k], g1[k], **TOL), k
    # checkpointed: every block's layers ran again in the backward pass, and autograd kept fewer bytes
    # (a layer whose weight is used directly, as Mamba's dt_proj, counts no call in either)
    assert all(max(unit) == 1 for unit in plain_calls), plain_calls
    assert ckpt_calls == [[2 * c for c in unit] for unit in plain_calls], ckpt_calls
    assert saved1 < 0.7 * saved0, (saved1, saved0)


@pytest.mark.parametrize("name, n", [("vit3d_tiny_p16", 2), ("resenc3d_tiny", 3), ("hymamba3d_tiny", 2)])
def test_first_n_blocks_only(name, n):
    plain, ckpt = pair(name, n)
    calls = count_calls(units(ckpt))
    x = torch.randn(*X)
    f0, g0, saved0 = step(plain, x)
    f1, g1, saved1 = step(ckpt, x)
    assert all(torch.allclose(a, b, **TOL) for a, b in zip(f0, f1))
    assert all(torch.allclose(g0[k], g1[k], **TOL) for k in g0)
    assert [max(c) for c in calls] == [2] * n + [1] * (len(calls) - n), calls
    assert saved1 < saved0


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpoint_is_called_per_block_only_when_training_with_gradients(name, monkeypatch):
    real = torch.utils.checkpoint.checkpoint
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    _, model = pair(name, -1)
    x = torch.randn(*X)
    model(x)
    n = (len(model.blocks) if hasattr(model, "blocks") else len(model.stages) if hasattr(model, "stages")
         else 5 + 4 + len(model.mae.blocks))  # hymamba: 5 levels, 4 encoder blocks, each Mamba layer
    assert calls == [False] * n  # non-reentrant, once per unit
    calls.clear()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert calls == []


def test_hymamba_masked_path_checkpointed():
    """MambaMIM's masked forward (visible tokens first in the Mamba stage) gives the same outputs and gradients."""
    plain, ckpt = pair("hymamba3d_tiny", -1)
    g = torch.Generator().manual_seed(2)
    active = torch.rand(2, 1, 2, 2, 2, generator=g) < 0.5
    active[:, 0, 0, 0, 0] = True
    x = torch.randn(*X, generator=g)
    res = []
    for m in (plain, ckpt):
        feats = m.forward_features(x, active, skip=(0,))
        sum(f.pow(2).mean() for f in feats if f is not None).backward()
        res.append(([f.detach() for f in feats if f is not None],
                    {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    assert all(torch.allclose(a, b, **TOL) for a, b in zip(res[0][0], res[1][0]))
    assert res[0][1].keys() == res[1][1].keys()
    assert all(torch.allclose(res[0][1][k], res[1][1][k], **TOL) for k in res[0][1])


def test_every_registered_builder_accepts_the_keyword():
    for name in BACKBONES.names():
        if name.startswith("nnunet_"):  # built from an nnU-Net plans file: tests/test_nnunet.py
            continue
        with torch.device("meta"):
            m = build_backbone(name, checkpoint_blocks=-1)
        assert m.checkpoint_blocks == -1, name
    for bad in (-2, 1.5, True, "all"):
        with pytest.raises(ValueError, match="checkpoint_blocks"):
            build_backbone("vit3d_tiny_p16", img_size=32, checkpoint_blocks=bad)


def test_hi_end_mae_step_with_checkpointed_backbone():
    """A recipe's loss and gradients are unchanged when its backbone checkpoints every block."""
    from medssl.pretrain.config import task_class

    cls = task_class("hi_end_mae")
    losses, grads = [], []
    for n in (0, -1):
        torch.manual_seed(0)
        task = cls(build_backbone("vit3d_tiny_p16", img_size=32, checkpoint_blocks=n), cls.config_class()).train()
        torch.manual_seed(3)
        x = torch.rand(2, 1, 32, 32, 32)
        loss = task({"image": x})["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad for k, p in task.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], **TOL)
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], **TOL) for k in grads[0])
