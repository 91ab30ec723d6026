"""``nexus-sr experiment``: the Nexus-INR paper's Tables 2-5 (train every row x seed, score, tabulate)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "cmd_experiment"]


def cmd_experiment(args) -> int:
    from nexus_monai.experiments import run_experiment

    written = run_experiment(args.table, form=args.form, seeds=args.seeds, out=args.out, data=args.data, jobs=args.jobs,
                             max_epochs=args.max_epochs, overrides=args.override or (), lpips=not args.no_lpips,
                             weights=args.weights or (), methods=args.methods)
    print("wrote", written["csv"], written["md"])
    return 0



def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``experiment`` on the sub-command set ``sub``."""
    ex = sub.add_parser("experiment",
                        help="the Nexus-INR paper's Tables 2-5: train every row x seed, score the test split(s), "
                             "tabulate")
    ex.add_argument("table", help="table2 (components), table3 (encoders), table4 (decoders), table5 (segmentation)")
    ex.add_argument("--form", default="default",
                    help="default (CPU default, ours) or paper_cpu (the paper's form at CPU width)")
    ex.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ex.add_argument("--max-epochs", type=int, default=None, help="training epochs per run (default: the form's)")
    ex.add_argument("--data", default="embedded", help="dataset folder / datalist JSON / BraTS root, or embedded")
    ex.add_argument("--jobs", type=int, default=1, help="trainings at once (>1: OMP_NUM_THREADS=1 each)")
    ex.add_argument("--override", action="append", metavar="KEY=VALUE",
                    help="bundle config override for every run (YAML value); repeatable")
    ex.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    ex.add_argument("--methods", help="table5: method rows computed in this run (default all; comma-separated)")
    ex.add_argument("--weights", action="append", metavar="ROW=PATH", help="table5: checkpoint or run folder of a row")
    ex.add_argument("--out", required=True,
                    help="output folder (runs/, tableN.csv, tableN.md); MLflow runs go to the project store")
    ex.set_defaults(func=cmd_experiment)
