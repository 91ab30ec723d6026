"""Table 1 runner: simulate the protocol's LR scans, run every method, score every subject.

Same subjects, same simulated inputs and the same metric code (:func:`subject_metric_row`) for
every method. Outputs in ``out_dir``: ``per_subject.csv``, ``table1.csv``, ``table1.md`` and
``panel_<subject>.png`` (every method, failed ones as a black tile), and optionally an MLflow run
with the parameters, every table mean/std and those files as artifacts. A method that fails on a
subject gets a row with its error and is counted as failed in the table, never dropped silently.
``seconds`` is each method's wall-clock time per subject: fitting + inference for subject-specific
methods (SSMCSR, LRTV), inference only for cohort models, whose bundle training budget is reported
beside their row instead (``train_steps``, ``train_seconds`` from the bundle's ``training_run.json``).
Subjects whose datalist entry has a lesion instance map (key ``lesions``) also get the lesion-fidelity
columns (``lesion_contrast_t2``, ``imprint_t1``, ...; by lesion size relative to the slab thickness of the
contrast that shows it: ``lesion_contrast_t2_small``, ...) and ``table1.md`` the lesion-fidelity tables.
Put ``ibp`` (trilinear + the consistency guard of ``nexus-sr predict``, no network) beside the learned
methods: it is the floor they must clear (``nexus-sr evaluate``'s default methods include it).

The loop is :class:`~nexus_monai.evaluation.evaluator.MethodEvaluator` (an ignite ``Engine``, one
subject per iteration) with the handlers of :mod:`nexus_monai.evaluation.handlers` (scores, Table 5
rows, panels, tables + manifest, MLflow); this module wires them and formats the tables.

Checked before any work starts (one-line :class:`NexusInputError`): unknown method names, cohort
bundles whose checkpoint is missing or does not match the network, and datalist entries whose
files are missing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from nexus_monai.data.brats import brats_loader, discover_brats, load_datalist, make_datalist, resolve_datalist
from nexus_monai.data.dicom import is_series_folder, read_dicom_series
from nexus_monai.data.io import check_nifti_file
from nexus_monai.data.staging import invalidate_manifest
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.downstream import summarise_table5, table5_markdown
from nexus_monai.evaluation.evaluator import MethodEvaluator
from nexus_monai.evaluation.handlers import MLflowLogger, PanelWriter, SegmentationScores, SubjectScores, TableWriter
from nexus_monai.evaluation.lesion_counterfactual import CounterfactualImprint
from nexus_monai.evaluation.lesion_tables import lesion_markdown
from nexus_monai.evaluation.methods import check_methods, get_method, training_budget
from nexus_monai.keys import LESIONS
from nexus_monai.metrics import metric_protocol_text
from nexus_monai.metrics.lesion import check_lesion_map
from nexus_monai.transforms.protocols import Protocol, prepare_subject

__all__ = ["select_subjects", "check_subject_files", "check_lesion_files", "prepare_subject", "evaluate_methods",
           "summarise", "markdown_table"]


def select_subjects(data: str | os.PathLike, split: str = "test", seed: int = 0,
                    max_subjects: int | None = None) -> list[dict]:
    """Subjects of ``split`` from a datalist JSON, a folder holding ``dataset.json``, or a BraTS root.

    A BraTS root without a datalist is discovered and split with ``seed`` (48/10/15 proportions).
    ``"embedded"``: the embedded simulated dataset the bundles train on by default (generated on
    first use, the same 24 subjects and split as ``dataset_dir: embedded``).
    """
    if str(data) == "embedded":
        data = resolve_datalist("embedded", seed=seed)
    path = Path(data)
    if path.is_dir() and (path / "dataset.json").exists():
        path = path / "dataset.json"
    if path.is_file():
        _check_datalist_json(path, split)
        subjects = load_datalist(path, split)
    else:
        datalist = make_datalist(discover_brats(path), seed=seed)
        subjects = datalist[split]
    if not subjects:
        raise NexusInputError(data, f"split {split!r} has no subjects")
    return subjects[:max_subjects] if max_subjects else subjects


def _check_datalist_json(path: Path, split: str) -> None:
    """A datalist is a JSON object whose splits are lists of subject entries (one-line error otherwise)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise NexusInputError(path, f"not a datalist: cannot read it as JSON ({type(err).__name__})") from None
    if not isinstance(content, dict):
        raise NexusInputError(path,
                              f"not a datalist: expected a JSON object with split lists (training, validation, test), "
                                    f"got a JSON {type(content).__name__}")
    splits = [k for k, v in content.items() if isinstance(v, list) and v and all(isinstance(e, dict) for e in v)]
    if split not in content:
        raise NexusInputError(path, f"no {split!r} split (has: {', '.join(splits) or 'none'})")
    if not isinstance(content[split], list) or not all(isinstance(e, dict) for e in content[split]):
        raise NexusInputError(path, f"split {split!r} is not a list of subject entries")


def check_subject_files(subjects: Sequence[dict], keys: Sequence[str] = ("t1", "t2")) -> None:
    """Every subject lists every modality in ``keys`` and each file is a complete, readable 3D NIfTI
    (header, affine and every data byte checked up front by :func:`~nexus_monai.data.io.check_nifti_file`,
    so a truncated file of the last subject stops the run before the first; else one-line error)."""
    for subject in subjects:
        sid = subject.get("subject", "?")
        for key in keys:
            path = subject.get(key)
            if not path:
                raise NexusInputError(subject.get("t1"), f"subject {sid} has no {key!r} entry in the datalist")
            if is_series_folder(path):  # a DICOM series folder: read and checked whole (one series, uniform slices)
                read_dicom_series(path)
                continue
            if not Path(path).is_file():
                raise NexusInputError(path, f"file not found ({key} of subject {sid} in the datalist)")
            check_nifti_file(path)


def check_lesion_files(subjects: Sequence[dict]) -> None:
    """Every listed lesion map (datalist key ``lesions``) exists, is on its subject's T1w grid and
    follows the :mod:`nexus_monai.keys` encoding (else one-line error). Subjects without one are fine."""
    for subject in subjects:
        if not subject.get(LESIONS):
            continue
        path = subject[LESIONS]
        data = brats_loader(["t1", LESIONS])({"t1": subject["t1"], LESIONS: path})  # same-grid check
        try:
            check_lesion_map(data[LESIONS][0])
        except ValueError as err:
            raise NexusInputError(path, f"lesion map of subject {subject.get('subject', '?')}: {err}") from None


def evaluate_methods(
    subjects: Sequence[dict],
    methods: Sequence[str],
    protocol: Protocol,
    out_dir: str | os.PathLike,
    lpips: bool = True,
    panel_subjects: int = 1,
    progress: bool = True,
    segmenters: Mapping | None = None,
    method_options: Mapping[str, Mapping] | None = None,
    mlflow: Mapping | None = None,
    counterfactual_imprint: bool = False,
) -> pd.DataFrame:
    """Run ``methods`` on ``subjects`` under ``protocol``; write the per-subject rows and tables.

    ``method_options``: keyword options per method (e.g. ``{"cycleinr": {"weights": path}}``).
    ``mlflow``: ``{"tracking_uri", "run_name", "experiment", "params"}`` to log the run (see
    :func:`~nexus_monai.evaluation.handlers.log_mlflow`); None: no MLflow.

    With ``segmenters`` (name -> :class:`~nexus_monai.evaluation.downstream.FrozenSegmenter`)
    also Table 5: each segmenter on "Original LR" (nearest neighbour), every method's output and
    "Original HR", scored against the subject's labels (``table5_per_subject.csv``,
    ``table5.csv``, ``table5.md``).

    ``counterfactual_imprint``: also the counterfactual imprint columns (``imprint_cf_t1``, ``imprint_cf_t2``;
    :mod:`nexus_monai.evaluation.lesion_counterfactual`): each simulated subject re-rendered without its
    T2w-only and without its T1w-only lesions and every method re-run on both (three extra runs per method).

    The work is a :class:`~nexus_monai.evaluation.evaluator.MethodEvaluator` (one subject per iteration)
    with the handlers of :mod:`nexus_monai.evaluation.handlers`; returns the per-subject frame.
    """
    method_options = {k: dict(v) for k, v in (method_options or {}).items()}
    check_methods(list(methods), method_options)  # unknown names, missing/mismatching checkpoints
    check_subject_files(subjects, ("t1", "t2", "seg") if segmenters else ("t1", "t2"))
    check_lesion_files(subjects)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out)  # the earlier run's tables count as complete no more while this run rewrites them

    def table1(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        table = summarise(frame, methods)
        budgets = [training_budget(m, method_options.get(m)) for m in methods]  # cohort training, NaN otherwise
        for col in ("train_steps", "train_seconds"):
            table[col] = [b[col] for b in budgets]
        return table, markdown_table(table, protocol, n_subjects=len(subjects))

    def table5(seg_frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        t5 = summarise_table5(seg_frame, ["Original LR", *methods, "Original HR"])
        return t5, table5_markdown(t5, n_subjects=len(subjects))

    evaluator = MethodEvaluator({m: get_method(m) for m in methods}, protocol, method_options,
                                required=("seg",) if segmenters else (), progress=progress)
    handlers = [SubjectScores(lpips=lpips)]
    handlers += [CounterfactualImprint()] if counterfactual_imprint else []
    handlers += [SegmentationScores(segmenters)] if segmenters else []
    handlers += [PanelWriter(out, protocol, methods, n_subjects=panel_subjects),
                 TableWriter(out, table1, table5 if segmenters else None)]
    handlers += [MLflowLogger(out, mlflow)] if mlflow is not None else []
    for handler in handlers:
        handler.attach(evaluator)
    state = evaluator.run(list(subjects))
    if state.input_errors:  # the finished subjects' rows are written; the run still fails (exit 2)
        sid, first = state.input_errors[0]
        raise NexusInputError(first.source,
                              f"{first.problem} (subject {sid}; {len(state.input_errors)} failed input(s) marked in "
                              f"per_subject.csv, the other rows kept)")
    return state.frame


def summarise(frame: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Mean and std over subjects per method of every numeric column, plus run/failure counts."""
    numeric = [
        c for c in frame.columns if c not in ("subject", "method", "error") and pd.api.types.is_numeric_dtype(frame[c])
    ]
    out = []
    for m in methods:
        part = frame[frame["method"] == m]
        ok = part[part["error"].fillna("") == ""] if "error" in part else part
        row = {"method": m, "n": len(ok), "failed": len(part) - len(ok)}
        if "lpips_status" in ok and len(ok):
            row["lpips_statuses"] = "; ".join(sorted(set(ok["lpips_status"].astype(str))))
        if len(part) - len(ok):
            row["first_error"] = part.loc[part["error"].fillna("") != "", "error"].iloc[0]
        for c in numeric:
            vals = ok[c].astype(float).dropna() if c in ok else pd.Series(dtype=float)
            row[f"{c}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{c}_std"] = float(vals.std(ddof=0)) if len(vals) else math.nan
        for metric in ("psnr", "ssim", "lpips"):
            if f"{metric}_t1" in ok and f"{metric}_t2" in ok and len(ok):
                avg = (ok[f"{metric}_t1"].astype(float) + ok[f"{metric}_t2"].astype(float)) / 2
                row[f"{metric}_avg_mean"], row[f"{metric}_avg_std"] = float(avg.mean()), float(avg.std(ddof=0))
        out.append(row)
    return pd.DataFrame(out)


def _pm(row: pd.Series, key: str, digits: int) -> str:
    m, s = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(table: pd.DataFrame, protocol: Protocol, n_subjects: int) -> str:
    """Table 1 in Markdown: PSNR/SSIM/LPIPS for T1w, T2w and their average (mean ± std)."""
    cols = [("PSNR", "psnr", 2), ("SSIM", "ssim", 4), ("LPIPS", "lpips", 4)]
    head = ["Method"] + [f"{name} {c}" for name, _, _ in cols for c in ("T1w", "T2w", "Avg")]
    extra = []
    if protocol.name == "ssmcsr":
        extra = [("ε_MI^T1", "eps_mi_t1"), ("ε_MI^T2", "eps_mi_t2"), ("ε̂_MI", "eps_mi_joint")]
        head += [e[0] for e in extra]
    head += ["PSNR eroded T1w", "PSNR eroded T2w", "PSNR volume T1w", "PSNR volume T2w",
             "s / subject (fit + inference)",
             "training (steps, s)", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["method"])]
        for _, key, digits in cols:
            cells += [_pm(r, f"{key}_t1", digits), _pm(r, f"{key}_t2", digits), _pm(r, f"{key}_avg", digits)]
        cells += [_pm(r, k, 4) for _, k in extra]
        cells += [_pm(r, "psnr_eroded_t1", 2), _pm(r, "psnr_eroded_t2", 2), _pm(r, "psnr_volume_t1", 2),
                  _pm(r, "psnr_volume_t2", 2)]
        cells += [
            _pm(r, "seconds", 2),
            _budget(r),
            str(int(r["failed"]))
            + (f" ({r['first_error']})" if r.get("failed", 0) and isinstance(r.get("first_error"), str) else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    c = protocol.config["contrasts"]
    statuses = sorted({p for s in table.get("lpips_statuses", []) if isinstance(s, str) for p in s.split("; ")})
    notes = [
        f"Protocol `{protocol.name}`: {protocol.config.get('description', '')}; T1w "
        f"{c['t1']['axis']}×{c['t1']['factor']}, T2w {c['t2']['axis']}×{c['t2']['factor']}.",
        f"{n_subjects} subjects; mean ± std over subjects (population std).",
        "training (steps, s): each cohort model's bundle training as recorded beside its checkpoint "
        "(optimisation steps, wall-clock seconds incl. validation); '-' for methods without cohort training "
        "or without a record.",
        metric_protocol_text(),
    ] + [f"LPIPS not computed for some runs: {s}" for s in statuses if s != "ok"]
    lesion = lesion_markdown(table)  # metric v2 (nexus_monai.evaluation.lesion_tables)
    return (f"# Table 1 ({protocol.name} protocol)\n\n" + "\n".join(lines) + "\n\n" + lesion
            + "\n\n".join(notes) + "\n")


def _budget(row: pd.Series) -> str:
    steps, seconds = row.get("train_steps", math.nan), row.get("train_seconds", math.nan)
    if not (isinstance(steps, (int, float)) and math.isfinite(steps)):
        return "-"
    return f"{int(steps)}, {seconds:.0f}" if math.isfinite(seconds) else f"{int(steps)}, -"
