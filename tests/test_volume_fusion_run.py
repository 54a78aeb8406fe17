"""Volume Fusion on the one loop: a 2-process DeepSpeed CPU run lowers the loss, the export carries encoder
and decoder (manifest ``components``), and fine-tuning loads both, re-initialising only the class head."""

from __future__ import annotations

import json

import pytest
from .conftest import run_pretrain_2proc

STEPS = 40


@pytest.fixture(scope="module")
def run(built, tmp_path_factory):
    out, _ = run_pretrain_2proc("volume_fusion", built, tmp_path_factory.mktemp("vf") / "run", STEPS,
                                   "train.micro_batch=2", "optim.lr=3e-3")
    return out


def test_loss_falls(run):
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first, last = (sum(r["loss"] for r in rs) / len(rs) for rs in (m[:5], m[-5:]))
    assert last < 0.92 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"  # measured 1.24 -> 1.09 (fmunet)
    assert list((run / "pictures").glob("*.png"))


def test_export_carries_the_decoder_and_finetune_loads_both(run):
    from safetensors.torch import load_file

    from medssl.finetune.config import load_config
    from medssl.finetune.loading import build

    manifest = json.loads((run / "export" / "manifest.json").read_text())
    comp = manifest["components"]["decoder"]
    assert comp["registry"] == "fmunet" and comp["kwargs"]["out_channels"] == 5 and comp["head"] == "head.conv."
    dec = load_file(str(run / "export" / comp["file"]))
    cfg = load_config(["data.crop_size=[32,32,32]"], export=str(run / "export"))
    model, report, _, arch = build(cfg, in_channels=1, out_channels=3)
    assert arch == "fmunet"
    head = {k for k in model.decoder.state_dict() if k.startswith("head.conv.")}
    assert set(report.new) == {f"decoder.{k}" for k in head}, "only the class head is new"
    for k, v in dec.items():
        if not k.startswith("head.conv."):
            assert (model.decoder.state_dict()[k] == v).all(), k
    assert model.decoder.head.conv.weight.shape[0] == 3
    import torch

    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
