"""docs/protocol_grid.md from the protocol-grid runs (``nexus-sr evaluate --protocol grid``).

Runs made by ``scripts/protocol_grid_run.sh``; then

    python scripts/protocol_grid_report.py --out docs/protocol_grid.md --notes NOTES.md \
        docs/results/protocol_grid docs/results/protocol_grid_1mm

Reads every scored row (``<run>/<protocol>/<split>/rows/*.json``, so a run still going is read as far as
it got), keeps the subjects every method finished (paired comparisons on the same subjects), and writes
per protocol one table (rows: split x method) with masked PSNR against the noise-free ground truth,
paired gains over trilinear and over ``ibp``, the noisy-GT gain, lesion metric v2 columns and seconds,
then the earlier figures (issue 27's trial on the 2.0.0 world) beside where they exist. ``--notes``: a
Markdown file inserted after the header (the reading of the numbers, written by hand).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from nexus_monai.data.io import write_text_atomic
from nexus_monai.evaluation.protocol_grid import grid_summary, metric_cells
from nexus_monai.transforms.protocols import load_protocol, protocol_grid

ORDER = ("trilinear", "ibp", "nexus_inr", "nexus_inr_guarded")
OLD = {  # issue 27's trial: shipped default through `nexus-sr predict` (= nexus_inr_guarded) and ibp, gains over
    # trilinear masked T1w / T2w (dB) and T2w-only lesion contrast recovered (v1, uncapped); held-out anatomy, LR
    # noise 2 %, T1w Gaussian FWHM 1.25x, T2w boxcar 0.8x, slabs 0.3 voxel off the grid
    "nexus": "predict +2.6-2.8 / +7.8-8.0, lesions 0.39-0.49; ibp +1.3 / +1.0, 0.49-0.56 (two subjects)",
    "t1x2_t2z4": "predict +1.96 / +4.98, lesions 0.50; ibp +1.46 / +0.93, 0.56",
    "t1z2_t2y6": "predict +2.38 / +7.55, lesions 0.21 (trilinear 0.27); ibp +1.33 / +0.83, 0.36",
    "t1y4_t2z2": "predict +2.30 / +4.85, lesions 0.75; ibp +1.07 / +1.53, 0.75",
    "nexus_1mm": "predict +3.72 / +5.37, lesions 0.67; ibp +1.04 / +0.91, 0.70",
}


def load_rows(runs: list[str]) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for run in runs for p in sorted(Path(run).glob("*/*/rows/*.json"))]
    frame = pd.DataFrame(rows)
    if not len(frame):
        raise SystemExit("error: no scored rows under " + ", ".join(runs))
    frame = frame[frame["error"].fillna("") == ""]
    methods = [m for m in ORDER if m in set(frame["method"])]
    complete = frame.groupby(["protocol", "split", "subject"])["method"].transform(
        lambda s: set(methods) <= set(s))
    return frame[complete.astype(bool)]


def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def protocol_table(summary: pd.DataFrame) -> str:
    head = ("| split | method | n | PSNR T1w / T2w (dB) | gain over trilinear T1w / T2w (interior) | gain over ibp "
            "T1w / T2w | noisy-GT gain over trilinear | T2w-only / T1w-only contrast recovered, v2 capped (v1) | "
            "T2w-only within-slab | false positives / subject T2w, T1w | s / subject |")
    lines = [head, "|" + "---|" * 11]
    for _, r in summary.iterrows():
        lines.append(
            f"| {r['split']} | {r['method']} | {r['n']} " + metric_cells(r) + f"| {_f(r['seconds'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--notes", default=None, help="Markdown inserted after the header")
    ap.add_argument("--header", default=None, help="Markdown file replacing the default header")
    ap.add_argument("runs", nargs="+", help="protocol-grid output folders")
    args = ap.parse_args(argv)
    rows = load_rows(args.runs)
    summary = grid_summary(rows)
    order = {m: i for i, m in enumerate(ORDER)}
    summary = summary.assign(_o=summary["method"].map(lambda m: order.get(m, 99)))
    entries = [e for e in protocol_grid("grid") if e.name in set(summary["protocol"])]
    parts = [Path(args.header).read_text() if args.header else "# Protocol grid\n"]
    if args.notes:
        parts.append(Path(args.notes).read_text())
    parts.append("## Tables\n")
    for e in entries:
        c = load_protocol(e.protocol).config["contrasts"]
        part = summary[summary["protocol"] == e.name].sort_values(["split", "_o"], key=lambda s: s.map(
            {"test": 0, "test_anatomy": 1}).fillna(s) if s.name == "split" else s)
        subjects = {s: sorted(rows[(rows["protocol"] == e.name) & (rows["split"] == s)]["subject"].unique())
                    for s in part["split"].unique()}
        parts.append(f"### `{e.name}`: T1w {c['t1']['axis']}×{c['t1']['factor']}, T2w {c['t2']['axis']}×"
                     f"{c['t2']['factor']} ({'1 mm' if e.world == 'full' else '2 mm'} world)\n")
        parts.append(protocol_table(part) + "\n")
        parts.append("Subjects: " + "; ".join(f"{s}: {', '.join(v)}" for s, v in subjects.items()) + ".\n")
        if e.name in OLD:
            parts.append(f"Earlier figures (issue 27's trial, synth 2.0.0 world with a hand-made acquisition, gains "
                         f"over trilinear T1w / T2w, T2w-only contrast recovered v1): {OLD[e.name]}.\n")
    write_text_atomic(args.out, "\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
