"""Back-pressure for the REST service: a request-body size limit and a bounded inference queue.

* :class:`BodySizeLimit` (pure ASGI middleware): a body larger than ``max_bytes`` gets a 413
  JSON answer, whether the client declared it (``Content-Length``) or streams it (chunked); the
  bytes are counted as they arrive, so an oversized upload is never spooled to disk.
* :class:`InferenceQueue`: inference runs on ``workers`` threads off the event loop; at most
  ``max_pending`` requests wait or run at once, the next one gets 503 at once (no unbounded
  backlog of uploads in memory).
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from nexus_monai.serving.params import ServingError

__all__ = ["BodySizeLimit", "BodyTooLarge", "InferenceQueue"]

_DRAIN_CAP_BYTES = 64 << 20  # read (and drop) at most this much of a refused body so the client sees the 413


class BodyTooLarge(Exception):
    """Raised inside ``receive`` once the body passed the limit (the middleware turns it into 413)."""


def _json_message(status: int, detail: str) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail, "status": status, "source": "request", "problem": detail}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """ASGI middleware refusing request bodies above ``max_bytes`` with ``413 {"detail": ...}``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    def _detail(self) -> str:
        return f"upload too large: the request body exceeds the limit of {self.max_bytes / 2**20:.3g} MiB"

    async def _refuse(self, receive, send, already: int = 0) -> None:
        drained = already
        more = True
        while more and drained < _DRAIN_CAP_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        start, body = _json_message(413, self._detail())
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(receive, send)
            return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["too_large"] = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["too_large"] and not state["started"]:
                return  # whatever the app made of the interrupted body, the answer is 413
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["too_large"]:
                raise
        if state["too_large"] and not state["started"]:
            await self._refuse(receive, send, state["received"])


class InferenceQueue:
    """A bounded queue in front of ``workers`` inference threads.

    ``await queue.run(fn, *args)`` runs ``fn`` on a worker thread; when ``max_pending`` calls are
    already waiting or running it raises :class:`ServingError` 503 instead of queueing.
    """

    def __init__(self, workers: int = 1, max_pending: int = 16):
        if workers < 1 or max_pending < workers:
            raise ValueError(f"need workers >= 1 and max_pending >= workers, got {workers}, {max_pending}")
        self.workers = int(workers)
        self.max_pending = int(max_pending)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nexus-infer")
        self._lock = threading.Lock()
        self.pending = 0
        self.completed = 0
        self.rejected = 0
        self.cancelled = 0

    def _release(self, _future) -> None:
        with self._lock:
            self.pending -= 1
            self.completed += 1

    def submit(self, fn: Callable, *args):
        """The ``concurrent.futures.Future`` of ``fn(*args)``; 503 when the queue is full."""
        with self._lock:
            if self.pending >= self.max_pending:
                self.rejected += 1
                raise ServingError(503,
                                   f"server busy: {self.pending} requests queued or running (limit "
                                   f"{self.max_pending}); retry later", "queue")
            self.pending += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            with self._lock:
                self.pending -= 1
            raise
        future.add_done_callback(self._release)  # the slot is freed when the work ends, even if the client left
        return future

    def note_cancelled(self) -> None:
        """Count a job abandoned because its client disconnected."""
        with self._lock:
            self.cancelled += 1

    async def run(self, fn: Callable, *args):
        return await asyncio.wrap_future(self.submit(fn, *args))

    def stats(self) -> dict:
        with self._lock:
            return {"workers": self.workers, "max_pending": self.max_pending, "pending": self.pending,
                    "completed": self.completed, "rejected": self.rejected, "cancelled": self.cancelled}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
