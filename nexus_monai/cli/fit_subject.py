"""``nexus-sr fit-subject``: SSMCSR, a subject-specific INR fitted on one subject's two LR scans."""

from __future__ import annotations

import argparse

from nexus_monai.cli.common import add_grid_args, check_early, spacing_mm
from nexus_monai.cli.scans import add_scan_args, print_scan_report, scan_options
from nexus_monai.errors import check_number

__all__ = ["add_parser", "cmd_fit_subject"]


def cmd_fit_subject(args) -> int:
    """SSMCSR: fit a subject-specific INR on one subject's T1w + T2w LR scans, write both SR volumes + a JSON log."""
    import torch

    from nexus_monai.engines.subject_fit import SubjectFitter, fit_files

    check_early(args, "fit-subject")
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
    spacing = spacing_mm(args.spacing)
    result = fit_files(fitter, args.t1, args.t2, args.out, spacing_mm=spacing, like=args.like, scans=scan_options(args))
    print_scan_report(result, args.quiet)
    log = result["log"]
    print(f"wrote {result['t1']}, {result['t2']} and {result['log_path']}: grid {result['grid_shape']}, "
          f"{log['iterations']} iterations, "
          f"stop: {log['stop_reason']} (epoch {log['stop_epoch']}), fit {log['seconds_fit']:.1f} s, predict "
          f"{log['seconds_predict']:.1f} s")
    return 0



def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fit-subject`` on the sub-command set ``sub``."""
    fs = sub.add_parser("fit-subject",
                        help="SSMCSR: fit a subject-specific INR on a subject's T1w + T2w LR scans (no HR data), write "
                             "both SR volumes")
    fs.add_argument("--t1", required=True, help="T1w LR scan: NIfTI file or DICOM series folder")
    fs.add_argument("--t2", required=True,
                    help="T2w LR scan: NIfTI file or DICOM series folder (registered to the T1w unless --no-register)")
    fs.add_argument("--variant", choices=("split_head", "vanilla", "single"), default="split_head")
    fs.add_argument("--forward-model", choices=("profile", "point"), default="profile",
                    help="profile (ours): LR voxel = slice-profile-weighted INR samples along the thick axis; point "
                         "(paper): INR at the voxel centre")
    fs.add_argument("--profile", choices=("gaussian", "boxcar", "none"), default="gaussian",
                    help="slice profile of the acquisition (profile model)")
    add_grid_args(fs)
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
    add_scan_args(fs)
    fs.add_argument("--quiet", action="store_true")
    fs.set_defaults(func=cmd_fit_subject)
