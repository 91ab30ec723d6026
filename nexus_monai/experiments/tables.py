"""Tables 2-5 of Zhang et al. ("Nexus-INR: Diverse Knowledge-guided Arbitrary-Scale Multimodal
Medical Image Super-Resolution", 2025) from the runs of ``nexus-sr experiment``: CSV + Markdown.

Each split's table shows trilinear and back-projection (``ibp``: trilinear + the consistency guard of
``nexus-sr predict``, no network) once, then the rows, and the paired difference of every row to ``ibp``
(the network's own contribution).

Statistics: for each row, split and seed the mean over test subjects; the table shows the mean ±
sample std over seeds of those per-seed means. The paired difference of a row to the previous
one pairs the two rows' values on the same (seed, subject); its 95 % interval is the Student t
interval ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` over the n = seeds x subjects pairs (the
pairs of one subject across seeds are not independent, so the interval is optimistic when the
subject effect dominates).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from nexus_monai.data.io import write_text_atomic

__all__ = ["PAPER", "ROW_LABELS", "paired_interval", "write_tables", "seed_summary"]

ROW_LABELS = {"baseline": "Baseline", "mmf": "+MMF", "mmf_kdattn": "+MMF +KD-Attn",
              "mmf_kdattn_sel": "+MMF +KD-Attn +SEL (full)",
              "rdn": "RDN", "srresnet": "SRResNet", "rescnn": "ResCNN", "mlp": "MLP", "siren": "SIREN"}
# The paper's published numbers (BraTS2020 test set, 128-channel GPU setting).
PAPER = {
    "baseline": {"psnr_t1": 30.01, "psnr_t2": 28.58, "psnr_avg": 29.30, "ssim_avg": 0.9348, "lpips_avg": 0.0161},
    "mmf": {"psnr_t1": 33.72, "psnr_t2": 29.71, "psnr_avg": 31.72, "ssim_avg": 0.9547, "lpips_avg": 0.0124},
    "mmf_kdattn": {"psnr_t1": 33.63, "psnr_t2": 32.07, "psnr_avg": 32.85, "ssim_avg": 0.9657, "lpips_avg": 0.0075},
    "mmf_kdattn_sel": {"psnr_t1": 33.75, "psnr_t2": 32.25, "psnr_avg": 33.00, "ssim_avg": 0.9669, "lpips_avg": 0.0067},
    "rdn": {"psnr_avg": 33.75, "ssim_avg": 0.9669, "lpips_avg": 0.0067},
    "srresnet": {"psnr_avg": 33.12, "ssim_avg": 0.9635, "lpips_avg": 0.0084},
    "rescnn": {"psnr_avg": 32.85, "ssim_avg": 0.9612, "lpips_avg": 0.0091},
    "mlp": {"psnr_avg": 33.75, "ssim_avg": 0.9669, "lpips_avg": 0.0067},
    "siren": {"psnr_avg": 33.21, "ssim_avg": 0.9639, "lpips_avg": 0.0081},
}
METRICS = (("psnr_t1", "PSNR T1w", 2), ("psnr_t2", "PSNR T2w", 2), ("psnr_avg", "PSNR avg", 2),
           ("ssim_avg", "SSIM avg", 4),
           ("lpips_avg", "LPIPS avg", 4), ("psnr_eroded_avg", "PSNR eroded avg", 2), ("psnr_volume_avg",
                                                                                      "PSNR volume avg", 2))
DIFF_METRICS = ("psnr_t1", "psnr_t2", "psnr_avg", "ssim_avg", "lpips_avg")
REFERENCE_METHODS = ("trilinear", "ibp")
"""Methods without training scored beside every run: their row is shown once, from the first row's runs."""


def _with_averages(frame: pd.DataFrame) -> pd.DataFrame:
    f = frame.copy()
    for stem in ("psnr", "ssim", "lpips", "psnr_eroded", "psnr_volume"):
        if f"{stem}_t1" in f and f"{stem}_t2" in f:
            f[f"{stem}_avg"] = (f[f"{stem}_t1"].astype(float) + f[f"{stem}_t2"].astype(float)) / 2
    return f


def seed_summary(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (row, method, split): mean ± std over seeds of the per-seed subject means, and n seeds."""
    per_seed = frame.groupby(["row", "method", "split", "seed"])[metric].mean().reset_index()
    g = per_seed.groupby(["row", "method", "split"])[metric]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "seeds": g.count()}).reset_index()


def paired_interval(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of ``b - a`` paired on (seed, subject), 95 % Student t interval."""
    m = a[["seed", "subject", metric]].merge(b[["seed", "subject", metric]], on=["seed", "subject"],
                                             suffixes=("_a", "_b"))
    d = (m[f"{metric}_b"] - m[f"{metric}_a"]).astype(float).dropna().to_numpy()
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(d[0]), math.nan, math.nan, 1
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, n


def _fmt(mean: float, std: float, digits: int) -> str:
    return "n/a" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _image_markdown(table: str, form: str, frame: pd.DataFrame, rows: Sequence[str]) -> list[str]:
    lines = []
    for split in sorted(frame["split"].unique()):
        part = frame[frame["split"] == split]
        metrics = [m for m in METRICS if m[0] in part and part[m[0]].notna().any()]
        head = ["Row", "seeds"] + [f"{label} (ours / paper)" for _, label, _ in metrics]
        lines += [f"## Split `{split}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        summaries = {m: seed_summary(part, m) for m, _, _ in metrics}
        references = [(m, [f"({m})"]) for m in REFERENCE_METHODS if (part["method"] == m).any()]
        for method, row_names in references + [("nexus_inr", list(rows))]:
            for row in row_names:
                key = rows[0] if method in REFERENCE_METHODS else row
                cells = [ROW_LABELS.get(row, row)]
                seeds = 0
                for m, _, digits in metrics:
                    s = summaries[m]
                    hit = s[(s["row"] == key) & (s["method"] == method)]
                    seeds = int(hit["seeds"].iloc[0]) if len(hit) else seeds
                    ours = _fmt(float(hit["mean"].iloc[0]), float(hit["std"].iloc[0]), digits) if len(hit) else "n/a"
                    paper = PAPER.get(row, {}).get(m) if method == "nexus_inr" else None
                    cells.append(ours + (f" / {paper:.{digits}f}" if paper is not None else ""))
                lines.append("| " + " | ".join([cells[0], str(seeds)] + cells[1:]) + " |")
        lines += ["",
                  f"Paired difference to the previous row (ours, split `{split}`; 95 % t-interval over seeds x "
                  f"subjects):", ""]
        diff_metrics = [m for m in DIFF_METRICS if m in part and part[m].notna().any()]
        lines += ["| Row vs previous | n pairs | " + " | ".join(diff_metrics) + " |",
                  "|" + "---|" * (len(diff_metrics) + 2)]
        ours = part[part["method"] == "nexus_inr"]
        for prev, row in zip(rows, rows[1:]):
            cells, n = [], 0
            for m in diff_metrics:
                mean, lo, hi, n = paired_interval(ours[ours["row"] == prev], ours[ours["row"] == row], m)
                d = 4 if m.startswith(("ssim", "lpips")) else 2
                cells.append("n/a" if not np.isfinite(mean) else f"{mean:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]")
            lines.append(
                f"| {ROW_LABELS.get(row, row)} vs {ROW_LABELS.get(prev, prev)} | {n} | " + " | ".join(cells) + " |"
            )
        lines += _vs_ibp_lines(part, rows, split, diff_metrics)
        lines += _lesion_lines(part, rows, split)
        lines.append("")
    return lines


LESION_COLUMNS = (("lesion_contrast_t2", "T2w-only contrast recovered"),
                  ("lesion_contrast_uncapped_t2", "(uncapped, v1)"), ("lesion_exaggerated_t2", "T2w-only exaggerated"),
                  ("ring_bias_t2", "ring bias"), ("within_slab_t2", "within-slab"), ("lesion_kept_t2", "T2w-only kept"),
                  ("imprint_t2", "T1w-only imprint on T2w"), ("imprint_t2_gt", "(GT)"),
                  ("lesion_contrast_t1", "T1w-only contrast recovered"), ("imprint_t1", "T2w-only imprint on T1w"),
                  ("imprint_t1_gt", "(GT)"), ("false_positives_t2", "false positives T2w"),
                  ("false_positives_t1", "false positives T1w"))


def _lesion_lines(part: pd.DataFrame, rows: Sequence[str], split: str) -> list[str]:
    """Lesion fidelity beside PSNR (:mod:`nexus_monai.metrics.lesion`): mean ± std over seeds of the per-seed
    subject means, the references (trilinear, ibp) first (empty when the results have no lesion columns)."""
    cols = [(c, label) for c, label in LESION_COLUMNS if c in part and part[c].notna().any()]
    if not cols:
        return []
    lines = ["", f"Lesion fidelity v2 (split `{split}`; contrast recovered: output's lesion-minus-ring contrast / the "
                 f"ground truth's, capped at 1 per lesion (v1 uncapped beside); exaggerated: share above 1.25; kept: "
                 f"fraction of lesions at >= 0.5; imprint beside the ground truth's own level; false positives per "
                 f"subject; docs/evaluation_protocol.md), mean ± std over seeds:", "",
             "| Row | " + " | ".join(label for _, label in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    summaries = {c: seed_summary(part, c) for c, _ in cols}
    references = [(m, [f"({m})"]) for m in REFERENCE_METHODS if (part["method"] == m).any()]
    for method, row_names in references + [("nexus_inr", list(rows))]:
        for row in row_names:
            key = rows[0] if method in REFERENCE_METHODS else row
            cells = []
            for c, _ in cols:
                s = summaries[c]
                hit = s[(s["row"] == key) & (s["method"] == method)]
                cells.append(_fmt(float(hit["mean"].iloc[0]), float(hit["std"].iloc[0]), 3) if len(hit) else "n/a")
            lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return lines


def _vs_ibp_lines(part: pd.DataFrame, rows: Sequence[str], split: str, diff_metrics: Sequence[str]) -> list[str]:
    """Each row minus back-projection (``ibp``, no network) of the same run and subject: the network's own
    contribution (empty when the runs have no ``ibp`` rows)."""
    ibp = part[part["method"] == "ibp"]
    if not len(ibp):
        return []
    lines = ["", f"Network's own contribution: each row minus back-projection (ibp: trilinear + the consistency "
                 f"guard, no network) of the same run and subject (split `{split}`; 95 % t-interval over seeds x "
                 f"subjects):", "",
             "| Row vs ibp | n pairs | " + " | ".join(diff_metrics) + " |", "|" + "---|" * (len(diff_metrics) + 2)]
    ours = part[part["method"] == "nexus_inr"]
    for row in rows:
        cells, n = [], 0
        for m in diff_metrics:
            mean, lo, hi, n = paired_interval(ibp[ibp["row"] == row], ours[ours["row"] == row], m)
            d = 4 if m.startswith(("ssim", "lpips")) else 2
            cells.append("n/a" if not np.isfinite(mean) else f"{mean:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]")
        lines.append(f"| {ROW_LABELS.get(row, row)} vs ibp | {n} | " + " | ".join(cells) + " |")
    return lines


def write_tables(table: str, form: str, frame: pd.DataFrame, out: Path, n_planned: int, failures: Sequence[str],
                 command: str) -> dict[str, Path]:
    """Write ``<out>/<table>.csv`` (every row x seed x split x subject) and ``<out>/<table>.md``."""
    frame = _with_averages(frame) if len(frame) else frame
    csv = write_text_atomic(out / f"{table}.csv", frame.to_csv(index=False))
    rows = [r for r in ROW_LABELS if len(frame) and r in set(frame["row"])]
    n_done = frame[["form", "row", "seed"]].drop_duplicates().shape[0] if len(frame) else 0
    head = [f"# {table.capitalize()} ({form} form): Nexus-INR ablation "
            f"reproduced",
            "", f"Command: `{command}`. Runs finished: {n_done} of {n_planned}."]
    if failures:
        head.append("Failed runs: " + "; ".join(failures))
    body = _image_markdown(table, form, frame, rows) if len(frame) else []  # Table 5: experiments/table5.py
    notes = ["", "Ours: mean ± std (sample, over seeds) of each seed's mean over the split's subjects, scored with "
             "`nexus-sr evaluate`'s metric code (brain mask, GT 99.5th-percentile scale). Paper: Zhang et al., "
             "\"Nexus-INR: Diverse Knowledge-guided Arbitrary-Scale Multimodal Medical Image Super-Resolution\", 2025, "
             "BraTS2020 test set at 128 channels on GPUs (not comparable in absolute terms with a CPU-width run on "
             "other data).",
             "Paired differences: each (seed, subject) pair of the two rows, 95 % Student t interval over the pairs "
             "(subjects repeat across seeds, so the pairs are not independent)."]
    md = write_text_atomic(out / f"{table}.md", "\n".join(head + [""] + body + notes) + "\n")
    return {"csv": Path(csv), "md": Path(md)}
