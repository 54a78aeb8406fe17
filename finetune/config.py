"""Typed fine-tuning configuration: dataclass defaults ← preset ← dotted CLI overrides.

The defaults are the downstream setting of the official Hi-End-MAE / MONAI UNETR-BTCV pipeline
(``FengheTan9/Hi-End-MAE:downstream/main.py``, ``trainer.py``, ``utils/data_utils.py``): 96³ crops,
``RandCropByPosNegLabeld`` pos 1 / neg 1 with 4 samples per volume, flips and rot90 at p 0.2, intensity
scale/shift 0.1 at p 0.1, AdamW lr 1e-4 wd 1e-5, linear warm-up from 0 then cosine, DiceCE, sliding-window
evaluation with 0.5 overlap; the network as ``downstream/models/UNETR/unetr.py`` builds it (feature_size 32, a ViT
without cls token whose position embedding is learned from the pretrained sin-cos). Steps replace epochs (one step = one volume × 4 crops per process).
The preprocessing (orientation, spacing, intensity window) comes from the export's manifest, so
fine-tuning sees what pretraining saw; ``data.spacing`` / ``data.window_ct`` override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medssl.pretrain.config import ConfigError, ConfigIO, merge, parse_override, set_dotted


@dataclass
class FTModelConfig:
    arch: str = "auto"  # auto: the export's pretrained decoder if it carries one (Volume Fusion), else unetr for
    #                     ViTs / hymamba (MambaMIM's official decoder) for hymamba3d / unet for other multi-scale
    #                     CNNs | unetr | unet | hymamba |
    #                     monai_swinunetr | monai_unetr (MONAI networks for MONAI self-supervised weights)
    backbone: str = ""  # registry name; only for `--init scratch` without an export
    feature_size: int = 32  # decoder widths feature_size × 1, 2, 4, 8 [Hi-End-MAE downstream/main.py, UNETR-BTCV]
    pos_embed: str = "learned"  # ViTs: learned (a parameter started from the pretrained sin-cos, as the official
    #                             UNETR's perceptron embedding) | fixed (the sin-cos buffer of pretraining)
    cls_token: str = "drop"  # ViTs: drop (the official UNETR has none) | keep (the export's cls token stays)
    res_block: bool = True  # residual conv blocks in the decoder, as UNETR's res_block=True
    norm: str = "instance"  # decoder normalisation (MONAI norm name)
    freeze_encoder: bool = False  # linear-probe style: only the decoder learns
    layer_decay: float = 1.0  # layer-wise lr decay of the encoder (1 = off; BEiT/MAE fine-tuning use 0.65-0.75)
    in_channels: int | None = None  # None: the data's channels (the stem is adapted when it differs)
    allow_nonfinite: bool = False  # load an export whose weights hold NaN/inf (refused by default: a diverged run)


@dataclass
class FTDataConfig:
    crop_size: list = field(default_factory=lambda: [96, 96, 96])  # training crop = sliding-window ROI
    crops_per_volume: int = 4  # RandCropByPosNegLabeld num_samples 4
    pos: float = 1.0  # RandCropByPosNegLabeld pos / neg: crops centred on foreground vs anywhere
    neg: float = 1.0
    pos_centres: str = "voxels"  # official: voxels (any foreground voxel alike, RandCropByPosNegLabeld); classes: a
    # class drawn uniformly among those the volume holds, then one of its voxels (RandCropByLabelClassesd, equal
    # ratios), so that small organs are seen as often as large ones
    n_train: int | None = None  # few-shot: the first n of the seeded training order (None: all)
    n_val: int = 1  # validation volumes (best checkpoint on their Dice)
    test_fraction: float = 0.2  # held-out test volumes (at least 1)
    split_seed: int = 0  # fixes the split; pretrained and scratch runs with the same seed share it
    spacing: list | None = None  # None: the export's (or 1.5 mm without an export); [] keeps native spacing
    window_ct: list | None = None  # None: the export's HU window
    window_out: list | None = None  # None: the export's output range
    flip_prob: float = 0.2  # RandFlipd per axis
    rot90_prob: float = 0.2  # RandRotate90d
    intensity_prob: float = 0.1  # RandScaleIntensityd / RandShiftIntensityd, factor / offset 0.1
    labels: dict = field(default_factory=dict)  # {index: name}; empty: dataset.json's labels (CSV/shards: found ones)
    num_workers: int = 0  # DataLoader workers drawing crops (volumes are cached in memory)


@dataclass
class FTOptimConfig:
    lr: float = 1.0e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-5
    warmup_fraction: float = 0.1  # 50 of 500 epochs in the official schedule
    min_lr: float = 0.0
    grad_clip: float = 0.0


@dataclass
class FTTrainConfig:
    steps: int = 12_000  # ~500 epochs of 24 BTCV volumes at one volume per step
    micro_batch: int = 4  # crops per process per step (one volume's crops_per_volume by default)
    grad_accum: int = 1
    global_batch: int | None = None
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = 0  # 0-2 (evaluation runs on each process's full weights)
    eval_every: int = 600  # steps between validations (25 epochs of 24 volumes)
    log_every: int = 10
    checkpoint_every: int = 500  # steps between resume checkpoints (model, optimizer, step, best Dice, RNG)
    keep_last: int = 2  # complete checkpoints kept (older ones are removed once a newer one is complete)
    seed: int = 0
    wandb: str = "offline"
    wandb_project: str = "medssl-finetune"


@dataclass
class FTEvalConfig:
    overlap: float = 0.5  # sliding-window overlap [Hi-End-MAE downstream]
    sw_batch: int = 4  # windows per forward
    mode: str = "constant"  # window blending: constant (official) | gaussian (nnU-Net)
    hd95: bool = False  # also report the 95th-percentile Hausdorff distance (mm)
    overlays: int = 1  # PNG overlays per test volume (axial slices with the most foreground)


@dataclass
class FTLossConfig:
    dice_weight: float = 1.0  # DiceCELoss(softmax, squared_pred, smooth_nr 0, smooth_dr 1e-6) [Hi-End-MAE]
    ce_weight: float = 1.0


@dataclass
class FinetuneConfig(ConfigIO):
    out: str = ""
    export: str | None = None  # export folder or checkpoint file
    init: str = "pretrained"  # pretrained | scratch
    dataset: str = ""
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    eval: FTEvalConfig = field(default_factory=FTEvalConfig)
    loss: FTLossConfig = field(default_factory=FTLossConfig)



PRESETS: dict[str, dict] = {
    # CPU tests and the demo: small crops, a narrow decoder, short schedule, frequent validation.
    "tiny": {
        "data.crop_size": [48, 48, 48],  # 3³ tokens at patch 16; ~1.2 s per step of 2 crops on 2 CPU cores
        "data.crops_per_volume": 2,
        "train.micro_batch": 2,
        "model.feature_size": 12,  # 8 learns visibly slower on the phantoms (Dice ~0.25 vs ~0.45 after 150 steps)
        "optim.lr": 2.0e-3,
        "optim.warmup_fraction": 0.05,
        "train.steps": 150,
        "train.eval_every": 50,
        "train.checkpoint_every": 50,
        "eval.sw_batch": 2,
        "eval.overlap": 0.25,
    },
}


def load_config(overrides: list[str] | None = None, preset: str | None = None, **top) -> FinetuneConfig:
    cfg = FinetuneConfig()
    merge(cfg, {k: v for k, v in top.items() if v is not None})
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"no fine-tuning preset {preset!r} (presets: {', '.join(sorted(PRESETS))})")
        for key, value in PRESETS[preset].items():
            set_dotted(cfg, key, value)
    for text in overrides or []:
        set_dotted(cfg, *parse_override(text))
    if cfg.init not in ("pretrained", "scratch"):
        raise ConfigError(f"init={cfg.init!r}: choose pretrained or scratch")
    if cfg.train.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage}: fine-tuning runs ZeRO 0-2 (evaluation needs each "
                          "process's whole weights); the models it trains fit one GPU")
    if cfg.train.checkpoint_every < 1 or cfg.train.keep_last < 1:
        raise ConfigError("train.checkpoint_every and train.keep_last must be >= 1")
    if cfg.model.pos_embed not in ("learned", "fixed") or cfg.model.cls_token not in ("drop", "keep"):
        raise ConfigError(f"model.pos_embed={cfg.model.pos_embed!r} / model.cls_token={cfg.model.cls_token!r}: choose "
                          "pos_embed learned|fixed and cls_token drop|keep (official UNETR: learned, drop)")
    if not 0.0 < cfg.model.layer_decay <= 1.0:
        raise ConfigError(f"model.layer_decay={cfg.model.layer_decay} must be in (0, 1] (1 = off)")
    if cfg.data.pos_centres not in ("voxels", "classes"):
        raise ConfigError(f"data.pos_centres={cfg.data.pos_centres!r}: choose voxels (any foreground voxel, the official "
                          "RandCropByPosNegLabeld) or classes (each class alike, RandCropByLabelClassesd)")
    if cfg.data.n_val < 0 or not 0.0 <= cfg.data.test_fraction < 1.0:
        raise ConfigError("data.n_val must be >= 0 and data.test_fraction in [0, 1)")
    return cfg


def config_from_dict(d: dict) -> FinetuneConfig:
    return merge(FinetuneConfig(), d)
