"""Merge the per-subject rows of several `nexus-sr evaluate` runs (same protocol, same subjects)
into one Table 1: writes per_subject.csv, table1.csv and table1.md to --out.

    python scripts/merge_table1.py --protocol nexus --out results/table1_nexus results/run_a results/run_b

Methods keep the order of the runs (and within a run, of its table). A method present in two runs
or subjects that differ between runs are errors (the rows would not be comparable).
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from nexus_monai.data.io import write_text_atomic
from nexus_monai.evaluation.table1 import markdown_table, summarise
from nexus_monai.transforms.protocols import load_protocol


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("runs", nargs="+", help="output folders of nexus-sr evaluate")
    args = ap.parse_args(argv)
    frames, methods, subjects = [], [], None
    for run in args.runs:
        frame = pd.read_csv(Path(run) / "per_subject.csv")
        run_methods = list(pd.read_csv(Path(run) / "table1.csv")["method"])
        if set(run_methods) & set(methods):
            print(f"error: {run}: method(s) {sorted(set(run_methods) & set(methods))} already in an earlier run", file=sys.stderr)
            return 2
        subs = sorted(frame["subject"].unique())
        if subjects is not None and subs != subjects:
            print(f"error: {run}: subjects differ from the first run's", file=sys.stderr)
            return 2
        subjects = subs
        frames.append(frame)
        methods += run_methods
    frame = pd.concat(frames, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summarise(frame, methods)
    write_text_atomic(out / "per_subject.csv", frame.to_csv(index=False))
    write_text_atomic(out / "table1.csv", table.to_csv(index=False))
    note = "\n\nMerged from: " + ", ".join(f"`{r}`" for r in args.runs) + "\n"
    write_text_atomic(out / "table1.md", markdown_table(table, load_protocol(args.protocol), n_subjects=len(subjects)) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
