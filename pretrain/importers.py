"""``python -m medssl.pretrain import NAME CHECKPOINT --out DIR``: official released checkpoints → our exports.

``hi_end_mae``: the authors' pretraining checkpoint (``{'state_dict': {'module.encoder.*', …}, 'epoch',
'optimizer', 'scaler'}``). The encoder uses timm's ViT names, as ours does, so ``module.encoder.X``
becomes ``X``; the decoder, the bridge projections, the mask token and the fixed sin-cos position
embedding (recomputed by our backbone) are left out, and the report says so. Loaded with
``torch.load(weights_only=True)``: a checkpoint that needs pickled objects is refused.

``mambamim``: the released encoder file (``*_mambamim_timm_style.pth``: flat ``embeddings.*`` and ``mae.*``)
becomes a ``hymamba3d`` export key for key, less the unused backward-branch tensors and the mask token.
"""

from __future__ import annotations

import argparse
import copy
import sys
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
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
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


def _import(checkpoint: str | Path, out: str | Path, recipe: str, convert, preprocessing: dict, left_out: str,
            log=print) -> Path:
    """An official checkpoint → ``convert`` (official keys → backbone name, kwargs, state, dropped keys) → an export;
    every converted key must fit the backbone. ``left_out`` says in words what the dropped keys were."""
    from .backbones import build_backbone
    from .export import diff_report, format_report, write_export

    checkpoint = Path(checkpoint)
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{checkpoint}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                         f"{exc}); only tensor checkpoints are accepted") from None
    name, kwargs, state, dropped = convert(_state_dict(ckpt))
    backbone = build_backbone(name, **kwargs)
    missing, unexpected, shaped = diff_report(backbone, state)
    if missing or unexpected or shaped:
        raise ValueError(f"{checkpoint}: converted keys do not fit {name}:\n{format_report(missing, unexpected, shaped)}")
    dest = write_export(out, name, backbone, state, {
        "recipe": recipe,
        "step": None,
        "samples_seen": None,
        "source": {"official_checkpoint": str(checkpoint.resolve()),
                   "epoch": int(ckpt["epoch"]) if isinstance(ckpt, dict) and "epoch" in ckpt else None,
                   "dropped_keys": len(dropped)},
        "preprocessing": dict(preprocessing),
    })
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


IMPORTERS = {"hi_end_mae": import_hi_end_mae, "mambamim": import_mambamim}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medssl.pretrain import",
                                description="Convert an official released checkpoint into a medssl export.")
    p.add_argument("name", choices=sorted(IMPORTERS), help="which method's checkpoint format")
    p.add_argument("checkpoint", help="the released .pth/.pt file")
    p.add_argument("--out", required=True, help="export folder to write")
    a = p.parse_args(argv)
    try:
        IMPORTERS[a.name](a.checkpoint, a.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
