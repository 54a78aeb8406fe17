"""`python -m medssl.pretrain import hi_end_mae`: an official-style checkpoint (names and shapes of the authors'
release) becomes an export that loads key for key."""

from __future__ import annotations

import pytest
import torch

from medssl.pretrain.export import load_backbone, read_manifest
from medssl.pretrain.importers import main as import_main


def official_state(dim: int, depth: int, patch: int, grid: int, dec: int = 48) -> dict[str, torch.Tensor]:
    """The key names and shapes of Hi-End-MAE's pretraining checkpoint ('module.' from DDP)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    sd = {
        "module.encoder.cls_token": r(1, 1, dim),
        "module.encoder.patch_embed.proj.weight": r(dim, 1, patch, patch, patch),
        "module.encoder.patch_embed.proj.bias": r(dim),
        "module.encoder.norm.weight": torch.ones(dim),
        "module.encoder.norm.bias": torch.zeros(dim),
        "module.encoder_pos_embed": r(1, grid ** 3 + 1, dim),
        "module.mask_token": r(1, 1, dec),
        "module.decoder_pos_embed": r(1, grid ** 3 + 1, dec),
        "module.encoder_to_decoder.12.weight": r(dec, dim),
        "module.decoder.head.weight": r(patch ** 3, dec),
    }
    for i in range(depth):
        b = f"module.encoder.blocks.{i}."
        sd.update({
            b + "norm1.weight": torch.ones(dim), b + "norm1.bias": torch.zeros(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": torch.ones(dim), b + "norm2.bias": torch.zeros(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
        })
    return sd


def _import(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save({"epoch": 999, "state_dict": state, "optimizer": {}, "scaler": {}}, path)
    out = tmp_path / "export"
    assert import_main(["hi_end_mae", str(path), "--out", str(out)]) == 0
    return out


def test_import_small_official_layout(tmp_path):
    from medssl.pretrain.backbones import build_backbone

    with torch.device("meta"):
        tiny = build_backbone("vit3d_tiny_p16")
    state = official_state(tiny.embed_dim, len(tiny.blocks), tiny.patch_size, 96 // tiny.patch_size)
    out = _import(tmp_path, state)
    manifest = read_manifest(out)
    assert manifest["backbone"]["name"] == "vit3d_tiny_p16" and manifest["source"]["epoch"] == 999
    model = load_backbone(out)
    for key, value in state.items():
        if key.startswith("module.encoder."):
            assert torch.equal(model.state_dict()[key[len("module.encoder."):]], value), key


def test_import_refuses_pickled_objects(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)
    assert import_main(["hi_end_mae", str(path), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_import_the_released_size(tmp_path):
    """vit3d_large_p12: width 1536, 12 blocks, patch 12 — the shapes of the authors' 1.37 GB file."""
    state = official_state(1536, 12, 12, 8)
    out = _import(tmp_path, state)
    assert read_manifest(out)["backbone"]["name"] == "vit3d_large_p12"
    assert load_backbone(out).state_dict()["blocks.11.mlp.fc2.weight"].shape == (1536, 6144)


def test_an_import_never_replaces_what_is_in_its_folder(tmp_path, capsys):
    """A second import into a folder that holds an export is refused with the way out; the first export stays."""
    from medssl.pretrain.backbones import build_backbone

    with torch.device("meta"):
        tiny = build_backbone("vit3d_tiny_p16")
    out = _import(tmp_path, official_state(tiny.embed_dim, len(tiny.blocks), tiny.patch_size, 96 // tiny.patch_size))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert import_main(["hi_end_mae", str(tmp_path / "ckpt.pth"), "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
