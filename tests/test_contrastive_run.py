"""Global + local contrastive on the one loop: a 2-process DeepSpeed CPU run of both stages (tiny preset, G^D with
negatives gathered over the ranks) trains the encoder in the global stage, whose loss falls below its chance level,
and the first L decoder blocks in the local one, whose loss falls; its export fine-tunes with the encoder and the
pretrained decoder blocks loaded."""

from __future__ import annotations

import json
import math

import pytest
from .conftest import run_pretrain_2proc

GLOBAL, STEPS = 80, 100  # 80 global + 20 local


@pytest.fixture(scope="module")
def run(built, tmp_path_factory):
    out, text = run_pretrain_2proc("contrastive", built, tmp_path_factory.mktemp("contrastive") / "run", STEPS,
                                   "data.crop_size=[32,32,32]", "task.proj_hidden=64",
                                   f"task.global_steps={GLOBAL}")
    return out, text


def test_each_stage_trains_its_own_parts(run):
    """The global stage moves the encoder and lowers G^D below chance, the local stage moves the first L decoder
    blocks and lowers its loss; the rest of the decoder keeps rank 0's initialisation (rebuilt here from the run's
    config and seed)."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from medssl.pretrain.config import config_from_dict
    from medssl.pretrain.train import build_task

    out, text = run
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    assert {r["stage"] for r in m[:GLOBAL]} == {0.0} and {r["stage"] for r in m[GLOBAL:]} == {1.0}
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    # G^D over 2 ranks × 8 crops × 2 views = 32 rows: an anchor's negatives are the 24 rows of other partitions, so
    # embeddings that tell no partition apart score log(1 + 24) per term (the logged loss is rank 0's share of it)
    chance = math.log(1 + 24)
    first, last = mean(m[:5]), mean(m[GLOBAL - 20:GLOBAL])  # the BatchNorm in g1 starts it above chance
    assert last < first and last < 0.93 * chance, f"global loss {first:.3f} -> {last:.3f}, chance {chance:.3f}"
    local = m[GLOBAL:]
    first, last = mean(local[:4]), mean(local[-4:])
    assert last < 0.5 * first, f"local loss did not fall: {first:.4f} -> {last:.4f}"
    assert "identical on all 2 ranks" in text
    assert list((out / "pictures").glob("*.png"))
    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    torch.manual_seed(cfg.train.seed)  # rank 0's initialisation, which DeepSpeed broadcasts
    init = build_task(cfg)
    enc = load_file(out / "export" / "backbone.safetensors")
    dec = load_file(out / "export" / "decoder.safetensors")
    moved = lambda now, then: not torch.equal(now, then)  # noqa: E731
    assert moved(enc["stages.4.blocks.0.layers.0.conv.weight"], init.backbone.state_dict()["stages.4.blocks.0.layers.0.conv.weight"])
    d0 = init.decoder.state_dict()
    for k in d0:
        trained = k.startswith(init.decoder_used)
        assert moved(dec[k], d0[k]) == trained or (trained and d0[k].ndim < 2), k  # norms may stay at 1/0


def test_export_finetunes_with_encoder_and_decoder_blocks(run):
    import torch
    from safetensors.torch import load_file

    from medssl.finetune.config import load_config
    from medssl.finetune.loading import build

    out, _ = run
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "resenc3d_tiny"
    assert manifest["components"]["decoder"]["registry"] == "unet3d"
    cfg = load_config(["data.crop_size=[32,32,32]"], export=str(out / "export"))
    model, report, _, _ = build(cfg, in_channels=1, out_channels=3)
    assert not [k for k in report.new if k.startswith("backbone.")], report.new  # every encoder key loaded
    dec = load_file(out / "export" / "decoder.safetensors")
    state = model.state_dict()
    for k in ("levels.3.up.conv.weight", "levels.1.blocks.0.layers.0.conv.weight"):  # blocks 1 and 3 from the bottleneck
        key = next(n for n in state if n.endswith("decoder." + k) or n == "decoder." + k)
        assert torch.equal(state[key], dec[k]), k
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
