"""Writing a super-resolved volume as a derived DICOM series (pydicom), one file per slice.

The series is a derived MR image series placed in the exam the inputs came from:

* the patient, study and equipment-independent study tags of the T1w source series (PatientName,
  PatientID, StudyInstanceUID, AccessionNumber, ...), copied as they are;
* a new SeriesInstanceUID and one new SOPInstanceUID per slice; ImageType ``DERIVED\\SECONDARY``;
  a SeriesDescription ending in "not for diagnostic use" (the full note in ImageComments);
* the T1w source's FrameOfReferenceUID: the output sits on a grid in the T1w scan's world frame
  (the T2w scan is expected in that frame too, or registered into it);
* ReferencedSeriesSequence with both source series (their SeriesInstanceUID and every instance);
* int16 pixels with one RescaleSlope for the series (``value = stored * slope``, intercept 0, so
  a zero background stays exactly 0; the rounding error is at most ``slope / 2``);
* per slice ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceLocation.

Geometry, the inverse of :mod:`nexus_monai.data.dicom`: with the RAS affine ``A`` of the
``(X, Y, Z)`` volume, ``L = diag(-1, -1, 1, 1) @ A`` is in LPS; column ``i`` of the slice image is
array axis 0 (row direction ``L[:3, 0] / |L[:3, 0]|``), row ``j`` array axis 1 (column direction
``L[:3, 1] / |L[:3, 1]|``), slice ``k`` array axis 2 at ``ImagePositionPatient = L @ [0, 0, k, 1]``.
DICOM needs orthogonal in-plane axes and slices along their normal; a sheared grid is refused.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from nexus_monai.data.dicom import LPS_TO_RAS, is_series_folder
from nexus_monai.data.io import fsync_path
from nexus_monai.data.staging import staged_output_dir
from nexus_monai.errors import NexusInputError

__all__ = ["write_derived_series", "series_geometry", "check_series_grid", "NOT_FOR_DIAGNOSIS", "SERIES_NUMBER_OFFSET"]

NOT_FOR_DIAGNOSIS = "not for diagnostic use"
SERIES_NUMBER_OFFSET = {"t1": 9100, "t2": 9200}  # derived series number = offset + the source's number (mod 100)
_CONTRAST_LABEL = {"t1": "T1w", "t2": "T2w"}
_COPIED_TAGS = (  # patient, study and clinical-trial identity: the derived series belongs to the same exam
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "OtherPatientIDsSequence", "PatientIdentityRemoved", "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "InstitutionName", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialSubjectID", "ClinicalTrialSiteID", "SpecificCharacterSet",
)
_CONTRAST_TAGS = ("MagneticFieldStrength", "ScanningSequence", "SequenceVariant", "EchoTime", "RepetitionTime",
                  "InversionTime", "FlipAngle")  # from the source of the same contrast, where it is a series


def series_geometry(affine: np.ndarray | torch.Tensor, shape) -> dict:
    """Per-series DICOM geometry of a ``(X, Y, Z)`` grid with RAS ``affine``: ``orientation`` (6 cosines, LPS),
    ``pixel_spacing`` ``[row spacing (along j), column spacing (along i)]`` mm, ``slice_spacing`` mm and
    ``positions`` ``(Z, 3)`` (ImagePositionPatient of each slice, LPS mm). Raises ValueError for a sheared grid."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    lps = LPS_TO_RAS @ a
    cols = lps[:3, :3]
    sp = np.linalg.norm(cols, axis=0)
    unit = cols / sp
    row_dir, col_dir = unit[:, 0], unit[:, 1]
    normal = np.cross(row_dir, col_dir)
    if abs(row_dir @ col_dir) > 1e-4 or abs(abs(unit[:, 2] @ normal) - 1.0) > 1e-4:
        raise ValueError("the grid's axes are not orthogonal (a sheared grid has no DICOM slice geometry)")
    positions = np.stack([(lps @ np.array([0.0, 0.0, k, 1.0]))[:3] for k in range(int(shape[2]))])
    return {"orientation": [*row_dir.tolist(), *col_dir.tolist()], "pixel_spacing": [float(sp[1]), float(sp[0])],
            "slice_spacing": float(sp[2]), "positions": positions, "normal": normal}


def check_series_grid(affine, shape, source=None) -> None:
    """A one-line :class:`NexusInputError` (before any work) when a grid cannot be written as a DICOM series."""
    try:
        series_geometry(affine, (1, 1, 1))
    except ValueError as err:
        raise NexusInputError(source, f"--out-format dicom: {err}") from None
    if int(shape[2]) > 99999 or max(int(shape[0]), int(shape[1])) > 65535:
        raise NexusInputError(source, f"--out-format dicom: grid {tuple(int(n) for n in shape)} exceeds DICOM's "
                                      "65535 rows/columns or the 99999 slice files of a series")


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def _read_header(folder: Path):
    """``(first slice's header, {series_uid, sop_class_uid, sop_instance_uids, frame_of_reference_uid})`` of a
    source series folder, from the headers only (its pixels were read and checked when it was loaded)."""
    import pydicom

    from nexus_monai.data.dicom import series_file_names

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_file_names(folder)]
    first = headers[0]
    return first, {"series_uid": str(first.get("SeriesInstanceUID", "")),
                   "sop_class_uid": str(first.get("SOPClassUID", "")),
                   "sop_instance_uids": [str(h.get("SOPInstanceUID", "")) for h in headers],
                   "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", ""))}


def _reference_item(series: dict):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.SeriesInstanceUID = series["series_uid"]
    refs = []
    for uid in series["sop_instance_uids"]:
        ref = Dataset()
        ref.ReferencedSOPClassUID = series["sop_class_uid"]
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    item.ReferencedInstanceSequence = refs
    return item


def write_derived_series(volume, folder: str | os.PathLike, contrast: str,
                         sources: Mapping[str, str | os.PathLike | None], grid_note: str = "") -> Path:
    """Write ``volume`` (``(X, Y, Z)`` or ``(1, X, Y, Z)`` MetaTensor, RAS affine) as a derived series in ``folder``.

    Args:
        contrast: ``"t1"`` or ``"t2"`` (labels the series; its MR tags come from that contrast's source).
        sources: ``{"t1": series folder, "t2": series folder or NIfTI path or None}``; ``sources["t1"]``
            must be a series folder (patient, study and frame of reference come from it).
        grid_note: appended to ImageComments (e.g. the output spacing).

    ``folder`` is replaced as a whole (written into a staging sibling, then renamed). Files are
    ``IM00001.dcm``... in slice order. Returns ``folder``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if not is_series_folder(sources.get("t1")):
        raise NexusInputError(sources.get("t1"), "a derived DICOM series needs the t1 input as a DICOM series folder "
                                                 "(its patient, study and frame of reference tags)")
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    arr = arr[0] if arr.ndim == 4 else arr
    if arr.ndim != 3 or not np.all(np.isfinite(arr)):
        raise ValueError(f"write_derived_series expects a finite 3D volume, got shape {arr.shape}")
    check_series_grid(volume.affine, arr.shape)
    geo = series_geometry(volume.affine, arr.shape)
    t1_header, t1_series = _read_header(Path(sources["t1"]))
    referenced = [t1_series]
    own_header = t1_header
    if is_series_folder(sources.get("t2")):
        t2_header, t2_series = _read_header(Path(sources["t2"]))
        referenced.append(t2_series)
        if contrast == "t2":
            own_header = t2_header
    peak = float(np.abs(arr).max())
    slope = peak / 32767.0 if peak > 0 else 1.0
    stored = np.clip(np.rint(arr / slope), -32768, 32767).astype(np.int16)
    now = _dt.datetime.now()
    series_uid = generate_uid()
    label = _CONTRAST_LABEL.get(contrast, contrast)
    number = SERIES_NUMBER_OFFSET.get(contrast, 9900) + int(own_header.get("SeriesNumber", 0) or 0) % 100
    sp = geo["pixel_spacing"]
    description = f"{label} SR {_ds(sp[1])}x{_ds(sp[0])}x{_ds(geo['slice_spacing'])} {NOT_FOR_DIAGNOSIS}"[:64]
    comments = (f"Derived by nexus_monai super-resolution from the T1w and T2w series referenced in "
                f"ReferencedSeriesSequence. {NOT_FOR_DIAGNOSIS.upper()}. {grid_note}").strip()

    base = Dataset()
    for tag in _COPIED_TAGS:
        if tag in t1_header:
            base[tag] = t1_header[tag]
    for tag in _CONTRAST_TAGS:
        if tag in own_header:
            base[tag] = own_header[tag]
    base.SOPClassUID = MRImageStorage
    base.Modality = "MR"
    base.ImageType = ["DERIVED", "SECONDARY"]
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = number
    base.SeriesDescription = description
    base.ImageComments = comments[:10240]
    base.DerivationDescription = f"super-resolution (nexus_monai), {NOT_FOR_DIAGNOSIS}"[:1024]
    base.SeriesDate = base.ContentDate = now.strftime("%Y%m%d")
    base.SeriesTime = base.ContentTime = now.strftime("%H%M%S")
    base.Manufacturer = "nexus_monai"
    base.SoftwareVersions = _version()
    base.BurnedInAnnotation = "NO"
    base.FrameOfReferenceUID = t1_series["frame_of_reference_uid"] or generate_uid()
    base.PositionReferenceIndicator = t1_header.get("PositionReferenceIndicator", "")
    base.MRAcquisitionType = "3D"
    base.ReferencedSeriesSequence = [_reference_item(s) for s in referenced]
    base.ImageOrientationPatient = [_ds(v) for v in geo["orientation"]]
    base.PixelSpacing = [_ds(v) for v in sp]
    base.SliceThickness = _ds(geo["slice_spacing"])
    base.SpacingBetweenSlices = _ds(geo["slice_spacing"])
    base.Rows, base.Columns = int(arr.shape[1]), int(arr.shape[0])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 1
    base.RescaleSlope, base.RescaleIntercept, base.RescaleType = _ds(slope), "0", "US"
    lo, hi = float(stored.min()) * slope, float(stored.max()) * slope
    base.WindowCenter, base.WindowWidth = _ds((lo + hi) / 2), _ds(max(hi - lo, slope))

    with staged_output_dir(folder) as stage:
        for k in range(arr.shape[2]):
            ds = Dataset()
            ds.update(base)
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            pos = geo["positions"][k]
            ds.ImagePositionPatient = [_ds(v) for v in pos]
            ds.SliceLocation = _ds(float(pos @ geo["normal"]))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()  # rows = j, columns = i
            path = stage / f"IM{k + 1:05d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            fsync_path(path)
    return Path(folder)


def _version() -> str:
    from nexus_monai import __version__

    return str(__version__)[:64]
