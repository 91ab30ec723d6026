"""``nexus-sr predict``: a trained bundle on a subject's T1w + T2w LR scans, onto any output grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from nexus_monai.cli.common import add_grid_args, check_early, spacing_mm
from nexus_monai.cli.scans import add_scan_args, print_scan_report, scan_options
from nexus_monai.errors import NexusInputError, check_number

__all__ = ["add_parser", "cmd_predict"]


def cmd_predict(args) -> int:
    import torch

    from nexus_monai.engines.predict import load_bundle, output_names, predict_files
    from nexus_monai.engines.refine import check_refine_seconds

    refine = check_refine_seconds(args.refine, "--refine") if args.refine is not None else 0.0
    if args.datalist:  # a cohort (nexus_monai.engines.cohort), resumable, over torchrun ranks
        from nexus_monai.cli.cohort import cmd_predict_cohort

        return cmd_predict_cohort(args, refine)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.spacing or args.like):
        raise NexusInputError(None, "give a target grid: --spacing MM [MM MM] or --like IMAGE")
    for c, path in (("t1", args.t1), ("t2", args.t2)):
        if not path:
            raise NexusInputError(None, f"give --{c} (or a cohort with --datalist)")
        if not Path(path).exists():  # a NIfTI file or a DICOM series folder
            raise NexusInputError(path, f"{c} input scan not found")
    output_names(args.out_format, args.t1)  # --out-format dicom needs a t1 series: before the bundle loads
    check_early(args, "predict")
    network, inferer, _ = load_bundle(args.bundle, args.config or (), weights=args.weights, device=args.device)
    if args.chunk_size is not None:  # else the bundle inferer's (inference.yaml chunk_size; configs/gpu.yaml: larger)
        inferer.chunk_size = int(args.chunk_size)  # checked in check_early
    if args.max_memory_gib is not None:  # else the bundle inferer's budget (inference.yaml: auto, sized for the device)
        inferer.max_memory_gib = check_number("--max-memory-gib", args.max_memory_gib, 0, None, lo_open=True)
    inferer.progress = not args.quiet
    spacing = spacing_mm(args.spacing)
    result = predict_files(network, args.t1, args.t2, args.out, spacing_mm=spacing, like=args.like, inferer=inferer,
                           refine_seconds=refine, guard=args.guard, out_format=args.out_format,
                           scans=scan_options(args))
    print_scan_report(result, args.quiet)
    print(f"wrote {result['t1']} and {result['t2']}: grid {result['grid_shape']}, spacing {result['spacing_mm']} mm")
    for c, s in result.get("dicom", {}).items():  # a slice gap is reported, not yet modelled (docs/dicom.md)
        print(f"{c} DICOM series: {s['slices']} slices {s['slice_spacing_mm']:g} mm apart, thickness "
              f"{'n/a' if s['slice_thickness_mm'] is None else format(s['slice_thickness_mm'], 'g') + ' mm'}"
              + ("" if s["slice_gap_mm"] is None else f", gap {s['slice_gap_mm']:g} mm"))
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



def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` on the sub-command set ``sub``."""
    pr = sub.add_parser("predict",
                        help="super-resolve a subject's T1w + T2w LR scans with a trained bundle (Nexus-INR)")
    pr.add_argument("--bundle", default=None,
                    help="bundle folder (configs/inference.yaml, models/model.pt); default: the checkout's "
                         "bundles/nexus_inr")
    pr.add_argument("--config", action="append",
                    help="config overlay the checkpoint was trained with (e.g. configs/paper.yaml); repeatable")
    pr.add_argument("--weights", help="checkpoint path (default <bundle>/models/model.pt)")
    pr.add_argument("--t1", help="T1w LR scan: NIfTI file or DICOM series folder")
    pr.add_argument("--t2", help="T2w LR scan: NIfTI file or DICOM series folder")
    pr.add_argument("--datalist", metavar="JSON",
                    help="a cohort instead of --t1/--t2: decathlon datalist {\"testing\": [{\"t1\": ..., \"t2\": "
                         "...}, ...]} (optional \"name\", \"like\", \"mask\"); outputs in OUT/<name>/, resumable, "
                         "split over torchrun ranks, table OUT/cohort.csv (docs/cohort.md)")
    add_grid_args(pr, required=False)
    pr.add_argument("--out", required=True, help="output folder: t1w_sr.nii.gz, t2w_sr.nii.gz")
    pr.add_argument("--out-format", choices=("nifti", "dicom"), default="nifti",
                    help="dicom: each contrast as a derived DICOM series folder t1w_sr/, t2w_sr/ in the T1w series' "
                         "exam (needs --t1 as a series; docs/dicom.md)")
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
    add_scan_args(pr)
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)
