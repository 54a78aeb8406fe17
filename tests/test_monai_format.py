"""Exports that MONAI loads as they are: ``vit3d`` exports → ``monai.networks.nets.UNETR`` / ``ViT`` state dicts.

MONAI's networks load the converted weights (UNETR with ``strict=False``, only its new decoder missing; ViT with
``strict=True``), and compute our backbone's features: the tapped blocks' outputs and the final norm, in float64
to a tight tolerance. A wrong token order, a missing LayerNorm eps or a dropped cls token shows in the features.
``resenc3d`` exports are refused with the layers that differ from MONAI's nearest network.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from medssl.pretrain.backbones import build_backbone, sincos_pos_embed_3d
from medssl.pretrain.export import ExportError, load_backbone, write_export
from medssl.pretrain.monai_format import (LAYER_NORM_EPS, export_monai, loading_lines, to_monai,
                                          write_monai)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = {"rtol": 0, "atol": 1e-9}  # float64: the same arithmetic up to summation order
UNETR_DECODER = {"encoder1", "encoder2", "encoder3", "encoder4", "decoder2", "decoder3", "decoder4", "decoder5", "out"}
UNETR_VIT = {"depth": 12, "embed_dim": 12, "num_heads": 2}  # MONAI's UNETR: 12 blocks, 16³ patches; tiny width


def _meta(crop) -> dict:
    return {"recipe": "hi_end_mae", "step": 3, "samples_seen": 12, "config_hash": "0123abcd",
            "config": {"recipe": "hi_end_mae"}, "source": {"run_dir": "/runs/x", "checkpoint": "step00000003"},
            "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "crop_size": list(crop),
                              "intensity": {"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}}}}


def _export(root: Path, name: str, seed: int = 0, **kwargs) -> Path:
    """A vit3d export whose every parameter (biases and LayerNorm affines included) is off its init value, so a
    tensor copied to the wrong place or left at MONAI's default changes the features."""
    torch.manual_seed(seed)
    bb = build_backbone("vit3d_tiny_p16", **kwargs)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return write_export(root / name, "vit3d_tiny_p16", bb, bb.state_dict(), _meta(bb.img_size))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("monai_exports")
    return {
        "unetr_cls": _export(root, "unetr_cls", 0, img_size=32, **UNETR_VIT),  # cls token, as pretraining writes
        "unetr_nocls": _export(root, "unetr_nocls", 1, img_size=32, cls_token=False, **UNETR_VIT),
        "unetr_noncubic": _export(root, "unetr_noncubic", 2, img_size=[48, 32, 16], cls_token=False, **UNETR_VIT),
        # MONAI's ViT takes any depth and patch size: 3 blocks, 8³ patches, a 3 × 2 × 1 grid
        "vit_noncubic": _export(root, "vit_noncubic", 3, img_size=[24, 16, 8], patch_size=8, depth=3, embed_dim=12,
                                num_heads=3, cls_token=False),
        "vit_cls": _export(root, "vit_cls", 4, img_size=[16, 24, 16], patch_size=8, depth=3, embed_dim=12,
                           num_heads=3),
        "learned": _export(root, "learned", 5, img_size=[32, 32, 16], patch_size=8, depth=2, embed_dim=12,
                           num_heads=2, cls_token=False, pos_embed="learned"),
    }


def _ours(export: Path, cls_token: bool | None = None, img_size=None) -> torch.nn.Module:
    """Our backbone from the export, float64, eval; ``cls_token=False`` rebuilds it without its cls token."""
    if cls_token is None:
        bb = load_backbone(export, img_size=img_size, log=lambda *_: None)
    else:
        ref = load_backbone(export, img_size=img_size, log=lambda *_: None)
        bb = build_backbone("vit3d_tiny_p16", **{**ref.config, "cls_token": cls_token})
        bb.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "cls_token"})
    return bb.double().eval()


def _monai(conv, eps: float | None = LAYER_NORM_EPS) -> torch.nn.Module:
    """MONAI's network from a conversion, loaded as a MONAI user does; float64, eval."""
    from monai.networks import nets

    net = getattr(nets, conv.network)(**conv.kwargs)
    if eps is not None:
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = eps
    missing, unexpected = net.load_state_dict(conv.state_dict, strict=conv.network == "ViT")
    assert not unexpected and sorted(missing) == sorted(conv.new_keys)
    return net.double().eval()


def _vit(net):
    return net.vit if hasattr(net, "vit") else net


def _features_equal(ours, net, x) -> None:
    """MONAI's hidden_states_out at our taps and its final output equal our forward_features."""
    with torch.no_grad():
        feats = ours.forward_features(x)
        out, hidden = _vit(net)(x)
    assert len(hidden) == len(ours.blocks)
    for tap, f in zip(ours.out_indices, feats[:-1]):
        torch.testing.assert_close(hidden[tap], f, **TOL, msg=f"block {tap}")
    torch.testing.assert_close(out, feats[-1], **TOL, msg="final norm")


def _x(bb, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, bb.config["in_chans"], *bb.img_size, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- UNETR
def test_unetr_loads_with_only_the_decoder_missing(exports, tmp_path):
    from monai.networks.nets import UNETR

    path = write_monai(exports["unetr_cls"], tmp_path / "unetr.pt", log=lambda *_: None)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["monai_network"] == "UNETR" and ckpt["medssl_manifest"]["backbone"]["name"] == "vit3d_tiny_p16"
    assert ckpt["kwargs"]["qkv_bias"] is True and ckpt["kwargs"]["proj_type"] == "conv"
    net = UNETR(**ckpt["kwargs"])
    missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
    assert unexpected == []
    assert missing and sorted(missing) == sorted(ckpt["new_keys"])
    assert {k.split(".")[0] for k in missing} == UNETR_DECODER, "only the decoder is new"
    assert {k for k in net.state_dict() if k.startswith("vit.")} == set(ckpt["state_dict"]), "the whole encoder"
    assert "cls_token" in ckpt["left_out"]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


@pytest.mark.parametrize("name", ["unetr_nocls", "unetr_noncubic"])
def test_unetr_encoder_computes_our_features(exports, name):
    conv, _ = to_monai(exports[name], log=lambda *_: None)
    assert not conv.left_out
    ours = _ours(exports[name])
    assert ours.out_indices == (3, 6, 9), "UNETR's taps"
    _features_equal(ours, _monai(conv), _x(ours))


def test_unetr_drops_the_cls_token(exports):
    """An encoder pretrained with a cls token runs without it: the features of our backbone without it."""
    conv, _ = to_monai(exports["unetr_cls"], log=lambda *_: None)
    assert "cls_token" in conv.left_out and "cls_token" in conv.report()
    net = _monai(conv)
    x = _x(_ours(exports["unetr_cls"]))
    _features_equal(_ours(exports["unetr_cls"], cls_token=False), net, x)
    with torch.no_grad():
        with_cls = _ours(exports["unetr_cls"]).forward_features(x)[-1][:, 1:]
        assert not torch.allclose(_vit(net)(x)[0], with_cls, atol=1e-4), "the cls token changes the patch features"


def test_unetr_needs_12_blocks_and_16_patches(exports):
    with pytest.raises(ExportError, match="network='vit'"):
        to_monai(exports["vit_noncubic"], network="unetr", log=lambda *_: None)
    with pytest.raises(ValueError, match="keep_cls_token"):
        to_monai(exports["unetr_cls"], network="unetr", keep_cls_token=True, log=lambda *_: None)


# --------------------------------------------------------------------------------------------- ViT
def test_vit_loads_strictly_and_computes_our_features_non_cubic(exports, tmp_path):
    from monai.networks.nets import ViT

    path = write_monai(exports["vit_noncubic"], tmp_path / "vit.pt", network="vit", log=lambda *_: None)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kwargs"]["img_size"] == [24, 16, 8] and ckpt["kwargs"]["patch_size"] == 8
    assert ckpt["new_keys"] == [] and ckpt["left_out"] == {}
    net = ViT(**ckpt["kwargs"])
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = ckpt["layer_norm_eps"]
    net.load_state_dict(ckpt["state_dict"], strict=True)
    ours = _ours(exports["vit_noncubic"])
    assert ours.grid_size == (3, 2, 1)
    _features_equal(ours, net.double().eval(), _x(ours))


def test_vit_keeps_the_cls_token_on_request(exports):
    """``keep_cls_token``: ViT(classification=True) with an identity head; every token equals ours, cls included."""
    conv, _ = to_monai(exports["vit_cls"], network="vit", keep_cls_token=True, log=lambda *_: None)
    assert conv.strict and conv.kwargs["classification"] and not conv.left_out
    net, ours = _monai(conv), _ours(exports["vit_cls"])
    x = _x(ours)
    with torch.no_grad():
        feats = ours.forward_features(x)
        out, hidden = net(x)
    for tap, f in zip(ours.out_indices, feats[:-1]):
        torch.testing.assert_close(hidden[tap], f, **TOL)
    torch.testing.assert_close(out, feats[-1][:, 0], **TOL, msg="the output is the normed cls token")
    dropped, _ = to_monai(exports["vit_cls"], network="vit", log=lambda *_: None)
    assert not dropped.kwargs["classification"] and "keep_cls_token=True" in dropped.left_out["cls_token"]


def test_learned_position_embedding_is_copied(exports):
    conv, _ = to_monai(exports["learned"], network="vit", log=lambda *_: None)
    assert conv.mapping["patch_embedding.position_embeddings"] == "pos_embed"
    ours = _ours(exports["learned"])
    _features_equal(ours, _monai(conv), _x(ours))
    with pytest.raises(ExportError, match="learned position embedding"):
        to_monai(exports["learned"], network="vit", img_size=[32, 32, 32], log=lambda *_: None)


def test_img_size_builds_monai_for_another_crop(exports):
    """The sin-cos follows the grid: MONAI's network for 64³ equals our backbone loaded at 64³."""
    conv, _ = to_monai(exports["unetr_nocls"], img_size=64, log=lambda *_: None)
    assert conv.kwargs["img_size"] == [64, 64, 64]
    pe = conv.state_dict["vit.patch_embedding.position_embeddings"]
    torch.testing.assert_close(pe, sincos_pos_embed_3d((4, 4, 4), 12)[None], rtol=0, atol=0)
    ours = _ours(exports["unetr_nocls"], img_size=64)
    _features_equal(ours, _monai(conv), _x(ours))


# --------------------------------------------------------------------------------------------- the test's reach
def test_a_wrong_token_order_or_eps_breaks_the_features(exports):
    """The feature test sees a position embedding in another token order (Z, Y, X raster instead of MONAI's and
    our X, Y, Z) and MONAI's default LayerNorm eps."""
    conv, _ = to_monai(exports["unetr_noncubic"], log=lambda *_: None)
    ours = _ours(exports["unetr_noncubic"])
    x = _x(ours)
    key = "vit.patch_embedding.position_embeddings"
    g = ours.grid_size  # (3, 2, 1)
    xyz = sincos_pos_embed_3d(g, ours.embed_dim)[None]  # [1, L, D], rows in X, Y, Z raster order
    torch.testing.assert_close(conv.state_dict[key], xyz, rtol=0, atol=0)
    zyx = xyz.reshape(*g, -1).permute(2, 1, 0, 3).reshape(xyz.shape)  # the same rows in Z, Y, X raster order
    assert not torch.equal(zyx, xyz)
    conv.state_dict[key] = zyx.contiguous()
    with pytest.raises(AssertionError):
        _features_equal(ours, _monai(conv), x)
    conv, _ = to_monai(exports["unetr_noncubic"], log=lambda *_: None)
    with pytest.raises(AssertionError):
        _features_equal(ours, _monai(conv, eps=None), x)  # MONAI's 1e-5
    with torch.no_grad():  # … though only slightly
        torch.testing.assert_close(_vit(_monai(conv, eps=None))(x)[0], ours.forward_features(x)[-1], rtol=0, atol=1e-3)


def test_every_parameter_is_mapped(exports):
    """Each MONAI tensor but the filled ones comes from exactly one export tensor (or the sin-cos)."""
    conv, _ = to_monai(exports["unetr_cls"], log=lambda *_: None)
    ours = load_backbone(exports["unetr_cls"], log=lambda *_: None).state_dict()
    sources = [v for k, v in conv.mapping.items() if k not in conv.filled and not v.startswith("(")]
    assert sorted(sources) == sorted(k for k in ours if k != "cls_token")
    for k, src in conv.mapping.items():
        if src in ours:
            assert torch.equal(conv.state_dict[k], ours[src]), k
    assert conv.mapping["vit.blocks.5.attn.out_proj.weight"] == "blocks.5.attn.proj.weight"
    assert conv.mapping["vit.blocks.5.mlp.linear2.bias"] == "blocks.5.mlp.fc2.bias"
    assert set(conv.filled) == {f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(12) for p in ("weight", "bias")}


# --------------------------------------------------------------------------------------------- files
def test_printed_lines_load_the_file(exports, tmp_path):
    """The lines write_monai prints run as they are in a plain MONAI session."""
    for network, export in (("unetr", exports["unetr_cls"]), ("vit", exports["vit_noncubic"])):
        out = io.StringIO()
        with redirect_stdout(out):
            path = export_monai(export, tmp_path, network=network)
        assert path == tmp_path / f"monai_{network}.pt"
        text = out.getvalue()
        conv, _ = to_monai(export, network=network, log=lambda *_: None)
        lines = loading_lines(path, conv)
        assert lines in text
        scope: dict = {}
        exec(compile(lines, "<loading lines>", "exec"), scope)  # noqa: S102 - the printed user code
        assert type(scope["net"]).__name__ == conv.network
        assert all(m.eps == LAYER_NORM_EPS for m in scope["net"].modules() if isinstance(m, torch.nn.LayerNorm))


def test_export_monai_writes_beside_the_export(exports):
    path = export_monai(exports["unetr_nocls"], log=lambda *_: None)
    assert path == exports["unetr_nocls"] / "monai_unetr.pt"
    assert set(torch.load(path, weights_only=True)) >= {"state_dict", "monai_network", "kwargs", "medssl_manifest"}
    load_backbone(exports["unetr_nocls"], log=lambda *_: None)  # the export still loads
    with pytest.raises(ValueError, match="network"):
        export_monai(exports["unetr_nocls"], network="swinunetr", log=lambda *_: None)


def test_finetune_reads_the_unetr_file(exports, tmp_path):
    """medssl's own checkpoint reader takes the file as a MONAI UNETR checkpoint."""
    from medssl.finetune.adapters import detect_arch, read_checkpoint

    path = write_monai(exports["unetr_cls"], tmp_path / "u.pt", log=lambda *_: None)
    state = read_checkpoint(path)
    assert detect_arch(state) == "monai_unetr" and "vit.norm.weight" in state


# --------------------------------------------------------------------------------------------- resenc3d
def test_resenc3d_is_refused_with_the_layers_that_differ(tmp_path):
    res = build_backbone("resenc3d_tiny", img_size=32)
    export = write_export(tmp_path / "res", "resenc3d_tiny", res, res.state_dict(), _meta((32, 32, 32)))
    with pytest.raises(ExportError) as err:
        to_monai(export, log=lambda *_: None)
    msg = str(err.value)
    for what in ("SegResNet", "without", "stem.bias", "stages.1.down.norm", "post-activation"):
        assert what in msg, what
    assert not (tmp_path / "res" / "monai_unetr.pt").exists()


def test_monai_segresnet_differs_as_the_error_says():
    """The facts of the resenc3d refusal, read off MONAI: SegResNet's convolutions have no bias and its stride-2
    convolution has no norm before it, while ours have both."""
    from monai.networks.nets import SegResNet, SegResNetDS

    ref = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1),
                    blocks_up=(1,), norm=("instance", {"affine": True}), act=("leakyrelu", {"negative_slope": 0.01}))
    encoder = [ref.convInit, ref.down_layers]
    convs = [m for part in encoder for m in part.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 6 and all(c.bias is None for c in convs), "stem, 2 + 2 residual convs, strided conv"
    assert [n for n, _ in ref.down_layers[1][0].named_parameters()] == ["conv.weight"], "plain strided conv"
    ds = SegResNetDS(init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1),
                     norm=("instance", {"affine": True}))
    assert [n for n, _ in ds.encoder.layers[0]["downsample"].named_parameters()] == ["weight"]
    ours = build_backbone("resenc3d_tiny", img_size=32)
    assert ours.stem.bias is not None and hasattr(ours.stages[1].down, "norm")
