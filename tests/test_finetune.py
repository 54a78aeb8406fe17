"""Fine-tuning: data checks and split, decoders, export loading, Dice, the original geometry, and one
pair of short CPU runs (pretrained vs scratch on DeepSpeed) shared by the end-to-end assertions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.finetune import data as D
from medssl.finetune.config import load_config
from medssl.finetune.evaluate import dice_per_class, resample_to_original
from medssl.finetune.models import SegmentationNet, UNetDecoder, make_decoder, param_groups
from medssl.pretrain.export import ExportError, write_export
from medssl.shards.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DICE_THRESHOLD = 0.25  # mean foreground test Dice the 100-step scratch run must beat (measured 0.36; chance ~0.03)


def _export(out: Path, seed: int = 0, **kwargs) -> Path:
    """A medssl export of a (randomly initialised) tiny ViT with the manifest a pretraining run writes."""
    from medssl.pretrain.backbones import build_backbone

    torch.manual_seed(seed)
    bb = build_backbone("vit3d_tiny_p16", img_size=[64, 64, 64], **kwargs)
    pre = {"orientation": "RAS", "spacing": "1.5", "crop_size": [64, 64, 64],
           "intensity": {"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}}}
    return write_export(out, "vit3d_tiny_p16", bb, bb.state_dict(), {"recipe": "hi_end_mae", "step": 1,
                                                                     "samples_seen": 8, "preprocessing": pre})


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("export") / "export", seed=123)  # not the fine-tuning seed


# ----------------------------------------------------------------------------------------- data
def test_split_is_seeded_and_few_shot_keeps_test_and_val(phantoms):
    keys = [f"case{i:02d}" for i in range(20)]
    a = D.split_cases(keys, n_val=2, test_fraction=0.2, n_train=None, seed=7)
    b = D.split_cases(list(reversed(keys)), n_val=2, test_fraction=0.2, n_train=3, seed=7)
    assert a["test"] == b["test"] and a["val"] == b["val"] and len(a["test"]) == 4
    assert b["train"] == a["train"][:3], "few-shot takes the first n of the same order"
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert D.split_cases(keys, 2, 0.2, None, seed=8)["test"] != a["test"]
    with pytest.raises(ValueError, match="n-train 99"):
        D.split_cases(keys, 2, 0.2, 99, seed=7)


def test_declared_labels_both_layouts():
    assert D._declared_labels({"labels": {"background": 0, "liver": 1}}) == {0: "background", 1: "liver"}
    assert D._declared_labels({"labels": {"0": "background", "1": "liver"}}) == {0: "background", 1: "liver"}


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_undeclared_class_is_refused_naming_the_file(phantoms, tmp_path):
    ds = _copy_dataset(phantoms, tmp_path / "ds")
    lab_path = sorted((ds / "labelsTr").glob("*.nii.gz"))[0]
    img = nib.load(str(lab_path))
    lab = np.asanyarray(img.dataobj).astype(np.uint8)
    lab[tuple(s // 2 for s in lab.shape)] = 9
    nib.save(nib.Nifti1Image(lab, img.affine, img.header), str(lab_path))
    sources, declared = D.discover(ds)
    src = next(s for s in sources if s.label == str(lab_path))
    with pytest.raises(InputError, match=r"class\(es\) \[9\].*declare") as e:
        D.prepare_case(src, D.Preprocessing((1.5,) * 3, D.Window()), declared)
    assert lab_path.name in str(e.value)


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_image_label_geometry_mismatch_is_refused(phantoms, tmp_path, what):
    ds = _copy_dataset(phantoms, tmp_path / "ds")
    lab_path = sorted((ds / "labelsTr").glob("*.nii.gz"))[0]
    img = nib.load(str(lab_path))
    lab = np.asanyarray(img.dataobj)
    if what == "shape":
        out = nib.Nifti1Image(lab[:-2], img.affine)
    else:
        aff = img.affine.copy()
        aff[:3, 3] += 7.0
        out = nib.Nifti1Image(lab, aff)
    nib.save(out, str(lab_path))
    sources, declared = D.discover(ds)
    src = next(s for s in sources if s.label == str(lab_path))
    with pytest.raises(InputError, match=f"label {what}") as e:
        D.prepare_case(src, D.Preprocessing((1.5,) * 3, D.Window()), declared)
    assert lab_path.name in str(e.value) and "fix:" in str(e.value)


def test_crops_fit_and_pos_crops_hold_foreground(phantoms):
    cfg = load_config([], "tiny", dataset=str(phantoms))
    cfg.data.crop_size, cfg.data.pos, cfg.data.neg = [32, 32, 32], 1.0, 0.0
    sources, declared = D.discover(phantoms)
    cases = D.prepare(sources[:2], D.Preprocessing((1.5,) * 3, D.Window()), declared, progress=False)
    it = iter(D.CropSampler(cases, D.Window(), cfg, batch=4, seed=1))
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert b["image"].shape == (4, 1, 32, 32, 32) and b["label"].shape == (4, 1, 32, 32, 32)
        assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.int64
        assert all((lab > 0).any() for lab in b["label"]), "pos crops are centred on foreground"
    again = next(iter(D.CropSampler(cases, D.Window(), cfg, batch=4, seed=1)))
    assert torch.equal(again["image"], batches[0]["image"]), "same seed, same crops"


# ----------------------------------------------------------------------------------------- models
class _TinyCNN(torch.nn.Module):
    """A multi-scale stand-in encoder (strides 2, 4, 8) that follows the backbone contract."""

    feature_strides, feature_channels = [2, 4, 8], [8, 16, 32]

    def __init__(self):
        super().__init__()
        self.stages = torch.nn.ModuleList([torch.nn.Conv3d(1, 8, 3, 2, 1), torch.nn.Conv3d(8, 16, 3, 2, 1),
                                           torch.nn.Conv3d(16, 32, 3, 2, 1)])

    def forward_features(self, x, keep=None):
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


def test_unet_decoder_for_multiscale_backbones():
    cfg = load_config([], "tiny")
    bb = _TinyCNN()
    arch, dec = make_decoder(bb, "auto", 1, 3, cfg)
    assert arch == "unet" and isinstance(dec, UNetDecoder)
    assert SegmentationNet(bb, dec)(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_layer_decay_and_freeze():
    from medssl.pretrain.backbones import build_backbone

    cfg = load_config([], "tiny")
    bb = build_backbone("vit3d_tiny_p16", img_size=[32] * 3)
    net = SegmentationNet(bb, make_decoder(bb, "auto", 1, 3, cfg)[1])
    groups = param_groups(net, 1e-5, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    depth = len(bb.blocks)  # stem 0.5^(depth+1), block i 0.5^(depth-i), final norm and decoder 1
    assert scale_of[id(bb.patch_embed.proj.weight)] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of[id(bb.blocks[0].attn.qkv.weight)] == pytest.approx(0.5 ** depth)
    assert scale_of[id(bb.blocks[-1].mlp.fc2.weight)] == pytest.approx(0.5)
    assert scale_of[id(bb.norm.weight)] == 1.0 and scale_of[id(next(net.decoder.parameters()))] == 1.0
    frozen = param_groups(net, 1e-5, freeze_encoder=True)
    kept = {id(p) for g in frozen for p in g["params"]}
    assert not any(id(p) in kept for p in bb.parameters()) and not any(p.requires_grad for p in bb.parameters())


# ----------------------------------------------------------------------------------------- loading
def _cfg(export_dir, init="pretrained", **over):
    cfg = load_config([f"{k}={v}" for k, v in over.items()], "tiny", export=str(export_dir), init=init)
    cfg.data.crop_size = [32, 32, 32]
    return cfg


def test_export_loads_every_backbone_key_and_reports_the_decoder_new(export):
    from medssl.finetune.loading import build
    from safetensors.torch import load_file

    model, report, manifest, arch = build(_cfg(export), in_channels=1, out_channels=7)
    weights = load_file(str(export / "backbone.safetensors"))
    # the official UNETR's ViT: no cls token, a learned position embedding started from the pretrained sin-cos
    assert "cls_token" in weights and report.dropped == ["backbone.cls_token"]
    assert sorted(report.loaded) == sorted(f"backbone.{k}" for k in weights if k != "cls_token")
    assert sorted(report.new) == sorted([f"decoder.{k}" for k in model.decoder.state_dict()] + ["backbone.pos_embed"])
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in weights.items() if k != "cls_token")
    bb = model.backbone
    assert bb.cls_token is None and isinstance(bb.pos_embed, torch.nn.Parameter)
    from medssl.pretrain.backbones.vit3d import sincos_pos_embed_3d

    torch.testing.assert_close(bb.pos_embed.detach()[0], sincos_pos_embed_3d(bb.grid_size, bb.embed_dim))
    kept, rep_kept, _, _ = build(_cfg(export, **{"model.pos_embed": "fixed", "model.cls_token": "keep"}), 1, 7)
    assert sorted(rep_kept.loaded) == sorted(f"backbone.{k}" for k in weights) and not rep_kept.dropped
    assert kept.backbone.cls_token is not None and "pos_embed" not in kept.backbone.state_dict()
    scratch, rep2, _, _ = build(_cfg(export, init="scratch"), 1, 7)
    assert not rep2.loaded and not torch.equal(scratch.backbone.blocks[0].attn.qkv.weight,
                                               model.backbone.blocks[0].attn.qkv.weight)
    for (k, a), b in zip(model.decoder.state_dict().items(), scratch.decoder.state_dict().values()):
        assert torch.equal(a, b), f"decoder init differs between pretrained and scratch at {k}"
    four, rep4, _, _ = build(_cfg(export), in_channels=4, out_channels=7)  # CT-pretrained -> 4-sequence MRI
    assert four.backbone.patch_embed.proj.weight.shape[1] == 4 and any("stem" in n for n in rep4.notes)


def test_bad_exports_are_refused(export, tmp_path):
    from medssl.finetune.loading import build

    bad = tmp_path / "sha"
    shutil.copytree(export, bad)
    (bad / "backbone.safetensors").write_bytes((bad / "backbone.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ExportError, match="sha256 differs"):
        build(_cfg(bad), 1, 7)

    ver = tmp_path / "ver"
    shutil.copytree(export, ver)
    m = json.loads((ver / "manifest.json").read_text())
    m["format_version"] = 99
    (ver / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="format version 99"):
        build(_cfg(ver), 1, 7)

    pkl = tmp_path / "pickle"
    shutil.copytree(export, pkl)
    torch.save({"x": torch.zeros(2)}, pkl / "backbone.safetensors")  # a pickle under the safetensors name
    from medssl.shards.verify import sha256_file

    m = json.loads((pkl / "manifest.json").read_text())
    m["weights"]["sha256"] = sha256_file(pkl / "backbone.safetensors")
    (pkl / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="not a safetensors file.*never hold pickles"):
        build(_cfg(pkl), 1, 7)


# ----------------------------------------------------------------------------------------- metrics, geometry
def test_dice_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=(12, 10, 8))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, size=truth.shape))
    pred[pred == 3] = 0  # class 3 never predicted
    got = dice_per_class(pred, truth, 5)["dice"]
    for c in range(1, 4):
        p, t = pred == c, truth == c
        assert got[c] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-6)
    assert got[3] == 0.0 and np.isnan(got[4]), "absent from both -> NaN (left out of means)"


def test_predictions_map_back_to_the_original_grid(phantoms):
    sources, declared = D.discover(phantoms)
    lps = next(s for s in sources if "".join(nib.aff2axcodes(nib.load(s.images[0]).affine)) != "RAS")
    truth = np.asanyarray(nib.load(lps.label).dataobj).astype(np.uint8)
    for spacing, min_dice in ((None, 1.0), ((1.5, 1.5, 1.5), 0.85)):
        case = D.prepare_case(lps, D.Preprocessing(spacing, D.Window()), declared)
        probs = torch.nn.functional.one_hot(torch.from_numpy(case.label.astype(np.int64)), 7)  # [X, Y, Z, K]
        probs = probs.permute(3, 0, 1, 2).float()  # [K, X, Y, Z]
        back = resample_to_original(probs, case.meta["affine"], case.meta["original"]["affine"],
                                    case.meta["original"]["shape"])
        assert back.shape == truth.shape
        dice = dice_per_class(back, truth, 7)["dice"]
        big = [c for c in dice if (truth == c).sum() > 200]
        assert min(dice[c] for c in big) >= min_dice - 1e-9, (spacing, dice)


# ----------------------------------------------------------------------------------------- end to end
def _finetune(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "medssl.finetune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(phantoms, export, tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    common = ["--export", str(export), "--data", str(phantoms), "--preset", "tiny", "--no-progress",
              "data.crop_size=[32,32,32]", "data.crops_per_volume=4", "train.micro_batch=4", "train.eval_every=25",
              "data.test_fraction=0.34"]
    out = {}
    # the scratch run is the one scored; the pretrained run only needs to start from the same split and seeds
    for init, steps in (("scratch", 100), ("pretrained", 4)):
        r = _finetune([*common, "--out", str(base / init), "--init", init, "--steps", str(steps)])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        out[init] = (base / init, r)
    return out


def test_short_run_reaches_dice_and_writes_everything(runs, phantoms):
    run, proc = runs["scratch"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["mean_dice"] > DICE_THRESHOLD, m["dice"]
    assert m["dice_space"] == "original" and len(m["cases"]) == 2
    assert (run / "model_best.safetensors").exists() and (run / "config.yaml").exists()
    assert m["best"]["step"] in [h["step"] for h in m["val_history"]]
    for key, case in m["cases"].items():
        pred = nib.load(case["prediction"])
        src = phantoms / "imagesTr" / f"{key.split('_', 1)[1]}_0000.nii.gz"
        ref = nib.load(str(src))
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-5), key
        assert Path(case["overlay"]).stat().st_size > 5000
    assert "test Dice" in proc.stdout


def test_pretrained_and_scratch_share_split_and_seeds(runs):
    (a, _), (b, _) = runs["pretrained"], runs["scratch"]
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert (a / "split.json").read_text() == (b / "split.json").read_text()
    assert ma["seeds"] == mb["seeds"] and ma["decoder_init_digest"] == mb["decoder_init_digest"]
    assert len(ma["load_report"]["loaded"]) == 52 and not mb["load_report"]["loaded"]  # 53 tensors − the cls token


def test_report_table(runs, tmp_path):
    from medssl.finetune.report import write_report

    table = write_report([runs["pretrained"][0], runs["scratch"][0]], tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| pretrained | pretrained |" in table and "| scratch | scratch |" in table and "liver" in table
    assert text.count("![") == 4


def test_cli_refuses_bad_input_before_training(phantoms, export, tmp_path):
    ds = _copy_dataset(phantoms, tmp_path / "ds")
    desc = json.loads((ds / "dataset.json").read_text())
    desc["labels"] = {"background": 0, "liver": 1}
    (ds / "dataset.json").write_text(json.dumps(desc))
    r = _finetune(["--export", str(export), "--data", str(ds), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert r.returncode == 2 and "does not declare" in r.stderr and "fix:" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_labelled_shards_are_a_dataset_too(built, phantoms):
    sources, declared = D.discover(built)
    assert sources and all(s.shard is not None for s in sources) and declared == {}
    cases = D.prepare(sources[:2], D.Preprocessing((1.5,) * 3, D.Window()), declared, progress=False)
    for c in cases:
        assert c.label.shape == c.image.shape[1:] and c.label.max() > 0
        assert c.source.label and Path(c.source.label).parent.name == "labelsTr", "original label found for scoring"


def test_hd95_in_millimetres():
    a = np.zeros((20, 20, 20), dtype=np.uint8)
    b = np.zeros_like(a)
    a[5:10, 5:10, 5:10] = 1
    b[7:12, 5:10, 5:10] = 1  # the same cube moved 2 voxels along x
    out = dice_per_class(b, a, 2, spacing=(1.5, 1.0, 1.0), hd95=True)
    assert out["hd95"][1] == pytest.approx(3.0) and out["dice"][1] == pytest.approx(0.6)


def test_monai_checkpoint_file_through_the_harness(tmp_path):
    """``--export model.pt`` (a MONAI ViTAutoEnc SSL state dict) → MONAI UNETR; scratch keeps its sizes."""
    from monai.networks.nets import ViTAutoEnc

    from medssl.finetune.loading import build

    torch.manual_seed(1)
    ae = ViTAutoEnc(in_channels=1, img_size=32, patch_size=16, hidden_size=96, mlp_dim=192, num_layers=12, num_heads=12)  # UNETR's ViT has 12
    path = tmp_path / "vit_ssl.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ae.state_dict().items()}, "epoch": 3}, path)
    model, report, manifest, arch = build(_cfg(path), in_channels=2, out_channels=4)
    assert arch == "monai_unetr" and manifest is None
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, ae.blocks[1].attn.qkv.weight)
    assert any("stem repeated from 1 to 2" in n for n in report.notes) and "conv3d_transpose.weight" in report.dropped
    assert model(torch.randn(1, 2, 32, 32, 32)).shape == (1, 4, 32, 32, 32)
    scratch, rep, _, _ = build(_cfg(path, init="scratch"), in_channels=2, out_channels=4)
    assert not rep.loaded and scratch.vit.blocks[1].mlp.linear1.weight.shape == (192, 96), "sizes from the file"


def test_csv_of_image_label_pairs(phantoms, tmp_path):
    rows = ["path,label,modality"] + [f"{p},{phantoms / 'labelsTr' / p.name.replace('_0000', '')},CT"
                                      for p in sorted((phantoms / "imagesTr").glob("*.nii.gz"))[:3]]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    sources, declared = D.discover(tmp_path / "pairs.csv")
    assert len(sources) == 3 and all(s.label and s.images for s in sources) and declared == {}
    (tmp_path / "bad.csv").write_text("path,modality\n" + rows[1].split(",")[0] + ",CT\n")
    with pytest.raises(InputError, match="no label"):
        D.discover(tmp_path / "bad.csv")
