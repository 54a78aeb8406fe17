"""``contrastive``: global + local contrastive learning (Chaitanya et al., NeurIPS 2020; code
krishnabits001/domain_specific_cl, 2D TensorFlow 1) on 3D crops, any backbone with a UNet-style feature pyramid.

Two stages (``task.stage``; ``both`` runs global then local in one run, the local stage starting from the global
stage's weights):

* **global** — encoder + projection head g1 (pooled deepest feature → 1024, BatchNorm, ReLU → 128, no biases), NT-Xent at
  τ = 0.1 over cosine similarities. Every term is −log[e^{s(a,p)} / (e^{s(a,p)} + Σ_n e^{s(a,n)})] with the
  positive added explicitly and the negatives n chosen by the strategy; every positive pair counts in both
  directions. Strategies (``task.strategy``), with S partitions along the volume's cranio-caudal axis:

  - ``random`` (G^R): two augmented views of each crop; positives = the other view of the same crop, negatives =
    every other crop's views (SimCLR).
  - ``domain_minus`` (G^{D−}): the crop and two augmented views; positives = the views of the same crop,
    negatives = crops of the other partitions (same-partition crops of other volumes are neither).
  - ``domain`` (G^D, the paper's best): the crop and one augmented view; positives = every crop of the same
    partition, this volume's or another's, with their views; negatives = the other partitions.

  Views: a random cube of ``crop_scale`` × the side resized back (the official 100 of 192 pixels), brightness
  ±0.3 then contrast ×U(0.7, 1.3) about the crop's mean, clipped to 1.5 × the window's range. Batches are m
  volumes × S partitions: the stream centres crop j of each volume in partition j and keeps a volume's crops
  together (``data.partitions``, ``data.pool_size 1``), so no entry is padding (the official G^D batch leaves a
  third of its rows zero).

* **local** — the encoder frozen, the first L decoder blocks from the bottleneck (``decoder_blocks``, L = 3)
  trained with a head g2 (1×1 conv, BatchNorm, ReLU, 1×1 conv) and a shared linear map of each 3×3×3 region to
  128. Two intensity-only views of the same crop, so positions correspond; regions at the 3 × 3 × 3 lattice
  {0, g/2, g}³ plus the 8 quarter points {g/4, 3g/4}³ of the decoder map (g = side − 4; the 2D code's 9 + 4);
  positive = the same region in the other view, negatives = every other region of both views of that crop.

Negatives come from every rank: embeddings are gathered with their gradients (``pretrain.engine.gather_rows``),
so the contrastive batch is world × micro_batch crops; each rank's loss is its terms' share of the global mean,
and DeepSpeed's gradient average makes the result that of one process holding the whole batch.

Departures, each for a reason at the line: g1 pools the deepest feature (the official flattens a 6×6×128 map; a
6³×512 one would make a 113 M-parameter layer) and has a BatchNorm1d after its first dense layer (official: none;
its encoder's BatchNorm centres each batch, our InstanceNorm encoder does not, and without it the embeddings
collapse onto a shared offset and the loss stays at chance); partitioned crops are centred in-plane on the body
(the official samples are whole slices); G^D counts every same-partition crop as a positive (the
official pairs a crop with one other volume's, leaving the rest out of both sums); losses are means over terms
(the official divides sums by the number of rows); local negatives are every other region (the official lists
5 neighbours per region by hand, in 2D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.pretrain.config import ConfigError
from medssl.pretrain.layers import fp32_region
from medssl.pretrain.registry import TASKS

STRATEGIES = ("random", "domain_minus", "domain")
STAGES = ("global", "local", "both")


@dataclass
class ContrastiveConfig:
    stage: str = "both"  # global | local | both (global for the first global_steps steps, then local)
    global_steps: int = 10001  # stage both: steps of the global stage (the paper: 10 001 per stage); a step
    #                            count, not a fraction, so that extending train.steps on resume lengthens the local stage
    strategy: str = "domain"  # random (G^R) | domain_minus (G^{D-}) | domain (G^D, the paper's best)
    partitions: int = 4  # S along the cranio-caudal axis (paper: 4); data.partitions must match
    temperature: float = 0.1  # τ of both losses
    global_pool: str = "avg"  # avg | flatten (official: flatten, 2D; see the module docstring)
    proj_hidden: int = 1024  # g1: dense 1024 (ReLU) → 128, no biases
    proj_norm: str = "batch"  # batch: BatchNorm1d after g1's first dense layer (official: none, see the docstring) | none
    proj_dim: int = 128
    crop_scale: float = 0.52  # the views' random cube, a fraction of each side (official 100 / 192 pixels)
    brightness: float = 0.3  # + U(±0.3)
    contrast: list = field(default_factory=lambda: [0.7, 1.3])  # × U(0.7, 1.3) about the crop's mean
    clip: float = 1.5  # clip to [lo, lo + 1.5·(hi − lo)] of data.window_out (official [0, 1.5] on [0, 1] data)
    decoder: str = "unet3d"  # registered decoder (pretrain.registry.DECODERS) exported for fine-tuning
    decoder_kwargs: dict = field(default_factory=dict)
    decoder_blocks: int = 3  # L: decoder blocks from the bottleneck trained by the local loss (paper: 3)
    region: int = 3  # local regions: region³ windows of the decoder map (official 3×3)
    local_dim: int = 128  # shared linear map of a flattened region

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"task.stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"task.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.global_steps < 1:
            raise ConfigError(f"task.global_steps={self.global_steps}: the global stage's steps under stage=both, "
                              "e.g. 10001 (the paper's)")
        if self.partitions < 1 or self.temperature <= 0:
            raise ConfigError(f"task.partitions={self.partitions} must be >= 1 and task.temperature="
                              f"{self.temperature} > 0")
        if self.proj_norm not in ("batch", "none"):
            raise ConfigError(f"task.proj_norm={self.proj_norm!r}: choose batch or none")
        if self.global_pool not in ("avg", "flatten"):
            raise ConfigError(f"task.global_pool={self.global_pool!r}: choose avg or flatten")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ConfigError(f"task.crop_scale={self.crop_scale}: a fraction in (0, 1] of the crop's side")
        if self.decoder_blocks < 1 or self.region < 1:
            raise ConfigError(f"task.decoder_blocks={self.decoder_blocks} and task.region={self.region} must be >= 1")


# ----------------------------------------------------------------------------------------- losses
def info_nce_terms(sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Every term −log[e^{s_ap} / (e^{s_ap} + Σ_{n ∈ neg(a)} e^{s_an})] for the pairs (a, p) of ``pos``, flattened.
    ``sim`` [A, R] (already divided by τ); ``pos``, ``neg`` [A, R] bool."""
    neg_lse = torch.logsumexp(sim.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # −inf: no negatives
    return (torch.logaddexp(sim, neg_lse) - sim)[pos]


def pair_masks(crop: Tensor, part: Tensor, strategy: str) -> tuple[Tensor, Tensor]:
    """Positive and negative masks [R, R] over rows with crop ids ``crop`` and partitions ``part`` ([R] each)."""
    same_crop = crop[:, None] == crop[None, :]
    same_part = part[:, None] == part[None, :]
    eye = torch.eye(len(crop), dtype=torch.bool, device=crop.device)
    if strategy == "random":
        return same_crop & ~eye, ~same_crop
    if strategy == "domain_minus":
        return same_crop & ~eye, ~same_part
    return same_part & ~eye, ~same_part  # domain


def global_loss(z: Tensor, crop: Tensor, part: Tensor, strategy: str, temperature: float) -> Tensor:
    """NT-Xent of this rank's rows ``z`` [R, D] (not yet normalised) against every rank's rows. ``crop`` and
    ``part`` [R]: crop ids unique within the rank, partitions. Returns this rank's share of the mean over all
    ranks' terms, scaled by the world size, so that the ranks' average — what DeepSpeed's gradient averaging
    optimises — is the mean over every term of the gathered batch."""
    with fp32_region(z.device):  # similarities and logsumexp in fp32 also under bf16 autocast
        return _global_loss(z, crop, part, strategy, temperature)


def _global_loss(z: Tensor, crop: Tensor, part: Tensor, strategy: str, temperature: float) -> Tensor:
    from medssl.pretrain import engine

    world, rank = engine.world_size(), engine.rank()
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # fp32 at least (also under bf16)
    z_all = engine.gather_rows(z)  # [W·R, D], gradients back to each rank's rows
    crop_all = engine.gather_rows(crop + rank * len(crop))  # crop ids < R: unique over the ranks after the shift
    part_all = engine.gather_rows(part)
    pos_all, neg_all = pair_masks(crop_all, part_all, strategy)
    rows = slice(rank * len(crop), (rank + 1) * len(crop))
    sim = z_all[rows] @ z_all.t() / temperature  # [R, W·R]
    terms = info_nce_terms(sim, pos_all[rows], neg_all[rows])
    total = int(pos_all.sum())
    if total == 0:
        return sim.sum() * 0.0
    return terms.sum() * world / total


def region_starts(side: int, region: int) -> tuple[list[int], list[int]]:
    """Start offsets along one axis: the 2D code's lattice {0, g/2, g} with g = side − region − 1 (its side − 4
    for 3×3 regions), and the quarter points {g/4, 3g/4}; offsets at or below side − region."""
    g = max(0, side - region - 1)
    return [round(g * f) for f in (0.0, 0.5, 1.0)], [round(g * f) for f in (0.25, 0.75)]


def region_grid(side: tuple[int, int, int], region: int) -> Tensor:
    """[N, 3] region start corners: the 3 × 3 × 3 lattice, then the 8 quarter points (35 regions)."""
    lat, quart = zip(*(region_starts(s, region) for s in side))
    pts = [(a, b, c) for a in lat[0] for b in lat[1] for c in lat[2]]
    pts += [(a, b, c) for a in quart[0] for b in quart[1] for c in quart[2]]
    return torch.tensor(pts, dtype=torch.long)


def gather_regions(fmap: Tensor, starts: Tensor, region: int) -> Tensor:
    """[B, C, X, Y, Z] → [B, N, C·region³]: each region³ window at ``starts`` [N, 3], flattened channels first."""
    B, C = fmap.shape[:2]
    win = fmap.unfold(2, region, 1).unfold(3, region, 1).unfold(4, region, 1)  # [B, C, X', Y', Z', r, r, r]
    picked = win[:, :, starts[:, 0], starts[:, 1], starts[:, 2]]  # [B, C, N, r, r, r]
    return picked.permute(0, 2, 1, 3, 4, 5).reshape(B, len(starts), C * region ** 3)


def local_loss(r1: Tensor, r2: Tensor, temperature: float) -> Tensor:
    """Mean over crops, regions and both directions of the local term: ``r1``, ``r2`` [B, N, D] region vectors of
    the two views; positive = the same region in the other view, negatives = every other region of both views."""
    with fp32_region(r1.device):  # similarities and logsumexp in fp32 also under bf16 autocast
        return _local_loss(r1, r2, temperature)


def _local_loss(r1: Tensor, r2: Tensor, temperature: float) -> Tensor:
    B, N, _ = r1.shape
    v = torch.cat([r1, r2], 1)  # [B, 2N, D]: view 1's regions, then view 2's
    v = F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=2)
    sim = v @ v.transpose(1, 2) / temperature  # [B, 2N, 2N]
    idx = torch.arange(2 * N, device=v.device)
    region = idx % N
    pos = (region[:, None] == region[None, :]) & (idx[:, None] != idx[None, :])  # the other view's same region
    neg = region[:, None] != region[None, :]
    return info_nce_terms(sim.reshape(B * 2 * N, 2 * N), pos.repeat(B, 1), neg.repeat(B, 1)).mean()


# ----------------------------------------------------------------------------------------- views
def intensity_views(x: Tensor, cfg: ContrastiveConfig, lo: float, hi: float, gen=None) -> Tensor:
    """Per crop: + U(±brightness), then × U(contrast) about the crop's mean, then clipped to
    [lo, lo + clip·(hi − lo)] (official: one draw per batch; here one per crop)."""
    b, dev = x.shape[0], x.device
    shape = (b,) + (1,) * (x.dim() - 1)
    delta = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * cfg.brightness * (hi - lo)
    f = cfg.contrast[0] + (cfg.contrast[1] - cfg.contrast[0]) * torch.rand(b, generator=gen, device=dev)
    y = x + delta.view(shape).to(x.dtype)
    mean = y.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    y = (y - mean) * f.view(shape).to(x.dtype) + mean
    return y.clamp(lo, lo + cfg.clip * (hi - lo))


def augmented_views(x: Tensor, cfg: ContrastiveConfig, lo: float, hi: float, gen=None) -> Tensor:
    """A random cube of ``crop_scale`` × each side resized back to the crop, then the intensity change."""
    from medssl.recipes.volume_fusion import random_resized_crops

    size = tuple(x.shape[2:])
    return intensity_views(random_resized_crops(x, size, (cfg.crop_scale, cfg.crop_scale), gen), cfg, lo, hi, gen)


# ----------------------------------------------------------------------------------------- heads
class LocalHead(nn.Module):
    """g2: 1×1 conv (no bias), BatchNorm, ReLU, 1×1 conv (no bias) on the decoder map; then each flattened region
    through one shared linear map (no bias) to ``dim``."""

    def __init__(self, channels: int, region: int, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(channels, channels, 1, bias=False), nn.BatchNorm3d(channels),
                                  nn.ReLU(inplace=True), nn.Conv3d(channels, channels, 1, bias=False))
        self.proj = nn.Linear(channels * region ** 3, dim, bias=False)


@TASKS.register("contrastive")
class Contrastive(nn.Module):
    config_class = ContrastiveConfig

    def __init__(self, backbone: nn.Module, cfg: ContrastiveConfig | None = None):
        super().__init__()
        from medssl.pretrain.registry import build_decoder

        self.cfg = cfg = cfg or ContrastiveConfig()
        cfg.__post_init__()  # the checks again: overrides are set after the dataclass was built
        strides = list(getattr(backbone, "feature_strides", []))
        if len(strides) < 2 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"contrastive needs a backbone with a UNet-style feature pyramid (strides doubling, e.g. "
                              f"resenc3d); {type(backbone).__name__} gives strides {strides}: set model.backbone=resenc3d")
        levels = len(strides) - 1
        if cfg.decoder_blocks > levels:
            raise ConfigError(f"task.decoder_blocks={cfg.decoder_blocks}: the decoder of this backbone has {levels} "
                              f"blocks; use 1-{levels}")
        self.backbone = backbone
        chans = list(backbone.feature_channels)
        self.decoder = build_decoder(backbone, cfg.decoder, strides, 2, cfg.decoder_kwargs)
        self.decoder.registry_name = cfg.decoder  # recorded in the export's manifest (components.decoder)
        size = tuple(getattr(backbone, "img_size", None) or (96, 96, 96))
        # per-axis strides where a backbone's levels are anisotropic (nnU-Net plans), else the same on every axis
        per_axis = getattr(backbone, "feature_strides_xyz", None) or [(s, s, s) for s in strides]
        deep = [s // st for s, st in zip(size, per_axis[-1])]
        head_in = chans[-1] * (math.prod(deep) if cfg.global_pool == "flatten" else 1)
        norm = [nn.BatchNorm1d(cfg.proj_hidden)] if cfg.proj_norm == "batch" else []
        self.global_head = nn.Sequential(nn.Linear(head_in, cfg.proj_hidden, bias=False), *norm, nn.ReLU(inplace=True),
                                         nn.Linear(cfg.proj_hidden, cfg.proj_dim, bias=False))
        local_level = levels - cfg.decoder_blocks  # feature index (stride 2^level) of block L's output
        self.local_side = tuple(s // st for s, st in zip(size, per_axis[local_level]))
        if min(self.local_side) < cfg.region + 5:  # g = side − region − 1 ≥ 4 keeps the 35 windows distinct
            raise ConfigError(f"task.decoder_blocks={cfg.decoder_blocks} ends at a {self.local_side} map, too small for "
                              f"35 distinct {cfg.region}³ regions (each side needs {cfg.region + 5}): use a larger crop, "
                              "more decoder blocks or a smaller task.region")
        self.local_head = LocalHead(chans[local_level], cfg.region, cfg.local_dim)
        self.register_buffer("regions", region_grid(self.local_side, cfg.region), persistent=False)
        self.decoder_used = tuple(self.decoder.level_prefixes(cfg.decoder_blocks))
        self.window = (0.0, 1.0)  # data.window_out, set by check_config's caller through configure()
        self.stage_now = "local" if cfg.stage == "local" else "global"

    # ------------------------------------------------------------------------------ run-level checks and hooks
    @classmethod
    def check_config(cls, cfg) -> None:
        """What the run's data and batch must be for this task (called before anything starts)."""
        t, d = cfg.task, cfg.data
        if t.stage == "both" and cfg.train.steps <= t.global_steps:
            raise ConfigError(f"task.stage=both with train.steps={cfg.train.steps} <= task.global_steps={t.global_steps} "
                              f"leaves no local stage: set train.steps above it (the paper: {t.global_steps} + 10001) or "
                              "task.stage=global")
        if t.stage == "local":
            raise ConfigError("task.stage=local alone would train the decoder against a random frozen encoder: run "
                              "task.stage=both (global, then local in one run)")
        if d.partitions and d.crops_per_volume != d.partitions:
            raise ConfigError(f"data.partitions={d.partitions} needs data.crops_per_volume={d.partitions} (one crop per "
                              f"partition), got {d.crops_per_volume}; or data.partitions=0 for strategy random")
        if t.strategy in ("domain", "domain_minus") and t.stage != "local":
            fix = (f"set data.partitions={t.partitions} data.crops_per_volume={t.partitions} data.pool_size=1 (the "
                   f"recipe's defaults)")
            if d.partitions != t.partitions or d.crops_per_volume != t.partitions:
                raise ConfigError(f"task.strategy={t.strategy} needs one crop per partition from the stream: got "
                                  f"data.partitions={d.partitions}, data.crops_per_volume={d.crops_per_volume}; {fix}")
            if d.pool_size != 1:
                raise ConfigError(f"task.strategy={t.strategy} needs data.pool_size=1 so that a volume's "
                                  f"{t.partitions} crops stay together in a batch (got {d.pool_size}); {fix}")
            if cfg.train.micro_batch % t.partitions:
                raise ConfigError(f"train.micro_batch={cfg.train.micro_batch} must be a multiple of task.partitions="
                                  f"{t.partitions} (m volumes × S partitions per batch), e.g. {3 * t.partitions}")

    def configure(self, cfg) -> None:
        """Run settings the task reads: the intensity range the views are clipped to."""
        self.window = tuple(float(v) for v in cfg.data.window_out)

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        """The stage of ``step`` and the learning-rate scale of each parameter group: the part a stage does not
        train gets lr 0, so it neither moves nor decays (the official local stage leaves the encoder out of its
        optimiser)."""
        c = self.cfg
        glob = c.stage == "global" or (c.stage == "both" and step < c.global_steps)
        self.stage_now = "global" if glob else "local"
        on, off = (1.0, 0.0) if glob else (0.0, 1.0)
        return {"encoder": on, "global_head": on, "decoder_local": off, "local_head": off, "decoder_rest": 0.0}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Named groups for :meth:`begin_step`; weight decay on ≥ 2-D weights (official: Adam, none)."""
        named = {"encoder": self.backbone.named_parameters(), "global_head": self.global_head.named_parameters(),
                 "local_head": self.local_head.named_parameters()}
        dec = dict(self.decoder.named_parameters())
        used = {n: p for n, p in dec.items() if n.startswith(self.decoder_used)}
        named["decoder_local"] = used.items()
        named["decoder_rest"] = [(n, p) for n, p in dec.items() if n not in used]
        groups = []
        for name, params in named.items():
            params = [p for _, p in params if p.requires_grad]
            for decay in (True, False):
                ps = [p for p in params if (p.ndim >= 2) == decay]
                if ps:
                    groups.append({"params": ps, "weight_decay": float(weight_decay) if decay else 0.0, "name": name})
        return groups

    def export_components(self) -> dict[str, nn.Module]:
        """The decoder beside the backbone: its first L blocks pretrained by the local stage, the rest (and the class
        head, re-initialised downstream) at their initialisation."""
        return {"decoder": self.decoder}

    def summary_levels(self) -> list[tuple[str, nn.Module]]:
        enc = [(f"backbone.stages.{i}", st.blocks) for i, st in enumerate(self.backbone.stages)] \
            if hasattr(self.backbone, "stages") else []
        return enc + [("global_head", self.global_head)]

    def trace(self, x: Tensor) -> Tensor:
        """The global branch on ``x`` (the model summary's one-sample trace): g1's BatchNorm in eval mode, since
        batch statistics need more than one row."""
        training = self.global_head.training
        self.global_head.eval()
        try:
            return self.embed_global(x)
        finally:
            self.global_head.train(training)

    # ------------------------------------------------------------------------------ the two stages
    def embed_global(self, x: Tensor) -> Tensor:
        deep = self.backbone.forward_features(x)[-1]  # [B, C, *grid]
        pooled = deep.mean(dim=(2, 3, 4)) if self.cfg.global_pool == "avg" else deep.flatten(1)
        return self.global_head(pooled)

    def embed_local(self, x: Tensor) -> Tensor:
        """[B, N, local_dim]: the regions of decoder block L's map through g2. The encoder runs without gradients
        (frozen in this stage)."""
        with torch.no_grad():
            feats = self.backbone.forward_features(x)
        fmap = self.decoder.forward_levels([f.detach() for f in feats], depth=self.cfg.decoder_blocks)[0]
        fmap = self.local_head.conv(fmap)
        return self.local_head.proj(gather_regions(fmap, self.regions, self.cfg.region))

    def views(self, x: Tensor, gen=None) -> list[Tensor]:
        lo, hi = self.window
        aug = lambda: augmented_views(x, self.cfg, lo, hi, gen)  # noqa: E731
        if self.cfg.strategy == "random":
            return [aug(), aug()]
        if self.cfg.strategy == "domain_minus":
            return [x, aug(), aug()]
        return [x, aug()]  # domain: the crop itself and one augmented view

    def forward(self, batch: dict) -> dict:
        x = batch["image"]
        B = x.shape[0]
        if self.stage_now == "local":
            lo, hi = self.window
            r1 = self.embed_local(intensity_views(x, self.cfg, lo, hi))
            r2 = self.embed_local(intensity_views(x, self.cfg, lo, hi))
            return {"loss": local_loss(r1, r2, self.cfg.temperature), "stage": 1.0}
        views = self.views(x)
        z = self.embed_global(torch.cat(views, 0))  # [V·B, D], view-major
        part = batch.get("partition")
        if part is None:  # no partitions from the stream (strategy random, or a stand-alone call)
            part = torch.arange(B, device=x.device) % self.cfg.partitions
        crop = torch.arange(B, device=x.device).repeat(len(views))
        loss = global_loss(z, crop, part.to(x.device).repeat(len(views)), self.cfg.strategy, self.cfg.temperature)
        return {"loss": loss, "stage": 0.0}

    @torch.no_grad()
    def reconstruct(self, batch: dict, path: str | Path | None = None, n: int = 8) -> np.ndarray:
        """Rows = crops of the batch (volume and partition in the label); columns: the crop and its augmented view
        (the middle axial slice)."""
        from medssl.pretrain.pictures import draw_grid

        x = batch["image"][:n].float()
        lo, hi = self.window
        view = augmented_views(x, self.cfg, lo, hi)
        z = x.shape[-1] // 2
        cols = {"crop": x[:, 0, ..., z], "augmented view": view[:, 0, ..., z]}
        keys = batch.get("key", [""] * len(x))
        part = batch.get("partition")
        label = lambda r: f"{str(keys[r])[-18:]}, partition {int(part[r]) if part is not None else '-'}, z={z}"  # noqa: E731
        style = lambda title, r: {"cmap": "gray", "vmin": lo, "vmax": hi}  # noqa: E731
        return draw_grid({t: v.cpu().numpy() for t, v in cols.items()}, style, path, row_label=label)
