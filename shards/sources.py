"""Finding the volumes behind the inputs of ``python -m medssl.shards build``.

An input may be:

* an nnU-Net v2 or MSD raw dataset (a folder with ``dataset.json`` and ``imagesTr/``; labels from
  ``labelsTr/``; ``imagesTs/`` too with ``--include-test``);
* a CSV list with a header naming ``path``, ``modality`` and optionally ``label`` (paths relative to
  the CSV's folder; a path may be a NIfTI file or a DICOM series folder);
* a folder of NIfTI files (searched recursively; modality from ``--modality``);
* a folder of DICOM files (every series found below it; needs ``pip install 'medssl[dicom]'``);
* a single NIfTI file.

Each becomes a :class:`Source`; the list is sorted deterministically so the same inputs always give
the same shards. The modality comes from what the input declares: ``channel_names`` (or MSD's
``modality``) in ``dataset.json``, the CSV's ``modality`` column, the DICOM Modality tag, else the
``--modality`` option; where nothing declares it, ``Source.modality`` is ``None`` and the builder
decides from the intensities (CT only when they look like Hounsfield units).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .format import make_key, normalise_modality
from .preprocess import is_nifti_path


@dataclass
class Source:
    key: str
    images: list[str]  # one path per channel (NIfTI files or DICOM series folders)
    label: str | None
    modality: str | None  # "CT" or "MR"; None: not declared (decided from the intensities)
    dataset: str
    extra: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"key": self.key, "images": self.images, "label": self.label, "modality": self.modality}


def _strip_nifti(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.I)


def _declared(name: str | None) -> str | None:
    """A declared modality name as "CT"/"MR"; ``None`` when nothing declared one."""
    return normalise_modality(name) if name else None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti_path(p.name))


def from_nnunet(root: Path, include_test: bool = False, labels: bool = True) -> list[Source]:
    """nnU-Net v2 (``CASE_0000.nii.gz`` per channel) or MSD (``CASE.nii.gz``) raw dataset."""
    try:
        desc = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(root / "dataset.json", f"cannot read dataset.json ({exc})", "fix or regenerate it") from None
    channels = desc.get("channel_names") or desc.get("modality") or {}
    modality = normalise_modality(channels.get("0", next(iter(channels.values())))) if channels else None
    n_channels = len(channels) or None
    ending = desc.get("file_ending", ".nii.gz")
    name = root.name
    sources: list[Source] = []
    for split, lab_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = root / split
        if not folder.is_dir() or (split == "imagesTs" and not include_test):
            continue
        cases: dict[str, dict[int, Path]] = {}
        for f in sorted(folder.iterdir()):
            if not f.name.endswith(ending) or f.name.startswith("."):
                continue
            stem = f.name[: -len(ending)]
            m = re.match(r"^(.*)_(\d{4})$", stem)
            case, ch = (m.group(1), int(m.group(2))) if m else (stem, 0)
            cases.setdefault(case, {})[ch] = f
        for case, chans in sorted(cases.items()):
            images = [str(chans[c]) for c in sorted(chans)]  # a wrong channel count is reported by the builder
            label = None
            if labels and lab_dir and (root / lab_dir / f"{case}{ending}").exists():
                label = str(root / lab_dir / f"{case}{ending}")
            sources.append(
                Source(
                    make_key(name, case),
                    images,
                    label,
                    modality,
                    name,
                    {"expected_channels": n_channels, "split": split},
                )
            )
    return sources


def from_csv(path: Path, default_modality: str, labels: bool = True) -> list[Source]:
    """Rows of ``path,modality[,label]``; relative paths resolve against the CSV's folder."""
    base = path.parent
    sources = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise InputError(path, f"CSV header {reader.fieldnames} has no 'path' column", "add a header: path,modality,label")
        for i, row in enumerate(reader):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path"):
                continue
            img = Path(row["path"])
            img = img if img.is_absolute() else base / img
            lab = row.get("label") or None
            if lab and labels:
                lab = str(Path(lab) if Path(lab).is_absolute() else base / lab)
            else:
                lab = None
            modality = _declared(row.get("modality") or default_modality)
            case = _strip_nifti(img.name) or f"row{i}"
            sources.append(Source(make_key(path.stem, f"{i:06d}", case), [str(img)], lab, modality, path.stem))
    return sources


def from_folder(root: Path, default_modality: str) -> list[Source]:
    """Every NIfTI file below ``root`` (recursively); if there is none, every DICOM series below it."""
    files = _nifti_files(root)
    name = root.name
    if files:
        return [
            Source(make_key(name, str(f.relative_to(root).parent), _strip_nifti(f.name)), [str(f)], None,
                   _declared(default_modality), name)
            for f in files
        ]
    from . import dicom

    if not any(dicom.is_dicom_file(p) for p in root.rglob("*") if p.is_file()):
        return []
    if not dicom.pydicom_available():
        raise InputError(root, "folder holds DICOM files but pydicom is not installed", "pip install 'medssl[dicom]'",
                         code="dicom_unavailable")
    out = []
    for s in dicom.find_series(root):
        rel = s.folder.relative_to(root) if s.folder != root else Path("")
        out.append(
            Source(make_key(name, str(rel), s.uid[-12:]), [str(s.folder)], None,
                   _declared(s.modality or default_modality), name, {"dicom_uid": s.uid})
        )
    return out


def discover(inputs: list[str | Path], modality: str | None = None, include_test: bool = False,
             labels: bool = True) -> list[Source]:
    """All sources behind ``inputs``, in a deterministic order, with unique keys."""
    sources: list[Source] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise FileNotFoundError(f"input {inp} does not exist")
        if p.is_dir() and (p / "dataset.json").exists():
            found = from_nnunet(p, include_test=include_test, labels=labels)
        elif p.is_file() and p.suffix.lower() == ".csv":
            found = from_csv(p, modality, labels=labels)
        elif p.is_file() and is_nifti_path(p.name):
            found = [Source(make_key(_strip_nifti(p.name)), [str(p)], None, _declared(modality), p.parent.name)]
        elif p.is_dir():
            found = from_folder(p, modality)
        else:
            raise ValueError(f"input {inp}: not a dataset folder, NIfTI/DICOM folder, NIfTI file or CSV list")
        if not found:
            raise ValueError(f"input {inp}: no volumes found (looked for dataset.json, *.nii(.gz), DICOM files)")
        sources.extend(found)
    return unique_keys(sources)


def unique_keys(sources: list[Source]) -> list[Source]:
    """Make keys unique across the whole shard set, in place and deterministically.

    The first source with a key keeps it; a later one gets ``<key>-2``, ``-3``, … skipping every key
    that any source already holds or was given, so a renamed duplicate never lands on another
    source's key (``a.nii`` + ``a.nii.gz`` + ``a-2.nii.gz`` give ``a``, ``a-3``, ``a-2``)."""
    taken = {s.key for s in sources}
    seen: set[str] = set()
    for s in sources:
        if s.key in seen:
            n = 2
            while f"{s.key}-{n}" in taken:
                n += 1
            s.key = f"{s.key}-{n}"
            taken.add(s.key)
        seen.add(s.key)
    return sources
