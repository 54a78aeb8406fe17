"""Loader benchmark: 96³ crops per second from shards vs. the MONAI pipelines a user would pick.

Usage:  python bench/loader.py [--n 8] [--crops 160] [--workers 1 2] [--peers nii persistent cache] [--pool]
        [--out .bench/loader]

What it does, in one run on one machine:
1. synthesises ``--n`` full-size CT phantoms (fov_scale 1: ~0.6–1.0 mm in-plane, 1.5–5 mm slices);
2. builds them into shards with each codec (npy, zstd, blosc2): bytes on disk, median decode ms/volume;
3. streams 96³ crops (4 per decoded volume, batch 4, training mode with flips) with 1 and 2 workers;
4. runs MONAI on the same .nii.gz files with the deterministic transforms of the official Hi-End-MAE/MambaMIM/
   SwinUNETR code — LoadImaged → EnsureChannelFirstd → Orientationd(RAS) → Spacingd(1.5) →
   ScaleIntensityRanged(-175..250 → 0..1) → SpatialPadd(96³) — then the random part, RandSpatialCropSamplesd
   (96³, 4 per volume) and RandFlipd on each axis (p 0.5, as the shards' flips), through a torch DataLoader with
   the same workers and batch, three ways (``--peers``):
   ``nii``        plain ``Dataset``: every transform on every read (what the official scripts run);
   ``persistent`` ``PersistentDataset``: the deterministic part cached on disk (float32 ``.pt`` files), built once
                  before timing;
   ``cache``      ``CacheDataset``: the deterministic part cached in RAM (cache_rate 1), built before timing;
5. prints a table (crops/s, crops per CPU-second of the main process and its workers — the per-core
   figure —, MB/s and bytes per crop read from the source or cache, resident/cache bytes per volume, peak PSS/RSS
   of the loader processes) and the ratios. Paste it into BENCHMARKS.md.

Labels are not read on either side (pretraining reads images only).
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
    """Median over ``repeat`` timed runs of crops/s and crops per CPU-second (worker start-up excluded), then one
    more run for the peak memory: the memory sampler reads /proc/*/smaps, which costs CPU, so it never runs while
    the clock does."""
    runs = [_time_once(make_iter, n_crops) for _ in range(repeat)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    with PeakMemory() as mem:
        _time_once(make_iter, n_crops)
    return out | {"pss_mb": mem.peak / 1e6, "rss_mb": mem.peak_rss / 1e6}


def _time_once(make_iter, n_crops: int) -> dict:
    it = make_iter()
    first = next(it)
    got, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    while got < n_crops:
        batch = next(it)
        got += batch["image"].shape[0] if isinstance(batch, dict) else len(batch)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del it, first, batch
    return {"crops_s": got / dt, "crops_cpu_s": got / cpu}


def monai_transforms():
    """The deterministic (cacheable) and random parts of the MONAI pipeline."""
    from monai import transforms as T

    det = T.Compose([
        T.LoadImaged(keys="image"),
        T.EnsureChannelFirstd(keys="image"),
        T.Orientationd(keys="image", axcodes="RAS"),
        T.Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        T.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        T.SpatialPadd(keys="image", spatial_size=CROP),
    ])
    rand = T.Compose([
        T.RandSpatialCropSamplesd(keys="image", roi_size=CROP, num_samples=K, random_size=False),
        *[T.RandFlipd(keys="image", prob=0.5, spatial_axis=a) for a in range(3)],
    ])
    return det, rand


def monai_dataset(files: list[str], kind: str, cache_dir: Path):
    """``kind`` nii | persistent | cache; the cache is built here, before anything is timed."""
    from monai import transforms as T
    from monai.data import CacheDataset, Dataset, PersistentDataset

    det, rand = monai_transforms()
    data = [{"image": f} for f in files]
    if kind == "nii":
        return Dataset(data, transform=T.Compose([det, rand]))
    if kind == "persistent":
        ds = PersistentDataset(data, transform=T.Compose([*det.transforms, *rand.transforms]), cache_dir=str(cache_dir))
        for i in range(len(ds)):  # fill the disk cache
            ds[i]
        return ds
    return CacheDataset(data, transform=T.Compose([*det.transforms, *rand.transforms]), cache_rate=1.0,
                        num_workers=1, progress=False)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, ds, times: int):
        self.ds, self.times = ds, times

    def __len__(self):
        return len(self.ds) * self.times

    def __getitem__(self, i):
        return self.ds[i % len(self.ds)]


def monai_iter(ds, workers: int):
    from monai.data import DataLoader

    # one long-lived DataLoader (the volumes repeated), so worker start-up is not timed;
    # each item is a list of K crops, so one volume per batch gives the same batch of 4 crops
    return iter(DataLoader(_Repeat(ds, 100), batch_size=BATCH // K, shuffle=True, num_workers=workers))


def _row(name: str, workers: int, r: dict) -> list:
    return [name, workers, f"{r['crops_s']:.1f}", f"{r['crops_cpu_s']:.1f}", f"{r['mb_s']:.0f}",
            f"{r['mb_crop']:.2f}", f"{r['mb_vol']:.1f}", f"{r['pss_mb']:.0f}", f"{r['rss_mb']:.0f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="phantoms (default 8)")
    ap.add_argument("--crops", type=int, default=160, help="crops timed per shard configuration (default 160)")
    ap.add_argument("--monai-crops", type=int, default=32, help="crops timed per MONAI configuration (default 48)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per configuration; medians reported (default 3)")
    ap.add_argument("--codecs", nargs="+", default=["npy", "zstd", "blosc2"])
    ap.add_argument("--peers", nargs="*", default=["nii", "persistent", "cache"], choices=["nii", "persistent", "cache"],
                    help="MONAI pipelines to compare with (default all three; none: the shards only)")
    ap.add_argument("--fresh-buffers", action="store_true",
                    help="the stream without its reusable shared batch buffers (StreamConfig.reuse_buffers=False)")
    ap.add_argument("--pool", action="store_true",
                    help="also time the device pool (shards/pool.py) on CPU tensors: workers decode whole volumes, the "
                         "main process cuts, windows and flips the crops (on a GPU run it does that on the device)")
    ap.add_argument("--pool-budget", default="2GiB", help="the device pool's size in these rows (default 2GiB)")
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
                                                num_workers=w, flip_prob=0.5, labels=False,
                                                reuse_buffers=not args.fresh_buffers, rank=0, world_size=1))
            r = time_loader(loader, args.crops, args.repeat)
            # shard bytes read per second: each volume is read once per K crops
            r["mb_vol"] = index["bytes"] / index["samples"] / 1e6
            r["mb_crop"] = r["mb_vol"] / K
            r["mb_s"] = r["crops_s"] * r["mb_crop"]
            results[codec][f"w{w}"] = r
            rows.append(_row(f"shards ({codec}{', fresh buffers' if args.fresh_buffers else ''})", w, r))
            print(rows[-1], flush=True)
        for w in args.workers if args.pool else []:
            from medssl.shards.pool import DevicePool

            cfg = shards.StreamConfig(crop_size=CROP, crops_per_volume=K, batch_size=BATCH, num_workers=w,
                                      flip_prob=0.5, labels=False)
            r = time_loader(lambda: iter(DevicePool(d, cfg, device="cpu", budget=args.pool_budget, rank=0,
                                                    world_size=1)), args.crops, args.repeat)
            r["mb_vol"] = index["bytes"] / index["samples"] / 1e6
            r["mb_crop"] = r["mb_vol"] / K  # one volume decoded per K crops, as the refresh keeps it
            r["mb_s"] = r["crops_s"] * r["mb_crop"]
            results[codec][f"pool_w{w}"] = r
            rows.append(_row(f"device pool on CPU ({codec}, {args.pool_budget})", w, r))
            print(rows[-1], flush=True)
    names = {"nii": "MONAI .nii.gz", "persistent": "MONAI PersistentDataset", "cache": "MONAI CacheDataset"}
    for kind in args.peers:
        cache_dir = out / "monai_persistent"
        ds = monai_dataset(files, kind, cache_dir)
        if kind == "nii":
            vol_mb = nii_bytes / len(files) / 1e6  # read from disk on every visit
        elif kind == "persistent":
            vol_mb = sum(p.stat().st_size for p in cache_dir.glob("*.pt")) / len(files) / 1e6
        else:  # resident float32 arrays, what every visit reads from RAM
            vol_mb = sum(ds._cache[i]["image"].numel() * ds._cache[i]["image"].element_size()
                         for i in range(len(files))) / len(files) / 1e6
        for w in args.workers:
            r = time_loader(lambda: monai_iter(ds, w), args.crops if kind != "nii" else args.monai_crops, args.repeat)
            r["mb_vol"], r["mb_crop"] = vol_mb, vol_mb / K
            r["mb_s"] = r["crops_s"] * r["mb_crop"]
            results[f"monai_{kind}_w{w}"] = r
            rows.append(_row(names[kind], w, r))
            print(rows[-1], flush=True)

    from medssl.shards.verify import table

    stored = (f"; stored int16 at 1.5 mm ~{results['npy']['bytes'] / args.n / 1e6:.1f} MB/volume"
              if "npy" in results else "")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, python {platform.python_version()}")
    print(f"{args.n} CT phantoms, {len(files)} .nii.gz = {nii_bytes / 1e6:.1f} MB{stored}")
    print(table(["codec", "shard MB", "decode ms/volume (median)"],
                [[c, f"{results[c]['bytes'] / 1e6:.1f}", f"{results[c]['decode_ms']:.1f}"] for c in args.codecs]))
    print()
    print(table(["loader", "workers", "crops/s", "crops/CPU-s", "MB/s read", "MB read per crop", "MB stored per volume",
                 "peak PSS MB", "peak RSS MB"], rows))
    best = max(args.codecs, key=lambda c: results[c][f"w{args.workers[0]}"]["crops_s"])
    for kind in args.peers:
        for w in args.workers:
            a, b = results[best][f"w{w}"], results[f"monai_{kind}_w{w}"]
            print(f"shards ({best}) : {names[kind]} with {w} worker(s): {a['crops_s'] / b['crops_s']:.2f}x crops/s, "
                  f"{a['crops_cpu_s'] / b['crops_cpu_s']:.2f}x crops per CPU-second, "
                  f"{b['mb_crop'] / a['mb_crop']:.1f}x fewer bytes per crop")
    for w in args.workers if args.pool else []:
        a, b = results[best][f"pool_w{w}"], results[best][f"w{w}"]
        print(f"device pool on CPU : shards ({best}) with {w} worker(s): {a['crops_s'] / b['crops_s']:.2f}x crops/s, "
              f"{a['crops_cpu_s'] / b['crops_cpu_s']:.2f}x crops per CPU-second")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
