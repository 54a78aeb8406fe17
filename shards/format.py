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


def decode_array(data: bytes, codec: str) -> np.ndarray:
    """Inverse of :func:`encode_array`. Never unpickles."""
    if codec == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if codec == "zstd":
        import zstandard

        return decode_array(zstandard.ZstdDecompressor().decompress(data), "npy")
    if codec == "blosc2":
        import blosc2

        return blosc2.unpack_array2(bytes(data))
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


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


class CorruptSample(Exception):
    """A tar sample whose members are missing, do not decode, or fail their checksum."""


def decode_sample(sample: dict, check: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Decode a raw webdataset sample (suffix → bytes) into ``(image, label | None, meta)``.

    Raises :class:`CorruptSample` naming the shard, key and member for anything that is wrong.
    """
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    raw_meta = sample.get("json")
    if raw_meta is None:
        raise CorruptSample(f"{where}: no .json member")
    try:
        meta = raw_meta if isinstance(raw_meta, dict) else json.loads(bytes(raw_meta).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptSample(f"{where}: .json does not parse ({exc})") from None
    codec = meta.get("codec", "npy")
    out = []
    for member in (image_member(codec), label_member(codec)):
        data = sample.get(member)
        if data is None:
            if member == image_member(codec):
                raise CorruptSample(f"{where}: no .{member} member")
            out.append(None)
            continue
        if isinstance(data, np.ndarray):  # already decoded by an upstream handler
            out.append(data)
            continue
        want = meta.get("checksums", {}).get(member)
        if check and want is not None and checksum(data) != want:
            raise CorruptSample(f"{where}: .{member} fails its checksum (damaged shard; run `python -m medssl.shards verify`)")
        try:
            out.append(decode_array(data, codec))
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a damaged member
            raise CorruptSample(f"{where}: .{member} does not decode ({type(exc).__name__}: {exc})") from None
    image, label = out
    if list(image.shape) != list(meta.get("shape", image.shape)):
        raise CorruptSample(f"{where}: image shape {list(image.shape)} differs from its JSON {meta.get('shape')}")
    if label is not None and label.shape[1:] != image.shape[1:]:
        raise CorruptSample(f"{where}: label shape {label.shape} differs from image {image.shape}")
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
