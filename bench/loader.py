"""Loader benchmark: 96³ crops per second from shards vs. the official repos' MONAI pipeline on .nii.gz.

Usage:  python bench/loader.py [--n 8] [--crops 160] [--workers 1 2] [--out .bench/loader]

What it does, in one run on one machine:
1. synthesises ``--n`` full-size CT phantoms (fov_scale 1: ~0.6–1.0 mm in-plane, 1.5–5 mm slices);
2. builds them into shards with each codec (npy, zstd, blosc2): bytes on disk, median decode ms/volume;
3. streams 96³ crops (4 per decoded volume, batch 4, training mode with flips) with 1 and 2 workers;
4. runs the MONAI pipeline the official Hi-End-MAE/MambaMIM/SwinUNETR code uses on the same .nii.gz
   files: LoadImaged → EnsureChannelFirstd → Orientationd(RAS) → Spacingd(1.5) →
   ScaleIntensityRanged(-175..250 → 0..1) → RandSpatialCropSamplesd(96³, 4 per volume),
   through a torch DataLoader with the same workers and batch;
5. prints a table (crops/s, crops per CPU-second of the main process and its workers — the per-core
   figure —, MB/s of source bytes read, peak PSS/RSS of the loader processes) and the ratios. Paste it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CROP = (96, 96, 96)
K = 4
BATCH = 4


class PeakMemory:
    """Samples the memory of this process and its children (DataLoader workers) every 100 ms.

    ``peak`` sums PSS (proportional set size: shared pages such as torch's libraries count once
    across processes, not once per worker); ``peak_rss`` sums plain RSS, which double-counts them.
    """

    def __init__(self):
        self.peak = self.peak_rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                infos = [p.memory_full_info() for p in (me, *me.children(recursive=True))]
                self.peak = max(self.peak, sum(i.pss for i in infos))
                self.peak_rss = max(self.peak_rss, sum(i.rss for i in infos))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), its live children (DataLoader workers) and
    its children that have exited and been reaped (workers of a finished DataLoader)."""
    t = os.times()
    total = t.children_user + t.children_system
    for p in (psutil.Process(), *psutil.Process().children(recursive=True)):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def time_loader(make_iter, n_crops: int, repeat: int = 1) -> dict:
    """Median over ``repeat`` runs of crops/s and crops per CPU-second (worker start-up excluded), peak memory."""
    runs = [_time_once(make_iter, n_crops) for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _time_once(make_iter, n_crops: int) -> dict:
    with PeakMemory() as mem:
        it = make_iter()
        first = next(it)
        got, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        while got < n_crops:
            batch = next(it)
            got += batch["image"].shape[0] if isinstance(batch, dict) else len(batch)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        del it, first
    return {"crops_s": got / dt, "crops_cpu_s": got / cpu, "pss_mb": mem.peak / 1e6, "rss_mb": mem.peak_rss / 1e6}


def monai_iter(files: list[str], workers: int):
    from monai import transforms as T
    from monai.data import DataLoader, Dataset

    tf = T.Compose([
        T.LoadImaged(keys="image"),
        T.EnsureChannelFirstd(keys="image"),
        T.Orientationd(keys="image", axcodes="RAS"),
        T.Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        T.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        T.SpatialPadd(keys="image", spatial_size=CROP),
        T.RandSpatialCropSamplesd(keys="image", roi_size=CROP, num_samples=K, random_size=False),
    ])

    # one long-lived DataLoader (the file list repeated), so worker start-up is not timed;
    # each item is a list of K crops, so one volume per batch gives the same batch of 4 crops
    ds = Dataset([{"image": f} for f in files] * 100, transform=tf)
    return iter(DataLoader(ds, batch_size=BATCH // K, shuffle=True, num_workers=workers))


def _row(name: str, workers: int, r: dict) -> list:
    return [name, workers, f"{r['crops_s']:.1f}", f"{r['crops_cpu_s']:.1f}", f"{r['mb_s']:.0f}",
            f"{r['pss_mb']:.0f}", f"{r['rss_mb']:.0f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="phantoms (default 8)")
    ap.add_argument("--crops", type=int, default=160, help="crops timed per shard configuration (default 160)")
    ap.add_argument("--monai-crops", type=int, default=32, help="crops timed per MONAI configuration (default 48)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per configuration; medians reported (default 3)")
    ap.add_argument("--codecs", nargs="+", default=["npy", "zstd", "blosc2"])
    ap.add_argument("--out", default=".bench/loader")
    args = ap.parse_args(argv)

    from medssl import shards
    from medssl.shards.build import BuildConfig, build
    from medssl.shards.format import decode_sample
    from medssl.shards.synth import synth_dataset
    from medssl.shards.verify import iter_tar, load_index

    out = Path(args.out)
    raw = out / "raw"
    if not (raw / "dataset.json").exists():
        synth_dataset(raw, n=args.n, seed=0, modality="CT", fov_scale=1.0)
    files = sorted(str(p) for p in (raw / "imagesTr").glob("*.nii.gz"))
    nii_bytes = sum(os.path.getsize(f) for f in files)
    rows, results = [], {}
    for codec in args.codecs:
        d = out / f"shards_{codec}"
        if not (d / "index.json").exists():
            build(BuildConfig(inputs=[str(raw)], codec=codec, shard_size="256MB"), d, overwrite=True, progress=False)
        index = load_index(d)
        times = []
        for s in index["shards"]:
            for rawsample in iter_tar(d / s["name"], print):
                t = time.perf_counter()
                decode_sample(rawsample, check=True)
                times.append(time.perf_counter() - t)
        results[codec] = {"bytes": index["bytes"], "decode_ms": 1e3 * statistics.median(times)}
        for w in args.workers:
            loader = lambda: iter(shards.stream(d, crop_size=CROP, crops_per_volume=K, batch_size=BATCH,
                                                num_workers=w, flip_prob=0.5, rank=0, world_size=1))
            r = time_loader(loader, args.crops, args.repeat)
            # shard bytes read per second: each volume is read once per K crops
            r["mb_s"] = r["crops_s"] / K * index["bytes"] / index["samples"] / 1e6
            results[codec][f"w{w}"] = r
            rows.append(_row(f"shards ({codec})", w, r))
            print(rows[-1], flush=True)
    for w in args.workers:
        r = time_loader(lambda: monai_iter(files, w), args.monai_crops, args.repeat)
        r["mb_s"] = r["crops_s"] / K * nii_bytes / len(files) / 1e6
        results[f"monai_w{w}"] = r
        rows.append(_row("MONAI .nii.gz", w, r))
        print(rows[-1], flush=True)

    from medssl.shards.verify import table

    vol_mb = np.mean([results[c]["bytes"] for c in args.codecs if c == "npy"] or [0]) / args.n / 1e6
    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, python {platform.python_version()}")
    print(f"{args.n} CT phantoms, {len(files)} .nii.gz = {nii_bytes / 1e6:.1f} MB; stored int16 at 1.5 mm ~{vol_mb:.1f} MB/volume")
    print(table(["codec", "shard MB", "decode ms/volume (median)"],
                [[c, f"{results[c]['bytes'] / 1e6:.1f}", f"{results[c]['decode_ms']:.1f}"] for c in args.codecs]))
    print()
    print(table(["loader", "workers", "crops/s", "crops/CPU-s", "MB/s read", "peak PSS MB", "peak RSS MB"], rows))
    best = max(args.codecs, key=lambda c: results[c][f"w{args.workers[0]}"]["crops_s"])
    for w in args.workers:
        a, b = results[best][f"w{w}"], results[f"monai_w{w}"]
        print(f"shards ({best}) : MONAI with {w} worker(s): {a['crops_s'] / b['crops_s']:.1f}x crops/s, "
              f"{a['crops_cpu_s'] / b['crops_cpu_s']:.1f}x crops per CPU-second")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
