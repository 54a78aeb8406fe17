"""DICOM series loading, checked against references computed by hand from the DICOM tags.

Every series here is written with pydicom by the tests (CT Image Storage, explicit VR little endian,
RescaleIntercept -1024), with shuffled file names so that file order is never slice order. The raw
value of voxel (slice s, row r, column c) is ``1000 * s + 10 * r + c``, so any voxel says where it came from.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from medssl.shards import dicom  # noqa: E402
from medssl.shards.errors import InputError  # noqa: E402

ROWS, COLS = 6, 5
AXIAL = (1, 0, 0, 0, 1, 0)


def raw_slice(s: int) -> np.ndarray:
    r, c = np.mgrid[:ROWS, :COLS]
    return (1000 * s + 10 * r + c).astype(np.uint16)


def make_slice(pos, iop=AXIAL, spacing=(0.8, 0.7), series_uid="1.2.3.4", pixels=None, rows=ROWS,
               description="test series"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series_uid, description
    ds.StudyInstanceUID = "1.2.3"
    if pos is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [f"{v:.4f}" for v in spacing]
    ds.SliceThickness = "9.9"  # deliberately wrong: spacing must come from positions
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    pix = raw_slice(0)[:rows] if pixels is None else pixels
    ds.Rows, ds.Columns = pix.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pix.tobytes()
    return ds


def unit_vectors(iop):
    iop = np.array([float(f"{v:.6f}") for v in iop])
    return iop[:3], iop[3:], np.cross(iop[:3], iop[3:])


def write_series(folder, n=7, iop=AXIAL, origin=(-20.0, 35.5, 100.0), step=2.5, spacing=(0.8, 0.7),
                 series_uid="1.2.3.4", skip=(), seed=0, description="test series"):
    """Slice s at origin + s * step * normal (step < 0: stored in decreasing position); returns the
    LPS position of every written slice s as read back from its tags."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = unit_vectors(iop)[2]
    slices = [s for s in range(n) if s not in skip]
    names = [f"IM{x:05d}.dcm" for x in random.Random(seed).sample(range(10**5), len(slices))]
    if len(slices) > 2:
        assert names != sorted(names) and names != sorted(names, reverse=True)  # file order != slice order
    positions = {}
    for s, name in zip(slices, names):
        pos = np.asarray(origin) + s * step * normal
        ds = make_slice(pos, iop, spacing, series_uid, raw_slice(s), description=description)
        ds.InstanceNumber = s + 1
        ds.save_as(folder / name, enforce_file_format=True)
        positions[s] = np.array([float(v) for v in ds.ImagePositionPatient])
    return positions


def lps_to_ras(p):
    return np.asarray(p) * [-1, -1, 1]


def check_against_tags(vol, affine, positions, iop, spacing=(0.8, 0.7)):
    """Naive reference: for sample pixels of every slice, the DICOM formula
    P = IPP + c * PixelSpacing[1] * row_dir + r * PixelSpacing[0] * col_dir (LPS), negated to RAS, must be
    where the affine puts the voxel holding that pixel's HU value."""
    row, col, _ = unit_vectors(iop)
    inv = np.linalg.inv(affine)
    for s, ipp in positions.items():
        for r, c in [(0, 0), (ROWS - 1, 0), (0, COLS - 1), (3, 2)]:
            world = lps_to_ras(ipp + c * spacing[1] * row + r * spacing[0] * col)
            ijk = (inv @ np.append(world, 1))[:3]
            assert np.allclose(ijk, np.round(ijk), atol=1e-3), (s, r, c, ijk)
            i, j, k = np.round(ijk).astype(int)
            assert (i, j) == (c, r)
            assert vol[i, j, k] == 1000 * s + 10 * r + c - 1024  # raw * slope + intercept


def test_axial_hu_and_affine(tmp_path):
    positions = write_series(tmp_path / "ct")
    (series,) = dicom.find_series(tmp_path)
    vol, affine = dicom.load_series(series)
    assert vol.dtype == np.float32 and vol.shape == (COLS, ROWS, 7) and affine.dtype == np.float64
    check_against_tags(vol, affine, positions, AXIAL)
    expected = np.array([[-0.7, 0, 0, 20.0], [0, -0.8, 0, -35.5], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    assert np.allclose(affine, expected)


def test_decreasing_z_is_sorted_by_position(tmp_path):
    positions = write_series(tmp_path / "ct", step=-3.0, seed=1)
    vol, affine = dicom.load_series(dicom.find_series(tmp_path)[0])
    check_against_tags(vol, affine, positions, AXIAL)
    assert affine[2, 2] == pytest.approx(3.0)  # k runs up the normal: slice 6 (lowest z) is k = 0
    assert affine[2, 3] == pytest.approx(100.0 - 6 * 3.0)
    assert vol[0, 0, 0] == 6000 - 1024


def test_gantry_tilt_kept_as_shear(tmp_path):
    positions = {}
    for s in range(4):  # tilted CT: each slice also shifts 0.4 mm along y
        ds = make_slice((5.0, 0.4 * s, 2.5 * s), pixels=raw_slice(s))
        ds.save_as(tmp_path / f"{(3 * s) % 4}.dcm", enforce_file_format=True)
        positions[s] = np.array([5.0, 0.4 * s, 2.5 * s])
    vol, affine = dicom.load_series(dicom.find_series(tmp_path)[0])
    check_against_tags(vol, affine, positions, AXIAL)
    assert np.allclose(affine[:3, 2], [0, -0.4, 2.5])


def oblique_iop():
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rz @ rx
    return tuple(rot[:, 0]) + tuple(rot[:, 1])


def test_oblique_affine(tmp_path):
    iop = oblique_iop()
    positions = write_series(tmp_path / "obl", n=5, iop=iop, step=-1.25, spacing=(0.9, 0.6), seed=2)
    vol, affine = dicom.load_series(dicom.find_series(tmp_path)[0])
    check_against_tags(vol, affine, positions, iop, spacing=(0.9, 0.6))
    row, col, normal = unit_vectors(iop)
    assert np.allclose(affine[:3, 0], lps_to_ras(row) * 0.6, atol=1e-5)
    assert np.allclose(affine[:3, 1], lps_to_ras(col) * 0.9, atol=1e-5)
    assert np.allclose(affine[:3, 2], lps_to_ras(normal) * 1.25, atol=1e-4)


def test_matches_nibabel_canonical(tmp_path):
    """A bright marker at a known LPS point lands, after as_closest_canonical, on the RAS voxel whose
    world coordinate is that point with x and y negated."""
    nib = pytest.importorskip("nibabel")
    coronal = (1, 0, 0, 0, 0, -1)  # i: L, j: feet-wards, k (normal): P -- every axis flips or moves
    folder = tmp_path / "cor"
    folder.mkdir()
    normal = unit_vectors(coronal)[2]
    marker_s, marker_r, marker_c = 2, 4, 1
    for s in range(5):
        pos = np.array([-10.0, 50.0, 80.0]) + s * 2.0 * normal
        pix = raw_slice(0) * 0
        if s == marker_s:
            pix[marker_r, marker_c] = 3000
            marker_lps = pos + marker_c * 0.7 * np.array([1, 0, 0]) + marker_r * 0.8 * np.array([0, 0, -1])
        make_slice(pos, coronal, pixels=pix).save_as(folder / f"{(7 * s) % 5}.dcm", enforce_file_format=True)
    vol, affine = dicom.load_series(dicom.find_series(folder)[0])
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))
    assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
    data = np.asarray(canon.dataobj)
    idx = np.unravel_index(np.argmax(data), data.shape)
    assert data[idx] == 3000 - 1024
    assert np.allclose(canon.affine @ np.append(idx, 1), np.append(lps_to_ras(marker_lps), 1))


def test_find_series_separates_and_is_deterministic(tmp_path):
    write_series(tmp_path / "a", n=3, series_uid="1.2.9", description="late", seed=3)
    write_series(tmp_path / "a", n=4, series_uid="1.2.10", description="early", seed=4)
    write_series(tmp_path / "b" / "c", n=2, series_uid="1.2.1", seed=5)
    (tmp_path / "a" / "notes.txt").write_text("not dicom")
    (tmp_path / "a" / "._IM000.dcm").write_bytes(b"\0" * 4096)  # macOS resource fork: ignored
    found = dicom.find_series(tmp_path)
    assert [(s.folder.relative_to(tmp_path).as_posix(), s.uid, len(s.files)) for s in found] == [
        ("a", "1.2.10", 4), ("a", "1.2.9", 3), ("b/c", "1.2.1", 2)]
    assert [s.description for s in found] == ["early", "late", "test series"]
    assert all(s.modality == "CT" and not s.problems and s.files == sorted(s.files) for s in found)
    assert dicom.find_series(tmp_path) == found
    assert [dicom.load_series(s)[0].shape[2] for s in found] == [4, 3, 2]


def test_is_dicom_file(tmp_path):
    write_series(tmp_path, n=2)
    (tmp_path / "x.txt").write_text("hello")
    flags = {p.suffix: dicom.is_dicom_file(p) for p in tmp_path.iterdir()}
    assert flags == {".dcm": True, ".txt": False}
    assert not dicom.is_dicom_file(tmp_path / "missing.dcm")


def load_error(folder) -> InputError:
    (series,) = dicom.find_series(folder)
    with pytest.raises(InputError) as info:
        dicom.load_series(series)
    assert info.value.path == str(series.folder) and info.value.fix
    return info.value


def test_missing_slice(tmp_path):
    write_series(tmp_path, n=8, step=2.5, skip=(4,))
    err = load_error(tmp_path)
    assert "missing slice" in err.reason and "gap" in err.reason and err.code == "dicom_missing_slice"
    assert "107.50..112.50" in err.reason and "2.500 mm" in err.reason  # gap position and spacing


def test_single_slice(tmp_path):
    write_series(tmp_path, n=1)
    err = load_error(tmp_path)
    assert "only one slice: not a 3D volume" in err.reason and err.code == "not_3d"


def test_uneven_spacing(tmp_path):
    for s, z in enumerate([0, 2, 4, 6.6, 8.6]):
        make_slice((0, 0, z), pixels=raw_slice(s)).save_as(tmp_path / f"{s}.dcm", enforce_file_format=True)
    err = load_error(tmp_path)
    assert "uneven slice spacing" in err.reason and err.code == "dicom_uneven_spacing"


def test_corrupt_file_reported_by_load_series(tmp_path):
    write_series(tmp_path / "ct", n=4)
    (tmp_path / "ct" / "zz_broken.dcm").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "only.dcm").write_bytes(b"garbage" * 50)
    found = dicom.find_series(tmp_path)  # one bad file never stops the discovery of the others
    assert [(s.folder.name, len(s.files), len(s.problems)) for s in found] == [("ct", 4, 1), ("junk", 0, 1)]
    for s, name in zip(found, ["zz_broken.dcm", "only.dcm"]):
        with pytest.raises(InputError, match=name) as info:
            dicom.load_series(s)
        assert "not a readable DICOM file" in info.value.reason and info.value.path == str(s.folder)
        assert info.value.code == "dicom_unreadable"


def test_non_image_objects_are_skipped_but_a_slice_without_rows_is_reported(tmp_path):
    from pydicom.uid import BasicTextSRStorage

    write_series(tmp_path, n=4)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    report.Modality, report.SeriesInstanceUID, report.StudyInstanceUID = "SR", "1.2.3.99", "1.2.3"
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    (series,) = dicom.find_series(tmp_path)  # the report is a series of its own, without Rows: skipped
    assert len(series.files) == 4 and not series.problems
    first = series.files[0]
    blob = first.read_bytes()
    at = blob.index(b"\x20\x00\x0e\x00UI")  # (0020,000E) SeriesInstanceUID: cut the file right after it
    first.write_bytes(blob[:at + 8 + int.from_bytes(blob[at + 6:at + 8], "little")])
    (series,) = dicom.find_series(tmp_path)  # a slice of this series without Rows: damaged, never dropped
    assert len(series.files) == 3 and [p.name for p, _ in series.problems] == [first.name]
    err = load_error(tmp_path)
    assert err.code == "dicom_unreadable" and first.name in err.reason and "no Rows" in err.reason


@pytest.mark.parametrize("case, message, code", [
    ("orientation", "ImageOrientationPatient", "dicom_mixed_geometry"),
    ("size", "Rows/Columns", "dicom_mixed_geometry"),
    ("spacing", "PixelSpacing", "dicom_mixed_geometry"),
    ("duplicate", "duplicate slice position", "dicom_duplicate_slice"),
    ("no_position", "missing or invalid ImagePositionPatient", "dicom_bad_tag"),
    ("no_orientation", "missing or invalid ImageOrientationPatient", "dicom_bad_tag"),
    ("multiframe", "multi-frame (enhanced) DICOM is not supported yet", "dicom_multiframe"),
    ("compressed", "compressed pixel data", "dicom_compressed"),
    ("truncated", "pixel data cannot be read", "dicom_pixels"),
])
def test_inconsistent_or_broken_slices(tmp_path, case, message, code):
    write_series(tmp_path, n=4)
    pos, iop, spacing, pixels = (0.0, 0.0, 300.0), AXIAL, (0.8, 0.7), None
    if case in ("compressed", "truncated"):  # pixels are decoded after the geometry passed: a fifth slice in line
        pos = (-20.0, 35.5, 110.0)
    if case == "orientation":
        iop = (1, 0, 0, 0, 0.8, 0.6)
    elif case == "size":
        pixels = raw_slice(0)[:4]
    elif case == "spacing":
        spacing = (0.8, 0.75)
    elif case == "duplicate":
        pos = (-20.0, 35.5, 105.0)
    elif case == "no_position":
        pos = None
    elif case == "no_orientation":
        iop = None
    ds = make_slice(pos, iop, spacing, pixels=pixels)
    if case == "multiframe":
        ds.NumberOfFrames = 2
        ds.PixelData = np.concatenate([raw_slice(0), raw_slice(1)]).tobytes()
    elif case == "compressed":
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    elif case == "truncated":
        ds.PixelData = ds.PixelData[:20]
    ds.save_as(tmp_path / "zz_odd.dcm", enforce_file_format=True)
    err = load_error(tmp_path)
    assert message in err.reason and err.code == code
    if case not in ("duplicate",):
        assert "zz_odd.dcm" in err.reason
    if case == "compressed":
        assert "pylibjpeg" in err.fix


def test_without_pydicom(tmp_path, monkeypatch):
    write_series(tmp_path, n=2)
    series = dicom.find_series(tmp_path)[0]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    assert not dicom.pydicom_available()
    for call in (lambda: dicom.find_series(tmp_path), lambda: dicom.load_series(series)):
        with pytest.raises(InputError) as info:
            call()
        assert info.value.reason == "pydicom is not installed" and info.value.fix == "pip install 'medssl[dicom]'"
        assert info.value.code == "dicom_unavailable"
