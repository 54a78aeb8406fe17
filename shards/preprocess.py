"""Build-time preprocessing of one volume: load, check, reorient to RAS, resample, crop, cast.

This runs once per volume when shards are built, so that training never pays for gzip decoding,
reorientation or resampling again. Every check raises :class:`~shards.errors.InputError` naming the
file, the reason (a code of ``shards.errors.REASONS``) and the fix; the builder records it and skips the
volume. Headers, geometry and size (``max_voxels``, stored and after resampling) are checked before any
voxel is read (:mod:`shards.nifti`, :func:`shards.dicom.load_series`).

Resampling convention (declared here, reproduced by the tests with an independent trilinear
reference): the first voxel centre stays where it is, the new grid steps by the target spacing, the
output has ``round(n · spacing / target)`` voxels per axis, values are interpolated linearly (images)
or by nearest neighbour (labels) along each axis, and positions past the last input voxel repeat the
edge. Interpolation runs in float64 so the int16 result does not depend on summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .format import BACKGROUND, CT_RANGE, LABEL_DTYPE, MODALITY_DTYPE
from .nifti import open_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


# ------------------------------------------------------------------------------------------ loading
# 1e9 voxels: a 512x512x3800 whole-body CT still fits; a worker then needs ~40 bytes per voxel (float64 resampling)
DEFAULT_MAX_VOXELS = 1_000_000_000
# voxel sizes outside this range (mm) come from a damaged or mis-scaled header, not from a CT/MR scanner
SPACING_RANGE_MM = (0.01, 50.0)
TOO_LARGE_FIX = ("raise --max-voxels if the machine has the memory (a worker needs about 40 bytes per voxel), "
                 "or check the volume's spacing (a wrong pixdim makes a small file huge)")


def load_nifti(path: str | Path, target_spacing=None, max_voxels: int = DEFAULT_MAX_VOXELS
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as ``(float32 [X, Y, Z], affine)``, refusing anything that is not a sane 3D volume.

    The header, the geometry and the size (stored, and after resampling to ``target_spacing``) are
    checked before any voxel is read; see :mod:`shards.nifti`."""
    nf = open_nifti(path)
    check_affine(path, nf.affine)
    check_size(path, nf.shape, nf.affine, target_spacing, max_voxels)
    return nf.read(), nf.affine


def check_affine(path, affine: np.ndarray) -> None:
    """A finite, invertible voxel-to-world matrix whose voxel sizes lie in :data:`SPACING_RANGE_MM`."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(path, "affine is not a finite 4x4 matrix", code="bad_affine")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-3 * float(np.prod(zooms)):
        raise InputError(path, f"singular affine (voxel sizes {np.round(zooms, 4).tolist()}, axes (nearly) "
                         "parallel)", code="bad_affine")
    lo, hi = SPACING_RANGE_MM
    if np.any(zooms < lo) or np.any(zooms > hi):
        raise InputError(path, f"voxel sizes {np.round(zooms, 5).tolist()} mm lie outside {lo}..{hi} mm",
                         "fix the voxel sizes in the header (pixdim / sform, in mm) or re-export the volume; "
                         "medssl reads CT/MR volumes only", code="bad_spacing")


def ras_grid(shape, affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel sizes of the volume once :func:`reorient_ras` has permuted its axes."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)
    zooms = voxel_spacing(affine)
    out_shape, out_zooms = [0, 0, 0], np.zeros(3)
    for axis, (to, _) in enumerate(ornt):
        out_shape[int(to)], out_zooms[int(to)] = int(shape[axis]), zooms[axis]
    return tuple(out_shape), out_zooms


def check_size(path, shape, affine: np.ndarray, target_spacing, max_voxels: int) -> None:
    """Refuse (``too_large``) a volume whose stored grid, or its grid after resampling to
    ``target_spacing``, holds more than ``max_voxels`` voxels: before anything is allocated."""
    stored = int(np.prod([int(n) for n in shape], dtype=object))
    if stored > max_voxels:
        raise InputError(path, f"volume too large: {stored:,} voxels ({'x'.join(map(str, shape))}) exceeds "
                         f"--max-voxels {max_voxels:,}", TOO_LARGE_FIX, code="too_large")
    if target_spacing is None:
        return
    grid, zooms = ras_grid(shape, affine)
    resampled = int(np.prod(resampled_shape(grid, zooms, target_spacing), dtype=object))
    if resampled > max_voxels:
        target = "x".join(f"{t:g}" for t in target_spacing)
        raise InputError(path, f"volume too large: {resampled:,} voxels after resampling to {target} mm exceeds "
                         f"--max-voxels {max_voxels:,} (stored: {'x'.join(map(str, grid))} voxels of "
                         f"{'x'.join(f'{z:.4g}' for z in zooms)} mm)", TOO_LARGE_FIX, code="too_large")


def load_image(path: str | Path, series_uid: str | None = None, target_spacing=None,
               max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file or a DICOM series as ``(float32 [X, Y, Z], affine in RAS+ world mm)``.

    For a DICOM folder, ``series_uid`` picks one series below it; without it the folder must hold one.
    Geometry and size (see :func:`check_size`) are checked before the voxels are read.
    """
    path = Path(path)
    if not path.is_dir():
        return load_nifti(path, target_spacing, max_voxels)
    from . import dicom

    series = dicom.find_series(path)
    if series_uid is not None:
        series = [s for s in series if s.uid == series_uid]
    if len(series) != 1:
        raise InputError(
            path,
            f"folder holds {len(series)} DICOM series{' with that UID' if series_uid else ''}, expected one",
            code="dicom_series",
        )

    def check(shape, affine):
        check_affine(path, affine)
        check_size(path, shape, affine, target_spacing, max_voxels)

    return dicom.load_series(series[0], check=check)


# ------------------------------------------------------------------------------------- modality
MODALITY_FIX = ("declare the modality: --modality MR for MRI (or --modality CT if this is CT) for folders "
                "and files, a 'modality' column in a CSV list, channel_names in dataset.json")


def hu_verdict(data: np.ndarray) -> tuple[str, str]:
    """Whether a volume's intensities look like CT Hounsfield units: ``("CT" | "MR" | "ambiguous", evidence)``.

    CT in HU is integer-valued, has air at about -1000..-1024 (padding outside the scanner's field of
    view may go down to -3024) and lies mostly in [-1024, 3071]. A volume with no voxel below -100 holds
    no air in HU, so it is not CT (MRI, or normalised data); anything in between is ambiguous.
    """
    flat = np.asarray(data).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    sub = flat[:: max(1, flat.size // 1_000_000)].astype(np.float32, copy=False)
    integer = bool(np.mean(sub == np.round(sub)) > 0.999)
    in_range = float(np.mean((sub >= CT_RANGE[0] - 1) & (sub <= CT_RANGE[1] + 1)))
    evidence = (f"min {lo:g}, max {hi:g}, {'integer' if integer else 'non-integer'} values, "
                f"{100 * in_range:.0f}% in [-1024, 3071]")
    if lo > -100:
        return "MR", evidence
    if integer and -3100 <= lo <= -900 and in_range >= 0.5:
        return "CT", evidence
    return "ambiguous", evidence


# ------------------------------------------------------------------------------------- geometry
def orientation_codes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def reorient_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the last three axes of ``arr`` (``[..., X, Y, Z]``) to the closest RAS+ orientation."""
    from nibabel import orientations as ornt

    current = ornt.io_orientation(affine)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(("R", "A", "S")))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return arr, affine
    spatial = arr.shape[-3:]
    lead = arr.ndim - 3
    out = arr
    # nibabel's apply_orientation works on the first three axes; move spatial axes to the front.
    if lead:
        out = np.moveaxis(out, list(range(lead)), list(range(3, 3 + lead)))
    out = ornt.apply_orientation(out, transform)
    if lead:
        out = np.moveaxis(out, list(range(3, 3 + lead)), list(range(lead)))
    new_affine = affine @ ornt.inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(out), new_affine


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def resampled_shape(shape, spacing, target) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(arr: np.ndarray, spacing, target, order: int) -> np.ndarray:
    """Resample the last three axes of ``arr`` from ``spacing`` to ``target`` (mm); ``order`` 1 = linear, 0 = nearest.

    Returns float64 for ``order=1`` and the input dtype for ``order=0``.
    """
    spacing = [float(s) for s in spacing]
    target = [float(t) for t in target]
    new_shape = resampled_shape(arr.shape[-3:], spacing, target)
    # resample the axis that shrinks most first: later passes then work on less data
    axes = sorted(range(3), key=lambda a: new_shape[a] / arr.shape[arr.ndim - 3 + a])
    out = arr
    for a in axes:
        ax = arr.ndim - 3 + a
        n_in, n_out = out.shape[ax], new_shape[a]
        if n_in == n_out and abs(spacing[a] - target[a]) < 1e-9:
            continue
        pos = np.arange(n_out, dtype=np.float64) * (target[a] / spacing[a])  # positions in input voxels
        pos = np.minimum(pos, n_in - 1)
        if order == 0:
            idx = np.minimum(np.floor(pos + 0.5).astype(np.intp), n_in - 1)
            out = np.take(out, idx, axis=ax)
            continue
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (pos - i0).reshape([-1 if d == ax else 1 for d in range(out.ndim)])
        lo = np.take(out, i0, axis=ax).astype(np.float64, copy=False)
        hi = np.take(out, i1, axis=ax).astype(np.float64, copy=False)
        out = lo + (hi - lo) * w
    if order == 1 and out.dtype != np.float64:
        out = out.astype(np.float64)
    return out


def scale_affine(affine: np.ndarray, spacing, target) -> np.ndarray:
    """Affine of the resampled grid: same first voxel centre, columns scaled to the new spacing."""
    factors = np.array([t / s for s, t in zip(spacing, target)] + [1.0])
    return affine @ np.diag(factors)


def body_box(image: np.ndarray, modality: str, margin: int = 4) -> tuple[slice, slice, slice] | None:
    """Bounding box of the body (CT > -500 HU; MRI > 5 % of the 99th percentile), with a margin in voxels."""
    vol = image[0]
    if modality == "CT":
        mask = vol > -500
    else:
        hi = np.percentile(vol, 99)
        mask = vol > 0.05 * hi
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo, hi_ = max(0, hits[0] - margin), min(vol.shape[axis], hits[-1] + 1 + margin)
        box.append(slice(int(lo), int(hi_)))
    return tuple(box)


# ------------------------------------------------------------------------------------- one volume
@dataclass
class Prepared:
    image: np.ndarray  # [C, X, Y, Z], int16 (CT) or float16 (MR)
    label: np.ndarray | None  # [1, X, Y, Z] uint8
    meta: dict


def parse_spacing(value) -> tuple[float, float, float] | None:
    """``"1.5"`` → (1.5, 1.5, 1.5); ``"0.8,0.8,2"`` → per axis; ``"native"``/None → keep the source spacing."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)):
        vals = [float(v) for v in value]
    else:
        text = str(value).strip().lower()
        if text == "native":
            return None
        vals = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or min(vals) <= 0:
        raise ValueError(f"target spacing {value!r} must be one positive number, three (x,y,z), or 'native'")
    return tuple(vals)


def intensity_stats(image: np.ndarray, modality: str) -> dict:
    """Statistics the stream uses to normalise at read time (MRI percentiles) and `info` reports.

    Over the whole volume; for a multi-channel ``[C, X, Y, Z]`` volume also per channel, under
    ``"channels"`` (a list of the same statistics), since channels have unrelated scales."""
    out = _stats(image, modality)
    if image.ndim == 4 and image.shape[0] > 1:
        out["channels"] = [_stats(ch, modality) for ch in image]
    return out


def _stats(image: np.ndarray, modality: str) -> dict:
    vol = image.astype(np.float32, copy=False)
    sub = vol.reshape(-1)[:: max(1, vol.size // 2_000_000)]  # strided sample keeps this cheap
    fg = sub[sub > (-500 if modality == "CT" else np.percentile(sub, 10))]
    if fg.size == 0:
        fg = sub
    p = np.percentile(fg, [0.5, 50, 99.5])
    return {
        "min": float(vol.min()),
        "max": float(vol.max()),
        "mean": float(sub.mean()),
        "std": float(sub.std()),
        "fg_p0_5": float(p[0]),
        "fg_p50": float(p[1]),
        "fg_p99_5": float(p[2]),
        "fg_mean": float(fg.mean()),
        "fg_std": float(fg.std()),
    }


def prepare_volume(
    images: list[str | Path],
    label: str | Path | None,
    modality: str | None,
    target_spacing=(1.5, 1.5, 1.5),
    crop_body: bool = False,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Prepared:
    """Load one case (one file or DICOM series per channel, optional label), check it, bring it to the stored form.

    ``modality`` is "CT" or "MR"; ``None`` (nothing declared it) decides from the intensities with
    :func:`hu_verdict`: HU-like volumes are stored as CT (``meta["modality_inferred"]`` says so), others
    are refused with the fix. Each file (or series) holding more than ``max_voxels`` voxels, stored or
    after resampling to ``target_spacing``, is refused (``too_large``) before its voxels are read."""
    channels, affine0 = [], None
    for path in images:
        data, affine = load_image(path, series_uid, target_spacing, max_voxels)
        if affine0 is None:
            affine0, shape0, first = affine, data.shape, path
        elif data.shape != shape0 or not np.allclose(affine, affine0, atol=1e-3):
            raise InputError(
                path,
                f"channel geometry differs from {Path(first).name} (shape {data.shape} vs {shape0})",
                "resample all channels of a case to one grid before building",
                code="channel_mismatch",
            )
        channels.append(data)
    image = np.stack(channels)  # [C, X, Y, Z] float32
    note = None
    if modality is None:  # nothing declared the modality: decide from the first channel's intensities
        verdict, evidence = hu_verdict(image[0])
        if verdict == "MR":
            raise InputError(images[0], f"modality not declared and the intensities are not CT Hounsfield "
                                        f"units ({evidence})", MODALITY_FIX, code="modality_mismatch")
        modality = "CT"
        note = f"modality not declared; stored as CT from its intensities ({evidence})"
        if verdict == "ambiguous":
            note = (f"modality not declared and the intensities are ambiguous ({evidence}); stored as CT "
                    f"(HU clipped to [-1024, 3071]); if this is not CT: {MODALITY_FIX}")
    orig_shape, orig_orient = list(image.shape[1:]), orientation_codes(affine0)
    orig_spacing = voxel_spacing(affine0)

    lab = None
    if label is not None:
        lab_data, lab_affine = load_image(label, None, target_spacing, max_voxels)
        if lab_data.shape != image.shape[1:]:
            raise InputError(
                label,
                f"label shape {lab_data.shape} differs from image shape {tuple(image.shape[1:])} ({Path(images[0]).name})",
                "pair each image with the label drawn on it, on the same grid",
                code="label_mismatch",
            )
        if not np.allclose(lab_affine, affine0, atol=1e-2 * float(orig_spacing.min())):
            raise InputError(
                label,
                "label affine differs from its image's affine",
                "resample the label onto the image grid (nearest neighbour) before building",
                code="label_mismatch",
            )
        rounded = np.rint(lab_data)
        if np.any(np.abs(rounded - lab_data) > 1e-3) or rounded.min() < 0 or rounded.max() > 255:
            raise InputError(label, "label holds non-integer or out-of-range (0..255) values", "store class indices",
                             code="label_mismatch")
        lab = rounded.astype(LABEL_DTYPE)[None]  # [1, X, Y, Z]

    image, affine = reorient_ras(image, affine0)
    if lab is not None:
        lab, _ = reorient_ras(lab, affine0)
    spacing = voxel_spacing(affine)
    if target_spacing is not None:
        image = resample(image, spacing, target_spacing, order=1)
        if lab is not None:
            lab = resample(lab, spacing, target_spacing, order=0)
        affine = scale_affine(affine, spacing, target_spacing)
        spacing = np.array(target_spacing, dtype=np.float64)

    crop = None
    if crop_body:
        box = body_box(image, modality)
        if box is not None:
            image = image[(slice(None), *box)]
            lab = lab[(slice(None), *box)] if lab is not None else None
            affine = affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box]) + affine[:3, 3]
            crop = [[b.start, b.stop] for b in box]

    if modality == "CT":
        stored = np.clip(np.rint(image), *CT_RANGE).astype(MODALITY_DTYPE["CT"])
        scale = 1.0
    else:
        peak = float(np.abs(image).max())
        scale = 1.0 if peak < 6e4 else 2.0 ** np.ceil(np.log2(peak / 3e4))  # float16 tops out at 65504
        stored = (image / scale).astype(MODALITY_DTYPE["MR"])
    meta = {
        "modality": modality,
        "dtype": str(stored.dtype),
        "shape": list(stored.shape),
        "spacing": [float(s) for s in spacing],
        "orientation": "RAS",
        "affine": np.round(affine, 6).tolist(),
        "background": BACKGROUND[modality],
        "intensity": intensity_stats(stored, modality),
        "intensity_scale": scale,
        "original": {
            "shape": orig_shape,
            "spacing": [float(s) for s in orig_spacing],
            "orientation": orig_orient,
            "affine": np.round(affine0, 6).tolist(),
        },
        "body_crop": crop,
    }
    if note is not None:
        meta["modality_inferred"] = note
    if lab is not None:
        meta["label_classes"] = sorted(int(v) for v in np.unique(lab))
    return Prepared(stored, lab, meta)

