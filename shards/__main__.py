"""``python -m medssl.shards``: synthesise demo data, build shards, verify them, describe them."""

from __future__ import annotations

import argparse
import math
import sys

from .build import DEFAULT_CODEC
from .format import CODECS
from .preprocess import DEFAULT_MAX_VOXELS


def _voxel_count(text: str) -> int:
    """``1e9``, ``2000000000``, ``500M``, ``2G`` → a positive whole number of voxels."""
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of voxels (e.g. 1e9 or 500M)")
    return int(value)


def _build_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="turn NIfTI/DICOM datasets into webdataset shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Preprocess volumes once — reorient to RAS, resample, optionally crop to the body, store CT as int16 HU
and MRI as float16, labels as uint8 — and write them into webdataset tar shards with an index.json
(sample counts, bytes, sha256, build config). Volumes that cannot be read are listed in errors.jsonl
with the reason (a code such as crc_mismatch, bad_header, too_large), the message and the fix, and skipped.
Re-running the same command after an interruption keeps finished shards.

INPUT may be an nnU-Net v2 / MSD raw dataset folder (dataset.json + imagesTr/ [+ labelsTr/]),
a CSV list with a header 'path,modality[,label]', a folder of NIfTI files, a folder of DICOM series
(needs: pip install 'medssl[dicom]'), or one NIfTI file.""",
        epilog="example: python -m medssl.shards build data/Dataset001_Liver ct_list.csv --out shards/ct --spacing 1.5",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="datasets, folders, CSV lists or files")
    p.add_argument("--out", required=True, help="output folder for the shards (created)")
    p.add_argument("--spacing", default="1.5",
                   help="target voxel spacing in mm: one value (isotropic), 'x,y,z', or 'native' (default 1.5)")
    p.add_argument("--codec", default=DEFAULT_CODEC, choices=CODECS,
                   help=f"voxel payload: blosc2 (smallest, fastest to train, see BENCHMARKS.md), npy (raw) or zstd "
                        f"(default {DEFAULT_CODEC})")
    p.add_argument("--shard-size", default="512MB", help="target shard size, e.g. 256MB, 1GB (default 512MB)")
    p.add_argument("--crop-body", action="store_true", help="crop each volume to the body's bounding box")
    p.add_argument("--modality", default=None, choices=["CT", "MR"],
                   help="modality of plain NIfTI/DICOM folders and files (datasets and CSV lists name their own; "
                        "DICOM has a Modality tag). Without it, volumes are stored as CT only when their "
                        "intensities look like Hounsfield units; otherwise the build stops and asks for it")
    p.add_argument("--include-test", action="store_true", help="also take imagesTs/ of nnU-Net/MSD datasets")
    p.add_argument("--no-labels", action="store_true", help="leave labels out even where they exist")
    p.add_argument("--max-voxels", type=_voxel_count, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help="skip (errors.jsonl: too_large) a volume with more voxels than N, stored or after resampling "
                        "to --spacing, before it is read; a worker needs about 40 bytes per voxel "
                        f"(default {DEFAULT_MAX_VOXELS:,})")
    p.add_argument("--workers", type=int, default=None, help="preprocessing processes (default: cores, at most 8)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any volume was skipped")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier build in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        from .build import main

        return main(args)

    p.set_defaults(func=run)


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check checksums, decode every sample, compare counts with index.json",
                       description="Recompute every shard's sha256, decode every sample (checking each voxel "
                                   "member's CRC-32, shape and dtype) and compare counts and keys with index.json. "
                                   "Exits 1 if anything is wrong.")
    p.add_argument("dir", help="a shard set (folder with index.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        from .verify import verify, verify_table

        try:
            reports = verify(args.dir, progress=not args.quiet)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(verify_table(reports))
        bad = [r for r in reports if r.problems]
        n = sum(r.found for r in reports if r.name != "samples.jsonl")
        print(f"{'FAILED' if bad else 'OK'}: {n} samples in {len(reports)} shard(s) checked"
              + (f", {len(bad)} with problems" if bad else ""))
        return 1 if bad else 0

    p.set_defaults(func=run)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="volumes, modalities, channels, spacing and size distributions, bytes",
                       description="Describe a shard set from its index.json and samples.jsonl.")
    p.add_argument("dir", help="a shard set (folder with index.json)")

    def run(args):
        from .verify import info

        try:
            print(info(args.dir))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    p.set_defaults(func=run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medssl.shards",
        description="medssl shards: NIfTI/DICOM datasets -> verified webdataset shards -> 3D crops for every rank.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import demo, synth

    synth.register_cli(sub)
    demo.register_cli(sub)
    _build_parser(sub)
    _verify_parser(sub)
    _info_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
