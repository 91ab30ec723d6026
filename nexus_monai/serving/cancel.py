"""Cancelling the inference of a client that went away, so its worker is free for the next request.

A worker thread cannot be stopped from outside, so cancellation is cooperative: the request's
job runs inside :func:`cancellable` with a ``threading.Event``; :func:`install_cancel_checks`
adds a forward pre-hook to every module of a served network that raises :class:`JobCancelled`
when the event of the job running on the CURRENT thread is set. Inference calls network modules
for every chunk of query points, so a cancelled job stops within one chunk. Jobs of other
threads (other clients) sharing the same network are not affected: the event is thread-local.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["JobCancelled", "cancellable", "check_cancelled", "install_cancel_checks"]

_local = threading.local()


class JobCancelled(Exception):
    """The client of this job disconnected; the job stopped early."""


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Run the block as a job that :func:`check_cancelled` stops once ``event`` is set."""
    previous = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = previous


def check_cancelled(*_args) -> None:
    """Raise :class:`JobCancelled` if the job on this thread was cancelled (else nothing)."""
    event = getattr(_local, "event", None)
    if event is not None and event.is_set():
        raise JobCancelled("the client disconnected; inference stopped")


def install_cancel_checks(network: torch.nn.Module) -> None:
    """Check for cancellation before every module call of ``network`` (cheap: one attribute lookup)."""
    for module in network.modules():
        module.register_forward_pre_hook(lambda _m, _args: check_cancelled())
