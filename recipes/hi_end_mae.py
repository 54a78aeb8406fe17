"""``hi_end_mae``: Hi-End-MAE (Tang et al., arXiv 2502.08347, MedIA 2025) — masked image modelling whose
decoder reads several encoder levels ("encoder-driven reconstruction, hierarchical dense decoding").

mask 75 % of the p³ patches → encode the visible ones (taps = raw outputs of blocks 4, 7, 10 and the final
normed output) → decoder stream = projected final tokens + mask tokens + fixed sin-cos positions → 2
self-attention blocks → 3 cross-attention blocks reading the projected taps deep to shallow (10, 7, 4) →
LayerNorm → Linear(p³·C) → MSE on the masked patches against per-patch-normalised voxels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, Mlp
from torch import Tensor, nn

from medssl.pretrain.backbones.vit3d import sincos_pos_embed_3d
from medssl.pretrain.config import ConfigError
from medssl.pretrain.registry import TASKS
from medssl.pretrain.layers import mae_init_

PATCH_NORM_EPS = 1e-6  # the official target LayerNorm (no affine, biased variance)


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """⌊L·(1 − r)⌋ visible tokens (the tolerance keeps e.g. 10·(1 − 0.9) = 0.999… at 1)."""
    return math.floor(num_tokens * (1.0 - mask_ratio) + 1e-6)


@dataclass
class HiEndMAEConfig:
    mask_ratio: float = 0.75  # main.py --mask_ratio
    decoder_dim: int | None = None  # None: 384 / 12 heads for encoders ≤ 768 wide, else 528 / 16 [networks/vit.py]
    decoder_heads: int | None = None  # None: the official pairing, or the most heads with head dim ≥ 32
    self_depth: int = 2  # self-attention decoder blocks
    cross_depth: int = 3  # cross-attention blocks, one per encoder tap, deep to shallow
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # target = per-patch LayerNorm of the voxels (always on in the official code)

    def __post_init__(self):
        self.validate()

    def decoder_size(self, enc_dim: int) -> tuple[int, int]:
        """(width, heads) of the decoder for an encoder ``enc_dim`` wide."""
        if self.decoder_dim is None:
            dim, heads = (384, 12) if enc_dim <= 768 else (528, 16)
            return dim, self.decoder_heads or heads
        dim = self.decoder_dim
        return dim, self.decoder_heads or max(h for h in range(1, dim + 1) if dim % h == 0 and dim // h >= min(32, dim))

    def validate(self, enc_dim: int | None = None, taps: tuple | None = None, num_tokens: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the value and the fix; backbone facts are checked when given."""
        r = self.mask_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ConfigError(f"task.mask_ratio={r!r} must lie strictly between 0 and 1 (the paper uses 0.75)")
        for key in ("self_depth", "cross_depth"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"task.{key}={v!r} must be an int >= 0 (the paper: self_depth 2, cross_depth 3)")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ConfigError(f"task.mlp_ratio={self.mlp_ratio!r} must be > 0 (the paper uses 4.0)")
        for key in ("decoder_dim", "decoder_heads"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"task.{key}={v!r} must be a positive int or null (null: the paper's size)")
        dim, heads = self.decoder_size(enc_dim or 768)
        if dim % 6:
            raise ConfigError(f"task.decoder_dim={dim} is not divisible by 6 (the decoder's 3D sin-cos position "
                              f"embedding has a sin and a cos part per axis): use e.g. {max(6, dim - dim % 6)}")
        if dim % heads:
            near = min((h for h in range(1, dim + 1) if dim % h == 0), key=lambda h: (abs(h - heads), h))
            raise ConfigError(f"task.decoder_dim={dim} is not divisible by task.decoder_heads={heads}: use a divisor "
                              f"of {dim}, e.g. decoder_heads={near}")
        if taps is not None and self.cross_depth > len(taps):
            raise ConfigError(f"task.cross_depth={self.cross_depth} needs {self.cross_depth} encoder taps, the "
                              f"backbone has {len(taps)} (out_indices {tuple(taps)}): use task.cross_depth <= "
                              f"{len(taps)}, or give the backbone more out_indices (model.kwargs)")
        if num_tokens is not None and not 0 < num_visible(num_tokens, r) < num_tokens:
            raise ConfigError(f"task.mask_ratio={r} keeps {num_visible(num_tokens, r)} of {num_tokens} tokens visible: "
                              f"at least one must be visible and one masked; use a ratio in "
                              f"[{1 / num_tokens:.3g}, {1 - 1 / num_tokens:.3g}] or a larger crop / smaller patch")


def patch_normalize(t: Tensor) -> Tensor:
    """The MAE per-patch target: LayerNorm over the last axis, no affine, biased variance, eps 1e-6."""
    return F.layer_norm(t, t.shape[-1:], eps=PATCH_NORM_EPS)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked tokens (``mask`` [B, L] True) and all their voxels."""
    dt = torch.promote_types(pred.dtype, torch.float32)  # bf16 predictions are scored in fp32
    per_token = (pred.to(dt) - target.to(dt)).pow(2).mean(dim=-1)  # [B, L]
    m = mask.to(dt)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


class CrossAttention(nn.Module):
    """Queries from the decoder stream, keys/values from one encoder level (both decoder-wide); SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)  # [B, h, N, D/h]
        k, v = self.kv(y).reshape(B, y.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2 × [B, h, M, D/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, D/h]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class CrossAttentionBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to an encoder level, MLP — each a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm0, self.self_attn = norm(dim), Attention(dim, heads, qkv_bias=True)
        self.norm1, self.cross_attn = norm(dim), CrossAttention(dim, heads)
        self.norm2, self.mlp = norm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)  # y: keys/values, not normalised (as the official code)
        return x + self.mlp(self.norm2(x))


def _as_config(cfg) -> HiEndMAEConfig:
    if cfg is None:
        return HiEndMAEConfig()
    if isinstance(cfg, HiEndMAEConfig):
        return dataclasses.replace(cfg)  # a copy, validated again (merged configs bypass __post_init__)
    if isinstance(cfg, dict):
        valid = [f.name for f in dataclasses.fields(HiEndMAEConfig)]
        bad = sorted(set(cfg) - set(valid))
        if bad:
            raise ConfigError(f"unknown hi_end_mae task keys {bad}; valid keys: {', '.join(valid)}")
        return HiEndMAEConfig(**cfg)
    raise ConfigError(f"hi_end_mae config must be a HiEndMAEConfig, a dict or None, got {type(cfg).__name__}")


@TASKS.register("hi_end_mae")
class HiEndMAE(nn.Module):
    """Contract 3 (docs/DESIGN.md): ``forward(batch) -> {"loss", scalars}``, ``reconstruct(batch)`` for pictures."""

    config_class = HiEndMAEConfig

    def __init__(self, backbone: nn.Module, cfg: HiEndMAEConfig | dict | None = None):
        super().__init__()
        self.cfg = cfg = _as_config(cfg)
        taps, enc_dim = tuple(backbone.out_indices), int(backbone.embed_dim)
        cfg.validate(enc_dim=enc_dim, taps=taps, num_tokens=backbone.num_patches)
        dim, heads = cfg.decoder_size(enc_dim)
        self.backbone = backbone
        self.patch_size, self.grid_size = int(backbone.patch_size), tuple(backbone.grid_size)
        self.in_chans = int(backbone.config["in_chans"])
        self.prefix = int(backbone.num_prefix_tokens)
        self.decoder_dim, self.decoder_heads = dim, heads
        # the cross blocks read the last `cross_depth` taps, deepest first: positions in forward_features'
        # list (tap_order) and zero-based block indices (tap_blocks), e.g. (9, 6, 3) for taps (3, 6, 9)
        self.tap_order = tuple(range(len(taps) - 1, len(taps) - 1 - cfg.cross_depth, -1))
        self.tap_blocks = tuple(taps[i] for i in self.tap_order)

        self.final_proj = nn.Linear(enc_dim, dim)  # the final normed encoder output → decoder width
        self.tap_proj = nn.ModuleList(nn.Linear(enc_dim, dim) for _ in self.tap_order)  # one per tap read
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(self.grid_size, dim)[None],
                             persistent=False)  # [1, L, d], fixed
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.self_blocks = nn.ModuleList(Block(dim, heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
                                         for _ in range(cfg.self_depth))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, cfg.mlp_ratio)
                                          for _ in range(cfg.cross_depth))
        self.decoder_norm = norm(dim)
        self.head = nn.Linear(dim, self.patch_size ** 3 * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """As the paper's code: Xavier-uniform Linear, zero biases, LayerNorm (1, 0), mask token N(0, .02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        # the backbone initialises itself
        mae_init_(m for name, m in self.named_modules() if not name.startswith("backbone"))

    # ------------------------------------------------------------------------------ pieces
    def random_masking(self, B: int, L: int, ratio: float, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """MAE masking: a random permutation per sample, its first ⌊L·(1−r)⌋ tokens stay visible.

        Returns ``keep`` [B, K] (long, in shuffled order), ``mask`` [B, L] (bool, True = masked) and
        ``ids_restore`` [B, L] (each token's rank in the shuffle)."""
        K = num_visible(L, ratio)
        device = generator.device if generator is not None else (device or self.mask_token.device)
        noise = torch.rand(B, L, device=device, generator=generator)  # [B, L]
        ids_shuffle = noise.argsort(dim=1)  # [B, L]
        ids_restore = ids_shuffle.argsort(dim=1)  # [B, L]
        return ids_shuffle[:, :K], ids_restore >= K, ids_restore

    def patchify_target(self, x: Tensor) -> Tensor:
        """``[B, C, X, Y, Z]`` → ``[B, L, p³·C]``: tokens in the C order of the grid (as the backbone's conv),
        each patch flattened as (px, py, pz, c) — the official order."""
        B, C = x.shape[:2]
        p, (g0, g1, g2) = self.patch_size, self.grid_size
        x = x.reshape(B, C, g0, p, g1, p, g2, p)  # [B, C, g0, p, g1, p, g2, p]
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, g0, g1, g2, p, p, p, C]
        return x.reshape(B, g0 * g1 * g2, p ** 3 * C)  # [B, L, p³·C]

    def unpatchify(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`patchify_target`: ``[B, L, p³·C]`` → ``[B, C, X, Y, Z]``."""
        p, (g0, g1, g2), C = self.patch_size, self.grid_size, self.in_chans
        t = t.reshape(t.shape[0], g0, g1, g2, p, p, p, C)  # [B, g0, g1, g2, p, p, p, C]
        t = t.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, g0, p, g1, p, g2, p]
        return t.reshape(t.shape[0], C, g0 * p, g1 * p, g2 * p)  # [B, C, X, Y, Z]

    def target(self, x: Tensor) -> Tensor:
        """What the decoder must predict for every patch ``[B, L, p³·C]`` (fp32 or wider)."""
        t = self.patchify_target(x.to(torch.promote_types(x.dtype, torch.float32)))  # [B, L, p³·C]
        return patch_normalize(t) if self.cfg.norm_pix_loss else t

    def predict(self, x: Tensor, keep: Tensor) -> Tensor:
        """Encode the visible tokens ``keep`` [B, K] of ``x``, decode every grid position: ``[B, L, p³·C]``."""
        feats = self.backbone.forward_features(x, keep)  # taps + [final], each [B, P + K, D]
        P, B, L = self.prefix, keep.shape[0], self.backbone.num_patches
        q = self.final_proj(feats[-1])  # [B, P + K, d]
        d = q.shape[-1]
        grid = self.mask_token.to(q.dtype).expand(B, L, d)  # [B, L, d]: a mask token everywhere …
        grid = grid.scatter(1, keep[..., None].expand(-1, -1, d), q[:, P:])  # … the visible tokens at their positions
        grid = grid + self.decoder_pos_embed.to(q.dtype)  # [B, L, d]: each token's own grid position
        h = torch.cat([q[:, :P], grid], dim=1)  # [B, P + L, d] (the cls token has no position)
        for blk in self.self_blocks:
            h = blk(h)
        for blk, proj, i in zip(self.cross_blocks, self.tap_proj, self.tap_order):  # deep → shallow
            h = blk(h, proj(feats[i]))  # keys/values: that level's cls + visible tokens [B, P + K, d]
        return self.head(self.decoder_norm(h))[:, P:]  # [B, L, p³·C]

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """The encoder's output and each decoder stage, for ``--dry-run`` (traced through :meth:`trace`)."""
        return ([("backbone.norm", self.backbone.norm), ("final_proj", self.final_proj)]
                + [(f"self_blocks.{i}", b) for i, b in enumerate(self.self_blocks)]
                + [(f"cross_blocks.{i} (block {blk} taps)", b)
                   for i, (b, blk) in enumerate(zip(self.cross_blocks, self.tap_blocks))]
                + [("head", self.head)])

    def trace(self, x: Tensor) -> Tensor:
        """Masking, encoder and decoder on ``x`` without the loss: what ``--dry-run`` runs on the meta device."""
        keep, _, _ = self.random_masking(x.shape[0], self.backbone.num_patches, self.cfg.mask_ratio, device=x.device)
        return self.predict(x, keep)

    def _check_input(self, x: Tensor) -> None:
        want = (self.in_chans, *self.backbone.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"batch['image'] of shape {tuple(x.shape)} does not fit the backbone: expected "
                             f"[B, {', '.join(map(str, want))}]; set data.crop_size={list(want[1:])} or build the "
                             f"backbone with img_size={tuple(x.shape[2:])}")

    # ------------------------------------------------------------------------------ contract 3
    def forward(self, batch: dict) -> dict:
        x = batch["image"]  # [B, C, X, Y, Z]
        self._check_input(x)
        B, L = x.shape[0], self.backbone.num_patches
        keep, mask, _ = self.random_masking(B, L, self.cfg.mask_ratio, device=x.device)  # [B, K], [B, L]
        pred = self.predict(x.to(self.head.weight.dtype), keep)  # [B, L, p³·C]
        target = self.target(x)  # [B, L, p³·C]
        loss = masked_mse(pred, target, mask)
        return {"loss": loss,
                "mask_ratio": 1.0 - keep.shape[1] / L,
                "target_std": target.detach().std()}  # all tokens; the loss of predicting 0 is ≈ its square

    @torch.no_grad()
    def reconstruct(self, batch: dict, path: str | Path | None = None) -> np.ndarray:
        """A picture (RGB uint8) of mid axial slices of ≤ 4 samples: input, masked input, reconstruction
        (visible patches pasted from the input), target (what the loss sees); written to ``path`` if given.
        The mask is drawn from a fixed seed, so pictures of different steps compare."""
        was_training = self.training
        self.eval()
        try:
            x = batch["image"][:4]  # [n, C, X, Y, Z]
            self._check_input(x)
            x = x.float()
            n, L = x.shape[0], self.backbone.num_patches
            gen = torch.Generator(device=x.device).manual_seed(0)
            keep, mask, _ = self.random_masking(n, L, self.cfg.mask_ratio, generator=gen)
            pred = self.predict(x.to(self.head.weight.dtype), keep).float()  # [n, L, p³·C]
            patches = self.patchify_target(x)  # [n, L, p³·C]
            recon = pred
            if self.cfg.norm_pix_loss:  # undo the target normalisation with each patch's own statistics
                mean = patches.mean(-1, keepdim=True)  # [n, L, 1]
                std = (patches.var(-1, unbiased=False, keepdim=True) + PATCH_NORM_EPS).sqrt()  # [n, L, 1]
                recon = pred * std + mean
            m = mask[..., None]  # [n, L, 1]
            cols = {"input": patches, "masked": patches.masked_fill(m, float("nan")),
                    "reconstruction": torch.where(m, recon, patches), "target": self.target(x)}
            z = x.shape[-1] // 2  # the middle axial slice, channel 0
            vols = {k: self.unpatchify(v)[:, 0, :, :, z].cpu().numpy() for k, v in cols.items()}  # [n, X, Y] each
        finally:
            self.train(was_training)
        return _draw(vols, path, z)

    # ------------------------------------------------------------------------------ engine hooks
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on ≥ 2-D weights; none on 1-D params (norms, biases), tokens, position embeddings."""
        skip = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or name in skip or "pos_embed" in name or "token" in name
            (no_decay if plain else decay).append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]

    def stream_overrides(self) -> dict:
        """What the stream must deliver: crops of the backbone's input size (one view per crop)."""
        return {"crop_size": tuple(self.backbone.img_size)}


def _draw(vols: dict[str, np.ndarray], path=None, z: int | None = None) -> np.ndarray:
    """Rows = samples, columns = ``vols``' keys; masked voxels (NaN) in a grey-blue; one grey range per row
    (the input's) except for the normalised target. Returns RGB uint8."""
    import matplotlib

    from medssl.pretrain.pictures import draw_grid

    cmap = matplotlib.colormaps["gray"].with_extremes(bad=(0.45, 0.45, 0.6))

    def style(title: str, r: int) -> dict:
        if title == "target":
            return {"cmap": cmap}
        lo, hi = float(np.nanmin(vols["input"][r])), float(np.nanmax(vols["input"][r]))
        return {"cmap": cmap, "vmin": lo, "vmax": hi if hi > lo else lo + 1}

    label = (lambda r: f"sample {r}, z={z}") if z is not None else None  # noqa: E731
    return draw_grid(vols, style, path, legend={"masked patch": (0.45, 0.45, 0.6)}, row_label=label)
