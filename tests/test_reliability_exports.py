"""Exports as untrusted input (DESIGN contract 4): a damaged manifest or weights file ends in a loaded backbone or
in one ExportError naming the file, the field, the value and the fix — never another exception, a hang, or an
allocation above a cap.

How the cap is proven: the property-based tests and the depth-1e9 test run with this process's soft
address-space limit (RLIMIT_AS) lowered to what it holds plus 1 GiB, restored afterwards; any allocation past
it raises MemoryError (or torch's RuntimeError), which fails the test. Hangs are bounded by SIGALRM (30 s per
example). Hypothesis is derandomized and keeps no example database, so CI sees the same examples every run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import medssl.finetune.models  # noqa: F401 - imported (MONAI with it) before any test lowers the address-space limit
from medssl.finetune.config import load_config
from medssl.finetune.loading import build, check_export
from medssl.pretrain.export import ExportError, load_backbone, read_manifest, write_component, write_export
from medssl.shards.verify import sha256_file

ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 1 << 30  # address space the loaders may add while the property tests run
HYPOTHESIS = settings(derandomize=True, database=None, deadline=None, max_examples=100,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pre(modality: str = "CT") -> dict:
    intensity = ({"CT": {"window": [-175.0, 250.0], "out": [0.0, 1.0], "clip": True}} if modality == "CT" else
                 {"MR": {"percentiles": [0.5, 99.5], "out": [0.0, 1.0], "clip": True}})
    return {"orientation": "RAS", "spacing": "1.5", "crop_size": [32, 32, 32], "intensity": intensity}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Two small exports as pretraining writes them: a ViT, and a residual encoder whose export carries a
    pretrained UNet decoder component (as Volume Fusion's does)."""
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.registry import DECODERS

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    vit = build_backbone("vit3d_tiny_p16", img_size=[32, 32, 32])
    meta = {"recipe": "hi_end_mae", "step": 3, "samples_seen": 12, "config_hash": "0123abcd",
            "config": {"recipe": "hi_end_mae", "optim": {"lr": 1e-4}}, "preprocessing": _pre("CT"),
            "source": {"run_dir": "/runs/x", "checkpoint": "step00000003"}}
    out = {"vit": write_export(root / "vit", "vit3d_tiny_p16", vit, vit.state_dict(), meta)}
    res = build_backbone("resenc3d_tiny", img_size=32)
    dec = DECODERS.build("unet3d", feature_channels=res.feature_channels, feature_strides=res.feature_strides,
                         out_channels=3)
    dec.registry_name = "unet3d"
    comp = write_component(root / "resenc", "decoder", dec, dec.state_dict())
    out["resenc"] = write_export(root / "resenc", "resenc3d_tiny", res, res.state_dict(),
                                 {**meta, "recipe": "volume_fusion", "components": {"decoder": comp},
                                  "preprocessing": _pre("MR")})
    return out


def _copy(src: Path, dst: Path) -> Path:
    """A copy of an export whose weights are hard links (cheap; a test that edits weights writes a new file)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name)
    (dst / "manifest.json").unlink()
    shutil.copyfile(src / "manifest.json", dst / "manifest.json")
    return dst


def _edit(export: Path, fn) -> None:
    m = json.loads((export / "manifest.json").read_text())
    fn(m)
    (export / "manifest.json").write_text(json.dumps(m))


def _cfg(export: Path, *over: str):
    cfg = load_config(list(over), "tiny", export=str(export), init="pretrained")
    cfg.data.crop_size = [32, 32, 32]
    return cfg


@contextlib.contextmanager
def address_space_cap(headroom: int = HEADROOM):
    """Lower the soft RLIMIT_AS to the address space this process holds now plus ``headroom`` (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    held = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (min(held + headroom, hard if hard > 0 else held + headroom), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_limit(seconds: int = 30):
    def _raise(*_):
        raise TimeoutError(f"no answer within {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outcome(export: Path, fn):
    """``fn()``'s result, or the ExportError it raised, checked to name a file of ``export`` on its first line.
    Any other exception propagates (and fails the test)."""
    try:
        with time_limit():
            return fn()
    except ExportError as exc:
        first = str(exc).splitlines()[0]
        assert str(export) in first, f"the message names no file of the export: {exc}"
        assert len(first) < 2000, "one readable line"
        return exc


# ----------------------------------------------------------------------------------------- property-based
def _paths(doc, prefix=()):
    """Every place in a JSON document: dict keys and list indices, depth first."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


SPECIAL = [None, 0, -1, 1, 1e9, 10 ** 9, 2 ** 63, -0.0, 0.5, math.nan, math.inf, -math.inf, True, False, "", "1e9",
           "nan", "native", "0,0,0", "../../etc/passwd", "x" * 100_000, [], {}, [0, 0, 0], [1e9, 1e9, 1e9], [5, 5],
           [[[[[[]]]]]], {"a": {"b": [None, {"c": "d"}]}}, "vit3d_base_p16", "unet3d", "0" * 64]
JUNK = st.sampled_from(SPECIAL) | st.recursive(
    st.none() | st.booleans() | st.integers(-(10 ** 12), 10 ** 12) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _mutate(data, manifest: dict) -> list[str]:
    """1-3 edits of the manifest: delete a key or list item, or set it to junk; returns what was done. The place
    is drawn uniformly from a seeded generator (hypothesis's own draws lean towards the first items, which
    would edit format_version most of the time)."""
    done = []
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(manifest))
        if not paths:
            break
        path = paths[int(rng.integers(len(paths)))]
        parent = manifest
        for p in path[:-1]:
            parent = parent[p]
        if data.draw(st.booleans()):
            del parent[path[-1]]
            done.append(f"del {path}")
        else:
            parent[path[-1]] = data.draw(JUNK)
            done.append(f"set {path}")
    return done


@HYPOTHESIS
@given(data=st.data(), which=st.sampled_from(["vit", "resenc"]))
def test_mutated_manifests_load_or_raise_export_error(exports, data, which):
    """Deleted keys, wrong types, 0, -1, NaN, 1e9, huge strings, nested junk in any field (or a manifest that is
    not JSON at all): load_backbone and fine-tuning's loader give a network or one ExportError naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        export = _copy(exports[which], Path(tmp) / "export")
        manifest = json.loads((export / "manifest.json").read_text())
        if data.draw(st.integers(0, 9)) == 0:  # the file itself damaged
            text = json.dumps(manifest).encode()
            raw = data.draw(st.sampled_from([text[:len(text) // 2], b"[" * 100_000, b"\xff\xfe{}", b"[]", b"null"])
                            | st.binary(max_size=200))
            (export / "manifest.json").write_bytes(raw)
        else:
            _mutate(data, manifest)
            (export / "manifest.json").write_text(json.dumps(manifest))
        with address_space_cap():
            got = _outcome(export, lambda: load_backbone(export, log=lambda *a: None))
            assert isinstance(got, (ExportError, torch.nn.Module))
            got = _outcome(export, lambda: build(_cfg(export), in_channels=1, out_channels=3, log=lambda *a: None))
            assert isinstance(got, (ExportError, tuple))


@HYPOTHESIS
@given(data=st.data(), which=st.sampled_from(["vit", "resenc"]))
def test_damaged_weights_load_or_raise_export_error(exports, data, which):
    """The weights file truncated, padded, flipped in its header or holding NaN/inf, with the manifest's sha256
    updated (so that the damage reaches the header and value checks) or not."""
    with tempfile.TemporaryDirectory() as tmp:
        export = _copy(exports[which], Path(tmp) / "export")
        name = data.draw(st.sampled_from(["backbone.safetensors"] + (["decoder.safetensors"] if which == "resenc" else [])))
        raw = bytearray((export / name).read_bytes())
        (export / name).unlink()  # the hard link: write a new file
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))  # positions drawn uniformly
        op = data.draw(st.sampled_from(["nonfinite", "flip_header", "flip", "truncate", "pad"]))
        if op == "truncate":
            raw = raw[:int(rng.integers(len(raw)))]
        elif op == "pad":
            raw += data.draw(st.binary(min_size=1, max_size=64))
        elif op in ("flip_header", "flip"):
            end = min(len(raw), 8 + int.from_bytes(raw[:8], "little")) if op == "flip_header" else len(raw)
            for pos in rng.integers(0, end, size=data.draw(st.integers(1, 4))):
                raw[pos] ^= int(rng.integers(1, 256))
        (export / name).write_bytes(bytes(raw))
        if op == "nonfinite":
            state = load_file(str(export / name))
            key = data.draw(st.sampled_from(sorted(k for k, v in state.items() if v.is_floating_point())))
            state[key].view(-1)[0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            save_file(state, str(export / name))
        if rng.random() < 0.8:  # mostly: past the sha256 check, to the header and value checks
            def fix(m):
                entry = m["weights"] if name == "backbone.safetensors" else m["components"]["decoder"]
                entry["sha256"] = sha256_file(export / name)
            _edit(export, fix)
        with address_space_cap():
            got = _outcome(export, lambda: build(_cfg(export), in_channels=1, out_channels=3, log=lambda *a: None))
            assert isinstance(got, (ExportError, tuple))
            if op == "nonfinite" and isinstance(got, ExportError) and "non-finite" in str(got):
                assert "model.allow_nonfinite=true" in str(got)


# ----------------------------------------------------------------------------------------- specific cases
def _poison(export: Path, file: str, entry) -> None:
    """NaN in three values of one tensor and inf in another; the manifest's sha256 updated (a diverged run). A
    decoder's class head is left alone: fine-tuning re-initialises it."""
    state = load_file(str(export / file))
    keys = sorted(k for k in state if not k.startswith("head."))
    state[keys[0]].view(-1)[:3] = math.nan
    state[keys[1]].view(-1)[0] = math.inf
    (export / file).unlink()
    save_file(state, str(export / file))
    _edit(export, lambda m: entry(m).__setitem__("sha256", sha256_file(export / file)))


def test_nonfinite_weights_are_refused_by_finetuning_unless_allowed(exports, tmp_path):
    export = _copy(exports["vit"], tmp_path / "vit")
    _poison(export, "backbone.safetensors", lambda m: m["weights"])
    first = sorted(load_file(str(export / "backbone.safetensors")))[0]  # the tensor _poison gave 3 NaNs
    with pytest.raises(ExportError, match=r"model\.allow_nonfinite=true") as e:
        build(_cfg(export), in_channels=1, out_channels=3)
    assert f"{first} (3 of " in str(e.value) and "2 tensor(s) hold non-finite values" in str(e.value)
    with pytest.raises(ExportError, match=r"model\.allow_nonfinite=true"):
        check_export(_cfg(export))  # what the command runs before it touches --out
    logs = []
    model, report, _, _ = build(_cfg(export, "model.allow_nonfinite=true"), in_channels=1, out_channels=3,
                                log=logs.append)
    assert torch.isnan(model.backbone.state_dict()[first]).sum() == 3 and len(report.loaded) == 52  # 53 − cls token
    assert any("loaded anyway" in line for line in logs)
    with pytest.raises(ExportError, match="allow_nonfinite=True"):
        load_backbone(export)
    assert torch.isnan(load_backbone(export, allow_nonfinite=True, log=logs.append).state_dict()[first]).any()

    res = _copy(exports["resenc"], tmp_path / "resenc")  # a pretrained decoder component is checked the same way
    _poison(res, "decoder.safetensors", lambda m: m["components"]["decoder"])
    with pytest.raises(ExportError, match=r"decoder\.safetensors: 2 tensor\(s\) hold non-finite.*model\.allow_nonfinite"):
        build(_cfg(res), in_channels=1, out_channels=3)
    build(_cfg(res, "model.allow_nonfinite=true"), in_channels=1, out_channels=3, log=logs.append)


@pytest.mark.parametrize("depth", [10 ** 9, 1e9])
def test_depth_1e9_is_refused_before_anything_is_allocated(exports, tmp_path, depth):
    export = _copy(exports["vit"], tmp_path / "vit")
    _edit(export, lambda m: m["backbone"]["kwargs"].__setitem__("depth", depth))
    tracemalloc.start()
    t0 = time.time()
    try:
        with address_space_cap(256 << 20):
            for load in (lambda: load_backbone(export), lambda: build(_cfg(export), 1, 3), lambda: read_manifest(export)):
                with pytest.raises(ExportError, match=r"manifest\.json: backbone\.kwargs\.depth = 1000000000(\.0)? must be "
                                                      r"an integer >= 0 and <= 128; re-export .*python -m medssl\.pretrain export"):
                    load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20) and time.time() - t0 < 30, (peak, time.time() - t0)


def test_a_huge_network_within_each_bound_is_refused_on_the_meta_device(exports, tmp_path):
    """Every kwarg within its bound, together 100 G parameters: sized on the meta device, refused, nothing built."""
    export = _copy(exports["vit"], tmp_path / "vit")
    _edit(export, lambda m: m["backbone"]["kwargs"].update(depth=128, embed_dim=8184, num_heads=8, out_indices=[1]))
    with address_space_cap(256 << 20), pytest.raises(ExportError, match=r"backbone\.kwargs = .* parameters and buffers, "
                                                                       r"over the 2,000,000,000"):
        read_manifest(export)


@pytest.mark.parametrize("field", ["backbone", "backbone.kwargs", "weights", "weights.sha256", "in_channels", "recipe",
                                   "step", "preprocessing", "preprocessing.spacing", "preprocessing.intensity.CT.window",
                                   "feature_strides"])
def test_a_missing_field_is_named(exports, tmp_path, field):
    export = _copy(exports["vit"], tmp_path / "vit")

    def drop(m):
        *parents, last = field.split(".")
        for p in parents:
            m = m[p]
        del m[last]

    _edit(export, drop)
    with pytest.raises(ExportError) as e:
        read_manifest(export)
    assert str(e.value) == (f"{export / 'manifest.json'}: required field {field} is missing; re-export the run with "
                            "`python -m medssl.pretrain export RUN` (or restore the export's original manifest.json)")


@pytest.mark.parametrize("field, value, words", [
    ("preprocessing.spacing", 0, "target spacing in mm"),
    ("preprocessing.spacing", [1.5, math.nan, 1.5], "finite"),
    ("preprocessing.intensity.CT.window", [250.0, 250.0], "lo < hi"),
    ("preprocessing.orientation", "LPS", "one of RAS"),
    ("backbone.name", "vit3d_huge", "not a registered backbone"),
    ("weights.sha256", "abc", "64 lowercase hex digits"),
    ("weights.file", "../../backbone.safetensors", "no folders"),
    ("in_channels", 2, "differs from the vit3d_tiny_p16"),
    ("backbone.kwargs.img_size", [32, 32], "3 integers"),
])
def test_a_bad_value_names_field_value_and_fix(exports, tmp_path, field, value, words):
    export = _copy(exports["vit"], tmp_path / "vit")

    def put(m):
        *parents, last = field.split(".")
        for p in parents:
            m = m[p]
        m[last] = value

    _edit(export, put)
    with pytest.raises(ExportError) as e:
        read_manifest(export)
    msg = str(e.value)
    assert msg.startswith(f"{export / 'manifest.json'}: {field} = ") and words in msg and "\n" not in msg
    assert "python -m medssl.pretrain export" in msg


def test_cli_refuses_a_bad_export_with_one_line_and_no_run_dir(exports, tmp_path):
    bad = _copy(exports["vit"], tmp_path / "bad_export")
    _edit(bad, lambda m: m["preprocessing"].__setitem__("spacing", 0))
    (tmp_path / "data").mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("MEDSSL_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "medssl.finetune", "--export", str(bad), "--data", str(tmp_path / "data"),
                        "--out", str(tmp_path / "run"), "--preset", "tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "preprocessing.spacing = 0" in lines[0] and str(bad / "manifest.json") in lines[0]
    assert not (tmp_path / "run").exists(), "a refused export makes no run folder"


# ----------------------------------------------------------------------------------------- finetune predict
def _run_folder(tmp_path: Path, edit=None, poison: bool = False) -> Path:
    """A fine-tuning run folder as `finetune predict` reads it: model_best.safetensors with its network spec."""
    from medssl.finetune.predict import build_network
    from medssl.pretrain.backbones import build_backbone
    from medssl.pretrain.export import save_safetensors

    kwargs = build_backbone("vit3d_tiny_p16", img_size=[32, 32, 32]).config
    spec = {"format": 1, "backbone": {"name": "vit3d_tiny_p16", "kwargs": kwargs},
            "decoder": {"arch": "unetr", "component": None,
                        "kwargs": {"feature_size": 12, "norm": "instance", "res_block": True}},
            "in_channels": 1, "out_channels": 2, "classes": {"0": "background", "1": "liver"}, "crop_size": [32, 32, 32],
            "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "window_ct": [-175.0, 250.0],
                              "window_out": [0.0, 1.0]},
            "modality": "CT", "eval": {"overlap": 0.25, "sw_batch": 2, "mode": "constant"}}
    state = build_network(spec).state_dict()
    if poison:
        state[sorted(state)[0]].view(-1)[0] = math.nan
    if edit:
        edit(spec)
    run = tmp_path / "run"
    run.mkdir()
    save_safetensors(state, run / "model_best.safetensors", metadata={"network": json.dumps(spec)})
    return run


def _image(tmp_path: Path) -> Path:
    import nibabel as nib

    path = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return path


@pytest.mark.parametrize("what, words", [
    ("depth", r"backbone\.kwargs\.depth = 1000000000 must be an integer"),
    ("window", r"preprocessing\.window_ct = \[1, 1\] must be \[lo, hi\]"),
    ("nan", r"non-finite values .*--allow-nonfinite"),
])
def test_predict_refuses_a_bad_run_folder_before_writing(tmp_path, capsys, what, words):
    from medssl.finetune.__main__ import main

    edits = {"depth": lambda s: s["backbone"]["kwargs"].__setitem__("depth", 10 ** 9),
             "window": lambda s: s["preprocessing"].__setitem__("window_ct", [1, 1])}
    run = _run_folder(tmp_path, edits.get(what), poison=what == "nan")
    out = tmp_path / "pred"
    with address_space_cap():
        assert main(["predict", str(run), "--images", str(_image(tmp_path)), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(words, err), err
    assert not out.exists(), "nothing written for a refused run folder"
