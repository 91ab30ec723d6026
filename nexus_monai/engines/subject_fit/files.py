"""Subject fits on files: the outputs of one fit, fitting two NIfTI scans, and the datalist runner with its report.

* :func:`write_fit_outputs`: ``t1w_sr.nii.gz``, ``t2w_sr.nii.gz`` and ``fit_log.json``, all three or none.
* :func:`fit_files`: ``nexus-sr fit-subject`` and the ``ssmcsr`` bundle's ``inference``.
* :func:`check_datalist`, :class:`FitSubjectStep`, :class:`FitSubjectsReport`: the bundle's
  ``training`` / ``evaluating`` workflows, one subject per iteration, a CSV and summary at the end.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from nexus_monai.data.dicom import load_scan
from nexus_monai.data.io import load_volume, save_volume, write_text_atomic
from nexus_monai.data.staging import check_output_dir, staged_output_dir
from nexus_monai.engines.predict import check_reachable, target_grid
from nexus_monai.engines.scan_prep import REGISTRATION_NAME, ScanOptions, prepare_scans, report_json
from nexus_monai.engines.subject_fit.workflow import SubjectFitter
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, plain_tensor
from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics import subject_metric_row
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.transforms.protocols import load_protocol
from nexus_monai.visualize import save_panel, to_uint8

__all__ = ["OUTPUT_NAMES", "write_fit_outputs", "check_datalist", "FitSubjectStep", "FitSubjectsReport", "fit_files"]

OUTPUT_NAMES = {"t1": "t1w_sr.nii.gz", "t2": "t2w_sr.nii.gz", "log": "fit_log.json"}


def write_fit_outputs(pred: Mapping[str, MetaTensor], log: Mapping, out_dir: str | os.PathLike,
                      scans: Mapping | None = None) -> dict[str, Path]:
    """``t1w_sr.nii.gz``, ``t2w_sr.nii.gz`` and ``fit_log.json`` in ``out_dir``; all three or none
    (with ``scans``, the report of :func:`~nexus_monai.engines.scan_prep.prepare_scans`, also ``registration.json``).

    Written into a temporary sibling folder that replaces ``out_dir`` in one rename, so even a
    killed run leaves the previous complete output or this one, never a mix."""
    out = Path(out_dir)
    with staged_output_dir(out) as stage:
        for c in CONTRASTS:
            save_volume(pred[c], stage / OUTPUT_NAMES[c])
        write_text_atomic(stage / OUTPUT_NAMES["log"], json.dumps(log, indent=2, default=float) + "\n")
        if scans:
            write_text_atomic(stage / REGISTRATION_NAME, report_json(scans))
    return {k: out / name for k, name in OUTPUT_NAMES.items()}


# --- fitting the subjects of a datalist (the bundle's `training` / `evaluating`) -----------------
def check_datalist(entries, keys_hr=("t1", "t2"), keys_lr=("t1_lr", "t2_lr")) -> list[dict]:
    """Every entry must name existing files: ``t1_lr``/``t2_lr`` (real LR scans) or ``t1``/``t2`` (HR,
    simulated with the protocol). Raises one :class:`NexusInputError` before any fitting starts."""
    entries = list(entries)
    if not entries:
        raise NexusInputError(None, "the datalist split has no subjects to fit")
    for e in entries:
        keys = keys_lr if all(k in e for k in keys_lr) else keys_hr
        for k in keys:
            if k not in e:
                raise NexusInputError(e.get("subject"), f"datalist entry has neither {'/'.join(keys_lr)} nor {k!r}")
            if not Path(e[k]).is_file():
                raise NexusInputError(e[k], f"{k} file of subject {e.get('subject', '?')} not found")
    return entries


class FitSubjectStep:
    """``Engine(FitSubjectStep(...))`` over datalist entries: fit one subject per iteration.

    An entry with ``t1_lr``/``t2_lr`` is fitted as is and rendered at ``target_spacing`` (mm) over
    the T1w field of view; an entry with HR ``t1``/``t2`` is put on the protocol frame, its LR scans
    are simulated with the protocol (as ``nexus-sr evaluate`` does) and the result is rendered on
    the HR grid and scored with :func:`~nexus_monai.metrics.subject_metric_row` (and trilinear, for
    the gain). Writes ``<output_dir>/<subject>/{t1w_sr,t2w_sr}.nii.gz`` and ``fit_log.json``.
    Output: ``[{"subject", "loss", "seconds_fit", "stop_reason", "stop_epoch", metrics...}]`` (one
    subject, as a decollated list like MONAI's engines, so ``from_engine(["loss"], first=True)`` works).
    """

    def __init__(self, fitter: SubjectFitter, output_dir: str | os.PathLike, protocol: str = "nexus",
                 target_spacing=(1.0, 1.0, 1.0), compare_trilinear: bool = True, lpips: bool = False):
        self.fitter, self.output_dir, self.protocol_name = fitter, Path(output_dir), protocol
        self.target_spacing, self.compare_trilinear, self.lpips = target_spacing, compare_trilinear, lpips
        self._protocol = None

    def __call__(self, engine: Engine, entry: Mapping) -> dict:
        entry = entry[0] if isinstance(entry, (list, tuple)) else entry
        name = str(entry.get("subject") or Path(str(entry.get("t1_lr", entry.get("t1")))).name.split(".")[0])
        gt = None
        if "t1_lr" in entry and "t2_lr" in entry:
            lr = {c: load_volume(entry[f"{c}_lr"]) for c in CONTRASTS}
            grid = target_grid(lr["t1"], list(self.target_spacing))
        else:
            self._protocol = self._protocol or load_protocol(self.protocol_name)
            data = self._protocol.prepare_subject(dict(entry))
            lr = {c: data[f"{c}_lr"] for c in CONTRASTS}
            grid = TargetGrid.like(data["t1"])
            gt = {c: plain_tensor(data[c])[0] for c in CONTRASTS}
        pred, log = self.fitter.fit_predict(lr["t1"], lr["t2"], grid)
        log["subject"] = name
        write_fit_outputs(pred, log, self.output_dir / name)
        last = log["epochs"][-1] if log["epochs"] else {}
        row = {"subject": name, "loss": float(last.get("loss_t1", math.nan) + last.get("loss_t2", math.nan)),
               "seconds_fit": log["seconds_fit"], "seconds_predict": log["seconds_predict"],
               "stop_reason": log["stop_reason"], "stop_epoch": log["stop_epoch"],
               "mi_final": log["mi_curve"][-1]["mi"] if log["mi_curve"] else math.nan}
        if gt is not None:
            scores = subject_metric_row(gt, {c: plain_tensor(pred[c])[0] for c in CONTRASTS}, None, lpips=self.lpips)
            row.update({k: v for k, v in scores.items() if k != "lpips_status"})
            if self.compare_trilinear:
                tri = {c: plain_tensor(upsample(lr[c], grid, "trilinear"))[0] for c in CONTRASTS}
                ref = subject_metric_row(gt, tri, None, lpips=False)
                for c in CONTRASTS:
                    row[f"trilinear_psnr_{c}"] = ref[f"psnr_{c}"]
                    row[f"gain_psnr_{c}"] = row[f"psnr_{c}"] - ref[f"psnr_{c}"]
        return [row]


class FitSubjectsReport:
    """Collects the rows of :class:`FitSubjectStep`; at the end writes ``<output_dir>/<prefix>_subjects.csv``
    and ``<prefix>_summary.json`` and puts the mean of every numeric column in ``engine.state.metrics``
    (so StatsHandler prints and an attached MLFlowHandler logs them). For
    :class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger` (an MLflow image and table) it leaves
    ``engine.state.validation_report``: the rows and ``<prefix>_panel.png``, the first subject's SR
    volumes as written by the step (``<output_dir>/<subject>/t?w_sr.nii.gz``; rows T1w, T2w; columns the
    middle slice of each axis through the foreground)."""

    def __init__(self, output_dir: str | os.PathLike, prefix: str = "fit"):
        self.output_dir, self.prefix = Path(output_dir), prefix
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED,
                                 lambda e: self.rows.extend(dict(r) for r in e.state.output))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        frame = pd.DataFrame(self.rows)
        write_text_atomic(self.output_dir / f"{self.prefix}_subjects.csv", frame.to_csv(index=False))
        summary = {}
        for col in frame.columns:
            if col != "subject" and pd.api.types.is_numeric_dtype(frame[col]):
                vals = frame[col].astype(float).dropna()
                if len(vals):
                    summary[col] = float(vals.mean())
                    engine.state.metrics[col] = summary[col]
        text = json.dumps({"subjects": len(frame), "mean": summary}, indent=2) + "\n"
        write_text_atomic(self.output_dir / f"{self.prefix}_summary.json", text)
        panel = self._panel(str(self.rows[0].get("subject", ""))) if self.rows else None
        engine.state.validation_report = {"epoch": engine.state.epoch, "panel": panel, "rows": list(self.rows)}

    def _panel(self, subject: str) -> str | None:
        files = [self.output_dir / subject / OUTPUT_NAMES[c] for c in CONTRASTS]
        if not subject or not all(f.is_file() for f in files):
            return None
        tiles = []
        for f in files:
            vol = plain_tensor(load_volume(f))[0].float().numpy()
            fg = vol > 0
            vmax = intensity_scale(vol, fg) if fg.any() else 1.0
            centre = [int(np.median(i)) if len(i) else n // 2 for i, n in zip(np.nonzero(fg), vol.shape)]
            tiles.append([to_uint8(np.take(vol, centre[a], axis=a), vmax) for a in range(3)])
        path = self.output_dir / f"{self.prefix}_panel.png"
        save_panel(tiles, path, row_labels=["T1w SR", "T2w SR"], col_labels=["x slice", "y slice", "z slice"])
        return str(path)


def fit_files(fitter: SubjectFitter, t1: str | os.PathLike, t2: str | os.PathLike, out_dir: str | os.PathLike,
              spacing_mm=None, like: str | os.PathLike | None = None, max_voxels: float = 2e9,
              scans: ScanOptions | None = None) -> dict:
    """Fit on two LR scans (NIfTI files or DICOM series folders) and write both SR volumes + ``fit_log.json``
    (``nexus-sr fit-subject`` and the bundle's ``inference``). The grid is ``spacing_mm`` over the T1w field
    of view or the grid of ``like``; inputs and grid are checked before any fitting (one-line
    :class:`NexusInputError`). ``scans``: mask / skull / registration as in ``predict``
    (:func:`~nexus_monai.engines.scan_prep.prepare_scans`; None: the scans as read)."""
    sources = {"t1": str(t1), "t2": str(t2)}
    for c, path in sources.items():
        if path in ("", "None") or not Path(path).exists():
            missing = path in ("", "None")
            raise NexusInputError(None if missing else path, f"missing {c} input scan" if missing else "file not found")
    check_output_dir(out_dir, [*OUTPUT_NAMES.values(), REGISTRATION_NAME])
    lr = {c: load_scan(p) for c, p in sources.items()}  # NIfTI files or DICOM series folders
    if spacing_mm is not None and not isinstance(spacing_mm, (list, tuple)):
        spacing_mm = [float(spacing_mm)] * 3
    grid = target_grid(lr["t1"], None if like else spacing_mm, like)
    check_reachable(grid, lr, sources, max_voxels)
    report = {}
    if scans is not None:  # mask / skull / zero-background check, then T2w -> T1w registration (its affine only)
        lr, report = prepare_scans(lr, sources, scans)
    pred, log = fitter.fit_predict(lr["t1"], lr["t2"], grid)
    log["inputs"] = sources
    written = write_fit_outputs(pred, log, out_dir, report)
    return {**written, "grid_shape": grid.shape, "log": log, "log_path": written["log"], "scans": report}
