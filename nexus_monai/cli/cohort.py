"""``nexus-sr predict --datalist cohort.json --out DIR``: a whole cohort, resumable, over torchrun ranks.

The work is :func:`nexus_monai.engines.cohort.predict_cohort`; this module reads the options, picks
this rank's device and prints one summary line per rank (on stderr with the rank, on stdout for
rank 0's merged table).
"""

from __future__ import annotations

import sys

from nexus_monai.cli.common import spacing_mm
from nexus_monai.cli.scans import scan_options
from nexus_monai.errors import NexusInputError, check_number

__all__ = ["cmd_predict_cohort"]


def cmd_predict_cohort(args, refine_seconds: float = 0.0) -> int:
    """Run the cohort of ``args.datalist``; exit 0 whatever individual subjects did (see ``cohort.csv``)."""
    import torch

    from nexus_monai.data.staging import check_output_dir
    from nexus_monai.engines.cohort import predict_cohort, rank_and_world, rank_device, read_cohort
    from nexus_monai.engines.predict import MAX_SPACING_MM, load_bundle, target_grid

    if args.t1 or args.t2:
        raise NexusInputError(None, "give either --datalist or --t1 and --t2, not both")
    rank, world, local_rank = rank_and_world()
    subjects = read_cohort(args.datalist)
    if not (args.spacing or args.like) and any(s.like is None for s in subjects):
        raise NexusInputError(None, "give --spacing or --like for the cohort (or a \"like\" in every entry)")
    check_output_dir(args.out, None, what="cohort output folder")
    check_number("--threads", args.threads, 0, None, integer=True)
    if args.chunk_size is not None:
        check_number("--chunk-size", args.chunk_size, 1, None, integer=True)
    for v in args.spacing or ():
        check_number("--spacing", v, 0, MAX_SPACING_MM, lo_open=True)
    if args.like:
        target_grid(None, like=args.like)
    if args.mask:
        from nexus_monai.data.io import check_nifti_file

        check_nifti_file(args.mask)  # readable and complete; its grid is checked against each T1w
    if args.threads:
        torch.set_num_threads(args.threads)
    device = rank_device(args.device, local_rank)
    network, inferer, _ = load_bundle(args.bundle, args.config or (), weights=args.weights, device=device)
    if args.chunk_size is not None:
        inferer.chunk_size = int(args.chunk_size)
    if args.max_memory_gib is not None:
        inferer.max_memory_gib = check_number("--max-memory-gib", args.max_memory_gib, 0, None, lo_open=True)
    inferer.progress = False  # one bar over subjects instead of one per volume
    summary = predict_cohort(network, inferer, subjects, args.out, spacing_mm=spacing_mm(args.spacing),
                             like=args.like, out_format=args.out_format, guard=args.guard,
                             refine_seconds=refine_seconds, scans=scan_options(args), rank=rank, world=world,
                             device=device,
                             progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr))
    print(f"cohort rank {rank}/{world} ({device}): {summary['assigned']} subjects, {summary['done']} predicted, "
          f"{summary['skipped']} already done, {summary['errors']} failed; table {summary['table']}"
          + (f"; merged {summary['merged']}" if summary["merged"] else ""))
    return 0
