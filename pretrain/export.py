"""Exports (DESIGN contract 4): ``export/backbone.safetensors`` + ``export/manifest.json``, and the loader.

An export is what fine-tuning and other users read — no pickles, fp32, keys relative to the backbone,
and a manifest that says how to rebuild the network and how its inputs were prepared. ZeRO
checkpoints are consolidated in-process with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(the model-states file holds bf16 weights under bf16 and empty tensors under ZeRO-3). The cases it does
not cover are read from the model-states file (``torch.load(weights_only=True)``): a stage-0 run, whose file
holds the fp32 module, or under bf16/fp16 the fp32 masters in its optimizer state (named through the task's
parameter groups), and parameters a recipe froze (ZeRO stages 0-1 do not list them for the consolidation;
being frozen, the module holds the values the run used).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from medssl.shards.verify import sha256_file

from .manifest import FIX, FORMAT_VERSION, MANIFEST_FILE, ExportError  # noqa: F401 - the schema lives in manifest.py

BACKBONE_FILE = "backbone.safetensors"
STEM_KEYS = ("patch_embed.proj.weight", "stem.weight")  # first convolutions: [D, C, k, k, k], adapted to other C
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes an export's tensors may have (written as F32)
NONFINITE_FLAG = "allow_nonfinite=True"  # how load_backbone's caller lets NaN/inf weights through


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length (spaces pad, as the format
    allows): safetensors writes ``__metadata__`` in an order that changes from process to process, so the same
    tensors would otherwise give files (and manifest sha256s) that differ."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:  # cannot happen for a compact header; leave the file as written
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write a safetensors file with the permissions of any other file the process writes.

    safetensors' ``save_file`` creates its file with mode 0600 whatever the umask, so an export shared
    with a group would be unreadable to it; here the file is written beside its final name, given
    ``0666 & ~umask`` and moved into place (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    _sort_header(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path


def write_export(out: str | Path, backbone_name: str, backbone: nn.Module, state: dict[str, torch.Tensor],
                 meta: dict) -> Path:
    """Write ``state`` (backbone keys) and the manifest into ``out``; returns the folder.

    ``backbone`` (which may live on the meta device) supplies its constructor config and feature layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    save_safetensors(tensors, out / BACKBONE_FILE, metadata={"format": "medssl", "version": str(FORMAT_VERSION)})
    cfg = dict(backbone.config)
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": {"name": backbone_name, "kwargs": cfg},
        "in_channels": cfg.get("in_chans", 1),
        "patch_size": cfg.get("patch_size"),
        "feature_strides": list(backbone.feature_strides),
        "feature_channels": list(backbone.feature_channels),
        "weights": {"file": BACKBONE_FILE, "sha256": sha256_file(out / BACKBONE_FILE), "keys": len(tensors),
                    "parameters": int(sum(t.numel() for t in tensors.values()))},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=False, default=str))
    return out


def write_component(out: Path, name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Write a pretrained part beside the backbone (e.g. Volume Fusion's decoder) as ``<name>.safetensors``;
    returns its manifest entry: registry name and kwargs to rebuild it, the class-head prefix that
    fine-tuning re-initialises, sha256."""
    out.mkdir(parents=True, exist_ok=True)
    if not state:
        raise ExportError(f"the checkpoint holds no '{name}.' keys for the {name} component")
    path = out / f"{name}.safetensors"
    save_safetensors({k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}, path,
              metadata={"format": "medssl", "version": str(FORMAT_VERSION), "component": name})
    return {"file": path.name, "registry": getattr(module, "registry_name", type(module).__name__),
            "kwargs": dict(module.config), "head": getattr(module, "head_prefix", "head."),
            "sha256": sha256_file(path), "keys": len(state)}


def preprocessing_from(cfg) -> dict:
    """What fine-tuning must repeat: spacing/orientation of the shards, the intensity window per modality."""
    spacing = None
    for d in cfg.data.shards:
        idx = Path(d) / "index.json"
        if idx.exists():
            spacing = json.loads(idx.read_text()).get("config", {}).get("spacing")
            break
    return {
        "orientation": "RAS",
        "spacing": spacing,
        "crop_size": list(cfg.data.crop_size),
        "intensity": {"CT": {"window": list(cfg.data.window_ct), "out": list(cfg.data.window_out), "clip": True},
                      "MR": {"percentiles": [0.5, 99.5], "out": list(cfg.data.window_out), "clip": True}},
    }


def _stage0_masters(opt: dict, groups: list[list[str]] | None, module: dict, where: Path) -> dict[str, torch.Tensor]:
    """The fp32 masters a stage-0 bf16/fp16 run keeps in its model-states file (DeepSpeed's FP16/BF16 optimizers:
    ``fp32_groups`` per-parameter, or ``fp32_groups_flat`` one flat tensor per group), named through the order of
    the task's parameter groups."""
    masters = opt.get("fp32_groups") or opt.get("fp32_groups_flat") or opt.get("single_partition_of_fp32_groups")
    if not masters or groups is None or len(masters) != len(groups):
        raise ExportError(f"{where}: a stage-0 half-precision checkpoint whose fp32 weights cannot be matched to the "
                          f"parameters ({len(masters or [])} optimizer groups, {len(groups or [])} expected); export "
                          "refused rather than written from the half-precision copy. Resume the run with "
                          "train.zero_stage=1 for one step to write a checkpoint that exports")
    out = {}
    for names, master in zip(groups, masters):
        tensors = list(master) if isinstance(master, (list, tuple)) else None
        if tensors is None:  # one flat tensor, parameters in group order, alignment padding at the end
            flat, tensors, at = master.reshape(-1), [], 0
            for n in names:
                k = module[n].numel()
                tensors.append(flat[at:at + k])
                at += k
        if len(tensors) != len(names):
            raise ExportError(f"{where}: {len(tensors)} fp32 tensors for {len(names)} parameters in one group")
        for n, t in zip(names, tensors):
            if t.numel() != module[n].numel():
                raise ExportError(f"{where}: the fp32 master of {n} has {t.numel()} values, the parameter "
                                  f"{module[n].numel()}")
            out[n] = t.detach().float().reshape(module[n].shape).clone()
    return out


def consolidate(ckpt_dir: Path, tag: str, zero_to_fp32, groups: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 state dict of checkpoint ``ckpt_dir/tag``: ZeRO's master weights where an optimizer holds them,
    the model-states file's module for the rest (frozen parameters; everything at stage 0 with a plain fp32
    optimizer, where the module itself is the fp32 master). A stage-0 bf16/fp16 run keeps its fp32 masters in
    the model-states file's optimizer state; ``groups`` (parameter names per optimizer group, in order) names them."""
    from .engine import quiet

    tag_dir = ckpt_dir / tag
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise ExportError(f"{tag_dir}: no mp_rank_*_model_states.pt; the checkpoint is incomplete or not DeepSpeed's "
                          f"(write a new one by resuming the run)")
    try:
        states = torch.load(model_files[0], map_location="cpu", weights_only=True)
        module = states["module"]
    except Exception as exc:  # noqa: BLE001 - unreadable or not a DeepSpeed model-states file
        raise ExportError(f"{model_files[0]}: cannot be read as a DeepSpeed model-states file ({_one_line(exc)})") from exc
    state: dict[str, torch.Tensor] = {}
    if any(tag_dir.glob("*_optim_states.pt")):  # ZeRO 1-3: fp32 masters in the partitioned optimizer files
        with quiet():  # DeepSpeed prints its parsing steps and a progress bar
            state = dict(zero_to_fp32(str(ckpt_dir), tag=tag))
    elif any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):  # stage 0, bf16/fp16
        state = _stage0_masters(states.get("optimizer") or {}, groups, module, model_files[0])
    for key, value in module.items():  # frozen parameters (all of them at stage 0 with a plain optimizer)
        if key not in state:
            state[key] = value.float() if value.is_floating_point() else value
    return state


def export_run(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None, log=print) -> Path:
    """Consolidate a run's newest (or ``tag``) checkpoint to fp32 and write ``run_dir/export``."""
    from .backbones import build_backbone
    from .checkpoint import complete_tags
    from .config import config_from_dict

    import yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such folder; give a pretraining run dir (the --out of python -m medssl.pretrain)")
    if not cfg_path.exists():
        raise ExportError(f"{cfg_path} not found: {run_dir} is not a pretraining run dir (it holds config.yaml and "
                          "checkpoints/; give the --out of python -m medssl.pretrain)")
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    ckpt_dir = run_dir / "checkpoints"
    tags = complete_tags(ckpt_dir)
    if tag is None:
        if not tags:
            raise ExportError(f"no complete checkpoint in {ckpt_dir}: train first (python -m medssl.pretrain {cfg.recipe} …)")
        tag = tags[0]
    elif tag not in tags:
        raise ExportError(f"--tag {tag}: no complete checkpoint {ckpt_dir / tag} (complete ones: "
                          f"{', '.join(tags) or 'none'})")
    from .engine import quiet, quiet_libraries

    quiet_libraries()
    with quiet():  # DeepSpeed prints its accelerator, its parsing steps and a progress bar
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from .config import task_class

    with torch.device("meta"):
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        task = task_class(cfg.recipe)(backbone, cfg.task)
    names = {id(p): n for n, p in task.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in task.param_groups(cfg.optim.weight_decay)]
    state = consolidate(ckpt_dir, tag, get_fp32_state_dict_from_zero_checkpoint, groups)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_state:
        raise ExportError(f"checkpoint {ckpt_dir / tag} holds no 'backbone.' keys; is it a medssl run?")
    complete = json.loads((ckpt_dir / tag / "complete.json").read_text())
    dest = Path(out or run_dir / "export")
    components = {}
    for name, module in (task.export_components() if hasattr(task, "export_components") else {}).items():
        comp_state = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
        components[name] = write_component(dest, name, module, comp_state)
    dest = write_export(dest, cfg.model.backbone, backbone, backbone_state, {
        **({"components": components} if components else {}),
        "recipe": cfg.recipe,
        "step": complete["step"],
        "samples_seen": complete["samples"],
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "preprocessing": preprocessing_from(cfg),
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": tag},
    })
    log(f"exported {len(backbone_state)} backbone tensors" + "".join(f" + {c['keys']} {n} tensors" for n, c in components.items())
        + f" from {ckpt_dir / tag} to {dest}")
    return dest


# --------------------------------------------------------------------------------------------- loading
# An export is untrusted input: the manifest is checked field by field (pretrain/manifest.py) before anything is
# built, and a weights file is checked in this order before a tensor is used: sha256 against the manifest, the
# safetensors header (names, dtypes, shapes) against the network the manifest describes, then the values
# (NaN/inf refused unless the caller allows them).
def read_manifest(export_dir: str | Path) -> dict:
    """The export's manifest, every field checked (:func:`pretrain.manifest.validate`); raises :class:`ExportError`
    naming the manifest, the field, its value and the fix."""
    from .manifest import read

    return read(export_dir)[0]


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


def read_header(path: str | Path, fix: str = FIX) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` from a safetensors file's header, without reading a tensor."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                header[key] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
            return header
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError…: not a safetensors file
        raise ExportError(f"{path} is not a safetensors file ({_one_line(exc)}); exports never hold pickles; "
                          f"{fix}") from None


def nonfinite(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{key: (non-finite values, values)}`` for every floating-point tensor holding NaN or inf."""
    out = {}
    for key, t in state.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out[key] = (bad, t.numel())
    return out


def load_weights(path: str | Path, sha256: str | None, described_by: str | Path, expect: dict | None = None,
                 allow_nonfinite: bool = False, flag: str = NONFINITE_FLAG, skip: tuple[str, ...] = (),
                 log=print, fix: str = FIX,
                 redo: str = "export an earlier checkpoint (python -m medssl.pretrain export RUN --tag TAG)"
                 ) -> dict[str, torch.Tensor]:
    """One safetensors file, checked in order: sha256 (as recorded in ``described_by``, the manifest; None skips
    it), header (floating point; with ``expect`` ``{key: shape}``, every key and shape of the network, keys
    starting with ``skip`` left out) before any tensor is read, then the values: NaN/inf refused with the tensor
    names and counts unless ``allow_nonfinite`` (``flag`` is how the caller's user says so; ``redo`` how to get
    finite weights)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: missing (the weights {described_by} names); {fix}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ExportError(f"{path}: sha256 differs from {described_by} (weights replaced or damaged; "
                          "re-export, or restore the matching manifest)")
    header = read_header(path, fix)
    odd = [f"{k} ({d})" for k, (d, _) in header.items() if d not in FLOAT_DTYPES]
    if odd:
        raise ExportError(f"{path}: {len(odd)} tensor(s) are not floating point: {', '.join(odd[:5])}; the weights "
                          f"are written as fp32; {fix}")
    if expect is not None:
        shapes = {k: v[1] for k, v in header.items() if not k.startswith(skip)}  # startswith(()) is False
        want = {k: tuple(v) for k, v in expect.items() if not k.startswith(skip)}
        missing = sorted(set(want) - set(shapes))
        unexpected = sorted(set(shapes) - set(want))
        shaped = sorted((k, shapes[k], want[k]) for k in set(want) & set(shapes) if shapes[k] != want[k])
        if missing or unexpected or shaped:
            raise ExportError(f"{path}: the weights do not fit the network {described_by} describes (checked before "
                              f"loading):\n{format_report(missing, unexpected, shaped)}\n{fix}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the header read above; anything now is a damaged file
        raise ExportError(f"{path} is not a safetensors file ({_one_line(exc)}); exports never hold pickles") from None
    if skip:
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    bad = nonfinite(state)
    if bad:
        listed = ", ".join(f"{k} ({n} of {total})" for k, (n, total) in list(bad.items())[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        text = f"{path}: {len(bad)} tensor(s) hold non-finite values (NaN/inf): {listed}{more}"
        if not allow_nonfinite:
            raise ExportError(f"{text}; the training run diverged or the file is damaged: {redo}, or pass {flag} to "
                              "load them anyway")
        log(f"warning: {text}; loaded anyway ({flag})")
    return state


def load_state(export_dir: str | Path, manifest: dict | None = None, allow_nonfinite: bool = False,
               expect: dict | None = None, flag: str = NONFINITE_FLAG, log=print) -> dict[str, torch.Tensor]:
    """The export's backbone tensors, checked by :func:`load_weights`. ``manifest`` is :func:`read_manifest`'s
    (read when not given); ``expect`` ``{key: shape}`` defaults to the backbone the manifest describes (an empty
    dict skips the shape check: a partial load)."""
    export_dir = Path(export_dir)
    if manifest is None:
        from .manifest import read

        manifest, metas = read(export_dir)
        expect = expect if expect is not None else {k: tuple(v.shape) for k, v in metas["backbone"].state_dict().items()}
    elif expect is None:
        from .manifest import meta_backbone

        meta = meta_backbone(manifest["backbone"]["name"], manifest["backbone"]["kwargs"], str(export_dir / MANIFEST_FILE))
        expect = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    w = manifest["weights"]
    return load_weights(export_dir / w["file"], w["sha256"], export_dir / MANIFEST_FILE, expect or None,
                        allow_nonfinite, flag, log=log)


def diff_report(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped) keys between a model and a state dict."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted((k, tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, shaped


def format_report(missing, unexpected, shaped, limit: int = 20) -> str:
    lines = []
    for title, items in (("missing from the weights", missing), ("unexpected in the weights", unexpected)):
        if items:
            lines.append(f"{len(items)} key(s) {title}: " + ", ".join(items[:limit]) + (" …" if len(items) > limit else ""))
    for k, got, want in shaped[:limit]:
        lines.append(f"mis-shaped {k}: weights {list(got)}, model {list(want)}")
    return "\n".join(lines)


def adapt_in_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Stem weights for another number of input channels: the mean over the trained channels repeated,
    scaled so that a volume repeated on every channel gives the same activation (nnssl/nnU-Net habit)."""
    mean = weight.mean(dim=1, keepdim=True)  # [D, 1, p, p, p]
    return mean.repeat(1, channels, *([1] * (weight.dim() - 2))) * (weight.shape[1] / channels)


def load_backbone(export_dir: str | Path, img_size=None, in_chans: int | None = None, strict: bool = True,
                  log=print, allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild the exported backbone and load every key (or raise with a readable diff).

    ``img_size`` builds it for another input size (the sin-cos position embedding follows the new
    grid); ``in_chans`` adapts the stem convolution to another number of input channels. The manifest is
    checked field by field and the weights' header against the network before anything is allocated;
    weights holding NaN/inf are refused unless ``allow_nonfinite``.
    """
    from .backbones import build_backbone
    from .manifest import meta_backbone, read

    manifest, metas = read(export_dir)
    where = str(Path(export_dir) / MANIFEST_FILE)
    kwargs = dict(manifest["backbone"]["kwargs"])
    trained_chans = kwargs.get("in_chans", 1)
    if img_size is not None:
        kwargs["img_size"] = img_size if isinstance(img_size, int) else [int(s) for s in img_size]
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    # the caller's img_size / in_chans are checked like the manifest's before anything is allocated
    meta_backbone(manifest["backbone"]["name"], kwargs, where, "backbone.kwargs",
                  fix="pass load_backbone an img_size and in_chans within these bounds")
    expect = {k: tuple(v.shape) for k, v in metas["backbone"].state_dict().items()} if strict else {}
    state = load_state(export_dir, manifest, allow_nonfinite, expect, log=log)
    if in_chans is not None and in_chans != trained_chans:
        for key in [k for k in state if k.endswith(STEM_KEYS)]:
            state[key] = adapt_in_channels(state[key], in_chans)
    model = build_backbone(manifest["backbone"]["name"], **kwargs)
    missing, unexpected, shaped = diff_report(model, state)
    if missing or unexpected or shaped:
        report = format_report(missing, unexpected, shaped)
        if strict:
            raise ExportError(f"{export_dir}: the weights do not fit {manifest['backbone']['name']}:\n{report}")
        log(f"warning: partial load of {export_dir}:\n{report}")
    model.load_state_dict({k: v for k, v in state.items() if k not in unexpected and k not in {s[0] for s in shaped}},
                          strict=False)
    log(f"loaded {len(state) - len(unexpected) - len(shaped)}/{len(model.state_dict())} backbone tensors from {export_dir}")
    return model
