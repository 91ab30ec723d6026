"""What several ``nexus-sr`` commands share: the target-grid options and their checks, ``METHOD=PATH`` pairs.

Importing this loads neither torch nor MONAI (each function imports what it runs).
"""

from __future__ import annotations

import argparse

from nexus_monai.errors import NexusInputError, check_number

__all__ = ["MAX_GRID_VOXELS", "add_grid_args", "check_early", "grid_from_args", "method_options", "spacing_mm"]

MAX_GRID_VOXELS = 1.5e8  # upsample / baseline output grids (float64 temporaries: ~36 bytes per voxel)


def add_grid_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The target-grid options shared by every command that writes onto a chosen grid (``required=False``:
    the command checks that one is given where it needs one)."""
    g = parser.add_mutually_exclusive_group(required=required)
    g.add_argument("--spacing", type=float, nargs="+",
                   help="target voxel size in mm (1 or 3 values), same field of view")
    g.add_argument("--like", help="output on the grid of this NIfTI (any affine, oblique included)")


def grid_from_args(args, image):
    """The output grid of ``upsample`` / ``baseline`` from ``--like`` or ``--spacing`` (checked reachable)."""
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


def check_early(args, command: str) -> None:
    """predict / fit-subject: output folder, numbers and the target grid checked before anything loads."""
    from nexus_monai.data.staging import check_output_dir
    from nexus_monai.engines.consistency import CONSISTENCY_NAMES
    from nexus_monai.engines.predict import DICOM_NAMES, MAX_SPACING_MM, OUTPUT_NAMES, target_grid

    owned = list(OUTPUT_NAMES.values()) + (["fit_log.json"] if command == "fit-subject" else []) + ["registration.json"]
    if command == "predict":
        owned += list(CONSISTENCY_NAMES.values()) + list(DICOM_NAMES.values())
    check_output_dir(args.out, owned)
    check_number("--threads", args.threads, 0, None, integer=True)
    if getattr(args, "chunk_size", None) is not None:
        check_number("--chunk-size", args.chunk_size, 1, None, integer=True)
    if args.spacing:
        for v in args.spacing:
            check_number("--spacing", v, 0, MAX_SPACING_MM, lo_open=True)
    if args.like:
        target_grid(None, like=args.like)  # a reference grid that cannot be read or used: before any work
    if getattr(args, "mask", None):
        from nexus_monai.data.io import check_nifti_file

        check_nifti_file(args.mask)  # readable, 3D, complete; its grid is checked against the T1w once that is read


def method_options(pairs, what: str) -> dict:
    """``["cycleinr=PATH", ...]`` -> ``{"cycleinr": {what: "PATH"}}`` (one-line error on a malformed pair)."""
    out: dict = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise NexusInputError(None, f"--{what} takes METHOD=PATH, got {pair!r}")
        out.setdefault(name.strip(), {})[what] = value.strip()
    return out


def spacing_mm(spacing: list[float] | None) -> list[float] | None:
    """``--spacing`` as three values in mm (one value: isotropic), None when not given."""
    if not spacing:
        return None
    if len(spacing) not in (1, 3):
        raise NexusInputError(None, "--spacing takes one value (isotropic) or three (mm)")
    return spacing * 3 if len(spacing) == 1 else spacing
