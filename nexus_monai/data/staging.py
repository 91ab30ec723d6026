"""Crash-safe outputs: durable single files, and multi-file outputs swapped into place as one unit.

A command that writes several files that belong together (``t1w_sr.nii.gz`` + ``t2w_sr.nii.gz``
+ ``fit_log.json``, a results table set) must never leave a mix of an earlier run's files and
this run's, whatever moment it is killed at. :func:`staged_output_dir` writes them into a
temporary sibling folder ``.<name>.staging-<pid>-<random>`` and, once every file is complete and
synced, exchanges that folder with ``<name>`` in ONE ``renameat2(RENAME_EXCHANGE)`` system call
(Linux; elsewhere two renames, with the earlier output restored by the next run if a kill falls
between them). A reader therefore sees the previous complete output or the new complete one.
Temporaries of killed runs (their process is gone) are removed by the next run on the same output.

An output folder must be new, empty, or hold only files of the same kind of output
(:func:`check_output_dir`): the swap replaces the whole folder, so a folder with other files is
refused before any work instead of being swapped away.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from nexus_monai.data.io import fsync_path, write_text_atomic
from nexus_monai.errors import NexusInputError

__all__ = ["check_output_dir", "check_output_file", "staged_output_dir", "remove_stale_temporaries",
           "exchange_paths", "invalidate_manifest", "write_manifest", "check_manifest", "MANIFEST"]

_RENAME_EXCHANGE = 2
_STAGE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp(\.nii\.gz|\.[A-Za-z0-9]+)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_parent(path: Path, what: str) -> None:
    """``path``'s nearest existing ancestor must be a folder we can create files in (probed, not guessed)."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise NexusInputError(path, f"cannot write the {what}: {anchor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nexus-write-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise NexusInputError(
            path, f"cannot write the {what}: folder {anchor} is not writable ({err.strerror or err})"
        ) from None


def check_output_file(path: str | os.PathLike, suffixes: Iterable[str] = (".nii.gz", ".nii"),
                      what: str = "output") -> Path:
    """Check an output FILE path before any work: right suffix, not a folder, parent creatable and writable."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.is_dir():
        raise NexusInputError(path,
                              f"{what} is an existing folder; give a file name ({' or '.join(suffixes) or 'any'})")
    if suffixes and not path.name.endswith(suffixes):
        raise NexusInputError(path, f"{what} must be a {' or '.join(suffixes)} file")
    _check_writable_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, owned: Iterable[str] | None, what: str = "output folder") -> Path:
    """Check an output FOLDER before any work: not a file, creatable and writable, and holding nothing
    but ``owned`` names (an earlier run's outputs, replaced as a whole) and stale temporaries
    (``owned=None``: a folder the command adds files to, any content allowed)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NexusInputError(path, f"{what} is an existing file, not a folder")
    _check_writable_parent(path / "x", what)
    if path.is_dir() and owned is not None:
        owned = set(owned)
        foreign = sorted(p.name for p in path.iterdir() if p.name not in owned and not _TMP_FILE.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise NexusInputError(path, f"{what} holds other files ({shown}); give a new or empty folder "
                                        "(an earlier run's outputs are replaced as a whole)")
    return path


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove ``target``'s staging folders and temporary files left by killed runs; return what was removed.

    Staging/old folders of a process that is still running are left alone. If ``target`` is
    missing but a killed run's ``.old`` folder holds the previous output (a kill between the
    two renames of the non-Linux fallback), that folder is moved back first.
    """
    target = Path(target)
    parent = target.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        m = _STAGE.match(p.name)
        if m and m["name"] == target.name and not _pid_alive(int(m["pid"])):
            if m["kind"] == "old" and not target.exists():
                os.rename(p, target)  # the previous output, put back
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() and (t := _TMP_FILE.match(p.name)) and t["name"] == target.name:
            p.unlink(missing_ok=True)
            removed.append(p)
    if target.is_dir():  # temporary files of single-file writes inside an earlier output
        for p in target.iterdir():
            if p.is_file() and _TMP_FILE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _commit(stage: Path, target: Path) -> None:
    """Put the complete ``stage`` folder in the place of ``target`` (one rename when possible)."""
    fsync_path(stage)
    if not target.exists():
        os.rename(stage, target)
    elif exchange_paths(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # now holds the previous output
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(target, old)
        os.rename(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)


@contextmanager
def staged_output_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target`` to write every output file into; on a clean exit
    it replaces ``target`` in one rename, on an exception it is removed (``target`` untouched).

    Stale temporaries of killed runs on the same ``target`` are removed first.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    os.chmod(stage, 0o755)  # mkdtemp makes 0700; outputs are ordinary shared folders
    try:
        yield stage
        for f in stage.iterdir():
            fsync_path(f)
        _commit(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


MANIFEST = "manifest.json"


def invalidate_manifest(folder: str | os.PathLike) -> None:
    """Mark an output folder's file set as incomplete before a run rewrites it (removes its manifest).

    For outputs that are written file by file into a folder that holds more than the set (e.g.
    ``nexus-sr evaluate``'s tables beside its panels): the manifest, written LAST by
    :func:`write_manifest`, is the mark of a complete set, so a run killed while rewriting the files
    leaves a folder without a manifest (incomplete), never a mix that claims to be whole.
    """
    path = Path(folder) / MANIFEST
    if path.exists():
        path.unlink()
        fsync_path(path.parent)


def write_manifest(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Write ``<folder>/manifest.json`` (atomically, last) listing ``files`` (paths inside ``folder``,
    absolute or relative to it) with their sizes and sha256."""
    folder = Path(folder)
    entries = {}
    for f in map(Path, files):
        f = f if f.is_absolute() else folder / f
        entries[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size,
                                                     "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    body = {"complete": True, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": entries}
    return write_text_atomic(folder / MANIFEST, json.dumps(body, indent=1) + "\n")


def check_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a complete output folder; a one-line error when it is missing or a listed file
    is missing or changed (a run was killed while writing, or the files were edited afterwards)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise NexusInputError(folder, f"incomplete output: no {MANIFEST} (the run that wrote it did not finish)")
    body = json.loads(path.read_text())
    for name, entry in body["files"].items():
        f = folder / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != entry["sha256"]:
            raise NexusInputError(f, f"missing or changed since {MANIFEST} was written")
    return body
