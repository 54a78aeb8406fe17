"""``pretrain export RUN --format nnunet``: an ``nnunet_*`` export as the checkpoint nnU-Net's trainer loads.

``nnUNetv2_train DATASET CONFIGURATION FOLD -p PLANS -pretrained_weights FILE`` calls nnU-Net's
``load_pretrained_weights``: it reads ``FILE["network_weights"]`` and requires every key of the network it built
for the plans (its segmentation layers excepted) with the same shape. So the export's encoder (and, when the recipe
pretrained one, its ``nnunet`` decoder) is put back into the network built from the same plans architecture
(``dynamic-network-architectures``, as nnU-Net builds it), and that network's state dict less ``.seg_layers.`` is
written: nnU-Net's own key names, including the decoder's second view of the encoder (``decoder.encoder.*``).

An encoder-only recipe has no decoder to give: the decoder then holds nnU-Net's own initialisation (the file says so
under ``medssl.decoder``), which is what nnU-Net would have trained from anyway.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

NNUNET_FILE = "nnunet_pretrained.pth"


def export_nnunet(export_dir: str | Path, out: str | Path | None = None, log=print) -> Path:
    """Write ``export_dir/nnunet_pretrained.pth`` (or ``out``) from an ``nnunet_*`` export; returns the file."""
    from .backbones.nnunet import build_network
    from .export import MANIFEST_FILE, ExportError, load_state, load_weights, read_manifest

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    name, kwargs = manifest["backbone"]["name"], manifest["backbone"]["kwargs"]
    if not name.startswith("nnunet_"):
        raise ExportError(f"{export_dir}: the backbone is {name}, not an nnU-Net network; --format nnunet needs a run "
                          "with model.backbone=nnunet_resenc or nnunet_plain (built from your nnU-Net plans)")
    arch, in_chans = kwargs["architecture"], int(kwargs.get("in_chans", 1))
    decoder = (manifest.get("components") or {}).get("decoder")
    if decoder is not None and decoder.get("registry") != "nnunet":
        raise ExportError(f"{export_dir}: the decoder component is {decoder.get('registry')!r}, not nnU-Net's; pretrain "
                          "with task.decoder=nnunet")
    classes = int(decoder["kwargs"]["out_channels"]) if decoder else 1
    net = build_network(arch, in_chans, classes)
    encoder = load_state(export_dir, manifest, log=log)
    got = net.load_state_dict(encoder, strict=False)
    if got.unexpected_keys:
        raise ExportError(f"{export_dir}: backbone keys {got.unexpected_keys[:3]} are not in the network the plans "
                          f"architecture builds; {MANIFEST_FILE} and the weights disagree")
    source = "nnU-Net's initialisation (the recipe pretrains the encoder only)"
    if decoder:
        expect = {k[len("decoder."):]: tuple(v.shape) for k, v in net.state_dict().items()
                  if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
        state = load_weights(export_dir / decoder["file"], decoder["sha256"], export_dir / MANIFEST_FILE, expect,
                             log=log)
        net.decoder.load_state_dict(state, strict=False)  # every key checked above; the encoder view is shared
        source = f"pretrained ({manifest.get('recipe', '?')})"
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in net.state_dict().items()
               if ".seg_layers." not in k}
    dest = Path(out) if out else export_dir / NNUNET_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    info = {"backbone": name, "plans_name": kwargs.get("plans_name", ""), "configuration": kwargs.get("configuration", ""),
            "recipe": manifest.get("recipe", ""), "step": manifest.get("step"), "decoder": source,
            "network_class_name": arch["network_class_name"]}
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save({"network_weights": weights, "medssl": info}, tmp)  # tensors and plain values: weights_only loads it
    tmp.replace(dest)
    log(f"wrote {dest} ({len(weights)} tensors in nnU-Net's names; segmentation layers left out; decoder: {source})")
    log("fine-tune it with nnU-Net:\n  " + train_command(kwargs, dest))
    return dest


def train_command(kwargs: dict, weights: Path) -> str:
    """The ``nnUNetv2_train`` line for the plans the backbone was built from."""
    dataset = kwargs.get("dataset_name", "") or ""
    m = re.match(r"Dataset(\d+)_", dataset)
    ident = m.group(1) if m else "DATASET_ID"
    plans = kwargs.get("plans_name") or "PLANS_NAME"
    conf = kwargs.get("configuration") or "3d_fullres"
    return f"nnUNetv2_train {ident} {conf} FOLD -p {plans} -pretrained_weights {weights.resolve()}"
