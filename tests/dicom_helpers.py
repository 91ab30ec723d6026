"""Test helpers for DICOM: a series written slice by slice with pydicom from an ``(X, Y, Z)`` array and its
RAS affine (written here from the DICOM standard's definitions, independently of nexus_monai's writer),
and a comparison of two volumes in world coordinates.

DICOM (PS3.3 C.7.6.2.1.1): the pixel at column c, row r of a slice is at
``ImagePositionPatient + c * PixelSpacing[1] * row_cosines + r * PixelSpacing[0] * column_cosines`` (LPS).
Here column c = array axis 0 (i), row r = array axis 1 (j), slice = array axis 2 (k).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PATIENT = {"PatientName": "Test^Phantom", "PatientID": "PHANTOM-001", "PatientBirthDate": "19700101",
           "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "AccessionNumber": "ACC42", "StudyDate": "20261206"}


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, slope: float = 1.0,
                 thickness: float | None = None,
                 series_uid: str | None = None, frame_uid: str = "1.2.826.0.1.3680043.8.498.2", skip: tuple = (),
                 series_number: int = 3, patient: dict | None = None, description: str = "t1_tse_tra",
                 echo_time: float = 12.0) -> Path:
    """Write ``data`` (X, Y, Z) with RAS ``affine`` as one MR series (int16, ``stored = rint(value / slope)``).

    ``skip``: slice indices not written (a missing slice). Files are named in REVERSE slice order so a
    reader must sort by position, not by name. Returns ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]
    series_uid = series_uid or generate_uid()
    n = data.shape[2]
    for k in range(n):
        if k in skip:
            continue
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        for key, value in {**PATIENT, **(patient or {})}.items():
            setattr(ds, key, value)
        ds.Modality, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "MR", series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, description
        ds.EchoTime = f"{echo_time:g}"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
        ds.SliceThickness = f"{thickness if thickness is not None else sp[2]:.6f}"
        ds.SpacingBetweenSlices = f"{sp[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.8g}", "0"
        ds.PixelData = np.rint(data[:, :, k].T / slope).astype("<i2").tobytes()
        pydicom.dcmwrite(folder / f"slice{n - k:04d}.dcm", ds, enforce_file_format=True)
    return folder


def quantised(data: np.ndarray, slope: float = 1.0) -> np.ndarray:
    """``data`` as :func:`write_series` stores it (multiples of ``slope`` in int16 range), float32."""
    return (np.rint(data / slope).clip(-32768, 32767) * slope).astype(np.float32)


def world_aligned(a: np.ndarray, aff_a, b: np.ndarray, aff_b) -> np.ndarray:
    """``b`` re-indexed onto ``a``'s grid when both grids hold the same voxel centres (a signed permutation
    of axes); asserts the grids coincide in world coordinates (to 1e-3 mm)."""
    m = np.linalg.inv(np.asarray(aff_b, dtype=np.float64)) @ np.asarray(aff_a, dtype=np.float64)  # a-index -> b-index
    perm = np.rint(m[:3, :3])
    assert np.allclose(m[:3, :3], perm, atol=1e-4) and np.allclose(m[:3, 3], np.rint(m[:3, 3]), atol=1e-4), m
    idx = np.indices(a.shape).reshape(3, -1)
    bi = (perm @ idx + np.rint(m[:3, 3])[:, None]).astype(int)
    assert all((bi[d] >= 0).all() and (bi[d] < b.shape[d]).all() for d in range(3)), "grids cover different voxels"
    return b[bi[0], bi[1], bi[2]].reshape(a.shape)


def make_bad_series(d: Path, data: np.ndarray, affine: np.ndarray) -> dict:
    """name -> folder of a series that must be refused with one line: mixed, missing slice (non-uniform spacing),
    truncated slice, a garbage file among the slices, a single slice, duplicate positions, an empty folder."""
    bad = {}
    for name in ("mixed", "missing_slice", "truncated", "garbage_file", "one_slice", "duplicate", "empty"):
        folder = d / name
        if name == "one_slice":
            write_series(folder, data[:, :, :1], affine)
        elif name == "empty":
            folder.mkdir(parents=True)
        else:
            write_series(folder, data, affine, skip=(1,) if name == "missing_slice" else ())
        if name in ("mixed", "duplicate"):
            uid = pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID if name == "duplicate" else None
            write_series(d / f"{name}_2", data, affine, series_uid=uid)
            for f in (d / f"{name}_2").iterdir():
                f.rename(folder / f"b_{f.name}")
        elif name == "truncated":
            f = sorted(folder.iterdir())[0]
            f.write_bytes(f.read_bytes()[:-40])
        elif name == "garbage_file":
            (folder / "IM9999").write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
        bad[name] = folder
    return bad
