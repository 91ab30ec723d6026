"""DICOM series in (SimpleITK) and derived series out (pydicom), checked in world coordinates.

In: a series written by the test helper (straight from the standard's definitions) reads back equal to the
NIfTI it came from, and its affine equals what nibabel reads from ITK's own NIfTI export of the same
series. Out: the derived series, read by SimpleITK, equals the volume in world coordinates (within half
a rescale step) and carries the tags of a derived series in the source exam. Bad series: one line.
"""

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from nexus_monai.data.dicom import LPS_TO_RAS, load_scan, read_dicom_series
from nexus_monai.data.dicom_write import NOT_FOR_DIAGNOSIS, write_derived_series
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import make_affine, rotation_matrix

from dicom_helpers import PATIENT, quantised, world_aligned, write_series

SHAPE = (7, 6, 5)


def _affine(kind: str) -> np.ndarray:
    if kind == "axial":
        return make_affine((0.8, 0.9, 3.0), (-10.0, 20.0, 5.0)).numpy()
    if kind == "oblique":
        a = make_affine((1.0, 1.2, 2.5), (3.0, -4.0, 7.0)).numpy()
        r = np.eye(4)
        r[:3, :3] = rotation_matrix((12.0, -7.0, 20.0)).numpy()
        return r @ a
    # coronal thick in y, with the i axis pointing left (RAS x negative)
    return np.array([[-1.0, 0, 0, 30], [0, 0, 4.0, -50], [0, 1.1, 0, 12], [0, 0, 0, 1]])


def _data(seed=0):
    return quantised(np.random.default_rng(seed).uniform(0, 900, SHAPE), 0.5)


@pytest.mark.parametrize("kind", ["axial", "oblique", "coronal_flipped"])
def test_series_reads_back_equal_to_the_nifti(tmp_path, kind):
    data, affine = _data(), _affine(kind)
    folder = write_series(tmp_path / "s", data, affine, slope=0.5)
    vol, series = read_dicom_series(folder)
    got = vol[0].numpy()
    aligned = world_aligned(data, affine, got, vol.affine.numpy())  # same voxel centres in world coordinates
    np.testing.assert_array_equal(aligned, data)
    if kind != "coronal_flipped":  # the slice axis already follows the normal: the very same affine
        np.testing.assert_allclose(vol.affine.numpy(), affine, atol=1e-5)
    # independent reference: ITK's own NIfTI export of the series, as nibabel reads it
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    sitk.WriteImage(reader.Execute(), str(tmp_path / "itk.nii.gz"))
    ref = nib.load(str(tmp_path / "itk.nii.gz"))
    np.testing.assert_allclose(vol.affine.numpy(), ref.affine, atol=1e-4)
    np.testing.assert_array_equal(got, np.asarray(ref.dataobj, np.float32))
    assert vol.meta["dicom"]["slices"] == SHAPE[2] and "Phantom" not in str(vol.meta)


def test_thickness_and_gap_are_read(tmp_path):
    affine = make_affine((1.0, 1.0, 6.0)).numpy()
    vol = load_scan(write_series(tmp_path / "s", _data(), affine, thickness=5.0))
    info = vol.meta["dicom"]
    assert info["slice_spacing_mm"] == pytest.approx(6.0) and info["slice_thickness_mm"] == pytest.approx(5.0)
    assert info["slice_gap_mm"] == pytest.approx(1.0) and info["spacing_between_slices_mm"] == pytest.approx(6.0)


def _bad_series(tmp_path, case):
    data, affine = _data(), _affine("axial")
    folder = tmp_path / case
    if case == "mixed":
        write_series(folder, data, affine)
        write_series(tmp_path / "other", data, affine)
        for f in (tmp_path / "other").iterdir():
            f.rename(folder / f"other_{f.name}")
    elif case == "missing_slice":
        write_series(folder, data, affine, skip=(2,))
    elif case == "truncated":
        write_series(folder, data, affine)
        f = sorted(folder.iterdir())[1]
        f.write_bytes(f.read_bytes()[:-30])
    elif case == "garbage_file":
        write_series(folder, data, affine)
        (folder / "notes.dcm").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif case == "one_slice":
        write_series(folder, data[:, :, :1], affine)
    elif case == "empty":
        folder.mkdir()
    elif case == "duplicate_position":
        write_series(folder, data, affine)
        uid = pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
        write_series(tmp_path / "echo2", data, affine, series_uid=uid)
        for f in (tmp_path / "echo2").iterdir():
            f.rename(folder / f"echo2_{f.name}")
    return folder


@pytest.mark.parametrize("case,words", [
    ("mixed", "mixed series"), ("missing_slice", "non-uniform slice spacing"), ("truncated", "corrupt"),
    ("garbage_file", "not slices of the series"), ("one_slice", "at least 2 slices"), ("empty", "empty folder"),
    ("duplicate_position", "same position"),
])
def test_bad_series_one_line(tmp_path, case, words):
    folder = _bad_series(tmp_path, case)
    with pytest.raises(NexusInputError) as err:
        load_scan(folder)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and msg.startswith(str(folder)), msg
    assert "Phantom" not in msg and "PHANTOM" not in msg


def _read_itk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64), LPS_TO_RAS @ lps


@pytest.mark.parametrize("kind", ["oblique", "coronal_flipped"])
def test_derived_series_read_by_itk_equals_the_volume(tmp_path, kind):
    t1 = write_series(tmp_path / "t1", _data(1), _affine("axial"), series_number=4)
    t2 = write_series(tmp_path / "t2", _data(2), _affine("axial"), series_number=5, description="t2_tse_cor",
                      echo_time=100.0, frame_uid="1.2.826.0.1.3680043.8.498.99")
    out = np.random.default_rng(3).normal(200, 150, (9, 8, 6)).astype(np.float32)  # negatives too
    vol = MetaTensor(torch.as_tensor(out)[None], affine=torch.as_tensor(_affine(kind)))
    folder = write_derived_series(vol, tmp_path / "out" / "t2w_sr", "t2", {"t1": t1, "t2": t2})
    got, affine = _read_itk(folder)
    aligned = world_aligned(out, _affine(kind), got, affine)
    slope = float(pydicom.dcmread(next(folder.iterdir())).RescaleSlope)
    assert np.abs(aligned - out).max() <= slope / 2 + 1e-6 and slope <= np.abs(out).max() / 32767 * 1.0001
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    src1, src2 = pydicom.dcmread(next(t1.iterdir())), pydicom.dcmread(next(t2.iterdir()))
    h = headers[0]
    for tag in PATIENT:
        assert str(h[tag].value) == str(src1[tag].value), tag
    assert list(h.ImageType) == ["DERIVED", "SECONDARY"] and h.Modality == "MR"
    assert h.FrameOfReferenceUID == src1.FrameOfReferenceUID != src2.FrameOfReferenceUID
    assert NOT_FOR_DIAGNOSIS in h.SeriesDescription.lower() and len(h.SeriesDescription) <= 64
    assert h.pixel_array.dtype == np.int16 and h.BitsAllocated == 16
    refs = {item.SeriesInstanceUID: len(item.ReferencedInstanceSequence) for item in h.ReferencedSeriesSequence}
    assert refs == {src1.SeriesInstanceUID: SHAPE[2], src2.SeriesInstanceUID: SHAPE[2]}
    assert len({x.SeriesInstanceUID for x in headers}) == 1 and h.SeriesInstanceUID not in refs
    assert len({x.SOPInstanceUID for x in headers}) == len(files) == out.shape[2]
    assert h.SeriesNumber == 9205 and float(h.EchoTime) == 100.0


def test_derived_series_needs_a_t1_series(tmp_path):
    vol = MetaTensor(torch.zeros(1, 3, 3, 3), affine=torch.eye(4, dtype=torch.float64))
    with pytest.raises(NexusInputError, match="t1 input as a DICOM series"):
        write_derived_series(vol, tmp_path / "o", "t1", {"t1": tmp_path / "t1.nii.gz", "t2": None})
    assert not (tmp_path / "o").exists()


def test_datalist_entries_may_be_series_folders(tmp_path):
    """evaluate's user cohort: a datalist subject whose t1 / t2 are series folders loads like its NIfTI files."""
    from nexus_monai.data.brats import brats_loader
    from nexus_monai.evaluation.table1 import check_subject_files

    affine = _affine("oblique")
    t1, t2 = _data(4), _data(5)
    entry = {"subject": "s", "t1": str(write_series(tmp_path / "t1", t1, affine, slope=0.5)),
             "t2": str(write_series(tmp_path / "t2", t2, affine, slope=0.5))}
    check_subject_files([entry])
    loaded = brats_loader(["t1", "t2"])(entry)
    for key, ref in (("t1", t1), ("t2", t2)):
        np.testing.assert_array_equal(loaded[key][0].numpy(), ref)
        np.testing.assert_allclose(loaded[key].affine.numpy(), affine, atol=1e-5)
    bad = write_series(tmp_path / "bad", t1, affine, skip=(3,))
    with pytest.raises(NexusInputError, match="non-uniform slice spacing"):
        check_subject_files([{**entry, "t2": str(bad)}])
