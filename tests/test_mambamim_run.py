"""MambaMIM on the one loop: a 2-process DeepSpeed CPU run (tiny preset) lowers the loss; at ZeRO stage 0, where each
rank steps its own optimizer, both ranks end with the same weights, which shows the gradients were all-reduced (the
official code never all-reduces them); the export (a stage-0 checkpoint, with the frozen 96³ skip) fine-tunes into
the official downstream network with every backbone key loaded."""

from __future__ import annotations

import json

import pytest
from .conftest import run_pretrain_2proc

STEPS = 40


@pytest.fixture(scope="module")
def run(built, tmp_path_factory):
    out, text = run_pretrain_2proc("mambamim", built, tmp_path_factory.mktemp("mim") / "run", STEPS,
                                   "data.crop_size=[32,32,32]", "train.micro_batch=2", "optim.lr=2e-3",
                                   "train.zero_stage=0")
    return out, text


def test_loss_falls_and_ranks_agree(run):
    out, text = run
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first, last = (sum(r["loss"] for r in rs) / len(rs) for rs in (m[:5], m[-5:]))
    assert last < 0.9 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert f"weights at step {STEPS}: identical on all 2 ranks (parameter digest)\n" in text
    assert list((out / "pictures").glob("*.png"))


def test_export_finetunes_into_the_official_downstream_network(run):
    import torch

    from medssl.finetune.config import load_config
    from medssl.finetune.loading import build
    from medssl.finetune.models import HyMambaDecoder

    out, _ = run
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "hymamba3d_tiny"
    cfg = load_config(["data.crop_size=[32,32,32]"], export=str(out / "export"))
    model, report, _, arch = build(cfg, in_channels=1, out_channels=3)
    assert arch == "hymamba" and isinstance(model.decoder, HyMambaDecoder)
    assert not [k for k in report.new if k.startswith("backbone.")], report.new  # every backbone key loaded
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
