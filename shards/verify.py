"""``python -m medssl.shards verify`` and ``python -m medssl.shards info``: check a shard set and describe it.

``verify`` recomputes every shard's sha256, decodes every sample (checking each voxel member's
CRC-32, shape and dtype against its JSON) and compares the counts and keys with ``index.json`` and
``samples.jsonl``. ``info`` summarises what a shard set holds: volumes and channels per modality,
spacing and size distributions, bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .format import LABEL_DTYPE, MODALITY_DTYPE, CorruptSample, decode_sample


def load_index(root: str | Path) -> dict:
    root = Path(root)
    path = root / "index.json"
    if not path.exists():
        hint = " (the build did not finish: re-run the same `shards build` command to resume)" if (
            root / "progress.jsonl").exists() else ""
        raise FileNotFoundError(f"{path} not found: not a finished shard set{hint}")
    return json.loads(path.read_text())


def load_samples(root: str | Path) -> list[dict]:
    path = Path(root) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def channel_counts(dirs) -> dict[int, int]:
    """Channels per volume → number of volumes, over one or more finished shard sets.

    Read from each set's ``samples.jsonl`` (``shape`` is channels, x, y, z), so no shard is opened.
    A model's input channel count must match the shards: ``{1: 120}`` is single-channel data,
    ``{2: 40}`` two-channel data, and more than one key means the sets mix channel counts.
    ``dirs`` is a path or a list of paths; a folder that is not a finished shard set raises
    ``FileNotFoundError`` naming it.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    counts: dict[int, int] = {}
    for d in dirs:
        load_index(d)  # a clear error for a folder that is not a finished shard set
        for s in load_samples(d):
            c = int(s["shape"][0])
            counts[c] = counts.get(c, 0) + 1
    return dict(sorted(counts.items()))


def iter_tar(path: str | Path, on_error):
    """Raw samples (member suffix → bytes) of one shard, read by webdataset; tar errors go to ``on_error``."""
    from webdataset.tariterators import tarfile_samples

    def handler(exc: Exception) -> bool:
        on_error(f"{path}: unreadable tar data ({type(exc).__name__}: {exc.args[0] if exc.args else exc})")
        return True

    yield from tarfile_samples([{"url": str(path)}], handler=handler)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardReport:
    name: str
    expected: int
    found: int = 0
    bytes_ok: bool = False
    sha_ok: bool = False
    problems: list[str] = field(default_factory=list)


def verify(root: str | Path, progress: bool = True) -> list[ShardReport]:
    from tqdm import tqdm

    root = Path(root)
    index = load_index(root)
    listed = {s["key"]: s for s in load_samples(root)}
    seen: dict[str, str] = {}
    reports = []
    bar = tqdm(total=index["samples"], unit="vol", desc="verify", disable=not progress, dynamic_ncols=True)
    for shard in index["shards"]:
        rep = ShardReport(shard["name"], shard["samples"])
        reports.append(rep)
        path = root / shard["name"]
        if not path.exists():
            rep.problems.append("file missing")
            continue
        rep.bytes_ok = path.stat().st_size == shard["bytes"]
        if not rep.bytes_ok:
            rep.problems.append(f"size {path.stat().st_size} != index {shard['bytes']}")
        rep.sha_ok = sha256_file(path) == shard["sha256"]
        if not rep.sha_ok:
            rep.problems.append("sha256 differs from index.json")
        for raw in iter_tar(path, rep.problems.append):
            key = raw.get("__key__")
            rep.found += 1
            bar.update(1)
            try:
                image, label, meta = decode_sample(raw, check=True)
            except CorruptSample as exc:
                rep.problems.append(str(exc))
                continue
            want = MODALITY_DTYPE.get(meta.get("modality"))
            if want is not None and image.dtype != want:
                rep.problems.append(f"{key}: dtype {image.dtype}, expected {np.dtype(want)} for {meta['modality']}")
            if label is not None and label.dtype != LABEL_DTYPE:
                rep.problems.append(f"{key}: label dtype {label.dtype}, expected uint8")
            if key in seen:
                rep.problems.append(f"{key}: duplicate key (also in {seen[key]})")
            seen[key] = shard["name"]
            if listed and key not in listed:
                rep.problems.append(f"{key}: not listed in samples.jsonl")
        if rep.found != rep.expected:
            rep.problems.append(f"{rep.found} samples, index.json says {rep.expected}")
    bar.close()
    missing = set(listed) - set(seen)
    if missing:
        reports.append(ShardReport("samples.jsonl", len(listed), len(seen),
                                   problems=[f"{len(missing)} listed sample(s) not found, e.g. {sorted(missing)[:3]}"]))
    return reports


# ----------------------------------------------------------------------------------------- tables
def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain fixed-width text table (no terminal tricks: safe in logs and CI output)."""
    right = right if right is not None else set(range(1, len(headers)))
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def verify_table(reports: list[ShardReport]) -> str:
    rows = [[r.name, r.expected, r.found, "ok" if r.sha_ok else "BAD", "ok" if not r.problems else "FAIL"] for r in reports]
    text = table(["shard", "index", "found", "sha256", "status"], rows)
    problems = [f"  {r.name}: {p}" for r in reports for p in r.problems]
    return text + ("\nproblems:\n" + "\n".join(problems) if problems else "")


def _dist(values: list[float], fmt: str = "{:.2f}") -> list[str]:
    if not values:
        return ["-"] * 4
    a = np.asarray(values, dtype=np.float64)
    return [fmt.format(v) for v in (a.min(), np.median(a), a.max(), a.mean())]


def info(root: str | Path) -> str:
    root = Path(root)
    index = load_index(root)
    samples = load_samples(root)
    cfg = index.get("config", {})
    lines = [
        f"{root}: {index['samples']} volume(s) in {len(index['shards'])} shard(s), "
        f"{index['bytes'] / 1e6:.1f} MB, codec {index.get('codec')}, target spacing {cfg.get('spacing')} mm, "
        f"{index.get('labelled', 0)} labelled, {index.get('errors', 0)} skipped at build time",
        "",
    ]
    mods = sorted({s["modality"] for s in samples})
    rows = []
    for m in mods:
        sub = [s for s in samples if s["modality"] == m]
        chans = sorted({int(s["shape"][0]) for s in sub})
        rows.append([m, len(sub), ",".join(map(str, chans)), sum(s["labelled"] for s in sub),
                     f"{sum(s['bytes'] for s in sub) / 1e6:.1f}", f"{np.mean([s['bytes'] for s in sub]) / 1e6:.2f}"])
    lines += [table(["modality", "volumes", "channels", "labelled", "MB", "MB/volume"], rows), ""]
    counts = channel_counts(root)
    lines += ["channels per volume: " + ", ".join(f"{c} ({n} volume{'s' * (n != 1)})" for c, n in counts.items())
              + ("  -- MIXED: a model takes one channel count; build sets of one channel count"
                 if len(counts) > 1 else ""), ""]
    rows = []
    # stored volumes are RAS (x, y, z); sources keep their own voxel axes (i, j, k)
    for label, field_, fmt, names in (("stored spacing (mm)", "spacing", "{:.2f}", "xyz"),
                                      ("stored size (voxels)", "shape", "{:.0f}", "xyz"),
                                      ("source spacing (mm)", "original_spacing", "{:.2f}", "ijk"),
                                      ("source size (voxels)", "original_shape", "{:.0f}", "ijk")):
        for ax, name in enumerate(names):
            vals = [s[field_][ax + (1 if field_ == "shape" else 0)] for s in samples]
            rows.append([f"{label} {name}", *_dist(vals, fmt)])
    lines += [table(["", "min", "median", "max", "mean"], rows), ""]
    orient: dict[str, int] = {}
    for s in samples:
        orient[s["orientation"]] = orient.get(s["orientation"], 0) + 1
    lines.append("source orientations: " + ", ".join(f"{k} {v}" for k, v in sorted(orient.items())))
    return "\n".join(lines)
