"""``vit3d``: a plain 3D Vision Transformer with timm's parameter names (the Hi-End-MAE / UNETR encoder).

A volume ``[B, C, X, Y, Z]`` is cut into p³ patches by a ``Conv3d(k = s = p)``; a fixed 3D sin-cos position
embedding is added; a cls token (zero position) is prepended; pre-norm timm ``Block``s (attention through
``F.scaled_dot_product_attention``) follow. ``forward_features(x, keep)`` returns the raw outputs of the
tapped blocks and the final LayerNorm output, all ``[B, prefix + K, D]`` — a masked-image-modelling recipe
passes ``keep`` (indices of the visible tokens), a fine-tuning decoder reshapes with ``tokens_to_grid``.

Key names are timm's (``patch_embed.proj``, ``cls_token``, ``blocks.N.attn.qkv``, …, ``norm``), so the
authors' Hi-End-MAE encoder loads key for key. The position embedding is a non-persistent buffer, recomputed
from ``img_size``: it is never in the state dict, and the same weights load at any crop size. Fine-tuning
builds the ViT as the official UNETR does: ``pos_embed="learned"`` (a parameter that starts as the sin-cos) and
``cls_token=False``.

``checkpoint_blocks`` trades compute for memory: the first N transformer blocks (-1: all) run under
``torch.utils.checkpoint`` (non-reentrant) while training with gradients, so their activations are recomputed in
the backward pass instead of kept. Parameter names, outputs and gradients are those of the plain model; the
setting is a run option, not part of ``config`` (an export never carries it).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.utils.checkpoint
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..registry import BACKBONES
from ..layers import mae_init_


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sin-cos position embedding ``[G, dim]`` for a ``g0 × g1 × g2`` token grid (C order).

    ``dim`` is split into 6 equal parts ``[sin(a0·ω), cos(a0·ω), sin(a1·ω), cos(a1·ω), sin(a2·ω), cos(a2·ω)]``
    with ``ω_k = temperature^(-k / (dim/6))``, as in Hi-End-MAE/MAE3D. Always float32 on the CPU (also
    under a ``torch.device("meta")`` context), so a meta-built model carries a real embedding.
    """
    if dim % 6:
        raise ValueError(f"dim {dim} is not divisible by 6: the 3D sin-cos embedding needs a sin and a cos part "
                         f"per axis; use e.g. {dim - dim % 6 or 6}")
    pos_dim = dim // 6
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32, device="cpu") / pos_dim)  # [dim/6]
    axes = [torch.arange(g, dtype=torch.float32, device="cpu") for g in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [G, 3], C order
    parts = []
    for a in range(3):
        angle = coords[:, a, None] * omega[None, :]  # [G, dim/6]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1)  # [G, dim]


def check_checkpoint_blocks(value, units: str) -> int:
    """``checkpoint_blocks`` as an int: 0 (off), N > 0 (the first N ``units``) or -1 (all of them)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"checkpoint_blocks {value!r} must be 0 (off), N > 0 (checkpoint the first N {units}) or -1 "
                         f"(all {units}), e.g. checkpoint_blocks=-1")
    return int(value)


def run_checkpointed(fn, *args, checkpointed: bool):
    """``fn(*args)``, under non-reentrant activation checkpointing when ``checkpointed``: the activations inside
    ``fn`` are recomputed in the backward pass (the RNG state is replayed, so dropout draws the same masks)."""
    if checkpointed:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """UNETR's taps: the outputs of blocks ``depth/4 + 1``, ``depth/2 + 1``, ``3·depth/4 + 1`` (zero-based
    ``k·depth // 4``): (3, 6, 9) for 12 blocks, (1, 2, 3) for 4; none for ``depth == 0``."""
    return tuple(k * depth // 4 for k in (1, 2, 3)) if depth > 0 else ()


class ViT3D(nn.Module):
    """3D ViT encoder. Contract 2 (docs/DESIGN.md): ``forward_features(x, keep=None) -> list[Tensor]`` and
    ``feature_channels`` / ``feature_strides`` (one entry per returned feature).

    ``checkpoint_blocks``: 0 off, N > 0 the first N blocks, -1 every block under activation checkpointing when
    training with gradients (an attribute that may also be set after construction)."""

    def __init__(self, img_size: int | tuple[int, int, int] = 96, patch_size: int = 16, in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, out_indices=(3, 6, 9), cls_token: bool = True,
                 pos_embed: str = "fixed", checkpoint_blocks: int = 0):
        super().__init__()
        size = (int(img_size),) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        out_indices = tuple(int(i) for i in out_indices)
        _validate(img_size, size, patch_size, in_chans, embed_dim, depth, num_heads, out_indices)
        if pos_embed not in ("fixed", "learned"):
            raise ValueError(f"pos_embed {pos_embed!r} must be 'fixed' (the sin-cos buffer) or 'learned' (a parameter "
                             f"initialised from it, as the official UNETR fine-tunes)")
        self._config = {"img_size": int(img_size) if isinstance(img_size, int) else list(size),
                       "patch_size": int(patch_size), "in_chans": int(in_chans), "embed_dim": int(embed_dim),
                       "depth": int(depth), "num_heads": int(num_heads), "mlp_ratio": float(mlp_ratio),
                       "qkv_bias": bool(qkv_bias), "drop_path_rate": float(drop_path_rate),
                       "out_indices": list(out_indices), "cls_token": bool(cls_token)}
        if pos_embed != "fixed":  # the default stays out of the config, so exports read as before
            self._config["pos_embed"] = pos_embed
        self.learned_pos_embed = pos_embed == "learned"
        self.checkpoint_blocks = check_checkpoint_blocks(checkpoint_blocks, "transformer blocks")  # not in config
        self.img_size, self.patch_size, self.embed_dim = size, int(patch_size), int(embed_dim)
        self.grid_size = tuple(s // self.patch_size for s in size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.num_prefix_tokens = 1 if cls_token else 0
        self.out_indices = out_indices
        self.feature_channels = [self.embed_dim] * (len(out_indices) + 1)
        self.feature_strides = [self.patch_size] * (len(out_indices) + 1)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # timm's linear rule, no tensors
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=p,
                                          norm_layer=norm) for p in dpr)
        self.norm = norm(embed_dim)
        if self.learned_pos_embed:  # [1, L, D], in the state dict; starts as the sin-cos
            self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, self.embed_dim))  # filled by init_weights
        else:
            self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self.init_weights()

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``build_backbone(name, **config)`` rebuilds the model."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def reset_pos_embed(self) -> None:
        """(Re)compute the sin-cos ``[1, L, D]`` — e.g. after ``to_empty()`` wiped it; a learned embedding is reset
        to it in place."""
        pe = sincos_pos_embed_3d(self.grid_size, self.embed_dim)[None]  # [1, L, D]
        if self.learned_pos_embed:
            if self.pos_embed.device.type != "meta":
                with torch.no_grad():
                    self.pos_embed.copy_(pe)
            return
        dev = self.pos_embed.device if self.pos_embed.device.type != "meta" else pe.device
        self.pos_embed = pe.to(dev)

    def init_weights(self) -> None:
        """MAE's init: Xavier-uniform for Linear and for the patch conv seen as a Linear ``[D, C·p³]``, zero
        biases, LayerNorm (1, 0), cls token N(0, 0.02)."""
        self.reset_pos_embed()
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # [D, C·p³]
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        mae_init_(self.modules())

    def no_weight_decay(self) -> set[str]:
        return ({"cls_token"} if self.cls_token is not None else set()) | ({"pos_embed"} if self.learned_pos_embed else set())

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, X, Y, Z]`` → patch tokens with position ``[B, L, D]`` (no cls), in the C order of the grid."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} does not fit img_size {self.img_size}: "
                             f"build the backbone with img_size={tuple(x.shape[2:])} (the sin-cos embedding follows "
                             f"the grid; the weights are the same)")
        x = self.patch_embed.proj(x)  # [B, D, g0, g1, g2]
        x = x.flatten(2).transpose(1, 2)  # [B, L, D]
        return x + self.pos_embed.to(device=x.device, dtype=x.dtype)

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> list[Tensor]:
        """Raw outputs of the blocks in ``out_indices`` + the final normed output, each ``[B, prefix + K, D]``.

        ``keep`` ``[B, K]`` (long) selects, per sample, which of the L patch tokens enter the encoder
        (visible tokens of a masked recipe); ``None`` keeps all, K = L. Tokens keep the order of ``keep``.
        """
        x = self.patchify(x)  # [B, L, D]
        if keep is not None:
            if keep.dim() != 2 or keep.shape[0] != x.shape[0]:
                raise ValueError(f"keep must be [B, K] = [{x.shape[0]}, K] token indices, got {tuple(keep.shape)}")
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, 1 + K, D]
        taps = {}
        n_ckpt = self.checkpoint_blocks if self.training and torch.is_grad_enabled() else 0
        for i, blk in enumerate(self.blocks):
            x = run_checkpointed(blk, x, checkpointed=n_ckpt < 0 or i < n_ckpt)  # [B, prefix + K, D]
            if i in self.out_indices:
                taps[i] = x
        return [taps[i] for i in self.out_indices] + [self.norm(x)]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)

    def tokens_to_grid(self, t: Tensor) -> Tensor:
        """``[B, prefix + L, D]`` (all L tokens, as from ``keep=None``) → ``[B, D, g0, g1, g2]``."""
        t = t[:, self.num_prefix_tokens:]  # [B, L, D]
        if t.shape[1] != self.num_patches:
            raise ValueError(f"{t.shape[1]} patch tokens do not fill the {self.grid_size} grid "
                             f"({self.num_patches} tokens): pass the output of forward_features(x) without keep")
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid_size)  # [B, D, g0, g1, g2]


def _validate(img_size, size, patch_size, in_chans, embed_dim, depth, num_heads, out_indices) -> None:
    """MONAI-style checks: say the value and how to fix it."""
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"img_size {img_size!r} must be an int or 3 positive ints (a crop X×Y×Z), e.g. 96")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size {patch_size!r} must be a positive int (cubic patches), e.g. 16")
    if any(s % patch_size for s in size):
        fixed = [max(patch_size, round(s / patch_size) * patch_size) for s in size]
        shown, eg = (size[0], fixed[0]) if isinstance(img_size, int) else (size, tuple(fixed))
        raise ValueError(f"img_size {shown} is not divisible by patch_size {patch_size}: use a crop that is a "
                         f"multiple of {patch_size}, e.g. {eg}")
    if in_chans < 1 or depth < 0:
        raise ValueError(f"in_chans {in_chans} must be >= 1 and depth {depth} >= 0")
    if embed_dim < 6 or embed_dim % 6:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by 6 (the 3D sin-cos position embedding has a "
                         f"sin and a cos part per axis): use e.g. {max(6, embed_dim - embed_dim % 6)}")
    if num_heads < 1 or embed_dim % num_heads:
        ok = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0]
        near = min(ok, key=lambda h: (abs(h - num_heads), h))
        raise ValueError(f"num_heads {num_heads} does not divide embed_dim {embed_dim}: use a divisor of "
                         f"{embed_dim}, e.g. num_heads={near} (head dim {embed_dim // near})")
    bad = [i for i in out_indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"out_indices {out_indices} has {bad} outside [0, depth={depth}): tap existing blocks, "
                         f"e.g. out_indices={default_out_indices(depth)}")


def _vit3d(defaults: dict, kwargs: dict) -> ViT3D:
    """Registered sizes: ``kwargs`` override the defaults; the taps follow ``depth`` unless given."""
    cfg = {**defaults, **kwargs}
    cfg.setdefault("out_indices", default_out_indices(cfg.get("depth", 12)))
    return ViT3D(**cfg)


@BACKBONES.register("vit3d_tiny_p16")
def vit3d_tiny_p16(**kwargs) -> ViT3D:
    """96 wide, 4 blocks, 4 heads (taps (1, 2, 3)): tests and demos."""
    return _vit3d({"patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 4}, kwargs)


@BACKBONES.register("vit3d_small_p16")
def vit3d_small_p16(**kwargs) -> ViT3D:
    return _vit3d({"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}, kwargs)


@BACKBONES.register("vit3d_base_p16")
def vit3d_base_p16(**kwargs) -> ViT3D:
    """ViT-B/16 (Hi-End-MAE ``vit_base_patch16_96``)."""
    return _vit3d({"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}, kwargs)


@BACKBONES.register("vit3d_large_p16")
def vit3d_large_p16(**kwargs) -> ViT3D:
    """Hi-End-MAE's wide "large": 1536 wide, 12 blocks, 16 heads (not ViT-L's 1024/24)."""
    return _vit3d({"patch_size": 16, "embed_dim": 1536, "depth": 12, "num_heads": 16}, kwargs)


@BACKBONES.register("vit3d_large_p12")
def vit3d_large_p12(**kwargs) -> ViT3D:
    """The authors' released Hi-End-MAE encoder: 1536/12/16, patch 12 (8³ tokens at 96³)."""
    return _vit3d({"patch_size": 12, "embed_dim": 1536, "depth": 12, "num_heads": 16}, kwargs)
