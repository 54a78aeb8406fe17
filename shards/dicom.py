"""DICOM series folders as 3D volumes (optional: ``pip install 'medssl[dicom]'`` brings pydicom).

Hospital exports arrive as trees of single-slice DICOM files, often several series per folder, with
file names that say nothing about slice order. :func:`find_series` walks such a tree and groups the
image files by ``SeriesInstanceUID`` (headers only, so it is quick); :func:`load_series` reads one
series as ``(float32 [I, J, K], affine)`` exactly as ``nibabel.load`` would give it for the same scan
converted to NIfTI by a standard converter (dcm2niix-like):

* ``i`` runs along the DICOM columns (first ``ImageOrientationPatient`` vector), ``j`` along the rows
  (second vector), ``k`` over the slices in increasing position along the slice normal (their cross
  product), whatever the order of the files;
* the affine maps ``(i, j, k)`` to nibabel's RAS+ world coordinates in mm (DICOM patient coordinates
  are LPS+, so x and y are negated). Slice spacing comes from ``ImagePositionPatient``, never from
  ``SliceThickness``; oblique orientations keep their direction cosines, and a CT gantry tilt is kept
  as the shear it is (the third column runs from the first slice position to the last);
* intensities are ``raw * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT).

A series that cannot be trusted as one regular 3D grid raises :class:`~shards.errors.InputError`
naming the series folder (and the offending file, where there is one), the reason and a fix: a missing
slice, a single slice, uneven spacing, duplicate positions, slices that disagree on orientation, size
or pixel spacing, missing geometry tags, unreadable or undecodable files, multi-frame (enhanced) files.

Unreadable files: :func:`find_series` never raises for a single bad file, because one corrupt file must
not stop a build over thousands of series. A file that looks like DICOM (``DICM`` marker or a
``.dcm``/``.dicom``/``.ima`` name) but whose header cannot be read cannot be attributed to a series, so
it is recorded in ``problems`` of every series with files in the same folder (it may be one of their
slices: a lost first or last slice leaves no gap to detect), or of a file-less placeholder series
(``uid == ""``) when the folder holds no readable series. :func:`load_series` then raises an
``InputError`` naming that file, and the builder records it in ``errors.jsonl``. Non-image objects
(DICOMDIR, structured reports, RT structure sets, presentation states: no ``Rows``) are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

INSTALL_FIX = "pip install 'medssl[dicom]'"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
REEXPORT = "re-export the complete series or remove it from the input"
_HEADER_TAGS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "Rows"]


def pydicom_available() -> bool:
    """Whether the optional DICOM support (pydicom) is installed."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` carries the DICOM Part 10 marker (``DICM`` at byte 128); needs no pydicom."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class DicomSeries:
    """One DICOM series found below an input folder.

    ``folder`` is the deepest folder holding all of its ``files`` (sorted paths). ``problems`` lists
    ``(file, reason)`` for unreadable files next to it; :func:`load_series` refuses a series that has any.
    """

    uid: str
    folder: Path
    files: list[Path]
    modality: str  # "CT", "MR", ... as written in the files ("" if absent)
    description: str
    problems: list[tuple[Path, str]] = field(default_factory=list)


def _require_pydicom(where: Path):
    try:
        import pydicom
    except ImportError:
        raise InputError(where, "pydicom is not installed", INSTALL_FIX) from None
    return pydicom


def _candidates(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and (name.lower().endswith(DICOM_SUFFIXES) or is_dicom_file(p)):
                files.append(p)
    return files


def find_series(root: str | Path) -> list[DicomSeries]:
    """Every DICOM image series below ``root`` (recursively), sorted by folder then UID.

    Reads headers only. Files of one ``SeriesInstanceUID`` are grouped even when they lie in several
    folders (a series copied twice then fails in :func:`load_series` with duplicate positions).
    """
    root = Path(root)
    pydicom = _require_pydicom(root)
    groups: dict[str, list] = {}
    problems: dict[Path, list[tuple[Path, str]]] = {}
    for path in _candidates(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception as exc:  # InvalidDicomError, truncated header, OSError, ...
            problems.setdefault(path.parent, []).append(
                (path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        if "Rows" not in ds:
            continue  # DICOMDIR, SR, RTSTRUCT, presentation state: not an image
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            problems.setdefault(path.parent, []).append((path, "image without SeriesInstanceUID"))
            continue
        groups.setdefault(uid, []).append((path, str(ds.get("Modality", "") or ""),
                                           str(ds.get("SeriesDescription", "") or "")))
    out: list[DicomSeries] = []
    covered: set[Path] = set()
    for uid, items in groups.items():
        files = sorted(p for p, _, _ in items)
        parents = sorted({p.parent for p in files})
        covered.update(parents)
        found = [pr for d in parents for pr in problems.get(d, [])]
        folder = Path(os.path.commonpath([str(d) for d in parents]))
        out.append(DicomSeries(uid, folder, files, items[0][1], items[0][2], found))
    for d, found in problems.items():
        if d not in covered:
            out.append(DicomSeries("", d, [], "", "unreadable DICOM files", found))
    return sorted(out, key=lambda s: (str(s.folder), s.uid))


def _floats(ds, tag: str, n: int, name: str, fail) -> np.ndarray:
    value = ds.get(tag)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        fail(name, f"missing or invalid {tag} ({value!r})", "re-export the series with its geometry tags "
             "(scouts, screenshots and secondary captures have none: remove them from the input)")
    return arr


def _pixels(ds, name: str, fail) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # missing handler, truncated data, bad encoding
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed:
            fail(name, f"compressed pixel data ({ts.name}) cannot be decoded ({type(exc).__name__}: {exc})",
                 "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm), "
                 "or decompress the files first (gdcmconv --raw, dcmdjpeg)")
        fail(name, f"pixel data cannot be read ({type(exc).__name__}: {exc})", REEXPORT)


def load_series(series: DicomSeries) -> tuple[np.ndarray, np.ndarray]:
    """Read one series as ``(float32 [I, J, K], float64 4x4 affine to RAS+ mm)``; see the module docstring."""
    folder = series.folder
    pydicom = _require_pydicom(folder)

    def fail(name, reason, fix=REEXPORT):
        raise InputError(folder, f"{name}: {reason}" if name else reason, fix)

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(folder))
        except ValueError:
            return str(p)

    if series.problems:
        p, reason = series.problems[0]
        more = f" (and {len(series.problems) - 1} more unreadable files)" if len(series.problems) > 1 else ""
        fail(rel(p), reason + more, "remove or replace the file; if it was a slice, " + REEXPORT)
    if not series.files:
        fail("", "no DICOM image files in this series", "point the input at a folder of DICOM images")

    geom, slices = [], []
    for path in series.files:
        name = rel(path)
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            fail(name, f"not a readable DICOM file ({type(exc).__name__}: {exc})", "remove or replace the file")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            fail(name, "multi-frame (enhanced) DICOM is not supported yet",
                 "convert the series with dcm2niix and pass the NIfTI, or export it as one file per slice")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            fail(name, "colour (RGB) image: not a CT/MR intensity volume", "remove it from the input")
        iop = _floats(ds, "ImageOrientationPatient", 6, name, fail)
        ipp = _floats(ds, "ImagePositionPatient", 3, name, fail)
        spacing = _floats(ds, "PixelSpacing", 2, name, fail)
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        pix = _pixels(ds, name, fail)
        if pix.shape != size:
            fail(name, f"pixel data of shape {pix.shape} does not match Rows x Columns {size}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        geom.append((name, iop, ipp, spacing, size))
        slices.append((pix, slope, intercept))

    name0, iop0, _, spacing0, size0 = geom[0]
    for name, iop, _, spacing, size in geom[1:]:
        for what, a, b, tol in (("ImageOrientationPatient", iop, iop0, 1e-3), ("PixelSpacing", spacing, spacing0, 1e-3),
                                ("Rows/Columns", np.array(size), np.array(size0), 0)):
            if not np.allclose(a, b, rtol=0, atol=tol):
                fail(name, f"{what} {np.round(a, 6).tolist()} differs from {np.round(b, 6).tolist()} in {name0}: "
                     "the folder mixes images of different geometry under one SeriesInstanceUID",
                     "split the series (e.g. remove localizer/scout images) or re-export it")
    if len(geom) == 1:
        fail(name0, "only one slice: not a 3D volume", "pass 3D series only (remove 2D images from the input)")

    row, col = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        fail(name0, f"ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors", REEXPORT)
    normal = np.cross(row, col)
    ipps = np.stack([g[2] for g in geom])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipps = dist[order], ipps[order]
    names = [geom[i][0] for i in order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-2)
    if dup.size:
        a = dup[0]
        fail(names[a + 1], f"duplicate slice position {dist[a]:.3f} mm along the normal (also in {names[a]}); "
             f"{dup.size} duplicate(s) in all", "the folder may hold several acquisitions (echoes, phases, copies) "
             "under one SeriesInstanceUID: split them into separate folders or remove the copies")
    step = float(np.median(gaps))
    missing = np.flatnonzero(gaps > 1.5 * step)
    if missing.size:
        where = ", ".join(f"{dist[m]:.2f}..{dist[m + 1]:.2f} mm (~{round(gaps[m] / step) - 1} slice(s))"
                          for m in missing[:5])
        fail("", f"missing slice(s): gap(s) between positions {where} along the slice normal, where the "
             f"spacing is {step:.3f} mm ({len(names)} slices present)", REEXPORT)
    uneven = np.flatnonzero(np.abs(gaps - step) > max(0.1 * step, 1e-2))
    if uneven.size:
        m = uneven[0]
        fail("", f"uneven slice spacing: {gaps[m]:.3f} mm between positions {dist[m]:.2f} and {dist[m + 1]:.2f} mm "
             f"where the median spacing is {step:.3f} mm", "convert it with a tool that resamples variable "
             "spacing (dcm2niix) and pass the NIfTI, or re-export with uniform spacing")
    n = len(names)
    third = (ipps[-1] - ipps[0]) / (n - 1)  # along the normal, plus any gantry-tilt shear
    off_line = np.linalg.norm(ipps - (ipps[0] + np.outer(np.arange(n), third)), axis=1)
    if off_line.max() > max(0.1, 0.2 * float(spacing0.min())):
        bad = int(off_line.argmax())
        fail(names[bad], f"slice position lies {off_line[bad]:.2f} mm off the line through the other slices",
             "the series mixes stacks of different positions: split or re-export it")

    lps = np.eye(4)
    lps[:3, 0] = row * spacing0[1]  # i: along a row, steps between columns (PixelSpacing[1])
    lps[:3, 1] = col * spacing0[0]  # j: down a column, steps between rows (PixelSpacing[0])
    lps[:3, 2] = third
    lps[:3, 3] = ipps[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS+ -> RAS+

    vol = np.empty((size0[1], size0[0], n), dtype=np.float32)
    for k, idx in enumerate(order):
        pix, slope, intercept = slices[idx]
        vol[:, :, k] = pix.T * slope + intercept  # [row, col] -> [i=col, j=row]
    return vol, affine
