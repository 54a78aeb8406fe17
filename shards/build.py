"""``python -m medssl.shards build``: volumes → preprocessed webdataset tar shards + ``index.json``.

Worker processes load and preprocess volumes in parallel (:func:`shards.preprocess.prepare_volume`);
the main process writes their samples into shards in the order of the inputs, so the same command
always gives byte-identical shards. Each finished shard is renamed into place and appended to
``progress.jsonl``; re-running the command after an interruption keeps those shards and continues
with the next volume. A volume that cannot be read is written to ``errors.jsonl`` (file, reason: a code
of ``shards.errors.REASONS``, message, fix), skipped and counted; the build exits non-zero only when
nothing was built or ``--strict`` is given.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .format import CODECS, FORMAT_VERSION, check_key, encode_sample
from .preprocess import DEFAULT_MAX_VOXELS, parse_spacing, prepare_volume
from .sources import Source, discover

# Measured in BENCHMARKS.md (bench/loader.py): raw .npy decodes fastest per volume (7 vs 12 ms), but
# blosc2 gives more crops/s end to end (reading 3.6x fewer tar bytes through Python's tarfile costs
# more than the decompression) and is 3.6x smaller on disk, so it is the default.
DEFAULT_CODEC = "blosc2"
SHARD_PATTERN = "shard-{:06d}.tar"


def parse_size(text: str | int) -> int:
    """``"512MB"`` / ``"1GB"`` / ``"300k"`` / ``1000000`` → bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().rstrip("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


@dataclass
class BuildConfig:
    """Everything that decides the bytes of the shards (recorded in ``index.json``)."""

    inputs: list[str]
    spacing: str = "1.5"  # mm, isotropic; "x,y,z" per axis; "native" keeps the source spacing
    codec: str = DEFAULT_CODEC
    shard_size: str = "512MB"  # target bytes per shard
    crop_body: bool = False
    modality: str | None = None  # for plain NIfTI/DICOM folders and files; None: decided from the intensities
    include_test: bool = False
    labels: bool = True
    max_voxels: int = DEFAULT_MAX_VOXELS  # per volume, stored and after resampling (see preprocess)

    def validate(self) -> None:
        if self.modality not in (None, "CT", "MR"):
            raise ValueError(f"modality {self.modality!r} must be CT or MR")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} unknown; choose one of {', '.join(CODECS)}")
        parse_spacing(self.spacing)
        if parse_size(self.shard_size) <= 0:
            raise ValueError(f"shard size {self.shard_size!r} must be positive, e.g. 512MB")
        if isinstance(self.max_voxels, bool) or not isinstance(self.max_voxels, int) or self.max_voxels <= 0:
            raise ValueError(f"max voxels {self.max_voxels!r} must be a positive whole number, e.g. 1e9")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["inputs"] = [str(Path(p).resolve()) for p in self.inputs]
        return d


@dataclass
class BuildResult:
    out: Path
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    errors: list[dict] = field(default_factory=list)
    resumed_from: int = 0  # shards kept from an earlier, interrupted run
    seconds: float = 0.0


class BuildInterrupted(KeyboardInterrupt):
    """Raised by the ``_stop_after_shards`` test hook, as a Ctrl-C would be."""


# ------------------------------------------------------------------------------------- worker side
def _process(item: int, src: dict, spacing, crop_body: bool, codec: str, max_voxels: int = DEFAULT_MAX_VOXELS
             ) -> dict:
    """Runs in a worker process: one source → encoded sample bytes, or an error record."""
    try:
        expected = src.get("extra", {}).get("expected_channels")
        if expected and len(src["images"]) != expected:
            raise InputError(
                src["images"][0],
                f"case has {len(src['images'])} channel file(s), dataset.json declares {expected}",
                "add the missing _000N channel files or fix channel_names",
                code="channel_mismatch",
            )
        prep = prepare_volume(src["images"], src["label"], src["modality"], spacing, crop_body,
                              series_uid=src.get("extra", {}).get("dicom_uid"), max_voxels=max_voxels)
        meta = dict(prep.meta)
        meta.update(
            format=FORMAT_VERSION,
            key=src["key"],
            source={"images": src["images"], "label": src["label"], "dataset": src["dataset"]},
        )
        sample = encode_sample(src["key"], prep.image, meta, prep.label, codec)
        info = {
            "key": src["key"],
            "modality": meta["modality"],
            "shape": meta["shape"],
            "spacing": meta["spacing"],
            "original_shape": meta["original"]["shape"],
            "original_spacing": meta["original"]["spacing"],
            "orientation": meta["original"]["orientation"],
            "labelled": prep.label is not None,
            "bytes": sum(len(v) for k, v in sample.items() if k != "__key__"),
        }
        note = meta.get("modality_inferred", "")
        return {"item": item, "ok": True, "sample": sample, "info": info,
                "warning": note if "ambiguous" in note else None}
    except InputError as exc:
        rec = exc.to_record()
    except MemoryError:
        rec = InputError(src["images"][0], f"out of memory while preprocessing a volume within --max-voxels "
                         f"{max_voxels:,}", code="out_of_memory").to_record()
    except Exception as exc:  # noqa: BLE001 - a bug of ours must not stop a build over thousands of volumes
        rec = InputError(src["images"][0], f"internal error ({type(exc).__name__}: {exc}); this is a medssl bug, "
                         "please report it", code="internal_error").to_record()
        rec["traceback"] = traceback.format_exc(limit=6)
    rec.update(item=item, key=src["key"])
    return {"item": item, "ok": False, "error": rec}


# ------------------------------------------------------------------------------------- main side
class _ShardWriter:
    """Writes one tar at a time as ``shard-N.tar.tmp`` and renames it into place when it is complete."""

    def __init__(self, out: Path, index: int):
        import webdataset as wds

        self.out, self.index = out, index
        self.final = out / SHARD_PATTERN.format(index)
        self.tmp = self.final.with_suffix(".tar.tmp")
        self.fh = open(self.tmp, "wb")
        # fixed mtime/owner: the same inputs give byte-identical shards
        self.writer = wds.TarWriter(self.fh, user="medssl", group="medssl", mtime=0.0)
        self.count, self.payload, self.infos = 0, 0, []

    def write(self, sample: dict, info: dict) -> None:
        self.writer.write(sample)
        self.count += 1
        self.payload += info["bytes"]
        self.infos.append(info)

    def close(self) -> dict:
        self.writer.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        from .verify import sha256_file

        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.final)
        return {"name": self.final.name, "samples": self.count, "bytes": self.final.stat().st_size, "sha256": digest}


def _read_progress(out: Path) -> list[dict]:
    """Completed shards of an earlier run, dropping a torn last line or a shard whose file is gone."""
    path = out / "progress.jsonl"
    done: list[dict] = []
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            break
        f = out / rec["shard"]["name"]
        if not f.exists() or f.stat().st_size != rec["shard"]["bytes"]:
            break
        done.append(rec)
    return done


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True) + "\n")


def build(
    config: BuildConfig,
    out: str | Path,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    _stop_after_shards: int | None = None,
) -> BuildResult:
    """Build (or finish building) the shard set of ``config`` in ``out``; see the module docstring."""
    config.validate()
    out = Path(out)
    t0 = time.time()
    spacing = parse_spacing(config.spacing)
    target = parse_size(config.shard_size)
    sources: list[Source] = discover(config.inputs, config.modality, config.include_test, config.labels)
    for src in sources:
        check_key(src.key)
    if len({s.key for s in sources}) != len(sources):  # discover() makes keys unique; verify refuses duplicates
        raise RuntimeError("discover() returned duplicate sample keys; please report this bug")
    fp = {"format": FORMAT_VERSION, "config": config.fingerprint(), "sources": [s.to_record() for s in sources]}
    _check_out(out, config.inputs, sources)
    _probe_undeclared(sources, log, config.max_voxels)

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "build.json"
    if state_path.exists() and not overwrite:
        old = json.loads(state_path.read_text())
        if old != fp:
            raise SystemExit(
                f"{out} holds a build with other settings or inputs ({state_path}); "
                "use a new --out, or pass --overwrite to rebuild from scratch"
            )
        if (out / "index.json").exists():
            idx = json.loads((out / "index.json").read_text())
            log(f"{out}: already complete ({idx['samples']} samples in {len(idx['shards'])} shards); nothing to do")
            return BuildResult(out, idx["samples"], len(idx["shards"]), idx["bytes"], resumed_from=len(idx["shards"]))
    if overwrite or not state_path.exists():
        for f in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.tmp")):
            f.unlink()
        for name in ("progress.jsonl", "errors.jsonl", "samples.jsonl", "index.json"):
            (out / name).unlink(missing_ok=True)
        state_path.write_text(json.dumps(fp, indent=1, sort_keys=True))

    done = _read_progress(out)
    start = done[-1]["next_item"] if done else 0
    _rewrite_jsonl(out / "progress.jsonl", done)
    errors = []
    if (out / "errors.jsonl").exists():
        for line in (out / "errors.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("item", 0) < start:
                errors.append(rec)
    _rewrite_jsonl(out / "errors.jsonl", errors)
    for f in out.glob("shard-*.tar"):  # shards past the last recorded one belong to no completed run
        if f.name not in {d["shard"]["name"] for d in done}:
            f.unlink()
    for f in out.glob("shard-*.tar.tmp"):
        f.unlink()
    if done:
        log(f"resuming {out}: {len(done)} shard(s) already complete, continuing at volume {start + 1}/{len(sources)}")

    result = BuildResult(out, resumed_from=len(done))
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(sources) - start or 1))
    err_fh = open(out / "errors.jsonl", "a")
    prog_fh = open(out / "progress.jsonl", "a")
    shard_index = len(done)
    writer: _ShardWriter | None = None

    def commit(next_item: int) -> None:
        nonlocal writer, shard_index
        rec = writer.close()
        prog_fh.write(json.dumps({"shard": rec, "next_item": next_item, "samples": writer.infos}, sort_keys=True) + "\n")
        prog_fh.flush()
        os.fsync(prog_fh.fileno())
        done.append({"shard": rec, "next_item": next_item, "samples": writer.infos})
        writer, shard_index = None, shard_index + 1
        if _stop_after_shards is not None and shard_index - result.resumed_from >= _stop_after_shards:
            raise BuildInterrupted(f"stopped after {_stop_after_shards} shard(s)")

    from tqdm import tqdm

    bar = tqdm(total=len(sources), initial=start, unit="vol", desc="build", disable=not progress, dynamic_ncols=True)
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tqdm, BLAS)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if workers > 1 else None
    pending: deque = deque()
    next_submit = start
    args = (spacing, config.crop_body, config.codec, config.max_voxels)
    try:
        while next_submit < len(sources) or pending:
            while next_submit < len(sources) and len(pending) < 2 * workers:
                src = sources[next_submit].__dict__
                if pool is None:
                    pending.append(_Done(_process(next_submit, src, *args)))
                else:
                    pending.append(pool.submit(_process, next_submit, src, *args))
                next_submit += 1
            res = pending.popleft().result()
            item = res["item"]
            if res["ok"]:
                info = res["info"]
                if res.get("warning"):
                    bar.write(f"warning: {res['sample']['__key__']}: {res['warning']}")
                if writer is not None and writer.count and writer.payload + info["bytes"] > target:
                    commit(item)
                if writer is None:
                    writer = _ShardWriter(out, shard_index)
                writer.write(res["sample"], info)
                result.samples += 1
            else:
                rec = res["error"]
                errors.append(rec)
                err_fh.write(json.dumps(rec, sort_keys=True) + "\n")
                err_fh.flush()
                fix = f" (fix: {rec['fix']})" if rec.get("fix") else ""
                bar.write(f"skipped {rec['file']}: {_describe(rec)}{fix}")
            bar.update(1)
            bar.set_postfix(shards=shard_index + (writer is not None), errors=len(errors))
        if writer is not None:
            commit(len(sources))
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
        err_fh.close()
        prog_fh.close()
    if pool is not None:
        pool.shutdown()

    shards = [d["shard"] for d in done]
    infos = [s for d in done for s in d["samples"]]
    for d in done:
        for s in d["samples"]:
            s["shard"] = d["shard"]["name"]
    _rewrite_jsonl(out / "samples.jsonl", infos)
    modalities: dict[str, int] = {}
    for s in infos:
        modalities[s["modality"]] = modalities.get(s["modality"], 0) + 1
    index = {
        "format": FORMAT_VERSION,
        "config": config.fingerprint(),
        "codec": config.codec,
        "shards": shards,
        "samples": len(infos),
        "bytes": sum(s["bytes"] for s in shards),
        "labelled": sum(1 for s in infos if s["labelled"]),
        "modalities": modalities,
        "errors": len(errors),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if infos:
        (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    result.samples, result.shards, result.bytes = len(infos), len(shards), index["bytes"]
    result.errors, result.seconds = errors, time.time() - t0
    return result


SHARD_SET_FILES = ("build.json", "index.json", "progress.jsonl", "errors.jsonl", "samples.jsonl")


def _check_out(out: Path, inputs: list[str], sources: list[Source]) -> None:
    """Refuse an output folder that is, lies inside or contains an input folder, holds an input volume,
    or holds anything but a shard set's own files: shards are never written into a raw dataset."""
    fix = "choose an empty or new folder for --out (e.g. shards/<name>), outside the input folders"
    o = out.resolve()
    for inp in inputs:
        p = Path(inp).resolve()
        if p == o:
            raise InputError(out, f"--out is the input {inp}", fix)
        if p.is_dir() and p in o.parents:
            raise InputError(out, f"--out lies inside the input folder {inp}", fix)
        if o in p.parents:
            raise InputError(out, f"--out contains the input {inp}", fix)
    for src in sources:
        for f in src.images + ([src.label] if src.label else []):
            if o in Path(f).resolve().parents:
                raise InputError(out, f"--out holds the input volume {f}", fix)
    if out.is_dir():
        foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                         if not (e.name in SHARD_SET_FILES or e.name.startswith(".")
                                 or (e.is_file() and e.name.startswith("shard-")
                                     and e.name.endswith((".tar", ".tar.tmp")))))
        if foreign:
            raise InputError(out, f"--out holds files that are not part of a shard set "
                                  f"({', '.join(foreign[:4])}{', …' if len(foreign) > 4 else ''})", fix)
    elif out.exists():
        raise InputError(out, "--out is a file, not a folder", fix)


def _probe_undeclared(sources: list[Source], log, max_voxels: int = DEFAULT_MAX_VOXELS, tries: int = 5) -> None:
    """Before anything is written: for each input whose modality nothing declares, look at the
    intensities of its first readable volume, and refuse the build (``InputError``, exit 2) when they
    are not CT Hounsfield units. Each volume is checked again when it is built."""
    from .preprocess import MODALITY_FIX, hu_verdict, load_image

    seen: set[str] = set()
    for src in sources:
        if src.modality is not None or src.dataset in seen:
            continue
        group = [s for s in sources if s.dataset == src.dataset and s.modality is None][:tries]
        seen.add(src.dataset)
        for s in group:
            try:
                data, _ = load_image(s.images[0], s.extra.get("dicom_uid"), max_voxels=max_voxels)
            except Exception:  # noqa: BLE001 - a broken file is reported (with its reason) when it is built
                continue
            verdict, evidence = hu_verdict(data)
            if verdict == "MR":
                raise InputError(s.images[0], f"modality not declared and the intensities are not CT Hounsfield "
                                              f"units ({evidence}); nothing was built", MODALITY_FIX,
                                 code="modality_mismatch")
            if verdict == "CT":
                log(f"{s.dataset}: modality not declared; its volumes look like CT in HU ({evidence}) and are "
                    f"stored as CT where they do (pass --modality CT or MR to declare it)")
            if verdict == "ambiguous":
                log(f"warning: {s.images[0]}: modality not declared and the intensities are ambiguous "
                    f"({evidence}); volumes of {s.dataset} are stored as CT where they look like HU. "
                    f"If they are not CT: {MODALITY_FIX}")
            break


class _Done:
    """A finished 'future' for the in-process path (``workers=1``)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _describe(rec: dict) -> str:
    """``[reason] message`` of an errors.jsonl record (records of older builds hold the text in ``reason``)."""
    return f"[{rec['reason']}] {rec['message']}" if rec.get("message") else str(rec.get("reason", ""))


def summary(result: BuildResult) -> str:
    mb = result.bytes / 1e6
    lines = [
        f"built {result.samples} volume(s) into {result.shards} shard(s), {mb:.1f} MB, in {result.seconds:.1f} s -> {result.out}"
        + (f" (kept {result.resumed_from} shard(s) from the interrupted run)" if result.resumed_from else "")
    ]
    if result.errors:
        lines.append(f"skipped {len(result.errors)} volume(s); reasons in {result.out / 'errors.jsonl'}:")
        for e in result.errors[:10]:
            lines.append(f"  {e['file']}: {_describe(e)}")
        if len(result.errors) > 10:
            lines.append(f"  … and {len(result.errors) - 10} more")
    return "\n".join(lines)


def main(args) -> int:
    cfg = BuildConfig(
        inputs=args.inputs,
        spacing=args.spacing,
        codec=args.codec,
        shard_size=args.shard_size,
        crop_body=args.crop_body,
        modality=args.modality,
        include_test=args.include_test,
        labels=not args.no_labels,
        max_voxels=getattr(args, "max_voxels", DEFAULT_MAX_VOXELS),
    )
    try:
        result = build(cfg, args.out, workers=args.workers, overwrite=args.overwrite,
                       progress=not args.quiet)
    except (ValueError, FileNotFoundError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if result.samples == 0:
        print("error: nothing could be built", file=sys.stderr)
        return 1
    if args.strict and result.errors:
        print(f"error: --strict and {len(result.errors)} volume(s) were skipped", file=sys.stderr)
        return 1
    return 0
