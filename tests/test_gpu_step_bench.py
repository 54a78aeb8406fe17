"""bench/gpu_step.py on the CPU with tiny models: one row per model × data path with samples/s and FLOPs, attention
FLOPs included (equal to FlopCounterMode's count of the same step with SDPA decomposed into matmuls), the device
pool's row when the pool cannot be imported, and the attention kernel named."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counted_flops_include_attention(gpu_step):
    """The script's count of one hi_end_mae step equals FlopCounterMode's count of the same step run with the math
    SDPA backend (attention as plain matmuls, which FlopCounterMode counts), and the attention part is in it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cpu = torch.device("cpu")

    def one_step():
        torch.manual_seed(0)
        task, _, view = gpu_step.build("vit3d_tiny_p16", "hi_end_mae", 32, 0, cpu)
        opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
        step = gpu_step.make_step(task, opt, torch.autocast("cpu", enabled=False))
        batch = {"image": torch.rand(2, 1, view, view, view)}
        return lambda: step(batch)

    flops = gpu_step.count_flops(one_step(), cpu)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        one_step()()
    reference = fc.get_total_flops()
    assert flops["attention_calls"] > 0 and flops["attention"] > 0
    assert flops["total"] == pytest.approx(reference, rel=1e-6)  # attention is ~1 % of this step: exact, not close
    assert flops["total"] == flops["counted"] + flops["attention_by_hand"]
    if flops["attention_by_hand"]:  # FlopCounterMode counts no fused CPU attention: the hand formula is what it misses
        assert reference - flops["counted"] == pytest.approx(flops["attention"], rel=1e-6)
        assert "added by hand" in flops["attention_note"]
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls: counted by FlopCounterMode, nothing added by hand
        math = gpu_step.count_flops(one_step(), cpu)
    assert math["attention_by_hand"] == 0 and math["total"] == reference and math["attention"] == flops["attention"]
    assert "counted by FlopCounterMode" in math["attention_note"]


def test_attention_formula_and_kernel_names(gpu_step):
    assert gpu_step.attention_flops((2, 4, 65, 24), (2, 4, 65, 24), (2, 4, 65, 24)) == 4 * 2 * 4 * 65 * 65 * 24
    assert gpu_step.attention_flops((2, 4, 10, 8), (2, 4, 30, 8), (2, 4, 30, 16)) == 2 * 8 * 10 * 30 * (8 + 16)
    names = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>"]
    assert gpu_step.classify_sdpa(names).startswith("flash; kernels: void pytorch_flash::flash_fwd")
    eff = ["aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_f32_aligned_64x64_rf_sm80(...)"]
    assert gpu_step.classify_sdpa(eff).startswith("mem-efficient; kernels: fmha_cutlassF")
    assert gpu_step.classify_sdpa(["aten::_scaled_dot_product_attention_math", "aten::bmm"]) == "math"
    assert gpu_step.classify_sdpa(["aten::conv3d"]) == "none (no attention)"
    assert gpu_step.peak_tflops(torch.device("cuda"), "NVIDIA H100 80GB HBM3", "bf16", None)[0] == 989.0
    assert gpu_step.peak_tflops(torch.device("cuda"), "NVIDIA H100 PCIe", "bf16", None)[0] == 756.0
    assert gpu_step.peak_tflops(torch.device("cuda"), "NVIDIA H200", "bf16", None)[0] == 989.0
    assert gpu_step.peak_tflops(torch.device("cuda"), "NVIDIA A100-SXM4-80GB", "fp32", None)[0] == 19.5
    assert gpu_step.peak_tflops(torch.device("cpu"), "x86_64 CPU", "fp32", None)[0] is None
    assert gpu_step.peak_tflops(torch.device("cpu"), "x86_64 CPU", "fp32", 2.5) == (2.5, "--peak-tflops")


def test_cpu_smoke_run(gpu_step, tmp_path, capsys, monkeypatch):
    """Tiny ViT and resenc on synthetic crops and on the stream from a freshly built phantom shard set; the pool
    row when medssl.shards.pool cannot be imported."""
    monkeypatch.setitem(sys.modules, "medssl.shards.pool", None)  # import fails as if the module were missing
    out = tmp_path / "rows.json"
    rc = gpu_step.main(["--models", "vit3d_tiny_p16", "resenc3d_tiny", "--crop", "32", "--batch", "2",
                        "--steps", "1", "--warmup", "1", "--data", "synthetic", "stream", "pool",
                        "--bench-dir", str(tmp_path / "bench"), "--phantoms", "2", "--fov-scale", "0.3",
                        "--workers", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "torch " + torch.__version__ in text and "precision: fp32" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| recipe | model | data |") and len(table) == 1 + 6
    rows = json.loads(out.read_text())["rows"]
    got = {(r["model"], r["data"]): r for r in rows}
    assert set(got) == {(m, d) for m in ("vit3d_tiny_p16", "resenc3d_tiny") for d in ("synthetic", "stream", "pool")}
    for m in ("vit3d_tiny_p16", "resenc3d_tiny"):
        for d in ("synthetic", "stream"):
            r = got[m, d]
            assert r["status"] == "ok" and r["samples_s"] > 0 and r["gflop_per_sample"] > 0, r
            assert any(line.startswith(f"| {r['recipe']} | {m} | {d} |") for line in table)
        assert got[m, "synthetic"]["vs_synthetic"] == 1.0 and got[m, "stream"]["vs_synthetic"] > 0
        assert got[m, "pool"]["status"] == "not available (medssl.shards.pool missing)"
        assert any(f"| {m} | pool |" in line and "pool: not available (medssl.shards.pool missing)" in line
                   for line in table)
    vit, res = got["vit3d_tiny_p16", "synthetic"], got["resenc3d_tiny", "synthetic"]
    assert vit["attention_gflop_per_sample"] > 0 and res["attention_gflop_per_sample"] == 0
    assert vit["gflop_per_sample"] >= vit["counted_gflop_per_sample"] + vit["attention_by_hand_gflop_per_sample"] * 0.99
    assert "flash" in vit["sdpa"] or "math" in vit["sdpa"]
    assert res["sdpa"] == "none (no attention)"
    assert (tmp_path / "bench" / "shards_n2_fov0.3" / "index.json").exists()
