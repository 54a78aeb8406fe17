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

Headers come first: every slice's geometry and rescale tags are read without pixel data and checked,
then the volume's geometry and size (``preprocess.check_size``), and only then are pixels decoded
into one volume of the checked size. Every problem carries a code of ``shards.errors.REASONS``.

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
(DICOMDIR, structured reports, RT structure sets, presentation states: no ``Rows``, a series of their
own) are skipped; a file without ``Rows`` that belongs to an image series, or to no series, is a
damaged slice and recorded as a problem. Files are read through a reader that never asks for more
bytes than the file has left: a damaged element length costs no memory.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

INSTALL_FIX = "pip install 'medssl[dicom]'"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_HEADER_TAGS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "Rows", "SOPClassUID"]


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


class _BoundedFile(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than what is left in it. pydicom reads an element's
    declared length in one call, and Python allocates that many bytes before reading: a damaged length
    field would otherwise cost up to 4 GB for a file of a few kB."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return super().read()
        return super().read(min(n, max(0, self._size - self.tell())))


def _require_pydicom(where: Path):
    try:
        import pydicom
    except ImportError:
        raise InputError(where, "pydicom is not installed", INSTALL_FIX, code="dicom_unavailable") from None
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
    no_rows: list[tuple[Path, str, str]] = []  # (file, its SeriesInstanceUID, its SOP class name)
    for path in _candidates(root):
        try:  # pydicom parses values lazily: every access stays inside the try
            with _BoundedFile(path) as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            image = "Rows" in ds
            uid, modality, description = (str(ds.get(t, "") or "") for t in _HEADER_TAGS[:3])
            meta = getattr(ds, "file_meta", None)
            sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
            sop_name = sop.name if isinstance(sop, pydicom.uid.UID) else ""
        except Exception as exc:  # InvalidDicomError, truncated header, a damaged value, OSError, ...
            problems.setdefault(path.parent, []).append(
                (path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        if not image:
            no_rows.append((path, uid, sop_name))
            continue
        if not uid:
            problems.setdefault(path.parent, []).append((path, "image without SeriesInstanceUID"))
            continue
        groups.setdefault(uid, []).append((path, modality, description))
    for path, uid, sop_name in no_rows:
        # DICOMDIR, SR, RTSTRUCT, presentation states are not images and have series of their own; a file
        # without Rows in an image series, or without a series, is damaged (perhaps a lost first slice)
        own_series = uid and uid not in groups and "Image Storage" not in sop_name
        if own_series or sop_name == "Media Storage Directory Storage":
            continue
        problems.setdefault(path.parent, []).append(
            (path, f"not a readable DICOM image: no Rows tag ({sop_name or 'no SOP Class UID'}, "
                   f"{'series ' + uid if uid else 'no SeriesInstanceUID'})"))
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


@dataclass
class _Slice:
    """The header of one slice file, read without its pixel data."""

    path: Path
    name: str  # relative to the series folder, for messages
    iop: np.ndarray
    ipp: np.ndarray
    spacing: np.ndarray  # PixelSpacing: [between rows, between columns] in mm
    size: tuple[int, int]  # Rows, Columns
    slope: float
    intercept: float


GEOMETRY_FIX = ("re-export the series with its geometry tags (scouts, screenshots and secondary captures have "
                "none: remove them from the input)")


def _floats(value, n: int, tag: str, name: str, fail) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        fail(name, f"missing or invalid {tag} ({value!r})", GEOMETRY_FIX, code="dicom_bad_tag")
    return arr


def _number(value, default, kind, tag: str, name: str, fail):
    """An IS/DS/US tag as ``kind`` (``default`` when absent or empty), refusing what is not a finite number."""
    if value is None or value == "":
        return default
    try:
        out = kind(float(value))
    except (TypeError, ValueError, OverflowError):
        out = None
    if out is None or not np.isfinite(out):
        fail(name, f"invalid {tag} ({value!r})", code="dicom_bad_tag")
    return out


def _read_header(pydicom, path: Path, name: str, fail) -> _Slice:
    """One slice's header, checked; pydicom parses values lazily, so every access stays inside the try."""
    try:
        with _BoundedFile(path) as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        raw = {t: ds.get(t) for t in ("NumberOfFrames", "SamplesPerPixel", "ImageOrientationPatient",
                                      "ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope",
                                      "RescaleIntercept")}
        enhanced = "PerFrameFunctionalGroupsSequence" in ds
    except Exception as exc:  # InvalidDicomError, a damaged length or value, OSError, ...
        fail(name, f"not a readable DICOM file ({type(exc).__name__}: {exc})", code="dicom_unreadable")
    if enhanced or _number(raw["NumberOfFrames"], 1, int, "NumberOfFrames", name, fail) > 1:
        fail(name, "multi-frame (enhanced) DICOM is not supported yet", code="dicom_multiframe")
    if _number(raw["SamplesPerPixel"], 1, int, "SamplesPerPixel", name, fail) != 1:
        fail(name, "colour (RGB) image: not a CT/MR intensity volume", code="dicom_colour")
    iop = _floats(raw["ImageOrientationPatient"], 6, "ImageOrientationPatient", name, fail)
    ipp = _floats(raw["ImagePositionPatient"], 3, "ImagePositionPatient", name, fail)
    spacing = _floats(raw["PixelSpacing"], 2, "PixelSpacing", name, fail)
    if np.any(spacing <= 0):
        fail(name, f"PixelSpacing {spacing.tolist()} must be positive", GEOMETRY_FIX, code="dicom_bad_tag")
    size = (_number(raw["Rows"], 0, int, "Rows", name, fail), _number(raw["Columns"], 0, int, "Columns", name, fail))
    if min(size) < 2:
        fail(name, f"Rows x Columns {size}: not an image of at least 2x2 pixels", code="not_3d")
    slope = _number(raw["RescaleSlope"], 1.0, float, "RescaleSlope", name, fail) or 1.0
    intercept = _number(raw["RescaleIntercept"], 0.0, float, "RescaleIntercept", name, fail)
    return _Slice(path, name, iop, ipp, spacing, size, slope, intercept)


def _pixels(pydicom, sl: _Slice, fail) -> np.ndarray:
    """One slice's pixels ``[rows, cols]``, decoded only after the series' geometry and size passed."""
    try:
        with _BoundedFile(sl.path) as fh:
            ds = pydicom.dcmread(fh)
    except Exception as exc:
        fail(sl.name, f"not a readable DICOM file ({type(exc).__name__}: {exc})", code="dicom_unreadable")
    try:
        pix = ds.pixel_array
    except Exception as exc:  # missing handler, truncated data, bad encoding
        try:
            ts = ds.file_meta.TransferSyntaxUID
            compressed, ts_name = bool(ts.is_compressed), ts.name
        except Exception:
            compressed, ts_name = False, ""
        if compressed:
            fail(sl.name, f"compressed pixel data ({ts_name}) cannot be decoded ({type(exc).__name__}: {exc})",
                 code="dicom_compressed")
        fail(sl.name, f"pixel data cannot be read ({type(exc).__name__}: {exc})", code="dicom_pixels")
    if pix.shape != sl.size:
        fail(sl.name, f"pixel data of shape {pix.shape} does not match Rows x Columns {sl.size}", code="dicom_pixels")
    return pix


def load_series(series: DicomSeries, check=None) -> tuple[np.ndarray, np.ndarray]:
    """Read one series as ``(float32 [I, J, K], float64 4x4 affine to RAS+ mm)``; see the module docstring.

    Headers first: the geometry is checked and ``check(shape, affine)`` runs (default: a finite,
    invertible affine with sane voxel sizes, and at most ``preprocess.DEFAULT_MAX_VOXELS`` voxels)
    before any pixel data is decoded or the volume allocated."""
    folder = series.folder
    pydicom = _require_pydicom(folder)

    def fail(name, reason, fix="", code="dicom_unreadable"):
        raise InputError(folder, f"{name}: {reason}" if name else reason, fix, code=code)

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(folder))
        except ValueError:
            return str(p)

    if series.problems:
        p, reason = series.problems[0]
        more = f" (and {len(series.problems) - 1} more unreadable files)" if len(series.problems) > 1 else ""
        fail(rel(p), reason + more, code="dicom_unreadable")
    if not series.files:
        fail("", "no DICOM image files in this series", "point the input at a folder of DICOM images",
             code="dicom_series")

    geom = [_read_header(pydicom, path, rel(path), fail) for path in series.files]
    first = geom[0]
    for g in geom[1:]:
        for what, a, b, tol in (("ImageOrientationPatient", g.iop, first.iop, 1e-3),
                                ("PixelSpacing", g.spacing, first.spacing, 1e-3),
                                ("Rows/Columns", np.array(g.size), np.array(first.size), 0)):
            if not np.allclose(a, b, rtol=0, atol=tol):
                fail(g.name, f"{what} {np.round(a, 6).tolist()} differs from {np.round(b, 6).tolist()} in "
                     f"{first.name}: the folder mixes images of different geometry under one SeriesInstanceUID",
                     code="dicom_mixed_geometry")
    if len(geom) == 1:
        fail(first.name, "only one slice: not a 3D volume", "pass 3D series only (remove 2D images from the input)",
             code="not_3d")

    row, col = first.iop[:3], first.iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        fail(first.name, f"ImageOrientationPatient {first.iop.tolist()} is not two orthogonal unit vectors",
             code="dicom_bad_tag")
    normal = np.cross(row, col)
    ipps = np.stack([g.ipp for g in geom])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipps = dist[order], ipps[order]
    names = [geom[i].name for i in order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-2)
    if dup.size:
        a = dup[0]
        fail(names[a + 1], f"duplicate slice position {dist[a]:.3f} mm along the normal (also in {names[a]}); "
             f"{dup.size} duplicate(s) in all", "the folder may hold several acquisitions (echoes, phases, copies) "
             "under one SeriesInstanceUID: split them into separate folders or remove the copies",
             code="dicom_duplicate_slice")
    step = float(np.median(gaps))
    missing = np.flatnonzero(gaps > 1.5 * step)
    if missing.size:
        where = ", ".join(f"{dist[m]:.2f}..{dist[m + 1]:.2f} mm (~{round(gaps[m] / step) - 1} slice(s))"
                          for m in missing[:5])
        fail("", f"missing slice(s): gap(s) between positions {where} along the slice normal, where the "
             f"spacing is {step:.3f} mm ({len(names)} slices present)", code="dicom_missing_slice")
    uneven = np.flatnonzero(np.abs(gaps - step) > max(0.1 * step, 1e-2))
    if uneven.size:
        m = uneven[0]
        fail("", f"uneven slice spacing: {gaps[m]:.3f} mm between positions {dist[m]:.2f} and {dist[m + 1]:.2f} mm "
             f"where the median spacing is {step:.3f} mm", code="dicom_uneven_spacing")
    n = len(names)
    third = (ipps[-1] - ipps[0]) / (n - 1)  # along the normal, plus any gantry-tilt shear
    off_line = np.linalg.norm(ipps - (ipps[0] + np.outer(np.arange(n), third)), axis=1)
    if off_line.max() > max(0.1, 0.2 * float(first.spacing.min())):
        bad = int(off_line.argmax())
        fail(names[bad], f"slice position lies {off_line[bad]:.2f} mm off the line through the other slices",
             "the series mixes stacks of different positions: split or re-export it", code="dicom_mixed_geometry")

    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]  # i: along a row, steps between columns (PixelSpacing[1])
    lps[:3, 1] = col * first.spacing[0]  # j: down a column, steps between rows (PixelSpacing[0])
    lps[:3, 2] = third
    lps[:3, 3] = ipps[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS+ -> RAS+
    rows, cols = first.size
    shape = (cols, rows, n)
    if check is None:
        from .preprocess import DEFAULT_MAX_VOXELS, check_affine, check_size

        check_affine(folder, affine)
        check_size(folder, shape, affine, None, DEFAULT_MAX_VOXELS)
    else:
        check(shape, affine)

    vol = np.empty(shape, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for k, idx in enumerate(order):
            sl = geom[idx]
            vol[:, :, k] = _pixels(pydicom, sl, fail).T * sl.slope + sl.intercept  # [row, col] -> [i=col, j=row]
    bad = int(vol.size - np.count_nonzero(np.isfinite(vol)))
    if bad:
        fail("", f"{bad} non-finite voxels (NaN/inf) of {vol.size} after RescaleSlope/Intercept",
             code="non_finite")
    return vol, affine
