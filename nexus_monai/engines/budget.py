"""A wall-clock budget for a bundle training that ends it cleanly, model selection still by validation.

:class:`WallClockBudget` is an ignite handler for a bundle's ``train#handlers`` (e.g. merged in by an
overlay ``{"+train#handlers": [{"_target_": "nexus_monai.engines.budget.WallClockBudget", "seconds": 600,
"validator": "@validate#evaluator", "ckpt_dir": "@ckpt_dir"}]}``, as ``python -m nexus_monai.ops.gpu_run``
does). After every epoch it predicts whether one more epoch and a final validation still fit in the
budget (from the slowest epoch and the last validation seen so far); if not, it validates the current
weights (unless the last validation already saw them) and terminates the trainer. The
best-validation ``model.pt`` of the bundle's checkpoint saver is therefore kept and includes the
last weights as a candidate: the budget never picks a model, the validation metric does.

It writes ``<ckpt_dir>/wall_clock_budget.json``: ``{"seconds" (the budget), "elapsed" (s at the
stop or at completion), "stopped" (true: ended by the budget), "epoch", "max_epochs",
"final_validation" (a validation was run at the stop), "validation_seconds" (the last one)}``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ignite.engine import Engine, Events
from monai.engines import Evaluator

from nexus_monai.data.io import write_text_atomic

__all__ = ["BUDGET_RECORD", "WallClockBudget"]

BUDGET_RECORD = "wall_clock_budget.json"


class WallClockBudget:
    """End training cleanly before ``seconds`` of wall clock (this session), validating the last weights.

    Args:
        seconds: the budget (> 0), counted from the trainer's start in this process.
        validator: the bundle's evaluator (``@validate#evaluator``); ``None``: stop without a final
            validation (then ``model.pt`` holds the best of the validations that ran).
        ckpt_dir: where ``wall_clock_budget.json`` is written (``None``: not written).
        margin: fraction of the budget kept free for the process's exit (saving, logging).
    """

    def __init__(self, seconds: float, validator: Engine | None = None, ckpt_dir: str | os.PathLike | None = None,
                 margin: float = 0.02):
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"WallClockBudget seconds must be a finite number > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.validator = validator
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.margin = float(margin)
        self._t0 = self._epoch_t0 = math.nan
        self._epoch_s = 0.0
        self._val_s = 0.0
        self._val_t0 = math.nan
        self._validated_iteration = -1
        self._trainer: Engine | None = None
        self.stopped = False

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)
        engine.add_event_handler(Events.COMPLETED, self._write)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._val_start)
            self.validator.add_event_handler(Events.COMPLETED, self._val_done)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _epoch_start(self, engine: Engine) -> None:
        self._epoch_t0 = time.perf_counter()

    def _val_start(self, _engine: Engine) -> None:
        self._val_t0 = time.perf_counter()

    def _val_done(self, _engine: Engine) -> None:
        self._val_s = time.perf_counter() - self._val_t0
        if self._trainer is not None:
            self._validated_iteration = self._trainer.state.iteration

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _check(self, engine: Engine) -> None:
        # the epoch's own time (a validation run at this epoch by ValidationHandler is not part of it)
        validated_now = self._validated_iteration == engine.state.iteration
        epoch_s = time.perf_counter() - self._epoch_t0 - (self._val_s if validated_now else 0.0)
        self._epoch_s = max(self._epoch_s, epoch_s)
        if engine.state.epoch >= (engine.state.max_epochs or 0):
            return  # the last epoch: training completes normally
        reserve = self._epoch_s + self._val_s + self.margin * self.seconds
        if self.elapsed() + reserve < self.seconds:
            return
        final = False
        if self.validator is not None and not validated_now:
            # the last weights become a candidate for model.pt (a MONAI Evaluator takes the trainer's epoch)
            self.validator.run(engine.state.epoch) if isinstance(self.validator, Evaluator) else self.validator.run()
            final = True
        self.stopped = True
        self._record(engine, final)
        engine.terminate()

    def _record(self, engine: Engine, final: bool) -> None:
        if self.ckpt_dir is None:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        record = {"seconds": self.seconds, "elapsed": round(self.elapsed(), 3), "stopped": self.stopped,
                  "epoch": int(engine.state.epoch), "max_epochs": engine.state.max_epochs,
                  "final_validation": final, "validation_seconds": round(self._val_s, 3),
                  "epoch_seconds": round(self._epoch_s, 3)}
        write_text_atomic(self.ckpt_dir / BUDGET_RECORD, json.dumps(record, indent=2) + "\n")

    def _write(self, engine: Engine) -> None:
        if not self.stopped:
            self._record(engine, False)
