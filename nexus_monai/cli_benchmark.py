"""The arguments of ``nexus-sr benchmark`` (kept apart from :mod:`nexus_monai.cli` to keep that module short;
importing this loads neither torch nor MONAI, so ``nexus-sr --help`` stays fast)."""

from __future__ import annotations

import argparse

__all__ = ["add_benchmark_arguments"]


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
