"""nnU-Net's networks as backbones (``nnunet_resenc``, ``nnunet_plain``) and ``export --format nnunet``.

A tiny phantom dataset is planned with nnU-Net's own planner (``nnUNetv2_plan_and_preprocess``, fingerprint and
plans only); the backbone and the ``nnunet`` decoder built from those plans equal the network nnU-Net builds,
output for output; a few Volume Fusion steps on ``nnunet_resenc``, exported with ``--format nnunet``, load through
nnU-Net's own ``load_pretrained_weights`` into the network nnU-Net's trainer builds for the plans, and give the same
encoder features as our export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2")
pytest.importorskip("dynamic_network_architectures")

DATASET = "Dataset903_PhantomCT"


def _nnunet_env(root: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1"}


def _plan(root: Path, planner: str) -> None:
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            "plan_and_preprocess_entry as main; sys.argv = ['nnUNetv2_plan_and_preprocess'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "-d", "903", "-pl", planner, "--no_pp", "-np", "1"],
                       env=_nnunet_env(root), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Three CT phantoms as an nnU-Net raw dataset, planned by nnU-Net (ResEnc M and the default plans), and the same
    scans built into medssl shards (the unlabelled pool)."""
    from medssl.shards.build import BuildConfig, build
    from medssl.shards.synth import synth_dataset

    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / DATASET
    synth_dataset(raw, n=3, seed=2, modality="CT", fov_scale=0.3, progress=False)
    _plan(root, "nnUNetPlannerResEncM")
    _plan(root, "ExperimentPlanner")
    shards = root / "shards"
    build(BuildConfig(inputs=[str(raw)], shard_size="200k"), shards, workers=1, progress=False)
    pre = root / "preprocessed" / DATASET
    return {"root": root, "shards": shards, "resenc": pre / "nnUNetResEncUNetMPlans.json",
            "plain": pre / "nnUNetPlans.json"}


def _trainer_network(plans: Path, classes: int):
    """The network nnU-Net's trainer builds for ``3d_fullres`` of ``plans`` (deep supervision on, as it trains)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(plans))
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, classes, True)


@pytest.mark.parametrize("kind", ["resenc", "plain"])
def test_backbone_and_decoder_are_the_network_nnunet_builds(planned, kind, one_thread):
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.registry import DECODERS

    backbone = build_backbone(f"nnunet_{kind}", plans=str(planned[kind]), configuration="3d_fullres")
    decoder = DECODERS.build("nnunet", backbone.feature_channels, backbone.feature_strides, 4, **backbone.decoder_kwargs)
    net = _trainer_network(planned[kind], 4)
    cls = net.__class__.__name__
    assert cls == {"resenc": "ResidualEncoderUNet", "plain": "PlainConvUNet"}[kind]
    ours = {**{f"encoder.{k}": v for k, v in backbone.encoder.state_dict().items()},
            **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    theirs = {k: v for k, v in net.state_dict().items() if not k.startswith("decoder.encoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    net.load_state_dict({**ours, **{k: v for k, v in net.state_dict().items() if k.startswith("decoder.encoder.")}})
    net.encoder.load_state_dict(backbone.encoder.state_dict())  # the decoder's view of the encoder is the same module
    net.decoder.deep_supervision = False
    net.eval(), backbone.eval(), decoder.eval()
    conf = json.loads(planned[kind].read_text())["configurations"]["3d_fullres"]
    zyx = [int(s) for s in conf["patch_size"]]  # nnU-Net's axis order: the slice axis first
    x = torch.randn(1, 1, *reversed(zyx))  # medssl's crop [B, C, X, Y, Z]
    with torch.no_grad():
        ref = net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        got = decoder(backbone.forward_features(x))
    assert got.shape == ref.shape == (1, 4, *reversed(zyx))
    assert torch.equal(got, ref)
    assert backbone.feature_strides_xyz[-1] == tuple(reversed([
        int(torch.tensor([s[a] for s in conf["architecture"]["arch_kwargs"]["strides"]]).prod()) for a in range(3)]))


def test_plans_errors_name_the_file_and_the_fix(planned, tmp_path):
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.backbones.nnunet import PlansError

    with pytest.raises(PlansError, match="this plans file builds nnunet_plain"):
        build_backbone("nnunet_resenc", plans=str(planned["plain"]))
    with pytest.raises(PlansError, match="no configuration '3d_lowres'.*model.kwargs.configuration"):
        build_backbone("nnunet_resenc", plans=str(planned["resenc"]), configuration="3d_lowres")
    with pytest.raises(PlansError, match="plans file not found"):
        build_backbone("nnunet_resenc", plans=str(tmp_path / "missing.json"))
    doc = json.loads(planned["resenc"].read_text())
    doc["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "subprocess.ResidualEncoderUNet"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(PlansError, match="is not one medssl builds"):
        build_backbone("nnunet_resenc", plans=str(bad))


@pytest.fixture(scope="module")
def vf_run(planned):
    """Three Volume Fusion steps on nnunet_resenc (2 DeepSpeed CPU processes), exported with --format nnunet."""
    from tests.conftest import run_pretrain_2proc

    run = planned["root"] / "vf"
    _, log = run_pretrain_2proc("volume_fusion", planned["shards"], run, 3, "model.backbone=nnunet_resenc",
                                f"model.kwargs.plans={planned['resenc']}", "model.kwargs.configuration=3d_fullres",
                                "task.decoder=nnunet", "train.micro_batch=2", "data.crop_size=[24,24,24]",
                                "task.patch_size=[16,16,16]")
    r = subprocess.run([sys.executable, "-m", "medssl.pretrain", "export", str(run), "--format", "nnunet"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run, log, r.stdout


def test_volume_fusion_on_nnunet_resenc_exports_what_nnunet_loads(planned, vf_run, one_thread):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from medssl.pretrain.export import load_backbone, read_manifest

    run, log, out = vf_run
    export = run / "export"
    assert "volume_fusion step 3/3" in log
    assert f"nnUNetv2_train 903 3d_fullres FOLD -p nnUNetResEncUNetMPlans -pretrained_weights {export.resolve()}" in out
    saved = torch.load(export / "nnunet_pretrained.pth", weights_only=True)
    assert not any(".seg_layers." in k for k in saved["network_weights"])
    net = _trainer_network(planned["resenc"], 7)  # the labelled task's classes: the seg layers stay nnU-Net's own
    load_pretrained_weights(net, str(export / "nnunet_pretrained.pth"))  # nnU-Net's own loader; asserts every key
    backbone = load_backbone(export)
    manifest = read_manifest(export)
    assert manifest["components"]["decoder"]["registry"] == "nnunet"
    from safetensors.torch import load_file

    decoder = load_file(export / manifest["components"]["decoder"]["file"])
    for k, v in decoder.items():  # the pretrained decoder arrived, not nnU-Net's initialisation
        if not k.startswith("seg_layers."):
            assert torch.equal(net.decoder.state_dict()[k], v), k
    net.eval(), backbone.eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        ref = net.encoder(x.permute(0, 1, 4, 3, 2))
        ours = backbone.forward_features(x)
    assert all(torch.equal(r.permute(0, 1, 4, 3, 2), o) for r, o in zip(ref, ours))


def test_format_nnunet_refuses_other_backbones(tmp_path, capsys):
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.export import ExportError, write_export
    from medssl.pretrain.nnunet_format import export_nnunet

    b = build_backbone("resenc3d_tiny")
    pre = {"orientation": "RAS", "spacing": "1.5", "crop_size": [32, 32, 32],
           "intensity": {"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}}}
    write_export(tmp_path, "resenc3d_tiny", b, b.state_dict(), {"recipe": "volume_fusion", "step": 1, "samples_seen": 2,
                                                                "preprocessing": pre})
    with pytest.raises(ExportError, match="not an nnU-Net network"):
        export_nnunet(tmp_path)


def test_contrastive_runs_on_nnunet_with_its_own_decoder(planned, one_thread):
    """Global + local contrastive on nnU-Net's network: the global embedding from the encoder, the local one from the
    first decoder stages of nnU-Net's own decoder (anisotropic levels: the region grid follows each axis's stride)."""
    from medssl.pretrain.config import load_config
    from medssl.pretrain.train import build_task

    cfg = load_config("contrastive", ["model.backbone=nnunet_plain", f"model.kwargs={{plans: {planned['plain']}}}",
                                      "task.decoder=nnunet"], preset="tiny")
    task = build_task(cfg)
    assert type(task.decoder).__name__ == "NNUNetDecoder"
    names = [n for n, _ in task.decoder.named_parameters()]
    used = [n for n in names if n.startswith(task.decoder_used)]
    assert used and len(used) < len(names)  # the first decoder stages only
    x = torch.randn(2, 1, *cfg.data.crop_size)
    assert task.embed_global(x).shape == (2, cfg.task.proj_dim)
    assert task.embed_local(x).shape[0] == 2
    bad = load_config("contrastive", ["model.backbone=nnunet_plain", f"model.kwargs={{plans: {planned['plain']}}}"],
                      preset="tiny")
    with pytest.raises(ValueError, match="task.decoder=nnunet"):
        build_task(bad)


@pytest.mark.parametrize("transpose", [[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1], [1, 2, 0], [2, 0, 1]])
def test_crops_reach_the_network_in_nnunets_axis_order(transpose):
    """nnU-Net's network sees the stored image's (z, y, x) array transposed by the plans' ``transpose_forward`` (the
    coarsest-spaced axis first); a medssl crop is (X, Y, Z) = the stored voxel order of an axially stored image. The
    backbone's permutation must give the array nnU-Net's preprocessing gives, and bring the network's output back."""
    from medssl.pretrain.backbones.nnunet import _from_net, _to_net, net_axes_from

    crop = torch.randn(1, 1, 5, 6, 7)  # [B, C, X, Y, Z]
    stored = crop.permute(0, 1, 4, 3, 2)  # what nnU-Net's SimpleITK reader returns: [B, C, z, y, x]
    theirs = stored.permute(0, 1, *[t + 2 for t in transpose])  # DefaultPreprocessor: data.transpose(transpose_forward)
    axes = net_axes_from(transpose)
    assert torch.equal(_to_net(crop, axes), theirs)
    assert torch.equal(_from_net(theirs, axes), crop)


def test_an_export_naming_other_code_is_refused_before_anything_runs(planned, tmp_path):
    """A manifest is untrusted: an architecture that names anything but nnU-Net's two U-Nets and torch.nn's layers
    (here a path that walks from torch.nn to os.system) is refused while the manifest is read; nothing is called."""
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.backbones.nnunet import PlansError
    from medssl.pretrain.export import ExportError, read_manifest, write_export

    b = build_backbone("nnunet_plain", plans=str(planned["plain"]))
    pre = {"orientation": "RAS", "spacing": "1.5", "crop_size": [32, 32, 32],
           "intensity": {"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}}}
    export = write_export(tmp_path / "export", "nnunet_plain", b, b.state_dict(),
                          {"recipe": "volume_fusion", "step": 1, "samples_seen": 2, "preprocessing": pre})
    read_manifest(export)  # as written: fine
    marker = tmp_path / "PWNED"
    manifest = json.loads((export / "manifest.json").read_text())
    arch = manifest["backbone"]["kwargs"]["architecture"]
    arch["arch_kwargs"]["nonlin"] = "torch.nn.modules.module.torch.serialization.os.system"
    arch["arch_kwargs"]["nonlin_kwargs"] = {"command": f"touch {marker}"}
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="not a torch.nn class medssl builds"):
        read_manifest(export)
    assert not marker.exists()
    huge = json.loads(json.dumps(b.architecture))
    huge["arch_kwargs"]["n_stages"] = 100_000
    with pytest.raises(PlansError, match="n_stages"):
        build_backbone("nnunet_plain", architecture=huge)


def test_checkpointed_stages_give_the_same_gradients(planned, one_thread):
    import torch.utils.checkpoint as tuc

    from medssl.pretrain.backbones import build_backbone

    torch.manual_seed(0)
    plain = build_backbone("nnunet_plain", plans=str(planned["plain"]))
    ckpt = build_backbone("nnunet_plain", plans=str(planned["plain"]), checkpoint_blocks=-1)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    calls = []
    real = tuc.checkpoint
    tuc.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        grads = []
        for m in (plain, ckpt):
            m.train()
            sum(f.float().pow(2).mean() for f in m.forward_features(x)).backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    finally:
        tuc.checkpoint = real
    assert len(calls) == len(ckpt.encoder.stages)
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
