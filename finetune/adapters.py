"""Checkpoints users already have → MONAI SwinUNETR / UNETR, through named key adapters and a load report.

Accepted weights (also nested under ``state_dict``/``model``/``network_weights``/``module``/``model_state_dict``,
prefixed by ``module.`` or ``_orig_mod.``, as ``.safetensors`` or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with
``torch.load(weights_only=True)`` only):
  * SwinUNETR self-supervised weights: the released ``model_swinvit.pt`` (``module.patch_embed.*``,
    ``module.layers1.0.blocks.0.mlp.fc1.*``…, the layout ``SwinUNETR.load_from`` reads), checkpoints of the
    research-contributions ``SSLHead`` script (``module.swin_vit.*`` + ``rotation_head``/``contrastive_head``/``conv``),
    SwinUNETR state dicts (``swinViT.*``);
  * ViT self-supervised weights: ``ViTAutoEnc``/``ViT`` state dicts (``patch_embedding.*``, ``blocks.N.*``,
    ``norm.*``, ``conv3d_transpose*``) as the MONAI ``vit_unetr_ssl`` tutorial saves them; UNETR state dicts (``vit.*``).

The encoder (``swinViT.*`` / ``vit.*``) loads completely with the right shapes, or :class:`CheckpointError` lists
the missing, unexpected and mis-shaped keys; the decoder is reported as new.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

WRAPPER_KEYS = ("state_dict", "model", "network_weights", "module", "model_state_dict")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ENCODER_PREFIX = {"monai_swinunetr": "swinViT.", "monai_unetr": "vit."}
ARCH_ADAPTERS = {
    "monai_swinunetr": ["strip_orig_mod", "strip_module", "swin_vit_to_swinViT", "monai_ssl_swin"],
    "monai_unetr": ["strip_orig_mod", "strip_module", "vitautoenc_to_unetr"],
}
UNETR_PATCH = 16  # MONAI UNETR always cuts 16³ patches
UNETR_HEADS = 12  # not recoverable from the weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the fix."""


def _resave_snippet(path: Path) -> str:
    out = str(path.with_suffix("")) + ".weights.pt"
    return ("re-save it once as a plain state dict, in Python, and only if you trust the file:\n"
            f"    import torch; c = torch.load({str(path)!r}, map_location='cpu', weights_only=False); "
            "c = c.state_dict() if isinstance(c, torch.nn.Module) else c.get('state_dict', c)\n"
            f"    torch.save({{k: v for k, v in c.items() if torch.is_tensor(v)}}, {out!r})\n"
            "then pass the new file (safetensors.torch.save_file works as well).")


def _find_state(obj, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The tensors dict inside a checkpoint: the first wrapper entry holding one, else the tensors at this level."""
    if not isinstance(obj, dict) or depth > 4:
        return None
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            found = _find_state(obj[key], depth + 1)
            if found:
                return found
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from the usual nesting; other entries (epoch, optimizer…) are ignored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file" + (" (a folder: pass the file inside)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            raise CheckpointError(f"{path}: the file pickles Python objects besides tensors "
                                  f"({found.group(1) if found else type(exc).__name__}), so torch.load(weights_only=True) "
                                  f"refuses it; pickles are never executed here. Fix: {_resave_snippet(path)}") from None
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: torch.load cannot read it ({type(exc).__name__}: {exc}); "
                                  "expected a file written by torch.save") from None
    else:
        raise CheckpointError(f"{path}: unknown suffix {suffix!r}; expected .safetensors or "
                              f"{', '.join(TORCH_SUFFIXES)} (rename a torch.save file to .pt)")
    state = _find_state(obj)
    if state is None:
        what = f"a dict with entries {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: not a state dict (found {what}); expected tensors keyed by parameter name, "
                              f"possibly nested under one of {list(WRAPPER_KEYS)}")
    return state


@dataclass
class LoadReport:
    """What a checkpoint gave a model: keys loaded, keys left at initialisation, checkpoint keys unused."""

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self, limit: int = 12) -> str:
        lines = [f"weights: {self.source or '(none: random initialisation)'}"]
        for name in ("loaded", "new", "dropped"):
            keys = getattr(self, name)
            lines.append(f"{name}: {len(keys)} keys")
            groups: dict[str, list[str]] = {}
            for k in keys:
                groups.setdefault(k.split(".")[0], []).append(k)
            for i, (group, members) in enumerate(groups.items()):
                if i == limit:
                    lines.append(f"  … {len(groups) - limit} more groups")
                    break
                shown = ", ".join(members[:2]) + (", …" if len(members) > 2 else "")
                lines.append(f"  {group} ({len(members)}): {shown}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _rename(state: dict, fn: Callable[[str], str]) -> tuple[dict, int]:
    out = {fn(k): v for k, v in state.items()}
    if len(out) != len(state):
        raise CheckpointError("renaming made two checkpoint keys collide (e.g. both 'module.x' and 'x' present); "
                              "clean the state dict by hand")
    return out, sum(fn(k) != k for k in state)


def _regex_adapter(pattern: str, repl: str, what: str) -> Callable[[dict], tuple[dict, str | None]]:
    def adapter(state):
        out, n = _rename(state, lambda k: re.sub(pattern, repl, k))
        return out, (f"{what} {n} keys" if n else None)
    return adapter


_SWIN_TOP = re.compile(r"^(patch_embed|layers[1-4]c?)\.")  # released model_swinvit.pt: encoder at the top level


def _monai_ssl_swin(state):
    """SSLHead / released model_swinvit.pt keys → SwinUNETR ``swinViT.*``; pretext heads stay unmapped (dropped)."""
    def fn(k: str) -> str:
        k = k[len("module."):] if k.startswith("module.") else k
        k = re.sub(r"^swin_vit\.", "swinViT.", k)
        k = "swinViT." + k if _SWIN_TOP.match(k) else k
        return re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", k) if k.startswith("swinViT.") else k
    out, n = _rename(state, fn)
    heads = sorted({k.split(".")[0] for k in out if not k.startswith("swinViT.")})
    fc = sum(".mlp.fc" in k for k in state)
    return out, (f"{n} keys moved to swinViT.* ({fc} of them mlp.fc1/fc2 -> mlp.linear1/linear2)"
                 + (f"; not part of the encoder: {', '.join(heads)}" if heads else "") if n else None)


def _vitautoenc_to_unetr(state):
    out, n = _rename(state, lambda k: "vit." + k if re.match(r"^(patch_embedding|blocks|norm)\.", k) else k)
    rest = sorted({k.split(".")[0] for k in out if not k.startswith("vit.")})
    return out, (f"{n} ViT keys moved to vit.*" + (f"; not part of the encoder: {', '.join(rest)}" if rest else "")
                 if n else None)


ADAPTERS: dict[str, Callable[[dict], tuple[dict, str | None]]] = {
    "strip_module": _regex_adapter(r"^module\.", "", "stripped prefix 'module.' from"),
    "strip_orig_mod": _regex_adapter(r"(^|\.)_orig_mod\.", r"\1", "stripped '_orig_mod.' (torch.compile) from"),
    "swin_vit_to_swinViT": _regex_adapter(r"(^|\.)swin_vit\.", r"\1swinViT.", "renamed 'swin_vit.' to 'swinViT.' in"),
    "monai_ssl_swin": _monai_ssl_swin,
    "vitautoenc_to_unetr": _vitautoenc_to_unetr,
}


def adapt(state: dict, names: list[str]) -> tuple[dict, list[str]]:
    """Apply the named adapters in order; one note per adapter that changed something."""
    notes = []
    for name in names:
        if name not in ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; known: {', '.join(ADAPTERS)}")
        state, note = ADAPTERS[name](state)
        if note:
            notes.append(f"{name}: {note}")
    return state, notes


def detect_arch(state: dict) -> str:
    """``monai_swinunetr`` or ``monai_unetr`` from the key layout (after generic prefix stripping)."""
    keys = list(adapt(state, ["strip_orig_mod", "strip_module"])[0])

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if has(r"(swinViT|swin_vit)\.") or (has(r"patch_embed\.proj\.") and has(r"layers1\.0\.blocks\.")):
        return "monai_swinunetr"
    if has(r"(vit\.)?patch_embedding\.(patch_embeddings|position_embeddings)") and has(r"(vit\.)?blocks\.0\."):
        return "monai_unetr"
    hint = ""
    if has(r"encoder\.patch_embed\.proj\.") and has(r"encoder\.blocks\."):
        hint = (" This looks like a Hi-End-MAE checkpoint: convert it with "
                "`python -m medssl.pretrain import hi_end_mae CKPT --out DIR`.")
    raise CheckpointError(f"cannot tell the architecture from the keys (first: {keys[:8]}); pass --arch "
                          f"{' or --arch '.join(ENCODER_PREFIX)} and check the key names.{hint}")


def repeat_stem(weight: torch.Tensor, in_channels: int, layout: str = "conv", patch_size: int = UNETR_PATCH) -> torch.Tensor:
    """Stem weights for ``in_channels`` inputs: the mean over the trained channels, repeated and scaled by old/new,
    so that a volume repeated on every channel gives the same activation as before."""
    if layout == "conv":  # [D, C, p, p, p]
        old = weight.shape[1]
        if old == in_channels:
            return weight
        mean = weight.mean(dim=1, keepdim=True) * (old / in_channels)  # [D, 1, p, p, p]
        return mean.expand(-1, in_channels, *weight.shape[2:]).contiguous()  # [D, in_channels, p, p, p]
    if layout == "perceptron":  # [D, p*p*p*C], "(p1 p2 p3 c)" with c innermost
        voxels = patch_size ** 3
        dim, width = weight.shape
        if width % voxels:
            raise ValueError(f"perceptron stem of width {width} is not a multiple of {patch_size}³")
        old = width // voxels
        if old == in_channels:
            return weight
        grouped = weight.reshape(dim, voxels, old)  # [D, p*p*p, C]
        mean = grouped.mean(dim=2, keepdim=True) * (old / in_channels)  # [D, p*p*p, 1]
        return mean.expand(dim, voxels, in_channels).reshape(dim, voxels * in_channels)  # [D, p*p*p*in_channels]
    raise ValueError(f"unknown stem layout {layout!r}; expected 'conv' or 'perceptron'")


def resample_pos_embed(pe: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Learned position embeddings ``[1, L, D]`` of an (h w d)-ordered token grid, trilinearly resampled."""
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid == new_grid:
        return pe
    batch, length, dim = pe.shape
    if length != math.prod(old_grid):
        raise ValueError(f"{length} position embeddings do not form a {old_grid} grid")
    grid = pe.float().reshape(batch, *old_grid, dim).permute(0, 4, 1, 2, 3)  # [1, D, h, w, d]
    grid = F.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)  # [1, D, h', w', d']
    return grid.permute(0, 2, 3, 4, 1).reshape(batch, math.prod(new_grid), dim).to(pe.dtype)  # [1, h'*w'*d', D]


def _swin_kwargs(state, feature_size, where) -> dict:
    stem = None if state is None else state.get("swinViT.patch_embed.proj.weight")  # [F, C, p, p, p]
    if stem is None:
        return {"feature_size": feature_size or 48}
    fs = int(stem.shape[0])
    if feature_size not in (None, fs):
        raise CheckpointError(f"{where}: the checkpoint's Swin encoder has feature_size {fs}, not {feature_size}; "
                              f"leave feature_size unset or pass {fs}")
    kw = {"feature_size": fs, "patch_size": int(stem.shape[2]),
          "use_v2": any(k.startswith("swinViT.layers1c.") for k in state)}
    depths, heads = [], []
    for i in range(1, 5):
        blocks = {m.group(1) for k in state if (m := re.match(rf"swinViT\.layers{i}\.0\.blocks\.(\d+)\.", k))}
        table = state.get(f"swinViT.layers{i}.0.blocks.0.attn.relative_position_bias_table")  # [(2w-1)³, heads]
        if not blocks or table is None:
            return kw  # incomplete encoder: the key check names what is missing
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
        if i == 1:
            kw["window_size"] = (round(int(table.shape[0]) ** (1 / 3)) + 1) // 2
    fc1 = state.get("swinViT.layers1.0.blocks.0.mlp.linear1.weight")  # [F*ratio, F]
    kw.update(depths=tuple(depths), num_heads=tuple(heads), qkv_bias="swinViT.layers1.0.blocks.0.attn.qkv.bias" in state)
    return kw | ({"mlp_ratio": fc1.shape[0] / fs} if fc1 is not None else {})


def _unetr_kwargs(state, feature_size, where) -> dict:
    kw = {"feature_size": feature_size or 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": UNETR_HEADS,
          "proj_type": "conv"}
    if state is None:
        return kw
    conv = state.get("vit.patch_embedding.patch_embeddings.weight")  # [D, C, 16, 16, 16]
    lin = state.get("vit.patch_embedding.patch_embeddings.1.weight")  # [D, 16³·C]
    if conv is not None and conv.dim() == 5:
        if tuple(conv.shape[2:]) != (UNETR_PATCH,) * 3:
            raise CheckpointError(f"{where}: patch size {tuple(conv.shape[2:])}, but MONAI UNETR only takes 16³ patches")
        kw.update(hidden_size=int(conv.shape[0]), proj_type="conv")
    elif lin is not None and lin.shape[1] % UNETR_PATCH ** 3 == 0:
        kw.update(hidden_size=int(lin.shape[0]), proj_type="perceptron")
    else:
        raise CheckpointError(f"{where}: no 16³ ViT patch embedding (vit.patch_embedding.patch_embeddings.weight or "
                              f".patch_embeddings.1.weight) after adapters; first keys: {list(state)[:8]}")
    if kw["hidden_size"] % UNETR_HEADS:
        raise CheckpointError(f"{where}: hidden size {kw['hidden_size']} is not divisible by {UNETR_HEADS} heads")
    fc1 = state.get("vit.blocks.0.mlp.linear1.weight")  # [mlp_dim, D]
    kw.update(mlp_dim=int(fc1.shape[0]) if fc1 is not None else 4 * kw["hidden_size"],
              qkv_bias="vit.blocks.0.attn.qkv.bias" in state)
    return kw


def _optional(arch: str, key: str) -> bool:
    """Encoder keys an older checkpoint may lack and the model never uses (MONAI ViT blocks without cross-attention)."""
    return arch == "monai_unetr" and ".norm_cross_attn." in key


def build_monai_model(arch: str, state: dict | None, in_channels: int, out_channels: int,
                      img_size: tuple[int, int, int], feature_size: int | None = None,
                      source: str = "", load: bool = True) -> tuple[torch.nn.Module, LoadReport]:
    """A MONAI segmentation network whose encoder holds the checkpoint's weights (``state=None``: random init).

    ``load=False`` builds the network the checkpoint describes (sizes read from its weights) and leaves it at
    random initialisation: the scratch baseline of the same architecture."""
    from monai.networks.nets import UNETR, SwinUNETR

    if arch not in ENCODER_PREFIX:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ENCODER_PREFIX)}")
    where, prefix, img_size, notes = source or "checkpoint", ENCODER_PREFIX[arch], tuple(int(s) for s in img_size), []
    if state is not None:
        state, notes = adapt(dict(state), ARCH_ADAPTERS[arch])
    if arch == "monai_swinunetr":
        kw = _swin_kwargs(state, feature_size, where)
        stem_key, layout = "swinViT.patch_embed.proj.weight", "conv"
    else:
        kw = _unetr_kwargs(state, feature_size, where)
        layout = kw["proj_type"]
        stem_key = "vit.patch_embedding.patch_embeddings" + (".weight" if layout == "conv" else ".1.weight")
    if state is not None:
        notes.append("built with " + ", ".join(f"{k}={v}" for k, v in kw.items())
                     + (" (num_heads: MONAI default, not stored in weights)" if arch == "monai_unetr" else ""))
        stem = state.get(stem_key)
        if stem is not None:
            old = stem.shape[1] if layout == "conv" else stem.shape[1] // UNETR_PATCH ** 3
            if old != in_channels:
                state[stem_key] = repeat_stem(stem, in_channels, layout)
                notes.append(f"stem repeated from {old} to {in_channels} input channels ({stem_key})")
        pe_key = "vit.patch_embedding.position_embeddings"
        if arch == "monai_unetr" and pe_key in state:
            new_grid = tuple(s // UNETR_PATCH for s in img_size)
            length = state[pe_key].shape[1]
            if length != math.prod(new_grid):
                side = round(length ** (1 / 3))
                if side ** 3 != length:
                    raise CheckpointError(f"{where}: {length} position embeddings are not a cubic grid and do not "
                                          f"match img_size {img_size}; pass the img_size used in pretraining")
                state[pe_key] = resample_pos_embed(state[pe_key], (side,) * 3, new_grid)
                notes.append(f"position embeddings resampled {side}x{side}x{side} -> {'x'.join(map(str, new_grid))}")

    if arch == "monai_swinunetr":
        model = SwinUNETR(in_channels=in_channels, out_channels=out_channels, **kw)
    else:
        model = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img_size, **kw)
    model.encoder_prefixes = (prefix,)
    target = model.state_dict()
    if state is None or not load:
        why = "no checkpoint" if state is None else f"architecture of {where}, weights not loaded"
        return model, LoadReport(source, [], list(target), [], [f"{why}: random initialisation (scratch)"])

    encoder = [k for k in target if k.startswith(prefix)]
    missing = [k for k in encoder if k not in state and not _optional(arch, k)]
    unexpected = [k for k in state if k.startswith(prefix) and k not in target]
    shaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in encoder if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or shaped:
        lines = [f"{where}: the weights do not fit the {arch} encoder ({prefix}*) after {ARCH_ADAPTERS[arch]}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) + (", …" if len(items) > 10 else ""))
        lines.append("Fix: check --arch and the encoder size (feature_size, hidden size, depth) it was trained with.")
        raise CheckpointError("\n".join(lines))
    weights = {k: state[k] for k in encoder if k in state}
    skipped = [k for k in encoder if k not in weights]
    if skipped:
        notes.append(f"{len(skipped)} encoder keys not in the checkpoint and unused by {arch} (e.g. {skipped[0]}): "
                     "left at initialisation")
    outside = [k for k in state if k in target and k not in weights]
    if outside:
        notes.append(f"{len(outside)} checkpoint keys outside {prefix}* match the decoder: only the encoder is loaded")
    model.load_state_dict(weights, strict=False)  # every key and shape checked above
    return model, LoadReport(source, list(weights), [k for k in target if k not in weights],
                             [k for k in state if k not in weights], notes)
