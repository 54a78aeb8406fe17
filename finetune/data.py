"""Labelled volumes for fine-tuning: discovery, checks, the seeded split, preparation, training crops.

A dataset is an nnU-Net v2 / MSD raw folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``), a CSV of
``path,label[,modality]`` rows, or a labelled shard set (``python -m medssl.shards build … `` over a labelled
dataset). Every volume is brought to the pretraining geometry with the same code that built the
pretraining shards (``shards.preprocess.prepare_volume``: RAS, the export's spacing) and windowed at read
time with the export's intensity window, so fine-tuning sees what pretraining saw. Few-shot sets are
small, so prepared volumes are cached in memory in their stored dtype (int16 HU / float16 MRI).

Bad input is refused before training starts, naming the file and the fix: classes a label holds but the
dataset does not declare, image/label shape or affine mismatches, unreadable files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medssl.shards.crops import Window, flip_rot90
from medssl.shards.errors import InputError


@dataclass
class CaseSource:
    key: str
    images: list[str] | None  # one file per channel (None for a case read from shards)
    label: str | None
    modality: str
    shard: tuple[str, str] | None = None  # (shard set folder, sample key) for labelled shards


@dataclass
class Case:
    key: str
    image: np.ndarray  # [C, X, Y, Z] stored dtype (int16 HU / float16), RAS, pretraining spacing
    label: np.ndarray  # [X, Y, Z] uint8 on the same grid
    meta: dict  # prepared meta: affine, spacing, intensity statistics, original geometry
    source: CaseSource
    fg: np.ndarray = field(default=None, repr=False)  # [N, 3] foreground voxel coordinates (subsampled)
    _by_class: list | None = field(default=None, repr=False)

    def class_centres(self) -> list[np.ndarray]:
        """The rows of ``fg`` split by label value: one array per class present (ascending class index)."""
        if self._by_class is None:
            values = self.label[tuple(self.fg.T)] if len(self.fg) else np.zeros(0, np.uint8)
            self._by_class = [self.fg[values == v] for v in np.unique(values)]
        return self._by_class

    def normalised(self, window: Window) -> np.ndarray:
        return window.apply(self.image, self.meta)  # [C, X, Y, Z] float32


@dataclass
class Preprocessing:
    """What fine-tuning repeats from pretraining (read from the export's manifest)."""

    spacing: tuple[float, float, float] | None  # None: keep native spacing
    window: Window

    def to_dict(self) -> dict:
        return {"orientation": "RAS", "spacing": list(self.spacing) if self.spacing else None,
                "window_ct": list(self.window.ct), "window_out": list(self.window.out)}


def preprocessing(manifest: dict | None, cfg) -> Preprocessing:
    """The export's preprocessing, with ``data.spacing`` / ``data.window_*`` overrides on top."""
    pre = (manifest or {}).get("preprocessing") or {}
    spacing = pre.get("spacing", 1.5)
    if cfg.data.spacing is not None:
        spacing = cfg.data.spacing or None
    if spacing is not None:
        from medssl.shards.preprocess import parse_spacing

        spacing = parse_spacing(spacing)
    ct = pre.get("intensity", {}).get("CT", {})
    window_ct = cfg.data.window_ct or ct.get("window") or [-175.0, 250.0]
    window_out = cfg.data.window_out or ct.get("out") or [0.0, 1.0]
    return Preprocessing(spacing, Window(ct=tuple(map(float, window_ct)), out=tuple(map(float, window_out))))


# ----------------------------------------------------------------------------------------- discovery
def _declared_labels(desc: dict) -> dict[int, str]:
    """nnU-Net v2 ``{"name": index}`` or MSD ``{"index": "name"}`` → ``{index: name}``."""
    raw = desc.get("labels") or {}
    out = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) or (isinstance(v, str) and v.isdigit() and not str(k).isdigit()):
            out[int(v)] = str(k)  # nnU-Net v2 (region labels as lists are not supported here)
        elif str(k).isdigit():
            out[int(k)] = str(v)
        else:
            raise InputError("dataset.json", f"label entry {k!r}: {v!r} is neither name→index nor index→name",
                             "write labels as {\"background\": 0, \"liver\": 1, …}")
    return out


def discover(dataset: str | Path, labels_override: dict | None = None) -> tuple[list[CaseSource], dict[int, str]]:
    """Labelled cases behind ``dataset`` and the declared classes ``{index: name}`` (``{}``: not declared)."""
    from medssl.shards.sources import from_csv, from_nnunet

    root = Path(dataset)
    if not root.exists():
        raise FileNotFoundError(f"--data {dataset} does not exist (an nnU-Net/MSD folder, a CSV list or a labelled "
                                "shard set)")
    declared: dict[int, str] = {}
    if root.is_dir() and (root / "index.json").exists():
        cases = _shard_cases(root)
    elif root.is_dir() and (root / "dataset.json").exists():
        desc = json.loads((root / "dataset.json").read_text())
        try:
            declared = _declared_labels(desc)
        except InputError as exc:
            raise InputError(root / "dataset.json", exc.reason, exc.fix, code=exc.code) from None
        cases = [CaseSource(s.key, s.images, s.label, s.modality) for s in from_nnunet(root, include_test=False)]
    elif root.is_file() and root.suffix.lower() == ".csv":
        cases = [CaseSource(s.key, s.images, s.label, s.modality) for s in from_csv(root, "CT")]
    else:
        raise ValueError(f"--data {dataset}: not an nnU-Net/MSD dataset folder (dataset.json), a CSV list "
                         "(path,label[,modality]) or a shard set (index.json)")
    unlabelled = [c for c in cases if c.label is None and c.shard is None]
    if unlabelled:
        raise InputError(unlabelled[0].images[0], f"{len(unlabelled)} of {len(cases)} images have no label "
                         f"(first: {unlabelled[0].key})", "add the labels (labelsTr/CASE.nii.gz or a CSV 'label' "
                         "column) or remove those images from the fine-tuning set")
    if not cases:
        raise ValueError(f"--data {dataset}: no labelled cases found")
    if labels_override:
        declared = {int(k): str(v) for k, v in labels_override.items()}
    if declared and 0 not in declared:
        declared[0] = "background"
    return cases, dict(sorted(declared.items()))


def _shard_cases(root: Path) -> list[CaseSource]:
    from medssl.shards.verify import load_samples

    samples = load_samples(root)
    if not samples:
        raise InputError(root / "samples.jsonl", "no samples listed", "rebuild the shard set")
    return [CaseSource(s["key"], None, None, s.get("modality", "CT"), shard=(str(root), s["key"])) for s in samples]


# ----------------------------------------------------------------------------------------- split
def split_cases(keys: list[str], n_val: int, test_fraction: float, n_train: int | None, seed: int) -> dict:
    """A seeded split that does not depend on ``n_train``: the test and validation volumes stay the same
    when a few-shot sweep changes the number of training volumes (it takes the first n of a fixed order)."""
    keys = sorted(keys)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n_test = max(1, int(round(test_fraction * len(keys)))) if test_fraction > 0 else 0
    if n_test + n_val >= len(keys):
        raise ValueError(f"{len(keys)} labelled volumes cannot give {n_test} test + {n_val} validation volumes and at "
                         "least one for training: lower data.test_fraction / data.n_val or add volumes")
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if n_train is not None:
        if n_train < 1 or n_train > len(train):
            raise ValueError(f"--n-train {n_train}: between 1 and {len(train)} training volumes are available "
                             f"({len(keys)} labelled, {n_test} test, {n_val} validation)")
        train = train[:n_train]
    return {"seed": seed, "train": train, "val": val, "test": test}


# ----------------------------------------------------------------------------------------- preparation
def check_label(path: str, values, declared: dict[int, str]) -> None:
    extra = sorted(int(v) for v in set(int(v) for v in values) - set(declared)) if declared else []
    if extra:
        names = ", ".join(f"{k} {v}" for k, v in declared.items())
        raise InputError(path, f"label holds class(es) {extra} that the dataset does not declare (declared: {names})",
                         "declare them in dataset.json 'labels' (or data.labels), or remap the label file")


def prepare_case(src: CaseSource, pre: Preprocessing, declared: dict[int, str], sample=None) -> Case:
    """Load, check and bring one case to the pretraining geometry (raises ``InputError`` naming the file).

    ``sample`` is the decoded ``(image, label, meta)`` of a shard case (read by :func:`prepare` in one pass)."""
    if src.shard is not None:
        image, label, meta = sample if sample is not None else _read_shard_samples(src.shard[0], [src.key])[src.key]
        if label is None:
            raise InputError(f"{src.shard[0]}:{src.key}", "shard sample has no label (.seg member)",
                             "build the shard set from a labelled dataset (labelsTr/ or a CSV label column)")
        label = label[0]
        origin = meta.get("source") or {}
        if origin.get("label") and Path(origin["label"]).exists():  # score in the original space when we can
            src.label, src.images = origin["label"], [p for p in origin.get("images", []) if Path(p).exists()] or None
    else:
        from medssl.shards.preprocess import prepare_volume

        prep = prepare_volume(src.images, src.label, src.modality, target_spacing=pre.spacing)
        image, label, meta = prep.image, prep.label[0], prep.meta
    check_label(src.label or f"{src.shard[0]}:{src.key}", np.unique(label), declared)
    fg = np.argwhere(label[::2, ::2, ::2] > 0) * 2  # [N, 3] crop centres on foreground (subsampled grid)
    return Case(src.key, image, label, meta, src, fg)


def _read_shard_samples(root: str, keys: list[str]) -> dict:
    """Decode the samples ``keys`` of a shard set in one pass over its shards."""
    from medssl.shards.format import CorruptSample, decode_sample
    from medssl.shards.verify import iter_tar, load_index

    wanted, found = set(keys), {}
    for shard in load_index(root)["shards"]:
        for sample in iter_tar(Path(root) / shard["name"], on_error=lambda msg: None):
            if sample.get("__key__") in wanted:
                try:
                    found[sample["__key__"]] = decode_sample(sample)
                except CorruptSample as exc:
                    raise InputError(f"{root}/{shard['name']}:{sample['__key__']}", f"damaged sample ({exc})",
                                     "run python -m medssl.shards verify on the set and rebuild it") from None
        if len(found) == len(wanted):
            break
    for key in wanted - set(found):
        raise InputError(f"{root}:{key}", "sample listed in samples.jsonl but not found in any shard",
                         "run python -m medssl.shards verify on the set")
    return found


def prepare(sources: list[CaseSource], pre: Preprocessing, declared: dict[int, str], progress: bool = True,
            desc: str = "prepare") -> list[Case]:
    from tqdm import tqdm

    decoded: dict = {}
    for root in sorted({s.shard[0] for s in sources if s.shard is not None}):
        decoded.update(_read_shard_samples(root, [s.key for s in sources if s.shard and s.shard[0] == root]))
    return [prepare_case(s, pre, declared, decoded.get(s.key)) for s in tqdm(sources, desc=desc, unit="vol",
                                                                             disable=not progress, dynamic_ncols=True)]


# ----------------------------------------------------------------------------------------- crops
class CropSampler(torch.utils.data.IterableDataset):
    """Endless training crops: a random training volume per draw, ``crops_per_volume`` crops from it,
    centred on foreground with probability pos / (pos + neg), else on label 0 (MONAI's ``RandCropByPosNegLabeld``;
    with ``data.pos_centres=classes`` a foreground centre is a voxel of a class drawn uniformly among the volume's),
    flips / rot90 / intensity scale and shift; batches of ``batch`` crops. Seeded by (seed, rank, worker)."""

    def __init__(self, cases: list[Case], window: Window, cfg, batch: int, seed: int, rank: int = 0, start: int = 0):
        super().__init__()
        self.cases, self.window, self.cfg, self.batch = cases, window, cfg.data, batch
        self.seed, self.rank, self.start = seed, rank, start  # start: the step a resumed run continues from

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker] + ([self.start] if self.start else []))
        crop = np.array(self.cfg.crop_size)
        p_pos = self.cfg.pos / max(self.cfg.pos + self.cfg.neg, 1e-9)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        while True:
            case = self.cases[rng.integers(len(self.cases))]
            lab = case.label[None]  # [1, X, Y, Z]
            # crop the stored volume and window only the crops; the padding is the value the window maps to out[0]
            img, lab, shift = _pad(case.image, lab, crop, self.window.bounds(case.meta)[0])
            for _ in range(self.cfg.crops_per_volume):
                if len(case.fg) and rng.random() < p_pos:
                    if self.cfg.pos_centres == "classes":
                        of_class = case.class_centres()
                        pick = of_class[rng.integers(len(of_class))]
                        centre = pick[rng.integers(len(pick))] + shift
                    else:
                        centre = case.fg[rng.integers(len(case.fg))] + shift
                else:  # negatives on label-0 voxels; none (all foreground): on foreground, as MONAI does
                    centre = _background_centre(lab, rng)
                    if centre is None:
                        centre = case.fg[rng.integers(len(case.fg))] + shift
                o = np.clip(centre - crop // 2, 0, np.array(img.shape[1:]) - crop)
                sl = (slice(None), *(slice(int(a), int(a + c)) for a, c in zip(o, crop)))
                ci, cl, _, _ = flip_rot90(self.window.apply(img[sl], case.meta), lab[sl], rng, self.cfg.flip_prob,
                                          self.cfg.rot90_prob)
                if rng.random() < self.cfg.intensity_prob:
                    ci = ci * np.float32(1.0 + rng.uniform(-0.1, 0.1))  # RandScaleIntensityd factors 0.1
                if rng.random() < self.cfg.intensity_prob:
                    ci = ci + np.float32(rng.uniform(-0.1, 0.1))  # RandShiftIntensityd offsets 0.1
                pending.append((ci, cl))
                if len(pending) == self.batch:
                    yield {"image": torch.from_numpy(np.stack([p[0] for p in pending])),  # [B, C, *crop]
                           "label": torch.from_numpy(np.stack([p[1] for p in pending]).astype(np.int64))}  # [B, 1, *crop]
                    pending = []


def _background_centre(lab: np.ndarray, rng: np.random.Generator, tries: int = 64) -> np.ndarray | None:
    """A voxel drawn uniformly among the label-0 voxels of ``lab`` ``[1, X, Y, Z]`` (MONAI's ``bg_indices``):
    rejection draws, then the exact list when background is scarce; ``None`` when there is none."""
    for _ in range(tries):
        c = rng.integers(0, lab.shape[1:])
        if lab[(0, *c)] == 0:
            return c
    bg = np.argwhere(lab[0] == 0)
    return bg[rng.integers(len(bg))] if len(bg) else None


def _pad(img: np.ndarray, lab: np.ndarray, crop: np.ndarray, value: float):
    short = np.maximum(crop - np.array(img.shape[1:]), 0)
    if not short.any():
        return img, lab, np.zeros(3, dtype=np.int64)
    before = short // 2
    widths = [(0, 0)] + [(int(b), int(s - b)) for b, s in zip(before, short)]
    return (np.pad(img, widths, constant_values=value), np.pad(lab, widths, constant_values=0), before)
