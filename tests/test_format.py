"""The sample contract: codecs round-trip, checksums catch damage, webdataset decodes our codecs, and damaged or
hand-made members end in CorruptSample within the decoder's size bound (property-based, hypothesis)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl.shards.format import (CODECS, LABEL_DTYPE, MAX_MEMBER_BYTES, MODALITY_DTYPE, CorruptSample, checksum,
                                  decode_array, decode_sample, encode_array, encode_sample, image_member, make_key,
                                  wds_handler)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [np.int16, np.float16, np.uint8])
def test_codec_round_trip(codec, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 300, (1, 9, 7, 5))).astype(dtype)
    back = decode_array(encode_array(arr, codec), codec)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("codec", CODECS)
def test_checksum_catches_a_flipped_byte(codec):
    img = np.arange(2 * 3 * 4, dtype=np.int16).reshape(1, 2, 3, 4)
    sample = encode_sample("case_1", img, {"shape": list(img.shape), "modality": "CT"}, None, codec)
    member = [k for k in sample if k.startswith("npy")][0]
    image, label, meta = decode_sample(dict(sample))
    np.testing.assert_array_equal(image, img)
    assert label is None and meta["codec"] == codec
    damaged = bytearray(sample[member])
    damaged[-1] ^= 0xFF
    with pytest.raises(CorruptSample, match="checksum"):
        decode_sample({**sample, member: bytes(damaged)})
    with pytest.raises(CorruptSample, match="no .json"):
        decode_sample({k: v for k, v in sample.items() if k != "json"})


def test_keys_are_webdataset_safe():
    key = make_key("Task03.Liver", "sub/dir", "case 7.nii")
    assert "." not in key and "/" not in key and " " not in key
    with pytest.raises(ValueError):
        encode_sample("a.b", np.zeros((1, 2, 2, 2), np.int16), {}, None, "npy")


@pytest.mark.parametrize("codec", ["zstd", "blosc2"])
def test_webdataset_decodes_our_codecs_with_the_registered_handler(tmp_path, codec):
    import webdataset as wds

    img = np.random.default_rng(1).integers(-1000, 1000, (1, 6, 5, 4)).astype(np.int16)
    lab = (img > 0).astype(np.uint8)
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as w:
        w.write(encode_sample("k0", img, {"shape": list(img.shape)}, lab, codec))
    (sample,) = list(wds.WebDataset(str(path), shardshuffle=False).decode(wds_handler))
    suffix = "npy.zst" if codec == "zstd" else "npy.b2"
    np.testing.assert_array_equal(sample[suffix], img)
    np.testing.assert_array_equal(sample["seg." + suffix], lab)
    assert json.loads(json.dumps(sample["json"]))["codec"] == codec


# ----------------------------------------------------------------------------------------- untrusted members
# A sample's members are untrusted bytes. Every damaged or hand-made member must end in CorruptSample with a
# reason — never another exception, and never an allocation beyond the decoder's bound. The bound is proven
# two ways: in-process with tracemalloc (numpy buffers and the codecs' Python-side outputs are traced) for the
# property-based tests, which pass a small ``max_bytes``; and in a subprocess under RLIMIT_AS (C-side
# allocations included) for bombs against the default cap MAX_MEMBER_BYTES.
CAP = 4 << 20  # max_bytes handed to the decoder in the property-based tests
PEAK = 3 * CAP  # what one decode may allocate at most under that cap (decompressed bytes + the array + slack)
HYPOTHESIS = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _npy_header(shape, descr="<i2") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"shape": tuple(shape), "fortran_order": False, "descr": descr})
    return buf.getvalue()


def _bombs() -> dict[str, list[bytes]]:
    """Members whose headers claim far more than they hold, per codec (each a few hundred bytes)."""
    import blosc2
    import zstandard

    huge = (1, 4096, 4096, 4096)  # 128 GiB of int16
    co = zstandard.ZstdCompressor(level=3).compressobj(size=1 << 40)  # a frame declaring 1 TiB
    declared = co.compress(_npy_header(huge) + b"\0" * (1 << 16)) + co.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    streamed = []  # frames without a declared size: a .npy header claiming 128 GiB, and one claiming 1 KiB,
    for shape in (huge, (1, 8, 8, 8)):  # each followed by 64 MiB of zeros
        co = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
        streamed.append(b"".join([co.compress(_npy_header(shape)), *(co.compress(b"\0" * (1 << 20)) for _ in range(64)),
                                  co.flush()]))
    zeros = blosc2.SChunk(chunksize=1 << 24, cparams={"typesize": 2})
    zeros.fill_special((1 << 34) // 2, blosc2.SpecialValue.ZERO)  # 16 GiB of zeros in a tiny frame
    zeros.vlmeta["__pack_tensor__"] = ("numpy", (1, 2048, 2048, 2048), "<i2")
    lying = blosc2.SChunk(data=np.zeros((1, 2, 2, 2), np.int16))
    lying.vlmeta["__pack_tensor__"] = ("numpy", huge, "<i2")  # vlmeta claims 128 GiB, the frame holds 16 bytes
    return {"npy": [_npy_header(huge), _npy_header((-1, 2, 2, 2)), _npy_header((1, 2, 2, 2), "|O") + b"\0" * 64],
            "zstd": [declared, *streamed], "blosc2": [zeros.to_cframe(), lying.to_cframe()]}


BOMBS = _bombs()


def _peak_of(fn):
    """(result or CorruptSample, bytes allocated at the peak of ``fn``), traced by tracemalloc around ``fn`` only
    (tracing hypothesis's own work as well would make the tests many times slower)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
    except CorruptSample as exc:
        out = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not was_tracing:
            tracemalloc.stop()
    return out, peak


def _assert_outcome(out, sample_meta=None):
    if isinstance(out, CorruptSample):
        assert str(out).strip(), "a CorruptSample says why"
        return
    image, label, meta = out
    assert isinstance(image, np.ndarray) and image.ndim == 4 and isinstance(meta, dict)
    if meta.get("modality") is not None:
        assert image.dtype == MODALITY_DTYPE[meta["modality"]]
    assert label is None or (label.dtype == LABEL_DTYPE and label.shape == (1, *image.shape[1:]))


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-(10 ** 20), 10 ** 20)
                    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
                    | st.sampled_from(["CT", "MR", "npy", "zstd", "blosc2", "int16", "float16", "uint8", "|O",
                                       "x" * 100_000]),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
JSON_EDITS = st.tuples(st.sampled_from(["shape", "dtype", "modality", "codec", "checksums", "spacing"]),
                       JUNK | st.lists(st.integers(-5, 10 ** 7), min_size=0, max_size=6))


@st.composite
def damaged_samples(draw):
    """A valid sample from encode_sample, then 1-4 mutations: byte flips, truncation, padding, swapped, deleted
    or random members, edited or replaced JSON, bombs; checksums recomputed half of the time so that the
    decoders (not only the CRC) meet the damage."""
    codec = draw(st.sampled_from(CODECS))
    modality = draw(st.sampled_from(["CT", "MR"]))
    shape = (draw(st.integers(1, 2)), *(draw(st.integers(1, 7)) for _ in range(3)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    image = rng.integers(-1000, 1000, shape).astype(MODALITY_DTYPE[modality])
    label = (rng.random((1, *shape[1:])) > 0.5).astype(np.uint8) if draw(st.booleans()) else None
    sample = encode_sample("case_1", image, {"shape": list(shape), "modality": modality, "dtype": str(image.dtype)},
                           label, codec)
    sample["__url__"] = "shard-000000.tar"
    members = [k for k in sample if not k.startswith("__")]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "pad", "swap", "delete", "random", "json", "json_bytes", "bomb"]))
        name = draw(st.sampled_from(members))
        data = sample.get(name)
        if op == "flip" and data:
            buf = bytearray(data)
            for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4)):
                buf[pos] ^= draw(st.integers(1, 255))
            sample[name] = bytes(buf)
        elif op == "truncate" and data:
            sample[name] = data[:draw(st.integers(0, len(data) - 1))]
        elif op == "pad" and data:
            sample[name] = data + draw(st.binary(min_size=1, max_size=64))
        elif op == "swap":
            other = draw(st.sampled_from(members))
            sample[name], sample[other] = sample.get(other), sample.get(name)
            sample = {k: v for k, v in sample.items() if v is not None}
        elif op == "delete":
            sample.pop(name, None)
        elif op == "random":
            sample[name] = draw(st.binary(max_size=300))
        elif op == "json":
            try:
                meta = json.loads(sample["json"])
            except Exception:  # noqa: BLE001 - an earlier mutation broke it: start from an empty object
                meta = {}
            if isinstance(meta, dict):
                key, value = draw(JSON_EDITS)
                meta[key] = value
            sample["json"] = json.dumps(meta).encode()
        elif op == "json_bytes":
            sample["json"] = draw(st.binary(max_size=200) | st.sampled_from([b"[]", b"null", b"1e999", b"[" * 100_000,
                                                                             b"{\"codec\": \"zstd\"}", b"\xff\xfe"]))
        elif op == "bomb":
            sample[image_member(codec) if "seg" not in name else name] = draw(st.sampled_from(BOMBS[codec]))
    if draw(st.booleans()):  # fix the checksums so that the damage reaches the decoders
        try:
            meta = json.loads(sample["json"])
            meta["checksums"] = {k: checksum(v) for k, v in sample.items()
                                 if not k.startswith("__") and k != "json" and isinstance(v, bytes)}
            sample["json"] = json.dumps(meta).encode()
        except Exception:  # noqa: BLE001 - no JSON object to fix
            pass
    return sample


@HYPOTHESIS
@given(sample=damaged_samples(), check=st.booleans())
def test_damaged_samples_decode_or_raise_corrupt_sample_within_the_cap(sample, check):
    out, peak = _peak_of(lambda: decode_sample(sample, check=check, max_bytes=CAP))
    _assert_outcome(out)
    assert peak < PEAK, f"decode allocated {peak} bytes, over {PEAK}"


MEMBER_BYTES = st.one_of(st.none(), st.binary(max_size=400),
                         st.sampled_from([b"\x93NUMPY\x01\x00", b"\x28\xb5\x2f\xfd", b"b2frame", b"\x93NUMPY\x03\x00\x10\x00"]))


@HYPOTHESIS
@given(members=st.fixed_dictionaries({"json": MEMBER_BYTES | st.builds(lambda c, m: json.dumps({"codec": c, "modality": m}).encode(),
                                                                        st.sampled_from(CODECS + ("lz4",)),
                                                                        st.sampled_from(["CT", "MR", "PET"])),
                                      "npy": MEMBER_BYTES, "npy.zst": MEMBER_BYTES, "npy.b2": MEMBER_BYTES,
                                      "seg.npy": MEMBER_BYTES, "seg.npy.zst": MEMBER_BYTES, "seg.npy.b2": MEMBER_BYTES}))
def test_random_bytes_per_member_raise_corrupt_sample(members):
    sample = {"__key__": "k", **{k: v for k, v in members.items() if v is not None}}
    out, peak = _peak_of(lambda: decode_sample(sample, max_bytes=CAP))
    _assert_outcome(out)
    assert peak < PEAK


@pytest.mark.parametrize("codec", CODECS)
def test_header_bombs_are_refused_before_allocating(codec):
    img = np.zeros((1, 2, 2, 2), np.int16)
    for bomb in BOMBS[codec]:
        for meta in ({"modality": "CT"}, {"modality": "CT", "shape": [1, 2, 2, 2]}):
            sample = {"__key__": "k", "json": json.dumps({**meta, "codec": codec}).encode(), image_member(codec): bomb}
            out, peak = _peak_of(lambda: decode_sample(sample))  # the default cap, 4 GiB
            assert isinstance(out, CorruptSample), out
            assert peak < (80 << 20), f"{codec}: {peak} bytes allocated for a refused bomb"
    assert decode_sample(encode_sample("k", img, {"modality": "CT"}, None, codec))[0].shape == img.shape


def test_wrong_dtype_shape_json_and_missing_members_are_named():
    img = np.zeros((1, 3, 3, 3), np.float32)  # float32 is neither CT's int16 nor MR's float16
    s = encode_sample("k", img, {"modality": "CT"}, None, "npy")
    with pytest.raises(CorruptSample, match="dtype float32"):
        decode_sample(s)
    good = encode_sample("k", img.astype(np.int16), {"modality": "CT", "shape": [1, 3, 3, 3]}, None, "npy")
    with pytest.raises(CorruptSample, match="label dtype int8"):
        decode_sample({**good, "seg.npy": encode_array(np.zeros((1, 3, 3, 3), np.int8), "npy")})
    with pytest.raises(CorruptSample, match="int64 = 216 bytes, more than the 27"):  # bound from the image's shape
        decode_sample({**good, "seg.npy": encode_array(np.zeros((1, 3, 3, 3), np.int64), "npy")})
    with pytest.raises(CorruptSample, match=r"label shape \(1, 3, 3, 2\)"):
        decode_sample({**good, "seg.npy": encode_array(np.zeros((1, 3, 3, 2), np.uint8), "npy")})
    for raw, reason in ((b"{not json", "does not parse"), (b"[1, 2]", "not an object"),
                        (json.dumps({"codec": "lz4"}).encode(), "codec"),
                        (json.dumps({"shape": [1, 10 ** 6, 10 ** 6, 10 ** 6]}).encode(), "more than"),
                        (json.dumps({"modality": "PET"}).encode(), "modality")):
        with pytest.raises(CorruptSample, match=reason):
            decode_sample({**good, "json": raw})
    with pytest.raises(CorruptSample, match="no .npy member"):
        decode_sample({k: v for k, v in good.items() if k != "npy"})
    with pytest.raises(CorruptSample, match="holds 9 .*truncated"):
        decode_array(encode_array(img.astype(np.int16), "npy")[:-45], "npy")


RLIMIT_SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, blosc2, zstandard
from medssl.shards.format import CorruptSample, MAX_MEMBER_BYTES, decode_sample, image_member
from tests.test_format import BOMBS
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
for codec, bombs in BOMBS.items():
    for bomb in bombs:
        for meta in ({"modality": "CT"}, {"modality": "CT", "shape": [1, 8, 8, 8]}):
            sample = {"__key__": "k", "json": json.dumps({**meta, "codec": codec}).encode(), image_member(codec): bomb}
            try:
                decode_sample(sample)
            except CorruptSample:
                continue
            raise SystemExit(f"{codec}: a bomb decoded")
print("refused", sum(map(len, BOMBS.values())) * 2, "bombs under RLIMIT_AS +512 MiB; cap", MAX_MEMBER_BYTES)
"""


def test_bombs_under_an_address_space_limit():
    """The decoder's own caps hold for C-side allocations too: with the address space limited to what the
    process holds plus 512 MiB, every bomb (claims of 16 GiB to 1 TiB; 64 MiB streams without a declared size
    behind a .npy header claiming 128 GiB or 1 KiB) is refused with CorruptSample, never MemoryError."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "BLOSC_NTHREADS": "1"}
    r = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(root)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "refused 16 bombs" in r.stdout
