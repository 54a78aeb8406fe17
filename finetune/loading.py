"""From what the user has to a segmentation network with a load report.

``--export`` may be

* a medssl export folder (``manifest.json`` + ``backbone.safetensors``; also what
  ``python -m medssl.pretrain import …`` writes for official checkpoints): the backbone is rebuilt from the
  manifest and every one of its keys must load (sha256 and format version checked first);
* a checkpoint file (``.safetensors``, or ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``)
  of MONAI's SwinUNETR or UNETR self-supervised weights: the MONAI network is built and its encoder
  loaded through the named key adapters of :mod:`finetune.adapters`.

``--init scratch`` builds the same network with the same seeds and loads nothing. The decoder is always
new; its initial weights depend only on ``train.seed``, so pretrained and scratch runs start from the
same decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medssl.pretrain.export import ExportError


def _report(source: str, loaded, new, dropped=(), notes=()):
    from .adapters import LoadReport

    return LoadReport(source=source, loaded=sorted(loaded), new=sorted(new), dropped=sorted(dropped), notes=list(notes))


def build(cfg, in_channels: int, out_channels: int, log=print):
    """(model, report, manifest | None, arch). Every failure to load names the file and the fix."""
    from .models import SegmentationNet, make_decoder

    crop = tuple(int(c) for c in cfg.data.crop_size)
    export = Path(cfg.export) if cfg.export else None
    pretrained = cfg.init == "pretrained"
    if export is None and pretrained:
        raise ValueError("--export is required for a pretrained run (or pass --init scratch with model.backbone=NAME)")
    if export is not None and export.is_file():
        return _build_monai(cfg, export, in_channels, out_channels, crop, pretrained)
    manifest = None
    if export is not None:
        from medssl.pretrain.export import read_manifest

        manifest = read_manifest(export)
        name, kwargs = manifest["backbone"]["name"], dict(manifest["backbone"]["kwargs"])
    else:
        name, kwargs = cfg.model.backbone, {}
        if not name:
            raise ValueError("--init scratch without --export needs model.backbone=NAME (python -m medssl.pretrain list)")
    notes = []
    trained_chans = int(kwargs.get("in_chans", 1))
    if "img_size" in kwargs and tuple(_as3(kwargs["img_size"])) != crop:
        notes.append(f"backbone built for {list(crop)} crops (pretrained on {list(_as3(kwargs['img_size']))}"
                     + ("; fixed sin-cos position embeddings follow the grid)" if "patch_size" in kwargs else ")"))
    if "img_size" in kwargs or export is None:
        kwargs["img_size"] = list(crop)
    kwargs["in_chans"] = in_channels
    from medssl.pretrain.backbones import build_backbone

    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(name, **kwargs)
    torch.manual_seed(cfg.train.seed + 1)  # the decoder's init depends on the seed only, not on the backbone
    component = ((manifest or {}).get("components") or {}).get("decoder")
    if component and cfg.model.arch in ("auto", "pretrained"):  # the export's own decoder (e.g. Volume Fusion)
        from medssl.pretrain.registry import DECODERS

        arch = component["registry"]
        decoder = DECODERS.build(arch, **{**component["kwargs"], "out_channels": out_channels})
        model = SegmentationNet(backbone, decoder, takes_image=False)
    else:
        arch, decoder = make_decoder(backbone, "auto" if cfg.model.arch == "pretrained" else cfg.model.arch,
                                     in_channels, out_channels, cfg)
        model = SegmentationNet(backbone, decoder)
        component = None
    model.backbone_name, model.arch = name, arch
    model.backbone_kwargs, model.component = dict(kwargs), component  # what `finetune predict` rebuilds from
    dec_keys = [f"decoder.{k}" for k in decoder.state_dict()]
    bb_keys = [f"backbone.{k}" for k in backbone.state_dict()]
    if not pretrained:
        return model, _report(f"scratch ({name})", [], bb_keys + dec_keys, notes=notes), manifest, arch
    from medssl.pretrain.export import STEM_KEYS, adapt_in_channels, diff_report, format_report, load_state

    loaded_decoder: list[str] = []
    if component:
        loaded_decoder = _load_component(export, component, decoder, notes)

    state = load_state(export, manifest)
    if in_channels != trained_chans:
        for key in [k for k in state if k.endswith(STEM_KEYS)]:
            state[key] = adapt_in_channels(state[key], in_channels)
        notes.append(f"stem repeated from {trained_chans} to {in_channels} input channel(s)")
    missing, unexpected, shaped = diff_report(backbone, state)
    if missing or unexpected or shaped:
        raise ExportError(f"{export}: the weights do not fit {name}:\n{format_report(missing, unexpected, shaped)}\n"
                          "(re-export the run, or pass the export that matches this manifest)")
    backbone.load_state_dict(state, strict=True)
    new = [k for k in dec_keys if k not in loaded_decoder]
    return model, _report(str(export), bb_keys + loaded_decoder, new, notes=notes), manifest, arch


def _load_component(export: Path, component: dict, module: torch.nn.Module, notes: list) -> list[str]:
    """Load a pretrained decoder: every key but its class head (re-initialised for the new classes) must fit."""
    from safetensors.torch import load_file

    from medssl.pretrain.export import diff_report, format_report
    from medssl.shards.verify import sha256_file

    path = export / component["file"]
    if not path.exists() or sha256_file(path) != component["sha256"]:
        raise ExportError(f"{path}: missing, or its sha256 differs from {export / 'manifest.json'} (re-export the run)")
    head = component.get("head", "head.")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(head)}
    missing, unexpected, shaped = diff_report(module, state)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected or shaped:
        raise ExportError(f"{path}: the decoder weights do not fit {component['registry']}:\n"
                          f"{format_report(missing, unexpected, shaped)}")
    module.load_state_dict(state, strict=False)  # every key but the head checked above
    notes.append(f"pretrained decoder {component['registry']} loaded ({len(state)} tensors); class head "
                 f"{head}* re-initialised for {module.out_channels if hasattr(module, 'out_channels') else '?'} classes")
    return [f"decoder.{k}" for k in state]


def _build_monai(cfg, path: Path, in_channels: int, out_channels: int, crop, pretrained: bool):
    from .adapters import build_monai_model, detect_arch, read_checkpoint

    state = read_checkpoint(path)
    arch = cfg.model.arch if cfg.model.arch.startswith("monai_") else detect_arch(state)
    if cfg.model.arch not in ("auto", arch):
        raise ValueError(f"model.arch={cfg.model.arch!r} cannot load {path}: checkpoint files are MONAI networks "
                         "(monai_swinunetr, monai_unetr); medssl exports are folders")
    torch.manual_seed(cfg.train.seed)
    fs = None if arch == "monai_swinunetr" else cfg.model.feature_size  # Swin: its width is read from the weights
    model, report = build_monai_model(arch, state, in_channels, out_channels, crop, feature_size=fs,
                                      source=str(path), load=pretrained)
    model.backbone_name, model.arch = arch, arch
    return model, report, None, arch


def _as3(v):
    return [int(v)] * 3 if isinstance(v, (int, float)) else [int(x) for x in v]
