"""Config: paper defaults, presets, dotted overrides, unknown keys, round trip, batch and schedule checks."""

from __future__ import annotations

import math

import pytest

from medssl.pretrain.config import ConfigError, config_from_dict, load_config, parse_override
from medssl.pretrain.engine import check_batch, deepspeed_config
from medssl.pretrain.train import lr_at


def test_paper_defaults_and_tiny_preset():
    cfg = load_config("hi_end_mae")
    assert cfg.model.backbone == "vit3d_large_p12"
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay) == (1e-4, [0.9, 0.95], 0.05)
    assert cfg.task.mask_ratio == 0.75 and list(cfg.data.crop_size) == [96, 96, 96]
    assert list(cfg.data.window_ct) == [-175.0, 250.0]
    tiny = load_config("hi_end_mae", preset="tiny")
    assert tiny.model.backbone == "vit3d_tiny_p16" and max(tiny.data.crop_size) < 96


def test_dotted_overrides_are_typed():
    cfg = load_config("hi_end_mae", ["optim.lr=2e-4", "train.micro_batch=8", "data.crop_size=[64,64,64]",
                                     "task.mask_ratio=0.6", "model.kwargs={drop_path_rate: 0.1}"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.micro_batch == 8 and cfg.data.crop_size == [64, 64, 64] and cfg.task.mask_ratio == 0.6
    assert cfg.model.kwargs == {"drop_path_rate": 0.1}
    assert parse_override("optim.lr=1") == ("optim.lr", 1)
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config("hi_end_mae", ["train.micro_batch=lots"])


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("hi_end_mae", ["optim.lrr=1e-3"])
    assert "optim.lrr" in str(err.value) and "did you mean 'lr'" in str(err.value) and "weight_decay" in str(err.value)
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config("hi_end_mae", ["task.mask_rate=0.5"])
    with pytest.raises(ConfigError, match="unknown recipe 'hi_end_ma'.*hi_end_mae"):
        load_config("hi_end_ma")
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_config("hi_end_mae", preset="huge")


def test_round_trip_through_the_run_dir(tmp_path):
    cfg = load_config("hi_end_mae", ["optim.lr=3e-4"], preset="tiny")
    cfg.out = str(tmp_path)
    cfg.dump(tmp_path / "config.yaml")
    import yaml

    back = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert back.to_dict() == cfg.to_dict() and back.hash() == cfg.hash()


def test_batch_must_add_up_over_the_world():
    cfg = load_config("hi_end_mae", ["train.micro_batch=4", "train.grad_accum=2"])
    assert check_batch(cfg, 2) == 16
    cfg.train.global_batch = 15
    with pytest.raises(ConfigError, match="does not divide by the world size 2"):
        check_batch(cfg, 2)
    cfg.train.global_batch = 32
    with pytest.raises(ConfigError, match="grad_accum=4"):
        check_batch(cfg, 2)
    import torch

    ds = deepspeed_config(load_config("hi_end_mae", ["train.zero_stage=2", "optim.grad_clip=1.0"]), 2, torch.device("cpu"))
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0 and not ds["bf16"]["enabled"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert deepspeed_config(load_config("hi_end_mae"), 1, torch.device("cuda"))["bf16"]["enabled"]


def test_warmup_then_cosine():
    cfg = load_config("hi_end_mae", ["train.steps=1000", "optim.warmup_fraction=0.1", "optim.lr=1e-3",
                                     "optim.min_lr=1e-5"])
    assert lr_at(0, cfg) == 0.0, "warm-up starts from 0, as the official schedules"
    assert lr_at(50, cfg) == pytest.approx(1e-3 / 2) and lr_at(99, cfg) == pytest.approx(1e-3 * 99 / 100)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    mid = 100 + 450
    assert lr_at(mid, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1000, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("override,words", [
    ("data.crop_size=[100,100,100]", "not divisible by patch_size 16"),
    ("model.kwargs={embed_dim: 100, num_heads: 4}", "divisible by 6"),
    ("model.kwargs={num_heads: 5}", "num_heads"),
    ("train.global_batch=7", "global_batch"),
    ("optim.schedule=linear", "choose cosine, step or constant"),
    (("optim.weight_decay=0", "optim.weight_decay_end=0.2"), "groups at 0 stay at 0"),  # would silently never decay
    ("data.crop_device=gpu", "data.crop_device='gpu' must be one of"),
    pytest.param("data.crop_device=cuda", "needs a GPU run", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a GPU machine accepts crop_device=cuda")),
    (("data.crop_device=cpu-pool", "data.device_pool=4 parsecs"), "data.device_pool='4 parsecs' must be"),
    (("data.crop_device=cpu-pool", "data.partitions=4", "data.crops_per_volume=4"), "cut by the workers"),
])
def test_cli_refuses_bad_settings_before_starting(built, tmp_path, capsys, override, words):
    from medssl.pretrain.__main__ import main

    rc = main(["hi_end_mae", "--shards", str(built), "--out", str(tmp_path / "run"), "--preset", "tiny",
               *(override if isinstance(override, tuple) else (override,))])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_overrides_right_after_shards_are_overrides(built, tmp_path, capsys):
    from medssl.pretrain.__main__ import main

    rc = main(["hi_end_mae", "--preset", "tiny", "--out", str(tmp_path / "r"), "--shards", str(built),
               "data.crop_size=[100,100,100]"])
    assert rc == 2 and "not divisible by patch_size 16" in capsys.readouterr().err


def test_cli_refuses_missing_shards(tmp_path, capsys):
    from medssl.pretrain.__main__ import main

    assert main(["hi_end_mae", "--shards", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "no index.json" in capsys.readouterr().err


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(capsys):
    from medssl.pretrain.__main__ import main

    assert main(["--local_rank=0", "list"]) == 0
    out = capsys.readouterr().out
    assert "hi_end_mae" in out and "vit3d_base_p16" in out


def test_weight_decay_schedule_is_mambamims():
    """optim.weight_decay_end: the cosine of MambaMIM's utils/lr_control.py, written out here from it —
    wd_end + (wd − wd_end)·(0.5 + 0.5·cos(π·it / (max_it − 1))), for it = 0 … max_it − 1 (the loop's 0-based step)."""
    from medssl.pretrain.train import wd_at

    cfg = load_config("mambamim", ["train.steps=1000"])
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.2)
    for it in (0, 1, 250, 499, 500, 998, 999):
        want = 0.2 + (0.04 - 0.2) * (0.5 + 0.5 * math.cos(math.pi * it / 999))
        assert wd_at(it, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15), it
    assert wd_at(0, cfg) == pytest.approx(0.04) and wd_at(999, cfg) == pytest.approx(0.2)
    assert wd_at(10, load_config("hi_end_mae")) is None  # no end value: the optimizer's constant decay


def test_checkpoint_blocks_reach_the_backbone():
    from medssl.pretrain.train import build_task

    cfg = load_config("hi_end_mae", ["model.checkpoint_blocks=-1"], preset="tiny")
    assert build_task(cfg).backbone.checkpoint_blocks == -1
    assert build_task(load_config("hi_end_mae", [], preset="tiny")).backbone.checkpoint_blocks == 0


def test_dotted_overrides_inside_a_dict_field_add_to_it():
    cfg = load_config("volume_fusion", ["model.kwargs.plans=/data/plans.json", "model.kwargs.configuration=3d_fullres",
                                        "task.decoder_kwargs.dropout=0.1"], preset="tiny")
    assert cfg.model.kwargs == {"plans": "/data/plans.json", "configuration": "3d_fullres"}
    assert cfg.task.decoder_kwargs == {"dropout": 0.1}
    whole = load_config("volume_fusion", ["model.kwargs.plans=/a.json", "model.kwargs={configuration: 2d}"], preset="tiny")
    assert whole.model.kwargs == {"configuration": "2d"}  # a whole dict still replaces
