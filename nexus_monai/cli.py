"""``nexus-sr``: the command-line face of nexus_monai (also ``python -m nexus_monai``).

Sub-commands: ``synth`` (embedded dataset), ``degrade`` (HR scan -> simulated thick-slice LR),
``upsample`` (interpolation baselines onto any grid), ``baseline`` (per-subject classical SR:
LRTV), ``evaluate`` (Table 1 / Table 5 runner). Errors in
the user's input print one line ``error: <file>: <problem>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nexus_monai.errors import NexusInputError, find_input_error

__all__ = ["main", "build_parser"]


def _grid_from_args(args, image):
    from nexus_monai.data.io import load_volume
    from nexus_monai.geometry import TargetGrid

    if args.like:
        return TargetGrid.like(load_volume(args.like))
    if args.spacing:
        sp = args.spacing if len(args.spacing) == 3 else args.spacing * 3
        if len(args.spacing) not in (1, 3):
            raise NexusInputError(None, "--spacing takes one value (isotropic) or three (mm)")
        try:
            return TargetGrid.from_spacing(image.shape[1:], image.affine, sp)
        except ValueError as err:
            raise NexusInputError(None, f"--spacing: {err}") from err
    raise NexusInputError(None, "give a target grid: --spacing MM [MM MM] or --like IMAGE")


def cmd_synth(args) -> int:
    from nexus_monai.data.synth import generate_dataset

    path = generate_dataset(args.out, subjects=args.subjects, seed=args.seed, size=args.size)
    print(f"wrote {args.subjects} simulated subjects and {path}")
    return 0


def cmd_degrade(args) -> int:
    from nexus_monai.data.io import load_volume, save_volume
    from nexus_monai.transforms.acquisition import AcquisitionRicianNoise, SimulateAnisotropicAcquisition, num_thick_slices
    from nexus_monai.geometry import parse_axis

    image = load_volume(args.image)
    try:
        axis = parse_axis(args.axis)
    except ValueError as err:
        raise NexusInputError(None, f"--axis: {err}") from err
    if not args.factor >= 1:
        raise NexusInputError(None, f"--factor must be >= 1, got {args.factor}")
    if num_thick_slices(image.shape[axis + 1], args.factor) < 1:
        raise NexusInputError(args.image, f"axis {args.axis} has {image.shape[axis + 1]} voxels, fewer than one slab of factor {args.factor}")
    lr = SimulateAnisotropicAcquisition(axis, args.factor, args.profile)(image)
    lr = AcquisitionRicianNoise(args.noise).set_random_state(args.seed)(lr)
    save_volume(lr, args.out)
    sp = [round(float(v), 4) for v in lr.affine[:3, :3].norm(dim=0)]
    print(f"wrote {args.out}: shape {tuple(lr.shape[1:])}, spacing {sp} mm")
    return 0


def cmd_upsample(args) -> int:
    from nexus_monai.baselines.interpolation import upsample
    from nexus_monai.data.io import load_volume, save_volume

    image = load_volume(args.image)
    grid = _grid_from_args(args, image)
    out = upsample(image, grid, args.method)
    save_volume(out, args.out)
    print(f"wrote {args.out}: shape {grid.shape}, spacing {[round(float(v), 4) for v in grid.spacing]} mm ({args.method})")
    return 0


def cmd_baseline(args) -> int:
    from nexus_monai.baselines.lrtv import lrtv
    from nexus_monai.data.io import load_volume, save_volume

    image = load_volume(args.image)
    grid = _grid_from_args(args, image)
    methods = {"lrtv": lrtv}
    out = methods[args.method](image, grid)
    save_volume(out, args.out)
    print(f"wrote {args.out}: shape {grid.shape}, spacing {[round(float(v), 4) for v in grid.spacing]} mm ({args.method})")
    return 0


def cmd_evaluate(args) -> int:
    from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
    from nexus_monai.transforms.protocols import load_protocol

    protocol = load_protocol(args.protocol)
    subjects = select_subjects(args.data, args.split, seed=args.seed, max_subjects=args.max_subjects)
    from nexus_monai.evaluation.downstream import load_segmenters

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    segmenters = load_segmenters([s.strip() for s in (args.downstream or "").split(",") if s.strip()])
    evaluate_methods(subjects, methods, protocol, args.out, lpips=not args.no_lpips, progress=not args.quiet, segmenters=segmenters)
    print((Path(args.out) / "table1.md").read_text())
    if segmenters:
        print((Path(args.out) / "table5.md").read_text())
    return 0


def _add_grid_args(parser: argparse.ArgumentParser) -> None:
    """The target-grid options shared by every command that writes onto a chosen grid."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--spacing", type=float, nargs="+", help="target voxel size in mm (1 or 3 values), same field of view")
    g.add_argument("--like", help="output on the grid of this NIfTI (any affine, oblique included)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-sr", description="Arbitrary-scale multi-contrast brain-MRI super-resolution (MONAI).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the embedded simulated BraTS-format dataset (MNI152 anatomy)")
    s.add_argument("--out", required=True)
    s.add_argument("--subjects", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=("small", "full"), default="small", help="small: 2 mm voxels; full: 240x240x155 at 1 mm")
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

    b = sub.add_parser("baseline", help="per-subject classical super-resolution of one LR scan (lrtv)")
    b.add_argument("--method", choices=("lrtv",), required=True)
    b.add_argument("--image", required=True)
    _add_grid_args(b)
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_baseline)

    e = sub.add_parser("evaluate", help="Table 1: simulate LR inputs, run methods, write per-subject and summary tables")
    e.add_argument("--data", required=True, help="dataset folder (with dataset.json), a datalist JSON, or a BraTS root")
    e.add_argument("--methods", default="trilinear,cubic")
    e.add_argument("--protocol", default="nexus", help="nexus, ssmcsr or a protocol YAML path")
    e.add_argument("--split", default="test")
    e.add_argument("--seed", type=int, default=0, help="split seed when --data is a BraTS root without datalist")
    e.add_argument("--max-subjects", type=int, default=None)
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as n/a)")
    e.add_argument("--downstream", default="", help="segmenter bundles for Table 5, e.g. seg_unet,seg_transunet (trained weights in bundles/<name>/models)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        found = find_input_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
