"""``nexus-sr evaluate``: Table 1: simulate the protocol's LR inputs, run the methods, write tables, panels and an
MLflow run. (Table 5, segmentation of every method's output, has one entry point: ``nexus-sr experiment table5``.)"""

from __future__ import annotations

import argparse
from pathlib import Path

from nexus_monai.cli.common import method_options
from nexus_monai.errors import NexusInputError, check_number

__all__ = ["add_parser", "cmd_evaluate"]


def cmd_evaluate(args) -> int:
    from nexus_monai.data.staging import check_output_dir
    from nexus_monai.engines.mlflow_logging import tracking_uri as project_tracking_uri
    from nexus_monai.evaluation.methods import check_methods
    from nexus_monai.evaluation.table1 import check_subject_files, evaluate_methods, select_subjects
    from nexus_monai.transforms.protocols import load_protocol

    if args.downstream:
        raise NexusInputError(None, "Table 5 has one entry point: nexus-sr experiment table5 [--methods ...] --out DIR "
                                    "(--downstream was removed from evaluate)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise NexusInputError(None, "--methods is empty")
    options = method_options(args.weights, "weights")
    for name, opts in method_options(args.bundle, "bundle").items():
        options.setdefault(name, {}).update(opts)
    check_output_dir(args.out, None, what="evaluate output folder")
    if args.max_subjects is not None:
        check_number("--max-subjects", args.max_subjects, 1, None, integer=True)
    if _is_grid(args.protocol) or "," in args.split:
        return _cmd_grid(args, methods, options)
    try:
        protocol = load_protocol(args.protocol)
    except NexusInputError:
        raise
    except Exception as err:  # not YAML, not a protocol: one line naming the file
        first = " ".join(str(err).split())[:160]
        raise NexusInputError(args.protocol, f"not a protocol YAML file ({type(err).__name__}: {first})") from None
    subjects = select_subjects(args.data, args.split, seed=args.seed, max_subjects=args.max_subjects)
    # every check before any work: method names, checkpoints, datalist files
    check_methods(methods, options)
    check_subject_files(subjects, ("t1", "t2"))
    mlflow = None
    if not args.no_mlflow:
        mlflow = {
            "tracking_uri": args.tracking_uri,
            "run_name": args.run_name or f"evaluate_{protocol.name}_{args.split}",
            "experiment": args.experiment,
            "params": {"data": args.data, "split": args.split, "protocol": protocol.name, "methods": ",".join(methods),
                       "n_subjects": len(subjects), "lpips": not args.no_lpips,
                       **{f"{m}.{k}": v for m, o in options.items() for k, v in o.items()}},
        }
    evaluate_methods(subjects, methods, protocol, args.out, lpips=not args.no_lpips, progress=not args.quiet,
                     method_options=options, mlflow=mlflow, counterfactual_imprint=args.counterfactual_imprint)
    print((Path(args.out) / "table1.md").read_text())
    if mlflow is not None:
        uri = project_tracking_uri(args.tracking_uri)
        print(f"MLflow run {mlflow['run_name']!r} logged to {uri} (mlflow ui --backend-store-uri {uri})")
    return 0


def _is_grid(protocol: str) -> bool:
    """``--protocol grid``, a comma list, or a grid entry that is not a plain protocol (``nexus_1mm``)."""
    from nexus_monai.transforms.protocols import PROTOCOLS, protocol_grid

    if protocol == "grid" or "," in protocol:
        return True
    return protocol not in PROTOCOLS and not Path(protocol).exists() and protocol in {
        e.name for e in protocol_grid("grid")}


def _cmd_grid(args, methods: list, options: dict) -> int:
    """The protocol grid (:mod:`nexus_monai.evaluation.protocol_grid`): one table per protocol and split, a
    summary; resumable (rows already in ``--out`` are kept); ``--split`` may be a comma list; no MLflow run."""
    from nexus_monai.evaluation.protocol_grid import run_protocol_grid
    from nexus_monai.transforms.protocols import protocol_grid

    entries = protocol_grid(args.protocol)  # unknown names: one line before any work
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if getattr(args, "counterfactual_imprint", False):
        raise NexusInputError(None, "--counterfactual-imprint is not available with a protocol grid")
    run_protocol_grid(entries, methods, args.out, splits=splits, data=args.data, seed=args.seed,
                      max_subjects=args.max_subjects, max_subjects_full=args.max_subjects, method_options=options,
                      progress=not args.quiet)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` on the sub-command set ``sub``."""
    e = sub.add_parser("evaluate",
                       help="Table 1: simulate LR inputs, run methods, write per-subject and summary tables")
    e.add_argument("--data", required=True,
                   help="dataset folder (with dataset.json), a datalist JSON, a BraTS root, or \"embedded\" (the "
                        "bundles' default simulated dataset)")
    e.add_argument("--methods", default="trilinear,ibp,cubic",
                   help="comma-separated: trilinear,ibp (back-projection: trilinear + predict's consistency guard, "
                        "no network),cubic,lrtv,smore,saint,i3net,arssr,ssmcsr_split_head,"
                        "ssmcsr_vanilla,ssmcsr_single,cycleinr,nexus_inr,nexus_inr_guarded,nexus_inr_refined "
                        "(NEXUS_REFINE_OPTIONS={\"max_seconds\": 180} sets its budget)")
    e.add_argument("--protocol", default="nexus",
                   help="nexus, ssmcsr, a protocol YAML path, or a protocol grid: grid (transforms/protocol_grid.yaml: "
                        "t1x2_t2z4, t1z2_t2y6, t1iso_t2z5, t1y4_t2z2, t2z2p5, nexus_1mm beside nexus) or a comma "
                        "list of those names (one table per protocol and split, a summary.md; resumable; --split "
                        "may then be a comma list, e.g. test,test_anatomy)")
    e.add_argument("--split", default="test",
                   help="datalist split to evaluate (training, validation, test; test_anatomy: the embedded test-only "
                        "anatomy family)")
    e.add_argument("--seed", type=int, default=0, help="split seed when --data is a BraTS root without datalist")
    e.add_argument("--max-subjects", type=int, default=None)
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as n/a)")
    e.add_argument("--counterfactual-imprint", action="store_true",
                   help="lesion metric v2: also re-render each simulated subject without its T2w-only and without "
                        "its T1w-only lesions and re-run every method on both (imprint_cf_t1 / imprint_cf_t2; three "
                        "generator renders per subject and three extra runs of every method)")
    e.add_argument("--downstream", default="", help=argparse.SUPPRESS)  # removed: Table 5 is `experiment table5`
    e.add_argument("--weights", action="append", metavar="METHOD=CKPT",
                   help="checkpoint of a cohort method instead of bundles/<method>/models/model.pt; repeatable")
    e.add_argument("--bundle", action="append", metavar="METHOD=FOLDER",
                   help="bundle folder of a cohort method instead of bundles/<method>; repeatable")
    e.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    e.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the project store "
                        "~/.cache/nexus_monai/mlflow/mlruns.db)")
    e.add_argument("--experiment", default="nexus_monai_evaluate", help="MLflow experiment name")
    e.add_argument("--run-name", default=None, help="MLflow run name (default evaluate_<protocol>_<split>)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_evaluate)
