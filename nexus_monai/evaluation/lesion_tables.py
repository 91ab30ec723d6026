"""Lesion-fidelity Markdown tables (metric v2, :mod:`nexus_monai.metrics.lesion`) from a per-method summary.

``table`` is the frame :func:`nexus_monai.evaluation.table1.summarise` makes: one row per method, every
per-subject column as ``<column>_mean`` / ``<column>_std``. Three tables, each only when some method has
its columns: the lesion table (v2 figures with the v1 uncapped ratio beside), the false-positive and
counterfactual-imprint table, and the by-size table (contrast recovered, exaggerated share, within-slab
part of the output beside the ground truth's, n per bin).
"""

from __future__ import annotations

import math

import pandas as pd

from nexus_monai.metrics.lesion import EXAGGERATED, SIZE_BIN_LABELS, SIZE_BINS

__all__ = ["lesion_markdown", "pm"]

_LABEL = {"t1": "T1w-only", "t2": "T2w-only"}


def pm(row: pd.Series, key: str, digits: int) -> str:
    """``mean ± std`` of ``key`` in a summary row, ``n/a`` when the mean is missing or NaN."""
    m, s = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _has(table: pd.DataFrame, keys) -> bool:
    return any(f"{k}_mean" in table and table[f"{k}_mean"].notna().any() for k in keys)


def _table(table: pd.DataFrame, cols: list[tuple[str, str | None, int]], counts=None) -> list[str]:
    head = [c for c, _, _ in cols] + ([counts[0]] if counts else [])
    lines = ["| Method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for _, r in table.iterrows():
        cells = [pm(r, k, d) for _, k, d in cols]
        if counts:
            cells.append(", ".join(f"{r.get(f'{k}_mean', math.nan):.1f}" for k in counts[1]))
        lines.append("| " + " | ".join([str(r["method"])] + cells) + " |")
    return lines


def lesion_markdown(table: pd.DataFrame) -> str:
    """The lesion-fidelity sections of a Markdown report (``''`` when no subject had a lesion map)."""
    main = []
    for c in ("t2", "t1"):
        o = "t1" if c == "t2" else "t2"
        main += [(f"{_LABEL[c]}: recovered (capped)", f"lesion_contrast_{c}", 3),
                 ("uncapped (v1)", f"lesion_contrast_uncapped_{c}", 3), ("mean abs(ratio - 1)", f"lesion_error_{c}", 3),
                 (f"exaggerated > {EXAGGERATED:g}", f"lesion_exaggerated_{c}", 2),
                 ("ring bias", f"ring_bias_{c}", 3), ("kept", f"lesion_kept_{c}", 2),
                 (f"imprint on {o.upper()}w (v1)", f"imprint_{o}", 4), ("GT", f"imprint_{o}_gt", 4)]
    main += [("both: recovered T1w", "lesion_contrast_both_t1", 3), ("T2w", "lesion_contrast_both_t2", 3)]
    if not _has(table, [k for _, k, _ in main if k]):
        return ""
    out = ["## Lesion fidelity (metric v2)", ""]
    out += _table(table, main, ("lesions / subject (T2w-only, T1w-only, both)",
                                ("n_lesions_t2", "n_lesions_t1", "n_lesions_both_t1")))
    out += ["", "Mean ± std over subjects with a lesion map. recovered: output / GT lesion-minus-ring contrast per "
            "lesion, capped at 1 in the mean (painting a lesion stronger than the scan shows earns nothing); "
            "uncapped (v1): the previous release's figure, for comparison; ring bias: (ring mean of output - of GT) "
            "/ GT contrast (recovered - 1 = lesion bias - ring bias: negative = a dark halo); imprint (v1): |lesion "
            "contrast| on the contrast that should not show it, output beside GT (normalised units). Definitions in "
            "the protocol below.", ""]
    fp = [("false positives T1w (bright + dark)", "false_positives_t1", 1), ("voxels", "false_positive_voxels_t1", 0),
          ("3 sigma", "fp_threshold_t1", 3), ("false positives T2w (bright)", "false_positives_t2", 1),
          ("voxels", "false_positive_voxels_t2", 0), ("3 sigma", "fp_threshold_t2", 3),
          ("counterfactual imprint of T2w-only on T1w", "imprint_cf_t1", 3),
          ("of T1w-only on T2w", "imprint_cf_t2", 3)]
    if _has(table, [k for _, k, _ in fp]):
        out += ["## False positives and counterfactual imprint", ""] + _table(table, fp)
        out += ["", "False positives per subject: blobs in normal tissue (brain minus lesions and tumour dilated by 2 "
                "voxels) where output - GT exceeds 3x the LR scan's noise SD (estimated from the scan, normalised "
                "units) over at least the smallest lesion volume the generator makes; on interpolated outputs most "
                "are blurred tissue boundaries, so read a method against trilinear and ibp on the same subjects. "
                "Counterfactual imprint (n/a unless run): |other contrast's output difference at the lesion between "
                "renders with and without that lesion class| / the lesion's own GT contrast; the GT's is 0.", ""]
    sized = _size_markdown(table)
    return "\n".join(out) + "\n" + sized


def _size_markdown(table: pd.DataFrame) -> str:
    keys = [(c, n) for c in ("t2", "t1") for n, _, _ in SIZE_BINS]
    if not _has(table, [f"lesion_contrast_{c}_{n}" for c, n in keys]):
        return ""
    head = [f"{_LABEL[c]} {SIZE_BIN_LABELS[n]}: recovered / exaggerated / within-slab (GT)" for c, n in keys]
    lines = ["| Method | " + " | ".join(head) + " | lesions / subject by bin (T2w-only; T1w-only) |",
             "|" + "---|" * (len(head) + 2)]
    for _, r in table.iterrows():
        cells = []
        for c, n in keys:
            ws, wg = r.get(f"within_slab_{c}_{n}_mean", math.nan), r.get(f"within_slab_gt_{c}_{n}_mean", math.nan)
            within = f"{ws:.3f} ({wg:.3f})" if isinstance(ws, float) and math.isfinite(ws) else "n/a"
            exag = pm(r, f"lesion_exaggerated_{c}_{n}", 2).split(" ±")[0]
            cells.append(f"{pm(r, f'lesion_contrast_{c}_{n}', 3)} / {exag} / {within}")
        counts = "; ".join(", ".join(f"{r.get(f'n_lesions_{c}_{n}_mean', math.nan):.1f}" for n, _, _ in SIZE_BINS)
                           for c in ("t2", "t1"))
        lines.append("| " + " | ".join([str(r["method"])] + cells + [counts]) + " |")
    return ("## Lesion fidelity by size\n\n" + "\n".join(lines) + "\n\nd: the lesion's extent across the slabs (its "
            "projection onto the thick axis of the contrast that shows it) / slab thickness; recovered: capped mean ± "
            "std over subjects with lesions in the bin; exaggerated: share above "
            f"{EXAGGERATED:g}x; within-slab: contrast of (I - A^+ A) x / GT contrast under the header's nominal "
            "operator, the output's beside the GT's own in brackets (a guarded output's lesion contrast beyond ibp's "
            "is its within-slab part); n/a: no lesion in the bin. Lesions thinner than a slab are partly averaged "
            "away by the acquisition itself.\n\n")
