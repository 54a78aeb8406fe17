"""Segmentation networks around an exported backbone, built from the manifest's feature layout.

* ViT-like backbones (every feature at one stride, the patch size) get a UNETR decoder made of MONAI's
  UNETR blocks: the image through ``UnetrBasicBlock`` at full resolution, three intermediate taps lifted by
  ``UnetrPrUpBlock`` to 2, 4 and 8 × the token grid, the final tokens merged back up with ``UnetrUpBlock``
  over four ×2 levels, a resize to the crop when 16 × grid ≠ crop, and a ``UnetOutBlock`` head
  (Hatamizadeh et al. 2022; the official Hi-End-MAE downstream network for patch 12).
* ``hymamba3d`` (MambaMIM) gets the official downstream decoder (``HyMambaDecoder``).
* Other multi-scale backbones (CNN, hybrid: strides that grow) get a UNet decoder of MONAI's ``UnetUpBlock``
  from the deepest feature up, with a full-resolution stem block when the finest feature is strided.

Nothing is looked up by layer name: the decoder reads ``feature_strides`` / ``feature_channels`` of the
manifest (contract 2 of docs/DESIGN.md). Keys: ``backbone.*`` (from the export) and ``decoder.*`` (new).
"""

from __future__ import annotations

import re

import torch
from torch import nn


UNETR_LEVELS = 4  # ×2 steps from the token grid, as UNETR (16 = 2^4: patch 16 lands on the crop)


class ResizeUpBlock(nn.Module):
    """The last UNETR level when 16 × grid ≠ crop (the official Hi-End-MAE patch-12 network's
    ``UnetrUpBlock_self``): trilinear resize to the crop, a 3³ conv, concatenation with the image's features,
    and UNETR's conv block."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, res_block: bool):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        block = UnetResBlock if res_block else UnetBasicBlock
        self.conv_block = block(3, 2 * out_ch, out_ch, kernel_size=3, stride=1, norm_name=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv_block(torch.cat([self.conv(x), skip], dim=1))  # [B, out_ch, X, Y, Z]


class UNETRDecoder(nn.Module):
    """UNETR's decoder for features that all sit at one stride (a ViT's token grid g = crop / patch).

    Four ×2 levels from the grid (g → 2g → 4g → 8g → 16g), the skips at 2g, 4g, 8g lifted from the first three
    taps (blocks 3, 6, 9 of a 12-block ViT) by 0, 1 and 2 extra ``UnetrPrUpBlock`` stages, the image itself
    through ``UnetrBasicBlock`` at full resolution. When 16 × g equals the crop (patch 16) the last level is
    UNETR's transposed conv and the network is MONAI's ``UNETR`` parameter for parameter; otherwise (patch 12:
    8³ → 64³ for a 96³ crop) the last level resizes to the crop and convolves, as the official Hi-End-MAE
    downstream network (``downstream/models/UNETR/unetr.py``).

    Keys: ``stem`` (encoder1), ``lifts.0-2`` (encoder2-4), ``ups.3-0`` (decoder5-2), ``head`` (out).
    """

    def __init__(self, in_channels: int, tap_channels: list[int], hidden: int, stride: int, out_channels: int,
                 feature_size: int = 32, norm: str = "instance", res_block: bool = True,
                 crop_size: tuple[int, int, int] | None = None):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        n = UNETR_LEVELS
        if len(tap_channels) < n - 1:
            raise ValueError(f"a UNETR decoder needs {n - 1} intermediate features (UNETR taps blocks 3, 6, 9 of 12); "
                             f"the backbone returns {len(tap_channels)}: build it with out_indices of {n - 1} blocks")
        self.stride = int(stride)
        # the resize level is chosen from the crop the network is built for (None: the transposed conv)
        self.resize = crop_size is not None and any(int(c) != 2 ** n * (int(c) // self.stride) for c in crop_size)
        ch = [feature_size * 2 ** k for k in range(n)]  # level k (2^(n-k) × g, k = 0 is the crop) has ch[k] channels
        self.tap_index = [round(i * (len(tap_channels) - 1) / (n - 2)) for i in range(n - 1)]  # 3 of 3 taps: 0, 1, 2
        self.stem = UnetrBasicBlock(3, in_channels, ch[0], kernel_size=3, stride=1, norm_name=norm, res_block=res_block)
        # skip k (k = 1..3) sits at 2^(n-k) × g: a transposed conv and n-1-k more up-conv stages (2, 1, 0)
        self.lifts = nn.ModuleList(
            UnetrPrUpBlock(3, tap_channels[self.tap_index[k - 1]], ch[k], num_layer=n - 1 - k, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm, conv_block=True, res_block=res_block)
            for k in range(1, n))
        self.ups = nn.ModuleList(
            ResizeUpBlock(ch[1], ch[0], norm, res_block) if k == 0 and self.resize else
            UnetrUpBlock(3, hidden if k == n - 1 else ch[k + 1], ch[k], kernel_size=3, upsample_kernel_size=2,
                         norm_name=norm, res_block=res_block)
            for k in range(n))
        self.head = UnetOutBlock(3, ch[0], out_channels)

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs are the decoder's levels, coarse to fine (for summaries)."""
        return ([("stem", self.stem)] + [(f"lifts.{k}", m) for k, m in enumerate(self.lifts)][::-1]
                + [(f"ups.{k}", m) for k, m in reversed(list(enumerate(self.ups)))] + [("head", self.head)])

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        taps, deep = feats[:-1], feats[-1]  # each [B, D, g0, g1, g2]
        skips = [self.stem(x)] + [lift(taps[i]) for lift, i in zip(self.lifts, self.tap_index)]
        y = deep
        for k in reversed(range(len(self.ups))):
            y = self.ups[k](y, skips[k])  # [B, ch[k], 2^(n-k) × g …]; k = 0: the crop
        return self.head(y)  # [B, K, X, Y, Z]


class UNetDecoder(nn.Module):
    """A UNet decoder over multi-scale features (strides increasing), MONAI ``UnetUpBlock`` per level."""

    def __init__(self, in_channels: int, channels: list[int], strides: list[int], out_channels: int,
                 feature_size: int = 16, norm: str = "instance", res_block: bool = True):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock
        from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock

        if list(strides) != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f"feature strides {strides} must increase for a UNet decoder")
        block = UnetResBlock if res_block else UnetBasicBlock
        self.has_stem = strides[0] > 1
        self.chans = ([feature_size] if self.has_stem else []) + list(channels)
        steps = ([1] if self.has_stem else []) + list(strides)
        if self.has_stem:
            self.stem = block(3, in_channels, feature_size, kernel_size=3, stride=1, norm_name=norm)
        self.ups = nn.ModuleList()
        for k in range(len(self.chans) - 1):
            ratio = steps[k + 1] // steps[k]
            if steps[k + 1] % steps[k]:
                raise ValueError(f"feature strides {strides} must each divide the next")
            self.ups.append(UnetUpBlock(3, self.chans[k + 1], self.chans[k], kernel_size=3, stride=1,
                                        upsample_kernel_size=ratio, norm_name=norm))
        self.head = UnetOutBlock(3, self.chans[0], out_channels)
        self.final_stride = steps[0]

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs are the decoder's levels, coarse to fine (for summaries)."""
        return ([("stem", self.stem)] if self.has_stem else []) + [
            (f"ups.{k}", m) for k, m in reversed(list(enumerate(self.ups)))] + [("head", self.head)]

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        skips = ([self.stem(x)] if self.has_stem else []) + list(feats)
        y = skips[-1]
        for k in reversed(range(len(self.ups))):
            y = self.ups[k](y, skips[k])
        y = self.head(y)
        if self.final_stride > 1:
            y = nn.functional.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
        return y


class HyMambaDecoder(nn.Module):
    """MambaMIM's downstream decoder (``build_hybird`` in ``models/network/hymamba.py``) for ``hymamba3d``: MONAI
    ``UnetrUpBlock`` (instance norm, residual) from the Mamba stage up through the four skips — 384 → 384 → 192 →
    128 → 64 at the official widths — then the encoder's own residual block 64 → 32 (channels-first LayerNorm) and
    a 1³ ``UnetOutBlock``; 19,115,758 parameters for 14 classes, as the official network."""

    def __init__(self, channels: list[int], out_channels: int):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrUpBlock

        from medssl.pretrain.backbones.hymamba3d import ResBlock3d

        if len(channels) != 5:
            raise ValueError(f"the MambaMIM decoder takes 5 features (hymamba3d); got channels {channels}")
        self.ups = nn.ModuleList(UnetrUpBlock(3, channels[k + 1], channels[k], kernel_size=3, upsample_kernel_size=2,
                                              norm_name="instance", res_block=True) for k in range(4))
        self.last = ResBlock3d(channels[0], channels[0] // 2)
        self.head = UnetOutBlock(3, channels[0] // 2, out_channels)

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        return [(f"ups.{k}", m) for k, m in reversed(list(enumerate(self.ups)))] + [("last", self.last),
                                                                                  ("head", self.head)]

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        y = feats[-1]
        for k in reversed(range(4)):
            y = self.ups[k](y, feats[k])
        return self.head(self.last(y))


class SegmentationNet(nn.Module):
    """Backbone + decoder; ``forward(x [B, C, X, Y, Z]) → logits [B, K, X, Y, Z]``."""

    encoder_prefixes = ("backbone.",)

    def __init__(self, backbone: nn.Module, decoder: nn.Module, takes_image: bool = True):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.takes_image = takes_image  # harness decoders read the image too; pretrained (registered) ones do not

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone.forward_features(x)
        if hasattr(self.backbone, "tokens_to_grid"):  # ViT tokens [B, prefix + L, D] → [B, D, g0, g1, g2]
            feats = [self.backbone.tokens_to_grid(f) for f in feats]
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.features(x)) if self.takes_image else self.decoder(self.features(x))


def make_decoder(backbone: nn.Module, arch: str, in_channels: int, out_channels: int, cfg) -> tuple[str, nn.Module]:
    strides, chans = list(backbone.feature_strides), list(backbone.feature_channels)
    if arch == "auto":
        arch = getattr(backbone, "downstream_decoder", None) or ("unetr" if len(set(strides)) == 1 else "unet")
    m = cfg.model
    if arch == "hymamba":
        return arch, HyMambaDecoder(chans, out_channels)
    if arch == "unetr":
        if len(set(strides)) != 1:
            raise ValueError(f"model.arch=unetr needs features at one stride; this backbone gives {strides} (use unet)")
        return arch, UNETRDecoder(in_channels, chans[:-1], chans[-1], strides[0], out_channels, m.feature_size, m.norm,
                                  m.res_block, crop_size=tuple(getattr(backbone, "img_size", ())) or None)
    if arch == "unet":
        return arch, UNetDecoder(in_channels, chans, strides, out_channels, m.feature_size, m.norm, m.res_block)
    raise ValueError(f"model.arch={arch!r} does not fit a medssl backbone: choose auto, unetr, unet or hymamba")


# ----------------------------------------------------------------------------------------- optimisation
def layer_id(name: str) -> int | None:
    """Depth of an encoder parameter for layer-wise lr decay: stem 0, block/stage i → i + 1, None for the
    rest (the final norm), which sits on top with the decoder. hymamba3d: its convolution levels by resolution
    (stem, expend1, encoder1 → 0; layer k, expend k, encoder k → k − 1), then the Mamba layers (mae.blocks.i → 5 + i)."""
    m = re.match(r"embeddings\.(stem|layer|expend|encoder)(\d*)", name)
    if m:
        return 0 if m.group(1) == "stem" else int(m.group(2)) - 1
    m = re.match(r"mae\.blocks\.(\d+)\.", name)
    if m:
        return 5 + int(m.group(1))
    if re.match(r"(patch_embed|cls_token|pos_embed|stem|swinViT\.patch_embed|vit\.patch_embedding)", name):
        return 0
    m = re.search(r"(?:^|\.)(?:blocks|stages|layers)\.?(\d+)\.", name)  # also SwinUNETR's swinViT.layers1..4
    return int(m.group(1)) + 1 if m else None


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, freeze_encoder: bool = False) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) and tokens; the encoder's lr scaled by
    ``layer_decay ** (top - layer)``; frozen encoder parameters left out (requires_grad False)."""
    prefixes = tuple(getattr(model, "encoder_prefixes", ()))
    ids = {n: layer_id(n[len(next(q for q in prefixes if n.startswith(q))):])
           for n, _ in model.named_parameters() if n.startswith(prefixes)}  # encoder parameter → depth
    top = max((i for i in ids.values() if i is not None), default=0) + 1
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        encoder = name in ids
        if encoder and freeze_encoder:
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        lid = ids.get(name)
        scale = layer_decay ** (top - lid) if encoder and lid is not None else 1.0
        decay = 0.0 if (p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "position_embeddings"))) else weight_decay
        g = groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})
        g["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters (model.freeze_encoder with an empty decoder?)")
    return list(groups.values())
