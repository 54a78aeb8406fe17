"""nnU-Net's own networks as backbones: ``nnunet_resenc`` and ``nnunet_plain``, built from an nnU-Net plans file.

The network is the one nnU-Net builds for a dataset: ``nnUNetv2_plan_and_preprocess`` writes a plans file whose
configuration (``3d_fullres`` …) names a class of ``dynamic-network-architectures`` (``ResidualEncoderUNet`` for the
ResEnc presets, ``PlainConvUNet`` for the default plans) and its keyword arguments; nnU-Net's trainer builds
``cls(input_channels, num_classes, deep_supervision, **arch_kwargs)``. Here the same class is built with the same
arguments (so parameter names and shapes are nnU-Net's), and the backbone keeps its ``encoder``; the ``nnunet``
decoder (registered beside it) is the same network's ``UNetDecoder``. ``pretrain export --format nnunet`` puts both
back into the network nnU-Net builds and writes the checkpoint ``nnUNetv2_train … -pretrained_weights`` loads.

Axis order: nnU-Net's arrays are ``[C, Z, Y, X]`` of the stored image (the plans' ``spacing``, ``patch_size``,
``kernel_sizes`` and ``strides`` list the slice axis first); medssl's crops are ``[C, X, Y, Z]`` (RAS). The backbone
runs the network on the crop with its spatial axes reversed and hands the features back in the crop's order (views,
no copies), so anisotropic kernels (``(1, 3, 3)``) and strides see the axes they were planned for; the decoder does
the same. Declared ``feature_strides`` are the largest per-axis stride of each level (``feature_strides_xyz`` gives all
three in the crop's order).

The architecture is stored in the export's manifest (``config.architecture``), so an export rebuilds without the
plans file. Only classes of ``dynamic_network_architectures`` and operators of ``torch.nn`` are accepted from a plans
file (it names classes that are imported by name).
"""

from __future__ import annotations

import json
import pydoc
from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..registry import BACKBONES, DECODERS

KINDS = {"nnunet_resenc": ("ResidualEncoderUNet",), "nnunet_plain": ("PlainConvUNet",)}
_ALLOWED_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


class PlansError(ValueError):
    """A plans file or configuration that cannot give the network; the message names the file and the fix."""


def _need_dna():
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        raise PlansError("nnU-Net backbones need the package nnU-Net builds its networks with: pip install "
                         "dynamic-network-architectures (or: pip install 'medssl[nnunet]')") from None


def read_configuration(plans: str | Path, configuration: str = "3d_fullres") -> dict:
    """The resolved configuration of an nnU-Net plans file (``inherits_from`` followed), with the plans' name."""
    path = Path(plans)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlansError(f"{path}: plans file not found (nnUNet_preprocessed/DatasetXXX_Name/<plans>.json, written by "
                         "nnUNetv2_plan_and_preprocess)") from None
    except (OSError, ValueError) as exc:
        raise PlansError(f"{path}: not a readable plans JSON ({exc})") from None
    confs = doc.get("configurations") if isinstance(doc, dict) else None
    if not isinstance(confs, dict) or configuration not in confs:
        known = ", ".join(sorted(confs)) if isinstance(confs, dict) else "none"
        raise PlansError(f"{path}: no configuration {configuration!r} (it has: {known}); set "
                         "model.kwargs.configuration")
    conf, seen = dict(confs[configuration]), {configuration}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in confs:
            raise PlansError(f"{path}: configuration {configuration!r} inherits from {parent!r}, which is missing or "
                             "circular")
        seen.add(parent)
        conf = {**confs[parent], **conf}
    if "architecture" not in conf:
        raise PlansError(f"{path}: configuration {configuration!r} has no 'architecture' (plans from nnU-Net < 2.4?); "
                         "re-plan with a current nnUNetv2_plan_and_preprocess")
    conf["plans_name"] = doc.get("plans_name", path.stem)
    conf["dataset_name"] = doc.get("dataset_name", "")
    return conf


def _locate(name: str, what: str):
    if not isinstance(name, str) or not name.startswith(_ALLOWED_PREFIXES):
        raise PlansError(f"the plans' {what} {name!r} is not a class of dynamic_network_architectures or torch.nn; "
                         "medssl builds only those")
    obj = pydoc.locate(name)
    if obj is None:
        raise PlansError(f"the plans' {what} {name!r} does not import (dynamic-network-architectures too old?)")
    return obj


def build_network(architecture: dict, in_chans: int, num_classes: int, deep_supervision: bool = False) -> nn.Module:
    """The network nnU-Net's trainer builds from a plans ``architecture`` block (``network_class_name``,
    ``arch_kwargs``, ``_kw_requires_import``), initialised as nnU-Net does (``network.apply(network.initialize)``)."""
    _need_dna()
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], key)
    cls = _locate(architecture["network_class_name"], "network_class_name")
    net = cls(input_channels=int(in_chans), num_classes=int(num_classes), deep_supervision=deep_supervision, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def _reverse(x: Tensor) -> Tensor:
    """``[B, C, a, b, c]`` → ``[B, C, c, b, a]`` (a view): medssl's X, Y, Z ↔ nnU-Net's Z, Y, X."""
    return x.permute(0, 1, 4, 3, 2)


class NNUNetEncoder(nn.Module):
    """The encoder of an nnU-Net network (``encoder.*`` parameter names as nnU-Net's). Contract 2: ``forward_features``
    returns every stage's output (finest first, in the crop's axis order); ``feature_channels`` / ``feature_strides``."""

    def __init__(self, architecture: dict, in_chans: int = 1, kind: str = "nnunet_resenc", img_size=None,
                 plans_name: str = "", configuration: str = "", checkpoint_blocks: int = 0, dataset_name: str = ""):
        super().__init__()
        name = str(architecture.get("network_class_name", ""))
        if name.rsplit(".", 1)[-1] not in KINDS[kind]:
            other = [k for k, v in KINDS.items() if name.rsplit(".", 1)[-1] in v]
            hint = f"; this plans file builds {other[0]}" if other else ""
            raise PlansError(f"{kind} needs a plans configuration whose network is {KINDS[kind][0]}, not {name!r}{hint}")
        net = build_network(architecture, in_chans, num_classes=1)
        if len(net.encoder.strides[0]) != 3:
            raise PlansError(f"{configuration or 'the configuration'} builds a {len(net.encoder.strides[0])}D network; "
                             "pretraining uses a 3D configuration (3d_fullres, 3d_lowres)")
        self.encoder = net.encoder
        self.encoder.return_skips = True
        self.kind, self.architecture = kind, architecture
        self.checkpoint_blocks = int(checkpoint_blocks)
        cum, strides = [1, 1, 1], []
        for s in self.encoder.strides:  # nnU-Net's Z, Y, X per stage
            cum = [c * int(v) for c, v in zip(cum, s)]
            strides.append(tuple(reversed(cum)))  # the crop's X, Y, Z
        self.feature_strides_xyz = strides
        self.feature_strides = [max(s) for s in strides]
        self.feature_channels = [int(c) for c in self.encoder.output_channels]
        self.in_chans = int(in_chans)
        if img_size is not None:  # the crop the run trains on (recipes size their heads from it; not part of config)
            self.img_size = (int(img_size),) * 3 if isinstance(img_size, (int, float)) else tuple(int(v) for v in img_size)
        # the decoder recipes attach to this backbone (task.decoder), and what it is built from
        self.native_decoder = "nnunet"
        self.decoder_kwargs = {"architecture": architecture, "in_chans": int(in_chans)}
        self._config = {"architecture": architecture, "in_chans": int(in_chans), "plans_name": plans_name,
                        "configuration": configuration, "dataset_name": dataset_name}

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``build_backbone(name, **config)`` rebuilds the encoder."""
        return json.loads(json.dumps(self._config))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        xs = _reverse(x)  # [B, C, Z, Y, X]
        stem = getattr(self.encoder, "stem", None)  # ResidualEncoder has one, PlainConvEncoder not
        if stem is not None:
            xs = stem(xs)
        feats = []
        n_ckpt = self.checkpoint_blocks if self.training and torch.is_grad_enabled() else 0
        for i, stage in enumerate(self.encoder.stages):
            if n_ckpt < 0 or i < n_ckpt:
                xs = torch.utils.checkpoint.checkpoint(stage, xs, use_reentrant=False)
            else:
                xs = stage(xs)
            feats.append(_reverse(xs))  # [B, c_i, X_i, Y_i, Z_i]
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def _backbone(kind: str, plans=None, configuration: str = "3d_fullres", architecture: dict | None = None,
              in_chans: int = 1, img_size=None, plans_name: str = "", checkpoint_blocks: int = 0,
              dataset_name: str = "", **unused) -> NNUNetEncoder:
    if unused:
        raise PlansError(f"{kind} takes plans and configuration; model.kwargs also holds {sorted(unused)} (a recipe's or "
                         "preset's settings for another backbone): replace them, model.kwargs={plans: PATH, "
                         "configuration: 3d_fullres}")
    if architecture is None:
        if plans is None:
            raise PlansError(f"{kind} is built from an nnU-Net plans file: model.kwargs.plans=PATH/nnUNetResEncUNetLPlans"
                             ".json model.kwargs.configuration=3d_fullres")
        conf = read_configuration(plans, configuration)
        architecture, plans_name, dataset_name = conf["architecture"], conf["plans_name"], conf["dataset_name"]
    return NNUNetEncoder(architecture, in_chans, kind, img_size, plans_name, configuration, checkpoint_blocks,
                         dataset_name)


@BACKBONES.register("nnunet_resenc")
def nnunet_resenc(**kwargs) -> NNUNetEncoder:
    """nnU-Net's ResEnc U-Net encoder (``ResidualEncoderUNet``) from a plans file: ``plans=…/nnUNetResEncUNetLPlans.json
    configuration=3d_fullres`` (the ResEnc M/L/XL presets)."""
    return _backbone("nnunet_resenc", **kwargs)


@BACKBONES.register("nnunet_plain")
def nnunet_plain(**kwargs) -> NNUNetEncoder:
    """nnU-Net's default U-Net encoder (``PlainConvUNet``) from a plans file: ``plans=…/nnUNetPlans.json``."""
    return _backbone("nnunet_plain", **kwargs)


@DECODERS.register("nnunet")
class NNUNetDecoder(nn.Module):
    """nnU-Net's ``UNetDecoder`` (parameter names ``stages.*``, ``transpconvs.*``, ``seg_layers.*`` as under nnU-Net's
    ``decoder.``) over the features of an ``nnunet_*`` backbone; ``forward(feats) -> [B, K, X, Y, Z]`` logits at full
    resolution (the last ``seg_layers`` conv; deep supervision is nnU-Net's fine-tuning business).

    Built from the same ``architecture`` as the backbone (a recipe passes the backbone's ``decoder_kwargs``); the
    encoder the decoder reads its layout from is not kept as a submodule (nnU-Net's ``decoder.encoder.*`` duplicates
    the encoder's tensors; the export puts them back)."""

    head_prefix = "seg_layers."  # nnU-Net never loads segmentation layers from pretrained weights

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int,
                 architecture: dict | None = None, in_chans: int = 1):
        super().__init__()
        if architecture is None:
            raise PlansError("the nnunet decoder is built from an nnunet_* backbone's architecture (task.decoder=nnunet "
                             "with model.backbone=nnunet_resenc or nnunet_plain)")
        net = build_network(architecture, in_chans, int(out_channels))
        dec = net.decoder
        if list(feature_channels) != [int(c) for c in net.encoder.output_channels]:
            raise PlansError(f"the nnunet decoder's plans give stage widths {list(net.encoder.output_channels)}, the "
                             f"backbone {list(feature_channels)}")
        del dec._modules["encoder"]  # read for the layout only; not a second copy of the encoder's parameters
        self.stages, self.transpconvs, self.seg_layers = dec.stages, dec.transpconvs, dec.seg_layers
        self.feature_channels, self.feature_strides = list(feature_channels), list(feature_strides)
        self.out_channels = int(out_channels)
        self._config = {"feature_channels": list(feature_channels), "feature_strides": list(feature_strides),
                        "out_channels": int(out_channels), "architecture": architecture, "in_chans": int(in_chans)}

    @property
    def config(self) -> dict:
        return json.loads(json.dumps(self._config))

    def forward_levels(self, feats: Sequence[Tensor], depth: int | None = None) -> list[Tensor]:
        """The deepest feature and the output of each decoder stage, finest first, in the crop's axis order; ``depth``
        runs only the first ``depth`` stages from the bottleneck (a recipe that pretrains part of the decoder)."""
        skips = [_reverse(f) for f in feats]  # nnU-Net's Z, Y, X
        x = skips[-1]
        out = [x]
        for s in range(len(self.stages))[:depth]:  # UNetDecoder.forward without deep supervision
            x = self.transpconvs[s](x)
            x = self.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
            out.append(x)
        return [_reverse(t) for t in out[::-1]]

    def level_prefixes(self, depth: int) -> list[str]:
        """Parameter-name prefixes of the first ``depth`` stages from the bottleneck."""
        return [p for s in range(depth) for p in (f"transpconvs.{s}.", f"stages.{s}.")]

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.seg_layers[-1](_reverse(self.forward_levels(feats)[0])).permute(0, 1, 4, 3, 2)  # [B, K, X, Y, Z]


def ct_window(plans: str | Path, channel: int = 0) -> tuple[list[float], list[float]]:
    """nnU-Net's CT normalisation as a medssl window: clip to the foreground's 0.5–99.5th percentiles, then subtract the
    mean and divide by the standard deviation (``CTNormalization``, statistics from the plans' dataset fingerprint),
    i.e. ``data.window_ct`` = the percentiles and ``data.window_out`` = where they land after the z-score."""
    doc = json.loads(Path(plans).read_text())
    props = doc.get("foreground_intensity_properties_per_channel", {}).get(str(channel))
    if not props:
        raise PlansError(f"{plans}: no foreground intensity statistics for channel {channel}")
    lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
    mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
    return [lo, hi], [(lo - mean) / std, (hi - mean) / std]


def main(argv=None) -> int:
    """``python -m medssl.pretrain nnunet-overrides PLANS [CONFIGURATION]``: the overrides that pretrain nnU-Net's network
    on the data as nnU-Net will feed it (the backbone, its plans, the CT window of CTNormalization, the spacing)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if args else 2
    plans, conf_name = args[0], (args[1] if len(args) > 1 else "3d_fullres")
    try:
        conf = read_configuration(plans, conf_name)
        window, out = ct_window(plans)
    except PlansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cls = conf["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    backbone = "nnunet_resenc" if cls == "ResidualEncoderUNet" else "nnunet_plain"
    zyx = conf.get("spacing", [])
    print(f"model.backbone={backbone} model.kwargs.plans={Path(plans).resolve()} model.kwargs.configuration={conf_name} "
          f"task.decoder=nnunet data.window_ct=[{window[0]:.6g},{window[1]:.6g}] "
          f"data.window_out=[{out[0]:.6g},{out[1]:.6g}]")
    if len(zyx) == 3:
        print(f"# shards at the plans' spacing (medssl lists X, Y, Z): --spacing {zyx[2]:.6g},{zyx[1]:.6g},{zyx[0]:.6g}",
              file=sys.stderr)
    return 0

