"""Volume Fusion (VolF; Wang et al., MIS-FM, arXiv 2306.16925, TIP 2025; code in HiLab-git/PyMIC).

Unlabelled volumes become a segmentation task: blocks of a foreground sub-volume are blended into a
background sub-volume with a discrete coefficient α = k / K (k ∈ 0..K, 0 = the background kept), and
the network predicts each voxel's k. Unlike masked modelling it trains the whole encoder–decoder, so
the export carries both and fine-tuning can keep the decoder.

Per sample, on the training device and vectorised over the batch (no per-sample Python loops):

1. two random-resized crops of the streamed view (per-axis scale U(0.7, 1.5) × the patch size, clipped
   to the view, resized back with trilinear interpolation) — the foreground and background sub-volumes
   [PyMIC ``crop4vf.random_resized_crop``];
2. each flipped on each axis (p 0.5), contrast-mapped (piecewise linear: below the p0 percentile →
   0–0.1, p0–p1 → 0.1–0.9, above p1 → 0.9–1, p0 ~ U(0.1, 2), p1 ~ U(98, 99.9)), gamma U(0.7, 1.5) within
   the sample's own [min, max], and with p 0.25 both inverted [``Crop4VolumeFusion`` augmentation mode 3];
3. fusion: ``grid`` — one block size per volume, whole blocks tiling a grid with a random offset,
   ⌊0.7·N⌋ of them fused with a random class [``VolumeFusion``]; ``batch`` — a random number of random
   boxes (later ones overwrite earlier ones), the foreground taken from the previous sample of the batch
   [``self_sup/util.py::patch_mix``];
4. x = α·x_fg + (1 − α)·x_bg; loss 0.5 Dice + 0.5 CE over K + 1 classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.pretrain.registry import TASKS


@dataclass
class VolumeFusionConfig:
    variant: str = "grid"  # grid (PyMIC VolumeFusion, MIS-FM README) | batch (the arXiv v1 wording, patch_mix)
    fusion_classes: int = 4  # K: coefficients {0, 1/K, …, 1}; K = cls_num − 1 = 4 [crop4vf]
    patch_size: list = field(default_factory=lambda: [96, 96, 96])  # network input; the stream's crop is the view
    scale: list = field(default_factory=lambda: [0.7, 1.5])  # random-resized-crop scale per axis [crop4vf]
    # grid: per-axis block size range in voxels, X, Y, Z. The LUNA demo's [5, 8, 8]-[20, 32, 32] (D, H, W) for a
    # 64x128x128 patch, reordered to our [X, Y, Z] and scaled to 96^3: [6, 6, 8]-[24, 24, 30].
    block_min: list = field(default_factory=lambda: [6, 6, 8])
    block_max: list = field(default_factory=lambda: [24, 24, 30])
    fg_ratio: float = 0.7  # fraction of grid blocks fused [crop4vf foreground_ratio]
    # batch: boxes per sample and half-sizes, from patch_mix's dataset defaults (4-40 boxes, half-size d 4-20,
    # h/w 4-40 for 128^3) reordered to X, Y, Z and scaled to 96^3. The paper's values are not published.
    boxes: list = field(default_factory=lambda: [4, 40])
    half_min: list = field(default_factory=lambda: [3, 3, 3])
    half_max: list = field(default_factory=lambda: [30, 30, 15])
    flip_prob: float = 0.5  # per axis, per sub-volume [crop4vf random_flip]
    p0: list = field(default_factory=lambda: [0.1, 2.0])  # low percentile range of the contrast map [crop4vf]
    p1: list = field(default_factory=lambda: [98.0, 99.9])  # high percentile range
    gamma: list = field(default_factory=lambda: [0.7, 1.5])
    invert_prob: float = 0.25  # both sub-volumes 1 − x
    out_range: list = field(default_factory=lambda: [-1.0, 1.0])  # augmented views mapped onto the window's range
    dice_weight: float = 0.5  # PyMIC loss [DiceLoss, CrossEntropyLoss] weights [0.5, 0.5]
    ce_weight: float = 0.5
    decoder: str = "fmunet"  # registered decoder (pretrain.registry.DECODERS): FMUNet's [fmunet]
    decoder_kwargs: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- views
def random_resized_crops(view: Tensor, size, scale, gen: torch.Generator | None = None,
                         record: dict | None = None) -> Tensor:
    """Per sample, a box of per-axis size min(⌊size·s⌋, view), s ~ U(scale), at a random place in ``view``
    ``[B, C, V0, V1, V2]``, resized to ``size`` with trilinear interpolation → ``[B, C, *size]``."""
    b, dev = view.shape[0], view.device
    v = torch.tensor(view.shape[2:], device=dev, dtype=torch.float32)  # [3]
    out = torch.tensor(size, device=dev, dtype=torch.float32)
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(b, 3, generator=gen, device=dev)  # [B, 3]
    crop = torch.minimum(torch.floor(out * s), v)  # [B, 3] voxels
    origin = torch.floor(torch.rand(b, 3, generator=gen, device=dev) * (v - crop + 1))  # [B, 3]
    if record is not None:
        record.update(crop=crop.long(), origin=origin.long())
    half = crop / v  # normalised half-extent of the box (grid coordinates span [-1, 1] over the view)
    centre = (2 * origin + crop) / v - 1  # [B, 3]
    theta = torch.zeros(b, 3, 4, device=dev)
    # affine_grid orders coordinates (W, H, D) = our (Z, Y, X): reverse the axes
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = half[:, 2], half[:, 1], half[:, 0]
    theta[:, 0, 3], theta[:, 1, 3], theta[:, 2, 3] = centre[:, 2], centre[:, 1], centre[:, 0]
    grid = F.affine_grid(theta, [b, view.shape[1], *size], align_corners=False)  # [B, *size, 3]
    return F.grid_sample(view, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flips(x: Tensor, p: float, gen: torch.Generator | None = None) -> Tensor:
    for axis in (2, 3, 4):
        m = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1, 1)
        x = torch.where(m, x.flip(axis), x)
    return x


def contrast_map(x: Tensor, q0: Tensor, q1: Tensor) -> Tensor:
    """Piecewise-linear map of each sample: [min, v0] → [0, 0.1], [v0, v1] → [0.1, 0.9], [v1, max] → [0.9, 1]
    with v0, v1 the ``q0``, ``q1`` percentiles (``[B]``, in %) of the sample's voxels."""
    flat = x.flatten(1)  # [B, N]
    sub = flat[:, :: max(1, flat.shape[1] // 200_000)].sort(dim=1).values  # percentiles from ≤ ~200k voxels
    n = sub.shape[1] - 1

    def pct(q):
        return sub.gather(1, (q / 100 * n).round().long().clamp(0, n)[:, None])[:, 0]

    lo, hi = sub[:, 0], sub[:, -1]
    v0, v1 = pct(q0), pct(q1)
    eps = 1e-6
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo, hi, v0, v1 = (t.view(shape) for t in (lo, hi, v0, v1))
    low = 0.1 * (x - lo) / (v0 - lo).clamp_min(eps)
    mid = 0.1 + 0.8 * (x - v0) / (v1 - v0).clamp_min(eps)
    top = 0.9 + 0.1 * (x - v1) / (hi - v1).clamp_min(eps)
    return torch.where(x < v0, low, torch.where(x < v1, mid, top)).clamp(0.0, 1.0)


def gamma_correction(x: Tensor, gamma: Tensor) -> Tensor:
    """Per sample: x rescaled to [0, 1] by its own min and max, raised to ``gamma`` (``[B]``), scaled back
    [PyMIC ``intensity.gamma_correction``]; a constant sample is left unchanged."""
    flat = x.flatten(1)  # [B, N]
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
    span = hi - lo
    varies = span > 0
    u = ((x - lo) / torch.where(varies, span, torch.ones_like(span))).clamp(0.0, 1.0)
    return torch.where(varies, u.pow(gamma.view(shape)) * span + lo, x)


def augment_pair(fg: Tensor, bg: Tensor, cfg: VolumeFusionConfig, gen: torch.Generator | None = None):
    """Flips, contrast map, gamma for each sub-volume; both inverted together with ``invert_prob``; then
    the [0, 1] result mapped onto ``cfg.out_range``."""
    b, dev = fg.shape[0], fg.device

    def uni(lo_hi):
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(b, generator=gen, device=dev)

    out = []
    for x in (fg, bg):
        x = random_flips(x, cfg.flip_prob, gen)
        x = contrast_map(x, uni(cfg.p0), uni(cfg.p1))
        x = gamma_correction(x, uni(cfg.gamma))
        out.append(x)
    inv = (torch.rand(b, generator=gen, device=dev) < cfg.invert_prob).view(-1, 1, 1, 1, 1)
    lo, hi = cfg.out_range
    return [torch.where(inv, 1.0 - x, x) * (hi - lo) + lo for x in out]


# ----------------------------------------------------------------------------------------- fusion labels
def _randint(lo, hi, shape, gen, device) -> Tensor:
    """Integers in [lo, hi] (inclusive, per last axis when lo/hi are lists)."""
    lo_t = torch.as_tensor(lo, device=device)
    hi_t = torch.as_tensor(hi, device=device)
    return lo_t + torch.floor(torch.rand(shape, generator=gen, device=device) * (hi_t - lo_t + 1)).long()


def grid_labels(b: int, size, k: int, block_min, block_max, fg_ratio: float, gen=None, device="cpu",
                record: dict | None = None) -> Tensor:
    """``[B, X, Y, Z]`` class map of the grid variant: per sample one block size ``bs`` ~ U{min..max} per
    axis, ``size // bs`` whole blocks per axis from an offset ~ U{0..size % bs}, ⌊fg_ratio·N⌋ of the N
    blocks chosen at random and given a class ~ U{1..K}; the rest (and the margins) class 0."""
    size_t = torch.as_tensor(size, device=device)
    bs = _randint(block_min, block_max, (b, 3), gen, device)  # [B, 3] block size
    nb = size_t // bs  # [B, 3] whole blocks per axis
    off = torch.floor(torch.rand(b, 3, generator=gen, device=device) * (size_t % bs + 1)).long()  # [B, 3]
    if record is not None:
        record.update(block=bs, blocks=nb, offset=off)
    # the bound on whole blocks per axis (size // block_min), not this batch's maximum: shapes fixed in advance,
    # so the step never waits for the device to say how many blocks it drew
    nmax = [int(sz) // max(1, int(m)) for sz, m in zip(size, block_min)]
    idx, inside = [], []
    for a in range(3):
        v = torch.arange(size[a], device=device)[None] - off[:, a:a + 1]  # [B, S_a]
        blk = torch.div(v, bs[:, a:a + 1], rounding_mode="floor")  # [B, S_a]
        idx.append(blk.clamp(0, nmax[a] - 1))
        inside.append((v >= 0) & (blk < nb[:, a:a + 1]))
    block_id = (idx[0][:, :, None, None] * nmax[1] + idx[1][:, None, :, None]) * nmax[2] + idx[2][:, None, None, :]
    ok = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]  # [B, X, Y, Z]
    # which blocks are fused: the ⌊ratio·N⌋ smallest of N uniform draws; ids outside the sample's grid never are
    gx, gy, gz = torch.meshgrid(*(torch.arange(n, device=device) for n in nmax), indexing="ij")
    valid = ((gx[None] < nb[:, 0, None, None, None]) & (gy[None] < nb[:, 1, None, None, None])
             & (gz[None] < nb[:, 2, None, None, None])).flatten(1)  # [B, Nmax]
    u = torch.rand(valid.shape, generator=gen, device=device).masked_fill(~valid, 2.0)
    rank = u.argsort(1).argsort(1)  # [B, Nmax]
    n_fg = torch.floor(nb.prod(1).double() * fg_ratio).long()  # [B]
    cls = _randint(1, k, valid.shape, gen, device)  # [B, Nmax]
    per_block = torch.where(rank < n_fg[:, None], cls, torch.zeros_like(cls))  # [B, Nmax]
    lab = per_block.gather(1, block_id.flatten(1)).view(b, *size)  # [B, X, Y, Z]
    return torch.where(ok, lab, torch.zeros_like(lab))


def box_labels(b: int, size, k: int, boxes, half_min, half_max, gen=None, device="cpu",
               record: dict | None = None) -> Tensor:
    """``[B, X, Y, Z]`` class map of the batch variant: per sample n ~ U{boxes} boxes of per-axis half-size
    ~ U{half_min..half_max} around a centre ~ U{0..size}, clipped to the patch, class ~ U{1..K}; later
    boxes overwrite earlier ones. One pass per box slot, vectorised over the batch and the voxels."""
    nmax = int(boxes[1])
    n = _randint(boxes[0], boxes[1], (b,), gen, device)  # [B]
    half = _randint(half_min, half_max, (b, nmax, 3), gen, device)  # [B, n, 3]
    centre = _randint([0, 0, 0], list(size), (b, nmax, 3), gen, device)  # [B, n, 3]
    lo = (centre - half).clamp_min(0)
    hi = torch.minimum(centre + half, torch.as_tensor(size, device=device))
    cls = _randint(1, k, (b, nmax), gen, device)  # [B, n]
    if record is not None:
        record.update(n=n, lo=lo, hi=hi, cls=cls)
    coords = [torch.arange(s, device=device) for s in size]
    lab = torch.zeros(b, *size, dtype=torch.long, device=device)
    for j in range(nmax):
        ins = [(c[None] >= lo[:, j, a, None]) & (c[None] < hi[:, j, a, None]) for a, c in enumerate(coords)]  # [B, S_a]
        box = ins[0][:, :, None, None] & ins[1][:, None, :, None] & ins[2][:, None, None, :]  # [B, X, Y, Z]
        box &= (j < n).view(-1, 1, 1, 1)
        lab = torch.where(box, cls[:, j].view(-1, 1, 1, 1), lab)
    return lab


def fuse(fg: Tensor, bg: Tensor, labels: Tensor, k: int) -> Tensor:
    """x = α·fg + (1 − α)·bg with α = label / K per voxel; ``fg``/``bg`` ``[B, C, …]``, labels ``[B, …]``."""
    alpha = (labels.to(fg.dtype) / k)[:, None]  # [B, 1, X, Y, Z]
    return alpha * fg + (1.0 - alpha) * bg


# ----------------------------------------------------------------------------------------- the task
@TASKS.register("volume_fusion")
class VolumeFusion(nn.Module):
    """Backbone + registered decoder trained to segment the fusion coefficients of fused volumes."""

    config_class = VolumeFusionConfig

    def __init__(self, backbone: nn.Module, cfg: VolumeFusionConfig | None = None):
        super().__init__()
        from medssl.pretrain.registry import build_decoder

        cfg = cfg or VolumeFusionConfig()
        if cfg.variant not in ("grid", "batch"):
            raise ValueError(f"task.variant={cfg.variant!r}: choose grid or batch")
        if cfg.fusion_classes < 1:
            raise ValueError(f"task.fusion_classes={cfg.fusion_classes} must be >= 1 (the paper uses 4)")
        if any(lo > hi for lo, hi in zip(cfg.block_min, cfg.block_max)) or min(cfg.block_min) < 1:
            raise ValueError(f"task.block_min {cfg.block_min} must be >= 1 and <= task.block_max {cfg.block_max}")
        if any(b > p for b, p in zip(cfg.block_min, cfg.patch_size)):
            raise ValueError(f"task.block_min {cfg.block_min} exceeds task.patch_size {cfg.patch_size}: no whole block fits")
        stride = max(backbone.feature_strides)
        if any(p % stride for p in cfg.patch_size):
            raise ValueError(f"task.patch_size {cfg.patch_size} must divide by the backbone's deepest stride {stride}")
        self.cfg, self.backbone = cfg, backbone
        self.decoder = build_decoder(backbone, cfg.decoder, backbone.feature_strides, cfg.fusion_classes + 1,
                                     cfg.decoder_kwargs)
        self.decoder.registry_name = cfg.decoder  # recorded in the export's manifest (components.decoder)
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)

    def make_inputs(self, view: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(fused ``[B, C, *P]``, labels ``[B, *P]``, foreground, background) from streamed views ``[B, C, *V]``."""
        c, size = self.cfg, tuple(self.cfg.patch_size)
        with torch.no_grad():
            fg = random_resized_crops(view, size, c.scale, gen)
            bg = random_resized_crops(view, size, c.scale, gen)
            fg, bg = augment_pair(fg, bg, c, gen)
            if c.variant == "grid":
                lab = grid_labels(view.shape[0], size, c.fusion_classes, c.block_min, c.block_max, c.fg_ratio, gen,
                                  view.device)
            else:
                fg = torch.roll(fg, 1, dims=0)  # the foreground comes from the previous sample of the batch
                lab = box_labels(view.shape[0], size, c.fusion_classes, c.boxes, c.half_min, c.half_max, gen,
                                 view.device)
            return fuse(fg, bg, lab, c.fusion_classes), lab, fg, bg

    def logits(self, x: Tensor) -> Tensor:
        return self.decoder(self.backbone.forward_features(x))  # [B, K + 1, *P]

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        """Encoder and decoder levels for ``--dry-run`` (traced through :meth:`trace`)."""
        enc = [(f"backbone.stages.{i}", st.blocks) for i, st in enumerate(self.backbone.stages)] \
            if hasattr(self.backbone, "stages") else []
        dec = getattr(self.decoder, "summary_levels", lambda: [])()
        return enc + [(f"decoder.{n}", m) for n, m in dec]

    def trace(self, view: Tensor) -> Tensor:
        """The network on one fused patch shaped from a streamed view ``[B, C, *V]`` (no augmentation, no loss):
        what ``--dry-run`` runs on the meta device."""
        return self.logits(view.new_empty(view.shape[0], view.shape[1], *self.cfg.patch_size))

    def forward(self, batch: dict) -> dict:
        x, lab, _, _ = self.make_inputs(batch["image"])
        logits = self.logits(x)
        loss = self.loss_fn(logits.float(), lab[:, None])
        with torch.no_grad():
            acc = (logits.argmax(1) == lab).float().mean()
        return {"loss": loss, "voxel_acc": acc.detach(), "fused_fraction": (lab > 0).float().mean()}

    @torch.no_grad()
    def reconstruct(self, batch: dict, path: str | Path | None = None, n: int = 2) -> np.ndarray:
        """Rows = samples; columns: background, foreground, fused, true and predicted coefficient maps
        (the middle axial slice)."""
        was_training = self.training
        self.eval()
        try:
            view = batch["image"][:n]
            x, lab, fg, bg = self.make_inputs(view)
            pred = self.logits(x).argmax(1)
        finally:
            self.train(was_training)
        z = x.shape[-1] // 2
        cols = {"background": bg[:, 0, ..., z], "foreground": fg[:, 0, ..., z], "fused": x[:, 0, ..., z],
                "true k": lab[..., z].float(), "predicted k": pred[..., z].float()}
        from medssl.pretrain.pictures import draw_grid

        k = self.cfg.fusion_classes
        maps = lambda title, r: {"cmap": "viridis", "vmin": 0, "vmax": k} if title.endswith(" k") else {}  # noqa: E731
        import matplotlib

        viridis = matplotlib.colormaps["viridis"]
        legend = {f"k={i}": viridis(i / k) for i in range(k + 1)}  # fusion coefficient classes of the k maps
        return draw_grid({t: v.cpu().numpy() for t, v in cols.items()}, maps, path, legend=legend,
                         row_label=lambda r: f"sample {r}, z={z}")

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on ≥ 2-D weights only (norm scales and biases plain)."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        plain = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]

    def export_components(self) -> dict[str, nn.Module]:
        """What the export carries beside the backbone: the decoder (its class head is re-initialised downstream)."""
        return {"decoder": self.decoder}
