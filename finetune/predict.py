"""``python -m medssl.finetune predict RUN --images DIR|FILE --out DIR``: segment new images with a run.

Everything comes from the run folder: ``network.json`` (also in the metadata of ``model_best.safetensors``)
names the backbone and its kwargs, the decoder, the channels and classes, the crop size and sliding window,
and the preprocessing (RAS, spacing, intensity window, modality). Each image is prepared as in training,
predicted with the same sliding window (:func:`finetune.evaluate.predict_probs`), and its label map is
written with the image's own shape and affine. Every input is checked before anything is written, the run
folder included: ``network.json`` field by field (:data:`SPEC`), the network sized on the meta device before
it is built, the weights' header against it before a tensor is read, NaN/inf weights refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from medssl.pretrain.manifest import (MAX_CHANNELS, MAX_MANIFEST_BYTES, MAX_SIDE, NAME_RE, Field, check_fields, load_json,
                                      parse_spacing)

NIFTI = (".nii", ".nii.gz")


class PredictError(ValueError):
    """Bad input to ``finetune predict``: the message names the file and the fix."""


# network.json (or the weights' metadata) is untrusted like an export's manifest: every field predict reads is
# checked against this table (pretrain/manifest.py's Field rules) before anything is built.
SPEC_FIX = "fine-tune again to remake the run folder (or restore its original network.json)"
SPEC: dict[str, Field] = {
    "format": Field("int", lo=1, hi=1),
    "backbone": Field("dict"),
    "backbone.name": Field("str", pattern=NAME_RE),
    "backbone.kwargs": Field("dict", null=True),
    "decoder": Field("dict"),
    "decoder.arch": Field("str", pattern=NAME_RE),
    "decoder.component": Field("dict", required=False, null=True),
    "decoder.component.registry": Field("str", pattern=NAME_RE),
    "decoder.component.kwargs": Field("dict"),
    "decoder.kwargs": Field("dict"),
    "decoder.kwargs.feature_size": Field("int", lo=1, hi=512),
    "decoder.kwargs.norm": Field("str", pattern=NAME_RE),
    "decoder.kwargs.res_block": Field("bool"),
    "in_channels": Field("int", lo=1, hi=MAX_CHANNELS),
    "out_channels": Field("int", lo=1, hi=1024),
    "classes": Field("dict"),
    "crop_size": Field("list", length=(3, 3), items=Field("int", lo=1, hi=MAX_SIDE)),
    "preprocessing": Field("dict"),
    "preprocessing.spacing": Field("spacing", null=True, gt=0.0, hi=100.0),
    "preprocessing.window_ct": Field("window", lo=-1e5, hi=1e5),
    "preprocessing.window_out": Field("window", lo=-1e4, hi=1e4),
    "modality": Field("str", hi=32, required=False, null=True),
    "eval": Field("dict"),
    "eval.overlap": Field("number", lo=0.0, hi=0.99),
    "eval.sw_batch": Field("int", lo=1, hi=1024),
    "eval.mode": Field("str", choices=("constant", "gaussian")),
}


def read_spec(run: Path) -> tuple[dict, str]:
    """The run's network description, every field checked (:data:`SPEC`), and where it was read from."""
    from safetensors import safe_open

    weights = run / "model_best.safetensors"
    if not weights.exists():
        raise PredictError(f"{weights} not found: {run} is not a fine-tuning run folder (or its training has not "
                           "validated yet); pass the --out folder of a fine-tuning run")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: not a safetensors file
        raise PredictError(f"{weights} is not a safetensors file ({' '.join(str(exc).split())[:200]}); "
                           f"{SPEC_FIX}") from None
    if "network" in meta:
        where = f"{weights} (metadata 'network')"
        if len(meta["network"]) > MAX_MANIFEST_BYTES:
            raise PredictError(f"{where}: {len(meta['network'])} characters, over {MAX_MANIFEST_BYTES}; {SPEC_FIX}")
        try:
            spec = json.loads(meta["network"])
        except (ValueError, RecursionError) as exc:
            raise PredictError(f"{where}: not JSON ({type(exc).__name__}: {str(exc)[:200]}); {SPEC_FIX}") from None
        if not isinstance(spec, dict):
            raise PredictError(f"{where}: holds a JSON {type(spec).__name__}, not an object; {SPEC_FIX}")
    elif (run / "network.json").exists():
        where = str(run / "network.json")
        spec = load_json(run / "network.json", "network description", SPEC_FIX, PredictError)
    else:
        raise PredictError(f"{weights} carries no network description and {run / 'network.json'} is missing (a run "
                           "made by an older medssl); fine-tune again to predict with it")
    check_fields(spec, SPEC, where, SPEC_FIX, error=PredictError)
    return spec, where


def build_network(spec: dict, where: str = "network.json") -> torch.nn.Module:
    """The fine-tuned network, from its description alone (weights not loaded). The description is checked
    first: the backbone's and the pretrained decoder's kwargs against their bounds, then the whole network is
    built on the meta device and sized, so nothing is allocated for a description that would not fit."""
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.manifest import MAX_PARAMETERS, meta_backbone, meta_decoder

    from .models import SegmentationNet, make_decoder

    bb = spec["backbone"]
    if bb.get("kwargs") is None:
        raise PredictError(f"the run's network ({bb['name']}) was built from a MONAI checkpoint; predict rebuilds "
                           "medssl exports only")
    meta_backbone(bb["name"], bb["kwargs"], where, "backbone.kwargs", SPEC_FIX, PredictError)
    dec = spec["decoder"]
    if dec.get("component"):
        comp = dec["component"]
        meta_decoder(comp["registry"], {**comp["kwargs"], "out_channels": spec["out_channels"]}, where,
                     "decoder.component.kwargs", SPEC_FIX, PredictError)

    def make() -> torch.nn.Module:
        backbone = build_backbone(bb["name"], **bb["kwargs"])
        if dec.get("component"):
            from medssl.pretrain.registry import DECODERS

            comp = dec["component"]
            decoder = DECODERS.build(comp["registry"], **{**comp["kwargs"], "out_channels": spec["out_channels"]})
            return SegmentationNet(backbone, decoder, takes_image=False)
        cfg = SimpleNamespace(model=SimpleNamespace(**dec["kwargs"]))
        _, decoder = make_decoder(backbone, dec["arch"], spec["in_channels"], spec["out_channels"], cfg)
        return SegmentationNet(backbone, decoder)

    try:
        with torch.device("meta"):
            size = sum(t.numel() for t in make().state_dict().values())
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, RuntimeError) as exc:
        raise PredictError(f"{where}: the network it describes does not build ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}); {SPEC_FIX}") from None
    if size > MAX_PARAMETERS:
        raise PredictError(f"{where}: the network it describes has {size:,} parameters, over {MAX_PARAMETERS:,}; "
                           f"{SPEC_FIX}")
    return make()


def find_images(images: str | Path, in_channels: int) -> dict[str, list[str]]:
    """``{case: [channel files]}``; nnU-Net ``_0000``, ``_0001`` … suffixes group channels of one case."""
    p = Path(images)
    if not p.exists():
        raise PredictError(f"{p}: no such file or folder (pass a NIfTI file or a folder of .nii/.nii.gz images)")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    bad = [f for f in files if not f.name.endswith(NIFTI)]
    if p.is_file() and bad:
        raise PredictError(f"{p}: not a NIfTI file (.nii/.nii.gz); convert it (e.g. dcm2niix) or pass a NIfTI image")
    files = [f for f in files if f.name.endswith(NIFTI)]
    if not files:
        raise PredictError(f"{p}: no NIfTI images (.nii/.nii.gz) found; pass a folder that holds them")
    cases: dict[str, list[str]] = {}
    for f in files:
        stem = f.name[:-7] if f.name.endswith(".nii.gz") else f.name[:-4]
        m = re.match(r"(.+)_(\d{4})$", stem)
        cases.setdefault(m.group(1) if m else stem, []).append(str(f))
    for key, chans in cases.items():
        if len(chans) != in_channels:
            raise PredictError(f"{chans[0]}: case {key} has {len(chans)} channel file(s), the network takes "
                               f"{in_channels} (name them {key}_0000.nii.gz, {key}_0001.nii.gz, …)")
    import nibabel as nib

    for chans in cases.values():
        for f in chans:
            try:
                img = nib.load(f)
                if len(img.shape) != 3:
                    raise PredictError(f"{f}: {len(img.shape)}-D image; predict takes 3-D volumes (one per channel)")
            except PredictError:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
                raise PredictError(f"{f}: cannot be read as NIfTI ({type(exc).__name__}: {exc}); re-save it") from None
    return cases


def predict_run(run: str | Path, images: str | Path, out: str | Path, device: str | None = None,
                allow_nonfinite: bool = False):
    """Predict every image; yields one line per written file. The run's description and weights are checked
    before anything is written: the weights' header against the network, and NaN/inf refused unless
    ``allow_nonfinite``."""
    from medssl.pretrain.export import load_weights
    from medssl.shards.crops import Window
    from medssl.shards.preprocess import prepare_volume

    from .evaluate import predict_probs, resample_to_original, write_nifti

    run, out = Path(run), Path(out)
    spec, where = read_spec(run)
    cases = find_images(images, int(spec["in_channels"]))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_network(spec, where)
    expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_weights(run / "model_best.safetensors", None, where, expect, allow_nonfinite,
                         "--allow-nonfinite", fix=SPEC_FIX, redo="fine-tune again (e.g. with a lower optim.lr)")
    model.load_state_dict(state, strict=True)
    model.to(dev).eval()
    pre = spec["preprocessing"]
    window = Window(ct=tuple(pre["window_ct"]), out=tuple(pre["window_out"]))
    cfg = SimpleNamespace(data=SimpleNamespace(crop_size=spec["crop_size"]), eval=SimpleNamespace(**spec["eval"]))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    spacing = parse_spacing(pre.get("spacing"))  # checked by read_spec: None, a number, three or a string
    for key, chans in sorted(cases.items()):
        prep = prepare_volume(chans, None, spec.get("modality"), target_spacing=spacing)
        probs = predict_probs(model, window.apply(prep.image, prep.meta), cfg, dev, autocast)
        orig = prep.meta["original"]
        labels = resample_to_original(probs, prep.meta["affine"], orig["affine"], orig["shape"])
        path = out / f"{key}.nii.gz"
        tmp = out / f".{key}.tmp.nii.gz"
        write_nifti(labels, orig["affine"], tmp, reference=chans[0])
        tmp.replace(path)
        found = ", ".join(f"{spec['classes'].get(str(c), c)} {int((labels == c).sum())}"
                          for c in range(1, int(spec["out_channels"])))
        yield f"{path}: {labels.shape} voxels; {found} voxels per class"
