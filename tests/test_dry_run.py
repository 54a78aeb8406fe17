"""``--dry-run`` of both command lines: the network built (and the export loaded) without training, parameters per
part and each decoder level's shape printed and written as ``model_summary.json``; nothing else in ``--out``."""

from __future__ import annotations

import json

import torch

from medssl.pretrain.summary import SUMMARY_FILE


def _rows(summary):
    return {r["part"]: r["parameters"] for r in summary["parameters"]}


def test_pretrain_dry_run_hi_end_mae(tmp_path, capsys, built):
    from medssl.pretrain.__main__ import main
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.config import load_config, task_class

    out = tmp_path / "run"
    assert main(["hi_end_mae", "--preset", "tiny", "--dry-run", "--shards", str(built), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE], "a dry run writes the summary and nothing else"
    s = json.loads((out / SUMMARY_FILE).read_text())
    cfg = load_config("hi_end_mae", [], "tiny")
    task = task_class("hi_end_mae")(build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size)), cfg.task)
    rows = _rows(s)
    assert rows["backbone"] == sum(p.numel() for p in task.backbone.parameters())
    assert rows["head"] == sum(p.numel() for p in task.head.parameters()) and "mask_token" in rows
    assert s["total"] == sum(rows.values()) == sum(p.numel() for p in task.parameters())
    levels = {lv["level"]: lv["shape"] for lv in s["levels"]}
    # 64³ crop, patch 16 → 64 tokens, 16 visible (+ cls); the decoder predicts every token's 16³ voxels
    assert levels["backbone.norm"] == [1, 17, 96] and levels["head"] == [1, 65, 16 ** 3]
    assert [k for k in levels if k.startswith("cross_blocks")] == [
        "cross_blocks.0 (block 3 taps)", "cross_blocks.1 (block 2 taps)", "cross_blocks.2 (block 1 taps)"]
    assert "new run" in s["notes"][0] and f"{s['total']:,}" in text and "dry run: nothing trained" in text


def test_pretrain_dry_run_volume_fusion_without_shards(tmp_path, capsys):
    from medssl.pretrain.__main__ import main

    out = tmp_path / "vf"
    assert main(["volume_fusion", "--preset", "tiny", "--dry-run", "--out", str(out)]) == 0
    s = json.loads((out / SUMMARY_FILE).read_text())
    rows = _rows(s)
    assert rows["decoder.head"] == 2 * 8 + 8 * 5 * 27 + 5, "FMUNet's out_layers[0]: norm affine + 3³ class conv"
    levels = [(lv["level"], lv["shape"]) for lv in s["levels"]]
    assert levels[-6:] == [("decoder.bottleneck", [1, 128, 2, 2, 2]), ("decoder.levels.3.blocks", [1, 64, 4, 4, 4]),
                           ("decoder.levels.2.blocks", [1, 32, 8, 8, 8]), ("decoder.levels.1.blocks", [1, 16, 16, 16, 16]),
                           ("decoder.levels.0.blocks", [1, 8, 32, 32, 32]), ("decoder.head", [1, 5, 32, 32, 32])]
    assert "not checked" in capsys.readouterr().out


def test_pretrain_dry_run_refuses_a_bad_config(tmp_path, capsys):
    from medssl.pretrain.__main__ import main

    assert main(["hi_end_mae", "--preset", "tiny", "--dry-run", "data.crop_size=[60,60,60]", "--out",
                 str(tmp_path / "x")]) == 2
    assert "not divisible by patch_size 16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finetune_dry_run_loads_the_export(tmp_path, capsys, phantoms):
    from medssl.finetune.__main__ import main
    from tests.test_finetune import _export

    export = _export(tmp_path / "export")
    out = tmp_path / "ft"
    assert main(["--export", str(export), "--data", str(phantoms), "--out", str(out), "--preset", "tiny",
                 "--dry-run", "data.crop_size=[32,32,32]"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE], "no config, split or checkpoints: nothing ran"
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["arch"] == "unetr" and s["load_report"]["loaded"], "the export's weights were loaded"
    assert s["load_report"]["dropped"] == ["backbone.cls_token"]
    k = len(s["classes"])
    rows = _rows(s)
    assert rows["decoder.head"] == 12 * k + k  # feature_size 12 (tiny) → K classes, 1×1×1
    assert s["total"] == sum(rows.values())
    levels = {lv["level"]: lv["shape"] for lv in s["levels"]}
    # 32³ crop, patch 16: a 2³ grid, four ×2 levels (2 → 4 → 8 → 16 → 32), no resize
    assert levels["decoder.lifts.0"] == [1, 24, 16, 16, 16] and levels["decoder.lifts.2"] == [1, 96, 4, 4, 4]
    assert levels["decoder.ups.0"] == [1, 12, 32, 32, 32] and levels["decoder.head"] == [1, k, 32, 32, 32]
    assert "dry run: nothing trained" in text and "cls token dropped" in text
    torch.manual_seed(0)  # the module's network is gone to the meta device; nothing else depends on it


def test_pretrain_dry_run_mambamim_and_contrastive(tmp_path, capsys):
    """The masked hybrid (its scan and per-sample token order on the meta device) and the contrastive task trace."""
    from medssl.pretrain.__main__ import main

    for recipe in ("mambamim", "contrastive"):
        out = tmp_path / recipe
        assert main([recipe, "--preset", "tiny", "--dry-run", "--out", str(out)]) == 0, recipe
        s = json.loads((out / SUMMARY_FILE).read_text())
        assert s["total"] == sum(_rows(s).values()) > 0
    levels = {lv["level"]: lv["shape"] for lv in s["levels"]}
    assert levels["global_head"] == [1, 128]  # contrastive: g1's 128-d embedding of one crop
