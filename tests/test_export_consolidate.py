"""Consolidating a DeepSpeed checkpoint into the fp32 state an export writes (pretrain/export.py ``consolidate``):
ZeRO stage 1 with a frozen parameter (DeepSpeed's own consolidation leaves it out at stages 0-1) and stage 0 with
a plain optimizer (whose checkpoint DeepSpeed's consolidation cannot read at all), in fp32 and in bf16 (the fp32
masters then sit in the model-states file's optimizer state). One world-1 process on CPU
trains a toy module one step at each stage, saves, and compares the consolidated tensors with the live module."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from medssl.pretrain import engine
    from medssl.pretrain.export import consolidate

    engine.init_distributed()
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as zero_to_fp32

    out = Path(sys.argv[1])
    for stage, bf16 in ((0, False), (1, False), (0, True)):
        torch.manual_seed(stage)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        model[2].requires_grad_(False)  # a frozen layer, as mambamim freezes its never-read 96-cube skip
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in trainable], lr=0.1, weight_decay=0.5)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "bf16": {"enabled": bf16}}
        with engine.quiet():
            eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            x = torch.randn(4, 6)
            loss = eng(x.bfloat16() if bf16 else x).float().square().mean()
            eng.backward(loss)
            eng.step()
            run = out / f"stage{stage}{'bf16' if bf16 else ''}"
            eng.save_checkpoint(str(run), tag="t")
        state = consolidate(run, "t", zero_to_fp32, [[n for n, _ in trainable]])
        live = eng.module.state_dict()
        assert sorted(state) == sorted(live), (stage, sorted(state), sorted(live))
        assert torch.equal(state["2.weight"], before["2.weight"].float()), stage  # frozen: its initial values
        assert not torch.equal(state["0.weight"], before["0.weight"].float()), stage  # trained
        assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
        if bf16:  # the fp32 masters, not the bf16 module cast back: they round to the module's values
            for k, v in live.items():
                assert torch.equal(state[k].to(v.dtype), v), k
            assert not torch.equal(state["0.weight"], live["0.weight"].float()), "exported the bf16 copy"
        else:
            for k, v in live.items():
                assert torch.equal(state[k], v), (stage, k)
        print(f"stage {stage}{' bf16' if bf16 else ''}: {len(state)} tensors, frozen layer kept", flush=True)
''')


def test_stage_0_and_frozen_parameters_are_consolidated(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 0: 6 tensors, frozen layer kept" in r.stdout
    assert "stage 1: 6 tensors, frozen layer kept" in r.stdout
    assert "stage 0 bf16: 6 tensors, frozen layer kept" in r.stdout
