"""Run the REST service with uvicorn on a socket we bind ourselves (``--port 0`` picks a free port).

The first line on stdout is ``serving on http://HOST:PORT`` once the socket is bound and the
models are loaded, so scripts and tests can read the port without a race.
"""

from __future__ import annotations

import socket
import sys

__all__ = ["bind_socket", "run_server"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (one process; inference parallelism is the app's worker threads)."""
    import uvicorn  # lazy: a serving-only dependency, loaded when a server starts

    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving on http://{shown}:{bound_port}", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        sys.stdout.flush()
