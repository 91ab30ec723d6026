"""``nexus-sr``: the command-line face of nexus_monai (also ``python -m nexus_monai``).

Sub-commands: ``synth`` (embedded dataset), ``degrade`` (HR scan -> simulated thick-slice LR),
``upsample`` (interpolation baselines onto any grid), ``baseline`` (one thick-slice scan:
LRTV, SMORE per scan; SAINT, I3Net from their trained bundles), ``predict`` (a trained bundle
on a subject's two LR scans, any output grid), ``fit-subject`` (SSMCSR on one subject's two LR
scans), ``evaluate`` (Table 1 / Table 5 runner), ``benchmark`` (speed and memory of
inference/training), ``serve`` (MONAI-Label-style REST service). Errors in the user's input
print one line ``error: <file>: <problem>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nexus_monai import __version__
from nexus_monai.bundle_paths import default_bundle
from nexus_monai.cli_benchmark import add_benchmark_arguments
from nexus_monai.cli_help import HelpfulParser
from nexus_monai.errors import NexusInputError, check_number, find_input_error

# Each command imports what it runs inside its function: every nexus_monai module below this one
# loads torch and MONAI (about 6 s on one CPU core), and `nexus-sr --help`, `--version` and
# argument errors answer in about 0.2 s without them. (No import cycle is being avoided.)

__all__ = ["main", "build_parser"]

MAX_GRID_VOXELS = 1.5e8  # upsample / baseline output grids (float64 temporaries: ~36 bytes per voxel)


def _grid_from_args(args, image):
    from nexus_monai.data.io import load_volume
    from nexus_monai.engines.predict import MAX_SPACING_MM, check_reachable
    from nexus_monai.geometry import TargetGrid

    if args.like:
        reference = load_volume(args.like)  # finite, invertible affine checked there
        grid = TargetGrid.like(reference)
    elif args.spacing:
        sp = args.spacing if len(args.spacing) == 3 else args.spacing * 3
        if len(args.spacing) not in (1, 3):
            raise NexusInputError(None, "--spacing takes one value (isotropic) or three (mm)")
        for v in sp:
            check_number("--spacing", v, 0, MAX_SPACING_MM, lo_open=True)
        try:
            grid = TargetGrid.from_spacing(image.shape[1:], image.affine, sp)
        except ValueError as err:
            raise NexusInputError(None, f"--spacing: {err}") from err
    else:
        raise NexusInputError(None, "give a target grid: --spacing MM [MM MM] or --like IMAGE")
    check_reachable(grid, {"image": image}, {"image": args.image}, MAX_GRID_VOXELS)
    return grid


def _check_early(args, command: str) -> None:
    """predict / fit-subject: output folder, numbers and the target grid checked before anything loads."""
    from nexus_monai.data.staging import check_output_dir
    from nexus_monai.engines.consistency import CONSISTENCY_NAMES
    from nexus_monai.engines.predict import MAX_SPACING_MM, OUTPUT_NAMES, target_grid

    owned = list(OUTPUT_NAMES.values()) + (["fit_log.json"] if command == "fit-subject" else [])
    if command == "predict":
        owned += list(CONSISTENCY_NAMES.values())
    check_output_dir(args.out, owned)
    check_number("--threads", args.threads, 0, None, integer=True)
    if getattr(args, "chunk_size", None) is not None:
        check_number("--chunk-size", args.chunk_size, 1, None, integer=True)
    if args.spacing:
        for v in args.spacing:
            check_number("--spacing", v, 0, MAX_SPACING_MM, lo_open=True)
    if args.like:
        target_grid(None, like=args.like)  # a reference grid that cannot be read or used: before any work


def cmd_synth(args) -> int:
    from nexus_monai.data.synth import generate_dataset

    path = generate_dataset(args.out, subjects=args.subjects, seed=args.seed, size=args.size,
                            test_anatomy=args.test_anatomy)
    print(f"wrote {args.subjects} simulated subjects + {args.test_anatomy} test-only-anatomy subjects and {path}")
    return 0


def cmd_degrade(args) -> int:
    from nexus_monai.data.io import load_volume, save_volume
    from nexus_monai.data.staging import check_output_file
    from nexus_monai.geometry import parse_axis
    from nexus_monai.transforms.acquisition import (
        AcquisitionRicianNoise,
        SimulateAnisotropicAcquisition,
        num_thick_slices,
    )

    check_output_file(args.out)
    check_number("--factor", args.factor, 1, None)
    check_number("--noise", args.noise, 0, 10)
    image = load_volume(args.image)
    try:
        axis = parse_axis(args.axis)
    except ValueError as err:
        raise NexusInputError(None, f"--axis: {err}") from err
    if not args.factor >= 1:
        raise NexusInputError(None, f"--factor must be >= 1, got {args.factor}")
    if num_thick_slices(image.shape[axis + 1], args.factor) < 1:
        raise NexusInputError(args.image,
                              f"axis {args.axis} has {image.shape[axis + 1]} voxels, fewer than one slab of factor "
                              f"{args.factor}")
    lr = SimulateAnisotropicAcquisition(axis, args.factor, args.profile)(image)
    lr = AcquisitionRicianNoise(args.noise).set_random_state(args.seed)(lr)
    save_volume(lr, args.out)
    sp = [round(float(v), 4) for v in lr.affine[:3, :3].norm(dim=0)]
    print(f"wrote {args.out}: shape {tuple(lr.shape[1:])}, spacing {sp} mm")
    return 0


def cmd_upsample(args) -> int:
    from nexus_monai.baselines.interpolation import upsample
    from nexus_monai.data.io import load_volume, save_volume
    from nexus_monai.data.staging import check_output_file

    check_output_file(args.out)
    image = load_volume(args.image)
    grid = _grid_from_args(args, image)
    out = upsample(image, grid, args.method)
    save_volume(out, args.out)
    print(f"wrote {args.out}: shape {grid.shape}, spacing {[round(float(v), 4) for v in grid.spacing]} mm "
          f"({args.method})")
    return 0


def cmd_baseline(args) -> int:
    from nexus_monai.baselines.i3net import i3net
    from nexus_monai.baselines.lrtv import lrtv
    from nexus_monai.baselines.saint import saint
    from nexus_monai.baselines.smore import smore
    from nexus_monai.data.io import load_volume, save_volume
    from nexus_monai.data.staging import check_output_file

    check_output_file(args.out)
    image = load_volume(args.image)
    grid = _grid_from_args(args, image)
    method = {"lrtv": lrtv, "smore": smore, "saint": saint, "i3net": i3net}[args.method]
    out = method(image, grid, source=args.image)
    save_volume(out, args.out)
    print(f"wrote {args.out}: shape {grid.shape}, spacing {[round(float(v), 4) for v in grid.spacing]} mm "
          f"({args.method})")
    return 0


def _method_options(pairs, what: str) -> dict:
    """``["cycleinr=PATH", ...]`` -> ``{"cycleinr": {what: "PATH"}}`` (one-line error on a malformed pair)."""
    out: dict = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise NexusInputError(None, f"--{what} takes METHOD=PATH, got {pair!r}")
        out.setdefault(name.strip(), {})[what] = value.strip()
    return out


def cmd_evaluate(args) -> int:
    from nexus_monai.data.staging import check_output_dir
    from nexus_monai.engines.mlflow_logging import tracking_uri as project_tracking_uri
    from nexus_monai.evaluation.downstream import load_segmenters
    from nexus_monai.evaluation.methods import check_methods
    from nexus_monai.evaluation.table1 import check_subject_files, evaluate_methods, select_subjects
    from nexus_monai.transforms.protocols import load_protocol

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise NexusInputError(None, "--methods is empty")
    options = _method_options(args.weights, "weights")
    for name, opts in _method_options(args.bundle, "bundle").items():
        options.setdefault(name, {}).update(opts)
    check_output_dir(args.out, None, what="evaluate output folder")
    if args.max_subjects is not None:
        check_number("--max-subjects", args.max_subjects, 1, None, integer=True)
    try:
        protocol = load_protocol(args.protocol)
    except NexusInputError:
        raise
    except Exception as err:  # not YAML, not a protocol: one line naming the file
        first = " ".join(str(err).split())[:160]
        raise NexusInputError(args.protocol, f"not a protocol YAML file ({type(err).__name__}: {first})") from None
    subjects = select_subjects(args.data, args.split, seed=args.seed, max_subjects=args.max_subjects)
    downstream = [s.strip() for s in (args.downstream or "").split(",") if s.strip()]
    # every check before any work: method names, checkpoints, datalist files, segmenters
    check_methods(methods, options)
    check_subject_files(subjects, ("t1", "t2", "seg") if downstream else ("t1", "t2"))
    segmenters = load_segmenters(downstream)
    mlflow = None
    if not args.no_mlflow:
        mlflow = {
            "tracking_uri": args.tracking_uri,
            "run_name": args.run_name or f"evaluate_{protocol.name}_{args.split}",
            "experiment": args.experiment,
            "params": {"data": args.data, "split": args.split, "protocol": protocol.name, "methods": ",".join(methods),
                       "n_subjects": len(subjects), "lpips": not args.no_lpips,
                       "downstream": ",".join(downstream) or "none",
                       **{f"{m}.{k}": v for m, o in options.items() for k, v in o.items()}},
        }
    evaluate_methods(subjects, methods, protocol, args.out, lpips=not args.no_lpips, progress=not args.quiet,
                     segmenters=segmenters,
                     method_options=options, mlflow=mlflow)
    print((Path(args.out) / "table1.md").read_text())
    if segmenters:
        print((Path(args.out) / "table5.md").read_text())
    if mlflow is not None:
        uri = project_tracking_uri(args.tracking_uri)
        print(f"MLflow run {mlflow['run_name']!r} logged to {uri} (mlflow ui --backend-store-uri {uri})")
    return 0


def cmd_predict(args) -> int:
    import torch

    from nexus_monai.engines.predict import load_bundle, predict_files
    from nexus_monai.engines.refine import check_refine_seconds

    refine = check_refine_seconds(args.refine, "--refine") if args.refine is not None else 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    for c, path in (("t1", args.t1), ("t2", args.t2)):
        if not Path(path).is_file():
            raise NexusInputError(path, f"{c} input scan not found")
    _check_early(args, "predict")
    network, inferer, _ = load_bundle(args.bundle, args.config or (), weights=args.weights, device=args.device)
    if args.chunk_size is not None:  # else the bundle inferer's (inference.yaml chunk_size; configs/gpu.yaml: larger)
        inferer.chunk_size = int(args.chunk_size)  # checked in _check_early
    if args.max_memory_gib is not None:  # else the bundle inferer's budget (inference.yaml: auto, sized for the device)
        inferer.max_memory_gib = check_number("--max-memory-gib", args.max_memory_gib, 0, None, lo_open=True)
    inferer.progress = not args.quiet
    spacing = None
    if args.spacing:
        if len(args.spacing) not in (1, 3):
            raise NexusInputError(None, "--spacing takes one value (isotropic) or three (mm)")
        spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    result = predict_files(network, args.t1, args.t2, args.out, spacing_mm=spacing, like=args.like, inferer=inferer,
                           refine_seconds=refine, guard=args.guard)
    print(f"wrote {result['t1']} and {result['t2']}: grid {result['grid_shape']}, spacing {result['spacing_mm']} mm")
    if "refine" in result:
        log = result["refine"]
        print(f"refinement: {log['iterations']} steps in {log['seconds']:.1f} s; "
              + ", ".join(f"{c} {log['chosen'][c]} (held-out MSE {log['cohort_holdout_mse'][c]:.3g} -> "
                          f"{log['best_holdout_mse'][c]:.3g})"
                          for c in ("t1", "t2")))
    if "consistency" in result:
        rep = result["consistency"]
        print("consistency guard: " + ", ".join(
            f"{c} LR residual RMS {rep[c]['residual_rms_before']:.4g} -> {rep[c]['residual_rms_after']:.4g}, "
            f"{rep[c]['voxels_above_before']} -> {rep[c]['voxels_above_after']} LR voxels above "
            f"{rep[c]['threshold']:.4g}"
            for c in ("t1", "t2")) + f"; maps {result['t1_consistency'].name}, {result['t2_consistency'].name}")
    return 0


def cmd_benchmark(args) -> int:
    """Speed and memory of Nexus-INR vs trilinear on one whole volume, and training steps/s.

    The hidden ``--size X Y Z`` (tests) sets the output volume in voxels instead of 240 x 240 x 160;
    see :mod:`nexus_monai.benchmark` for what is measured and how.
    """
    from nexus_monai.benchmark import format_report, run_benchmark

    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"benchmark: {msg}", file=sys.stderr, flush=True))
    result = run_benchmark(bundle=args.bundle, overlays=args.config or (), weights=args.weights,
                           random_weights=args.random_weights,
                           size=args.size,
                           chunk_size=args.chunk_size, threads=args.threads, train_steps=args.train_steps,
                           skip_train=args.skip_train, compare_before=not args.skip_before, fit=args.fit,
                           fit_author_seconds=args.fit_author_seconds, repeats=args.repeats, log=log,
                           device=args.device, amp=args.amp,
                           **({} if args.max_memory_gib is None else {"max_memory_gib": args.max_memory_gib}))
    print(format_report(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_serve(args) -> int:
    """MONAI-Label-style REST service (``GET /info/``, ``POST /infer/{model}``); see :mod:`nexus_monai.serving`."""
    import torch

    from nexus_monai.serving.app import create_app  # fastapi and uvicorn only for serve
    from nexus_monai.serving.models import load_models
    from nexus_monai.serving.server import run_server

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers < 1 or args.max_queue < args.workers or args.max_upload_mb <= 0:
        raise NexusInputError(None, "--workers must be >= 1, --max-queue >= --workers and --max-upload-mb > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = load_models(args.bundle or ["bundles/nexus_inr"], args.config, args.weights, device=args.device,
                         chunk_size=args.chunk_size, max_output_voxels=args.max_output_voxels,
                         max_memory_gib=None if args.max_memory_gib is None else check_number("--max-memory-gib",
                                                                                              args.max_memory_gib,
                                                                                               0, None, lo_open=True))
    app = create_app(models, max_upload_bytes=int(args.max_upload_mb * 2**20), workers=args.workers,
                     max_queue=args.max_queue,
                     workdir=args.workdir)
    print(f"models: {', '.join(f'{n} ({m.version}, {m.device})' for n, m in models.items())}", flush=True)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_experiment(args) -> int:
    from nexus_monai.experiments import run_experiment

    written = run_experiment(args.table, form=args.form, seeds=args.seeds, out=args.out, data=args.data, jobs=args.jobs,
                             max_epochs=args.max_epochs, overrides=args.override or (), lpips=not args.no_lpips,
                             weights=args.weights or (), methods=args.methods)
    print("wrote", written["csv"], written["md"])
    return 0


def cmd_fit_subject(args) -> int:
    """SSMCSR: fit a subject-specific INR on one subject's T1w + T2w LR scans, write both SR volumes + a JSON log."""
    import torch

    from nexus_monai.engines.subject_fit import SubjectFitter, fit_files

    _check_early(args, "fit-subject")
    check_number("--max-minutes", args.max_minutes, 0, None)
    check_number("--lr", args.lr, 0, None, lo_open=True)
    check_number("--point-warmup", args.point_warmup, 0, 1)
    for name in ("epochs", "batch_size", "hidden", "trunk_layers", "head_hidden"):
        check_number(f"--{name.replace('_', '-')}", getattr(args, name), 1, None, integer=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    fitter = SubjectFitter(variant=args.variant, forward_model=args.forward_model, profile=args.profile,
                           hidden=args.hidden,
                           trunk_layers=args.trunk_layers, head_hidden=args.head_hidden, learning_rate=args.lr,
                           batch_size=args.batch_size, epochs=args.epochs, point_warmup=args.point_warmup,
                           max_seconds=None if args.max_minutes <= 0 else args.max_minutes * 60.0,
                           early_stopping=not args.no_early_stopping, seed=args.seed, device=args.device,
                           progress=not args.quiet)
    spacing = None
    if args.spacing:
        if len(args.spacing) not in (1, 3):
            raise NexusInputError(None, "--spacing takes one value (isotropic) or three (mm)")
        spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    result = fit_files(fitter, args.t1, args.t2, args.out, spacing_mm=spacing, like=args.like)
    log = result["log"]
    print(f"wrote {result['t1']}, {result['t2']} and {result['log_path']}: grid {result['grid_shape']}, "
          f"{log['iterations']} iterations, "
          f"stop: {log['stop_reason']} (epoch {log['stop_epoch']}), fit {log['seconds_fit']:.1f} s, predict "
          f"{log['seconds_predict']:.1f} s")
    return 0


def _add_grid_args(parser: argparse.ArgumentParser) -> None:
    """The target-grid options shared by every command that writes onto a chosen grid."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--spacing", type=float, nargs="+",
                   help="target voxel size in mm (1 or 3 values), same field of view")
    g.add_argument("--like", help="output on the grid of this NIfTI (any affine, oblique included)")


def build_parser() -> argparse.ArgumentParser:
    p = HelpfulParser(prog="nexus-sr", description="Arbitrary-scale multi-contrast brain-MRI super-resolution (MONAI).",
                      epilog="example:\n  nexus-sr predict --help    (every command's --help ends with an example)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the embedded simulated BraTS-format dataset (public template anatomy)")
    s.add_argument("--out", required=True)
    s.add_argument("--subjects", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=("small", "full"), default="small",
                   help="small: 2 mm voxels; full: 240x240x155 at 1 mm")
    s.add_argument("--test-anatomy", type=int, default=5,
                   help="subjects of the test-only anatomy family (split test_anatomy)")
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("degrade", help="simulate a thick-slice LR acquisition of an HR scan")
    d.add_argument("--image", required=True)
    d.add_argument("--axis", required=True, help="thick axis: x, y or z (array axes i, j, k)")
    d.add_argument("--factor", type=float, required=True, help="slab thickness in HR voxels (may be non-integer)")
    d.add_argument("--profile", choices=("gaussian", "boxcar", "none"), default="gaussian")
    d.add_argument("--noise", type=float, default=0.0, help="Rician sigma as a fraction of the 99.5th percentile")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_degrade)

    u = sub.add_parser("upsample", help="interpolate a scan onto another grid (trilinear / cubic B-spline)")
    u.add_argument("--image", required=True)
    u.add_argument("--method", choices=("trilinear", "cubic", "bspline", "nearest"), default="trilinear")
    _add_grid_args(u)
    u.add_argument("--out", required=True)
    u.set_defaults(func=cmd_upsample)

    b = sub.add_parser("baseline",
                       help="super-resolve one thick-slice LR scan: lrtv, smore (per scan), saint, i3net (trained "
                            "bundles)")
    b.add_argument("--method", choices=("lrtv", "smore", "saint", "i3net"), required=True)
    b.add_argument("--image", required=True)
    _add_grid_args(b)
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_baseline)

    pr = sub.add_parser("predict",
                        help="super-resolve a subject's T1w + T2w LR scans with a trained bundle (Nexus-INR)")
    pr.add_argument("--bundle", default=None,
                    help="bundle folder (configs/inference.yaml, models/model.pt); default: the checkout's "
                         "bundles/nexus_inr")
    pr.add_argument("--config", action="append",
                    help="config overlay the checkpoint was trained with (e.g. configs/paper.yaml); repeatable")
    pr.add_argument("--weights", help="checkpoint path (default <bundle>/models/model.pt)")
    pr.add_argument("--t1", required=True, help="T1w LR NIfTI")
    pr.add_argument("--t2", required=True, help="T2w LR NIfTI")
    _add_grid_args(pr)
    pr.add_argument("--out", required=True, help="output folder: t1w_sr.nii.gz, t2w_sr.nii.gz")
    pr.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: cuda if available)")
    pr.add_argument("--chunk-size", type=int, default=None,
                    help="query points decoded at once (bounds peak memory; default: the bundle's, 32768)")
    pr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    pr.add_argument("--max-memory-gib", type=float, default=None,
                    help="target peak RSS in GiB (on CUDA: device memory): the encoders run on tiles of the LR volumes "
                         "sized to it (default: auto, sized for the device with a bounded halo overhead)")
    pr.add_argument("--refine", metavar="SECONDS", default=None,
                    help="test-time refinement: fine-tune a copy of the model on these two scans for SECONDS through "
                         "the acquisition model; held-out LR voxels decide per contrast whether the refined model is used")
    pr.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                    help="data-consistency guard (default on): correct the output where its re-acquisition departs "
                         "from the input scans beyond noise; writes t1w/t2w_consistency.nii.gz (LR residual, output grid)")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)

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
    e.add_argument("--protocol", default="nexus", help="nexus, ssmcsr or a protocol YAML path")
    e.add_argument("--split", default="test",
                   help="datalist split to evaluate (training, validation, test; test_anatomy: the embedded test-only "
                        "anatomy family)")
    e.add_argument("--seed", type=int, default=0, help="split seed when --data is a BraTS root without datalist")
    e.add_argument("--max-subjects", type=int, default=None)
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as n/a)")
    e.add_argument("--downstream", default="",
                   help="segmenter bundles for Table 5, e.g. seg_unet,seg_transunet (trained weights in "
                        "bundles/<name>/models)")
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

    bm = sub.add_parser("benchmark",
                        help="time one 240x240x160 volume (Nexus-INR vs trilinear, memory, matmul bound) and training "
                             "steps/s")
    add_benchmark_arguments(bm)
    bm.set_defaults(func=cmd_benchmark)

    sv = sub.add_parser("serve",
                        help="MONAI-Label-style REST service: GET /info/, POST /infer/{model} with NIfTI uploads")
    sv.add_argument("--bundle", action="append",
                    help="bundle folder to serve, named by its folder (default: the checkout's bundles/nexus_inr); "
                         "repeatable")
    sv.add_argument("--config", action="append",
                    help="config overlay the checkpoint was trained with; [MODEL=]PATH, repeatable")
    sv.add_argument("--weights", action="append", help="checkpoint; [MODEL=]PATH (default <bundle>/models/model.pt)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed on the first line)")
    sv.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: the bundle's device)")
    sv.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    sv.add_argument("--workers", type=int, default=1, help="inference threads (requests run at once)")
    sv.add_argument("--max-queue", type=int, default=16, help="requests waiting or running before 503 busy")
    sv.add_argument("--max-upload-mb", type=float, default=512.0, help="largest request body in MiB (413 above)")
    sv.add_argument("--max-output-voxels", type=float, default=1.5e8,
                    help="largest volume in voxels: target grid (422 above) and uploads by their header (413 above)")
    sv.add_argument("--chunk-size", type=int, default=32768, help="query points decoded at once (bounds peak memory)")
    sv.add_argument("--max-memory-gib", type=float, default=None,
                    help="target peak RSS of an inference in GiB (encoder tiles, as for predict; default 1.75)")
    sv.add_argument("--workdir", default=None,
                    help="parent of the per-request temporary folders (default: system temp)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(func=cmd_serve)
    fs = sub.add_parser("fit-subject",
                        help="SSMCSR: fit a subject-specific INR on a subject's T1w + T2w LR scans (no HR data), write "
                             "both SR volumes")
    fs.add_argument("--t1", required=True, help="T1w LR NIfTI")
    fs.add_argument("--t2", required=True, help="T2w LR NIfTI (registered to the T1w: same world frame)")
    fs.add_argument("--variant", choices=("split_head", "vanilla", "single"), default="split_head")
    fs.add_argument("--forward-model", choices=("profile", "point"), default="profile",
                    help="profile (ours): LR voxel = slice-profile-weighted INR samples along the thick axis; point "
                         "(paper): INR at the voxel centre")
    fs.add_argument("--profile", choices=("gaussian", "boxcar", "none"), default="gaussian",
                    help="slice profile of the acquisition (profile model)")
    _add_grid_args(fs)
    fs.add_argument("--out", required=True, help="output folder: t1w_sr.nii.gz, t2w_sr.nii.gz, fit_log.json")
    fs.add_argument("--max-minutes", type=float, default=14.0,
                    help="wall-clock budget of the fit, rendering excluded (0: none; then --epochs or the MI plateau "
                         "ends it)")
    fs.add_argument("--epochs", type=int, default=50, help="passes over all observed LR voxels (paper: 50)")
    fs.add_argument("--batch-size", type=int, default=250, help="LR voxels per step (paper: 1000)")
    fs.add_argument("--lr", type=float, default=2e-3,
                    help="Adam learning rate, cosine-annealed over the run (paper: 4e-4)")
    fs.add_argument("--point-warmup", type=float, default=0.4,
                    help="fraction of the run fitted with the point model before the profile model (paper: 0)")
    fs.add_argument("--hidden", type=int, default=256, help="trunk width (paper: 1024)")
    fs.add_argument("--trunk-layers", type=int, default=5, help="Linear+ReLU layers of the trunk (paper: 5)")
    fs.add_argument("--head-hidden", type=int, default=128, help="hidden width of each split head (paper: 512)")
    fs.add_argument("--no-early-stopping", action="store_true", help="disable the MI-plateau stop")
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    fs.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    fs.add_argument("--quiet", action="store_true")
    fs.set_defaults(func=cmd_fit_subject)

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
    return p


def _default_bundle(args: argparse.Namespace) -> None:
    """No ``--bundle``: the source checkout's ``bundles/nexus_inr`` from any folder, or a one-line error with a hint."""
    if args.command in ("predict", "benchmark") and args.bundle is None:
        args.bundle = str(default_bundle("nexus_inr"))
    elif args.command == "serve" and not args.bundle:
        args.bundle = [str(default_bundle("nexus_inr"))]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _default_bundle(args)
        return args.func(args)
    except Exception as err:
        found = find_input_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
