"""``nexus-sr``: the command-line face of nexus_monai (also ``python -m nexus_monai``).

Sub-commands, one module each: ``synth`` (embedded dataset), ``degrade`` (HR scan -> simulated thick-slice
LR), ``upsample`` (interpolation baselines onto any grid), ``baseline`` (one thick-slice scan: LRTV, SMORE
per scan; SAINT, I3Net from their trained bundles) in :mod:`~nexus_monai.cli.volumes`; ``predict`` (a
trained bundle on a subject's two LR scans, any output grid); ``fit-subject`` (SSMCSR on one subject's two
LR scans); ``evaluate`` (Table 1 / Table 5 runner); ``benchmark`` (speed and memory of inference/training);
``serve`` (MONAI-Label-style REST service); ``experiment`` (the paper's Tables 2-5). What ``--help`` says
lives in :mod:`~nexus_monai.cli.help`. Errors in the user's input print one line
``error: <file>: <problem>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from nexus_monai import __version__
from nexus_monai.bundle_paths import default_bundle
from nexus_monai.cli import benchmark, evaluate, experiment, fit_subject, predict, serve, volumes
from nexus_monai.cli.help import HelpfulParser
from nexus_monai.errors import find_input_error

# Each command imports what it runs inside its function: every nexus_monai module below this package
# loads torch and MONAI (about 6 s on one CPU core), and `nexus-sr --help`, `--version` and
# argument errors answer in about 0.2 s without them. (No import cycle is being avoided.)

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``nexus-sr`` parser: every sub-command, in the order ``--help`` lists them."""
    p = HelpfulParser(prog="nexus-sr", description="Arbitrary-scale multi-contrast brain-MRI super-resolution (MONAI).",
                      epilog="example:\n  nexus-sr predict --help    (every command's --help ends with an example)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    volumes.add_parsers(sub)  # synth, degrade, upsample, baseline
    for module in (predict, evaluate, benchmark, serve, fit_subject, experiment):
        module.add_parser(sub)
    return p


def _default_bundle(args: argparse.Namespace) -> None:
    """No ``--bundle``: the source checkout's ``bundles/nexus_inr`` from any folder, or a one-line error with a hint."""
    if args.command in ("predict", "benchmark") and args.bundle is None:
        args.bundle = str(default_bundle("nexus_inr"))
    elif args.command == "serve" and not args.bundle:
        args.bundle = [str(default_bundle("nexus_inr"))]


def main(argv: list[str] | None = None) -> int:
    """Run ``nexus-sr`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2: bad input)."""
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
