"""``mambamim``: MambaMIM (Tang et al., arXiv 2408.08070, MedIA 2025; code FengheTan9/MambaMIM) — masked image
modelling on a CNN + Mamba hybrid (``hymamba3d``) with state-space token interpolation (TOKI).

mask 75 % of the 16³ patches per sample (bottom-up: the 1/16 mask upsampled to every stage) → sparse encoder
(convolution and pooling outputs multiplied by the mask, LayerNorms over visible positions only, the Mamba stage
on each sample's visible tokens first, then its masked ones) → densify: masked positions of each level filled — the deepest by TOKI, the
others by a learned mask token per level — and projected (1³ conv 384 → 768 at 1/16, 3³ convs above) → SparK's
light UNet decoder (768 → 384 → 192 → 96 → 48, transposed-conv up-sampling, BatchNorm, skip fusion) → 1³ conv
to the voxels → MSE against per-patch-normalised 16³ patches, on the masked patches only.

Departures from the official code, each for a reason given at the line: the Mamba stage orders each sample's
tokens visible first by a stable sort (the official sort is unstable; its keep count, summed over the batch,
keeps every token from 4 crops on, as here); TOKI's result is transposed to channels × positions (the official code reshapes, which scrambles
channels and positions; the paper means the transpose); the unused 96³ level (``fuse.0``, ``densify_projs.4``,
``mask_tokens.4``) is not built, and the encoder's 96³ skip (``encoder1``, computed and dropped there) is not run
and stays frozen at its initialisation. ``mask_tokens.0`` (deepest level) trains only when TOKI is off, and
``A_interpolation`` only when it is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from medssl.pretrain.config import ConfigError
from medssl.pretrain.registry import TASKS

PATCH = 16  # the encoder's deepest stride = the masking patch
TARGET_EPS = 1e-6  # the official target: (x − mean) / sqrt(var + 1e-6), unbiased var


@dataclass
class MambaMIMConfig:
    mask_ratio: float = 0.75  # main.py --mask 0.75
    toki: bool = True  # fill the deepest level's masked tokens by token interpolation; false: a mask token
    decoder_width: int = 768  # LightDecoder(width=768): 768 → 384 → 192 → 96 → 48
    norm_pix_loss: bool = True  # per-patch normalised target (always on in the official code)

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"task.mask_ratio={self.mask_ratio}: use a fraction in (0, 1), e.g. 0.75 (the paper's)")
        if self.decoder_width < 16 or self.decoder_width % 16:
            raise ConfigError(f"task.decoder_width={self.decoder_width}: use a multiple of 16 (halved 4 times)")


def num_keep(tokens: int, ratio: float) -> int:
    """round(L · (1 − ratio)) visible tokens per sample, as the official ``len_keep``."""
    return round(tokens * (1.0 - ratio))


def random_active(B: int, grid, ratio: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """[B, 1, *grid] bool, True = visible: exactly ``num_keep`` visible patches in every sample."""
    L = math.prod(grid)
    keep = num_keep(L, ratio)
    idx = torch.rand(B, L, generator=generator, device=device).argsort(dim=1)[:, :keep]
    return torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, idx, True).view(B, 1, *grid)


def toki(feat: Tensor, active: Tensor, A: Tensor) -> Tensor:
    """Token interpolation of the masked deepest tokens, vectorised over the batch (MambaMIM's
    ``mask_token_every_batch``): along the raster scan order, anchors are the visible tokens plus the first and
    last position; inside the gap between anchors a and b (length g = b − a, offsets k = 0 … g − 1), the
    interpolants V_k = (1 − α_k)·y_a + α_k·y_b with α = linspace(0, 1, g) are weighted by A^(g−1−k) and summed
    cumulatively, z_{a+j} = Σ_{k≤j} A^(g−1−k) V_k; the last position gets A·y_last. ``feat`` [B, C, *grid],
    ``active`` [B, 1, *grid], ``A`` [C, C] → [B, C, *grid]."""
    B, C = feat.shape[:2]
    L = math.prod(feat.shape[2:])
    y = feat.flatten(2).transpose(1, 2)  # [B, L, C], scan order
    flag = active.flatten(1).clone()
    flag[:, 0] = True
    flag[:, -1] = True
    pos = torch.arange(L, device=feat.device).expand(B, L)
    left = torch.where(flag, pos, torch.zeros_like(pos)).cummax(1).values  # the anchor at or before p
    right_of = torch.where(flag, pos, torch.full_like(pos, L - 1))
    right = right_of.flip(1).cummin(1).values.flip(1)  # the anchor at or after p
    right = torch.where(flag & (pos < L - 1), torch.cat([right[:, 1:], right[:, -1:]], 1), right)  # anchors: next
    g = (right - left).clamp_min(1)  # gap length (1 at the last position)
    k = pos - left
    alpha = torch.where(g > 1, k.to(y.dtype) / (g - 1).clamp_min(1).to(y.dtype), torch.zeros_like(k, dtype=y.dtype))
    ya, yb = torch.gather(y, 1, left[..., None].expand(-1, -1, C)), torch.gather(y, 1, right[..., None].expand(-1, -1, C))
    v = (1 - alpha[..., None]) * ya + alpha[..., None] * yb  # [B, L, C]
    e = (g - 1 - k)  # the power of A for each position's interpolant
    last = pos == L - 1
    e = torch.where(last, torch.ones_like(e), e)  # A · y_last
    v = torch.where(last[..., None], y, v)
    w = torch.zeros_like(v)
    u = v
    top = L - 1 if feat.device.type == "meta" else int(e.max())  # meta (--dry-run): the bound, not the value
    for m in range(top + 1):  # A^m V for the positions whose exponent is m (a loop over powers only)
        w = torch.where((e == m)[..., None], u, w)
        u = u @ A.t()
    # cumulative sum inside each gap (the last position stands alone)
    seg = torch.where(last, torch.full_like(left, L - 1), left)
    cs = w.cumsum(1)
    before = torch.gather(cs, 1, (seg - 1).clamp_min(0)[..., None].expand(-1, -1, C))
    z = cs - torch.where((seg > 0)[..., None], before, torch.zeros_like(before))
    return z.transpose(1, 2).reshape(feat.shape)  # official: AX.reshape (scrambles c and p); the paper: transpose


class UNetBlock(nn.Module):
    """SparK's decoder block: 2× transposed conv, then 2 × (3³ conv, BatchNorm, ReLU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up_sample = nn.ConvTranspose3d(cin, cin, 2, stride=2)
        self.conv = nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                                  nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up_sample(x))


class FusionBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                                  nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class LightDecoder(nn.Module):
    """SparK's light decoder for a ×16 up-sampling: widths w, w/2, …, w/16; level k > 0 fuses the previous output
    with that level's densified feature before up-sampling (``fuse.0`` of the official code is never used and not
    built here)."""

    def __init__(self, width: int = 768, levels: int = 4, out_chans: int = 1):
        super().__init__()
        ch = [width // 2 ** i for i in range(levels + 1)]
        self.dec = nn.ModuleList(UNetBlock(a, b) for a, b in zip(ch[:-1], ch[1:]))
        self.fuse = nn.ModuleDict({str(i): FusionBlock(2 * ch[i], ch[i]) for i in range(1, levels)})
        self.proj = nn.Conv3d(ch[-1], out_chans, 1)  # official: 1 (CT); one per input channel for multi-channel MRI
        for m in self.modules():  # the official initialize(): trunc-normal convs, kaiming transposed convs
            if isinstance(m, nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, to_dec: list[Tensor]) -> Tensor:
        x = to_dec[0]
        for i, d in enumerate(self.dec):
            if i > 0:
                x = self.fuse[str(i)](torch.cat((x, to_dec[i]), dim=1))
            x = d(x)
        return self.proj(x)


def patchify(x: Tensor, p: int = PATCH) -> Tensor:
    """[B, C, X, Y, Z] → [B, L, p³·C] (patches in raster order, as the official ``patchify``)."""
    B, C, X, Y, Z = x.shape
    t = x.reshape(B, C, X // p, p, Y // p, p, Z // p, p)
    return torch.einsum("bchpwqds->bhwdpqsc", t).reshape(B, (X // p) * (Y // p) * (Z // p), p ** 3 * C)


def unpatchify(t: Tensor, grid, p: int = PATCH) -> Tensor:
    B, L, N = t.shape
    C = N // p ** 3
    h, w, d = grid
    x = t.reshape(B, h, w, d, p, p, p, C)
    return torch.einsum("bhwdpqsc->bchpwqds", x).reshape(B, C, h * p, w * p, d * p)


def masked_patch_mse(rec: Tensor, x: Tensor, active: Tensor, norm: bool = True) -> Tensor:
    """Mean over the masked patches of the per-voxel squared error against the (per-patch normalised) input."""
    inp, out = patchify(x.float()), patchify(rec.float())
    if norm:
        inp = (inp - inp.mean(-1, keepdim=True)) / (inp.var(-1, keepdim=True) + TARGET_EPS).sqrt()
    l2 = (out - inp).pow(2).mean(-1)  # [B, L]
    masked = (~active.flatten(1)).float()
    return (l2 * masked).sum() / (masked.sum() + 1e-8)


@TASKS.register("mambamim")
class MambaMIM(nn.Module):
    config_class = MambaMIMConfig

    def __init__(self, backbone: nn.Module, cfg: MambaMIMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MambaMIMConfig()
        if not hasattr(backbone, "mae") or list(backbone.feature_strides) != [1, 2, 4, 8, 16]:
            raise ConfigError(f"mambamim pretrains a hymamba3d backbone (features at strides 1-16); got "
                              f"{type(backbone).__name__}: set model.backbone=hymamba3d")
        self.backbone = backbone
        chans = list(backbone.feature_channels)[::-1]  # deepest first: 384 (mae), 384, 192, 128, (64 unused)
        w = cfg.decoder_width
        self.A_interpolation = nn.Parameter(torch.zeros(chans[0], chans[0]), requires_grad=cfg.toki)  # TOKI's, zero init
        # The 96³ skip (encoder1) is built by the backbone but never read here (the official code computes it and
        # drops it): it is not run, and frozen so that it keeps its initialisation as in the official code, where
        # AdamW skips a parameter without a gradient; DeepSpeed would hand it zeros and decay it (to about 0.79×
        # over the default schedule). A frozen parameter is still exported (pretrain/export.py: consolidate).
        backbone.embeddings.encoder1.requires_grad_(False)
        self.mask_tokens = nn.ParameterList()
        self.densify_projs = nn.ModuleList()
        for i in range(4):  # the official builds a fifth (96³) level whose output the decoder never reads
            tok = nn.Parameter(torch.zeros(1, chans[i], 1, 1, 1))
            nn.init.trunc_normal_(tok, std=0.02, a=-0.02, b=0.02)
            tok.requires_grad_(not (i == 0 and cfg.toki))  # [0] fills the deepest level only when toki is off
            self.mask_tokens.append(tok)
            k = 1 if i == 0 else 3
            same = i == 0 and chans[i] == w  # official: Identity when the deepest width is the decoder's already
            self.densify_projs.append(nn.Identity() if same else nn.Conv3d(chans[i], w // 2 ** i, k, padding=k // 2))
        self.decoder = LightDecoder(w, 4, out_chans=backbone.in_chans)
        self.grid = tuple(backbone.grid)
        tokens = math.prod(self.grid)
        if not 1 <= num_keep(tokens, cfg.mask_ratio) <= tokens - 1:
            raise ConfigError(f"task.mask_ratio={cfg.mask_ratio} keeps {num_keep(tokens, cfg.mask_ratio)} of {tokens} "
                              "16³ patches visible: at least one must be visible and one masked; use another ratio or a "
                              "larger crop")

    # ------------------------------------------------------------------------------ the network
    def reconstruct_from(self, x: Tensor, active: Tensor) -> Tensor:
        """The reconstruction [B, 1, *crop] of ``x`` seen through ``active`` (visible 16³ patches)."""
        a_full = active.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).repeat_interleave(PATCH, 4)
        feats = self.backbone.forward_features(x * a_full.to(x.dtype), active, skip=(0,))
        to_dec = []
        cur = active
        for i, f in enumerate(feats[::-1][:4]):  # deepest first
            if i == 0 and self.cfg.toki:
                fill = toki(f, cur, self.A_interpolation.to(f.dtype))
            else:
                fill = self.mask_tokens[i].to(f.dtype).expand_as(f)
            f = torch.where(cur.expand_as(f), f, fill)
            to_dec.append(self.densify_projs[i](f))
            cur = cur.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
        return self.decoder(to_dec)

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        emb = self.backbone.embeddings
        return ([(f"backbone.embeddings.expend{i}", getattr(emb, f"expend{i}")) for i in range(1, 5)]
                + [("backbone.mae", self.backbone.mae)]
                + [(f"decoder.dec.{i}", d) for i, d in enumerate(self.decoder.dec)] + [("decoder.proj", self.decoder.proj)])

    def trace(self, x: Tensor) -> Tensor:
        return self.reconstruct_from(x, random_active(x.shape[0], self.grid, self.cfg.mask_ratio, device=x.device))

    def _check_input(self, x: Tensor) -> None:
        want = (self.backbone.in_chans, *self.backbone.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"batch['image'] of shape {tuple(x.shape)} does not fit the backbone: expected "
                             f"[B, {', '.join(map(str, want))}]; set data.crop_size={list(want[1:])}")

    # ------------------------------------------------------------------------------ contract 3
    def forward(self, batch: dict) -> dict:
        x = batch["image"]
        self._check_input(x)
        active = random_active(x.shape[0], self.grid, self.cfg.mask_ratio, device=x.device)
        rec = self.reconstruct_from(x, active)
        loss = masked_patch_mse(rec, x, active, self.cfg.norm_pix_loss)
        return {"loss": loss, "mask_ratio": 1.0 - active.float().mean()}

    @torch.no_grad()
    def reconstruct(self, batch: dict, path: str | Path | None = None) -> np.ndarray:
        """Mid axial slices of ≤ 4 samples: input, masked input, reconstruction (visible patches pasted back, the
        normalisation undone per patch), with a fixed mask so pictures of different steps compare."""
        from medssl.recipes.hi_end_mae import _draw

        was_training = self.training
        self.eval()
        try:
            x = batch["image"][:4].to(self.decoder.proj.weight.dtype)  # the model's dtype (bf16 under DeepSpeed)
            self._check_input(x)
            gen = torch.Generator(device=x.device).manual_seed(0)
            active = random_active(x.shape[0], self.grid, self.cfg.mask_ratio, generator=gen, device=x.device)
            rec = patchify(self.reconstruct_from(x, active).float())  # [n, L, p³]
            inp = patchify(x.float())
            if self.cfg.norm_pix_loss:  # undo the target normalisation with each patch's own statistics
                rec = rec * (inp.var(-1, keepdim=True) + TARGET_EPS).sqrt() + inp.mean(-1, keepdim=True)
            vis = active.flatten(1)[..., None]  # [n, L, 1]
            cols = {"input": inp, "masked": inp.masked_fill(~vis, float("nan")),
                    "reconstruction": torch.where(vis, inp, rec)}
            z = x.shape[-1] // 2
            vols = {k: unpatchify(v, self.grid)[:, 0, :, :, z].cpu().numpy() for k, v in cols.items()}
        finally:
            self.train(was_training)
        return _draw(vols, path, z)

    # ------------------------------------------------------------------------------ engine hooks
    def param_groups(self, weight_decay: float) -> list[dict]:
        """One group, decay on everything, as the official ``AdamW(model.parameters())`` (its param-group helper is
        never called); the decay itself follows ``optim.weight_decay`` → ``optim.weight_decay_end``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": float(weight_decay)}]
