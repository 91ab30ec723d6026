"""The protocol grid (issue 27): every method on every subject under several acquisition protocols.

Entries come from :func:`~nexus_monai.transforms.protocols.protocol_grid` (``transforms/protocol_grid.yaml``:
the paper's protocol, other axes and factors, an isotropic T1w, a non-integer factor, the paper's
protocol on the 1 mm world). Per entry and split the subjects are simulated by the entry's protocol
(:meth:`~nexus_monai.transforms.protocols.Protocol.prepare_subject`: each scan's drawn acquisition,
from the noise-free render) and scored by the same metric code as ``nexus-sr evaluate``
(:func:`~nexus_monai.metrics.subject_metric_row` with the lesion geometry of the LR scans' headers)
against the noise-free render, with the scores against the noisy HR scan beside
(``noisy_gt_psnr_t1``, ...; one release).

Resumable per (protocol, split, subject, method): each scored row is written at once to
``<out>/<entry>/<split>/rows/<subject>__<method>.json`` and a later run skips it. Derived methods reuse
their base's prediction in the same pass (``ibp`` = the guard on ``trilinear``, ``nexus_inr_guarded`` =
the guard on ``nexus_inr``: the same functions as the registered methods, computed once); their
``seconds`` include the base's. Outputs per entry and split: ``per_subject.csv``, ``table1.csv``,
``table1.md`` (the Table 1 layout); over all: ``summary.csv`` and ``summary.md`` (paired gains over
trilinear and over ``ibp``, lesion contrast recovered, per entry and split). LPIPS is not computed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from nexus_monai.data.io import write_text_atomic
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.methods import _guarded, check_methods, get_method
from nexus_monai.evaluation.noisy_gt import noisy_gt_columns
from nexus_monai.evaluation.table1 import markdown_table, select_subjects, summarise
from nexus_monai.geometry import TargetGrid
from nexus_monai.keys import CONTRASTS, LESIONS
from nexus_monai.metrics import subject_metric_row
from nexus_monai.metrics.lesion import lesion_geometry
from nexus_monai.transforms.protocols import GridEntry, load_protocol, protocol_grid

__all__ = ["DERIVED", "world_datalist", "run_protocol_grid", "grid_summary", "summary_markdown", "metric_cells"]

DERIVED: dict[str, tuple[str, Callable]] = {
    "ibp": ("trilinear", _guarded),
    "nexus_inr_guarded": ("nexus_inr", _guarded),
}
"""Methods computed from another method's output in the same pass: name -> (base, (pred, data, grid) -> pred)."""

FULL_WORLD_SPLITS = ("test",)
"""Splits generated on the 1 mm world (CPU cost: the test split only)."""


def world_datalist(world: str, data: str | os.PathLike = "embedded", seed: int = 0) -> str | os.PathLike:
    """The data of a grid entry: ``data`` itself unless it is ``"embedded"``; then the embedded dataset on the
    entry's world (``small``: the bundles' 2 mm dataset; ``full``: its test split on the 1 mm grid, the same
    subjects, generated on first use)."""
    if str(data) != "embedded":
        return data
    from nexus_monai.data.synth import ensure_embedded_dataset

    if world == "small":
        return ensure_embedded_dataset(seed=seed)
    return ensure_embedded_dataset(seed=seed, size="full", only_splits=FULL_WORLD_SPLITS)


def _row_path(folder: Path, sid: str, method: str) -> Path:
    return folder / "rows" / f"{sid}__{method}.json"


def _score(data: dict, grid: TargetGrid, pred: dict) -> dict:
    """The metric row of one prediction (noise-free GT) plus the noisy-GT PSNR / SSIM beside it."""
    gt = {c: data[c][0].as_subclass(torch.Tensor) for c in CONTRASTS}
    pv = {c: pred[c].as_subclass(torch.Tensor).reshape(grid.shape) for c in CONTRASTS}
    lesions = data[LESIONS][0] if LESIONS in data else None
    sizes = lesion_geometry({c: data[f"{c}_lr"] for c in CONTRASTS}, data["t1"]) if lesions is not None else None
    if sizes is not None and "seg" in data:  # a tumour is not normal tissue (false positives), as in evaluate
        sizes["exclude"] = data["seg"][0].as_subclass(torch.Tensor).numpy() > 0
    row = subject_metric_row(gt, pv, None, lpips=False, lesions=lesions, lesion_geometry=sizes)
    row.update(noisy_gt_columns(data, pv, gt["t1"] > 0))
    return row


def _run_subject(subject: dict, data: dict, methods: Sequence[str], todo: set, options: Mapping, folder: Path,
                 entry: GridEntry, split: str) -> None:
    grid = TargetGrid.like(data["t1"])
    preds, seconds = {}, {}
    need = set(todo) | {DERIVED[m][0] for m in todo if m in DERIVED}
    for m in [m for m in methods if m in need and m not in DERIVED] + [m for m in need if m not in methods]:
        t0 = time.perf_counter()
        try:
            preds[m], seconds[m] = get_method(m)(data, grid, **options.get(m, {})), None
            seconds[m] = time.perf_counter() - t0
        except Exception as err:  # recorded, not dropped
            preds[m], seconds[m] = err, time.perf_counter() - t0
    for m in [m for m in methods if m in todo]:
        t0 = time.perf_counter()
        row = {"protocol": entry.name, "world": entry.world, "split": split, "subject": subject["subject"],
               "method": m}
        try:
            if m in DERIVED:
                base, fn = DERIVED[m]
                if isinstance(preds[base], Exception):
                    raise RuntimeError(f"its base {base} failed: {preds[base]}")
                pred = fn(preds[base], data, grid)
                took = seconds[base] + time.perf_counter() - t0
            else:
                if isinstance(preds[m], Exception):
                    raise preds[m]
                pred, took = preds[m], seconds[m]
            row.update(_score(data, grid, pred))
            row["seconds"], row["error"] = took, ""
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        write_text_atomic(_row_path(folder, subject["subject"], m), json.dumps(clean, default=float) + "\n")


def _tables(folder: Path, entry: GridEntry, protocol, methods: Sequence[str], n: int) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]
    frame = pd.DataFrame(rows)
    frame = frame[frame["method"].isin(methods)] if len(frame) else frame
    if not len(frame):
        return frame
    frame = frame.fillna({"error": ""}) if "error" in frame else frame
    write_text_atomic(folder / "per_subject.csv", frame.to_csv(index=False))
    table = summarise(frame.drop(columns=["protocol", "world", "split"]), [m for m in methods
                                                                          if m in set(frame["method"])])
    write_text_atomic(folder / "table1.csv", table.to_csv(index=False))
    text = markdown_table(table, protocol, n_subjects=n)
    write_text_atomic(folder / "table1.md", text.replace(f"# Table 1 ({protocol.name} protocol)",
                                                         f"# Protocol {entry.name} ({entry.world} world)", 1))
    return frame


def run_protocol_grid(entries: str | Sequence[GridEntry], methods: Sequence[str], out_dir: str | os.PathLike,
                      splits: Sequence[str] = ("test", "test_anatomy"), data: str | os.PathLike = "embedded",
                      seed: int = 0, max_subjects: int | None = None, max_subjects_full: int | None = None,
                      method_options: Mapping[str, Mapping] | None = None, progress: bool = True) -> pd.DataFrame:
    """Score ``methods`` on every grid entry x split; return all per-subject rows (also written, see the module).

    ``entries``: a grid spec (``"grid"``, a comma list) or :class:`GridEntry` list. A split the entry's
    world does not have (the 1 mm world has the test split only) is skipped. ``max_subjects`` /
    ``max_subjects_full``: the first N subjects of each split on the 2 mm / 1 mm world. Method names and
    checkpoints are checked before any work (one-line :class:`NexusInputError`).
    """
    from tqdm.auto import tqdm

    entries = protocol_grid(entries) if isinstance(entries, str) else list(entries)
    methods = list(methods)
    options = {k: dict(v) for k, v in (method_options or {}).items()}
    check_methods(methods, options)
    protocols = {e.name: load_protocol(e.protocol) for e in entries}
    out = Path(out_dir)
    frames = []
    for entry in entries:
        datalist = world_datalist(entry.world, data, seed)
        for split in splits:
            if entry.world == "full" and str(data) == "embedded" and split not in FULL_WORLD_SPLITS:
                continue
            limit = max_subjects_full if entry.world == "full" else max_subjects
            subjects = select_subjects(datalist, split, seed=seed, max_subjects=limit)
            folder = out / entry.name / split
            bar = tqdm(subjects, desc=f"{entry.name} {split}", disable=not progress, unit="subject")
            for subject in bar:
                todo = {m for m in methods if not _row_path(folder, subject["subject"], m).exists()}
                if not todo:
                    continue
                try:
                    prepared = protocols[entry.name].prepare_subject(subject)
                except NexusInputError:
                    raise
                except Exception as err:
                    raise NexusInputError(subject.get("t1"), f"{entry.name}: {type(err).__name__}: {err}") from None
                _run_subject(subject, prepared, methods, todo, options, folder, entry, split)
            frames.append(_tables(folder, entry, protocols[entry.name], methods, len(subjects)))
    rows = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
        else pd.DataFrame()
    if len(rows):
        write_text_atomic(out / "per_subject.csv", rows.to_csv(index=False))
        summary = grid_summary(rows)
        write_text_atomic(out / "summary.csv", summary.to_csv(index=False))
        write_text_atomic(out / "summary.md", summary_markdown(summary, entries, protocols))
    return rows


def _paired(part: pd.DataFrame, a: str, b: str, col: str) -> np.ndarray:
    if col not in part:
        return np.array([])
    wide = part.pivot_table(index="subject", columns="method", values=col, aggfunc="first")
    if a not in wide or b not in wide:
        return np.array([])
    return (wide[a] - wide[b]).dropna().to_numpy(dtype=float)


def grid_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, split, method): n, mean masked / interior PSNR gain over trilinear and over ibp
    (paired per subject, dB), noisy-GT gain, and the lesion contrast recovered (T2w-only, T1w-only) when scored."""
    ok = rows[rows["error"].fillna("") == ""] if "error" in rows else rows
    out = []
    for (protocol, split), part in ok.groupby(["protocol", "split"], sort=False):
        for m in part["method"].unique():
            r = {"protocol": protocol, "split": split, "method": m,
                 "n": int((part["method"] == m).sum())}
            for ref in ("trilinear", "ibp"):
                for col in ("psnr_t1", "psnr_t2", "psnr_eroded_t1", "psnr_eroded_t2", "noisy_gt_psnr_t1",
                            "noisy_gt_psnr_t2"):
                    d = _paired(part, m, ref, col) if m != ref else np.array([])
                    r[f"gain_{col}_over_{ref}"] = float(d.mean()) if len(d) else math.nan
            sub = part[part["method"] == m]
            for col in ("psnr_t1", "psnr_t2", "lesion_contrast_t2", "lesion_contrast_t1", "lesion_contrast_uncapped_t2",
                        "lesion_contrast_uncapped_t1", "within_slab_t2", "false_positives_t2", "false_positives_t1",
                        "seconds"):
                r[col] = float(sub[col].astype(float).mean()) if col in sub and sub[col].notna().any() else math.nan
            out.append(r)
    return pd.DataFrame(out)


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def summary_markdown(summary: pd.DataFrame, entries: Sequence[GridEntry], protocols: Mapping) -> str:
    """The summary table: per entry, split and method the masked PSNR (noise-free GT), gains over trilinear
    and ibp, the noisy-GT gain and the lesion contrast recovered."""
    lines = ["| protocol | world | split | method | n | PSNR T1w / T2w (dB) | gain over trilinear T1w / T2w "
             "(interior) | gain over ibp T1w / T2w | noisy-GT gain over trilinear | T2w-only / T1w-only lesion "
             "contrast recovered (v1 uncapped) | T2w-only within-slab part | false positives / subject T2w, T1w "
             "| s / subject |", "|" + "---|" * 13]
    world = {e.name: e.world for e in entries}
    for _, r in summary.iterrows():
        lines.append(
            f"| {r['protocol']} | {world.get(r['protocol'], '?')} | {r['split']} | {r['method']} | {r['n']} "
            + metric_cells(r) + f"| {_f(r['seconds'], '.1f')} |")
    proto = []
    for e in entries:
        c = protocols[e.name].config["contrasts"]
        proto.append(f"- `{e.name}` ({e.world} world): T1w {c['t1']['axis']}×{c['t1']['factor']}, "
                     f"T2w {c['t2']['axis']}×{c['t2']['factor']}")
    return ("# Protocol grid\n\n" + "\n".join(lines) + "\n\nGains: paired per subject, mean over subjects (dB), "
            "masked (brain) PSNR against the noise-free render, interior (mask eroded 3 voxels) in brackets; "
            "noisy-GT: the same against the noisy HR scan. Lesion columns: metric v2 of `nexus_monai.metrics.lesion` "
            "(contrast recovered with the ratio capped at 1, the v1 uncapped figure in brackets; within-slab part; "
            "false-positive blobs per subject; definitions in docs/evaluation_protocol.md and each entry's "
            "table1.md).\n\n" + "\n".join(proto) + "\n")


def metric_cells(r) -> str:
    """One summary row's metric cells, PSNR to false positives (shared by the grid summary and its report script)."""
    return (
        f"| {_f(r['psnr_t1'], '.2f')} / {_f(r['psnr_t2'], '.2f')} "
        f"| {_f(r['gain_psnr_t1_over_trilinear'], '+.2f')} / {_f(r['gain_psnr_t2_over_trilinear'], '+.2f')} "
        f"({_f(r['gain_psnr_eroded_t1_over_trilinear'], '+.2f')} / "
        f"{_f(r['gain_psnr_eroded_t2_over_trilinear'], '+.2f')}) "
        f"| {_f(r['gain_psnr_t1_over_ibp'], '+.2f')} / {_f(r['gain_psnr_t2_over_ibp'], '+.2f')} "
        f"| {_f(r['gain_noisy_gt_psnr_t1_over_trilinear'], '+.2f')} / "
        f"{_f(r['gain_noisy_gt_psnr_t2_over_trilinear'], '+.2f')} "
        f"| {_f(r['lesion_contrast_t2'], '.3f')} / {_f(r['lesion_contrast_t1'], '.3f')} "
        f"({_f(r['lesion_contrast_uncapped_t2'], '.3f')} / {_f(r['lesion_contrast_uncapped_t1'], '.3f')}) "
        f"| {_f(r['within_slab_t2'], '.3f')} "
        f"| {_f(r['false_positives_t2'], '.1f')}, {_f(r['false_positives_t1'], '.1f')} ")
