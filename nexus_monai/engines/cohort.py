"""A cohort in one command (``nexus-sr predict --datalist cohort.json --out DIR``): resumable, spread over ranks.

The datalist is MONAI's decathlon form with a ``testing`` list of subjects::

    {"testing": [{"t1": "sub-01/t1.nii.gz", "t2": "sub-01/t2.nii.gz"},
                 {"t1": "sub-02/T1_series", "t2": "sub-02/T2_series", "name": "sub-02", "like": "sub-02/ref.nii.gz"}]}

``t1`` / ``t2``: NIfTI files or DICOM series folders; ``like`` (optional): the output grid of that
subject (else ``--like`` / ``--spacing``); ``mask`` (optional): that subject's brain mask on its T1w grid
(else the command's ``--mask`` / ``--skull-strip`` / ``--keep-background``); ``name`` (optional, or
``subject``): its output folder under ``DIR``, by default the T1w path relative to the JSON's folder with
``/`` -> ``_`` and the suffix dropped. Relative paths are relative to the JSON's folder.

* Each subject goes through :func:`~nexus_monai.engines.predict.predict_files` into ``DIR/<name>/``
  (staged: the folder appears complete or not at all), so **a subject is done when its outputs
  exist**: a re-run skips it, whatever the rank count of either run.
* Ranks: under ``torchrun`` the subjects are split by ``RANK`` / ``WORLD_SIZE`` (subject ``i`` of the
  datalist goes to rank ``i % WORLD_SIZE``: a fixed split that needs no communication, so ranks never
  wait on each other); each rank takes ``cuda:<LOCAL_RANK>`` when there are GPUs.
* A bad subject (missing or corrupt scan, unreachable grid, out of memory ...) is a row of the table
  with its error, not a stop; a rank always exits 0 (a non-zero exit would make torchrun stop the other
  ranks), and the summary line and the table say what failed.
* Table: each rank rewrites ``DIR/cohort_ranks/rank<r>_of_<W>.csv`` after every subject and, when it
  ends, writes ``rank<r>_of_<W>.done``; a rank that ends and finds all ``W`` markers merges the ``W``
  tables into ``DIR/cohort.csv`` (in datalist order). The last rank to end therefore writes the
  complete table; no barrier (a process-group barrier would time out while a slow rank still works).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nexus_monai.data.io import write_text_atomic
from nexus_monai.data.staging import check_output_dir
from nexus_monai.engines.predict import OUT_FORMATS, output_names, predict_files
from nexus_monai.errors import NexusInputError, find_input_error

__all__ = ["CohortSubject", "read_cohort", "rank_and_world", "rank_device", "subject_done", "predict_cohort",
           "merge_rank_tables", "COLUMNS", "TABLE", "RANK_FOLDER"]

TABLE = "cohort.csv"
RANK_FOLDER = "cohort_ranks"
COLUMNS = ("subject", "status", "error", "rank", "device", "seconds_total", "seconds_load", "seconds_predict",
           "seconds_write", "grid_shape", "spacing_mm", "motion_mm", "angle_deg", "registered", "t1", "t2")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CohortSubject:
    """One datalist entry: output folder ``name``, scans ``t1`` / ``t2`` (absolute paths), optional grid ``like``
    and brain ``mask``."""

    index: int
    name: str
    t1: str
    t2: str
    like: str | None = None
    mask: str | None = None


def _resolve(base: Path, value) -> str:
    path = Path(os.path.expanduser(str(value)))
    return str(path if path.is_absolute() else base / path)


def _default_name(base: Path, t1: str) -> str:
    path = Path(t1)
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(*path.parts[-2:])
    text = str(rel)
    for suffix in _SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:128] or "subject"


def read_cohort(path: str | os.PathLike, key: str = "testing") -> list[CohortSubject]:
    """The ``key`` list of a decathlon datalist as :class:`CohortSubject` s; a one-line :class:`NexusInputError`
    naming the JSON for anything that is not a usable datalist (the scans themselves are checked per subject)."""
    path = Path(path)
    if not path.is_file():
        raise NexusInputError(path, "datalist not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NexusInputError(path, f"not a JSON datalist ({type(err).__name__})") from None
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise NexusInputError(path,
                              f"a datalist needs a non-empty {key!r} list of {{\"t1\": ..., \"t2\": ...}} entries")
    base = path.parent.absolute()
    subjects, seen = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(c), str) and entry[c] for c in ("t1", "t2")):
            raise NexusInputError(path,
                                  f"{key}[{i}] needs \"t1\" and \"t2\" paths (NIfTI files or DICOM series folders)")
        t1, t2 = _resolve(base, entry["t1"]), _resolve(base, entry["t2"])
        like, mask = entry.get("like"), entry.get("mask")
        for field, value in (("like", like), ("mask", mask)):
            if value is not None and not (isinstance(value, str) and value):
                raise NexusInputError(path, f"{key}[{i}]: \"{field}\" must be a path")
        name = entry.get("name", entry.get("subject"))
        if name is None:
            name = _default_name(base, t1)
        elif not (isinstance(name, str) and _SAFE_NAME.match(name)):
            raise NexusInputError(path,
                                  f"{key}[{i}]: name {name!r} is not a plain folder name (letters, digits, . _ -)")
        if name in seen:
            raise NexusInputError(path, f"{key}[{i}] and {key}[{seen[name]}] share the output name {name!r}; "
                                        "give each a distinct \"name\"")
        seen[name] = i
        subjects.append(CohortSubject(i, name, t1, t2, None if like is None else _resolve(base, like),
                                      None if mask is None else _resolve(base, mask)))
    return subjects


def rank_and_world() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise NexusInputError(None, "RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise NexusInputError(None, f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local


def rank_device(requested: str | None, local_rank: int) -> str:
    """The device of this rank: ``requested`` as given, except that ``cuda`` (or nothing, with GPUs present)
    becomes ``cuda:<local_rank mod GPUs>`` so every rank on a node has its own GPU."""
    import torch

    if requested not in (None, "cuda") or not torch.cuda.is_available():
        return requested or "cpu"
    device = f"cuda:{local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    return device


def subject_done(out_dir: str | os.PathLike, subject: CohortSubject, out_format: str = "nifti") -> bool:
    """True when ``out_dir/<name>/`` holds both outputs (written by a staged swap, so then complete)."""
    names = output_names(out_format)
    folder = Path(out_dir) / subject.name
    return all((folder / n).exists() for n in names.values())


def _rank_paths(out_dir: Path, rank: int, world: int) -> tuple[Path, Path]:
    stem = out_dir / RANK_FOLDER / f"rank{rank}_of_{world}"
    return stem.with_suffix(".csv"), stem.with_suffix(".done")


def _csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _one_line(err: BaseException) -> str:
    found = find_input_error(err)
    if found is not None:
        return str(found)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def predict_cohort(network, inferer, subjects: Sequence[CohortSubject], out_dir: str | os.PathLike, *,
                   spacing_mm: Sequence[float] | None = None, like: str | None = None, out_format: str = "nifti",
                   guard: bool = True, refine_seconds: float = 0.0, max_voxels: float = 2e9, scans=None,
                   rank: int = 0, world: int = 1, device: str = "cpu", progress: bool = True,
                   log=print) -> dict:
    """Predict this rank's share of ``subjects`` into ``out_dir/<name>/``; returns a summary.

    The grid of a subject: its ``like``, else ``like``, else ``spacing_mm`` over its T1w field of view.
    ``scans``: :class:`~nexus_monai.engines.scan_prep.ScanOptions` for every subject (None: the scans as
    read); a subject's ``mask`` replaces its mask / skull stripping.
    Returns ``{"rank", "world", "assigned", "done", "skipped", "errors", "table", "merged"}`` (``merged``:
    the path of ``cohort.csv`` when this rank merged it, else None). See the module docstring.
    """
    from tqdm.auto import tqdm

    if out_format not in OUT_FORMATS:
        raise NexusInputError(None, f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    out = check_output_dir(out_dir, None, what="cohort output folder")
    if spacing_mm is None and like is None and any(s.like is None for s in subjects):
        raise NexusInputError(None, "give --spacing or --like for the cohort (or a \"like\" in every entry)")
    table, marker = _rank_paths(out, rank, world)
    table.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    mine = [s for s in subjects if s.index % world == rank]
    rows, counts = [], {"done": 0, "skipped": 0, "error": 0}
    bar = tqdm(mine, desc=f"cohort rank {rank}/{world}", unit="subject", position=rank, disable=not progress,
               dynamic_ncols=True)
    for subject in bar:
        row = {"subject": subject.name, "rank": rank, "device": device, "t1": subject.t1, "t2": subject.t2,
               "error": ""}
        started = time.perf_counter()
        if subject_done(out, subject, out_format):
            row["status"] = "skipped"
        else:
            try:
                result = predict_files(network, subject.t1, subject.t2, out / subject.name,
                                       spacing_mm=None if (subject.like or like) else spacing_mm,
                                       like=subject.like or like, inferer=inferer, max_voxels=max_voxels,
                                       refine_seconds=refine_seconds, guard=guard, out_format=out_format,
                                       scans=_subject_scans(scans, subject))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # noqa: BLE001 - a bad subject is a row, not a stop
                row.update(status="error", error=_one_line(err))
                if find_input_error(err) is None:  # not a bad input: the traceback helps, on stderr only
                    log(f"cohort rank {rank}: {subject.name}: {traceback.format_exc(limit=3)}")
            else:
                row.update(status="done", grid_shape="x".join(str(n) for n in result["grid_shape"]),
                           spacing_mm=" ".join(f"{v:g}" for v in result["spacing_mm"]),
                           **{f"seconds_{k}": f"{v:.3f}" for k, v in result["seconds"].items()},
                           **_motion_columns(result))
        row["seconds_total"] = f"{time.perf_counter() - started:.3f}"
        counts[row["status"]] += 1
        rows.append(row)
        write_text_atomic(table, _csv_text(rows))
        bar.set_postfix(done=counts["done"], skipped=counts["skipped"], errors=counts["error"])
    bar.close()
    write_text_atomic(table, _csv_text(rows))
    write_text_atomic(marker, f"{len(rows)}\n")
    merged = merge_rank_tables(out, world, [s.name for s in subjects])
    return {"rank": rank, "world": world, "assigned": len(mine), "done": counts["done"], "skipped": counts["skipped"],
            "errors": counts["error"], "table": table, "merged": merged}


def _motion_columns(result: dict) -> dict:
    """The T2w -> T1w registration of a subject (``registration.json`` beside its outputs) in three columns."""
    reg = (result.get("scans") or {}).get("registration")
    if not reg:
        return {}
    nan = float("nan")
    return {"motion_mm": f"{reg.get('motion_mm', nan):.3f}", "angle_deg": f"{reg.get('angle_deg', nan):.3f}",
            "registered": "yes" if reg.get("accepted") else f"no: {reg.get('reason', '')}"}


def _subject_scans(scans, subject: CohortSubject):
    """The command's scan options with this subject's own brain mask, where the datalist gives one."""
    if subject.mask is None:
        return scans
    if scans is None:
        from nexus_monai.engines.scan_prep import ScanOptions

        return ScanOptions(mask=subject.mask)
    return dataclasses.replace(scans, mask=subject.mask, skull_strip=False)


def merge_rank_tables(out_dir: str | os.PathLike, world: int, order: Sequence[str] | None = None) -> Path | None:
    """Merge ``cohort_ranks/rank*_of_<world>.csv`` into ``cohort.csv`` once all ``world`` ranks wrote their
    ``.done`` marker (rows in ``order`` of subject names where given); None while a rank is still running."""
    out = Path(out_dir)
    paths = [_rank_paths(out, r, world) for r in range(world)]
    if not all(marker.exists() and table.exists() for table, marker in paths):
        return None
    rows = []
    for table, _ in paths:
        with open(table, newline="") as f:
            rows.extend(csv.DictReader(f))
    if order is not None:
        position = {name: i for i, name in enumerate(order)}
        rows.sort(key=lambda r: position.get(r["subject"], len(position)))
    return write_text_atomic(out / TABLE, _csv_text(rows))
