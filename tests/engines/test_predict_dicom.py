"""``predict`` / ``fit-subject`` on DICOM series folders, and ``predict --out-format dicom``, end to end.

The same scans as NIfTI files and as series (written by the test helper from the standard's
definitions) must give the same outputs; the derived series, read back by SimpleITK, must equal the
NIfTI output in world coordinates within half a rescale step.
"""

import contextlib
import io

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nexus_monai.cli import main
from nexus_monai.data.dicom import LPS_TO_RAS

from dicom_helpers import quantised, world_aligned, write_series
from helpers import fit_args, make_tiny_pair, predict_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RAW = ("--keep-background", "--no-register")  # the phantom has no zero background; registration is not tested here


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicom_predict")
    pair = make_tiny_pair(d / "pair")
    nifti, series = dict(pair), dict(pair)
    for number, c in enumerate(("t1", "t2"), start=3):
        img = nib.load(str(pair[c]))
        q = quantised(np.asarray(img.dataobj), 0.01)  # what the int16 series can hold, also as NIfTI
        nib.save(nib.Nifti1Image(q, img.affine), str(d / f"{c}.nii.gz"))
        nifti[c] = d / f"{c}.nii.gz"
        series[c] = write_series(d / f"{c}_series", q, img.affine, slope=0.01, series_number=number,
                                 echo_time=12.0 if c == "t1" else 100.0)
    return d, nifti, series


def _run(argv, stdout=None):
    with contextlib.redirect_stdout(stdout or io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(argv)
    return rc, err.getvalue()


def _read_itk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float64), LPS_TO_RAS @ lps


def test_predict_series_in_equals_nifti_in_and_dicom_out_equals_nifti_out(scans, tmp_path):
    d, nifti, series = scans
    assert _run(predict_args(nifti, tmp_path / "nii", "--spacing", "1.5", *RAW))[0] == 0
    printed = io.StringIO()
    assert _run(predict_args(series, tmp_path / "dcm_in", "--spacing", "1.5", *RAW), printed)[0] == 0
    # T1w thick in z: 2 mm slices; T2w thick in y, written with slices along z: 1 mm slices of 4 mm rows
    assert "t1 DICOM series: 8 slices 2 mm apart, thickness 2 mm, gap 0 mm" in printed.getvalue()
    assert "t2 DICOM series: 16 slices 1 mm apart" in printed.getvalue()
    assert _run(predict_args(series, tmp_path / "dcm_out", "--spacing", "1.5", "--out-format", "dicom", *RAW))[0] == 0
    for c in ("t1w", "t2w"):
        ref = nib.load(str(tmp_path / "nii" / f"{c}_sr.nii.gz"))
        got = nib.load(str(tmp_path / "dcm_in" / f"{c}_sr.nii.gz"))
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
        np.testing.assert_allclose(got.get_fdata(), ref.get_fdata(), atol=1e-3 * np.abs(ref.get_fdata()).max())
        folder = tmp_path / "dcm_out" / f"{c}_sr"
        values, affine = _read_itk(folder)
        slope = float(pydicom.dcmread(next(folder.iterdir())).RescaleSlope)
        aligned = world_aligned(ref.get_fdata(), ref.affine, values, affine)
        assert np.abs(aligned - ref.get_fdata()).max() <= slope / 2 + 1e-3 * np.abs(ref.get_fdata()).max()
    h1 = pydicom.dcmread(next((tmp_path / "dcm_out" / "t1w_sr").iterdir()))
    src1 = pydicom.dcmread(next(series["t1"].iterdir()))
    assert h1.FrameOfReferenceUID == src1.FrameOfReferenceUID and h1.StudyInstanceUID == src1.StudyInstanceUID
    assert h1.SeriesInstanceUID != src1.SeriesInstanceUID and "not for diagnostic use" in h1.SeriesDescription


def test_dicom_out_needs_a_t1_series_before_any_work(scans, tmp_path):
    _, nifti, series = scans
    rc, err = _run(predict_args({**series, "t1": nifti["t1"]}, tmp_path / "o", "--spacing", "2", "--out-format",
                                "dicom", *RAW))
    assert rc == 2 and "needs the t1 input as a DICOM series" in err and not (tmp_path / "o").exists()


def test_mismatched_patients_refused(scans, tmp_path):
    _, nifti, series = scans
    img = nib.load(str(nifti["t2"]))
    other = write_series(tmp_path / "other", np.asarray(img.dataobj), img.affine, slope=0.01,
                         patient={"PatientID": "SOMEONE-ELSE"})
    rc, err = _run(predict_args({**series, "t2": other}, tmp_path / "o", "--spacing", "2", *RAW))
    assert rc == 2 and "mismatched subjects" in err and "SOMEONE-ELSE" not in err and not (tmp_path / "o").exists()


def test_fit_subject_on_series(scans, tmp_path):
    _, nifti, series = scans
    assert _run(fit_args(series, tmp_path / "dcm", "--spacing", "2", "--max-minutes=0.005", *RAW))[0] == 0
    t1 = nib.load(str(nifti["t1"]))
    out = nib.load(str(tmp_path / "dcm" / "t2w_sr.nii.gz"))
    # the T1w field of view at 2 mm: 16 x 16 x 8 LR voxels of 1 x 1 x 2 mm -> 8^3, the first centre half a voxel in
    np.testing.assert_allclose(out.affine[:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-5)
    np.testing.assert_allclose(out.affine[:3, 3], t1.affine[:3, 3] + [0.5, 0.5, 0.0], atol=1e-4)
    assert out.shape == (8, 8, 8) and np.isfinite(out.get_fdata()).all()


def test_dicom_out_refuses_a_sheared_grid_before_any_work(scans, tmp_path):
    _, _, series = scans
    sheared = np.array([[1.0, 0.5, 0, -8], [0, 1.0, 0, -8], [0, 0, 1.0, -8], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), sheared), str(tmp_path / "like.nii.gz"))
    rc, err = _run(predict_args(series, tmp_path / "o", "--like", str(tmp_path / "like.nii.gz"), "--out-format",
                                "dicom", *RAW))
    assert rc == 2 and "not orthogonal" in err and str(tmp_path / "like.nii.gz") in err
    assert not (tmp_path / "o").exists()
