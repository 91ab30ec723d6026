"""``nexus-sr synth``, ``degrade``, ``upsample``, ``baseline``: the embedded dataset and one-scan operations
(simulate a thick-slice acquisition, interpolate onto a grid, a per-scan or trained baseline)."""

from __future__ import annotations

import argparse

from nexus_monai.cli.common import add_grid_args, grid_from_args
from nexus_monai.errors import NexusInputError, check_number

__all__ = ["add_parsers"]


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
    grid = grid_from_args(args, image)
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
    grid = grid_from_args(args, image)
    method = {"lrtv": lrtv, "smore": smore, "saint": saint, "i3net": i3net}[args.method]
    out = method(image, grid, source=args.image)
    save_volume(out, args.out)
    print(f"wrote {args.out}: shape {grid.shape}, spacing {[round(float(v), 4) for v in grid.spacing]} mm "
          f"({args.method})")
    return 0



def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``synth``, ``degrade``, ``upsample`` and ``baseline`` on the sub-command set ``sub``."""
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
    add_grid_args(u)
    u.add_argument("--out", required=True)
    u.set_defaults(func=cmd_upsample)

    b = sub.add_parser("baseline",
                       help="super-resolve one thick-slice LR scan: lrtv, smore (per scan), saint, i3net (trained "
                            "bundles)")
    b.add_argument("--method", choices=("lrtv", "smore", "saint", "i3net"), required=True)
    b.add_argument("--image", required=True)
    add_grid_args(b)
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_baseline)
