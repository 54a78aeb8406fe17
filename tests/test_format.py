"""The sample contract: codecs round-trip, checksums catch damage, webdataset decodes our codecs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.shards.format import (CODECS, CorruptSample, decode_array, decode_sample, encode_array, encode_sample,
                           make_key, wds_handler)


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
