"""Gains over trilinear, paired differences and lesion fidelity from several `nexus-sr evaluate` runs.

    python scripts/generalisation_report.py --out docs/generalisation.md \
        test_anatomy=results/new_test_anatomy test_anatomy=results/old_test_anatomy:_old ...

Each argument is ``SPLIT=FOLDER[:SUFFIX]``: the ``per_subject.csv`` of one evaluate run on that split;
``SUFFIX`` is appended to the run's method names (``nexus_inr`` -> ``nexus_inr_old``) so two
checkpoints of one method can sit side by side (not to the deterministic references ``trilinear`` and
``ibp``). Rows of a method that appears in several runs of a split (e.g. trilinear, deterministic) are
taken from the first run. Gains are per-subject paired differences to trilinear of the same subject;
intervals are Student-t 95 % over subjects. Back-projection (``ibp``: trilinear + the consistency guard of
``nexus-sr predict``, no network) is the floor a network must clear: when the runs have it, a second table
gives every method's gain over ``ibp`` (the network's own contribution), and the lesion tables list it.
Lesion fidelity is also shown by lesion size relative to the slab thickness (when the runs have the
by-size columns).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from nexus_monai.data.io import write_text_atomic
from nexus_monai.metrics.lesion import SIZE_BIN_LABELS

GAIN_COLUMNS = [("psnr_t1", "masked T1w"), ("psnr_t2", "masked T2w"), ("psnr_eroded_t1", "interior T1w"),
                ("psnr_eroded_t2", "interior T2w")]
REFERENCES = ("trilinear", "ibp")  # deterministic, no network: never suffixed
LESION_COLUMNS = [("lesion_contrast_t2", "T2w-only contrast recovered (capped, v2)"),
                  ("lesion_contrast_uncapped_t2", "uncapped (v1)"), ("lesion_error_t2", "mean abs(ratio - 1)"),
                  ("lesion_exaggerated_t2", "exaggerated > 1.25"), ("ring_bias_t2", "ring bias"),
                  ("within_slab_t2", "within-slab"), ("within_slab_gt_t2", "within-slab GT"),
                  ("lesion_kept_t2", "kept"),
                  ("imprint_t1", "imprint on T1w (v1)"), ("imprint_t1_gt", "GT on T1w"),
                  ("imprint_cf_t1", "counterfactual imprint on T1w"),
                  ("lesion_contrast_t1", "T1w-only contrast recovered (capped)"),
                  ("lesion_exaggerated_t1", "T1w-only exaggerated"), ("imprint_t2", "imprint on T2w (v1)"),
                  ("imprint_t2_gt", "GT on T2w"), ("imprint_cf_t2", "counterfactual imprint on T2w"),
                  ("false_positives_t2", "false positives T2w / subject"),
                  ("false_positives_t1", "false positives T1w / subject")]
"""Lesion metric v2 (docs/evaluation_protocol.md); columns a run does not have are left out of the table."""


def load_runs(specs: list[str]) -> pd.DataFrame:
    """All per-subject rows, with a ``split`` column and suffixed method names."""
    frames = []
    for spec in specs:
        split, _, rest = spec.partition("=")
        folder, _, suffix = rest.partition(":")
        if not split or not folder:
            raise SystemExit(f"error: {spec}: expected SPLIT=FOLDER[:SUFFIX]")
        path = Path(folder) / "per_subject.csv"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no per_subject.csv (not an evaluate output folder)")
        frame = pd.read_csv(path)
        if suffix:
            frame.loc[~frame["method"].isin(REFERENCES), "method"] += suffix
        frame["split"] = split
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["error"].isna()] if "error" in rows else rows
    return rows.drop_duplicates(["split", "subject", "method"], keep="first")


def _interval(diffs: np.ndarray) -> str:
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) < 2:
        return f"{diffs.mean():+.2f}" if len(diffs) else "-"
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    return f"{diffs.mean():+.2f} [{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}]"


def paired(rows: pd.DataFrame, split: str, a: str, b: str, column: str) -> np.ndarray:
    """Per-subject ``a - b`` of ``column`` on ``split`` (subjects both methods have)."""
    wide = rows[rows["split"] == split].pivot(index="subject", columns="method", values=column)
    if a not in wide or b not in wide:
        return np.array([])
    return (wide[a] - wide[b]).dropna().to_numpy()


def gain_table(rows: pd.DataFrame, split: str, reference: str = "trilinear") -> str:
    """Per-method paired PSNR gain over ``reference`` (trilinear, or ibp: the network's own contribution)."""
    methods = [m for m in rows[rows["split"] == split]["method"].unique() if m not in (reference, "trilinear")]
    lines = ["| method | n | " + " | ".join(f"gain {name} (dB)" for _, name in GAIN_COLUMNS) + " | avg masked |",
             "|---" * (len(GAIN_COLUMNS) + 3) + "|"]
    for m in methods:
        cells = [_interval(paired(rows, split, m, reference, c)) for c, _ in GAIN_COLUMNS]
        avg = (paired(rows, split, m, reference, "psnr_t1") + paired(rows, split, m, reference, "psnr_t2")) / 2
        n = len(paired(rows, split, m, reference, "psnr_t1"))
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + f" | {avg.mean():+.2f} |")
    return "\n".join(lines)


def lesion_size_table(rows: pd.DataFrame, split: str) -> str:
    """Contrast recovered (capped) / kept of one-contrast lesions by extent across the slabs ('' without the columns),
    with the within-slab part of the output and of the GT when the runs have it."""
    part = rows[rows["split"] == split]
    keys = [(c, b, label) for c in ("t2", "t1") for b, label in SIZE_BIN_LABELS.items()]
    if not any(f"lesion_contrast_{c}_{b}" in part and part[f"lesion_contrast_{c}_{b}"].notna().any()
               for c, b, _ in keys):
        return ""
    names = {"t1": "T1w-only", "t2": "T2w-only"}
    lines = ["| method | " + " | ".join(f"{names[c]} {label}: recovered / kept (lesions)" for c, _, label in keys)
             + " |", "|---" * (len(keys) + 1) + "|"]
    for m in part["method"].unique():
        sub = part[part["method"] == m]
        cells = []
        for c, b, _ in keys:
            v = sub[f"lesion_contrast_{c}_{b}"].to_numpy(dtype=float) if f"lesion_contrast_{c}_{b}" in sub else []
            k = sub[f"lesion_kept_{c}_{b}"].to_numpy(dtype=float) if f"lesion_kept_{c}_{b}" in sub else []
            n = sub[f"n_lesions_{c}_{b}"].to_numpy(dtype=float).sum() if f"n_lesions_{c}_{b}" in sub else 0
            w = sub[f"within_slab_{c}_{b}"].to_numpy(dtype=float) if f"within_slab_{c}_{b}" in sub else []
            wg = sub[f"within_slab_gt_{c}_{b}"].to_numpy(dtype=float) if f"within_slab_gt_{c}_{b}" in sub else []
            within = (f"; within-slab {np.nanmean(w):.3f} (GT {np.nanmean(wg):.3f})"
                      if np.isfinite(np.asarray(w, float)).any() else "")
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f} / {np.nanmean(k):.2f} ({n:.0f}){within}"
                         if np.isfinite(v).any() else f"- ({n:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lesion_table(rows: pd.DataFrame, split: str) -> str:
    part = rows[rows["split"] == split]
    columns = [(c, name) for c, name in LESION_COLUMNS if c in part and part[c].notna().any()]
    lines = ["| method | " + " | ".join(name for _, name in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for m in part["method"].unique():
        sub = part[part["method"] == m]
        cells = []
        for c, _ in columns:
            v = sub[c].to_numpy(dtype=float) if c in sub else np.array([np.nan])
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if np.isfinite(v).any() else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_lines(rows: pd.DataFrame, split: str, pairs: list[tuple[str, str]]) -> str:
    lines = ["| a − b | masked T1w | masked T2w | interior T1w | interior T2w | worst subject (masked T1w / T2w) |",
             "|---|---|---|---|---|---|"]
    for a, b in pairs:
        d = {c: paired(rows, split, a, b, c) for c, _ in GAIN_COLUMNS}
        if not len(d["psnr_t1"]):
            continue
        worst = f"{d['psnr_t1'].min():+.2f} / {d['psnr_t2'].min():+.2f}"
        lines.append(f"| {a} − {b} | " + " | ".join(_interval(d[c]) for c, _ in GAIN_COLUMNS) + f" | {worst} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Markdown file to write")
    ap.add_argument("--compare", action="append", default=[], metavar="A,B",
                    help="paired comparison A - B on every split holding both; repeatable")
    ap.add_argument("--title", default="Generalisation and lesion fidelity")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="rename a method after loading (all renames at once); repeatable")
    ap.add_argument("--methods", default="", help="comma-separated methods to show, in this order (default: all)")
    ap.add_argument("runs", nargs="+", help="SPLIT=FOLDER[:SUFFIX]")
    args = ap.parse_args(argv)
    rows = load_runs(args.runs)
    if args.rename:
        rows["method"] = rows["method"].replace(dict(r.split("=", 1) for r in args.rename))
    if args.methods:  # trilinear and ibp (when run) always shown
        order = [r for r in REFERENCES if (rows["method"] == r).any() or r == "trilinear"]
        order += [m for m in args.methods.split(",") if m not in order]
        rows = rows[rows["method"].isin(order)]
        rows = rows.assign(_o=rows["method"].map(order.index)).sort_values(["_o", "subject"]).drop(columns="_o")
    pairs = [tuple(p.split(",", 1)) for p in args.compare]
    parts = [f"# {args.title}", ""]
    for split in rows["split"].unique():
        n = rows[rows["split"] == split]["subject"].nunique()
        parts += [f"## Split `{split}` ({n} subjects)", "",
                  "PSNR gain over trilinear, per-subject paired, mean [95 % t-interval over subjects]:", "",
                  gain_table(rows, split), ""]
        if ((rows["split"] == split) & (rows["method"] == "ibp")).any():
            parts += ["Gain over back-projection (ibp: trilinear + the consistency guard of `nexus-sr predict`, no "
                      "network), per-subject paired: the network's own contribution:", "",
                      gain_table(rows, split, reference="ibp"), ""]
        if pairs:
            parts += ["Paired differences, mean [95 % t-interval] and the worst subject:", "",
                      comparison_lines(rows, split, pairs), ""]
        parts += ["Lesion fidelity, mean ± std over subjects (definitions in docs/evaluation_protocol.md):", "",
                  lesion_table(rows, split), ""]
        by_size = lesion_size_table(rows, split)
        if by_size:
            parts += ["Lesion fidelity by size (d: equivalent-sphere lesion diameter / slab thickness of the contrast "
                      "that shows it), mean ± std over subjects with lesions in the bin / kept fraction (lesions in "
                      "all subjects):", "", by_size, ""]
    write_text_atomic(args.out, "\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
