"""``nexus-sr benchmark``: speed and memory of Nexus-INR whole-volume inference vs trilinear, and training steps/s
(importing this loads neither torch nor MONAI, so ``nexus-sr --help`` stays fast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_benchmark_arguments", "add_parser", "cmd_benchmark"]


def add_benchmark_arguments(bm: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to its sub-parser ``bm``."""
    bm.add_argument("--bundle", default=None,
                    help="bundle folder (network_def, loss, training setting of configs/train.yaml); default: the "
                         "checkout's bundles/nexus_inr")
    bm.add_argument("--config", action="append",
                    help="config overlay over train.yaml (e.g. bundles/nexus_inr/configs/paper.yaml); repeatable")
    bm.add_argument("--weights",
                    help="checkpoint (default <bundle>/models/model.pt if present, else random weights: same cost)")
    bm.add_argument("--random-weights", action="store_true",
                    help="ignore any checkpoint: seeded random weights (same cost)")
    bm.add_argument("--chunk-size", type=int, default=32768, help="query points decoded at once")
    bm.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    bm.add_argument("--train-steps", type=int, default=20, help="timed training steps (after 2 warm-up steps)")
    bm.add_argument("--skip-train", action="store_true", help="skip the training measurement")
    bm.add_argument("--max-memory-gib", type=float, default=None,
                    help="target peak RSS of the inference in GiB (on CUDA: device memory); sets the encoder tiles "
                         "(default: auto, as predict)")
    bm.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the network runs")
    bm.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast of the network's parts in inference and training (default: on for cuda, off "
                         "for cpu)")
    bm.add_argument("--skip-before", action="store_true",
                    help="skip the untiled 'before' inference (the same-run comparison)")
    bm.add_argument("--repeats", type=int, default=1,
                    help="after/before inference pairs, alternating (the fastest of each counts)")
    bm.add_argument("--fit", action="store_true",
                    help="also time SSMCSR fit-subject epochs on the 2 mm embedded subject")
    bm.add_argument("--fit-author-seconds", type=float, default=120.0,
                    help="with --fit: seconds of fitting at the authors' network size (epoch time extrapolated)")
    bm.add_argument("--json", help="also write every number to this JSON file")
    bm.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    # tests: a tiny volume
    bm.add_argument("--size", type=int, nargs=3, default=[240, 240, 160], metavar=("X", "Y", "Z"),
                    help=argparse.SUPPRESS)


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``benchmark`` on the sub-command set ``sub``."""
    bm = sub.add_parser("benchmark",
                        help="time one 240x240x160 volume (Nexus-INR vs trilinear, memory, matmul bound) and training "
                             "steps/s")
    add_benchmark_arguments(bm)
    bm.set_defaults(func=cmd_benchmark)
