"""Reading and writing NIfTI volumes with checks and atomic writes.

Volumes travel as channel-first :class:`monai.data.MetaTensor` ``(C, X, Y, Z)`` (``C = 1`` for
one scan) whose ``affine`` maps voxel indices ``(i, j, k)`` of the spatial axes to world
coordinates in mm (RAS, as nibabel reads them). Every problem with a file is raised as one
:class:`~nexus_monai.errors.NexusInputError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from nexus_monai.errors import NexusInputError

__all__ = ["load_volume", "save_volume", "check_volume", "atomic_path", "write_text_atomic", "fsync_path",
           "check_nifti_file"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _read_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise NexusInputError(path, "file not found")
    if not path.name.endswith(_NIFTI_SUFFIXES):
        raise NexusInputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise NexusInputError(path,
                              f"corrupt or truncated NIfTI: cannot read its header ({type(err).__name__})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NexusInputError(path, f"not a NIfTI image ({type(img).__name__})")
    return img


def _spatial_shape(img, path: Path) -> tuple[int, int, int]:
    """The 3D shape of a NIfTI image (a 4th axis of length 1 dropped); a one-line error otherwise."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NexusInputError(path, f"expected a 3D volume, got {len(img.shape)}D of shape {tuple(img.shape)}")
    return shape


def check_nifti_file(path: str | os.PathLike) -> tuple[int, ...]:
    """Open ``path`` without keeping its data: header readable, 3D, finite invertible affine, and every
    data byte present (a ``.nii.gz`` is decompressed as a stream, so truncation shows). Returns the
    shape; raises :class:`NexusInputError` otherwise. For checking a whole datalist before a long run.
    """
    path = Path(path)
    img = _read_nifti(path)
    shape = _spatial_shape(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NexusInputError(path, "affine is singular or not finite")
    need = int(getattr(img.dataobj, "offset", 352)) + int(np.prod(shape)) * np.dtype(img.get_data_dtype()).itemsize
    try:
        if path.name.endswith(".gz"):
            have = 0
            with gzip.open(path, "rb") as f:
                while have < need and (block := f.read(1 << 22)):
                    have += len(block)
        else:
            have = path.stat().st_size
    except (OSError, EOFError, zlib.error) as err:
        raise NexusInputError(path, f"corrupt or truncated image data ({type(err).__name__})") from None
    if have < need:
        raise NexusInputError(path, f"truncated: {have:,} of {need:,} bytes of header and image data")
    return shape


def check_volume(data: np.ndarray | torch.Tensor, source: str | os.PathLike | None, *, allow_4d: bool = False) -> None:
    """Raise :class:`NexusInputError` unless ``data`` is a finite 3D volume.

    ``data`` is a spatial array ``(X, Y, Z)`` or a channel-first one ``(1, X, Y, Z)``.
    """
    shape = tuple(data.shape)
    spatial = shape[1:] if (len(shape) == 4 and shape[0] == 1) else shape
    if len(spatial) != 3 and not allow_4d:
        raise NexusInputError(source, f"expected a 3D volume, got shape {shape}")
    if min(spatial) < 1:
        raise NexusInputError(source, f"empty volume of shape {shape}")
    arr = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    if arr.is_floating_point():
        bad = int((~torch.isfinite(arr)).sum())
        if bad:
            raise NexusInputError(source, f"{bad} voxels are NaN or Inf")


def load_volume(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """Load one 3D NIfTI scan as a ``(1, X, Y, Z)`` MetaTensor with its affine (float64, mm).

    A 4D file whose 4th axis has length 1 is accepted as 3D. Raises
    :class:`NexusInputError` for a missing, corrupt or truncated file, a 4D volume, or NaN/Inf.
    """
    path = Path(path)
    img = _read_nifti(path)
    shape = _spatial_shape(img, path)
    if np.dtype(img.get_data_dtype()).kind == "c":
        raise NexusInputError(path, f"complex-valued data ({img.get_data_dtype()}); give a magnitude image")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32 if dtype.is_floating_point else None).reshape(shape)
    except MemoryError:
        raise NexusInputError(path, f"image of shape {shape} does not fit in memory") from None
    except Exception as err:  # EOFError / zlib.error / OSError on truncated or corrupt data
        raise NexusInputError(path, f"corrupt or truncated image data ({type(err).__name__}: {err})") from err
    check_volume(data, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NexusInputError(path, "affine is singular or not finite")
    tensor = torch.as_tensor(np.ascontiguousarray(data))[None].to(dtype)
    meta = {"filename_or_obj": str(path), "original_affine": torch.as_tensor(affine), "spatial_shape": shape}
    return MetaTensor(tensor, affine=torch.as_tensor(affine), meta=meta)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data (or a folder's entries) to disk, so a rename never exposes an incomplete file."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_path(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` (same folder, same suffix) to write to before renaming."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary shared files
    return Path(tmp)


def save_volume(data: torch.Tensor | np.ndarray, path: str | os.PathLike, affine=None, dtype=np.float32) -> Path:
    """Write a 3D volume ``(X, Y, Z)`` or ``(1, X, Y, Z)`` to NIfTI atomically (temp name, then rename).

    ``affine`` defaults to ``data.affine`` for a MetaTensor. The qform/sform codes are set to
    scanner space (1) so every reader agrees on the world frame.
    """
    path = Path(path)
    if affine is None:
        if not isinstance(data, MetaTensor):
            raise ValueError("save_volume needs an affine for a plain tensor/array")
        affine = data.affine
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"save_volume expects a 3D volume, got shape {arr.shape}")
    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(arr.astype(dtype)), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        nib.save(img, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write a text (or bytes) file via a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
