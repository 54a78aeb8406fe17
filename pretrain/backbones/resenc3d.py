"""``resenc3d``: a residual 3D UNet encoder (MIS-FM's FMUNet / PyMIC ``GRUNet``) and two UNet decoders.

The encoder has one level per entry of ``channels`` (FMUNet: 32, 64, 128, 256, 512). Level 0 is a 3³ stem conv
(``in_chans`` → ``channels[0]``) followed by residual blocks at full resolution; every later level halves the
resolution with a pre-activated stride-2 3³ conv and adds residual blocks. Every block is pre-activation (He et
al. 2016): ``convs_per_block`` × [InstanceNorm3d(affine) → LeakyReLU(0.01) → Dropout → Conv3d 3³], plus the
identity (a 1×1 conv when the channels change). ``forward_features(x)`` returns the residual stream of every
level, ``[B, channels[i], X/2^i, Y/2^i, Z/2^i]``, not normalised (the next layer normalises it).

FMUNet itself has 2 single-conv residual units per level: ``blocks_per_level=2, convs_per_block=1``.

``checkpoint_blocks`` trades compute for memory: the first N levels (-1: all; a level is its strided conv and its
residual blocks, the stem stays outside) run under ``torch.utils.checkpoint`` (non-reentrant) while training with
gradients. Parameter names, outputs and gradients are unchanged; the setting is a run option, not part of
``config``.

Both decoders (``DECODERS.build(name, feature_channels=…, feature_strides=…, out_channels=K)``) fit any backbone
whose feature strides double level to level; the class head ``head`` holds the only parameters that depend on
``out_channels``.

* ``fmunet``: FMUNet's ``Decoder`` and ``out_layers[0]`` (MIS-FM ``net/fmunet.py``): residual units on the
  deepest feature, then per level up (norm, act, 1×1 conv to the skip's channels, trilinear ×2), concatenation
  with the skip, a pre-activated 3³ conv 2c → c and residual units; head norm, act, 3³ conv.
* ``unet3d``: the earlier, lighter variant (kept so its exports load): per level the same up step, concatenation,
  residual blocks 2c → c with a 1×1 skip conv; head norm, act, 1×1 conv.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BACKBONES, DECODERS
from .vit3d import check_checkpoint_blocks, run_checkpointed

NEG_SLOPE = 0.01


class PreActConv3d(nn.Sequential):
    """InstanceNorm3d(affine) → LeakyReLU(0.01) → Dropout(p) → Conv3d (``k``³, padding ``k // 2``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dropout: float = 0.0):
        super().__init__(OrderedDict(
            norm=nn.InstanceNorm3d(in_ch, affine=True), act=nn.LeakyReLU(NEG_SLOPE),
            drop=nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            conv=nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)))


class PreActResBlock3d(nn.Module):
    """``x ↦ skip(x) + convs(x)``: ``convs`` pre-activated 3³ convs; ``skip`` is a 1×1 conv when the channels
    change, else the identity."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, convs: int = 2):
        super().__init__()
        self.layers = nn.Sequential(*(PreActConv3d(in_ch if i == 0 else out_ch, out_ch, 3, dropout=dropout)
                                      for i in range(convs)))
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.layers(x)


def kaiming_init_(modules) -> None:
    """He init for convs (normal, fan_out, LeakyReLU 0.01), zero biases, norms (1, 0)."""
    for m in modules:
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=NEG_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm3d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _per_level(name: str, value, levels: int) -> list[float]:
    vals = [float(value)] * levels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != levels or not all(0.0 <= v < 1.0 for v in vals):
        raise ValueError(f"{name} {value!r} must be one probability in [0, 1) or {levels} of them (one per level), "
                         f"e.g. {[0.0] * min(2, levels) + [0.2] * max(0, levels - 2)}")
    return vals


def _check_widths(channels, blocks_per_level: int, convs_per_block: int) -> list[int]:
    chans = [int(c) for c in channels]
    if not chans or min(chans) < 1:
        raise ValueError(f"channels {channels!r} must be a non-empty list of positive ints, e.g. [32, 64, 128, 256, 512]")
    if blocks_per_level < 1 or convs_per_block < 1:
        raise ValueError(f"blocks_per_level {blocks_per_level} and convs_per_block {convs_per_block} must be >= 1 "
                         f"(FMUNet: 2 and 1)")
    return chans


class ResEnc3D(nn.Module):
    """Residual 3D UNet encoder. Contract 2 (docs/DESIGN.md): ``forward_features(x, keep=None) -> list[Tensor]``,
    one feature per level, with ``feature_channels`` = ``channels`` and ``feature_strides`` = 1, 2, 4, …

    ``img_size`` (int or 3 ints) is only checked: each side must be a multiple of ``2 ** (levels - 1)``.
    ``dropout``: one probability, or one per level; ``None`` is FMUNet's [0, 0, 0.2, 0.2, …].
    ``checkpoint_blocks``: 0 off, N > 0 the first N levels, -1 every level under activation checkpointing when
    training with gradients (an attribute that may also be set after construction).
    """

    def __init__(self, img_size: int | Sequence[int] = 96, in_chans: int = 1,
                 channels: Sequence[int] = (32, 64, 128, 256, 512), blocks_per_level: int = 2,
                 convs_per_block: int = 2, dropout: float | Sequence[float] | None = None, checkpoint_blocks: int = 0):
        super().__init__()
        self.checkpoint_blocks = check_checkpoint_blocks(checkpoint_blocks, "levels")  # not in config
        chans = _check_widths(channels, int(blocks_per_level), int(convs_per_block))
        if dropout is None:  # FMUNet: none in the two finest levels, 0.2 below
            dropout = [0.0 if i < 2 else 0.2 for i in range(len(chans))]
        drops = _per_level("dropout", dropout, len(chans))
        self.divisor = 2 ** (len(chans) - 1)
        size = (int(img_size),) * 3 if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"img_size {img_size!r} must be an int or 3 positive ints (a crop X×Y×Z), e.g. 96")
        _check_size(size if not isinstance(img_size, (int, float)) else size[0], self.divisor, "img_size")
        if int(in_chans) < 1:
            raise ValueError(f"in_chans {in_chans!r} must be >= 1 (1 for CT, the number of sequences for MRI)")
        self._config = {"img_size": int(img_size) if isinstance(img_size, (int, float)) else list(size),
                        "in_chans": int(in_chans), "channels": chans, "blocks_per_level": int(blocks_per_level),
                        "convs_per_block": int(convs_per_block), "dropout": drops}
        self.img_size, self.in_chans = size, int(in_chans)
        self.feature_channels = list(chans)
        self.feature_strides = [2 ** i for i in range(len(chans))]

        self.stem = nn.Conv3d(in_chans, chans[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i, (c, p) in enumerate(zip(chans, drops)):
            stage = nn.Module()
            if i > 0:
                stage.down = PreActConv3d(chans[i - 1], c, 3, stride=2)
            stage.blocks = nn.Sequential(*(PreActResBlock3d(c, c, p, int(convs_per_block))
                                           for _ in range(int(blocks_per_level))))
            self.stages.append(stage)
        self.init_weights()

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``build_backbone(name, **config)`` rebuilds the model."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def init_weights(self) -> None:
        kaiming_init_(self.modules())

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> list[Tensor]:
        """The residual stream after each level: ``[B, channels[i], X/2^i, Y/2^i, Z/2^i]`` for i = 0 … levels-1."""
        if keep is not None:
            raise ValueError("resenc3d is a CNN and has no tokens to drop: keep is not supported; a masking recipe "
                             "masks the input volume instead and calls forward_features(x)")
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"input {tuple(x.shape)} must be [B, {self.in_chans}, X, Y, Z]: build the backbone with "
                             f"in_chans={x.shape[1] if x.dim() == 5 else 1} for this data")
        _check_size(tuple(x.shape[2:]), self.divisor, "input of spatial size")
        feats = []
        x = self.stem(x)  # [B, c0, X, Y, Z]
        n_ckpt = self.checkpoint_blocks if self.training and torch.is_grad_enabled() else 0
        for i, stage in enumerate(self.stages):
            x = run_checkpointed(_run_level, stage, x, checkpointed=n_ckpt < 0 or i < n_ckpt)  # [B, c_i, X/2^i, …]
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def _run_level(stage: nn.Module, x: Tensor) -> Tensor:
    """One encoder level: the strided conv (every level but the first) and the residual blocks."""
    if hasattr(stage, "down"):
        x = stage.down(x)  # [B, c_i, X/2^i, Y/2^i, Z/2^i]
    return stage.blocks(x)


def _check_size(size, divisor: int, what: str) -> None:
    sides = (size,) * 3 if isinstance(size, int) else tuple(size)
    if any(s % divisor for s in sides):
        fixed = [max(divisor, round(s / divisor) * divisor) for s in sides]
        eg = fixed[0] if isinstance(size, int) else tuple(fixed)
        raise ValueError(f"{what} {size} is not divisible by {divisor} (the encoder halves the resolution "
                         f"{divisor.bit_length() - 1} times): use a crop that is a multiple of {divisor}, e.g. {eg}")


def _check_layout(chans: list[int], feature_strides, out_channels) -> list[int]:
    strides = [int(s) for s in feature_strides]
    if len(strides) != len(chans) or any(b != 2 * a for a, b in pairwise(strides)):
        raise ValueError(f"feature_strides {list(feature_strides)} must give one stride per feature channel "
                         f"({len(chans)}), each twice the previous, e.g. {[2 ** i for i in range(len(chans))]}; "
                         f"features at one stride (a ViT) need a UNETR decoder")
    if int(out_channels) < 1:
        raise ValueError(f"out_channels {out_channels!r} must be >= 1 (the number of classes, background included)")
    return strides


def _check_feats(feats: Sequence[Tensor], chans: list[int]) -> None:
    if len(feats) != len(chans) or any(f.dim() != 5 or f.shape[1] != c for f, c in zip(feats, chans)):
        got = [tuple(f.shape) for f in feats]
        raise ValueError(f"the decoder expects {len(chans)} features [B, C, X, Y, Z] with C = {chans}; got shapes "
                         f"{got}: build it from the backbone's feature_channels / feature_strides (ViT tokens go "
                         f"through tokens_to_grid first)")


@DECODERS.register("unet3d")
class UNetDecoder3D(nn.Module):
    """UNet decoder over features whose strides double level to level; ``forward(feats) -> [B, K, …]`` logits at
    the stride of ``feats[0]``. Keys: ``levels.i.up`` / ``levels.i.blocks`` (into level i), ``norm``, ``head``."""

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int,
                 blocks_per_level: int = 1, dropout: float | Sequence[float] = 0.0, convs_per_block: int = 2):
        super().__init__()
        chans = _check_widths(feature_channels, int(blocks_per_level), int(convs_per_block))
        strides = _check_layout(chans, feature_strides, out_channels)
        drops = _per_level("dropout", dropout, len(chans))
        self._config = {"feature_channels": chans, "feature_strides": strides, "out_channels": int(out_channels),
                        "blocks_per_level": int(blocks_per_level), "dropout": drops,
                        "convs_per_block": int(convs_per_block)}
        self.feature_channels, self.feature_strides, self.out_channels = chans, strides, int(out_channels)
        self.levels = nn.ModuleList()
        for i in range(len(chans) - 1):
            level = nn.Module()
            level.up = PreActConv3d(chans[i + 1], chans[i], kernel_size=1)
            level.blocks = nn.Sequential(*(PreActResBlock3d(2 * chans[i] if j == 0 else chans[i], chans[i], drops[i],
                                                             int(convs_per_block)) for j in range(int(blocks_per_level))))
            self.levels.append(level)
        self.norm = nn.InstanceNorm3d(chans[0], affine=True)
        self.head = nn.Conv3d(chans[0], int(out_channels), 1)
        kaiming_init_(self.modules())

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``UNetDecoder3D.from_config(config)`` rebuilds it."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict) -> UNetDecoder3D:
        return cls(**config)

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs are the decoder's levels, coarse to fine (``--dry-run`` summaries)."""
        return [(f"levels.{i}.blocks", lv.blocks) for i, lv in reversed(list(enumerate(self.levels)))] + [("head", self.head)]

    def forward_levels(self, feats: Sequence[Tensor], depth: int | None = None) -> list[Tensor]:
        """The deepest feature and the output of each level block, finest first; ``depth`` runs only the first
        ``depth`` blocks from the bottleneck (a recipe that pretrains part of the decoder)."""
        _check_feats(feats, self.feature_channels)
        y = feats[-1]  # [B, c_L, …] deepest
        out = [y]
        for i in list(reversed(range(len(self.levels))))[:depth]:
            skip = feats[i]  # [B, c_i, X_i, Y_i, Z_i]
            up = F.interpolate(self.levels[i].up(y), size=skip.shape[2:], mode="trilinear", align_corners=True)
            y = self.levels[i].blocks(torch.cat([skip, up], dim=1))  # [B, 2·c_i, …] → [B, c_i, X_i, Y_i, Z_i]
            out.append(y)
        return out[::-1]

    def level_prefixes(self, depth: int) -> list[str]:
        """Parameter-name prefixes of the first ``depth`` blocks from the bottleneck."""
        n = len(self.levels)
        return [f"levels.{i}." for i in range(n - 1, n - 1 - depth, -1)]

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        y = self.forward_levels(feats)[0]
        return self.head(F.leaky_relu(self.norm(y), NEG_SLOPE))  # [B, K, X_0, Y_0, Z_0]


@DECODERS.register("fmunet")
class FMUNetDecoder3D(nn.Module):
    """FMUNet's decoder and output layer (MIS-FM ``net/fmunet.py``: ``Decoder`` + ``out_layers[0]``) over features
    whose strides double; ``forward(feats) -> [B, K, …]`` logits at the stride of ``feats[0]``.

    ``bottleneck``: ``blocks_per_level`` single-conv residual units on the deepest feature (``de_conv4``); per level
    i from the second deepest up, ``levels.i.up`` (pre-activated 1×1 conv c_{i+1} → c_i, then trilinear ×2,
    align_corners), ``levels.i.fuse`` (pre-activated 3³ conv on cat[skip, up], 2c_i → c_i) and ``levels.i.blocks``
    (units, ``de_conv_i``); ``head``: norm, act, 3³ conv c_0 → K (``out_layers[0]``; FMUNet's three other heads
    serve deep supervision only and are not built). ``dropout``: one probability or one per level; ``None`` is
    FMUNet's 0 on the two finest levels and 0.2 below. FMUNet's depth is ``blocks_per_level`` (2).
    """

    # re-initialised by fine-tuning (manifest components.*.head): the class conv only; its norm keeps the pretrained
    # affine, as PyMIC's fine-tuning loads every tensor whose shape still fits
    head_prefix = "head.conv."

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int,
                 blocks_per_level: int = 2, dropout: float | Sequence[float] | None = None):
        super().__init__()
        chans = _check_widths(feature_channels, int(blocks_per_level), 1)
        strides = _check_layout(chans, feature_strides, out_channels)
        if dropout is None:  # FMUNet: de_conv0, de_conv1 without, the deeper ones 0.2
            dropout = [0.0 if i < 2 else 0.2 for i in range(len(chans))]
        drops = _per_level("dropout", dropout, len(chans))
        n = int(blocks_per_level)
        self._config = {"feature_channels": chans, "feature_strides": strides, "out_channels": int(out_channels),
                        "blocks_per_level": n, "dropout": drops}
        self.feature_channels, self.feature_strides, self.out_channels = chans, strides, int(out_channels)

        def units(i):  # FMUNet ResConv: x = conv(x) + x, n times
            return nn.Sequential(*(PreActResBlock3d(chans[i], chans[i], drops[i], convs=1) for _ in range(n)))

        self.bottleneck = units(len(chans) - 1)
        self.levels = nn.ModuleList()
        for i in range(len(chans) - 1):
            level = nn.Module()
            level.up = PreActConv3d(chans[i + 1], chans[i], kernel_size=1)
            level.fuse = PreActConv3d(2 * chans[i], chans[i], kernel_size=3)
            level.blocks = units(i)
            self.levels.append(level)
        self.head = PreActConv3d(chans[0], int(out_channels), kernel_size=3)
        # FMUNet: PyMIC Initialization_He, kaiming_normal_(a=0.01) in its default fan_in mode; ours is fan_out
        kaiming_init_(self.modules())

    @property
    def config(self) -> dict:
        """The constructor kwargs (JSON-serialisable): ``FMUNetDecoder3D.from_config(config)`` rebuilds it."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict) -> FMUNetDecoder3D:
        return cls(**config)

    def forward_levels(self, feats: Sequence[Tensor], depth: int | None = None) -> list[Tensor]:
        """The decoder's output at every level, finest first: ``[B, c_i, X_i, Y_i, Z_i]`` (FMUNet's ``x_i_de``);
        ``depth`` runs only the bottleneck and the first ``depth`` blocks from it."""
        _check_feats(feats, self.feature_channels)
        y = self.bottleneck(feats[-1])  # [B, c_L, …] deepest
        out = [y]
        for i in list(reversed(range(len(self.levels))))[:depth]:
            skip, level = feats[i], self.levels[i]  # [B, c_i, X_i, Y_i, Z_i]
            up = F.interpolate(level.up(y), size=skip.shape[2:], mode="trilinear", align_corners=True)
            y = level.blocks(level.fuse(torch.cat([skip, up], dim=1)))  # [B, 2·c_i, …] → [B, c_i, X_i, Y_i, Z_i]
            out.append(y)
        return out[::-1]

    def level_prefixes(self, depth: int) -> list[str]:
        """Parameter-name prefixes of the bottleneck and the first ``depth`` blocks from it."""
        n = len(self.levels)
        return ["bottleneck."] + [f"levels.{i}." for i in range(n - 1, n - 1 - depth, -1)]

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs are the decoder's levels, coarse to fine (``--dry-run`` summaries)."""
        return ([("bottleneck", self.bottleneck)] + [(f"levels.{i}.blocks", lv.blocks)
                                                      for i, lv in reversed(list(enumerate(self.levels)))]
                + [("head", self.head)])

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.head(self.forward_levels(feats)[0])  # [B, K, X_0, Y_0, Z_0]


def _resenc3d(defaults: dict, kwargs: dict) -> ResEnc3D:
    return ResEnc3D(**{**defaults, **kwargs})


@BACKBONES.register("resenc3d")
def resenc3d(**kwargs) -> ResEnc3D:
    """FMUNet (MIS-FM ``fmunet.py`` / PyMIC ``grunet.py``): widths [32, 64, 128, 256, 512], 2 single-conv
    pre-activation residual units per level, dropout [0, 0, 0.2, 0.2, 0.2] — 23.6 M parameters."""
    return _resenc3d({"channels": [32, 64, 128, 256, 512], "blocks_per_level": 2, "convs_per_block": 1}, kwargs)


@BACKBONES.register("resenc3d_tiny")
def resenc3d_tiny(**kwargs) -> ResEnc3D:
    """[8, 16, 32, 64, 128], 1 block per level: tests and demos."""
    return _resenc3d({"channels": [8, 16, 32, 64, 128], "blocks_per_level": 1}, kwargs)
