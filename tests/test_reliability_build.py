"""No silent damage at build (issue 10, point 5).

Every input a build can meet ends as a sample built from the bytes that were written, or as one
``errors.jsonl`` record with a reason from the closed set ``shards.errors.REASONS`` — never as damaged
voxels, another exception, a hang, or an allocation above ``--max-voxels``.

The property tests feed ``shards.preprocess`` (the build's load path) and the DICOM series reader
random bytes and mutated valid files (made with nibabel / pydicom from a small synthetic phantom).
Memory is measured with ``tracemalloc`` (numpy registers its buffers there): the peak of one call must
stay below ``PEAK_BYTES_PER_VOXEL × CAP`` plus slack, where ``CAP`` is the call's ``max_voxels`` — a
header that claims a huge volume would otherwise allocate it. A SIGALRM guard turns a hang into a
failure; hypothesis runs derandomised, with deadlines, and writes no example database.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl.shards.build import BuildConfig, build
from medssl.shards.errors import REASONS, InputError
from medssl.shards.preprocess import DEFAULT_MAX_VOXELS, Prepared, load_image, prepare_volume
from medssl.shards.synth import synth_volume
from medssl.shards.verify import load_samples, verify

CAP = 50_000  # max_voxels of the property tests; the phantom holds 4,320 voxels (1,530 at 1.5 mm)
PEAK_BYTES_PER_VOXEL = 48  # prepare_volume's measured peak is 24-42 bytes per voxel of its larger grid
SLACK = 1 << 20  # bytes: file contents, header objects, hypothesis bookkeeping
TARGET = (1.5, 1.5, 1.5)
NOT_FOR_VOLUMES = {"internal_error", "bad_input", "out_of_memory"}  # a mutated file must never give these
PROPERTY = settings(derandomize=True, database=None, deadline=5000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the code under test swallows it."""


@pytest.fixture
def guarded():
    """Fail (instead of hanging) after 120 s, and trace allocations for the duration of the test."""

    def alarm(signum, frame):
        raise Hang("still running after 120 s: a hang?")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def prepared_or_refused(images, max_voxels=CAP, target=TARGET):
    """``prepare_volume`` on ``images``: its result, or our InputError with a volume reason. Any other
    exception propagates (and fails the test); the traced peak allocation is checked against the cap."""
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        result = prepare_volume(images, None, "CT", target_spacing=target, max_voxels=max_voxels)
    except InputError as exc:
        assert exc.code in REASONS and exc.code not in NOT_FOR_VOLUMES, exc
        assert exc.fix and exc.message and str(images[0]) in str(exc), exc
        result = exc
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak < PEAK_BYTES_PER_VOXEL * max_voxels + SLACK, f"allocated {peak / 1e6:.1f} MB ({result})"
    return result


# ------------------------------------------------------------------------------------------ inputs
def phantom(crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic CT phantom (LPS, 0.75 x 0.75 x 2.1 mm; 61x61x27 int16, or a 20x18x12 crop) and its affine."""
    v = synth_volume(3, 1, "CT", 0.2)
    return (np.ascontiguousarray(v["image"][20:40, 22:40, 8:20]) if crop else v["image"]), v["affine"]


def nifti_bytes(data, affine, klass=nib.Nifti1Image) -> bytes:
    img = klass(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img.to_bytes()


class Inputs(dict):
    """The test inputs, with a short repr for hypothesis' failure reports."""

    def __repr__(self):
        return f"<inputs in {self['dir']}>"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    data, affine = phantom()
    raw = nifti_bytes(data, affine)
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "ref.nii.gz").write_bytes(gzip.compress(raw, mtime=0))
    ref = prepare_volume([folder / "ref.nii.gz"], None, "CT", target_spacing=TARGET)
    return Inputs(raw=raw, gz=gzip.compress(raw, mtime=0), ref=ref, dir=folder, data=data, affine=affine)


def same_sample(a, b) -> bool:
    return np.array_equal(a.image, b.image) and a.meta["affine"] == b.meta["affine"]


def set_header_field(raw: bytes, field: str, index: int, value) -> bytes:
    """``raw`` (an uncompressed NIfTI-1 file) with one header field (element ``index``) set to ``value``."""
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    cell = hdr.structarr[field]
    kind = cell.dtype
    if kind.kind in "iu":
        info = np.iinfo(kind)
        value = int(np.clip(int(value) if math.isfinite(value) else 0, info.min, info.max))
    if cell.ndim:
        hdr.structarr[field][index] = value
    else:
        hdr.structarr[field] = value
    return hdr.binaryblock + raw[348:]


INT_FIELDS = {"sizeof_hdr": 1, "dim": 8, "datatype": 1, "bitpix": 1, "qform_code": 1, "sform_code": 1, "xyzt_units": 1}
FLOAT_FIELDS = {"pixdim": 8, "vox_offset": 1, "scl_slope": 1, "scl_inter": 1, "quatern_b": 1, "quatern_c": 1,
                "quatern_d": 1, "qoffset_x": 1, "srow_x": 4, "srow_y": 4, "srow_z": 4}
SPECIAL_FLOATS = [0.0, -0.0, -1.0, 1.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, 1e-3, 0.005, 50.0,
                  51.0, 352.0, 353.0, 1e9, 2.0**31]
SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 16, 64, 128, 255, 348, 540, 1536, 2048, 32767, -32768, 2**31 - 1]


@st.composite
def header_edits(draw):
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(INT_FIELDS)))
        value = draw(st.sampled_from(SPECIAL_INTS) | st.integers(-40_000, 40_000))
    else:
        field = draw(st.sampled_from(sorted(FLOAT_FIELDS)))
        value = draw(st.sampled_from(SPECIAL_FLOATS) | st.floats(width=32))
    index = draw(st.integers(0, max(INT_FIELDS.get(field, 0), FLOAT_FIELDS.get(field, 0)) - 1))
    return field, index, value


def gzip_bomb(path: Path, shape, dtype=np.int16, zooms=(1.0, 1.0, 1.0), data_bytes=None) -> Path:
    """A valid .nii.gz of zeros whose header claims ``shape`` and whose stream holds ``data_bytes`` voxel
    bytes (default: what the header claims); ~1 KB of file per MB of data, written without compressing it
    all: after a full flush a deflate block of 1 MB of zeros has the same bytes wherever it stands."""
    hdr = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.diag([*zooms, 1.0])).header
    hdr.set_data_shape(shape)
    hdr.set_xyzt_units("mm")
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\0" * 4
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize if data_bytes is None else data_bytes
    block = bytes(1 << 20)
    whole, rest = divmod(nbytes, len(block))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the gzip header and trailer are ours
    head_blocks = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    zero_block = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(bytes(rest)) + deflate.flush()
    crc = zlib.crc32(head)
    for _ in range(whole):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(bytes(rest), crc)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head_blocks)
        for _ in range(whole):
            fh.write(zero_block)
        fh.write(tail + crc.to_bytes(4, "little") + ((len(head) + nbytes) & 0xFFFFFFFF).to_bytes(4, "little"))
    return path


# ----------------------------------------------------------------------------- NIfTI: properties
@settings(PROPERTY, max_examples=80)
@given(blob=st.binary(max_size=1200), compressed=st.booleans())
def test_random_bytes_are_refused_with_a_reason(guarded, original, blob, compressed):
    path = original["dir"] / ("random.nii.gz" if compressed else "random.nii")
    path.write_bytes(gzip.compress(blob, mtime=0) if compressed else blob)
    assert isinstance(prepared_or_refused([path]), InputError)


@settings(PROPERTY, max_examples=80)
@given(data=st.data(), nifti2=st.booleans())
def test_random_bytes_inside_a_valid_header_are_refused_or_read(guarded, original, data, nifti2):
    """A span of a valid NIfTI-1/2 header overwritten with random bytes (gzip CRC intact, so every header
    check is reached): refused, or read within the cap and the spacing range."""
    raw = bytearray(nifti_bytes(original["data"], original["affine"], nib.Nifti2Image) if nifti2 else original["raw"])
    size = 540 if nifti2 else 348
    start = data.draw(st.integers(0, size - 1), label="start")
    span = data.draw(st.binary(min_size=1, max_size=min(64, size - start)), label="bytes")
    raw[start:start + len(span)] = span
    path = original["dir"] / "random_header.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw), mtime=0))
    result = prepared_or_refused([path])
    if not isinstance(result, InputError):
        spacing = np.array(result.meta["original"]["spacing"])
        assert result.image.size <= CAP and np.all((spacing >= 0.01) & (spacing <= 50)), spacing


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_a_flipped_byte_in_a_nii_gz_is_refused_or_harmless(guarded, original, data):
    """The gzip CRC-32 covers every decompressed byte: a changed byte anywhere in the file is refused,
    or it lay in the gzip header's unchecked fields (time stamp, OS) and the sample is the original's."""
    blob = bytearray(original["gz"])
    at = data.draw(st.integers(0, len(blob) - 1), label="position")
    blob[at] ^= data.draw(st.integers(1, 255), label="xor")
    path = original["dir"] / "flipped.nii.gz"
    path.write_bytes(bytes(blob))
    result = prepared_or_refused([path])
    if not isinstance(result, InputError):
        assert at < 10 and same_sample(result, original["ref"]), f"byte {at} changed and the volume was built"


@settings(PROPERTY, max_examples=80)
@given(data=st.data(), compressed=st.booleans())
def test_a_flipped_byte_in_a_nii_header_is_refused_or_read(guarded, original, data, compressed):
    """Uncompressed headers have no checksum: a flip is refused where a check sees it, else read."""
    raw = bytearray(original["raw"])
    at = data.draw(st.integers(0, 351), label="position")
    raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    path = original["dir"] / ("header_flip.nii.gz" if compressed else "header_flip.nii")
    path.write_bytes(gzip.compress(bytes(raw), mtime=0) if compressed else bytes(raw))
    prepared_or_refused([path])


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), compressed=st.booleans())
def test_a_truncated_file_is_always_refused(guarded, original, data, compressed):
    blob = original["gz"] if compressed else original["raw"]
    cut = data.draw(st.integers(0, len(blob) - 1), label="length")
    path = original["dir"] / ("cut.nii.gz" if compressed else "cut.nii")
    path.write_bytes(blob[:cut])
    result = prepared_or_refused([path])
    assert isinstance(result, InputError) and result.code in {"empty", "truncated", "not_nifti", "corrupt_gzip"}, result


@settings(PROPERTY, max_examples=120)
@given(edits=st.lists(header_edits(), min_size=1, max_size=3), compressed=st.booleans())
def test_header_fields_set_to_odd_values_are_refused_or_read(guarded, original, edits, compressed):
    """dims claiming huge volumes, 0/NaN/inf/negative/huge pixdim, offsets, scaling, codes, quaternions."""
    raw = original["raw"]
    for field, index, value in edits:
        raw = set_header_field(raw, field, index, value)
    path = original["dir"] / ("edited.nii.gz" if compressed else "edited.nii")
    path.write_bytes(gzip.compress(raw, mtime=0) if compressed else raw)
    result = prepared_or_refused([path])
    if not isinstance(result, InputError):
        spacing = np.array(result.meta["original"]["spacing"])
        assert np.all((spacing >= 0.01) & (spacing <= 50)), spacing


@settings(PROPERTY, max_examples=30)
@given(shape=st.tuples(*[st.integers(2, 400)] * 3), megabytes=st.integers(0, 6))
def test_gzip_streams_of_any_length_behind_any_dims(guarded, original, shape, megabytes):
    """A header claiming ``shape`` over a stream of zeros of another length (a bomb when it is longer):
    refused before inflating past the described size, or, where the lengths match, read."""
    path = gzip_bomb(original["dir"] / "bomb.nii.gz", shape, data_bytes=megabytes << 20)
    result = prepared_or_refused([path])
    described = math.prod(shape) * 2
    if isinstance(result, Prepared):
        assert described == megabytes << 20
    elif math.prod(shape) <= CAP:
        assert result.code in {"truncated", "size_mismatch", "too_large"}, result
    else:
        assert result.code == "too_large", result


# ----------------------------------------------------------------------------- DICOM: properties
DICOM_TAGS = {  # values written into one slice or into every slice of a valid series
    "Rows": [0, 1, 2, 3, 4096, 65535], "Columns": [0, 1, 2, 4096, 65535],
    "BitsAllocated": [0, 1, 8, 12, 32, 64], "BitsStored": [0, 1, 17, 255], "HighBit": [0, 31, 255],
    "PixelRepresentation": [0, 1, 2], "SamplesPerPixel": [0, 3, 4], "NumberOfFrames": ["0", "2", "-1", "1000000000"],
    "PixelSpacing": ["0\\0", "-1\\1", "nan\\1", "inf\\1", "1e30\\1", "1", "0.001\\0.001", "60\\60"],
    "ImageOrientationPatient": ["0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0", "1\\0\\0",
                                "0\\1\\0\\1\\0\\0"],
    "ImagePositionPatient": ["nan\\0\\0", "1e30\\0\\0", "0\\0", "0\\0\\1e-9"],
    "RescaleSlope": ["0", "nan", "inf", "-inf", "1e38", "-1"], "RescaleIntercept": ["nan", "inf", "1e38", "-1e38"],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "YBR_FULL", ""],
}
GARBAGE_TAGS = ["PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept",
                "NumberOfFrames", "SeriesInstanceUID", "PhotometricInterpretation"]  # text values
PLACEHOLDER = "9.875"  # written as b"9.875 ", then overwritten with random bytes of that length


@pytest.fixture(scope="module")
def dicom_series(original):
    pytest.importorskip("pydicom")
    from .test_dicom import write_series

    folder = original["dir"] / "dicom_original"
    write_series(folder, n=4)
    return Inputs(dir=folder, **{p.name: p.read_bytes() for p in sorted(folder.iterdir())})


@settings(PROPERTY, max_examples=60)
@given(data=st.data())
def test_mutated_dicom_series_are_refused_or_read(guarded, original, dicom_series, data):
    """Byte flips, truncations, odd or random tag values, damaged pixel data, in one slice or in all."""
    import pydicom
    from pydicom import config
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    folder = original["dir"] / "dicom"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    names = sorted(n for n in dicom_series if n != "dir")
    kind = data.draw(st.sampled_from(["flip", "cut", "tag", "garbage", "pixels", "syntax"]), label="kind")
    targets = data.draw(st.sampled_from([[n] for n in names] + [names]), label="files")
    if kind == "tag":
        tag = data.draw(st.sampled_from(sorted(DICOM_TAGS)), label="tag")
        value = data.draw(st.sampled_from(DICOM_TAGS[tag]), label="value")
    elif kind == "garbage":
        tag = data.draw(st.sampled_from(GARBAGE_TAGS), label="tag")
        junk = data.draw(st.binary(min_size=6, max_size=6), label="bytes")
    for name in names:
        blob = dicom_series[name]
        if name in targets:
            if kind == "flip":
                at = data.draw(st.integers(0, len(blob) - 1), label="position")
                blob = bytearray(blob)
                blob[at] ^= data.draw(st.integers(1, 255), label="xor")
            elif kind == "cut":
                blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="length")]
            else:
                ds = pydicom.dcmread(io.BytesIO(blob))
                with config.disable_value_validation():
                    if kind == "tag":
                        setattr(ds, tag, value)
                    elif kind == "garbage":
                        setattr(ds, tag, PLACEHOLDER)
                    elif kind == "pixels":
                        ds.PixelData = ds.PixelData[:data.draw(st.integers(0, 80), label="pixel bytes")]
                    else:  # compressed transfer syntax over bytes that are no JPEG
                        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
                        ds.PixelData = encapsulate([ds.PixelData])
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=True)
                blob = out.getvalue()
                if kind == "garbage":
                    blob = blob.replace(PLACEHOLDER.encode() + b" ", junk, 1)
        (folder / name).write_bytes(bytes(blob))
    result = prepared_or_refused([folder])
    if not isinstance(result, InputError):  # never a series with a slice silently lost
        assert result.meta["original"]["shape"] == [5, 6, 4] and result.image.size <= CAP, result.meta["original"]


# ----------------------------------------------------------------------------- regressions
def write(path: Path, data, affine, **header) -> Path:
    """A .nii.gz of ``data`` with header fields set after nibabel wrote it (gzip over the edited bytes)."""
    raw = nifti_bytes(data, affine)
    for field, value in header.items():
        index, value = value if isinstance(value, tuple) else (0, value)
        raw = set_header_field(raw, field, index, value)
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


def traced_peak(call) -> tuple[object, int]:
    """``(result or InputError, peak bytes allocated while it ran)``, measured with tracemalloc."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except InputError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reader_matches_nibabel_on_valid_variants(tmp_path, original):
    """What passes the checks reads exactly as nibabel reads it: byte order, NIfTI-2, scaling, 4D with
    one volume, qform only, neither form (pixdim), a sheared sform, .nii and .nii.gz."""
    from medssl.shards.nifti import open_nifti

    data, affine = original["data"], original["affine"]
    sheared = affine.copy()
    sheared[1, 2] += 0.4
    variants = {
        "plain.nii": nib.Nifti1Image(data, affine),
        "big_endian.nii.gz": nib.Nifti1Image(data, affine, header=nib.Nifti1Header(endianness=">")),
        "nifti2.nii.gz": nib.Nifti2Image(data, affine),
        "float64.nii": nib.Nifti1Image(data / 3.0, affine),
        "one_volume_4d.nii.gz": nib.Nifti1Image(data[..., None], affine),
        "sheared.nii.gz": nib.Nifti1Image(data, sheared),
    }
    qform_only = nib.Nifti1Image(data, affine)
    qform_only.header.set_sform(None, code=0)
    qform_only.header.set_qform(affine, code=1)
    variants["qform_only.nii.gz"] = qform_only
    for name, img in variants.items():
        nib.save(img, str(tmp_path / name))
    write(tmp_path / "scaled.nii.gz", data, affine, scl_slope=0.5, scl_inter=-3.0)
    write(tmp_path / "pixdim_only.nii.gz", data, affine, qform_code=0, sform_code=0)
    for path in sorted(tmp_path.iterdir()):
        ref = nib.load(str(path))
        nf = open_nifti(path)
        ours = nf.read()
        np.testing.assert_array_equal(ours, np.asarray(ref.dataobj, dtype=np.float32).reshape(ours.shape), path.name)
        np.testing.assert_allclose(nf.affine, ref.affine, atol=1e-6, err_msg=path.name)
    assert not np.array_equal(open_nifti(tmp_path / "scaled.nii.gz").read(), data), "scaling is applied"


def test_a_flipped_byte_in_deflate_data_is_refused_where_nibabel_reads_damaged_voxels(tmp_path, original):
    good = tmp_path / "good.nii.gz"
    good.write_bytes(original["gz"])
    blob, expected = bytearray(original["gz"]), original["data"]
    for at in range(len(blob) // 2, len(blob) - 8):  # a flip that nibabel reads without complaint
        damaged = bytearray(blob)
        damaged[at] ^= 0x10
        path = tmp_path / "damaged.nii.gz"
        path.write_bytes(bytes(damaged))
        try:
            theirs = np.asarray(nib.load(str(path)).dataobj)
        except Exception:  # noqa: BLE001 - zlib saw this one; look for a silent one
            continue
        if not np.array_equal(theirs, expected):
            break
    else:
        pytest.fail("no silently damaging flip found")
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.code == "crc_mismatch" and "CRC" in info.value.message, info.value
    out = tmp_path / "out"
    result = build(BuildConfig(inputs=[str(good), str(path)], modality="CT", codec="npy"), out, workers=1,
                   progress=False)
    (record,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert record["file"] == str(path) and record["reason"] == "crc_mismatch" and record["fix"]
    assert result.samples == 1 and [s["key"] for s in load_samples(out)] == ["good"]


@pytest.mark.parametrize("pixdim, code", [(0.0, "bad_spacing"), (-0.7, "bad_spacing"), (math.nan, "bad_spacing"),
                                          (1e-4, "bad_spacing"), (80.0, "bad_spacing")])
def test_pixdim_zero_negative_or_absurd_is_refused(tmp_path, original, pixdim, code):
    """nibabel reads pixdim 0 as 1 mm and a negative one as its absolute value; the build refuses both."""
    path = write(tmp_path / "v.nii.gz", original["data"], original["affine"], pixdim=(1, pixdim),
                 qform_code=1, sform_code=0)
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.code == code and "mm" in info.value.message and info.value.fix, info.value
    if pixdim in (0.0, -0.7):
        assert nib.load(str(path)).header.get_zooms()[0] > 0  # what the old reader would have built


def test_a_sign_flipped_sform_that_disagrees_with_the_qform_is_refused(tmp_path, original):
    """One flipped sign bit in srow_x mirrors the volume and keeps every voxel size: the qform says otherwise."""
    affine = original["affine"]
    path = write(tmp_path / "mirrored.nii.gz", original["data"], affine, srow_x=(0, -affine[0, 0]))
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.code == "bad_affine" and "qform and sform disagree" in info.value.message, info.value
    assert nib.aff2axcodes(nib.load(str(path)).affine)[0] != nib.aff2axcodes(affine)[0]  # nibabel: mirrored


def test_small_file_with_50mm_voxels_is_too_large_without_allocating(tmp_path):
    data, affine = phantom(crop=False)
    affine[:3, :3] *= 50 / np.linalg.norm(affine[:3, :3], axis=0)
    path = write(tmp_path / "fifty.nii.gz", data, affine)
    result, peak = traced_peak(lambda: prepare_volume([path], None, "CT"))  # default cap and 1.5 mm
    assert isinstance(result, InputError) and result.code == "too_large", result
    assert (f"voxels after resampling to 1.5x1.5x1.5 mm exceeds --max-voxels {DEFAULT_MAX_VOXELS:,}"
            in result.message), result.message
    assert "--max-voxels" in result.fix and "spacing" in result.fix
    assert path.stat().st_size < 200_000 and peak < 1 << 20, f"{peak} bytes allocated"


def test_gzip_bombs_are_refused_without_inflating(tmp_path):
    """A 1 MB file that inflates to 1.1 GB (its header says so: too_large before decompressing), and a
    small header followed by 64 MB of zeros (refused one chunk past the described size)."""
    big = gzip_bomb(tmp_path / "big.nii.gz", (1100, 1000, 1000), np.uint8)
    result, peak = traced_peak(lambda: prepare_volume([big], None, "CT"))
    assert big.stat().st_size < 2 << 20 and isinstance(result, InputError) and result.code == "too_large", result
    assert "1,100,000,000 voxels" in result.message and peak < 1 << 20, peak
    lying = gzip_bomb(tmp_path / "lying.nii.gz", (20, 18, 12), data_bytes=64 << 20)
    t0 = time.perf_counter()
    result, peak = traced_peak(lambda: prepare_volume([lying], None, "CT"))
    assert isinstance(result, InputError) and result.code == "size_mismatch", result
    assert peak < 4 << 20 and time.perf_counter() - t0 < 5, (peak, time.perf_counter() - t0)


def test_dicom_series_claiming_a_huge_grid_is_too_large_before_decoding(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from .test_dicom import write_series

    folder = tmp_path / "ct"
    write_series(folder, n=4)
    for f in folder.iterdir():  # every slice claims 4096 x 4096 pixels (its pixel data stays 6 x 5)
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 4096
        ds.save_as(f, enforce_file_format=True)
    result, peak = traced_peak(lambda: load_image(folder, max_voxels=10**6))
    assert isinstance(result, InputError) and result.code == "too_large", result
    assert "67,108,864 voxels" in result.message and peak < 2 << 20, peak


def test_dicom_element_length_claiming_gigabytes_costs_no_memory(tmp_path):
    """A damaged length field (2 GB, in a 400-byte file): pydicom reads an element's length in one call,
    which Python would allocate in full; the reader hands it a file that caps reads at what is left."""
    pytest.importorskip("pydicom")
    from .test_dicom import write_series

    folder = tmp_path / "ct"
    write_series(folder, n=4)
    victim = sorted(folder.iterdir())[1]
    blob = bytearray(victim.read_bytes())
    for element in (b"\x02\x00\x01\x00OB\x00\x00", b"\xe0\x7f\x10\x00OW\x00\x00"):  # meta version; pixel data
        at = blob.index(element)  # explicit VR little endian: 4-byte length after the tag, VR and 2 zero bytes
        damaged = blob[:at + 8] + (0x7FFFFFF0).to_bytes(4, "little") + blob[at + 12:]
        victim.write_bytes(bytes(damaged))
        result, peak = traced_peak(lambda: load_image(folder, max_voxels=10**6))
        assert peak < 4 << 20, (peak, result)
        if element.startswith(b"\x02"):  # swallows the rest of the file: no readable header
            assert isinstance(result, InputError) and result.code == "dicom_unreadable", result
            assert victim.name in result.message
    # pixel data is the last element: reading "2 GB" gets its true 60 bytes, and the volume is intact
    assert not isinstance(result, InputError) and result[0].shape == (5, 6, 4)


def test_colliding_keys_are_made_unique_and_a_fresh_build_verifies(tmp_path, original):
    """``a.nii`` and ``a.nii.gz`` both give the key ``in_a``; the old renaming (``in_a-2``) then met the
    key of ``a-2.nii.gz``. Renamed keys now skip every key that exists."""
    from medssl.shards.sources import Source, unique_keys

    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(original["data"], original["affine"]), str(folder / "a.nii"))
    (folder / "a.nii.gz").write_bytes(original["gz"])
    (folder / "a-2.nii.gz").write_bytes(original["gz"])
    (folder / "a 2.nii.gz").write_bytes(original["gz"])  # make_key: "a-2" as well
    out = tmp_path / "out"
    result = build(BuildConfig(inputs=[str(folder)], modality="CT", codec="npy"), out, workers=1, progress=False)
    keys = [s["key"] for s in load_samples(out)]
    assert result.samples == 4 and len(set(keys)) == 4, keys
    assert not [p for r in verify(out, progress=False) for p in r.problems]
    renamed = unique_keys([Source(k, [], None, "CT", "d") for k in ["x", "x-2", "x", "x", "x-3-2", "x-3"]])
    assert [s.key for s in renamed] == ["x", "x-2", "x-4", "x-5", "x-3-2", "x-3"]


def test_reasons_are_a_closed_set_with_fixes():
    import pickle

    assert all(fix for code, fix in REASONS.items() if code != "bad_input")
    with pytest.raises(ValueError, match="unknown InputError code"):
        InputError("x.nii.gz", "message", code="something_new")
    err = pickle.loads(pickle.dumps(InputError("x.nii.gz", "the gzip CRC failed", code="crc_mismatch")))
    assert (err.code, err.message, err.fix) == ("crc_mismatch", "the gzip CRC failed", REASONS["crc_mismatch"])
    assert err.to_record() == {"file": "x.nii.gz", "reason": "crc_mismatch", "message": "the gzip CRC failed",
                               "fix": REASONS["crc_mismatch"]}


def test_a_bug_or_an_out_of_memory_is_one_record_with_its_reason(monkeypatch):
    from medssl.shards import build as build_module

    src = {"key": "k", "images": ["/data/x.nii.gz"], "label": None, "modality": "CT", "dataset": "d", "extra": {}}
    for exc, code in ((RuntimeError("boom"), "internal_error"), (MemoryError(), "out_of_memory")):
        def fail(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(build_module, "prepare_volume", fail)
        rec = build_module._process(3, src, TARGET, False, "npy", 10**6)["error"]
        assert rec["reason"] == code and rec["fix"] == REASONS[code] and "\n" not in rec["message"], rec
        assert rec["file"] == "/data/x.nii.gz" and rec["item"] == 3 and rec["key"] == "k"
    assert "report" in REASONS["internal_error"] and "--max-voxels" in REASONS["out_of_memory"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "medssl.shards", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_build_reports_broken_volumes_and_builds_the_rest(tmp_path, original):
    """Good volumes, a damaged .nii.gz, a pixdim of 0, a probe-like bomb over --max-voxels and a 50 mm
    file: exit 0, one errors.jsonl record per broken volume with its reason, the rest built and verified."""
    folder = tmp_path / "in"
    folder.mkdir()
    data, affine = original["data"], original["affine"]
    for i in range(3):
        write(folder / f"good{i}.nii.gz", data + i, affine)
    damaged = bytearray(original["gz"])
    damaged[len(damaged) // 2] ^= 0x01
    (folder / "damaged.nii.gz").write_bytes(bytes(damaged))
    write(folder / "pixdim0.nii.gz", data, affine, pixdim=(2, 0.0))
    gzip_bomb(folder / "bomb.nii.gz", (400, 400, 250), zooms=(0.8, 0.8, 1.0))  # 80 MB of zeros in ~80 KB
    big = affine.copy()
    big[:3, :3] *= 50 / np.linalg.norm(big[:3, :3], axis=0)
    write(folder / "fifty.nii.gz", data, big)
    out = tmp_path / "out"
    res = _cli("build", folder, "--out", out, "--modality", "CT", "--max-voxels", "2e7", "--workers", "1",
               "--quiet", "--codec", "npy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "skipped 4 volume(s)" in res.stdout, res.stdout
    errors = {Path(e["file"]).name: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert {k: e["reason"] for k, e in errors.items()} == {
        "damaged.nii.gz": "crc_mismatch", "pixdim0.nii.gz": "bad_spacing", "bomb.nii.gz": "too_large",
        "fifty.nii.gz": "too_large"}
    assert all(e["message"] and e["fix"] and "traceback" not in e for e in errors.values())
    assert "exceeds --max-voxels 20,000,000" in errors["bomb.nii.gz"]["message"]
    assert sorted(s["key"] for s in load_samples(out)) == ["in_good0", "in_good1", "in_good2"]
    assert not [p for r in verify(out, progress=False) for p in r.problems]


def test_cli_bad_arguments_exit_2_with_one_message(tmp_path):
    res = _cli("build", tmp_path, "--out", tmp_path / "out", "--max-voxels", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert [line for line in res.stderr.splitlines() if "error" in line] == [
        "python -m medssl.shards build: error: argument --max-voxels: '0' is not a positive whole number of voxels "
        "(e.g. 1e9 or 500M)"], res.stderr
    res = _cli("build", tmp_path / "missing", "--out", tmp_path / "out")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr, res.stderr
