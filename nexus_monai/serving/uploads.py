"""Uploaded scans: accept only NIfTI (by its magic bytes) and store it under a name the server chooses.

The client's filename is checked (no folders, no ``..``, no control characters) and used only
in messages; the stored file is ``<request folder>/<field>.nii[.gz]``, so nothing a client sends
ever becomes a path.

NIfTI-1 single file: ``sizeof_hdr`` = 348 (little or big endian) and magic ``n+1\\0`` at byte 344.
NIfTI-2: ``sizeof_hdr`` = 540 and magic ``n+2\\0`` at byte 4. A gzip stream (``1f 8b``) is
decompressed just far enough to check the same header.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from nexus_monai.serving.params import ServingError

__all__ = ["check_filename", "nifti_suffix", "store_upload", "upload_label"]

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 544


def check_filename(filename: str | None, field: str) -> str:
    """The client's file name if it is a plain name; :class:`ServingError` (400) otherwise."""
    if filename is None or filename == "":
        return ""
    bad = ("/" in filename or "\\" in filename or ".." in filename or len(filename) > 255
           or any(ord(ch) < 32 or ord(ch) == 127 for ch in filename))
    if bad:
        raise ServingError(400,
                           f"unsafe upload filename {filename!r} (a plain file name without folders or '..' is "
                           f"required)", field)
    return filename


def upload_label(field: str, filename: str = "") -> str:
    """How messages name an upload: ``t1 upload 'scan.nii.gz'`` (the name was checked by :func:`check_filename`)."""
    return f"{field} upload '{filename}'" if filename else f"{field} upload"


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    if len(head) >= 540 and head[4:8] == b"n+2\x00":
        return struct.unpack("<i", head[:4])[0] == 540 or struct.unpack(">i", head[:4])[0] == 540
    return False


def nifti_suffix(stream: BinaryIO, source: str) -> str:
    """``".nii"`` or ``".nii.gz"`` from the first bytes of ``stream`` (rewound afterwards).

    Raises :class:`ServingError` 415 when the content is not a single-file NIfTI (whatever its
    name says) and 422 when it is a gzip stream too corrupt to read the header from.
    """
    stream.seek(0)
    head = stream.read(_HEADER_BYTES)
    suffix = ".nii"
    if head[:2] == _GZIP_MAGIC:
        stream.seek(0)
        try:
            with gzip.GzipFile(fileobj=stream, mode="rb") as gz:
                head = gz.read(_HEADER_BYTES)
        except (OSError, EOFError, zlib.error) as err:
            stream.seek(0)
            raise ServingError(422, f"corrupt gzip stream, cannot read the NIfTI header ({type(err).__name__})",
                               source) from None
        suffix = ".nii.gz"
    stream.seek(0)
    if not _is_nifti_header(head):
        raise ServingError(415,
                           "not a NIfTI file (no NIfTI-1/NIfTI-2 header magic; only single-file .nii / .nii.gz are "
                           "accepted)", source)
    return suffix


def _check_declared_size(path: Path, max_voxels: float, source: str) -> None:
    """Refuse a header declaring more than ``max_voxels`` voxels before any data is read (a small
    gzip can declare, and decompress to, a huge volume). Unreadable headers are left to the loader."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # noqa: BLE001 - load_volume reports it as one line later
        return
    voxels = float(np.prod([float(s) for s in shape])) if shape else 0.0
    if voxels > max_voxels:
        raise ServingError(413,
                           f"image of shape {tuple(int(s) for s in shape)} has {voxels:,.0f} voxels, above the limit "
                           f"of {max_voxels:,.0f}", source)


def store_upload(stream: BinaryIO, folder: Path, field: str, source: str, max_voxels: float = float("inf")) -> Path:
    """Check ``stream`` is NIfTI and copy it to ``folder/<field>.nii[.gz]``; returns that path.

    ``max_voxels``: largest volume the header may declare (413 above).
    """
    suffix = nifti_suffix(stream, source)
    path = Path(folder) / f"{field}{suffix}"
    with open(path, "wb") as out:
        shutil.copyfileobj(stream, out, length=1 << 20)
    _check_declared_size(path, max_voxels, source)
    return path
