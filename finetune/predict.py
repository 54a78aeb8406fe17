"""``python -m medssl.finetune predict RUN --images DIR|FILE --out DIR``: segment new images with a run.

Everything comes from the run folder: ``network.json`` (also in the metadata of ``model_best.safetensors``)
names the backbone and its kwargs, the decoder, the channels and classes, the crop size and sliding window,
and the preprocessing (RAS, spacing, intensity window, modality). Each image is prepared as in training,
predicted with the same sliding window (:func:`finetune.evaluate.predict_probs`), and its label map is
written with the image's own shape and affine. Every input is checked before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

NIFTI = (".nii", ".nii.gz")


class PredictError(ValueError):
    """Bad input to ``finetune predict``: the message names the file and the fix."""


def read_spec(run: Path) -> dict:
    from safetensors import safe_open

    weights = run / "model_best.safetensors"
    if not weights.exists():
        raise PredictError(f"{weights} not found: {run} is not a fine-tuning run folder (or its training has not "
                           "validated yet); pass the --out folder of a fine-tuning run")
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "network" in meta:
        return json.loads(meta["network"])
    if (run / "network.json").exists():
        return json.loads((run / "network.json").read_text())
    raise PredictError(f"{weights} carries no network description and {run / 'network.json'} is missing (a run "
                       "made by an older medssl); fine-tune again to predict with it")


def build_network(spec: dict) -> torch.nn.Module:
    """The fine-tuned network, from its description alone (weights not loaded)."""
    from medssl.pretrain.backbones import build_backbone

    from .models import SegmentationNet, make_decoder

    bb = spec["backbone"]
    if bb.get("kwargs") is None:
        raise PredictError(f"the run's network ({bb['name']}) was built from a MONAI checkpoint; predict rebuilds "
                           "medssl exports only")
    backbone = build_backbone(bb["name"], **bb["kwargs"])
    dec = spec["decoder"]
    if dec.get("component"):
        from medssl.pretrain.registry import DECODERS

        comp = dec["component"]
        decoder = DECODERS.build(comp["registry"], **{**comp["kwargs"], "out_channels": spec["out_channels"]})
        return SegmentationNet(backbone, decoder, takes_image=False)
    cfg = SimpleNamespace(model=SimpleNamespace(**dec["kwargs"]))
    _, decoder = make_decoder(backbone, dec["arch"], spec["in_channels"], spec["out_channels"], cfg)
    return SegmentationNet(backbone, decoder)


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


def predict_run(run: str | Path, images: str | Path, out: str | Path, device: str | None = None):
    """Predict every image; yields one line per written file."""
    from safetensors.torch import load_file

    from medssl.shards.crops import Window
    from medssl.shards.preprocess import prepare_volume

    from .evaluate import predict_probs, resample_to_original, write_nifti

    run, out = Path(run), Path(out)
    spec = read_spec(run)
    cases = find_images(images, int(spec["in_channels"]))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_network(spec)
    model.load_state_dict(load_file(str(run / "model_best.safetensors")), strict=True)
    model.to(dev).eval()
    pre = spec["preprocessing"]
    window = Window(ct=tuple(pre["window_ct"]), out=tuple(pre["window_out"]))
    cfg = SimpleNamespace(data=SimpleNamespace(crop_size=spec["crop_size"]), eval=SimpleNamespace(**spec["eval"]))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    spacing = tuple(pre["spacing"]) if pre.get("spacing") else None
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
