"""Crop sampling, intensity windows, flips/rot90 and intensity jitter for the stream.

Kept apart from the stream's plumbing so that the same steps can later run on the training device
(a pool of decoded volumes on the GPU) without the recipes noticing: each function takes arrays and a
random generator and returns arrays plus what it did (origins, flips), so a crop is always traceable
to its place in the stored volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    """Intensity mapping applied at read time (the recipe chooses it; shards keep raw HU).

    CT: clip ``ct`` (HU) and map it linearly to ``out`` (the official Hi-End-MAE/MambaMIM setting is
    [-175, 250] → [0, 1]; MIS-FM uses [-1000, 1000] → [-1, 1]). MRI: map each volume's foreground
    0.5th–99.5th percentiles (recorded at build time) to ``out``, per channel when the volume has
    several (T1 and T2 have unrelated scales) and the build recorded per-channel statistics.
    """

    ct: tuple[float, float] = (-175.0, 250.0)
    out: tuple[float, float] = (0.0, 1.0)
    clip: bool = True

    def bounds(self, meta: dict) -> tuple[float, float]:
        """The stored-value range that maps onto ``out`` for this volume."""
        if meta.get("modality", "CT") == "CT":
            return float(self.ct[0]), float(self.ct[1])
        st = meta.get("intensity", {})
        lo, hi = float(st.get("fg_p0_5", 0.0)), float(st.get("fg_p99_5", 1.0))
        return lo, hi if hi > lo else lo + 1.0

    def channel_bounds(self, meta: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(lo, hi)`` arrays ``[C]``: MRI channels' own percentiles where recorded, else
        :meth:`bounds` for every channel."""
        per = meta.get("intensity", {}).get("channels") if meta.get("modality", "CT") != "CT" else None
        if per and len(per) == channels:
            pairs = [self.bounds({"modality": "MR", "intensity": st}) for st in per]
        else:
            pairs = [self.bounds(meta)] * channels
        return np.array([p[0] for p in pairs], np.float64), np.array([p[1] for p in pairs], np.float64)

    def apply(self, x: np.ndarray, meta: dict) -> np.ndarray:
        """``x`` ``[C, X, Y, Z]`` (or any array whose first axis is the channel) → float32 in ``out``, C-contiguous."""
        lo, hi = self.channel_bounds(meta, x.shape[0]) if x.ndim >= 2 else self.bounds(meta)
        if np.ndim(lo) and np.all(lo == lo[0]) and np.all(hi == hi[0]):
            lo, hi = float(lo[0]), float(hi[0])
        scale = (self.out[1] - self.out[0]) / (hi - lo)
        if np.ndim(scale):  # one scale per channel
            shape = (-1,) + (1,) * (x.ndim - 1)
            y = np.multiply(x, scale.astype(np.float32).reshape(shape), dtype=np.float32, order="C")
            y += (self.out[0] - lo * scale).astype(np.float32).reshape(shape)
        else:
            y = np.multiply(x, np.float32(scale), dtype=np.float32, order="C")  # one pass: cast, scale, C order
            #  (x may be a strided or flipped view of the volume: the window writes the crop's contiguous copy)
            y += np.float32(self.out[0] - lo * scale)
        if self.clip:
            np.clip(y, min(self.out), max(self.out), out=y)
        return y


def pad_to(vol: np.ndarray, crop: tuple[int, int, int], value) -> tuple[np.ndarray, np.ndarray]:
    """Pad the spatial axes of ``vol`` ``[C, X, Y, Z]`` (centred) up to ``crop``; returns it and the pad before."""
    short = [max(0, c - s) for c, s in zip(crop, vol.shape[1:])]
    before = np.array([d // 2 for d in short], dtype=np.int64)
    if not any(short):
        return vol, before
    widths = [(0, 0)] + [(d // 2, d - d // 2) for d in short]
    return np.pad(vol, widths, mode="constant", constant_values=value), before


def partition_origins(extent: int, crop: int, parts: int, pad: int, padded: int, rng: np.random.Generator) -> np.ndarray:
    """Origins ``[parts]`` along one axis: crop j centred uniformly in the j-th of ``parts`` equal slabs of a stored
    extent of ``extent`` voxels, shifted by the padding ``pad`` before it and kept inside the padded extent
    ``padded`` (so a volume shorter than a slab's crop gives crops that overlap, still in slab order)."""
    bounds = np.arange(parts + 1) * (extent / parts)
    centres = bounds[:-1] + rng.random(parts) * (bounds[1:] - bounds[:-1])
    origins = np.floor(centres - crop / 2).astype(np.int64) + pad
    return np.clip(origins, 0, max(0, padded - crop))


def body_centre_origins(shape, crop, fg: np.ndarray, n: int, stride: int = 4) -> np.ndarray:
    """``n`` equal origins ``[n, 3]`` whose crops are centred on the middle of the body's bounding box (of the
    strided foreground points ``fg``; the volume's middle without any), kept inside the (padded) volume."""
    if len(fg):
        centre = (fg.min(0) + fg.max(0) + stride) / 2
    else:
        centre = np.asarray(shape, dtype=np.float64) / 2
    o = np.floor(centre - np.asarray(crop) / 2).astype(np.int64)
    o = np.clip(o, 0, np.maximum(0, np.asarray(shape) - np.asarray(crop)))
    return np.repeat(o[None], n, axis=0)


def body_points(vol: np.ndarray, threshold, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``[N, 3]`` on a ``stride`` grid of the foreground (above ``threshold``, one value or one
    per channel, in any channel) and of the background (the rest), from one pass over the strided volume."""
    sub = vol[:, ::stride, ::stride, ::stride]  # [C, X/s, Y/s, Z/s]
    thr = np.asarray(threshold, dtype=np.float64).reshape(-1, 1, 1, 1) if np.ndim(threshold) else threshold
    body = (sub > thr).any(axis=0)
    return np.argwhere(body) * stride, np.argwhere(~body) * stride


def foreground_points(vol: np.ndarray, threshold, stride: int = 4) -> np.ndarray:
    """The foreground half of :func:`body_points`."""
    return body_points(vol, threshold, stride)[0]


def sample_origins(shape, crop, fg: np.ndarray, pos_fraction: float, n: int, rng: np.random.Generator,
                   stride: int = 4, bg: np.ndarray | None = None) -> np.ndarray:
    """``n`` crop origins ``[n, 3]`` in a volume of spatial ``shape``.

    MONAI's ``RandCropByPosNegLabeld`` with the image as label, as in the official recipes (pos 6 / neg 2
    → 0.75): each crop is centred on a foreground point with probability ``pos_fraction``, else on a
    background point ``bg`` (either jittered within its stride cell), then moved so that the crop lies
    inside the (padded) volume (``correct_crop_centers``). Without background points every crop is centred
    on foreground, and the reverse (MONAI warns and does the same); ``bg=None`` (not looked for) or no
    point at all: negatives are uniform over the volume.
    """
    shape, crop = np.asarray(shape), np.asarray(crop)
    hi = shape - crop  # inclusive upper bound of an origin
    if bg is None:
        bg, p = np.zeros((0, 3), np.int64), (pos_fraction if len(fg) else 0.0)
    else:
        p = 0.0 if not len(fg) else 1.0 if not len(bg) else pos_fraction
    out = np.empty((n, 3), dtype=np.int64)
    for i in range(n):
        points = fg if rng.random() < p else bg
        if len(points):
            centre = np.minimum(points[rng.integers(len(points))] + rng.integers(0, stride, size=3), shape - 1)
            out[i] = np.clip(centre - crop // 2, 0, hi)
        else:
            out[i] = [rng.integers(0, h + 1) for h in hi]
    return out


def intensity_jitter(img: np.ndarray, rng: np.random.Generator, prob: float, scale: float,
                     shift: float) -> tuple[np.ndarray, float, float]:
    """MONAI's ``RandScaleIntensity(factors=scale, prob)`` then ``RandShiftIntensity(offsets=shift, prob)`` on a
    whole crop: ``x * (1 + f)``, ``f ~ U(-scale, scale)``, then ``+ o``, ``o ~ U(-shift, shift)``, each with its
    own draw of ``prob``. Works in place on float32 ``img``; returns it, the factor ``1 + f`` and the offset ``o``
    (1 and 0 when not drawn)."""
    factor, offset = draw_jitter(rng, prob, scale, shift)
    if factor != 1.0:
        img *= factor
    if offset != 0.0:
        img += offset
    return img, float(factor), float(offset)


def draw_jitter(rng: np.random.Generator, prob: float, scale: float, shift: float) -> tuple[np.float32, np.float32]:
    """The draws of :func:`intensity_jitter` alone: the float32 factor ``1 + f`` and offset ``o`` (1 and 0 when not
    drawn), in the order the worker path draws them (the device pool applies them on the device)."""
    factor, offset = np.float32(1.0), np.float32(0.0)
    if rng.random() < prob:
        factor = np.float32(1.0 + rng.uniform(-scale, scale))
    if rng.random() < prob:
        offset = np.float32(rng.uniform(-shift, shift))
    return factor, offset


def flip_rot90(img: np.ndarray, lab: np.ndarray | None, rng: np.random.Generator, flip_prob: float,
               rot90_prob: float, contiguous: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """Random flips of each spatial axis (``flip_prob`` each) and a rot90 in the X–Y plane (``rot90_prob``).

    Quarter turns need a square X–Y crop; otherwise only the half turn is drawn.
    Returns the image, label, the flip flags ``[3]`` and the number of quarter turns; the image is a flipped view
    with ``contiguous=False`` (for a caller whose next step writes a new array anyway, as the window does), else a
    contiguous copy, as the label always is.
    """
    flips, k = draw_flips(rng, flip_prob, rot90_prob, img.shape[1] == img.shape[2])
    axes = tuple(int(a) + 1 for a in np.flatnonzero(flips))  # +1: skip the channel axis
    if axes:
        img = np.flip(img, axes)
        lab = np.flip(lab, axes) if lab is not None else None
    if k:
        img = np.rot90(img, k, axes=(1, 2))
        lab = np.rot90(lab, k, axes=(1, 2)) if lab is not None else None
    img = np.ascontiguousarray(img) if contiguous else img
    lab = np.ascontiguousarray(lab) if lab is not None else None
    return img, lab, flips, k


def draw_flips(rng: np.random.Generator, flip_prob: float, rot90_prob: float, square: bool) -> tuple[np.ndarray, int]:
    """The draws of :func:`flip_rot90` alone: flip flags ``[3]`` and quarter turns (only the half turn when the crop's
    X–Y plane is not ``square``)."""
    flips = rng.random(3) < flip_prob
    k = 0
    if rot90_prob > 0 and rng.random() < rot90_prob:
        k = int(rng.integers(1, 4)) if square else 2
    return flips, k


def plane_map(flips, k: int, crop) -> np.ndarray:
    """Where :func:`flip_rot90` takes each voxel from, as index arithmetic: ``A`` ``[3, 4]`` with crop voxel
    ``(x, y, z) = A @ (i, j, l, 1)`` for output voxel ``(i, j, l)`` (before the crop's origin is added). The device
    pool gathers through it, so its crops equal the worker path's without flipping or rotating arrays."""
    cx, cy, cz = (int(c) for c in crop)
    x, y = np.array([1, 0, 0, 0], np.int64), np.array([0, 1, 0, 0], np.int64)  # output (i, j) in the rotated crop
    one = np.array([0, 0, 0, 1], np.int64)
    for t in range(k, 0, -1):  # undo each quarter turn: rot90(v)[i, j] = v[j, N - 1 - i], N = v's second extent
        n = cy if (t - 1) % 2 == 0 else cx
        x, y = y, (n - 1) * one - x
    if flips[0]:
        x = (cx - 1) * one - x
    if flips[1]:
        y = (cy - 1) * one - y
    z = (cz - 1) * one - np.array([0, 0, 1, 0], np.int64) if flips[2] else np.array([0, 0, 1, 0], np.int64)
    return np.stack([x, y, z])
