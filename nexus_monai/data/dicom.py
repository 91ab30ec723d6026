"""Reading a DICOM series folder as a scan, with the same geometry contract as a NIfTI file.

A scan is either a NIfTI file or a folder holding ONE DICOM series (:func:`load_scan` takes both).
The series is read by SimpleITK's ``ImageSeriesReader`` (GDCM sorts the slices along the slice
normal and applies RescaleSlope / RescaleIntercept); this module adds what ITK leaves silent:

* one series per folder: a folder with several ``SeriesInstanceUID`` s (mixed series), files that
  are not slices of the series (not DICOM, corrupt), one slice, a multi-frame or colour image is a
  one-line :class:`~nexus_monai.errors.NexusInputError`;
* every slice has the same ``ImageOrientationPatient``; the ``ImagePositionPatient`` s lie on the
  slice normal (no gantry tilt / sheared stack), no two at one position, and their spacing along
  the normal is uniform (a missing slice doubles one step and is refused);
* ``SliceThickness`` (0018,0050) and ``SpacingBetweenSlices`` (0018,0088) are read and kept beside
  the measured centre-to-centre spacing, so a slice gap (spacing > thickness) is known.

Geometry: DICOM patient coordinates are LPS; nibabel's world frame (and every affine in
nexus_monai) is RAS. With ITK's direction ``D`` (columns: the i, j, k axes in LPS), spacing
``s`` (mm) and origin ``o`` (the first slice's position, LPS), the affine is

    A_RAS = diag(-1, -1, 1, 1) @ [[D @ diag(s), o], [0, 0, 0, 1]]

and the data ``(X, Y, Z)`` is indexed ``[i, j, k]`` = (column, row, slice) exactly as ITK indexes
it, which is also how ITK's NIfTI writer and nibabel agree (tested against that pair).
Patient data (names, IDs, dates) is never put into messages or the volume's metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from nexus_monai.errors import NexusInputError

__all__ = ["DicomSeries", "is_series_folder", "read_dicom_series", "load_scan", "LPS_TO_RAS",
           "check_same_patient", "series_file_names"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_IGNORED_NAMES = {"DICOMDIR"}  # a DICOMDIR index may sit beside the slices of a single-series export
_ORIENT_TOL = 1e-4  # direction cosines (unitless)
_POS_TOL_MM = 0.01
_POS_TOL_REL = 0.01  # of the slice spacing


@dataclass(frozen=True)
class DicomSeries:
    """What a series folder told us (no patient data).

    Attributes:
        folder: the series folder.
        files: the slice files in ITK's order (slice ``k`` of the volume is ``files[k]``).
        series_uid / study_uid / frame_of_reference_uid / sop_class_uid: the series' UIDs ("" if absent).
        sop_instance_uids: per slice, in ``files`` order.
        slice_spacing_mm: centre-to-centre distance of the slices, measured from ImagePositionPatient.
        slice_thickness_mm: SliceThickness (0018,0050), None if absent.
        spacing_between_slices_mm: SpacingBetweenSlices (0018,0088) as written, None if absent.
        modality / description: Modality and SeriesDescription.
    """

    folder: Path
    files: tuple[Path, ...]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    slice_spacing_mm: float
    slice_thickness_mm: float | None
    spacing_between_slices_mm: float | None
    modality: str
    description: str

    @property
    def slice_gap_mm(self) -> float | None:
        """Spacing minus thickness (> 0: a gap between slices, < 0: overlapping slices); None without a thickness."""
        if self.slice_thickness_mm is None:
            return None
        return round(self.slice_spacing_mm - self.slice_thickness_mm, 6)

    def summary(self) -> dict:
        """Plain, patient-free facts for a volume's metadata and for logs."""
        return {"folder": str(self.folder), "slices": len(self.files), "series_uid": self.series_uid,
                "slice_spacing_mm": round(self.slice_spacing_mm, 6), "slice_thickness_mm": self.slice_thickness_mm,
                "spacing_between_slices_mm": self.spacing_between_slices_mm, "slice_gap_mm": self.slice_gap_mm,
                "modality": self.modality}


def is_series_folder(path: str | os.PathLike | None) -> bool:
    """True when ``path`` is a folder (then it must hold one DICOM series); a file is taken as NIfTI."""
    return path is not None and str(path) not in ("", "None") and Path(path).is_dir()


def _slice_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in _IGNORED_NAMES)


def _floats(text: str, n: int, folder: Path, tag: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in str(text).replace(" ", "").split("\\") if v != ""], dtype=np.float64)
    except ValueError:
        values = np.zeros(0)
    if values.size != n or not np.all(np.isfinite(values)):
        raise NexusInputError(folder, f"unreadable {tag} in the series ({text!r})")
    return values


def _optional_float(reader, key: str) -> float | None:
    if not reader.HasMetaDataKey(0, key):
        return None
    try:
        value = float(str(reader.GetMetaData(0, key)).strip().split("\\")[0])
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


def _tag(reader, index: int, key: str) -> str:
    return str(reader.GetMetaData(index, key)).strip() if reader.HasMetaDataKey(index, key) else ""


def series_file_names(folder: str | os.PathLike) -> list[str]:
    """The slice files of the one series in ``folder``, sorted along the slice normal (GDCM); one-line errors
    for an empty folder, no series, several series, or files that are not slices of the series."""
    import SimpleITK as sitk

    folder = Path(folder)
    files = _slice_files(folder)
    if not files:
        raise NexusInputError(folder, "empty folder: expected the files of one DICOM series")
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise NexusInputError(folder, f"cannot scan the folder for DICOM series ({_first_line(err)})") from None
    if len(ids) == 0:
        raise NexusInputError(folder, f"no DICOM series in the folder ({len(files)} files, none readable as DICOM)")
    if len(ids) > 1:
        raise NexusInputError(folder, f"mixed series: the folder holds {len(ids)} DICOM series; give one series per "
                                      f"folder")
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    extra = len(files) - len(names)
    if extra:
        raise NexusInputError(folder, f"{extra} of {len(files)} files are not slices of the series (not DICOM, "
                                      f"corrupt, or of another kind); give a folder with one series only")
    return names


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text[:200]


def read_dicom_series(folder: str | os.PathLike) -> tuple[MetaTensor, DicomSeries]:
    """Read one series folder as a ``(1, X, Y, Z)`` float32 MetaTensor (RAS affine, mm) and its :class:`DicomSeries`.

    ``X, Y`` are the columns and rows of a slice, ``Z`` the slices in order along the slice
    normal. Raises a one-line :class:`NexusInputError` naming the folder for every check in the
    module docstring and for a series ITK cannot decode.
    """
    import SimpleITK as sitk

    from nexus_monai.data.io import check_volume

    folder = Path(folder)
    if not folder.is_dir():
        raise NexusInputError(folder, "not a folder (a DICOM series is given as the folder of its slices)")
    names = series_file_names(folder)
    if len(names) < 2:
        raise NexusInputError(folder, f"{len(names)} slice: a 3D scan needs a series of at least 2 slices "
                                      "(multi-frame files are not supported)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.SetOutputPixelType(sitk.sitkFloat32)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's spacing warning: the checks below say it in one line
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise NexusInputError(folder, f"corrupt DICOM series: ITK cannot decode it ({_first_line(err)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise NexusInputError(folder, "not a 3D grey-level series (colour or multi-component pixels)")
    n = len(names)
    frames = _tag(reader, 0, "0028|0008")
    if image.GetSize()[2] != n or (frames.isdigit() and int(frames) > 1):
        raise NexusInputError(folder, "multi-frame DICOM files are not supported (give one file per slice)")

    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: i, j, k in LPS
    orient = np.stack([_floats(_tag(reader, s, "0020|0037"), 6, folder, "ImageOrientationPatient") for s in range(n)])
    if np.abs(orient - orient[0]).max() > _ORIENT_TOL:
        raise NexusInputError(folder, "slices with different ImageOrientationPatient (a mixed or localiser series)")
    positions = np.stack([_floats(_tag(reader, s, "0020|0032"), 3, folder, "ImagePositionPatient") for s in range(n)])
    normal = direction[:, 2]
    along = positions @ normal
    steps = np.diff(along)
    if np.any(np.diff(np.sort(along)) < _POS_TOL_MM):
        raise NexusInputError(folder, "two slices at the same position (a mixed, multi-echo or repeated series)")
    spacing_k = float(np.mean(steps))
    if spacing_k <= 0 or np.any(steps <= 0):
        raise NexusInputError(folder, "slices not ordered along the slice normal")
    tol = max(_POS_TOL_MM, _POS_TOL_REL * spacing_k)
    if np.abs(steps - spacing_k).max() > tol:
        raise NexusInputError(
            folder, f"non-uniform slice spacing: steps from {steps.min():.4g} to {steps.max():.4g} mm along the normal "
                    f"(a missing slice or a variable-spacing series)")
    sideways = np.diff(positions, axis=0) - steps[:, None] * normal[None, :]
    if np.linalg.norm(sideways, axis=1).max() > tol:
        raise NexusInputError(folder, "slice positions drift sideways (gantry tilt or a sheared stack: not supported)")

    sp = np.asarray(image.GetSpacing(), dtype=np.float64)
    sp[2] = spacing_k
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(sp)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    data = np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), dtype=np.float32)
    check_volume(data, folder)
    series = DicomSeries(
        folder=folder, files=tuple(Path(f) for f in names),
        series_uid=_tag(reader, 0, "0020|000e"), study_uid=_tag(reader, 0, "0020|000d"),
        frame_of_reference_uid=_tag(reader, 0, "0020|0052"), sop_class_uid=_tag(reader, 0, "0008|0016"),
        sop_instance_uids=tuple(_tag(reader, s, "0008|0018") for s in range(n)),
        slice_spacing_mm=spacing_k, slice_thickness_mm=_optional_float(reader, "0018|0050"),
        spacing_between_slices_mm=_optional_float(reader, "0018|0088"),
        modality=_tag(reader, 0, "0008|0060"), description=_tag(reader, 0, "0008|103e"),
    )
    meta = {"filename_or_obj": str(folder), "original_affine": torch.as_tensor(affine),
            "spatial_shape": data.shape, "dicom": series.summary()}
    return MetaTensor(torch.as_tensor(data)[None], affine=torch.as_tensor(affine), meta=meta), series


def load_scan(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """A scan as a ``(1, X, Y, Z)`` MetaTensor: a NIfTI file (:func:`~nexus_monai.data.io.load_volume`) or a
    DICOM series folder (:func:`read_dicom_series`; ``meta["dicom"]`` holds its slice facts)."""
    from nexus_monai.data.io import load_volume

    if is_series_folder(path):
        volume, _ = read_dicom_series(path)
        return volume.to(dtype)
    return load_volume(path, dtype)


def check_same_patient(t1: str | os.PathLike, t2: str | os.PathLike) -> None:
    """Two series folders must be of one patient (PatientID, and PatientName where both have one).

    The message names the folders only, never the patient data.
    """
    import pydicom

    def first(folder):
        f = series_file_names(folder)[0]
        return pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])

    try:
        a, b = first(t1), first(t2)
    except (OSError, pydicom.errors.InvalidDicomError):  # both were read by ITK already; nothing to compare
        return
    for tag in ("PatientID", "PatientName"):
        va, vb = str(a.get(tag, "") or ""), str(b.get(tag, "") or "")
        if va and vb and va != vb:
            raise NexusInputError(t2, f"this series has another {tag} than the t1 series {t1} (mismatched subjects)")
