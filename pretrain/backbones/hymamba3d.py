"""``hymamba3d``: MambaMIM's hybrid encoder (FengheTan9/MambaMIM ``models/hymamba.py``: ``Embeddings`` + the
``mae`` Mamba stage) with the official module names, so that the authors' ``*_mambamim_timm_style.pth``
loads key for key (less the unused backward-branch tensors, see ``OFFICIAL_UNUSED``).

Layout for a 96³ crop (channels 32, 64, 128, 192, 384; MedNeXt blocks 2, 2, 2, 1 with expansion 2, 4, 4, 4)::

    embeddings.stem      3³ conv 1 → 32                        96³
    embeddings.expend1   3³ conv 32 → 64              x1raw    96³
    (max-pool) layer2 (2 MedNeXt, 64) expend2 → 128   x2raw    48³
    (max-pool) layer3 (2 MedNeXt, 128) expend3 → 192  x3raw    24³
    (max-pool) layer4 (2 MedNeXt, 192) expend4 → 384  x4raw    12³
    (max-pool) layer5 (1 MedNeXt, 384)                x5        6³
    embeddings.encoder1..4: residual blocks on x1raw..x4raw (channels-first LayerNorm, LeakyReLU)
    mae: + fixed 3D sin-cos pos_embed, 4 × (LN → Mamba → +, LN → MLP 384→768→384 → +) on the 6³ tokens

Contract 2 (docs/DESIGN.md): ``forward_features(x, active=None)`` returns
``[encoder1(x1raw), encoder2(x2raw), encoder3(x3raw), encoder4(x4raw), mae(x5)]`` with ``feature_channels``
64, 128, 192, 384, 384 and ``feature_strides`` 1, 2, 4, 8, 16 (``get_feature_map_channels`` of the official code).

``active`` ([B, 1, X/16, Y/16, Z/16] bool, True = visible) runs the encoder as MambaMIM pretrains it (SparK-style):
the mask is upsampled to every resolution, every convolution and pooling output is multiplied by it, the
LayerNorms leave masked positions at zero, and the Mamba stage runs each sample's visible tokens first (raster
order) and its masked ones, position embedding only, after them: visible outputs are those of a run on the
visible tokens alone (the scan is causal) and masked ones have seen every visible token, which is what the
official code computes (its keep count, summed over the batch, covers every token from 4 crops on).

``checkpoint_blocks`` trades compute for memory: while training with gradients, the first N of the six stages (-1:
all) run under ``torch.utils.checkpoint`` (non-reentrant) — stages 0-4 are the convolutional levels (a level's
pooling, MedNeXt blocks and widening conv, and its ``encoder`` block), stage 5 the Mamba stage, one checkpoint
per Mamba layer. Parameter names, outputs and gradients are unchanged; the setting is a run option, not part of
``config``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..registry import BACKBONES
from .mamba import Mamba
from .vit3d import check_checkpoint_blocks, run_checkpointed, sincos_pos_embed_3d

# tensors of the official checkpoint we do not keep: the Mamba blocks' backward branch (built, never used by the
# one-directional scan: still at their random init in the released file), the pretraining mask token, and the
# fixed sin-cos table (recomputed from the crop size)
OFFICIAL_UNUSED = ("mamba.A_b_log", "mamba.D_b", "mamba.conv1d_b.", "mamba.x_proj_b.", "mamba.dt_proj_b.",
                   "mae.mask_token", "mae.pos_embed")


def upsample_mask(active: Tensor | None, size: Sequence[int]) -> Tensor | None:
    """The visible-patch mask at a feature resolution (``repeat_interleave``, as the official code), as float."""
    if active is None:
        return None
    f = [s // a for s, a in zip(size, active.shape[2:])]
    m = active
    for dim, k in zip((2, 3, 4), f):
        m = m.repeat_interleave(k, dim=dim)
    return m.to(torch.float32)


def _masked(x: Tensor, m: Tensor | None) -> Tensor:
    return x if m is None else x * m.to(x.dtype)


class LayerNorm3d(nn.Module):
    """LayerNorm over channels at every voxel (ConvNeXt's channels_first form, biased variance, eps 1e-6);
    masked positions stay zero (SparK's ``SparseConvNeXtLayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor, m: Tensor | None = None) -> Tensor:
        # the official formula, (x − mean) / sqrt(var + eps) · w + b over channels, as one fused layer_norm on a
        # channels-last view: one saved tensor instead of three full-volume temporaries
        y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return _masked(y.permute(0, 4, 1, 2, 3), m)


class MedNeXtBlock(nn.Module):
    """Depthwise 3³ conv → LayerNorm → 1³ conv ×exp → GELU → 1³ conv back, + input (official ``MedNeXtBlock``)."""

    def __init__(self, channels: int, exp_r: int, kernel: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = LayerNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, exp_r * channels, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(exp_r * channels, channels, 1)

    def forward(self, x: Tensor, m: Tensor | None = None) -> Tensor:
        y = self.norm(_masked(self.conv1(x), m), m)
        y = self.act(_masked(self.conv2(y), m))
        return x + _masked(self.conv3(y), m)


class ResBlock3d(nn.Module):
    """The official (local) ``UnetResBlock``: conv → LN → LeakyReLU → conv → LN, + input (through a 1³ conv + LN
    when the width changes) → LeakyReLU 0.01; convolutions with bias."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv3d(cout, cout, kernel, padding=kernel // 2)
        self.norm1, self.norm2 = LayerNorm3d(cout), LayerNorm3d(cout)
        if cin != cout:
            self.conv3 = nn.Conv3d(cin, cout, 1)
            self.norm3 = LayerNorm3d(cout)

    def forward(self, x: Tensor, m: Tensor | None = None) -> Tensor:
        y = F.leaky_relu(self.norm1(_masked(self.conv1(x), m), m), 0.01)
        y = self.norm2(_masked(self.conv2(y), m), m)
        res = self.norm3(_masked(self.conv3(x), m), m) if hasattr(self, "conv3") else x
        return F.leaky_relu(y + res, 0.01)


class Embeddings(nn.Module):
    def __init__(self, in_chans: int, channels: Sequence[int], depths: Sequence[int], exp_r: Sequence[int]):
        super().__init__()
        c = list(channels)
        self.stem = nn.Conv3d(in_chans, c[0], 3, padding=1)
        self.expend1 = nn.Conv3d(c[0], c[1], 3, padding=1)
        for i in range(2, 6):  # layer2..5 at widths c[1]..c[4]; expend2..4 widen c[i-1] -> c[i]
            setattr(self, f"layer{i}", nn.ModuleList(MedNeXtBlock(c[i - 1], exp_r[i - 1]) for _ in range(depths[i - 1])))
        for i in range(2, 5):
            setattr(self, f"expend{i}", nn.Conv3d(c[i - 1], c[i], 3, padding=1))
        for i in range(1, 5):
            setattr(self, f"encoder{i}", ResBlock3d(c[i], c[i]))
        self.down = nn.MaxPool3d(2)

    def level(self, k: int, x: Tensor, m: Tensor | None) -> Tensor:
        """Level ``k`` of the main path: 0 = stem and expend1; 1-4 = pool, MedNeXt blocks, widen (not after layer5)."""
        if k == 0:
            return _masked(self.expend1(_masked(self.stem(_masked(x, m)), m)), m)
        x = _masked(self.down(x), m)
        for block in getattr(self, f"layer{k + 1}"):
            x = block(x, m)
        return _masked(getattr(self, f"expend{k + 1}")(x), m) if k < 4 else x

    def forward(self, x: Tensor, active: Tensor | None = None, skip: Sequence[int] = (),
                checkpoint_levels: int = 0) -> list[Tensor | None]:
        """``[encoder1(x1raw), …, encoder4(x4raw), x5]``; ``checkpoint_levels`` N: levels 0 … N-1 (-1: all) and
        their encoder blocks under activation checkpointing."""
        size = x.shape[2:]
        mask = lambda k: upsample_mask(active, [s // 2 ** k for s in size])  # noqa: E731
        ckpt = lambda k: checkpoint_levels < 0 or k < checkpoint_levels  # noqa: E731
        raw = []
        for k in range(5):
            x = run_checkpointed(self.level, k, x, mask(k), checkpointed=ckpt(k))  # [B, c_k, X/2^k, Y/2^k, Z/2^k]
            if k < 4:
                raw.append(x)
        skips = [None if i in skip else run_checkpointed(getattr(self, f"encoder{i + 1}"), r, mask(i),
                                                          checkpointed=ckpt(i))
                 for i, r in enumerate(raw)]
        return skips + [x]


def sincos_3d(grid: Sequence[int], dim: int) -> Tensor:
    """The official fixed 3D sin-cos table ([1, N, dim], N = X·Y·Z with Z fastest): dim / 6 frequencies
    1 / 10000^(k / (dim / 6)) per axis, channels [sin x, cos x, sin y, cos y, sin z, cos z], in float32 as the
    official ``build_3d_sincos_position_embedding`` — the same table as the ViT's (real also on the meta device)."""
    return sincos_pos_embed_3d(tuple(grid), dim)[None]


class MambaLayer(nn.Module):
    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mamba(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class MambaStage(nn.Module):
    def __init__(self, grid: Sequence[int], dim: int, depth: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        self.grid = tuple(grid)
        # official: a frozen Parameter holding the same table; a non-persistent buffer here, recomputed for any crop
        # (fine-tuning on another crop size), so exports do not carry it and an imported one is dropped
        self.register_buffer("pos_embed", sincos_3d(self.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(MambaLayer(dim, d_state, d_conv, expand) for _ in range(depth))
        # official init: xavier_uniform on every Linear (Mamba's too) and zero biases, so dt_proj.bias = 0:
        # softplus(0) = 0.69 at the start, not mamba_ssm's [0.001, 0.1]; A_log, D and the convs keep theirs
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor, active: Tensor | None = None, checkpointed: bool = False) -> Tensor:
        """The Mamba layers on the token grid; ``checkpointed``: each layer under activation checkpointing."""
        B, C = x.shape[:2]
        if tuple(x.shape[2:]) != self.grid:
            raise ValueError(f"Mamba stage grid {tuple(x.shape[2:])} != {self.grid}: build hymamba3d with the crop size "
                             f"the model runs on (img_size = 16 × grid)")
        t = x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, C], raster order
        if active is None:
            for blk in self.blocks:
                t = run_checkpointed(blk, t, checkpointed=checkpointed)
            return t.transpose(1, 2).reshape(x.shape)
        # Masked: every sample's visible tokens first, in raster order, then its masked ones (which hold only the
        # position embedding, the convolution stages having zeroed them). The scan is causal, so a visible token's
        # output is that of a run on the visible tokens alone; a masked one's has seen every visible token. That
        # is what the official code computes in practice: it keeps len_keep = the mask summed over the batch,
        # which from 4 crops on is every token, and orders them by an unstable argsort (visible first); here the
        # order is per sample and stable, and the mask token it would append is never needed.
        vis = active.flatten(1)  # [B, N] bool
        if vis.device.type == "cuda":  # checked on the device: no host wait inside the training step
            torch._assert_async(vis.any(1).all(), "every sample needs at least one visible token")
        elif vis.device.type != "meta" and not bool(vis.any(1).all()):  # (meta: --dry-run traces shapes only)
            raise ValueError(f"every sample needs at least one visible token (visible per sample: {vis.sum(1).tolist()})")
        order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[..., None].expand(-1, -1, C)
        seq = torch.gather(t, 1, order)
        for blk in self.blocks:
            seq = run_checkpointed(blk, seq, checkpointed=checkpointed)
        out = torch.empty_like(seq).scatter_(1, order, seq)
        return out.transpose(1, 2).reshape(x.shape)


class HyMamba3D(nn.Module):
    def __init__(self, img_size: int | Sequence[int] = 96, in_chans: int = 1,
                 channels: Sequence[int] = (32, 64, 128, 192, 384), depths: Sequence[int] = (1, 2, 2, 2, 1),
                 exp_r: Sequence[int] = (2, 2, 4, 4, 4), mamba_depth: int = 4, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, checkpoint_blocks: int = 0):
        super().__init__()
        # 0 off, N > 0 the first N of the 6 stages, -1 all (module docstring); an attribute, not in config
        self.checkpoint_blocks = check_checkpoint_blocks(checkpoint_blocks, "stages (5 convolutional levels, then the "
                                                                            "Mamba stage)")
        size = (int(img_size),) * 3 if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)
        if len(size) != 3 or any(s % 16 or s < 16 for s in size):
            raise ValueError(f"img_size {img_size!r}: hymamba3d needs sides that are multiples of 16 (its deepest grid "
                             "is 1/16 of the crop), e.g. 96")
        if len(channels) != 5 or len(depths) != 5 or len(exp_r) != 5:
            raise ValueError("channels, depths and exp_r give 5 values each (stem, levels 2-5)")
        self._config = {"img_size": int(img_size) if isinstance(img_size, (int, float)) else list(size),
                        "in_chans": int(in_chans), "channels": [int(c) for c in channels],
                        "depths": [int(d) for d in depths], "exp_r": [int(e) for e in exp_r],
                        "mamba_depth": int(mamba_depth), "d_state": int(d_state), "d_conv": int(d_conv),
                        "expand": int(expand)}
        self.img_size, self.in_chans = size, int(in_chans)
        self.grid = tuple(s // 16 for s in size)
        self.embeddings = Embeddings(in_chans, channels, depths, exp_r)
        self.mae = MambaStage(self.grid, channels[-1], mamba_depth, d_state, d_conv, expand)
        self.feature_channels = [int(c) for c in channels[1:]] + [int(channels[-1])]
        self.feature_strides = [1, 2, 4, 8, 16]
        self.embed_dim = int(channels[-1])
        self.downstream_decoder = "hymamba"  # fine-tuning's model.arch=auto: the official build_hybird decoder

    @property
    def config(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def no_weight_decay(self) -> set[str]:
        return set()  # the official AdamW decays every parameter (one group)

    def forward_features(self, x: Tensor, active: Tensor | None = None, skip: Sequence[int] = ()) -> list[Tensor | None]:
        """The five feature levels; ``skip`` names levels (0-3) whose ``encoder{i+1}`` block is not run (None in
        their place), for a pretext task that never reads them."""
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"input {tuple(x.shape)} must be [B, {self.in_chans}, X, Y, Z]")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])}: sides must be multiples of 16")
        if active is not None and tuple(active.shape[2:]) != tuple(s // 16 for s in x.shape[2:]):
            raise ValueError(f"active {tuple(active.shape)} must be [B, 1, X/16, Y/16, Z/16]")
        n_ckpt = self.checkpoint_blocks if self.training and torch.is_grad_enabled() else 0
        feats = self.embeddings(x, active, skip, checkpoint_levels=n_ckpt)
        feats[-1] = self.mae(feats[-1], active, checkpointed=n_ckpt < 0 or n_ckpt > 5)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


@BACKBONES.register("hymamba3d")
def hymamba3d(**kwargs) -> HyMamba3D:
    """MambaMIM's hybrid encoder (MedNeXt stages + 4 Mamba layers on the 1/16 grid): 22.3 M parameters at 96³."""
    return HyMamba3D(**kwargs)


@BACKBONES.register("hymamba3d_tiny")
def hymamba3d_tiny(**kwargs) -> HyMamba3D:
    """Channels 8-16-32-48-96, one block per level, 2 Mamba layers: tests and demos."""
    return HyMamba3D(**{"channels": (8, 16, 32, 48, 96), "depths": (1, 1, 1, 1, 1), "mamba_depth": 2, **kwargs})
