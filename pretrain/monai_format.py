"""Exports as MONAI networks: a ``vit3d_*`` export → the state dict of ``monai.networks.nets.UNETR`` or ``ViT``.

A MONAI user loads the converted weights into MONAI's own classes, with nothing of medssl installed::

    ckpt = torch.load("monai_unetr.pt", weights_only=True)
    net = UNETR(**ckpt["kwargs"])
    missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)  # missing: the new decoder only

Key mapping (ours: timm names, see ``backbones/vit3d.py``; MONAI's: ``ViT`` / ``TransformerBlock`` / ``SABlock`` /
``MLPBlock``; under ``UNETR`` every MONAI key carries the prefix ``vit.``)::

    ours                              MONAI ViT                                      how
    patch_embed.proj.{weight,bias}    patch_embedding.patch_embeddings.{weight,bias} copied (Conv3d, k = s = p)
    (sin-cos from img_size)           patch_embedding.position_embeddings            computed, [1, L, D]
    pos_embed (pos_embed="learned")   patch_embedding.position_embeddings            copied
    blocks.N.norm1.*                  blocks.N.norm1.*                               copied
    blocks.N.attn.qkv.{weight,bias}   blocks.N.attn.qkv.{weight,bias}                copied (same q|k|v, head split)
    blocks.N.attn.proj.*              blocks.N.attn.out_proj.*                       copied
    blocks.N.norm2.*                  blocks.N.norm2.*                               copied
    blocks.N.mlp.fc1.*                blocks.N.mlp.linear1.*                         copied
    blocks.N.mlp.fc2.*                blocks.N.mlp.linear2.*                         copied
    -                                 blocks.N.norm_cross_attn.{weight,bias}         ones / zeros (never used)
    norm.*                            norm.*                                         copied
    cls_token                         - (cls_token with keep_cls_token)              left out (UNETR, ViT)
    -                                 classification_head.* (keep_cls_token)         identity / zeros

Facts the mapping rests on (MONAI 1.6.1):

* Token order: both networks run the patch ``Conv3d`` and then ``flatten(2).transpose(1, 2)``, so tokens are the
  C-order raster of the ``(X, Y, Z)`` patch grid in both, and our sin-cos ``[L, D]`` (C order over the same grid)
  is copied row for row. MONAI's own ``pos_embed_type="sincos"`` orders its sin/cos parts differently (second
  axis first), so the converted networks use MONAI's default learnable embedding, filled with ours.
* Attention: MONAI's combined ``qkv`` splits its output as ``(qkv, heads, head_dim)``, as timm does, with scale
  ``head_dim ** -0.5``; GELU is the exact one in both. ``qkv_bias`` follows the export (``True`` by default:
  MONAI's default is ``False``, so it is always passed).
* LayerNorm: ours use ``eps=1e-6``, MONAI builds ``nn.LayerNorm(hidden)`` with ``1e-5``. The eps is no
  constructor argument; the written file carries ``layer_norm_eps`` and the loading lines set it on every
  LayerNorm (without it the features differ slightly: the eps enters as eps / variance of each token).
* The cls token: MONAI's ``UNETR`` always builds its ``ViT`` with ``classification=False`` (no cls token), as
  medssl's fine-tuning does (``cls_token: drop``); an encoder pretrained with one then runs without it, so its
  features are those of our backbone with the cls token removed. For a MONAI ``ViT`` ``keep_cls_token=True``
  keeps it: ``classification=True`` with a ``hidden → hidden`` head set to the identity and no activation, so
  ``hidden_states_out`` equal ours token for token and the output is the normed cls token (replace
  ``classification_head`` by your classifier).
* ``UNETR`` fixes 12 blocks, 16³ patches and taps blocks 3, 6 and 9 (zero-based; ``vit3d``'s default
  ``out_indices`` for 12 blocks). Other depths and patch sizes convert to ``ViT`` only.

``resenc3d`` exports have no MONAI counterpart parameter for parameter (see :func:`resenc3d_mismatch`): they are
refused with the layers that differ, never approximated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .manifest import MANIFEST_FILE, ExportError

NETWORKS = {"unetr": "UNETR", "vit": "ViT"}  # network= → MONAI class in monai.networks.nets
RECORD_FORMAT = "medssl-monai"
RECORD_VERSION = 1
LAYER_NORM_EPS = 1e-6  # vit3d's LayerNorms (timm blocks and the final norm); MONAI builds 1e-5
UNETR_PATCH, UNETR_LAYERS, UNETR_TAPS = 16, 12, (3, 6, 9)  # fixed inside MONAI's UNETR.__init__

PATCH_KEYS = ("patch_embed.proj", "patch_embedding.patch_embeddings")  # ours → MONAI ViT (weight, bias)
BLOCK_KEYS = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj", "norm2": "norm2",
              "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}  # inside blocks.N: ours → MONAI TransformerBlock
POS_KEY = "patch_embedding.position_embeddings"
UNUSED_NORM = "norm_cross_attn"  # built by every MONAI TransformerBlock, used only with cross-attention


@dataclass
class MonaiConversion:
    """A converted export: ``network`` (MONAI class name), ``kwargs`` for its constructor, ``state_dict``.

    ``mapping`` ``{MONAI key: where its values come from}``; ``left_out`` ``{our key: why}``; ``filled``
    ``{MONAI key: value}`` for MONAI parameters with no counterpart in the export; ``new_keys``: the MONAI keys
    not in ``state_dict`` (UNETR's decoder), exactly the ``missing`` of ``load_state_dict(strict=False)``;
    ``layer_norm_eps``: to set on every ``nn.LayerNorm`` of the built network."""

    network: str
    kwargs: dict
    state_dict: dict[str, Tensor]
    layer_norm_eps: float = LAYER_NORM_EPS
    mapping: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    new_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def strict(self) -> bool:
        """Whether ``load_state_dict(state_dict, strict=True)`` works (nothing of the network is new)."""
        return not self.new_keys

    def report(self) -> str:
        """What was converted, filled, left out and stays new, in a few lines."""
        copied = sum(1 for src in self.mapping.values() if not src.startswith("("))
        lines = [f"MONAI {self.network}: {len(self.state_dict)} tensors ({copied} copied from the export, "
                 f"{len(self.state_dict) - copied} computed or filled)"]
        for key, why in self.left_out.items():
            lines.append(f"left out: {key}: {why}")
        if self.filled:
            shown = sorted({k.split(".")[-2] for k in self.filled})
            lines.append(f"filled: {len(self.filled)} tensors with no counterpart in the export ({', '.join(shown)}): "
                         + "; ".join(sorted(set(self.filled.values()))))
        if self.new_keys:
            tops = sorted({k.split(".", 1)[0] for k in self.new_keys})
            lines.append(f"new (not in the export, initialised by MONAI): {len(self.new_keys)} tensors of "
                         f"{', '.join(tops)}: load with strict=False; `missing` lists exactly these, `unexpected` "
                         "is empty")
        else:
            lines.append("every tensor of the network is in the state dict: load_state_dict(strict=True) works")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- conversion
def vit3d_to_monai(backbone, state: dict[str, Tensor], network: str = "unetr", out_channels: int = 2,
                   feature_size: int = 16, keep_cls_token: bool = False, where: str = "export") -> MonaiConversion:
    """Convert a ``vit3d`` state dict (backbone keys) for MONAI's ``UNETR`` (``network="unetr"``) or ``ViT``.

    ``backbone`` is the ``ViT3D`` the state belongs to, built for the ``img_size`` the MONAI network is for (it
    may live on the meta device: only its configuration is read). ``out_channels`` and ``feature_size`` size
    UNETR's new decoder (any values load; ``out_channels`` is your number of classes). ``keep_cls_token``
    (``network="vit"`` only): keep the cls token through ``ViT(classification=True)`` with an identity head.
    The result is checked against the MONAI network built on the meta device: names and shapes.
    """
    from .backbones.vit3d import ViT3D, sincos_pos_embed_3d

    if network not in NETWORKS:
        raise ValueError(f"network {network!r} is not one of {', '.join(map(repr, NETWORKS))} (MONAI's UNETR or ViT)")
    if not isinstance(backbone, ViT3D):
        raise ExportError(f"{where}: a {type(backbone).__name__} backbone; only vit3d_* exports convert to MONAI's "
                          f"UNETR / ViT")
    cfg = backbone.config
    depth, dim, heads, patch = len(backbone.blocks), backbone.embed_dim, cfg["num_heads"], backbone.patch_size
    img_size = [int(s) for s in backbone.img_size]
    if network == "unetr":
        if depth != UNETR_LAYERS or patch != UNETR_PATCH:
            raise ExportError(f"{where}: MONAI's UNETR always has {UNETR_LAYERS} transformer blocks and "
                              f"{UNETR_PATCH}³ patches; this vit3d has depth {depth} and patch_size {patch}: convert "
                              "with network='vit' (MONAI's ViT takes any depth and patch size) and build your own "
                              "decoder on its hidden_states_out")
        if keep_cls_token:
            raise ValueError("keep_cls_token=True needs network='vit': MONAI's UNETR builds its ViT without a cls "
                             "token (classification=False)")
    has_cls = backbone.cls_token is not None
    if keep_cls_token and not has_cls:
        raise ExportError(f"{where}: keep_cls_token=True, but this vit3d has no cls token (cls_token=False)")
    prefix = "vit." if network == "unetr" else ""
    fc1 = state.get("blocks.0.mlp.fc1.weight")  # [mlp_dim, D]
    mlp_dim = int(fc1.shape[0]) if fc1 is not None else int(dim * float(cfg.get("mlp_ratio", 4.0)))
    qkv_bias = bool(cfg.get("qkv_bias", True))
    in_channels = int(cfg.get("in_chans", 1))

    sd: dict[str, Tensor] = {}
    mapping: dict[str, str] = {}
    filled: dict[str, str] = {}
    used: set[str] = set()
    notes: list[str] = []

    def take(ours: str, theirs: str) -> None:
        if ours not in state:
            raise ExportError(f"{where}: the weights lack {ours} (needed for MONAI's {prefix}{theirs})")
        sd[prefix + theirs] = state[ours].detach().to(torch.float32).contiguous().clone()
        mapping[prefix + theirs] = ours
        used.add(ours)

    for p in ("weight", "bias"):
        take(f"{PATCH_KEYS[0]}.{p}", f"{PATCH_KEYS[1]}.{p}")
    pe_shape = (1, backbone.num_patches, dim)
    if "pos_embed" in state:  # pos_embed="learned": a trained parameter for the export's grid
        if tuple(state["pos_embed"].shape) != pe_shape:
            raise ExportError(f"{where}: the learned position embedding {list(state['pos_embed'].shape)} is for "
                              f"another token grid than {list(backbone.grid_size)} (img_size {img_size}); convert at "
                              f"the export's img_size")
        take("pos_embed", POS_KEY)
    else:  # pos_embed="fixed": recomputed from img_size, C order over (X, Y, Z) patches as MONAI's tokens
        sd[prefix + POS_KEY] = sincos_pos_embed_3d(backbone.grid_size, dim)[None].contiguous()  # [1, L, D]
        mapping[prefix + POS_KEY] = (f"(3D sin-cos for the {'x'.join(map(str, backbone.grid_size))} patch grid of "
                                     f"img_size {img_size})")
    for i in range(depth):
        for ours, theirs in BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{p}" in state or not (ours == "attn.qkv" and p == "bias" and not qkv_bias):
                    take(f"blocks.{i}.{ours}.{p}", f"blocks.{i}.{theirs}.{p}")
        for p, value in (("weight", torch.ones(dim)), ("bias", torch.zeros(dim))):
            key = f"{prefix}blocks.{i}.{UNUSED_NORM}.{p}"
            sd[key], mapping[key] = value, f"({'ones' if p == 'weight' else 'zeros'}: LayerNorm default)"
            filled[key] = "LayerNorm defaults (ones, zeros) for MONAI's unused cross-attention norm"
    for p in ("weight", "bias"):
        take(f"norm.{p}", f"norm.{p}")

    left_out: dict[str, str] = {}
    if has_cls:
        if keep_cls_token:
            take("cls_token", "cls_token")
            sd["classification_head.weight"], sd["classification_head.bias"] = torch.eye(dim), torch.zeros(dim)
            for p in ("weight", "bias"):
                mapping[f"classification_head.{p}"] = "(identity: the output is the normed cls token)"
                filled[f"classification_head.{p}"] = "identity head (hidden → hidden, no activation)"
        else:
            used.add("cls_token")
            left_out["cls_token"] = (f"MONAI's {NETWORKS[network]} runs without a cls token (classification=False): "
                                     "the patch tokens no longer attend to it, so the features are those of the "
                                     "backbone without its cls token"
                                     + ("; keep it with keep_cls_token=True" if network == "vit" else ""))
    unknown = sorted(set(state) - used)
    if unknown:  # never dropped silently: a block variant (LayerScale, qk-norm…) MONAI's blocks do not have
        raise ExportError(f"{where}: {len(unknown)} tensor(s) have no counterpart in MONAI's ViT: "
                          f"{', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}; not converted")
    if float(cfg.get("drop_path_rate", 0.0)) > 0:
        notes.append(f"drop_path_rate {cfg['drop_path_rate']} (stochastic depth, a training-time regulariser) has no "
                     "MONAI counterpart; the weights and the eval-mode outputs are unaffected")
    if network == "unetr" and tuple(backbone.out_indices) != UNETR_TAPS:
        notes.append(f"the export taps blocks {list(backbone.out_indices)}; MONAI's UNETR always feeds blocks "
                     f"{list(UNETR_TAPS)} (zero-based) to its decoder")
    notes.append(f"set eps={LAYER_NORM_EPS} on every LayerNorm after building (MONAI builds 1e-5; the record's "
                 "layer_norm_eps)")

    if network == "unetr":
        kwargs = {"in_channels": in_channels, "out_channels": int(out_channels), "img_size": img_size,
                  "feature_size": int(feature_size), "hidden_size": dim, "mlp_dim": mlp_dim, "num_heads": heads,
                  "proj_type": "conv", "norm_name": "instance", "conv_block": True, "res_block": True,
                  "dropout_rate": 0.0, "spatial_dims": 3, "qkv_bias": qkv_bias}
    else:
        kwargs = {"in_channels": in_channels, "img_size": img_size, "patch_size": patch, "hidden_size": dim,
                  "mlp_dim": mlp_dim, "num_layers": depth, "num_heads": heads, "proj_type": "conv",
                  "pos_embed_type": "learnable", "classification": bool(keep_cls_token), "dropout_rate": 0.0,
                  "spatial_dims": 3, "qkv_bias": qkv_bias}
        if keep_cls_token:
            kwargs.update(num_classes=dim, post_activation=None)
    conv = MonaiConversion(NETWORKS[network], kwargs, sd, LAYER_NORM_EPS, mapping, left_out, filled, [], notes)
    conv.new_keys = _check_against_monai(conv, where)
    return conv


def _check_against_monai(conv: MonaiConversion, where: str) -> list[str]:
    """Build the MONAI network on the meta device and compare names and shapes; returns the network's keys the
    state dict does not hold (UNETR: its decoder). Anything else that differs is an error of the converter (e.g. a
    MONAI release that renamed a layer) and raises."""
    from monai.networks import nets

    with torch.device("meta"):
        net = getattr(nets, conv.network)(**conv.kwargs)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(own) - set(conv.state_dict))
    unexpected = sorted(set(conv.state_dict) - set(own))
    shaped = sorted(f"{k} {list(conv.state_dict[k].shape)} vs {list(own[k])}" for k in set(own) & set(conv.state_dict)
                    if tuple(conv.state_dict[k].shape) != own[k])
    encoder_missing = [k for k in missing if conv.network == "ViT" or k.startswith("vit.")]
    if unexpected or shaped or encoder_missing:
        import monai

        raise ExportError(f"{where}: the converted weights do not fit MONAI {monai.__version__}'s {conv.network}: "
                          f"unexpected {unexpected[:5]}, mis-shaped {shaped[:5]}, missing encoder keys "
                          f"{encoder_missing[:5]}; this MONAI release names its layers differently from the one "
                          "this converter was written for (1.6.1)")
    return missing


def resenc3d_mismatch(backbone, state: dict[str, Tensor]) -> list[str]:
    """Why a ``resenc3d`` encoder has no parameter-for-parameter MONAI counterpart, layer by layer (MONAI 1.6.1).

    The nearest are ``SegResNet`` / ``SegResNetDS``: their encoder is a stem conv then per level a stride-2 conv
    and pre-activation residual blocks (norm → act → conv, identity skip), as ours; ``norm`` and ``act`` can be
    set to ``("instance", {"affine": True})`` and ``("leakyrelu", {"negative_slope": 0.01})``. What still differs
    is returned. ``UNet`` (``num_res_units``), ``DynUNet``, ``BasicUNet`` and ``ResNet`` are post-activation
    (conv → norm → act), ``HighResNet`` never downsamples."""
    cfg = backbone.config
    chans = [int(c) for c in cfg["channels"]]
    convs = int(cfg["convs_per_block"])
    biases = [k for k in state if k.endswith(".bias") and (k.startswith("stem.") or ".conv." in k or ".skip." in k)]
    down_norms = [k for k in state if ".down.norm." in k]
    why = [f"every convolution has a bias ({len(biases)} tensors, e.g. {', '.join(biases[:2])}); SegResNet and "
           "SegResNetDS build theirs without (convInit.conv, down_layers.N.M.conv1.conv …: bias=False)"]
    if down_norms:
        why.append(f"the stride-2 convolution of each level is pre-activated (InstanceNorm + LeakyReLU before it: "
                   f"{', '.join(down_norms[:2])}); SegResNet's down_layers.N.0 / SegResNetDS's layers.N.downsample "
                   "is a plain convolution with no norm before it")
    if convs != 2:
        why.append(f"the residual blocks have convs_per_block={convs} convolution(s); MONAI's ResBlock / SegResBlock "
                   "always has 2 (conv1, conv2)")
    if any(b != 2 * a for a, b in zip(chans, chans[1:])):
        why.append(f"the widths {chans} do not double level to level; SegResNet's are init_filters × 2^level")
    return why


def _resenc3d_error(where: str, backbone, state) -> ExportError:
    import monai

    lines = "\n".join(f"  - {w}" for w in resenc3d_mismatch(backbone, state))
    return ExportError(
        f"{where}: resenc3d exports have no parameter-for-parameter counterpart in MONAI {monai.__version__}, so "
        f"none is written. The nearest, SegResNet / SegResNetDS (pre-activation residual encoder), differs:\n{lines}\n"
        "  MONAI's UNet (num_res_units), DynUNet, BasicUNet and ResNet use post-activation units "
        "(conv → norm → act) and HighResNet does not downsample.\nUse the export with medssl: "
        "medssl.pretrain.export.load_backbone(EXPORT) gives the encoder as a torch module, and "
        "python -m medssl.finetune fine-tunes it with its UNet decoder.")


def to_monai(export_dir: str | Path, network: str = "unetr", img_size=None, out_channels: int = 2,
             feature_size: int = 16, keep_cls_token: bool = False, allow_nonfinite: bool = False,
             log=print) -> tuple[MonaiConversion, dict]:
    """``(conversion, manifest)`` for an export folder (``backbone.safetensors`` + ``manifest.json``).

    The manifest and weights are checked as for any export (:func:`medssl.pretrain.export.load_state`).
    ``img_size`` (int or 3 ints, multiples of the patch size) builds the MONAI network for another input size than
    the export's crop: the sin-cos position embedding is computed for that grid (a learned one cannot move). The
    other arguments: :func:`vit3d_to_monai`."""
    from .backbones.resenc3d import ResEnc3D
    from .export import load_state, read_manifest
    from .manifest import meta_backbone

    export_dir = Path(export_dir)
    where = str(export_dir / MANIFEST_FILE)
    manifest = read_manifest(export_dir)
    name = manifest["backbone"]["name"]
    kwargs = dict(manifest["backbone"]["kwargs"])
    trained = meta_backbone(name, kwargs, where)
    if isinstance(trained, ResEnc3D):  # the key names tell the layers; no weights are read
        raise _resenc3d_error(str(export_dir), trained, trained.state_dict())
    if img_size is not None:
        kwargs["img_size"] = int(img_size) if isinstance(img_size, int) else [int(s) for s in img_size]
    backbone = meta_backbone(name, kwargs, where, "backbone.kwargs",
                             fix="pass an img_size the backbone accepts (a multiple of its patch size per side)")
    from .backbones.vit3d import ViT3D

    if not isinstance(backbone, ViT3D):
        raise ExportError(f"{export_dir}: a {name} export; only vit3d_* exports convert to MONAI's UNETR / ViT "
                          f"(use it with medssl.pretrain.export.load_backbone)")
    state = load_state(export_dir, manifest, allow_nonfinite, log=log)
    conv = vit3d_to_monai(backbone, state, network, out_channels, feature_size, keep_cls_token, str(export_dir))
    return conv, manifest


# --------------------------------------------------------------------------------------------- writing
def loading_lines(path: str | Path, conv: MonaiConversion) -> str:
    """The Python lines a MONAI user runs to build the network and load a file written by :func:`write_monai`."""
    lines = ["import torch",
             f"from monai.networks.nets import {conv.network}",
             "",
             f"ckpt = torch.load({str(path)!r}, weights_only=True)"]
    if conv.network == "UNETR":
        lines.append(f"net = UNETR(**{{**ckpt['kwargs'], 'out_channels': {conv.kwargs['out_channels']}}})  "
                     "# out_channels: your number of classes (the decoder is new)")
    else:
        lines.append("net = ViT(**ckpt['kwargs'])")
    lines += ["for m in net.modules():  # medssl's LayerNorm eps (MONAI builds 1e-5)",
              "    if isinstance(m, torch.nn.LayerNorm):",
              "        m.eps = ckpt['layer_norm_eps']"]
    if conv.strict:
        lines.append("net.load_state_dict(ckpt['state_dict'], strict=True)")
    else:
        lines += ["missing, unexpected = net.load_state_dict(ckpt['state_dict'], strict=False)",
                  "assert not unexpected and sorted(missing) == sorted(ckpt['new_keys'])  # only the new decoder"]
    return "\n".join(lines)


def monai_record(conv: MonaiConversion, manifest: dict) -> dict:
    """The object :func:`write_monai` saves: tensors and plain Python values only (``weights_only=True`` loads it)."""
    import monai

    return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
            "state_dict": conv.state_dict, "monai_network": conv.network, "kwargs": _plain(conv.kwargs),
            "layer_norm_eps": conv.layer_norm_eps, "new_keys": list(conv.new_keys),
            "left_out": dict(conv.left_out), "filled": dict(conv.filled), "notes": list(conv.notes),
            "monai_version": str(monai.__version__), "medssl_manifest": _plain(manifest)}


def _plain(obj):
    """JSON-like copy (dict, list, str, int, float, bool, None): what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_monai(export_dir: str | Path, out_path: str | Path, network: str = "unetr", img_size=None,
                out_channels: int = 2, feature_size: int = 16, keep_cls_token: bool = False,
                allow_nonfinite: bool = False, log=print) -> Path:
    """Convert an export (:func:`to_monai`) and ``torch.save`` ``{"state_dict", "monai_network", "kwargs",
    "medssl_manifest", "layer_norm_eps", "new_keys", …}`` to ``out_path``; logs the report and the Python lines
    that load it into MONAI. The file is written beside its final name and moved into place."""
    conv, manifest = to_monai(export_dir, network, img_size, out_channels, feature_size, keep_cls_token,
                              allow_nonfinite, log)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    torch.save(monai_record(conv, manifest), tmp)
    os.replace(tmp, out_path)
    log(f"wrote MONAI {conv.network} weights of {export_dir} to {out_path}\n{conv.report()}\n"
        f"load them in MONAI with:\n\n{loading_lines(out_path, conv)}\n")
    return out_path


def export_monai(export_dir: str | Path, out_dir: str | Path | None = None, network: str = "unetr",
                 log=print, **options) -> Path:
    """``python -m medssl.pretrain export RUN --format monai``: write ``monai_<network>.pt`` into ``out_dir``
    (default: the export folder itself) with :func:`write_monai`; ``options`` are its keyword arguments
    (``img_size``, ``out_channels``, ``feature_size``, ``keep_cls_token``, ``allow_nonfinite``)."""
    if network not in NETWORKS:
        raise ValueError(f"network {network!r} is not one of {', '.join(map(repr, NETWORKS))} (MONAI's UNETR or ViT)")
    out = Path(out_dir) if out_dir is not None else Path(export_dir)
    return write_monai(export_dir, out / f"monai_{network}.pt", network, log=log, **options)
