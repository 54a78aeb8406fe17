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
5. prints a table (crops/s, crops/s per worker, MB/s of shard bytes read, peak RSS of the loader
   processes) and the ratio shards : MONAI per worker. Paste it into BENCHMARKS.md.
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


class PeakRSS:
    """Samples the RSS of this process and its children (DataLoader workers) every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def time_loader(make_iter, n_crops: int) -> tuple[float, int]:
    """crops/s after the first batch (worker start-up excluded), and peak RSS in bytes."""
    with PeakRSS() as rss:
        it = make_iter()
        first = next(it)
        got, t0 = 0, time.perf_counter()
        while got < n_crops:
            batch = next(it)
            got += batch["image"].shape[0] if isinstance(batch, dict) else len(batch)
        dt = time.perf_counter() - t0
        del it, first
    return got / dt, rss.peak


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

    def forever():
        while True:
            ds = Dataset([{"image": f} for f in files], transform=tf)
            # each item is a list of K crops; batch 1 volume = K crops = the batch of 4
            dl = DataLoader(ds, batch_size=BATCH // K, shuffle=True, num_workers=workers)
            yield from dl

    return forever()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="phantoms (default 8)")
    ap.add_argument("--crops", type=int, default=160, help="crops timed per shard configuration (default 160)")
    ap.add_argument("--monai-crops", type=int, default=48, help="crops timed per MONAI configuration (default 48)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--codecs", nargs="+", default=["npy", "zstd", "blosc2"])
    ap.add_argument("--out", default=".bench/loader")
    args = ap.parse_args(argv)

    import shards
    from shards.build import BuildConfig, build
    from shards.format import decode_sample
    from shards.synth import synth_dataset
    from shards.verify import iter_tar, load_index

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
            cps, peak = time_loader(loader, args.crops)
            # shard bytes read per second: each volume is read once per K crops
            mbps = cps / K * index["bytes"] / index["samples"] / 1e6
            results[codec][f"w{w}"] = {"crops_s": cps, "peak_rss_mb": peak / 1e6, "mb_s": mbps}
            rows.append([f"shards ({codec})", w, f"{cps:.1f}", f"{cps / w:.1f}", f"{mbps:.0f}", f"{peak / 1e6:.0f}"])
            print(rows[-1], flush=True)
    for w in args.workers:
        cps, peak = time_loader(lambda: monai_iter(files, w), args.monai_crops)
        mbps = cps / K * nii_bytes / len(files) / 1e6
        results[f"monai_w{w}"] = {"crops_s": cps, "peak_rss_mb": peak / 1e6, "mb_s": mbps}
        rows.append(["MONAI .nii.gz", w, f"{cps:.1f}", f"{cps / w:.1f}", f"{mbps:.1f}", f"{peak / 1e6:.0f}"])
        print(rows[-1], flush=True)

    from shards.verify import table

    vol_mb = np.mean([results[c]["bytes"] for c in args.codecs if c == "npy"] or [0]) / args.n / 1e6
    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, python {platform.python_version()}")
    print(f"{args.n} CT phantoms, {len(files)} .nii.gz = {nii_bytes / 1e6:.1f} MB; stored int16 at 1.5 mm ~{vol_mb:.1f} MB/volume")
    print(table(["codec", "shard MB", "decode ms/volume (median)"],
                [[c, f"{results[c]['bytes'] / 1e6:.1f}", f"{results[c]['decode_ms']:.1f}"] for c in args.codecs]))
    print()
    print(table(["loader", "workers", "crops/s", "crops/s/worker", "MB/s read", "peak RSS MB"], rows, right={1, 2, 3, 4, 5}))
    best = max(args.codecs, key=lambda c: results[c][f"w{args.workers[0]}"]["crops_s"])
    for w in args.workers:
        ratio = results[best][f"w{w}"]["crops_s"] / results[f"monai_w{w}"]["crops_s"]
        print(f"ratio shards ({best}) : MONAI with {w} worker(s) = {ratio:.1f}x")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
