"""The on-disk sample format: one volume per webdataset tar sample (DESIGN contract 1).

Every shard set written by ``python -m medssl.shards build`` and read by ``shards.stream`` follows the rules
declared here, and only here:

* ``<key>.<image member>`` holds the voxels as ``[C, X, Y, Z]``: channels first, then the three spatial
  axes of the RAS+ voxel grid in nibabel's order (X grows toward the patient's Right, Y toward
  Anterior, Z toward Superior). PyTorch calls these ``[C, D, H, W]``; MONAI keeps the same
  nibabel order, so crops line up with what a MONAI ``LoadImage → Orientation("RAS")`` pipeline sees.
  CT is stored as int16 Hounsfield units, MRI as float16 (arbitrary units).
* ``<key>.json`` holds the metadata (spacing, affine of the stored grid, source files, original
  geometry, intensity statistics, checksums of the voxel members).
* ``<key>.seg.<image member>`` optionally holds uint8 labels ``[1, X, Y, Z]`` on the same grid.

The voxel payload is one of three codecs, recorded in the member name so any reader can tell:

==========  ===============  ==================================================================
codec       member suffix    bytes
==========  ===============  ==================================================================
``npy``     ``.npy``         NumPy ``.npy`` (uncompressed; webdataset decodes it natively)
``zstd``    ``.npy.zst``     a ``.npy`` file compressed with Zstandard (level 3)
``blosc2``  ``.npy.b2``      ``blosc2.pack_array2`` (Zstd level 5, byte shuffle) of the array
==========  ===============  ==================================================================

webdataset has no decoder for the last two; :func:`wds_handler` is the one we register with
``webdataset.decode``. Keys never contain dots (webdataset splits a member name at its first dot).

Reading treats a sample as untrusted bytes: :func:`decode_sample` checks the JSON (codec, checksums,
modality, dtype, shape) and decodes each voxel member within a size bound (the JSON's shape × dtype when
declared, else :data:`MAX_MEMBER_BYTES`). The npy header, the zstd frame's declared size and the blosc2
frame's sizes are read and checked before anything of that size is allocated. Every failure is a
:class:`CorruptSample` with the reason.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from typing import Any

import numpy as np

FORMAT_VERSION = 1

CODECS = ("npy", "zstd", "blosc2")
CODEC_SUFFIX = {"npy": "npy", "zstd": "npy.zst", "blosc2": "npy.b2"}
SUFFIX_CODEC = {v: k for k, v in CODEC_SUFFIX.items()}

# dtype rules: one per modality, one for labels
MODALITY_DTYPE = {"CT": np.int16, "MR": np.float16}
LABEL_DTYPE = np.uint8
# value used to pad a volume smaller than the crop, in stored units
BACKGROUND = {"CT": -1024, "MR": 0.0}
# CT values are clipped to this range at build time (below -1024 is outside the scanner's field of view)
CT_RANGE = (-1024, 3071)

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def normalise_modality(name: str) -> str:
    """Map a modality/channel name ("CT", "ct", "T1", "MRI", "FLAIR", …) to "CT" or "MR"."""
    return "CT" if str(name).strip().upper() in ("CT", "CTA", "PET/CT") else "MR"


def make_key(*parts: str) -> str:
    """A webdataset-safe sample key from readable parts: letters, digits, ``_`` and ``-`` only."""
    cleaned = (re.sub(r"[^A-Za-z0-9_\-]+", "-", str(p)).strip("-") for p in parts)
    key = "_".join(c for c in cleaned if c)
    key = re.sub(r"-{2,}", "-", key)
    if not key:
        raise ValueError(f"cannot make a sample key from {parts!r}")
    return key


def check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} may only hold letters, digits, '_' and '-' (no dots or slashes)")


# --------------------------------------------------------------------------------------------- codecs
def encode_array(arr: np.ndarray, codec: str) -> bytes:
    """Serialise one array with ``codec`` (see the table above)."""
    if codec == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(encode_array(arr, "npy"))
    if codec == "blosc2":
        import blosc2

        # one thread: with several, blosc2's frames differ from run to run (same array, other bytes),
        # which would break byte-identical shards and resumable builds; builds parallelise by process
        cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
        return blosc2.pack_array2(np.ascontiguousarray(arr), cparams=cparams)
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


# Decoding treats every member as untrusted bytes (a shard may be damaged, truncated or hand-made): each size
# is read from the codec's header and checked before anything of that size is allocated, and every failure is
# a CorruptSample with the reason. These caps bound what one member may cost; a caller can lower them.
MAX_MEMBER_BYTES = 4 << 30  # the largest voxel array decoded: 4 GiB, a 1024×1024×2048 int16 volume
MAX_JSON_BYTES = 16 << 20  # a sample's metadata (a few kB in practice)
_NPY_HEADER_BYTES = 65536 + 12  # magic, version, length and header of a .npy (numpy reads <= 10,000 characters)
_ZSTD_WINDOW = 1 << 25  # the largest zstd window accepted (level 3, ours, uses 2 MiB; zstd's default limit is 128 MiB)
_ZSTD_CHUNK = 1 << 20  # streamed decompression step for frames that do not declare their size
_ARRAY_KINDS = "biuf"  # bool, ints, unsigned ints, floats: the only dtypes a voxel member may hold


class CorruptSample(Exception):
    """A tar sample whose members are missing, do not decode, or fail their checksum."""


def _nbytes(shape, dtype: np.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _check_array_header(shape, dtype, max_bytes: int, what: str) -> int:
    """Shape and dtype from a header: plain numbers and sizes within ``max_bytes``; returns the byte count."""
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 32:
        raise CorruptSample(f"{what} declares shape {shape!r} (not a tuple of non-negative ints)")
    if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.shape:
        raise CorruptSample(f"{what} declares dtype {dtype!r}; voxel members hold bool, int, uint or float arrays")
    n = _nbytes(shape, dtype)
    if n > max_bytes:
        raise CorruptSample(f"{what} declares {list(shape)} {dtype} = {n} bytes, more than the {max_bytes} bytes this "
                            "member may hold (the sample's JSON shape and dtype, or the cap MAX_MEMBER_BYTES)")
    return n


def _npy_layout(head, max_bytes: int) -> tuple[tuple, bool, np.dtype, int, int]:
    """``(shape, fortran_order, dtype, data offset, data bytes)`` from the start of a ``.npy`` payload, checked."""
    from numpy.lib import format as npf

    fp = io.BytesIO(bytes(head[:_NPY_HEADER_BYTES]))  # only the header is copied
    try:
        version = npf.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npf.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npf.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version} (np.save writes 1.0 or 2.0)")
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, TypeError… for a bad header
        raise CorruptSample(f"npy header does not parse ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    return shape, fortran, dtype, fp.tell(), _check_array_header(shape, dtype, max_bytes, "npy header")


def _decode_npy(data, max_bytes: int) -> np.ndarray:
    """A ``.npy`` payload: the header is parsed on its own and the array bytes must be exactly what it declares."""
    shape, fortran, dtype, offset, n = _npy_layout(data, max_bytes)
    if len(data) - offset != n:
        raise CorruptSample(f"npy header declares {list(shape)} {dtype} = {n} bytes, the member holds "
                            f"{len(data) - offset} (truncated or padded)")
    if n == 0:
        return np.zeros(shape, dtype)
    arr = np.frombuffer(data, dtype=dtype, count=n // dtype.itemsize, offset=offset)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    return arr if arr.flags.writeable else arr.copy()


def _unzstd(data, max_bytes: int) -> bytes | bytearray:
    """Decompress the one zstd frame of a ``.npy.zst`` member into at most its ``.npy`` size: a size declared in
    the frame header is checked before the output is allocated; a frame without one is streamed a chunk at a
    time, its ``.npy`` header checked from the first chunk, and stopped past the size that header declares."""
    import zstandard

    limit = max_bytes + _NPY_HEADER_BYTES
    try:
        size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise CorruptSample(f"not a zstd frame ({exc})") from None
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW)
    if size != zstandard.CONTENTSIZE_UNKNOWN:
        if size > limit:
            raise CorruptSample(f"zstd frame declares {size} decompressed bytes, more than the {limit} this member may "
                                "hold (a decompression bomb, or a damaged header)")
        try:
            return dctx.decompress(data, allow_extra_data=False)  # allocates the declared size, checked above
        except zstandard.ZstdError as exc:
            raise CorruptSample(f"zstd frame does not decompress ({exc})") from None
    out = bytearray()
    sized = False
    try:
        with dctx.stream_reader(bytes(data)) as reader:
            while chunk := reader.read(_ZSTD_CHUNK):
                out += chunk
                if not sized and len(out) >= _NPY_HEADER_BYTES:
                    _, _, _, offset, n = _npy_layout(out, max_bytes)
                    limit, sized = offset + n, True
                if len(out) > limit:
                    raise CorruptSample(f"zstd frame decompresses to more than the {limit} bytes its .npy header "
                                        "declares (a decompression bomb)")
    except zstandard.ZstdError as exc:
        raise CorruptSample(f"zstd frame does not decompress ({exc})") from None
    return out


def _unblosc2(data, max_bytes: int) -> np.ndarray:
    """A ``blosc2.pack_array2`` frame: the frame header (sizes) and the packed array's shape/dtype (vlmeta) are read
    and checked first, then the chunks are decompressed into an array of exactly that size."""
    import blosc2

    try:
        schunk = blosc2.schunk_from_cframe(bytes(data), False)  # parses the frame header; decompresses nothing
        nbytes, chunksize = int(schunk.nbytes), int(schunk.chunksize)
        packed = schunk.vlmeta["__pack_tensor__"]  # msgpack, read with blosc2's "safe" policy (no pickles)
    except Exception as exc:  # noqa: BLE001 - blosc2 raises RuntimeError, ValueError, KeyError… for a bad frame
        raise CorruptSample(f"not a blosc2 packed array ({type(exc).__name__}: {exc})") from None
    if not isinstance(packed, (tuple, list)) or len(packed) != 3 or packed[0] != "numpy":
        raise CorruptSample(f"blosc2 frame is not a packed numpy array (its __pack_tensor__ is {packed!r:.80})")
    _, shape, descr = packed
    try:
        dtype = np.lib.format.descr_to_dtype(descr) if isinstance(descr, str) else None
    except Exception:  # noqa: BLE001
        dtype = None
    if dtype is None:
        raise CorruptSample(f"blosc2 frame declares dtype {descr!r:.80}; voxel members hold bool, int, uint or float arrays")
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
    n = _check_array_header(shape, dtype, max_bytes, "blosc2 frame")
    if nbytes != n or not 0 < chunksize <= max(n, 1 << 20):
        raise CorruptSample(f"blosc2 frame holds {nbytes} bytes in chunks of {chunksize}, its array header declares "
                            f"{list(shape)} {dtype} = {n} bytes")
    out = np.empty(shape, dtype)
    if n:
        try:
            schunk.get_slice(out=out)
        except Exception as exc:  # noqa: BLE001
            raise CorruptSample(f"blosc2 frame does not decompress ({type(exc).__name__}: {exc})") from None
    return out


def decode_array(data: bytes, codec: str, max_bytes: int = MAX_MEMBER_BYTES) -> np.ndarray:
    """Inverse of :func:`encode_array`, for untrusted bytes. Never unpickles, and never allocates an array over
    ``max_bytes`` (nor a decompression buffer over it plus a .npy header): sizes come from the codec's headers and
    are checked first. Raises :class:`CorruptSample` with the reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptSample(f"member is {type(data).__name__}, not bytes")
    if codec == "npy":
        return _decode_npy(data, max_bytes)
    if codec == "zstd":
        return _decode_npy(_unzstd(data, max_bytes), max_bytes)
    if codec == "blosc2":
        return _unblosc2(data, max_bytes)
    raise CorruptSample(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def checksum(data: bytes) -> str:
    """Per-member CRC-32 (hex, ~2.5 GB/s) stored in the sample's JSON and checked at read time."""
    return format(zlib.crc32(data) & 0xFFFFFFFF, "08x")


# --------------------------------------------------------------------------------------------- samples
def image_member(codec: str) -> str:
    return CODEC_SUFFIX[codec]


def label_member(codec: str) -> str:
    return "seg." + CODEC_SUFFIX[codec]


def encode_sample(key: str, image: np.ndarray, meta: dict, label: np.ndarray | None, codec: str) -> dict:
    """Build the webdataset dict (member suffix → bytes) for one volume; fills checksums into ``meta``."""
    check_key(key)
    assert image.ndim == 4, f"image must be [C, X, Y, Z], got shape {image.shape}"
    sample: dict[str, Any] = {"__key__": key}
    img_bytes = encode_array(image, codec)
    sample[image_member(codec)] = img_bytes
    meta = dict(meta)
    meta["codec"] = codec
    meta["checksums"] = {image_member(codec): checksum(img_bytes)}
    if label is not None:
        assert label.shape[1:] == image.shape[1:], (label.shape, image.shape)
        lab_bytes = encode_array(label.astype(LABEL_DTYPE, copy=False), codec)
        sample[label_member(codec)] = lab_bytes
        meta["checksums"][label_member(codec)] = checksum(lab_bytes)
    sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample


def _read_meta(raw, where: str) -> dict:
    if raw is None:
        raise CorruptSample(f"{where}: no .json member")
    if isinstance(raw, dict):  # already decoded by an upstream handler
        return raw
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        raise CorruptSample(f"{where}: .json member is {type(raw).__name__}, not bytes")
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptSample(f"{where}: .json member is {len(raw)} bytes, over the {MAX_JSON_BYTES} a sample's metadata "
                            "may take")
    try:
        meta = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptSample(f"{where}: .json does not parse ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise CorruptSample(f"{where}: .json holds a {type(meta).__name__}, not an object")
    return meta


def _declared_layout(meta: dict, where: str, max_bytes: int) -> tuple[list | None, np.dtype | None]:
    """The image shape and dtype the JSON declares (``shape``, ``dtype``, ``modality``; each optional), checked."""
    dtype = None
    modality = meta.get("modality")
    if modality is not None:
        if not isinstance(modality, str) or modality not in MODALITY_DTYPE:
            raise CorruptSample(f"{where}: .json modality {modality!r:.80} is not one of {', '.join(MODALITY_DTYPE)}")
        dtype = np.dtype(MODALITY_DTYPE[modality])
    if meta.get("dtype") is not None:
        try:
            declared = np.dtype(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        except Exception:  # noqa: BLE001 - any unknown dtype name
            declared = None
        if declared is None or (dtype is not None and declared != dtype):
            raise CorruptSample(f"{where}: .json dtype {meta['dtype']!r:.80} is not the dtype of modality "
                                f"{modality} ({dtype})" if dtype is not None else
                                f"{where}: .json dtype {meta['dtype']!r:.80} is not a numpy dtype name")
        dtype = declared
    shape = meta.get("shape")
    if shape is not None:
        if (not isinstance(shape, list) or len(shape) != 4
                or not all(type(s) is int and 1 <= s <= max_bytes for s in shape)):
            raise CorruptSample(f"{where}: .json shape {shape!r:.80} is not [C, X, Y, Z] of positive ints")
        n = _nbytes(shape, dtype or np.dtype(np.uint8))
        if n > max_bytes:
            raise CorruptSample(f"{where}: .json shape {shape} claims {n} bytes, more than the {max_bytes} a member "
                                "may hold (MAX_MEMBER_BYTES)")
    return shape, dtype


def _member(sample: dict, member: str, where: str, sums: dict, check: bool, codec: str, max_bytes: int):
    data = sample.get(member)
    if isinstance(data, np.ndarray):  # already decoded by an upstream handler
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptSample(f"{where}: .{member} member is {type(data).__name__}, not bytes")
    want = sums.get(member)
    if want is not None and not isinstance(want, str):
        raise CorruptSample(f"{where}: .json checksum of .{member} is {want!r:.80}, not a hex string")
    if check and want is not None and checksum(data) != want:
        raise CorruptSample(f"{where}: .{member} fails its checksum (damaged shard; run `python -m medssl.shards verify`)")
    try:
        return decode_array(data, codec, max_bytes)
    except CorruptSample as exc:
        raise CorruptSample(f"{where}: .{member} does not decode ({exc})") from None


def decode_sample(sample: dict, check: bool = True,
                  max_bytes: int = MAX_MEMBER_BYTES) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Decode a raw webdataset sample (suffix → bytes) into ``(image, label | None, meta)``.

    The members are untrusted bytes: the JSON's codec, checksums, modality, dtype and shape are checked, each
    voxel member is decoded within a size bound (the JSON's shape and dtype when it declares them, else
    ``max_bytes``), and the arrays must hold the modality's dtype (labels uint8) and the declared shapes.
    Raises :class:`CorruptSample` naming the shard, key and member for anything that is wrong, never another
    exception.
    """
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    meta = _read_meta(sample.get("json"), where)
    codec = meta.get("codec", "npy")
    if not isinstance(codec, str) or codec not in CODECS:
        raise CorruptSample(f"{where}: .json codec {codec!r:.80} is not one of {', '.join(CODECS)}")
    sums = meta.get("checksums", {})
    if not isinstance(sums, dict):
        raise CorruptSample(f"{where}: .json checksums is a {type(sums).__name__}, not an object")
    shape, dtype = _declared_layout(meta, where, max_bytes)
    img_member = image_member(codec)
    if sample.get(img_member) is None:
        raise CorruptSample(f"{where}: no .{img_member} member")
    bound = _nbytes(shape, dtype) if shape is not None and dtype is not None else max_bytes
    image = _member(sample, img_member, where, sums, check, codec, bound)
    if image.ndim != 4:
        raise CorruptSample(f"{where}: image shape {list(image.shape)} is not [C, X, Y, Z]")
    if dtype is not None and image.dtype != dtype:
        raise CorruptSample(f"{where}: image dtype {image.dtype}, the JSON declares {dtype} "
                            f"({meta.get('modality', 'dtype')})")
    if list(image.shape) != list(shape or image.shape):
        raise CorruptSample(f"{where}: image shape {list(image.shape)} differs from its JSON {shape}")
    label = None
    lab_member = label_member(codec)
    if sample.get(lab_member) is not None:
        label = _member(sample, lab_member, where, sums, check, codec, _nbytes(image.shape[1:], np.dtype(LABEL_DTYPE)))
        if label.dtype != LABEL_DTYPE:
            raise CorruptSample(f"{where}: label dtype {label.dtype}, labels are {np.dtype(LABEL_DTYPE)}")
        if label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
            raise CorruptSample(f"{where}: label shape {label.shape} differs from image {image.shape} "
                                "(labels are [1, X, Y, Z] on the image grid)")
    return image, label, meta


def wds_handler(key: str, data: bytes):
    """webdataset decoder handler for our compressed voxel members (``.npy.zst``, ``.npy.b2``).

    Use as ``webdataset.decode(wds_handler)``; it returns ``None`` for anything else so webdataset's
    own handlers (``npy``, ``json``) take over.
    """
    ext = key.lower()
    for suffix, codec in (("npy.zst", "zstd"), ("npy.b2", "blosc2")):
        if ext == suffix or ext.endswith("." + suffix):
            return decode_array(data, codec)
    return None
