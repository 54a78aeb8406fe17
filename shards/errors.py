"""Errors raised for bad input volumes, and the closed set of reasons a build may give for skipping one.

A builder never lets one broken volume stop a job over thousands: each problem becomes an
``InputError`` that names the file, a reason from :data:`REASONS`, a message for people and what the
user can do about it; the build writes it to ``errors.jsonl`` (``file``, ``reason``, ``message``,
``fix``), skips the volume, and goes on. Anything else that escapes while preparing a volume is a bug
of ours, recorded as ``internal_error``.
"""

from __future__ import annotations

from pathlib import Path

RECOPY = "re-copy the file from its source (it was damaged in storage or transfer) or re-export it"
REEXPORT = "re-export the volume with a standard tool (dcm2niix, nibabel, ITK/SimpleITK) or remove it from the input"

# reason code -> the fix shown when the raising code has no more specific one
REASONS: dict[str, str] = {
    # files
    "missing": "check the path in the input list",
    "empty": "re-export the volume or remove it from the input",
    "unreadable": "check that the file is readable (permissions, a disk or network error) and try again",
    "not_nifti": "re-export it as NIfTI-1/2 (.nii or .nii.gz) or remove it from the input",
    "truncated": RECOPY,
    "crc_mismatch": RECOPY + " (gzip -t FILE tests a copy)",
    "corrupt_gzip": RECOPY + " (gzip -t FILE tests a copy)",
    "size_mismatch": RECOPY + "; if the file is intact, its header's dims or datatype are wrong: " + REEXPORT,
    # headers and geometry
    "bad_header": REEXPORT,
    "unsupported_dtype": "convert the voxels to an integer or float type (e.g. nibabel: img.set_data_dtype('int16'))",
    "bad_spacing": "fix the voxel sizes in the header (pixdim / sform, in mm) or re-export the volume",
    "bad_affine": "fix the header's qform/sform (a finite, invertible orientation) or re-export the volume",
    "not_3d": "pass 3D volumes only (one file per volume, at least 2 voxels along each axis)",
    "too_large": "raise --max-voxels if the machine has the memory, or check the volume's spacing",
    "non_finite": "repair the export (or fill the NaN/inf voxels) and rebuild",
    # cases
    "channel_mismatch": "give every channel of a case its own file on one grid (same shape and affine)",
    "label_mismatch": "pair each image with the label drawn on it, on the same grid, holding class indices 0..255",
    "modality_mismatch": "declare the modality: --modality MR or CT, a 'modality' CSV column, channel_names",
    # DICOM
    "dicom_unavailable": "pip install 'medssl[dicom]'",
    "dicom_series": "point the input at one series folder, or at the parent to take every series",
    "dicom_unreadable": "remove or replace the file; if it was a slice, re-export the complete series",
    "dicom_bad_tag": "re-export the series with its geometry and rescale tags (scouts, screenshots and "
                     "secondary captures have none: remove them from the input)",
    "dicom_mixed_geometry": "split the series (e.g. remove localizer/scout images) or re-export it",
    "dicom_missing_slice": "re-export the complete series or remove it from the input",
    "dicom_duplicate_slice": "split several acquisitions (echoes, phases, copies) into separate folders",
    "dicom_uneven_spacing": "convert it with a tool that resamples variable spacing (dcm2niix) and pass the NIfTI",
    "dicom_multiframe": "convert the series with dcm2niix and pass the NIfTI, or export it as one file per slice",
    "dicom_colour": "remove colour (RGB) images from the input",
    "dicom_compressed": "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm), "
                        "or decompress the files first (gdcmconv --raw, dcmdjpeg)",
    "dicom_pixels": "re-export the complete series or remove it from the input",
    # the machine and us
    "out_of_memory": "lower --max-voxels so that volumes this large are skipped, or run fewer --workers "
                     "(each worker holds one volume in memory)",
    "internal_error": "please report it (medssl issue tracker) with this errors.jsonl record and the file's header",
    # checks of command-line input and dataset descriptions (not of one volume)
    "bad_input": "",
}


class InputError(Exception):
    """One source volume (or image/label pair, or command-line input) that cannot be used.

    ``code`` is one of :data:`REASONS`; ``message`` says what is wrong for people; ``fix`` says what to
    do (the code's default when the raiser has nothing more specific). ``reason`` is the message under
    its older name, kept for callers that re-raise it.
    """

    def __init__(self, path: str | Path, message: str, fix: str = "", *, code: str = "bad_input"):
        if code not in REASONS:
            raise ValueError(f"unknown InputError code {code!r}; add it to shards.errors.REASONS")
        self.path = str(path)
        self.code = code
        self.message = message
        self.fix = fix or REASONS[code]
        text = f"{self.path}: {message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        super().__init__(text)

    def __reduce__(self):  # survives a trip through a process pool (keyword-only ``code``)
        return _restore, (self.path, self.message, self.fix, self.code)

    @property
    def reason(self) -> str:
        return self.message

    def to_record(self) -> dict:
        return {"file": self.path, "reason": self.code, "message": self.message, "fix": self.fix}


def _restore(path: str, message: str, fix: str, code: str) -> InputError:
    return InputError(path, message, fix, code=code)
