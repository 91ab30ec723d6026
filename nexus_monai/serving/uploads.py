"""Uploaded scans: accept only NIfTI (by its magic bytes) or a zip of one DICOM series, stored under names the
server chooses.

The client's filename is checked (no folders, no ``..``, no control characters) and used only
in messages; the stored file is ``<request folder>/<field>.nii[.gz]``, so nothing a client sends
ever becomes a path.

NIfTI-1 single file: ``sizeof_hdr`` = 348 (little or big endian) and magic ``n+1\\0`` at byte 344.
NIfTI-2: ``sizeof_hdr`` = 540 and magic ``n+2\\0`` at byte 4. A gzip stream (``1f 8b``) is
decompressed just far enough to check the same header.

A zip (``PK\\x03\\x04``) holds one DICOM series (:func:`store_series_zip`): a member whose name is absolute
or has a ``..`` part (zip-slip), a link, more than ``MAX_ZIP_MEMBERS`` files, or more uncompressed bytes
than the limit (counted while extracting, whatever the zip declares) is refused before the series is read;
the files are stored flat as ``<request folder>/<field>_series/00001.dcm ...`` (member names never become
paths). ``__MACOSX`` / hidden members and a ``DICOMDIR`` are skipped. Nothing about the series' content is
logged or put into messages (patient tags stay in the files).
"""

from __future__ import annotations

import gzip
import shutil
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from nexus_monai.serving.params import ServingError

__all__ = ["check_filename", "nifti_suffix", "store_upload", "upload_label", "store_series_zip", "MAX_ZIP_MEMBERS"]

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip
MAX_ZIP_MEMBERS = 4096  # slices of one series (a 0.5 mm whole-head series has ~500)
_DICOM_FILE_OVERHEAD = 64 << 10  # header bytes allowed per slice beside its pixels
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


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts
            or any(ord(ch) < 32 for ch in name))


def _skipped_member(name: str) -> bool:
    """macOS resource forks, hidden files and a DICOMDIR index: not slices."""
    parts = name.replace("\\", "/").split("/")
    return parts[-1].upper() == "DICOMDIR" or any((p.startswith(".") and p != ".") or p == "__MACOSX" for p in parts)


def store_series_zip(stream: BinaryIO, folder: Path, field: str, source: str, max_voxels: float = float("inf"),
                     max_members: int = MAX_ZIP_MEMBERS) -> Path:
    """Extract a zip of one DICOM series into ``folder/<field>_series/`` (flat, server-chosen names); returns it.

    Refusals (:class:`ServingError`): 400 a member with an absolute or ``..`` path or a link; 413 more than
    ``max_members`` files or more than ``4 * max_voxels`` bytes of pixels (+ 64 KiB of header per file)
    once decompressed; 422 a corrupt zip. The series itself is checked when it is read
    (:func:`~nexus_monai.data.dicom.read_dicom_series`).
    """
    stream.seek(0)
    try:
        archive = zipfile.ZipFile(stream)
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise ServingError(422, f"corrupt zip archive ({type(err).__name__})", source) from None
    for info in members:
        if _unsafe_member(info.filename):
            raise ServingError(400, "unsafe path in the zip (absolute or with '..'); a zip of one series folder is "
                                    "expected", source)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ServingError(400, "the zip holds a symbolic link; only plain files are accepted", source)
    files = [i for i in members if not i.is_dir() and not _skipped_member(i.filename)]
    if not files:
        raise ServingError(422, "the zip holds no files (a zip of one DICOM series folder is expected)", source)
    if len(files) > max_members:
        raise ServingError(413, f"the zip holds {len(files)} files, above the limit of {max_members}", source)
    budget = 4.0 * max_voxels + _DICOM_FILE_OVERHEAD * len(files)
    target = Path(folder) / f"{field}_series"
    target.mkdir()
    written = 0
    try:
        for n, info in enumerate(files, start=1):
            with archive.open(info) as src, open(target / f"{n:05d}.dcm", "wb") as out:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > budget:
                        raise ServingError(413, f"the zip decompresses to more than {budget / 2**20:,.0f} MiB, above "
                                                f"the limit for {max_voxels:,.0f} voxels", source)
                    out.write(block)
    except ServingError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError, RuntimeError) as err:
        raise ServingError(422, f"corrupt zip archive: cannot extract it ({type(err).__name__})", source) from None
    _check_series_size(target, len(files), max_voxels, source)
    return target


def _check_series_size(target: Path, n_files: int, max_voxels: float, source: str) -> None:
    """Refuse (413) a series whose first header declares rows x columns x files above ``max_voxels``."""
    import pydicom

    try:
        first = pydicom.dcmread(next(iter(sorted(target.iterdir()))), stop_before_pixels=True,
                                specific_tags=["Rows", "Columns", "NumberOfFrames"])
        voxels = float(first.Rows) * float(first.Columns) * n_files * float(first.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - not DICOM: the series reader says so in one line later
        return
    if voxels > max_voxels:
        raise ServingError(413, f"the series declares {voxels:,.0f} voxels, above the limit of {max_voxels:,.0f}",
                           source)


def store_upload(stream: BinaryIO, folder: Path, field: str, source: str, max_voxels: float = float("inf")) -> Path:
    """Check ``stream`` is NIfTI and copy it to ``folder/<field>.nii[.gz]``, or extract a zip of one DICOM series
    to ``folder/<field>_series/`` (:func:`store_series_zip`); returns that path.

    ``max_voxels``: largest volume the header may declare (413 above).
    """
    stream.seek(0)
    if stream.read(4) in _ZIP_MAGIC:
        return store_series_zip(stream, folder, field, source, max_voxels)
    suffix = nifti_suffix(stream, source)
    path = Path(folder) / f"{field}{suffix}"
    with open(path, "wb") as out:
        shutil.copyfileobj(stream, out, length=1 << 20)
    _check_declared_size(path, max_voxels, source)
    return path
