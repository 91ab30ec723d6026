"""The training budget of a cohort model, recorded beside its checkpoint.

Tables compare cohort methods trained for different budgets; a reader needs each row's budget
next to it. :class:`TrainingRunRecord` (an ignite handler listed in a bundle's ``train#handlers``)
writes ``<ckpt_dir>/training_run.json`` after every epoch and when training completes:

``steps`` (optimisation steps, ``engine.state.iteration``), ``epochs``, ``max_epochs``,
``batch_size`` (of the training loader, when it has one), ``seconds`` (wall-clock of the training
run, validation included, summed over sessions: a killed run resumed from its checkpoint adds
the new session's time to the recorded one, so epochs redone after a kill count twice),
``sessions``, ``finished`` (true once the run reached ``max_epochs``; false while it runs and after a stop
before that, e.g. by :class:`~nexus_monai.engines.budget.WallClockBudget`) and ``updated`` (UTC time of the
write). A run that starts from
scratch (iteration 0 after any resume) starts a new record. :func:`read_run_record` reads it back.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist
from ignite.engine import Engine, Events

from nexus_monai.data.io import write_text_atomic

__all__ = ["RUN_RECORD", "TrainingRunRecord", "read_run_record"]

RUN_RECORD = "training_run.json"


def read_run_record(folder: str | os.PathLike) -> dict | None:
    """The record in ``folder`` (the bundle's checkpoint folder), or None if absent or unreadable."""
    path = Path(folder) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class TrainingRunRecord:
    """Write the run's budget to ``<ckpt_dir>/training_run.json`` (rank 0 only).

    Args:
        ckpt_dir: the folder of the bundle's ``model.pt``.

    The session's clock starts when the trainer starts; whether the session continues a resumed
    run is decided at its first epoch, after any checkpoint handler has restored the trainer's
    state, so the handler's place in the list does not matter.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.ckpt_dir = Path(ckpt_dir)
        self._t0 = math.nan
        self._prior: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._resolve)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write, False)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _start(self, engine: Engine) -> None:
        self._t0, self._prior = time.perf_counter(), None

    def _resolve(self, engine: Engine) -> None:
        if self._prior is not None:
            return
        previous = read_run_record(self.ckpt_dir) if engine.state.iteration > 0 else None
        self._prior = {"seconds": float(previous.get("seconds", 0.0)), "sessions": int(previous.get("sessions", 0))} \
            if previous else {"seconds": 0.0, "sessions": 0}

    def record(self, engine: Engine, finished: bool) -> dict:
        """The record as of now (also what is written)."""
        if self._prior is None:
            self._resolve(engine)
        loader = getattr(engine, "data_loader", None)
        return {
            "steps": int(engine.state.iteration),
            "epochs": int(engine.state.epoch),
            "max_epochs": engine.state.max_epochs,
            "batch_size": getattr(loader, "batch_size", None),
            "seconds": round(self._prior["seconds"] + time.perf_counter() - self._t0, 3),
            "sessions": self._prior["sessions"] + 1,
            "finished": bool(finished),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _completed(self, engine: Engine) -> None:
        """ignite fires COMPLETED after ``terminate()`` too (a wall-clock budget, an early stop): the run is
        finished only when it reached its last epoch."""
        max_epochs = engine.state.max_epochs
        self._write(engine, max_epochs is not None and engine.state.epoch >= max_epochs)

    def _write(self, engine: Engine, finished: bool) -> None:
        if _rank() != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.ckpt_dir / RUN_RECORD, json.dumps(self.record(engine, finished), indent=2) + "\n")
