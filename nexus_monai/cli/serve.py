"""``nexus-sr serve``: trained bundles as a MONAI-Label-style REST service (see :mod:`nexus_monai.serving`)."""

from __future__ import annotations

import argparse
import logging

from nexus_monai.errors import NexusInputError, check_number

__all__ = ["add_parser", "cmd_serve"]


def cmd_serve(args) -> int:
    """MONAI-Label-style REST service (``GET /info/``, ``POST /infer/{model}``); see :mod:`nexus_monai.serving`."""
    import torch

    from nexus_monai.serving.app import create_app  # fastapi and uvicorn only for serve
    from nexus_monai.serving.models import load_models
    from nexus_monai.serving.server import run_server

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers < 1 or args.max_queue < args.workers or args.max_upload_mb <= 0:
        raise NexusInputError(None, "--workers must be >= 1, --max-queue >= --workers and --max-upload-mb > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = load_models(args.bundle or ["bundles/nexus_inr"], args.config, args.weights, device=args.device,
                         chunk_size=args.chunk_size, max_output_voxels=args.max_output_voxels,
                         max_memory_gib=None if args.max_memory_gib is None else check_number("--max-memory-gib",
                                                                                              args.max_memory_gib,
                                                                                               0, None, lo_open=True))
    app = create_app(models, max_upload_bytes=int(args.max_upload_mb * 2**20), workers=args.workers,
                     max_queue=args.max_queue,
                     workdir=args.workdir)
    print(f"models: {', '.join(f'{n} ({m.version}, {m.device})' for n, m in models.items())}", flush=True)
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0



def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the sub-command set ``sub``."""
    sv = sub.add_parser("serve",
                        help="MONAI-Label-style REST service: GET /info/, POST /infer/{model} with NIfTI uploads")
    sv.add_argument("--bundle", action="append",
                    help="bundle folder to serve, named by its folder (default: the checkout's bundles/nexus_inr); "
                         "repeatable")
    sv.add_argument("--config", action="append",
                    help="config overlay the checkpoint was trained with; [MODEL=]PATH, repeatable")
    sv.add_argument("--weights", action="append", help="checkpoint; [MODEL=]PATH (default <bundle>/models/model.pt)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed on the first line)")
    sv.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: the bundle's device)")
    sv.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    sv.add_argument("--workers", type=int, default=1, help="inference threads (requests run at once)")
    sv.add_argument("--max-queue", type=int, default=16, help="requests waiting or running before 503 busy")
    sv.add_argument("--max-upload-mb", type=float, default=512.0, help="largest request body in MiB (413 above)")
    sv.add_argument("--max-output-voxels", type=float, default=1.5e8,
                    help="largest volume in voxels: target grid (422 above) and uploads by their header (413 above)")
    sv.add_argument("--chunk-size", type=int, default=32768, help="query points decoded at once (bounds peak memory)")
    sv.add_argument("--max-memory-gib", type=float, default=None,
                    help="target peak RSS of an inference in GiB (encoder tiles, as for predict; default 1.75)")
    sv.add_argument("--workdir", default=None,
                    help="parent of the per-request temporary folders (default: system temp)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(func=cmd_serve)
