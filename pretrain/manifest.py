"""The export manifest's schema (DESIGN contract 4) and the checks every reader runs on it.

An export is untrusted input: a download, a hand-edited file, a copy damaged on the way. Every manifest
field a reader uses is declared in :data:`MANIFEST` (dotted path → :class:`Field`: type, range, required or
optional) and checked when the manifest is read, before a backbone is built or a tensor loaded. The
backbone's kwargs are checked against :data:`BACKBONE_KWARGS` and each component's against
:data:`DECODER_KWARGS`, then the network is built on the meta device (no memory) and its size capped by
:data:`MAX_PARAMETERS`, so a depth of 1e9 or a width of 1e6 is refused before anything is allocated. A
bad field gives one :class:`ExportError` naming the manifest file, the field, the value and the fix.

Fields not declared here are kept but never read (``config`` and ``source`` are for people). A new
backbone or decoder whose constructor takes other keyword arguments adds their rows to the tables below.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FIX = "re-export the run with `python -m medssl.pretrain export RUN` (or restore the export's original manifest.json)"

MAX_MANIFEST_BYTES = 8 << 20  # a manifest is a few kB (the resolved config included)
MAX_CHANNELS = 64  # input channels (CT 1, multi-sequence MRI a handful)
MAX_SIDE = 512  # voxels per axis of a crop / img_size
MAX_KEYS = 100_000  # tensors in one safetensors file
MAX_PARAMETERS = 2_000_000_000  # parameters + buffers of one network (8 GB in fp32; ViT-L/16 has 0.3 G)
# A ViT computes its fixed sin-cos position embedding [tokens, embed_dim] on the CPU even when built on the meta
# device, so its size is bounded from the kwargs before building; missing values take the smallest patch (12)
# and the widest embedding (1536) of the registered vit3d sizes (a new size beyond them updates these).
MAX_POS_EMBED = 1 << 28  # values (1 GiB in fp32; ViT-L/16 on 512³ crops needs 50 M)
POS_EMBED_DEFAULTS = {"img_size": 96, "patch_size": 12, "embed_dim": 1536}

NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_\-.]{0,127}"  # registry, recipe and component names
FILE_RE = r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]{0,127}\.safetensors"  # a file beside the manifest, no folders
SHA256_RE = r"[0-9a-f]{64}"
PREFIX_RE = r"[A-Za-z_][A-Za-z0-9_.]{0,63}"  # a state-dict key prefix (the class head, "head.")
PATTERN_TEXT = {NAME_RE: "a name of letters, digits, '_', '-' and '.' (at most 128)",
                FILE_RE: "a file name ending in .safetensors beside the manifest (no folders)",
                SHA256_RE: "64 lowercase hex digits (a sha256)",
                PREFIX_RE: "a state-dict key prefix such as \"head.\""}


class ExportError(ValueError):
    """An export that cannot be read or does not match its weights; names the file and the fix."""


@dataclass(frozen=True)
class Field:
    """One manifest field: its kind, whether it must be there, and its range.

    ``kind``: ``int`` | ``number`` (int or float, finite) | ``bool`` | ``str`` | ``dict`` | ``list`` |
    ``size3`` (an int or 3 ints) | ``window`` (two finite numbers, lo < hi) | ``probs`` (one probability or a
    list of them) | ``spacing`` (mm: one positive number, three, a "x,y,z" string or "native").
    ``lo``/``hi`` bound numbers (inclusive; ``gt`` is an exclusive lower bound), the length of strings
    (``hi``) and the items of lists, sizes and windows. ``keys`` lists the names a dict may hold."""

    kind: str
    required: bool = True
    null: bool = False
    lo: float | None = None
    hi: float | None = None
    gt: float | None = None
    length: tuple[int, int] | None = None
    items: Field | None = None
    choices: tuple | None = None
    pattern: str | None = None
    keys: tuple[str, ...] | None = None


def _int(**kw) -> Field:
    return Field("int", **kw)


def _ints(lo: int, hi: int, length: tuple[int, int], **kw) -> Field:
    return Field("list", length=length, items=Field("int", lo=lo, hi=hi), **kw)


# Every field a reader uses, parents before children; "*" stands for any key of a dict (one per component).
MANIFEST: dict[str, Field] = {
    "format_version": _int(lo=FORMAT_VERSION, hi=FORMAT_VERSION),
    "backbone": Field("dict"),
    "backbone.name": Field("str", pattern=NAME_RE),
    "backbone.kwargs": Field("dict"),
    "in_channels": _int(lo=1, hi=MAX_CHANNELS),
    "patch_size": _int(lo=1, hi=64, required=False, null=True),
    "feature_strides": _ints(1, 4096, (1, 64)),
    "feature_channels": _ints(1, 65536, (1, 64)),
    "weights": Field("dict"),
    "weights.file": Field("str", pattern=FILE_RE),
    "weights.sha256": Field("str", pattern=SHA256_RE),
    "weights.keys": _int(lo=1, hi=MAX_KEYS),
    "weights.parameters": _int(lo=0, hi=MAX_PARAMETERS, required=False),
    "recipe": Field("str", pattern=NAME_RE),
    "step": _int(lo=0, hi=10 ** 12, null=True),
    "samples_seen": _int(lo=0, hi=10 ** 15, required=False, null=True),
    "config_hash": Field("str", hi=256, required=False, null=True),
    "config": Field("dict", required=False, null=True),
    "source": Field("dict", required=False, null=True),
    "created": Field("str", hi=64, required=False, null=True),
    "preprocessing": Field("dict"),
    "preprocessing.orientation": Field("str", choices=("RAS",)),
    "preprocessing.spacing": Field("spacing", null=True, gt=0.0, hi=100.0),
    "preprocessing.crop_size": Field("size3", lo=1, hi=MAX_SIDE, required=False),
    "preprocessing.intensity": Field("dict", keys=("CT", "MR")),
    "preprocessing.intensity.CT": Field("dict", required=False),
    "preprocessing.intensity.CT.window": Field("window", lo=-1e5, hi=1e5),
    "preprocessing.intensity.CT.out": Field("window", lo=-1e4, hi=1e4, required=False),
    "preprocessing.intensity.CT.clip": Field("bool", required=False),
    "preprocessing.intensity.MR": Field("dict", required=False),
    "preprocessing.intensity.MR.percentiles": Field("window", lo=0.0, hi=100.0, required=False),
    "preprocessing.intensity.MR.out": Field("window", lo=-1e4, hi=1e4, required=False),
    "preprocessing.intensity.MR.clip": Field("bool", required=False),
    "components": Field("dict", required=False),
    "components.*": Field("dict"),
    "components.*.file": Field("str", pattern=FILE_RE),
    "components.*.registry": Field("str", pattern=NAME_RE),
    "components.*.kwargs": Field("dict"),
    "components.*.head": Field("str", pattern=PREFIX_RE, required=False),
    "components.*.sha256": Field("str", pattern=SHA256_RE),
    "components.*.keys": _int(lo=1, hi=MAX_KEYS),
}

# Keyword arguments of the registered backbones (vit3d_*, resenc3d*, hymamba3d*); all optional (the registry has defaults).
BACKBONE_KWARGS: dict[str, Field] = {
    "img_size": Field("size3", lo=1, hi=MAX_SIDE, required=False),
    "patch_size": _int(lo=1, hi=64, required=False),
    "in_chans": _int(lo=1, hi=MAX_CHANNELS, required=False),
    "embed_dim": _int(lo=1, hi=8192, required=False),
    "depth": _int(lo=0, hi=128, required=False),
    "num_heads": _int(lo=1, hi=256, required=False),
    "mlp_ratio": Field("number", gt=0.0, hi=64.0, required=False),
    "qkv_bias": Field("bool", required=False),
    "drop_path_rate": Field("number", lo=0.0, hi=1.0, required=False),
    "out_indices": _ints(0, 127, (0, 128), required=False),
    "cls_token": Field("bool", required=False),
    "pos_embed": Field("str", required=False, choices=("fixed", "learned")),
    "channels": _ints(1, 8192, (1, 12), required=False),
    "blocks_per_level": _int(lo=1, hi=32, required=False),
    "convs_per_block": _int(lo=1, hi=8, required=False),
    "dropout": Field("probs", lo=0.0, hi=1.0, length=(1, 12), required=False, null=True),
    # hymamba3d (MambaMIM's encoder)
    "depths": _ints(1, 32, (5, 5), required=False),
    "exp_r": _ints(1, 16, (5, 5), required=False),
    "mamba_depth": _int(lo=0, hi=64, required=False),
    "d_state": _int(lo=1, hi=256, required=False),
    "d_conv": _int(lo=1, hi=16, required=False),
    "expand": _int(lo=1, hi=8, required=False),
    # nnunet_resenc / nnunet_plain: the plans' architecture block (classes of dynamic_network_architectures and torch.nn
    # only, checked when built), the plans' name and configuration it came from
    "architecture": Field("dict", required=False, keys=("network_class_name", "arch_kwargs", "_kw_requires_import")),
    "plans_name": Field("str", required=False, hi=256),
    "configuration": Field("str", required=False, hi=256),
    "dataset_name": Field("str", required=False, hi=256),
    "net_axes": _ints(0, 2, (3, 3), required=False),
}

# Keyword arguments of the registered decoders a component may name.
DECODER_KWARGS: dict[str, dict[str, Field]] = {
    "unet3d": {
        "feature_channels": _ints(1, 8192, (1, 12)),
        "feature_strides": _ints(1, 4096, (1, 12)),
        "out_channels": _int(lo=1, hi=1024),
        "blocks_per_level": _int(lo=1, hi=32, required=False),
        "convs_per_block": _int(lo=1, hi=8, required=False),
        "dropout": Field("probs", lo=0.0, hi=1.0, length=(1, 12), required=False),
    },
    "nnunet": {
        "feature_channels": _ints(1, 8192, (1, 12)),
        "feature_strides": _ints(1, 4096, (1, 12)),
        "out_channels": _int(lo=1, hi=1024),
        "architecture": Field("dict", keys=("network_class_name", "arch_kwargs", "_kw_requires_import")),
        "in_chans": _int(lo=1, hi=MAX_CHANNELS, required=False),
        "net_axes": _ints(0, 2, (3, 3), required=False),
    },
    "fmunet": {
        "feature_channels": _ints(1, 8192, (1, 12)),
        "feature_strides": _ints(1, 4096, (1, 12)),
        "out_channels": _int(lo=1, hi=1024),
        "blocks_per_level": _int(lo=1, hi=32, required=False),
        "dropout": Field("probs", lo=0.0, hi=1.0, length=(1, 12), required=False, null=True),
    },
}


# --------------------------------------------------------------------------------------------- values
def show(value, limit: int = 80) -> str:
    """A value as it reads in the manifest, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, default=repr)
    except (ValueError, RecursionError):  # circular or too deep
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


KIND_TEXT = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string", "dict": "an object",
             "list": "a list", "size3": "an integer or 3 integers", "window": "[lo, hi]", "probs": "a probability",
             "spacing": "a spacing"}


def _is_int(v) -> bool:
    return type(v) is int


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _range(f: Field) -> str:
    lo = f"> {_num(f.gt)}" if f.gt is not None else (f">= {_num(f.lo)}" if f.lo is not None else "")
    hi = f"<= {_num(f.hi)}" if f.hi is not None else ""
    return " and ".join(p for p in (lo, hi) if p)


def _in_range(v: float, f: Field) -> bool:
    return ((f.gt is None or v > f.gt) and (f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi))


def problem(value, f: Field) -> str | None:
    """Why ``value`` does not satisfy ``f`` (the words after "must be"), or None when it does."""
    if value is None:
        return None if f.null else f"{KIND_TEXT.get(f.kind, 'a value')}, not null"
    kind = f.kind
    if kind == "int":
        if not _is_int(value) or not _in_range(value, f):
            return f"an integer {_range(f)}".rstrip()
    elif kind == "number":
        if not _is_number(value) or not _in_range(value, f):
            return f"a finite number {_range(f)}".rstrip()
    elif kind == "bool":
        if not isinstance(value, bool):
            return "true or false"
    elif kind == "str":
        hi = int(f.hi) if f.hi is not None else 256
        if not isinstance(value, str) or len(value) > hi:
            return f"a string of at most {hi} characters"
        if f.pattern and not re.fullmatch(f.pattern, value):
            return PATTERN_TEXT.get(f.pattern, f"a string matching {f.pattern}")
        if f.choices and value not in f.choices:
            return "one of " + ", ".join(map(str, f.choices))
    elif kind == "dict":
        if not isinstance(value, dict):
            return "an object ({…})"
        if f.keys is not None and not set(value) <= set(f.keys):
            extra = sorted(set(map(str, value)) - set(f.keys))
            return f"an object with keys among {', '.join(f.keys)} (not {', '.join(extra)})"
    elif kind == "list":
        lo, hi = f.length or (0, 1 << 20)
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            return f"a list of {lo}..{hi} items"
        for item in value:
            why = problem(item, f.items) if f.items else None
            if why:
                return f"a list of {lo}..{hi} items, each {why}"
    elif kind == "size3":
        items = [value] if not isinstance(value, list) else value
        if (isinstance(value, list) and len(value) != 3) or not all(_is_int(v) and _in_range(v, f) for v in items):
            return f"an integer or 3 integers, each {_range(f)}"
    elif kind == "window":
        if (not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) and _in_range(v, f) for v in value)
                or not value[0] < value[1]):
            return f"[lo, hi]: two finite numbers with lo < hi, each {_range(f)}"
    elif kind == "probs":
        lo, hi = f.length or (1, 12)
        items = value if isinstance(value, list) else [value]
        if (isinstance(value, list) and not lo <= len(value) <= hi) or not all(_is_number(v) and 0 <= v < 1 for v in items):
            return f"a probability in [0, 1), or a list of {lo}..{hi} of them"
    elif kind == "spacing":
        return _spacing_problem(value, f)
    else:  # pragma: no cover - a typo in the tables above
        raise AssertionError(f"unknown field kind {kind!r}")
    return None


def _spacing_problem(value, f: Field) -> str | None:
    why = f"the target spacing in mm: one number, three, or 'native'; each finite, {_range(f)}"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "native":
            return None
        if len(text) > 64:
            return why
        try:
            values = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            return why
    elif isinstance(value, list):
        values = value
    else:
        values = [value]
    if len(values) not in (1, 3) or not all(_is_number(v) and _in_range(v, f) for v in values):
        return why
    return None


def parse_spacing(value) -> tuple[float, float, float] | None:
    """A checked spacing value (see ``Field("spacing")``) as three floats, or None for native spacing."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "native":
            return None
        values = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    else:
        values = [float(v) for v in (value if isinstance(value, list) else [value])]
    return tuple(values * 3 if len(values) == 1 else values)


# --------------------------------------------------------------------------------------------- walking
def _walk(doc: dict, path: str):
    """``(concrete path, parent dict, key)`` for every place ``path`` names in ``doc`` (``*`` = any key); a parent
    that is missing or not a dict names nothing (the parent's own row reports it)."""
    parts = path.split(".")
    nodes = [("", doc)]
    for part in parts[:-1]:
        nxt = []
        for prefix, node in nodes:
            keys = sorted(node, key=str) if part == "*" else [part]
            for k in keys:
                if isinstance(node.get(k), dict):
                    nxt.append((f"{prefix}{k}.", node[k]))
        nodes = nxt
    last = parts[-1]
    for prefix, node in nodes:
        for k in (sorted(node, key=str) if last == "*" else [last]):
            yield f"{prefix}{k}", node, k


def check_fields(doc: dict, table: dict[str, Field], where: str, fix: str = FIX, prefix: str = "",
                 error: type[Exception] = ExportError) -> None:
    """Check ``doc`` against ``table``; raise ``error`` naming ``where``, the field, its value and ``fix``."""
    for path, f in table.items():
        for concrete, parent, key in _walk(doc, path):
            name = prefix + concrete
            if key not in parent:
                if f.required:
                    raise error(f"{where}: required field {name} is missing; {fix}")
                continue
            why = problem(parent[key], f)
            if why:
                raise error(f"{where}: {name} = {show(parent[key])} must be {why}; {fix}")


def check_kwargs(kwargs: dict, table: dict[str, Field], where: str, field: str, fix: str = FIX,
                 error: type[Exception] = ExportError) -> None:
    """Constructor kwargs: every name known to ``table``, every value in its range."""
    unknown = sorted(str(k) for k in kwargs if k not in table)
    if unknown:
        raise error(f"{where}: {field}.{unknown[0]} = {show(kwargs[unknown[0]])} is not an argument this medssl "
                    f"knows (known: {', '.join(table)}); {fix}")
    check_fields(kwargs, table, where, fix, prefix=f"{field}.", error=error)


# --------------------------------------------------------------------------------------------- networks
def _count(module) -> tuple[int, int, int]:
    """(state-dict keys, state-dict numel, parameters + buffers numel) of a module (meta or real)."""
    state = module.state_dict()
    params = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    return len(state), sum(t.numel() for t in state.values()), params


def meta_backbone(name: str, kwargs: dict, where: str, field: str = "backbone.kwargs", fix: str = FIX,
                  error: type[Exception] = ExportError):
    """Check ``kwargs`` against :data:`BACKBONE_KWARGS`, then build the backbone on the meta device (no memory)
    and cap its size by :data:`MAX_PARAMETERS`; returns the meta module (shapes, feature layout, config)."""
    from .backbones import BACKBONES

    if name not in BACKBONES:
        raise error(f"{where}: backbone.name = {show(name)} is not a registered backbone (known: "
                    f"{', '.join(BACKBONES.names())}); {fix}")
    check_kwargs(kwargs, BACKBONE_KWARGS, where, field, fix, error)
    size, patch, dim = (kwargs.get(k) or v for k, v in POS_EMBED_DEFAULTS.items())
    tokens = math.prod(-(-int(s) // int(patch)) for s in ([size] * 3 if _is_int(size) else size))
    if tokens * dim > MAX_POS_EMBED:
        raise error(f"{where}: {field} img_size {show(size)}, patch_size {patch} and embed_dim {dim} make a position "
                    f"embedding of {tokens:,} tokens x {dim} = {tokens * dim:,} values, over the {MAX_POS_EMBED:,} a "
                    f"medssl backbone may have; {fix}")
    return _meta_build(lambda: BACKBONES.build(name, **kwargs), f"backbone {name}", where, field, kwargs, fix, error)


def meta_decoder(registry: str, kwargs: dict, where: str, field: str, fix: str = FIX,
                 error: type[Exception] = ExportError):
    """The same for a decoder component (``components.<name>``)."""
    from .backbones import BACKBONES  # noqa: F401 - importing the backbones registers their decoders
    from .registry import DECODERS

    if registry not in DECODERS or registry not in DECODER_KWARGS:
        known = sorted(set(DECODERS.names()) & set(DECODER_KWARGS))
        raise error(f"{where}: {field.rsplit('.', 1)[0]}.registry = {show(registry)} is not a registered decoder "
                    f"(known: {', '.join(known)}); {fix}")
    check_kwargs(kwargs, DECODER_KWARGS[registry], where, field, fix, error)
    return _meta_build(lambda: DECODERS.build(registry, **kwargs), f"decoder {registry}", where, field, kwargs, fix,
                       error)


def _meta_build(make, what: str, where: str, field: str, kwargs: dict, fix: str, error):
    import torch

    try:
        with torch.device("meta"):
            module = make()
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, RuntimeError, AttributeError) as exc:
        raise error(f"{where}: {field} = {show(kwargs, 120)} do not build {what} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); {fix}") from None
    _, _, numel = _count(module)
    if numel > MAX_PARAMETERS:
        raise error(f"{where}: {field} = {show(kwargs, 120)} make a {what} of {numel:,} parameters and buffers, over "
                    f"the {MAX_PARAMETERS:,} a medssl network may have; {fix}")
    return module


# --------------------------------------------------------------------------------------------- manifest
def load_json(path: Path, what: str = "manifest", fix: str = FIX, error: type[Exception] = ExportError):
    """A JSON object from an untrusted file: size capped, UTF-8, an object at the top."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    if size > MAX_MANIFEST_BYTES:
        raise error(f"{path}: {size} bytes, over the {MAX_MANIFEST_BYTES} a {what} may take; {fix}")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path}: not a JSON {what} ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: holds a JSON {type(doc).__name__}, not the {what} object; {fix}")
    return doc


def validate(manifest: dict, where: str) -> dict:
    """Every field of :data:`MANIFEST`, then what the fields must agree on: the backbone's kwargs build it (on
    the meta device) with the manifest's in_channels, patch size and feature layout, and with as many tensors
    as ``weights.keys``; each component's decoder builds with its ``keys``. Returns
    ``{"backbone": meta module, "components": {name: meta module}}``."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        if "format_version" not in manifest:
            raise ExportError(f"{where}: required field format_version is missing; {FIX}")
        raise ExportError(f"{where}: format_version = {show(version)}: export format version {show(version)}; this "
                          f"medssl reads version {FORMAT_VERSION} (upgrade medssl, or re-export the run with "
                          "`python -m medssl.pretrain export RUN`)")
    check_fields(manifest, MANIFEST, where)
    bb = manifest["backbone"]
    meta = meta_backbone(bb["name"], bb["kwargs"], where)
    cfg = meta.config
    for field, got, want in (("in_channels", manifest["in_channels"], cfg.get("in_chans", 1)),
                             ("patch_size", manifest.get("patch_size"), cfg.get("patch_size")),
                             ("feature_strides", manifest["feature_strides"], list(meta.feature_strides)),
                             ("feature_channels", manifest["feature_channels"], list(meta.feature_channels))):
        if got is not None and got != want:
            raise ExportError(f"{where}: {field} = {show(got)} differs from the {bb['name']} that backbone.kwargs "
                              f"describe ({show(want)}); {FIX}")
    keys, numel, _ = _count(meta)
    w = manifest["weights"]
    if w["keys"] != keys or w.get("parameters", numel) != numel:
        raise ExportError(f"{where}: weights.keys = {w['keys']}, weights.parameters = {show(w.get('parameters'))}, but "
                          f"the {bb['name']} that backbone.kwargs describe has {keys} tensors of {numel:,} values; {FIX}")
    components = {}
    for name, comp in (manifest.get("components") or {}).items():
        field = f"components.{name}.kwargs"
        module = meta_decoder(comp["registry"], comp["kwargs"], where, field)
        for key in ("feature_channels", "feature_strides"):  # a decoder attaches to the backbone's features
            if key in comp["kwargs"] and comp["kwargs"][key] != manifest[key]:
                raise ExportError(f"{where}: {field}.{key} = {show(comp['kwargs'][key])} differs from the backbone's "
                                  f"{key} {show(manifest[key])}; {FIX}")
        if comp["keys"] != len(module.state_dict()):
            raise ExportError(f"{where}: components.{name}.keys = {comp['keys']}, but the {comp['registry']} that its "
                              f"kwargs describe has {len(module.state_dict())} tensors; {FIX}")
        components[name] = module
    return {"backbone": meta, "components": components}


def read(export_dir: str | Path) -> tuple[dict, dict]:
    """``(manifest, meta modules)`` of an export folder, every field checked (see :func:`validate`)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        what = "no such folder" if not export_dir.exists() else (
            "a file, not an export folder" if export_dir.is_file() else f"{MANIFEST_FILE} not found")
        raise ExportError(f"{path}: {what}; an export folder holds {MANIFEST_FILE} and backbone.safetensors (made by "
                          "`python -m medssl.pretrain export RUN`)")
    manifest = load_json(path)
    return manifest, validate(manifest, str(path))
