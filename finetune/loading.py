"""From what the user has to a segmentation network with a load report.

``--export`` may be

* a medssl export folder (``manifest.json`` + ``backbone.safetensors``; also what
  ``python -m medssl.pretrain import …`` writes for official checkpoints): the backbone is rebuilt from the
  manifest and every one of its keys must load. The export is untrusted input: every manifest field is checked
  (``pretrain/manifest.py``), the weights' sha256 and safetensors header before any tensor is read, and weights
  holding NaN/inf are refused unless ``model.allow_nonfinite=true``. :func:`check_export` runs these checks
  before the command touches the run folder;
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


NONFINITE_FLAG = "model.allow_nonfinite=true"  # the fine-tuning override that lets NaN/inf weights load


def check_export(cfg, log=print) -> dict | None:
    """Everything about an export folder that can refuse a run, checked before the run folder is touched: the
    manifest field by field, and for a pretrained run the weights :func:`build` will load (sha256, header against
    the network, NaN/inf). Returns the manifest (None for a checkpoint file or no export)."""
    from medssl.pretrain.export import MANIFEST_FILE, load_state, load_weights
    from medssl.pretrain.manifest import read

    export = Path(cfg.export) if cfg.export else None
    if export is None or export.is_file():
        return None
    manifest, metas = read(export)
    if cfg.init != "pretrained":
        return manifest
    shapes = {k: tuple(v.shape) for k, v in metas["backbone"].state_dict().items()}
    load_state(export, manifest, cfg.model.allow_nonfinite, shapes, NONFINITE_FLAG, log=log)
    component = (manifest.get("components") or {}).get("decoder")
    if component and cfg.model.arch in ("auto", "pretrained"):
        meta = metas["components"]["decoder"]
        load_weights(export / component["file"], component["sha256"], export / MANIFEST_FILE,
                     {k: tuple(v.shape) for k, v in meta.state_dict().items()}, cfg.model.allow_nonfinite,
                     NONFINITE_FLAG, skip=(component.get("head", "head."),), log=log)
    return manifest


def build(cfg, in_channels: int, out_channels: int, log=print):
    """(model, report, manifest | None, arch). Every failure to load names the file and the fix.

    An export folder's manifest is checked field by field and the network it describes is sized on the meta
    device before anything is allocated; the weights' header is checked against the built network before a
    tensor is read, and weights holding NaN/inf are refused unless ``model.allow_nonfinite``."""
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
        from medssl.pretrain.manifest import read

        manifest, _ = read(export)
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
    from medssl.pretrain.manifest import meta_backbone

    # the crop and channels of this run are checked like the manifest's before the backbone is allocated
    if export is not None:
        where, fix = str(export / "manifest.json"), "choose a data.crop_size / model.in_channels within these bounds"
    else:
        where = f"model.backbone={name}"
        fix = ("choose a registered backbone (python -m medssl.pretrain list) and a data.crop_size / "
               "model.in_channels within these bounds")
    pretrained_kwargs = {**kwargs, "in_chans": trained_chans}  # the backbone the export's weights were made for
    meta = meta_backbone(name, kwargs, where, "backbone.kwargs", fix=fix)
    if hasattr(meta, "num_prefix_tokens"):  # a ViT: fine-tuned as the official UNETR builds it (config.py)
        kwargs["cls_token"] = cfg.model.cls_token == "keep" and bool(kwargs.get("cls_token", True))
        kwargs["pos_embed"] = cfg.model.pos_embed
        # departure: the official downstream ViT is MONAI's (LayerNorm eps 1e-5); ours keeps the encoder's 1e-6
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
        loaded_decoder = _load_component(export, component, decoder, notes, cfg.model.allow_nonfinite, log)

    # the header must fit this backbone as pretrained: the stem with the channels it was trained on, its own
    # cls token and position embedding
    expect = {k: tuple(t.shape) for k, t in meta_backbone(name, pretrained_kwargs, str(export / "manifest.json"),
                                                           "backbone.kwargs", fix=fix).state_dict().items()}
    state = load_state(export, manifest, cfg.model.allow_nonfinite, expect, NONFINITE_FLAG, log=log)
    if in_channels != trained_chans:
        for key in [k for k in state if k.endswith(STEM_KEYS)]:
            state[key] = adapt_in_channels(state[key], in_channels)
        notes.append(f"stem repeated from {trained_chans} to {in_channels} input channel(s)")
    state, filled, dropped = fit_vit_tokens(backbone, state, notes)
    missing, unexpected, shaped = diff_report(backbone, state)
    if missing or unexpected or shaped:
        raise ExportError(f"{export}: the weights do not fit {name}:\n{format_report(missing, unexpected, shaped)}\n"
                          "(re-export the run, or pass the export that matches this manifest)")
    backbone.load_state_dict(state, strict=True)
    new = [k for k in dec_keys if k not in loaded_decoder] + [f"backbone.{k}" for k in filled]
    loaded = [k for k in bb_keys if k[len("backbone."):] not in filled]
    return (model, _report(str(export), loaded + loaded_decoder, new, [f"backbone.{k}" for k in dropped], notes),
            manifest, arch)


def fit_vit_tokens(backbone: torch.nn.Module, state: dict, notes: list) -> tuple[dict, list[str], list[str]]:
    """The pretrained ViT's tokens → the fine-tuned ViT's: its cls token dropped when the network has none, a
    learned position embedding started from the sin-cos the export was pretrained with (the backbone was built
    with it), a learned one the export carries dropped for a fixed network. Other backbones pass through.
    Returns the state and the keys filled in and dropped."""
    filled, dropped = [], []
    if not hasattr(backbone, "num_prefix_tokens"):
        return state, filled, dropped
    own = backbone.state_dict()
    if "cls_token" in state and "cls_token" not in own:
        dropped.append("cls_token")
        notes.append("cls token dropped (model.cls_token=drop, as the official UNETR)")
    if "pos_embed" in own and "pos_embed" not in state:
        state = {**state, "pos_embed": own["pos_embed"].detach().clone()}
        filled.append("pos_embed")
        notes.append("position embedding learned from the pretrained sin-cos (model.pos_embed=learned, as the "
                     "official UNETR)")
    elif "pos_embed" in state and "pos_embed" not in own:
        dropped.append("pos_embed")
        notes.append("the export's learned position embedding replaced by the fixed sin-cos (model.pos_embed=fixed)")
    return {k: v for k, v in state.items() if k not in dropped}, filled, dropped


def _load_component(export: Path, component: dict, module: torch.nn.Module, notes: list,
                    allow_nonfinite: bool = False, log=print) -> list[str]:
    """Load a pretrained decoder: every key but its class head (re-initialised for the new classes) must fit;
    checked like the backbone (sha256, header before loading, NaN/inf)."""
    from medssl.pretrain.export import MANIFEST_FILE, load_weights

    head = component.get("head", "head.")
    expect = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = load_weights(export / component["file"], component["sha256"], export / MANIFEST_FILE, expect,
                         allow_nonfinite, NONFINITE_FLAG, skip=(head,), log=log)
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
