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
import shlex
from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..registry import BACKBONES, DECODERS

KINDS = {"nnunet_resenc": ("ResidualEncoderUNet",), "nnunet_plain": ("PlainConvUNet",)}
NETWORKS = ("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "dynamic_network_architectures.architectures.unet.PlainConvUNet")
OP_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")  # the arch_kwargs that name a class
# what arch_kwargs may hold (the keys nnU-Net's planners write, and the two U-Nets' optional ones)
ARCH_KEYS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage", "n_conv_per_stage",
             "n_conv_per_stage_decoder", "conv_bias", "norm_op_kwargs", "dropout_op_kwargs", "nonlin_kwargs",
             "nonlin_first", "stem_channels", "bottleneck_channels", *OP_KEYS)
MAX_STAGES = 12


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
    conf["transpose_forward"] = doc.get("transpose_forward", [0, 1, 2])
    conf["dataset_name"] = doc.get("dataset_name", "")
    return conf


def _ops() -> dict[str, type]:
    """The torch.nn classes a plans file may name (convolutions, norms, dropouts, activations), by their full and
    short names: nothing else is imported or called, whatever the file says."""
    classes = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d,
               nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.LeakyReLU,
               nn.ReLU, nn.GELU, nn.PReLU, nn.ELU, nn.SiLU)
    return {name: c for c in classes for name in (f"{c.__module__}.{c.__qualname__}", f"torch.nn.{c.__name__}")}


def _network_class(name: str):
    if name not in NETWORKS:
        raise PlansError(f"the plans' network_class_name {name!r} is not one medssl builds ({', '.join(NETWORKS)})")
    _need_dna()
    from dynamic_network_architectures.architectures import unet

    return getattr(unet, name.rsplit(".", 1)[-1])


def _ints(value, lo: int, hi: int, n: int | None, what: str, nested: bool = False) -> None:
    """An int in [lo, hi], or a list of ``n`` of them (of lists of 1–3 of them with ``nested``)."""
    def one(v):
        if nested and isinstance(v, (list, tuple)):
            if not 1 <= len(v) <= 3:
                raise PlansError(f"arch_kwargs.{what}: {v!r} must list 1 to 3 axes")
            return [one(x) for x in v]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise PlansError(f"arch_kwargs.{what}: {v!r} must be an integer in [{lo}, {hi}]")
    if isinstance(value, (list, tuple)):
        if n is not None and len(value) != n:
            raise PlansError(f"arch_kwargs.{what} lists {len(value)} values for {n} stages")
        for v in value:
            one(v)
    else:
        one(value)


def check_architecture(arch) -> None:
    """A plans ``architecture`` block (from a plans file or an export's manifest, both untrusted) checked before anything
    is built: one of the two U-Nets, class names only from :func:`_ops`, sizes bounded."""
    if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
        raise PlansError("architecture must hold network_class_name, arch_kwargs and _kw_requires_import")
    _network_class_name = arch.get("network_class_name")
    if _network_class_name not in NETWORKS:
        raise PlansError(f"the plans' network_class_name {_network_class_name!r} is not one medssl builds "
                         f"({', '.join(NETWORKS)})")
    req = arch.get("_kw_requires_import", [])
    if not isinstance(req, (list, tuple)) or not set(req) <= set(OP_KEYS):
        raise PlansError(f"_kw_requires_import {req!r} may only name {', '.join(OP_KEYS)}")
    kw = arch["arch_kwargs"]
    unknown = sorted(str(k) for k in kw if k not in ARCH_KEYS)
    if unknown:
        raise PlansError(f"arch_kwargs.{unknown[0]} is not an argument of nnU-Net's U-Nets that medssl builds")
    n = kw.get("n_stages")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_STAGES:
        raise PlansError(f"arch_kwargs.n_stages {n!r} must be an integer in [1, {MAX_STAGES}]")
    _ints(kw.get("features_per_stage", 32), 1, 4096, n, "features_per_stage")
    _ints(kw.get("kernel_sizes", 3), 1, 9, n, "kernel_sizes", nested=True)
    _ints(kw.get("strides", 1), 1, 8, n, "strides", nested=True)
    for key in ("n_blocks_per_stage", "n_conv_per_stage"):
        if key in kw:
            _ints(kw[key], 1, 32, n, key)
    _ints(kw.get("n_conv_per_stage_decoder", 1), 1, 32, n - 1, "n_conv_per_stage_decoder")
    ops = _ops()
    for key in OP_KEYS:
        value = kw.get(key)
        if value is not None and (key not in req or value not in ops):
            raise PlansError(f"arch_kwargs.{key} {value!r} is not a torch.nn class medssl builds with (convolutions, "
                             "instance/batch norms, dropouts, activations)")
    for key in ("norm_op_kwargs", "dropout_op_kwargs", "nonlin_kwargs"):
        value = kw.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and (v is None or isinstance(v, (bool, int, float))) for k, v in value.items())):
            raise PlansError(f"arch_kwargs.{key} {value!r} must map names to numbers or booleans")
    for key in ("conv_bias", "nonlin_first"):
        if key in kw and not isinstance(kw[key], bool):
            raise PlansError(f"arch_kwargs.{key} {kw[key]!r} must be true or false")
    for key in ("stem_channels", "bottleneck_channels"):
        if kw.get(key) is not None:
            _ints(kw[key], 1, 4096, n, key)


def net_axes_from(transpose_forward) -> list[int]:
    """Which crop axis (X, Y, Z = 0, 1, 2) each of the network's axes is. nnU-Net's arrays are the stored image's
    (z, y, x), then ``transpose_forward`` puts the coarsest-spaced axis first; medssl's crops are RAS (X, Y, Z),
    which is the stored voxel order for images stored axially (the usual CT and axial MRI)."""
    t = [int(a) for a in (transpose_forward if transpose_forward is not None else (0, 1, 2))]
    if sorted(t) != [0, 1, 2]:
        raise PlansError(f"transpose_forward {transpose_forward!r} is not a permutation of [0, 1, 2]")
    return [2 - a for a in t]


def _check_axes(net_axes) -> list[int]:
    axes = [int(a) for a in net_axes]
    if sorted(axes) != [0, 1, 2]:
        raise PlansError(f"net_axes {net_axes!r} must be a permutation of [0, 1, 2]")
    return axes


def build_network(architecture: dict, in_chans: int, num_classes: int, deep_supervision: bool = False) -> nn.Module:
    """The network nnU-Net's trainer builds from a plans ``architecture`` block (``network_class_name``,
    ``arch_kwargs``, ``_kw_requires_import``), initialised as nnU-Net does (``network.apply(network.initialize)``)."""
    check_architecture(architecture)
    ops = _ops()
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = ops[kwargs[key]]
    cls = _network_class(architecture["network_class_name"])
    net = cls(input_channels=int(in_chans), num_classes=int(num_classes), deep_supervision=deep_supervision, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def _to_net(x: Tensor, axes: Sequence[int]) -> Tensor:
    """A crop ``[B, C, X, Y, Z]`` in the network's axis order (a view)."""
    return x.permute(0, 1, *(2 + a for a in axes))


def _from_net(x: Tensor, axes: Sequence[int]) -> Tensor:
    """The network's ``[B, C, …]`` back in the crop's X, Y, Z order (a view)."""
    return x.permute(0, 1, *(2 + list(axes).index(c) for c in range(3)))


class NNUNetEncoder(nn.Module):
    """The encoder of an nnU-Net network (``encoder.*`` parameter names as nnU-Net's). Contract 2: ``forward_features``
    returns every stage's output (finest first, in the crop's axis order); ``feature_channels`` / ``feature_strides``."""

    def __init__(self, architecture: dict, in_chans: int = 1, kind: str = "nnunet_resenc", img_size=None,
                 plans_name: str = "", configuration: str = "", checkpoint_blocks: int = 0, dataset_name: str = "",
                 net_axes: Sequence[int] = (2, 1, 0)):
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
        from .vit3d import check_checkpoint_blocks

        self.checkpoint_blocks = check_checkpoint_blocks(checkpoint_blocks, "encoder stages")
        self.net_axes = _check_axes(net_axes)
        cum, strides = [1, 1, 1], []
        for s in self.encoder.strides:  # per network axis, each stage
            cum = [c * int(v) for c, v in zip(cum, s)]
            xyz = [1, 1, 1]
            for k, a in enumerate(self.net_axes):
                xyz[a] = cum[k]
            strides.append(tuple(xyz))  # the crop's X, Y, Z
        self.feature_strides_xyz = strides
        self.feature_strides = [max(s) for s in strides]
        self.feature_channels = [int(c) for c in self.encoder.output_channels]
        self.in_chans = int(in_chans)
        if img_size is not None:  # the crop the run trains on (recipes size their heads from it; not part of config)
            self.img_size = (int(img_size),) * 3 if isinstance(img_size, (int, float)) else tuple(int(v) for v in img_size)
        # the decoder recipes attach to this backbone (task.decoder), and what it is built from
        self.native_decoder = "nnunet"
        self.decoder_kwargs = {"architecture": architecture, "in_chans": int(in_chans), "net_axes": self.net_axes}
        self._config = {"architecture": architecture, "in_chans": int(in_chans), "plans_name": plans_name,
                        "configuration": configuration, "dataset_name": dataset_name, "net_axes": self.net_axes}

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``build_backbone(name, **config)`` rebuilds the encoder."""
        return json.loads(json.dumps(self._config))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        xs = _to_net(x, self.net_axes)  # the network's axis order (nnU-Net's slice-first arrays)
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
            feats.append(_from_net(xs, self.net_axes))  # [B, c_i, X_i, Y_i, Z_i]
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def _backbone(kind: str, plans=None, configuration: str = "3d_fullres", architecture: dict | None = None,
              in_chans: int = 1, img_size=None, plans_name: str = "", checkpoint_blocks: int = 0,
              dataset_name: str = "", net_axes=None, **unused) -> NNUNetEncoder:
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
        net_axes = net_axes_from(conf["transpose_forward"])
    return NNUNetEncoder(architecture, in_chans, kind, img_size, plans_name, configuration, checkpoint_blocks,
                         dataset_name, (2, 1, 0) if net_axes is None else net_axes)


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
                 architecture: dict | None = None, in_chans: int = 1, net_axes: Sequence[int] = (2, 1, 0)):
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
        self.net_axes = _check_axes(net_axes)
        self._config = {"feature_channels": list(feature_channels), "feature_strides": list(feature_strides),
                        "out_channels": int(out_channels), "architecture": architecture, "in_chans": int(in_chans),
                        "net_axes": self.net_axes}

    @property
    def config(self) -> dict:
        return json.loads(json.dumps(self._config))

    def forward_levels(self, feats: Sequence[Tensor], depth: int | None = None) -> list[Tensor]:
        """The deepest feature and the output of each decoder stage, finest first, in the crop's axis order; ``depth``
        runs only the first ``depth`` stages from the bottleneck (a recipe that pretrains part of the decoder)."""
        skips = [_to_net(f, self.net_axes) for f in feats]  # the network's axis order
        x = skips[-1]
        out = [x]
        for s in range(len(self.stages))[:depth]:  # UNetDecoder.forward without deep supervision
            x = self.transpconvs[s](x)
            x = self.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
            out.append(x)
        return [_from_net(t, self.net_axes) for t in out[::-1]]

    def level_prefixes(self, depth: int) -> list[str]:
        """Parameter-name prefixes of the first ``depth`` stages from the bottleneck."""
        return [p for s in range(depth) for p in (f"transpconvs.{s}.", f"stages.{s}.")]

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        y = self.seg_layers[-1](_to_net(self.forward_levels(feats)[0], self.net_axes))
        return _from_net(y, self.net_axes)  # [B, K, X, Y, Z]


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
    on the data as nnU-Net will feed it (the backbone and its plans; for CT, the window of nnU-Net's CTNormalization),
    and on stderr the spacing to build the shards at."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if args else 2
    plans, conf_name = args[0], (args[1] if len(args) > 1 else "3d_fullres")
    try:
        conf = read_configuration(plans, conf_name)
        check_architecture(conf["architecture"])
        axes = net_axes_from(conf["transpose_forward"])
    except PlansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cls = conf["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    backbone = "nnunet_resenc" if cls == "ResidualEncoderUNet" else "nnunet_plain"
    kwargs = json.dumps({"plans": str(Path(plans).resolve()), "configuration": conf_name})
    out = [f"model.backbone={backbone}", f"model.kwargs={kwargs}", "task.decoder=nnunet"]
    schemes = conf.get("normalization_schemes") or []
    if schemes[:1] == ["CTNormalization"]:
        window, mapped = ct_window(plans)
        out += [f"data.window_ct=[{window[0]:.6g},{window[1]:.6g}]", f"data.window_out=[{mapped[0]:.6g},{mapped[1]:.6g}]"]
        note = (f"# CT: nnU-Net clips to [{window[0]:.6g}, {window[1]:.6g}] HU and z-scores; Volume Fusion maps each view "
                f"onto task.out_range itself: add task.out_range=[{mapped[0]:.6g},{mapped[1]:.6g}] there")
    else:
        note = (f"# {schemes[0] if schemes else 'no normalisation scheme'}: nnU-Net normalises each image itself; no "
                "fixed window matches it, so the recipe's window stays")
    print(" ".join(shlex.quote(o) for o in out))
    zyx = conf.get("spacing", [])
    if len(zyx) == 3:
        xyz = [0.0, 0.0, 0.0]
        for k, a in enumerate(axes):
            xyz[a] = float(zyx[k])
        print(f"# shards at the plans' spacing (medssl lists X, Y, Z): --spacing {xyz[0]:.6g},{xyz[1]:.6g},{xyz[2]:.6g}",
              file=sys.stderr)
    print(note, file=sys.stderr)
    return 0
