"""Checkpoint adapters: real MONAI modules saved the way users have them, loaded into SwinUNETR / UNETR."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.finetune.adapters import (
    ADAPTERS,
    CheckpointError,
    adapt,
    build_monai_model,
    detect_arch,
    read_checkpoint,
    repeat_stem,
    resample_pos_embed,
)

FS = 12  # SwinUNETR feature size of the test models
WIN = 4  # Swin window (the released weights use 7; 4 keeps the CPU forward pass short)
IMG = (32, 32, 32)  # UNETR input
SWIN_IMG = (64, 64, 64)  # SwinUNETR input: its 32x-downsampled bottleneck needs more than one voxel


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class SSLHeadLike(nn.Module):
    """Same layout as research-contributions SwinUNETR/Pretrain SSLHead: a MONAI SwinTransformer plus pretext heads."""

    def __init__(self, in_chans=1, feature_size=FS):
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        dim = 16 * feature_size
        self.swin_vit = SwinTransformer(in_chans=in_chans, embed_dim=feature_size, window_size=(WIN,) * 3,
                                        patch_size=(2, 2, 2), depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24])
        self.rotation_pre = nn.Identity()
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_pre = nn.Identity()
        self.contrastive_head = nn.Linear(dim, 512)
        self.conv = nn.Sequential(nn.Conv3d(dim, dim // 2, 3, padding=1), nn.InstanceNorm3d(dim // 2),
                                  nn.Conv3d(dim // 2, in_chans, 1))


@pytest.fixture(scope="module")
def ssl_head():
    torch.manual_seed(0)
    return SSLHeadLike()


@pytest.fixture(scope="module")
def vit_ae():
    from monai.networks.nets import ViTAutoEnc

    torch.manual_seed(1)
    return ViTAutoEnc(in_channels=1, img_size=48, patch_size=16, hidden_size=96, mlp_dim=192, num_layers=12, num_heads=12)


def swin_source(head: SSLHeadLike) -> dict:
    """The SSLHead encoder under the SwinUNETR names."""
    return {"swinViT." + k: v for k, v in head.swin_vit.state_dict().items()}


def assert_encoder_equal(model, expected: dict, prefix: str):
    got = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def forward_shape(model, in_channels, out_channels, img=IMG):
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, in_channels, *img))
    assert tuple(y.shape) == (1, out_channels, *img)


def test_ssl_head_checkpoint(ssl_head, tmp_path):
    path = tmp_path / "model_bestValRMSE.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ssl_head.state_dict().items()}, "epoch": 3,
                "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 1e-4}]}}, path)
    state = read_checkpoint(path)
    assert all(k.startswith("module.") for k in state)
    assert detect_arch(state) == "monai_swinunetr"
    model, report = build_monai_model("monai_swinunetr", state, 1, 3, SWIN_IMG, source=str(path))
    assert_encoder_equal(model, swin_source(ssl_head), "swinViT.")
    assert sorted(report.loaded) == sorted(swin_source(ssl_head))
    assert "out.conv.conv.weight" in report.new and "decoder1.transp_conv.conv.weight" in report.new
    assert not any(k.startswith("swinViT.") for k in report.new)
    assert {"rotation_head.weight", "contrastive_head.bias", "conv.0.weight"} <= set(report.dropped)
    assert "strip_module: stripped prefix 'module.' from 134 keys" in report.notes
    assert "swin_vit_to_swinViT: renamed 'swin_vit.' to 'swinViT.' in 126 keys" in report.notes
    assert model.encoder_prefixes == ("swinViT.",)
    forward_shape(model, 1, 3, img=SWIN_IMG)
    text = report.summary()
    assert "rotation_head" in text and f"loaded: {len(report.loaded)} keys" in text
    assert json.loads(json.dumps(report.to_dict()))["source"] == str(path)


def released_layout(head: SSLHeadLike) -> dict:
    """model_swinvit.pt as SwinUNETR.load_from reads it: module.<encoder key>, mlp.fc1/fc2."""
    return {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
            for k, v in head.swin_vit.state_dict().items()}


def test_released_model_swinvit_matches_monai_load_from(ssl_head, tmp_path):
    from monai.networks.nets import SwinUNETR

    weights = {"state_dict": released_layout(ssl_head)}
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in weights["state_dict"]
    extra = {"module.norm.weight": torch.ones(16 * FS), "module.norm.bias": torch.zeros(16 * FS)}  # a final norm
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": weights["state_dict"] | extra}, path)
    state = read_checkpoint(path)
    assert detect_arch(state) == "monai_swinunetr"
    model, report = build_monai_model("monai_swinunetr", state, 1, 2, SWIN_IMG, source=str(path))
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, window_size=WIN)
    reference.load_from(weights)  # MONAI's own reader of the released file
    assert_encoder_equal(model, {k: v for k, v in reference.state_dict().items() if k.startswith("swinViT.")}, "swinViT.")
    assert any(n.startswith("monai_ssl_swin:") and "fc1/fc2" in n for n in report.notes)
    assert report.dropped == ["norm.weight", "norm.bias"]  # not part of MONAI's SwinTransformer: reported, not loaded


def test_stem_repeated_for_multichannel_input(ssl_head):
    model, report = build_monai_model("monai_swinunetr", swin_source(ssl_head), 4, 2, SWIN_IMG)
    w = ssl_head.swin_vit.patch_embed.proj.weight.detach()
    assert torch.allclose(model.swinViT.patch_embed.proj.weight, w.expand(-1, 4, -1, -1, -1) / 4)
    assert any("stem repeated from 1 to 4" in n for n in report.notes)
    assert any(f"window_size={WIN}" in n for n in report.notes)
    forward_shape(model, 4, 2, img=SWIN_IMG)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vitautoenc_checkpoint_into_unetr(vit_ae, tmp_path, suffix):
    source = vit_ae.state_dict()
    path = tmp_path / f"vitautoenc{suffix}"
    if suffix == ".pt":
        torch.save({"epoch": 10, "state_dict": source}, path)
    else:
        from safetensors.torch import save_file
        # a checkpoint of an older MONAI: no norm_cross_attn in the blocks
        save_file({k: v.contiguous() for k, v in source.items() if "norm_cross_attn" not in k}, str(path))
    state = read_checkpoint(path)
    assert detect_arch(state) == "monai_unetr"
    model, report = build_monai_model("monai_unetr", state, 1, 3, IMG, feature_size=8, source=str(path))
    assert model.encoder_prefixes == ("vit.",)
    expected = {"vit." + k: v for k, v in source.items() if not k.startswith("conv3d_transpose")}
    pe = expected.pop("vit.patch_embedding.position_embeddings")
    got = model.state_dict()
    for k, v in expected.items():
        if suffix == ".pt" or "norm_cross_attn" not in k:
            assert torch.equal(got[k], v), k
    assert torch.equal(got["vit.patch_embedding.position_embeddings"], resample_pos_embed(pe, (3, 3, 3), (2, 2, 2)))
    assert any("position embeddings resampled 3x3x3 -> 2x2x2" in n for n in report.notes)
    assert {"conv3d_transpose.weight", "conv3d_transpose_1.bias"} <= set(report.dropped)
    assert any(n.startswith("vitautoenc_to_unetr:") for n in report.notes)
    assert "encoder2.transp_conv_init.conv.weight" in report.new and "out.conv.conv.weight" in report.new
    if suffix == ".safetensors":
        assert "vit.blocks.0.norm_cross_attn.weight" in report.new
        assert any("left at initialisation" in n for n in report.notes)
    else:
        assert not any(k.startswith("vit.") for k in report.new)
    forward_shape(model, 1, 3)


def test_compiled_unetr_state_dict_and_perceptron_stem():
    from monai.networks.nets import UNETR

    torch.manual_seed(2)
    trained = UNETR(in_channels=2, out_channels=5, img_size=IMG, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=12,
                    proj_type="perceptron", qkv_bias=True)
    state = {"_orig_mod." + k: v for k, v in trained.state_dict().items()}
    assert detect_arch(state) == "monai_unetr"
    model, report = build_monai_model("monai_unetr", state, 4, 3, IMG, feature_size=8, source="compiled.pt")
    src = {k: v for k, v in trained.state_dict().items() if k.startswith("vit.")}
    stem = "vit.patch_embedding.patch_embeddings.1.weight"
    src[stem] = repeat_stem(src[stem], 4, "perceptron")
    assert_encoder_equal(model, src, "vit.")
    assert any(n.startswith("strip_orig_mod:") for n in report.notes)
    assert any("stem repeated from 2 to 4" in n for n in report.notes)
    assert "out.conv.conv.weight" in report.dropped and "out.conv.conv.weight" in report.new  # 5 vs 3 classes
    forward_shape(model, 4, 3)


def test_repeat_stem_conv_gives_same_activation():
    torch.manual_seed(3)
    w, b = torch.randn(8, 2, 2, 2, 2), torch.randn(8)
    x = torch.randn(1, 1, 8, 8, 8)
    before = F.conv3d(x.expand(-1, 2, -1, -1, -1), w, b, stride=2)
    after = F.conv3d(x.expand(-1, 4, -1, -1, -1), repeat_stem(w, 4), b, stride=2)
    assert torch.allclose(before, after, atol=1e-5)
    assert repeat_stem(w, 2) is w


def test_repeat_stem_perceptron_gives_same_activation():
    from monai.networks.blocks import PatchEmbeddingBlock

    torch.manual_seed(4)
    old, new = (PatchEmbeddingBlock(in_channels=c, img_size=32, patch_size=16, hidden_size=48, num_heads=4,
                                    proj_type="perceptron").eval() for c in (2, 4))
    sd = old.state_dict()
    sd["patch_embeddings.1.weight"] = repeat_stem(sd["patch_embeddings.1.weight"], 4, "perceptron")
    new.load_state_dict(sd)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(old(x.expand(-1, 2, -1, -1, -1)), new(x.expand(-1, 4, -1, -1, -1)), atol=1e-5)


def naive_linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] 1-D linear interpolation, half-pixel centres, edges clamped."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def test_resample_pos_embed_against_naive_reference():
    torch.manual_seed(5)
    old, new, dim = (3, 4, 2), (5, 2, 3), 7
    pe = torch.randn(1, int(np.prod(old)), dim)
    grid = pe[0].double().numpy().reshape(*old, dim)  # [h, w, d, D], tokens in (h w d) order
    ref = np.einsum("ah,bw,cd,hwdk->abck", *(naive_linear_weights(o, n) for o, n in zip(old, new, strict=True)), grid)
    out = resample_pos_embed(pe, old, new)
    assert out.shape == (1, int(np.prod(new)), dim)
    assert np.allclose(out[0].double().numpy(), ref.reshape(-1, dim), atol=1e-5)  # [h'*w'*d', D] vs [L', D]
    assert resample_pos_embed(pe, old, old) is pe


def test_missing_encoder_key_names_the_file(ssl_head, tmp_path):
    state = {"module." + k: v for k, v in ssl_head.state_dict().items()}
    del state["module.swin_vit.layers2.0.blocks.1.attn.qkv.weight"]
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        build_monai_model("monai_swinunetr", read_checkpoint(path), 1, 2, SWIN_IMG, source=str(path))
    assert str(path) in str(err.value) and "swinViT.layers2.0.blocks.1.attn.qkv.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="feature_size 12"):
        build_monai_model("monai_swinunetr", swin_source(ssl_head), 1, 2, SWIN_IMG, feature_size=24)


def test_pickled_objects_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert calls == [True]
    msg = str(err.value)
    assert str(path) in msg and "argparse.Namespace" in msg and "torch.save(" in msg


@pytest.mark.parametrize("payload", [[1, 2, 3], {"epoch": 3, "best_acc": 0.5}, torch.zeros(3)])
def test_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(path)


def test_read_checkpoint_unwraps_nesting(tmp_path):
    w = torch.arange(4.0)
    torch.save({"network_weights": {"a.weight": w}, "epoch": 1}, tmp_path / "nnssl.pth")
    torch.save({"model": {"model_state_dict": {"b": w}, "step": 2}, "optimizer": {}}, tmp_path / "nested.ckpt")
    for name, key in (("nnssl.pth", "a.weight"), ("nested.ckpt", "b")):
        state = read_checkpoint(tmp_path / name)
        assert list(state) == [key] and torch.equal(state[key], w)
    with pytest.raises(CheckpointError, match="unknown suffix"):
        (tmp_path / "x.npz").write_bytes(b"0")
        read_checkpoint(tmp_path / "x.npz")


def test_adapters_named_and_detect_arch_errors():
    names = {"strip_module", "strip_orig_mod", "swin_vit_to_swinViT", "monai_ssl_swin", "vitautoenc_to_unetr"}
    assert names <= set(ADAPTERS)
    state, notes = adapt({"module._orig_mod.x": torch.zeros(1)}, ["strip_module", "strip_orig_mod", "strip_module"])
    assert list(state) == ["x"] and len(notes) == 2
    with pytest.raises(CheckpointError, match="--arch monai_swinunetr or --arch monai_unetr"):
        detect_arch({"features.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="hi_end_mae"):
        detect_arch({"module.encoder.patch_embed.proj.weight": torch.zeros(1), "module.encoder.blocks.0.x": torch.zeros(1)})


@pytest.mark.parametrize("arch", ["monai_swinunetr", "monai_unetr"])
def test_scratch_baseline(arch):
    swin = arch == "monai_swinunetr"
    model, report = build_monai_model(arch, None, 1, 2, SWIN_IMG if swin else IMG, feature_size=FS if swin else None)
    assert report.loaded == [] and report.dropped == [] and sorted(report.new) == sorted(model.state_dict())
    assert model.encoder_prefixes == (("swinViT.",) if swin else ("vit.",))
    if not swin:  # the SwinUNETR forward pass is covered above
        forward_shape(model, 1, 2)
