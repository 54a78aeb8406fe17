"""`python -m medssl.pretrain import volume_fusion`: MIS-FM's released FMUNet (PyMIC's checkpoint layout, the
official parameter names) becomes a ``resenc3d`` + ``fmunet`` decoder export that computes what FMUNet computes.

The reference below rebuilds FMUNet's module tree (MIS-FM ``net/fmunet.py`` at 1506d65, identical to PyMIC
``pymic/net/net3d/fmunet.py``) with res_mode 0 and multiscale_pred False, so that its ``state_dict()`` carries the
official names and its forward is the official one; it is written here independently of the converter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medssl.pretrain.export import load_backbone, load_weights, read_manifest
from medssl.pretrain.importers import main as import_main
from medssl.pretrain.registry import DECODERS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- the official network
def _unit(c: int, p: float) -> nn.Sequential:  # ResConv.conv_list[j]: IN, LeakyReLU, Dropout, Conv 3³
    return nn.Sequential(nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(), nn.Dropout(p), nn.Conv3d(c, c, 3, padding=1))


class ResConv(nn.Module):
    def __init__(self, c: int, p: float, depth: int):
        super().__init__()
        self.conv_list = nn.ModuleList([_unit(c, p) for _ in range(depth)])

    def forward(self, x):
        for conv in self.conv_list:
            x = conv(x) + x
        return x


class DownSample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Sequential(nn.InstanceNorm3d(cin, affine=True), nn.LeakyReLU(),
                                  nn.Conv3d(cin, cout, 3, padding=1, stride=2))

    def forward(self, x):
        return self.down(x)


class UpCatConv(nn.Module):
    def __init__(self, c_low: int, c_high: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.InstanceNorm3d(c_low, affine=True), nn.LeakyReLU(), nn.Conv3d(c_low, c_high, 1),
                                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True))
        self.conv = nn.Sequential(nn.InstanceNorm3d(2 * c_high, affine=True), nn.LeakyReLU(),
                                  nn.Conv3d(2 * c_high, cout, 3, padding=1))

    def forward(self, x_low, x_high):
        return self.conv(torch.cat([x_high, self.up(x_low)], dim=1))


class Encoder(nn.Module):
    def __init__(self, ch, dropout, depth):
        super().__init__()
        for i in range(5):
            setattr(self, f"en_conv{i}", ResConv(ch[i], 0 if i < 2 else dropout, depth))
        for i in range(4):
            setattr(self, f"down{i}", DownSample(ch[i], ch[i + 1]))

    def forward(self, x):
        feats = [self.en_conv0(x)]
        for i in range(4):
            feats.append(getattr(self, f"en_conv{i + 1}")(getattr(self, f"down{i}")(feats[-1])))
        return feats


class Decoder(nn.Module):
    def __init__(self, ch, dropout, depth):
        super().__init__()
        for i in range(4):
            setattr(self, f"upcat{i}", UpCatConv(ch[i + 1], ch[i], ch[i]))
        for i in range(5):
            setattr(self, f"de_conv{i}", ResConv(ch[i], 0 if i < 2 else dropout, depth))

    def forward(self, feats):
        y = self.de_conv4(feats[4])
        out = []
        for i in (3, 2, 1, 0):
            y = getattr(self, f"de_conv{i}")(getattr(self, f"upcat{i}")(y, feats[i]))
            out.append(y)
        return out[::-1]  # x0_de … x3_de


class FMUNet(nn.Module):
    def __init__(self, in_chns=1, feature_chns=(32, 64, 128, 256, 512), class_num=5, dropout=0.2, depth=2):
        super().__init__()
        ch = list(feature_chns)
        self.project = nn.Conv3d(in_chns, ch[0], 3, padding=1)
        self.encoder = Encoder(ch, dropout, depth)
        self.decoder = Decoder(ch, dropout, depth)
        self.out_layers = nn.ModuleList([nn.Sequential(nn.InstanceNorm3d(ch[i], affine=True), nn.LeakyReLU(),
                                                       nn.Conv3d(ch[i], class_num, 3, padding=1)) for i in range(4)])

    def forward(self, x):  # multiscale_pred False (net_run.py sets it): out_layers[0] only
        return self.out_layers[0](self.decoder(self.encoder(self.project(x)))[0])


# ----------------------------------------------------------------------------------------- helpers
TINY = dict(in_chns=2, feature_chns=(3, 5, 6, 7, 9), class_num=5, depth=2)  # unequal widths: no two levels alike


def official(seed: int = 0, **kw) -> FMUNet:
    """An FMUNet whose every tensor (norm affines included) holds its own random values."""
    torch.manual_seed(seed)
    net = FMUNet(**{**TINY, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:  # conv weights, He-scaled so that activations stay O(1)
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:  # norm scales around 1, shifts and conv biases around 0
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return net


def save_pymic(net: nn.Module, path: Path, **extra) -> Path:
    """The layout of PyMIC's SegmentationAgent checkpoints (``{'iteration', 'valid_pred', 'model_state_dict',
    'optimizer_state_dict'}``); ``valid_pred`` is a numpy scalar there, as PyMIC computes it with numpy."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    ckpt = {"iteration": 12000, "valid_pred": np.float32(0.8125),
            "model_state_dict": {k: v.clone() for k, v in net.state_dict().items()},
            "optimizer_state_dict": opt.state_dict(), **extra}
    torch.save(ckpt, path)
    return path


def load_decoder(out: Path):
    manifest = read_manifest(out)
    comp = manifest["components"]["decoder"]
    dec = DECODERS.build(comp["registry"], **comp["kwargs"])
    state = load_weights(out / comp["file"], comp["sha256"], out / "manifest.json",
                         {k: tuple(v.shape) for k, v in dec.state_dict().items()})
    dec.load_state_dict(state, strict=True)
    return dec, comp


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmunet")
    net = official()
    path = save_pymic(net, tmp / "fmunet_abd1k_volf.pt")
    out = tmp / "export"
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 0
    return net, path, out


# ----------------------------------------------------------------------------------------- tests
def test_manifest_describes_fmunet_and_its_preprocessing(imported):
    net, path, out = imported
    m = read_manifest(out)
    assert m["recipe"] == "volume_fusion" and m["backbone"]["name"] == "resenc3d"
    kw = m["backbone"]["kwargs"]
    assert kw["channels"] == [3, 5, 6, 7, 9] and kw["in_chans"] == 2 and kw["blocks_per_level"] == 2
    assert kw["convs_per_block"] == 1 and kw["dropout"] == [0.0, 0.0, 0.2, 0.2, 0.2]
    comp = m["components"]["decoder"]
    assert comp["registry"] == "fmunet" and comp["head"] == "head.conv."
    assert comp["kwargs"]["out_channels"] == 5 and comp["kwargs"]["blocks_per_level"] == 2
    assert comp["kwargs"]["feature_channels"] == [3, 5, 6, 7, 9] and comp["kwargs"]["feature_strides"] == [1, 2, 4, 8, 16]
    pre = m["preprocessing"]
    assert pre["intensity"] == {"CT": {"window": [-1000.0, 1000.0], "out": [-1.0, 1.0], "clip": True}}
    assert pre["spacing"] == "native" and pre["crop_size"] == [128, 128, 64]
    assert m["source"]["iteration"] == 12000 and m["source"]["valid_pred"] == 0.8125  # read through weights_only
    assert m["source"]["official_checkpoint"] == str(path.resolve())
    assert m["source"]["dropped_keys"] == 12  # out_layers.1-3: norm and conv, weight and bias
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "decoder.safetensors", "manifest.json"]
    assert not list(out.parent.glob(".export.tmp-*"))


def test_every_official_tensor_lands_once(imported):
    """Each tensor of the file holds its own values: every exported tensor must equal exactly one official tensor,
    no official tensor may be used twice, and the only ones left out are the deep-supervision heads."""
    net, _, out = imported
    official_sd = net.state_dict()
    ours = {f"backbone.{k}": v for k, v in load_backbone(out, log=lambda *_: None).state_dict().items()}
    ours.update({f"decoder.{k}": v for k, v in load_decoder(out)[0].state_dict().items()})
    used = {}
    for key, value in ours.items():
        hits = [k for k, v in official_sd.items() if v.shape == value.shape and torch.equal(v, value)]
        assert len(hits) == 1, f"{key}: equals {hits or 'no official tensor'}"
        assert hits[0] not in used, f"{hits[0]} lands twice: {used.get(hits[0])} and {key}"
        used[hits[0]] = key
    assert sorted(set(official_sd) - set(used)) == sorted(
        f"out_layers.{i}.{layer}.{p}" for i in (1, 2, 3) for layer in (0, 2) for p in ("weight", "bias"))
    # a few places spelled out: the stem, a down conv, the bottleneck, an up conv, a fuse conv, the output layer
    for off, mine in [("project.weight", "backbone.stem.weight"),
                      ("encoder.down2.down.2.weight", "backbone.stages.3.down.conv.weight"),
                      ("encoder.en_conv1.conv_list.1.0.bias", "backbone.stages.1.blocks.1.layers.0.norm.bias"),
                      ("decoder.de_conv4.conv_list.0.3.weight", "decoder.bottleneck.0.layers.0.conv.weight"),
                      ("decoder.de_conv2.conv_list.1.3.bias", "decoder.levels.2.blocks.1.layers.0.conv.bias"),
                      ("decoder.upcat3.up.2.weight", "decoder.levels.3.up.conv.weight"),
                      ("decoder.upcat0.conv.0.weight", "decoder.levels.0.fuse.norm.weight"),
                      ("out_layers.0.2.weight", "decoder.head.conv.weight"),
                      ("out_layers.0.0.bias", "decoder.head.norm.bias")]:
        assert used[off] == mine


def test_converted_network_computes_fmunets_output(imported):
    net, _, out = imported
    backbone = load_backbone(out, log=lambda *_: None).eval()
    decoder = load_decoder(out)[0].eval()
    net.eval()
    x = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x)
        feats = backbone(x)
        got = decoder(feats)
        ref_feats = net.encoder(net.project(x))
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"encoder level {i}")
    assert got.shape == want.shape == (2, 5, 32, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_finetune_loads_backbone_and_decoder(imported):
    from medssl.finetune.config import load_config
    from medssl.finetune.loading import build, check_export

    _, _, out = imported
    cfg = load_config(["data.crop_size=[32,32,32]"], export=str(out))
    assert check_export(cfg, log=lambda *_: None) is not None
    model, report, _, arch = build(cfg, in_channels=2, out_channels=3, log=lambda *_: None)
    assert arch == "fmunet"
    assert set(report.new) == {f"decoder.{k}" for k in model.decoder.state_dict() if k.startswith("head.conv.")}
    dec = load_decoder(out)[0].state_dict()
    for k, v in model.decoder.state_dict().items():
        if not k.startswith("head.conv."):
            assert torch.equal(v, dec[k]), k
    assert model.decoder.head.conv.weight.shape[0] == 3
    assert model(torch.randn(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_depth_one_and_a_ddp_prefix(tmp_path):
    """``depth`` is read from the file; DataParallel's ``module.`` prefix is accepted."""
    net = official(seed=3, depth=1, in_chns=1, class_num=3)
    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    out = tmp_path / "export"
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 0
    assert read_manifest(out)["backbone"]["kwargs"]["blocks_per_level"] == 1
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(out)[0].eval()(load_backbone(out, log=lambda *_: None).eval()(x)),
                                   net.eval()(x), rtol=1e-5, atol=1e-5)


def _refused(tmp_path, capsys, ckpt, name="wrong.pt") -> str:
    path = tmp_path / name
    torch.save(ckpt, path)
    out = tmp_path / "export"
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not out.exists(), "a refused checkpoint must leave no export folder"
    assert not list(tmp_path.glob(".export.tmp-*"))
    return err


def test_a_hi_end_mae_checkpoint_is_refused(tmp_path, capsys):
    from .test_import import official_state

    err = _refused(tmp_path, capsys, {"epoch": 3, "state_dict": official_state(48, 2, 16, 6)})
    assert "'project.weight'" in err and "not an FMUNet checkpoint" in err
    assert "first key is 'module.encoder.cls_token'" in err


def test_a_misshaped_tensor_is_named(tmp_path, capsys):
    sd = official().state_dict()
    sd["decoder.upcat2.conv.2.weight"] = torch.zeros(6, 11, 3, 3, 3)
    err = _refused(tmp_path, capsys, {"model_state_dict": sd})
    assert "'decoder.upcat2.conv.2.weight' has shape [6, 11, 3, 3, 3]" in err and "expects [6, 12, 3, 3, 3]" in err


def test_an_unknown_or_missing_key_is_named(tmp_path, capsys):
    sd = official().state_dict()
    sd["encoder.en_conv0.conv_list.0.0.running_mean"] = torch.zeros(3)  # a BatchNorm-style network
    err = _refused(tmp_path, capsys, {"model_state_dict": sd})
    assert "'encoder.en_conv0.conv_list.0.0.running_mean' is not a parameter of FMUNet" in err

    sd = official().state_dict()
    del sd["decoder.upcat1.up.0.bias"]
    err = _refused(tmp_path, capsys, {"model_state_dict": sd}, name="missing.pt")
    assert "'decoder.upcat1.up.0.bias' is missing" in err and "shape [6]" in err


def test_pickled_objects_and_2d_kernels_are_refused(tmp_path, capsys):
    import argparse

    err = _refused(tmp_path, capsys, {"model_state_dict": {}, "args": argparse.Namespace(lr=1)})
    assert "weights_only" in err
    sd = official().state_dict()
    sd["project.weight"] = torch.zeros(3, 2, 1, 3, 3)  # res_mode 1: a 2.5D FMUNet
    err = _refused(tmp_path, capsys, {"model_state_dict": sd}, name="anisotropic.pt")
    assert "res_mode" in err


def test_the_command_line_refuses_without_a_traceback(tmp_path):
    """Through ``python -m medssl.pretrain import``: exit code 2, one error line naming the file."""
    path = tmp_path / "not_fmunet.pth"
    torch.save({"state_dict": {"module.encoder.patch_embed.proj.weight": torch.zeros(8, 1, 16, 16, 16)}}, path)
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "medssl.pretrain", "import", "volume_fusion", str(path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and str(path) in r.stderr and "not an FMUNet checkpoint" in r.stderr
    assert not out.exists()


def test_an_existing_export_is_never_replaced(imported, tmp_path, capsys):
    """A folder that holds files is refused with the way out, and keeps them; an empty one is used."""
    net, path, _ = imported
    out = tmp_path / "export"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"old": True}))
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    (out / "manifest.json").unlink()
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 0
    assert read_manifest(out)["recipe"] == "volume_fusion"
    assert not list(tmp_path.glob(".export.tmp-*"))


@pytest.mark.slow
def test_the_released_size(tmp_path):
    """FMUNet as released: feature_chns [32, 64, 128, 256, 512], depth 2, 5 Volume Fusion classes — the parameter
    counts measured from the official class (tests/test_fmunet_fidelity.py)."""
    from .test_fmunet_fidelity import FMUNET_DECODER, FMUNET_OUT0, FMUNET_PROJECT_ENCODER

    net = FMUNet(in_chns=1, feature_chns=(32, 64, 128, 256, 512), class_num=5, depth=2)
    path = save_pymic(net, tmp_path / "fmunet_abd1k_volf.pt")
    out = tmp_path / "export"
    assert import_main(["volume_fusion", str(path), "--out", str(out)]) == 0
    m = read_manifest(out)
    assert m["backbone"]["kwargs"]["channels"] == [32, 64, 128, 256, 512]
    assert m["weights"]["parameters"] == FMUNET_PROJECT_ENCODER
    dec, _ = load_decoder(out)
    assert sum(p.numel() for p in dec.parameters()) == FMUNET_DECODER + FMUNET_OUT0


def test_numpy1_scalars_load_and_nothing_else_is_allowed(tmp_path):
    """A file written under numpy 1 names its scalars ``numpy.core.multiarray.scalar`` (numpy 2:
    ``numpy._core…``); both load. Written here in torch's legacy format, whose pickle spells the global as text."""
    import io

    from medssl.pretrain.importers import _load_checkpoint

    buf = io.BytesIO()
    torch.save({"valid_pred": np.float32(0.5), "model_state_dict": {"w": torch.ones(2)}}, buf,
               _use_new_zipfile_serialization=False)
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\nscalar", b"cnumpy.core.multiarray\nscalar")
    assert b"cnumpy.core.multiarray\nscalar" in raw
    path = tmp_path / "numpy1.pt"
    path.write_bytes(raw)
    ckpt = _load_checkpoint(path)
    assert float(ckpt["valid_pred"]) == 0.5 and torch.equal(ckpt["model_state_dict"]["w"], torch.ones(2))
    torch.save({"f": np.array([1.0, 2.0])}, tmp_path / "array.pt")  # arrays are not scalars: refused
    with pytest.raises(ValueError, match="weights_only"):
        _load_checkpoint(tmp_path / "array.pt")
