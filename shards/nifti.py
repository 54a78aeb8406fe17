"""Careful NIfTI reading for ``shards build``: nothing in a file is trusted before it is checked.

``nibabel.load`` is made to be forgiving: it reads a ``.nii.gz`` only as far as the voxels go, so the
gzip trailer (CRC-32 and length) is never checked and a damaged stream can give damaged voxels; it
repairs odd header fields on the fly (a pixdim of 0 becomes 1 mm, a negative one positive); and it
allocates whatever the header's dims claim. Training data wants the opposite, so a NIfTI-1/2 single
file (``.nii``, or gzip-compressed: recognised by its first bytes, not its name) is read in two steps:

1. :func:`open_nifti` reads the header alone (the first 540 bytes, decompressed) and checks it: magic
   and size, ``dim`` (3D, or 4D with one volume; 2..``MAX_AXIS`` voxels per axis), a supported
   ``datatype`` that matches ``bitpix``, ``vox_offset``, finite scaling, positive finite ``pixdim``,
   millimetre units, valid qform/sform codes, a unit quaternion, and, where the sform is used, voxel
   sizes that agree with ``pixdim``. The affine is nibabel's (``get_best_affine``) of the checked
   header. A plain ``.nii`` must be exactly ``vox_offset + voxels × itemsize`` bytes long. No voxel
   memory is allocated, so the caller checks the volume's size (``preprocess.check_size``) first.
2. :meth:`NiftiFile.read` reads the voxels into one array of exactly the described size. A gzip
   stream is decompressed in chunks and read to its end, so Python's gzip module checks the CRC-32 and
   length in its trailer; a stream that holds more than the header describes is refused one byte
   later, so a gzip bomb never inflates past the described size. Scaling is nibabel's
   (``apply_read_scaling``) and the result is float32 ``[X, Y, Z]``, as ``nibabel`` would give it.

Every problem raises :class:`~shards.errors.InputError` with a code of ``shards.errors.REASONS``.
Header extensions (between the header and ``vox_offset``) are skipped unread: the build stores none.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

MAX_AXIS = 65_535  # voxels along one axis; more only comes from a damaged dim field
MAX_VOX_OFFSET = 64 << 20  # header + extensions; real extensions (DICOM, AFNI, JSON) are far smaller
CHUNK = 1 << 20  # bytes decompressed per step
GZIP_MAGIC = b"\x1f\x8b"
N1_MAGIC, N2_MAGIC = b"n+1\0", b"n+2\0\r\n\x1a\n"
PAIR_MAGICS = (b"ni1\0", b"ni2\0\r\n\x1a\n")
# NIfTI datatype codes of scalar integer and float voxels (no complex, RGB, binary or float128)
SUPPORTED_DATATYPES = {2: "uint8", 4: "int16", 8: "int32", 16: "float32", 64: "float64", 256: "int8",
                       512: "uint16", 768: "uint32", 1024: "int64", 1280: "uint64"}
SPATIAL_UNITS = {0: "unknown (read as mm)", 1: "metres", 2: "mm", 3: "microns"}


@dataclass
class NiftiFile:
    """A NIfTI file whose header passed :func:`open_nifti`; its voxels are read by :meth:`read`."""

    path: Path
    compressed: bool
    shape: tuple[int, int, int]
    dtype: np.dtype  # on disk, with its byte order
    offset: int  # vox_offset: where the voxels start (in the decompressed stream)
    slope: float
    inter: float
    affine: np.ndarray  # float64 4x4, voxel -> RAS+ world mm

    @property
    def voxel_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The voxels as float32 ``[X, Y, Z]`` (scaled), after checking the stream to its end."""
        from nibabel.volumeutils import apply_read_scaling

        flat = np.empty(math.prod(self.shape), dtype=self.dtype)
        buf = memoryview(flat.view(np.uint8))
        with _read_errors(self.path):
            if self.compressed:
                with gzip.open(self.path, "rb") as stream:
                    _skip(stream, self.offset, self.path)
                    got = _fill(stream, buf)
                    extra = stream.read(1) if got == len(buf) else b""  # reaching the end checks CRC + length
                    if extra:  # damage (the CRC says so at the end) or data past the voxels: find out, bounded
                        _drain(stream, max(len(buf), CHUNK))
            else:
                with open(self.path, "rb") as stream:
                    stream.seek(self.offset)
                    got = _fill(stream, buf)
                    extra = stream.read(1)
        described = f"{self.offset + len(buf):,} bytes (vox_offset {self.offset} + {_voxels(self)})"
        if got < len(buf):
            raise InputError(self.path, f"the {'decompressed ' if self.compressed else ''}data ends "
                             f"{len(buf) - got:,} bytes before the {described} its header describes",
                             code="truncated")
        if extra:
            raise InputError(self.path, f"the {'gzip stream' if self.compressed else 'file'} holds more data than "
                             f"the {described} its header describes (damaged dims/datatype, or a gzip bomb)",
                             code="size_mismatch")
        arr = flat.reshape(self.shape, order="F")  # NIfTI voxels: x varies fastest
        scaled = apply_read_scaling(arr, self.slope if self.slope != 1 else None, self.inter or None)
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(scaled, dtype=np.float32)
        del flat, arr, scaled
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(self.path, f"{bad} non-finite voxels (NaN/inf, or beyond the float32 range after "
                             f"scaling) of {data.size}", code="non_finite")
        return data


def _voxels(nf: NiftiFile) -> str:
    return f"{'x'.join(map(str, nf.shape))} voxels of {nf.dtype.itemsize} byte(s)"


# ----------------------------------------------------------------------------------------- header
def open_nifti(path: str | Path) -> NiftiFile:
    """Check a NIfTI file's header (and a plain file's size) without reading its voxels."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(path, "file does not exist", code="missing") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the file ({exc.strerror or exc})", code="unreadable") from None
    if size == 0:
        raise InputError(path, "empty file (0 bytes)", code="empty")
    with _read_errors(path):
        with open(path, "rb") as fh:
            compressed = fh.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            head = stream.read(540)  # the header: 348 bytes (NIfTI-1) or 540 (NIfTI-2)
    nf = _parse_header(path, head, compressed)
    if not compressed:
        expected = nf.offset + nf.voxel_bytes
        described = f"{expected:,} bytes (vox_offset {nf.offset} + {_voxels(nf)})"
        if size < expected:
            raise InputError(path, f"the file has only {size:,} bytes; its header describes {described}",
                             code="truncated")
        if size > expected:
            raise InputError(path, f"the file has {size - expected:,} bytes more than the {described} its header "
                             "describes (damaged dims/datatype, or data appended)", code="size_mismatch")
    return nf


def _parse_header(path: Path, head: bytes, compressed: bool) -> NiftiFile:
    from nibabel.nifti1 import Nifti1Header, data_type_codes
    from nibabel.nifti2 import Nifti2Header

    what = "gzip-compressed data" if compressed else "file"
    if len(head) < 4:
        raise InputError(path, f"not a NIfTI file: the {what} holds only {len(head)} bytes", code="not_nifti")
    sizes = {struct.unpack("<i", head[:4])[0]: "<", struct.unpack(">i", head[:4])[0]: ">"}
    if 348 in sizes:
        klass, hsize, endian, magic, want = Nifti1Header, 348, sizes[348], head[344:348], N1_MAGIC
    elif 540 in sizes:
        klass, hsize, endian, magic, want = Nifti2Header, 540, sizes[540], head[4:12], N2_MAGIC
    else:
        raise InputError(path, f"not a NIfTI file: the {what} does not start with a NIfTI-1 or NIfTI-2 header "
                         f"(first bytes {head[:8]!r})", code="not_nifti")
    if len(head) < hsize:
        raise InputError(path, f"the {what} ends inside its {hsize}-byte NIfTI header", code="truncated")
    if magic in PAIR_MAGICS:
        raise InputError(path, "header of a NIfTI .hdr/.img pair, not a single .nii file",
                         "convert the pair to one .nii.gz (e.g. nibabel: nib.save(nib.load('x.hdr'), 'x.nii.gz'))",
                         code="not_nifti")
    if magic != want:
        raise InputError(path, f"damaged header: magic {magic!r}, expected {want!r}", code="bad_header")
    hdr = klass(head[:hsize], endianness=endian, check=False)
    s = hdr.structarr

    def bad(message, code="bad_header", fix=""):
        raise InputError(path, message, fix, code=code)

    dim = [int(v) for v in s["dim"]]
    if not 1 <= dim[0] <= 7:
        bad(f"damaged header: dim[0] = {dim[0]} dimensions (1..7 allowed)")
    dims = tuple(dim[1:dim[0] + 1])
    if min(dims) < 1:
        bad(f"damaged header: dims {dims} hold a size below 1")
    shape = dims[:3] if len(dims) == 4 and dims[3] == 1 else dims
    if len(shape) != 3:
        message, fix = f"{len(shape)}D image (shape {shape})", ""
        if len(shape) == 4:
            message += f" with {shape[3]} volumes along the 4th axis"
            fix = "split the channels into one 3D file each (nnU-Net v2 layout: CASE_0000, CASE_0001, …) or pass one"
        elif len(shape) == 2:
            message += ": a single slice, not a 3D volume"
        bad(message, "not_3d", fix)
    if min(shape) < 2:
        bad(f"degenerate shape {shape}: fewer than 2 voxels along an axis", "not_3d")
    if max(shape) > MAX_AXIS:
        bad(f"damaged header: dims {shape} claim more than {MAX_AXIS} voxels along an axis")

    code = int(s["datatype"])
    if code not in SUPPORTED_DATATYPES:
        name = data_type_codes.label[code] if code in data_type_codes.code else "unknown"
        bad(f"datatype {name} (code {code}) is not supported (supported: "
            f"{', '.join(sorted(set(SUPPORTED_DATATYPES.values())))})", "unsupported_dtype")
    dtype = hdr.get_data_dtype()
    if int(s["bitpix"]) != 8 * dtype.itemsize:
        bad(f"damaged header: bitpix {int(s['bitpix'])} does not match datatype {dtype.name} ({8 * dtype.itemsize})")

    min_offset = hsize + 4  # the header and the 4-byte extension flag
    raw_offset = float(s["vox_offset"])
    if not (math.isfinite(raw_offset) and raw_offset == int(raw_offset)
            and min_offset <= raw_offset <= MAX_VOX_OFFSET):
        bad(f"damaged header: vox_offset {raw_offset!r} (a whole number of bytes in "
            f"{min_offset}..{MAX_VOX_OFFSET} for a single-file NIfTI)")

    slope, inter = float(s["scl_slope"]), float(s["scl_inter"])
    if slope == 0 or math.isnan(slope):  # the standard's "no scaling" (nibabel writes NaN)
        slope, inter = 1.0, 0.0
    elif not (math.isfinite(slope) and math.isfinite(inter)):
        bad(f"damaged header: scl_slope {slope!r}, scl_inter {inter!r} (data scaling must be finite)")

    pixdim = np.asarray(s["pixdim"], dtype=np.float64)
    zooms = pixdim[1:4]
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        bad(f"pixdim[1:4] = {zooms.tolist()}: voxel sizes must be positive finite numbers (mm)", "bad_spacing")
    if pixdim[0] not in (-1.0, 0.0, 1.0):
        bad(f"damaged header: pixdim[0] (qfac) = {pixdim[0]!r}, expected 1 or -1")
    units = int(s["xyzt_units"]) & 7
    if units in (1, 3):
        bad(f"spatial units are {SPATIAL_UNITS[units]}; voxel sizes are read in mm", "bad_spacing",
            "rewrite the header in mm (nibabel: hdr.set_xyzt_units('mm') with pixdim and sform in mm)")
    if units not in (0, 2):
        bad(f"damaged header: xyzt_units {int(s['xyzt_units'])} names no spatial unit")
    qcode, scode = int(s["qform_code"]), int(s["sform_code"])
    if not (0 <= qcode <= 5 and 0 <= scode <= 5):
        bad(f"damaged header: qform_code {qcode}, sform_code {scode} (0..5 allowed)")

    affine = _affine(path, hdr, zooms)
    return NiftiFile(path, compressed, tuple(int(v) for v in shape), dtype, int(raw_offset), slope, inter, affine)


def _affine(path: Path, hdr, zooms: np.ndarray) -> np.ndarray:
    """nibabel's choice (sform, else qform, else pixdim), refusing what nibabel would read wrongly."""
    from nibabel.spatialimages import HeaderDataError

    s = hdr.structarr
    fields = (["srow_x", "srow_y", "srow_z"] if s["sform_code"] > 0 else
              ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"] if s["qform_code"] > 0
              else [])
    values = np.concatenate([np.ravel(s[f]).astype(np.float64) for f in fields]) if fields else np.zeros(1)
    if not np.all(np.isfinite(values)):
        raise InputError(path, f"non-finite {'sform' if s['sform_code'] > 0 else 'qform'} in the header",
                         code="bad_affine")
    try:
        if s["sform_code"] > 0:
            affine = hdr.get_sform()
            sizes = np.linalg.norm(affine[:3, :3], axis=0)
            if not np.allclose(sizes, zooms, rtol=1e-3, atol=1e-5):
                raise InputError(path, f"the sform's voxel sizes {np.round(sizes, 5).tolist()} mm disagree with "
                                 f"pixdim {np.round(zooms, 5).tolist()}: one of them is damaged",
                                 "re-export the volume; if the sform is right (e.g. a gantry-tilted CT stored with "
                                 "shear), set pixdim[1:4] to its column lengths", code="bad_spacing")
            _same_axes(path, hdr, affine)
        elif s["qform_code"] > 0:
            if s["pixdim"][0] == 0:  # the standard reads qfac 0 as 1
                hdr = hdr.copy()
                hdr["pixdim"][0] = 1
            affine = hdr.get_qform()
        else:
            affine = hdr.get_base_affine()
    except (HeaderDataError, ValueError) as exc:  # nibabel: quaternion longer than 1, qfac, pixdims
        raise InputError(path, f"the header's orientation cannot be read ({exc})", code="bad_affine") from None
    return np.asarray(affine, dtype=np.float64)


def _same_axes(path: Path, hdr, sform: np.ndarray) -> None:
    """Where both qform and sform are set, they must agree on the axis directions: writers set both
    from one affine, and a flipped sign in either (a damaged byte) would mirror the volume."""
    from nibabel.orientations import aff2axcodes
    from nibabel.spatialimages import HeaderDataError

    if hdr.structarr["qform_code"] <= 0:
        return
    try:
        fixed = hdr.copy()
        if fixed["pixdim"][0] == 0:
            fixed["pixdim"][0] = 1
        qform = fixed.get_qform()
    except (HeaderDataError, ValueError):  # an unreadable qform is unused: nibabel (and we) take the sform
        return
    if not np.all(np.isfinite(qform)):
        return
    q, s = ("".join(c or "?" for c in aff2axcodes(a)) for a in (qform, sform))  # "?": a degenerate axis
    if q != s:
        raise InputError(path, f"qform and sform disagree on the axis directions ({q} vs {s}): "
                         "one of them is damaged", "fix the header (set both from the right affine) or re-export it",
                         code="bad_affine")


# ----------------------------------------------------------------------------------------- stream
@contextmanager
def _read_errors(path: Path):
    """Turn what reading a (gzip) file can raise into our reasons."""
    try:
        yield
    except EOFError:
        raise InputError(path, "the gzip stream ends before its end-of-stream marker: the file is cut short",
                         code="truncated") from None
    except gzip.BadGzipFile as exc:
        text = str(exc)
        if text.startswith(("CRC check failed", "Incorrect length")):
            raise InputError(path, f"gzip check failed ({text}): the data read is not the data that was "
                             "compressed", code="crc_mismatch") from None
        raise InputError(path, f"damaged gzip stream ({text})", code="corrupt_gzip") from None
    except zlib.error as exc:
        raise InputError(path, f"damaged gzip stream ({exc})", code="corrupt_gzip") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the file ({exc.strerror or exc})", code="unreadable") from None


def _skip(stream, n: int, path: Path) -> None:
    """Read past ``n`` bytes of a gzip stream (header and extensions) without keeping them."""
    left = n
    while left:
        got = len(stream.read(min(left, CHUNK)))
        if not got:
            raise InputError(path, f"the decompressed data ends before vox_offset {n}", code="truncated")
        left -= got


def _drain(stream, limit: int) -> None:
    """Decompress (and drop) up to ``limit`` more bytes, so that a damaged stream's CRC is checked at its end."""
    while limit > 0:
        n = len(stream.read(min(CHUNK, limit)))
        if not n:
            return
        limit -= n


def _fill(stream, buf: memoryview) -> int:
    """Read into ``buf`` until it is full or the stream ends; returns the bytes read."""
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:got + CHUNK])
        if not n:
            break
        got += n
    return got
