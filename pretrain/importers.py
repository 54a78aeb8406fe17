"""``python -m medssl.pretrain import NAME CHECKPOINT --out DIR``: official released checkpoints → our exports.

``hi_end_mae``: the authors' pretraining checkpoint (``{'state_dict': {'module.encoder.*', …}, 'epoch',
'optimizer', 'scaler'}``). The encoder uses timm's ViT names, as ours does, so ``module.encoder.X``
becomes ``X``; the decoder, the bridge projections, the mask token and the fixed sin-cos position
embedding (recomputed by our backbone) are left out, and the report says so. Loaded with
``torch.load(weights_only=True)``: a checkpoint that needs pickled objects is refused.

``mambamim``: the released encoder file (``*_mambamim_timm_style.pth``: flat ``embeddings.*`` and ``mae.*``)
becomes a ``hymamba3d`` export key for key, less the unused backward-branch tensors and the mask token.

``volume_fusion``: MIS-FM's released FMUNet (``fmunet_abd1k_volf.pt``, written by PyMIC's training agent:
``{'iteration', 'valid_pred', 'model_state_dict': {'project.*', 'encoder.*', 'decoder.*', 'out_layers.*'},
'optimizer_state_dict'}``) becomes a ``resenc3d`` export with the ``fmunet`` decoder as its ``decoder`` component
— the whole pretrained segmentation network, as a ``volume_fusion`` run exports it. FMUNet's output layer
(``out_layers.0``, the Volume Fusion classes) is kept as the decoder's ``head``; fine-tuning re-initialises its
class conv for the new classes. The three deep-supervision heads (``out_layers.1-3``) are left out.

Every importer reads with ``torch.load(weights_only=True)`` (numpy scalars, such as PyMIC's ``valid_pred``, are
the only extra types allowed), checks that every converted tensor fits the network before anything is written,
and writes the export into a temporary folder beside ``--out`` that is moved into place once complete: a
refused checkpoint leaves no folder behind.
"""

from __future__ import annotations

import argparse
import copy
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# what the official preprocessing was (Hi-End-MAE README: 96³ crops, [-175, 250] HU, 1.5 mm)
HI_END_MAE_PREPROCESSING = {
    "orientation": "RAS",
    "spacing": "1.5",
    "crop_size": [96, 96, 96],
    "intensity": {"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}},
}


def _state_dict(ckpt) -> dict:
    """The parameters of a checkpoint: under ``model_state_dict`` (PyMIC), ``state_dict``, ``model`` or ``module``,
    or the checkpoint itself."""
    for key in ("model_state_dict", "state_dict", "model", "module"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict of named tensors")
    return ckpt


def convert_hi_end_mae(state: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, torch.Tensor], list[str]]:
    """Official keys → (backbone name, kwargs, backbone state, dropped keys)."""
    from .backbones import BACKBONES, build_backbone

    out, dropped = {}, []
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = value
        else:
            dropped.append(key)
    if "patch_embed.proj.weight" not in out:
        raise ValueError("no 'module.encoder.patch_embed.proj.weight' in the checkpoint: not a Hi-End-MAE encoder")
    dim, in_chans, patch = out["patch_embed.proj.weight"].shape[:3]
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    for name in BACKBONES.names():
        if not name.startswith("vit3d_"):
            continue
        with torch.device("meta"):
            cand = build_backbone(name, in_chans=int(in_chans))
        if (cand.embed_dim, cand.patch_size, len(cand.blocks)) == (dim, patch, depth):
            return name, {"in_chans": int(in_chans)}, out, dropped
    raise ValueError(f"no registered vit3d with width {dim}, patch {patch}, depth {depth}")


def _numpy_scalar_globals() -> list:
    """What a checkpoint needs to hold numpy scalars (PyMIC saves its validation Dice, ``valid_pred``, as one): the
    scalar constructor under numpy 1's and numpy 2's module names, ``numpy.dtype`` and the dtype classes numpy 2
    pickles. They rebuild a number from its bytes and run no other code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float16DType", "Float32DType", "Float64DType", "Int32DType", "Int64DType", "BoolDType"):
        if hasattr(dtypes, name):
            out.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return out


def _load_checkpoint(checkpoint: Path):
    """``torch.load(weights_only=True)``: tensors, containers, numbers and numpy scalars; anything else refused."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{checkpoint}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                         f"{_first_line(exc)}); only tensor checkpoints are accepted") from None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The informative line of an exception: torch's weights_only refusal names the global it would not load on a
    later line ("Unsupported global: GLOBAL argparse.Namespace …")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if "Unsupported global" in line or "GLOBAL " in line]
    return (named or lines or [""])[0].split(". Please use")[0][:limit]  # not torch's advice to allowlist it


def _check_fits(checkpoint: Path, what: str, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from .export import diff_report, format_report

    missing, unexpected, shaped = diff_report(module, state)
    if missing or unexpected or shaped:
        raise ValueError(f"{checkpoint}: converted keys do not fit {what}:\n{format_report(missing, unexpected, shaped)}")


def _write_staged(out: str | Path, write) -> Path:
    """``write(folder)`` into a temporary folder beside ``out``, then moved into place as ``out`` (which must not exist
    or be empty: an earlier export or anything else there is never replaced). A failure while writing leaves ``out``
    as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise ValueError(f"--out {out} already holds files ({held}{', …' if len(list(out.iterdir())) > 3 else ''}); "
                         "nothing there is replaced: give a new folder, or move that one away first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from the group once moved into place
    try:
        write(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)  # a folder that appeared meanwhile (and is not empty) makes this fail: nothing replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _source(checkpoint: Path, ckpt, dropped: list[str]) -> dict:
    """The manifest's ``source``: the official file, its epoch or iteration and validation score (PyMIC's
    ``valid_pred``, the pretext task's Dice) where it records them, how many keys were left out."""
    src = {"official_checkpoint": str(checkpoint.resolve())}
    for key, cast in (("epoch", int), ("iteration", int), ("valid_pred", float)):
        value = ckpt.get(key) if isinstance(ckpt, dict) else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
            src[key] = cast(value)
        elif key == "epoch":
            src[key] = None
    src["dropped_keys"] = len(dropped)
    return src


def _import(checkpoint: str | Path, out: str | Path, recipe: str, convert, preprocessing: dict, left_out: str,
            log=print) -> Path:
    """An official checkpoint → ``convert`` (official keys → backbone name, kwargs, state, dropped keys) → an export;
    every converted key must fit the backbone. ``left_out`` says in words what the dropped keys were."""
    from .backbones import build_backbone
    from .export import write_export

    checkpoint = Path(checkpoint)
    ckpt = _load_checkpoint(checkpoint)
    try:
        name, kwargs, state, dropped = convert(_state_dict(ckpt))
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    with torch.device("meta"):
        backbone = build_backbone(name, **kwargs)
    _check_fits(checkpoint, name, backbone, state)
    dest = _write_staged(out, lambda folder: write_export(folder, name, backbone, state, {
        "recipe": recipe,
        "step": None,
        "samples_seen": None,
        "source": _source(checkpoint, ckpt, dropped),
        "preprocessing": copy.deepcopy(preprocessing),
    }))
    log(f"imported {len(state)} encoder tensors into {name}; left out {len(dropped)} keys ({left_out}) -> {dest}")
    return dest


def import_hi_end_mae(checkpoint: str | Path, out: str | Path, log=print) -> Path:
    return _import(checkpoint, out, "hi_end_mae", convert_hi_end_mae, HI_END_MAE_PREPROCESSING,
                   "decoder, bridge projections, mask token, fixed position embeddings", log)


# MambaMIM's pretraining data (utils/med_dataset.py: RAS, 1.5 mm, 96³, [-175, 250] HU -> [0, 1])
MAMBAMIM_PREPROCESSING = copy.deepcopy(HI_END_MAE_PREPROCESSING)  # equal today; a copy so one can change alone


def convert_mambamim(state: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, torch.Tensor], list[str]]:
    """The released ``*_mambamim_timm_style.pth`` (flat ``embeddings.*`` / ``mae.*``, optionally under
    ``sparse_encoder.`` or ``module.``) → (``hymamba3d``, kwargs, backbone state, dropped keys). Dropped: the
    Mamba blocks' unused backward branch (``*_b*``: never trained by the one-directional scan), ``mae.mask_token``
    (pretraining only), ``mae.pos_embed`` (the fixed sin-cos table, recomputed), and anything outside the encoder."""
    from .backbones.hymamba3d import OFFICIAL_UNUSED

    out, dropped, pos = {}, [], None
    for key, value in state.items():
        k = key
        for prefix in ("module.", "sparse_encoder."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k == "mae.pos_embed":
            pos = value
        if not k.startswith(("embeddings.", "mae.")) or any(u in k for u in OFFICIAL_UNUSED):
            dropped.append(key)
            continue
        out[k] = value
    if "embeddings.stem.weight" not in out:
        raise ValueError("no 'embeddings.stem.weight' in the checkpoint: not a MambaMIM encoder "
                         "(expected the released *_mambamim_timm_style.pth)")
    in_chans = int(out["embeddings.stem.weight"].shape[1])
    side = round((pos.shape[1] if pos is not None else 216) ** (1 / 3))  # the token grid it was pretrained on
    return "hymamba3d", {"in_chans": in_chans, "img_size": 16 * side}, out, dropped


def import_mambamim(checkpoint: str | Path, out: str | Path, log=print) -> Path:
    dest = _import(checkpoint, out, "mambamim", convert_mambamim, MAMBAMIM_PREPROCESSING,
                   "the Mamba blocks' unused backward branch, the pretraining mask token, the fixed position table", log)
    log("note: the release's embeddings.encoder1.* (the 96³ skip) hold their initialisation: the official "
        "pretraining computes that skip and never reads it, so fine-tuning trains it from there")
    return dest


# MIS-FM's Volume Fusion data. The authors publish the preprocessing of their VolF pretraining in PyMIC_examples
# (seg_self_sup/lung/luna_preprocess.py: HU clipped to [-1000, 1000] and scaled to [-1, 1], each volume kept at its
# own spacing, no resampling) and the patch in its configs (config/luna_pretrain/unet3d_volf.cfg
# Crop4VolumeFusion_output_size and MIS-FM demo/fmunet_pretrain.cfg patch_size: [64, 128, 128] as D, H, W, i.e.
# [128, 128, 64] in our X, Y, Z order). The AbdomenCT-1K configuration of the released FMUNet is not published;
# these are the values of the published pipeline. Fine-tuning reads them from the manifest (data.spacing /
# data.window_* override them).
VOLUME_FUSION_PREPROCESSING = {
    "orientation": "RAS",
    "spacing": "native",
    "crop_size": [128, 128, 64],
    "intensity": {"CT": {"window": [-1000.0, 1000.0], "out": [-1.0, 1.0], "clip": True}},
}

# FMUNet (MIS-FM net/fmunet.py, = PyMIC pymic/net/net3d/fmunet.py) → resenc3d + the fmunet decoder. In FMUNet a
# ResConv unit is Sequential(InstanceNorm3d 0, LeakyReLU 1, Dropout 2, Conv3d 3), DownSample.down and the UpCatConv
# parts are Sequential(InstanceNorm3d 0, LeakyReLU 1, Conv3d 2[, Upsample 3]); ours name the same layers norm/conv.
_NORM_CONV = {"0": "norm", "2": "conv"}
_UNIT = {"0": "norm", "3": "conv"}
_FMUNET_PATTERN = re.compile(
    r"(?P<project>project)\.(?P<p>weight|bias)$"
    r"|encoder\.en_conv(?P<ei>\d+)\.conv_list\.(?P<ej>\d+)\.(?P<el>[03])\.(?P<e>weight|bias)$"
    r"|encoder\.down(?P<di>\d+)\.down\.(?P<dl>[02])\.(?P<d>weight|bias)$"
    r"|decoder\.de_conv(?P<ci>\d+)\.conv_list\.(?P<cj>\d+)\.(?P<cl>[03])\.(?P<c>weight|bias)$"
    r"|decoder\.upcat(?P<ui>\d+)\.(?P<part>up|conv)\.(?P<ul>[02])\.(?P<u>weight|bias)$"
    r"|out_layers\.(?P<oi>\d+)\.(?P<ol>[02])\.(?P<o>weight|bias)$")
FMUNET_EXAMPLE = ("PyMIC's {'model_state_dict': {'project.weight', 'encoder.en_conv0.conv_list.0.0.weight', …, "
                  "'decoder.upcat0.up.2.weight', …, 'out_layers.0.2.weight'}, 'iteration', …}")


def fmunet_key(key: str, levels: int) -> tuple[str, str] | None:
    """An official FMUNet parameter name → ``("backbone" | "decoder", our key)``, ``("dropped", key)`` for the
    deep-supervision heads ``out_layers.1-3``, or None for a name FMUNet does not have. ``levels``: the number of
    resolution levels (FMUNet: 5), which tells the bottleneck ``de_conv{levels-1}`` from the other levels."""
    m = _FMUNET_PATTERN.match(key)
    if m is None:
        return None
    g = m.groupdict()
    if g["project"]:
        return "backbone", f"stem.{g['p']}"
    if g["ei"] is not None:
        return "backbone", f"stages.{g['ei']}.blocks.{g['ej']}.layers.0.{_UNIT[g['el']]}.{g['e']}"
    if g["di"] is not None:
        return "backbone", f"stages.{int(g['di']) + 1}.down.{_NORM_CONV[g['dl']]}.{g['d']}"
    if g["ci"] is not None:
        where = "bottleneck" if int(g["ci"]) == levels - 1 else f"levels.{g['ci']}.blocks"
        return "decoder", f"{where}.{g['cj']}.layers.0.{_UNIT[g['cl']]}.{g['c']}"
    if g["ui"] is not None:
        return "decoder", f"levels.{g['ui']}.{'up' if g['part'] == 'up' else 'fuse'}.{_NORM_CONV[g['ul']]}.{g['u']}"
    if g["oi"] == "0":
        return "decoder", f"head.{_NORM_CONV[g['ol']]}.{g['o']}"
    return "dropped", key


def _fmunet_shape(state: dict, key: str, dims: int, what: str, first: str | None) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"no '{key}' ({what}): not an FMUNet checkpoint; expected {FMUNET_EXAMPLE}"
                         + (f"; its first key is '{first}'" if first is not None else "; its state dict is empty"))
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        got = f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"'{key}' ({what}) is {got}; FMUNet's has {dims} dimensions")
    return tuple(value.shape)


def convert_volume_fusion(state: dict[str, torch.Tensor]
                          ) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """MIS-FM's FMUNet state dict (official names, optionally under ``module.``) → (``resenc3d``, kwargs, backbone
    state, ``fmunet`` decoder state, dropped keys).

    Mapping: ``project`` → ``stem``; ``encoder.en_conv{i}.conv_list.{j}.{0,3}`` → ``stages.{i}.blocks.{j}.layers.0.
    {norm,conv}``; ``encoder.down{i}.down.{0,2}`` → ``stages.{i+1}.down.{norm,conv}``; decoder ``de_conv4`` →
    ``bottleneck``, ``de_conv{i}`` → ``levels.{i}.blocks``, ``upcat{i}.up`` → ``levels.{i}.up``, ``upcat{i}.conv``
    → ``levels.{i}.fuse``; ``out_layers.0`` (the output layer) → the decoder's ``head``; ``out_layers.1-3`` (deep
    supervision) dropped. Widths (``feature_chns``), ``in_chns``, ``depth`` and ``class_num`` are read from the
    shapes; dropout (no tensor) is FMUNet's default, 0.2 on the three deepest levels. Only the isotropic FMUNet
    (``res_mode`` 0, 3³ kernels) is accepted. A key FMUNet does not have, a shape that does not fit, or a missing
    tensor is refused, naming the key and what was expected."""
    from .backbones import build_backbone
    from .registry import DECODERS

    original = {(k[len("module."):] if k.startswith("module.") else k): k for k in state}  # DataParallel's prefix
    state = {k: state[o] for k, o in original.items()}
    first = next(iter(original.values()), None)
    project = _fmunet_shape(state, "project.weight", 5, "the input convolution", first)
    if project[2:] != (3, 3, 3):
        raise ValueError(f"'project.weight' has kernel {list(project[2:])}: an FMUNet with res_mode 1 or 2 (2D "
                         f"kernels on the finest levels); resenc3d is FMUNet's isotropic res_mode 0 (3x3x3 kernels)")
    widths = []
    while f"encoder.en_conv{len(widths)}.conv_list.0.0.weight" in state:
        key = f"encoder.en_conv{len(widths)}.conv_list.0.0.weight"
        widths.append(_fmunet_shape(state, key, 1, f"level {len(widths)}'s first norm", first)[0])
    if len(widths) < 2:
        _fmunet_shape(state, f"encoder.en_conv{len(widths)}.conv_list.0.0.weight", 1, "an encoder level's first norm",
                      first)
    depth = 0
    while f"encoder.en_conv0.conv_list.{depth}.0.weight" in state:
        depth += 1
    classes = _fmunet_shape(state, "out_layers.0.2.weight", 5, "the output layer's class conv", first)[0]
    in_chans = project[1]
    hyper = f"FMUNet with in_chns {in_chans}, feature_chns {widths}, depth {depth}, class_num {classes}"

    kwargs = {"img_size": list(VOLUME_FUSION_PREPROCESSING["crop_size"]), "in_chans": int(in_chans),
              "channels": [int(c) for c in widths], "blocks_per_level": depth, "convs_per_block": 1}
    with torch.device("meta"):
        backbone = build_backbone("resenc3d", **kwargs)
        decoder = DECODERS.build("fmunet", backbone.feature_channels, backbone.feature_strides, int(classes),
                                 blocks_per_level=depth)
    want = {"backbone": {k: tuple(v.shape) for k, v in backbone.state_dict().items()},
            "decoder": {k: tuple(v.shape) for k, v in decoder.state_dict().items()}}
    out: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "decoder": {}}
    dropped = []
    for key, value in state.items():
        shown = original[key]  # the name as the file spells it
        place = fmunet_key(key, len(widths))
        if place is not None and place[0] == "dropped":
            i = int(key.split(".")[1])
            if not 1 <= i < min(4, len(widths)):
                place = None
            else:
                dropped.append(shown)
                continue
        if place is None or place[1] not in want[place[0]]:
            raise ValueError(f"'{shown}' is not a parameter of {hyper}: not an FMUNet checkpoint, or a modified one "
                             f"(expected names such as 'encoder.en_conv0.conv_list.0.0.weight', "
                             f"'decoder.upcat0.conv.2.weight', 'out_layers.0.2.weight')")
        part, ours = place
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"'{shown}' holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != want[part][ours]:
            raise ValueError(f"'{shown}' has shape {list(value.shape)}; {hyper} expects {list(want[part][ours])} "
                             f"(our {part} key {ours})")
        out[part][ours] = value
    for part in ("backbone", "decoder"):
        for ours, shape in want[part].items():
            if ours not in out[part]:
                official = next((k for k in _fmunet_official_keys(len(widths), depth)
                                 if fmunet_key(k, len(widths)) == (part, ours)), ours)
                raise ValueError(f"'{official}' is missing: {hyper} has it, shape {list(shape)}")
    return "resenc3d", kwargs, out["backbone"], out["decoder"], dropped


def _fmunet_official_keys(levels: int, depth: int) -> list[str]:
    """Every parameter name of an FMUNet with ``levels`` levels and ``depth`` units per ResConv, in the order of its
    state dict."""
    wb = ("weight", "bias")
    keys = [f"project.{p}" for p in wb]
    keys += [f"encoder.en_conv{i}.conv_list.{j}.{layer}.{p}" for i in range(levels) for j in range(depth)
             for layer in (0, 3) for p in wb]
    keys += [f"encoder.down{i}.down.{layer}.{p}" for i in range(levels - 1) for layer in (0, 2) for p in wb]
    keys += [f"decoder.upcat{i}.{part}.{layer}.{p}" for i in range(levels - 1) for part in ("up", "conv")
             for layer in (0, 2) for p in wb]
    keys += [f"decoder.de_conv{i}.conv_list.{j}.{layer}.{p}" for i in range(levels) for j in range(depth)
             for layer in (0, 3) for p in wb]
    keys += [f"out_layers.{i}.{layer}.{p}" for i in range(min(4, levels)) for layer in (0, 2) for p in wb]
    return keys


def import_volume_fusion(checkpoint: str | Path, out: str | Path, log=print) -> Path:
    """The released FMUNet → a ``volume_fusion`` export: ``backbone.safetensors`` (``resenc3d``) and
    ``decoder.safetensors`` (the ``fmunet`` decoder with FMUNet's output layer as its head), listed under the
    manifest's ``components`` as a ``volume_fusion`` run writes them."""
    from .export import write_component, write_export
    from .backbones import build_backbone
    from .registry import DECODERS

    checkpoint = Path(checkpoint)
    ckpt = _load_checkpoint(checkpoint)
    try:
        name, kwargs, state, dec_state, dropped = convert_volume_fusion(_state_dict(ckpt))
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    with torch.device("meta"):
        backbone = build_backbone(name, **kwargs)
        decoder = DECODERS.build("fmunet", backbone.feature_channels, backbone.feature_strides,
                                 int(dec_state["head.conv.weight"].shape[0]), blocks_per_level=kwargs["blocks_per_level"])
    decoder.registry_name = "fmunet"
    _check_fits(checkpoint, name, backbone, state)
    _check_fits(checkpoint, "the fmunet decoder", decoder, dec_state)

    def write(folder: Path) -> None:
        components = {"decoder": write_component(folder, "decoder", decoder, dec_state)}
        write_export(folder, name, backbone, state, {
            "components": components,
            "recipe": "volume_fusion",
            "step": None,
            "samples_seen": None,
            "source": _source(checkpoint, ckpt, dropped),
            "preprocessing": copy.deepcopy(VOLUME_FUSION_PREPROCESSING),
        })

    dest = _write_staged(out, write)
    log(f"imported {len(state)} encoder tensors into {name} and {len(dec_state)} decoder tensors into fmunet "
        f"(FMUNet's output layer kept as the decoder's head: {decoder.out_channels} classes; fine-tuning "
        f"re-initialises its class conv head.conv.*); left out {len(dropped)} keys (out_layers.1-3, the "
        f"deep-supervision heads) -> {dest}")
    return dest


IMPORTERS = {"hi_end_mae": import_hi_end_mae, "mambamim": import_mambamim, "volume_fusion": import_volume_fusion}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain import",
                                description="Convert an official released checkpoint into a medssl export.")
    p.add_argument("name", choices=sorted(IMPORTERS),
                   help="which release: hi_end_mae (the Hi-End-MAE pretraining checkpoint), mambamim (the "
                        "*_mambamim_timm_style.pth encoder), volume_fusion (MIS-FM's FMUNet, fmunet_abd1k_volf.pt: "
                        "encoder and decoder)")
    p.add_argument("checkpoint", help="the released .pth/.pt file")
    p.add_argument("--out", required=True, help="export folder to write")
    a = p.parse_args(argv)
    try:
        IMPORTERS[a.name](a.checkpoint, a.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
