"""The Table 1 evaluator: an ignite ``Engine`` (MONAI's evaluator shape) whose iteration is one subject.

:class:`MethodEvaluator` runs over a list of datalist entries. Each iteration simulates the protocol's
LR scans of one subject (:func:`~nexus_monai.transforms.protocols.prepare_subject`), runs every method
on them onto the subject's HR grid and times it, and returns a :class:`SubjectOutput`; what is made of
the outputs is left to handlers attached to the engine (:mod:`nexus_monai.evaluation.handlers`: metric
rows, Table 5 segmentation rows, panels, CSV/Markdown tables and their manifest, MLflow), as MONAI's
evaluators leave metrics and savers to theirs.

Collected on ``engine.state`` (reset when a run starts): ``rows`` (per-subject, per-method dicts:
``subject``, ``method``, metric columns, ``seconds``, ``error``), ``seg_rows`` (Table 5 rows),
``panels`` (written panel paths), ``input_errors`` (``(subject id, NexusInputError)`` of inputs that
failed: the run still ends with exit 2 after writing the other rows), ``files`` (table files written)
and ``table`` (the Table 1 summary frame).

A subject whose inputs cannot be prepared gets one error row per method and no other output; a
method that fails (an exception, or an output on another grid than the requested one) is recorded
with its error and the evaluation goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from tqdm import tqdm

from nexus_monai.errors import NexusInputError, find_input_error
from nexus_monai.geometry import TargetGrid
from nexus_monai.keys import CONTRASTS
from nexus_monai.transforms.protocols import Protocol, prepare_subject

__all__ = ["MethodEvaluator", "MethodResult", "SubjectOutput"]


@dataclass
class MethodResult:
    """One method on one subject: ``pred`` (``{"t1", "t2"}`` MetaTensors ``(1, X, Y, Z)`` on the subject's HR
    grid) and ``seconds`` (wall-clock of the method call, fitting included), or the ``error`` it raised."""

    pred: dict | None = None
    seconds: float = float("nan")
    error: BaseException | None = None


@dataclass
class SubjectOutput:
    """What one iteration hands to the handlers. ``data`` is None when the subject's inputs failed."""

    subject: dict
    sid: str
    data: dict | None = None
    grid: TargetGrid | None = None
    gt: dict = field(default_factory=dict)  # contrast -> HR ground truth (X, Y, Z), plain tensor
    results: dict = field(default_factory=dict)  # method -> MethodResult, in method order
    ok: dict = field(default_factory=dict)  # method -> {"t1", "t2"} scored outputs (set by the score handler)


class MethodEvaluator(Engine):
    """Every method on every subject under one protocol.

    ``methods``: method name -> callable ``(data, grid, **options) -> {"t1", "t2"}`` (see
    :mod:`nexus_monai.evaluation.methods`); ``method_options``: keyword options per method;
    ``required``: datalist keys every prepared subject must have (``("seg",)`` for Table 5: a missing one
    stops the run before its methods run); ``progress``: a tqdm bar over subject x method runs.
    Run with ``evaluator.run(subjects)``.
    """

    def __init__(self, methods: Mapping[str, Callable], protocol: Protocol,
                 method_options: Mapping[str, Mapping] | None = None, required: Sequence[str] = (),
                 progress: bool = True):
        super().__init__(self._iteration)
        # the caller reports a failed run (one line for bad input): no second copy from ignite's error log
        self.logger.setLevel(logging.CRITICAL)
        self.methods = dict(methods)
        self.protocol = protocol
        self.method_options = {k: dict(v) for k, v in (method_options or {}).items()}
        self.required = tuple(required)
        self.progress = progress
        self._bar = None
        self.add_event_handler(Events.STARTED, self._started)
        self.add_event_handler(Events.COMPLETED, self._close_bar)
        self.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _started(self, engine: Engine) -> None:
        for name in ("rows", "seg_rows", "panels", "input_errors", "files"):
            setattr(engine.state, name, [])
        engine.state.table = None
        total = engine.state.epoch_length * len(self.methods)
        self._bar = tqdm(total=total, desc="evaluate", disable=not self.progress, unit="run")

    def _close_bar(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()

    def _failed(self, engine: Engine, err: BaseException) -> None:
        self._close_bar(engine)
        raise err

    def _iteration(self, engine: Engine, subject: dict) -> SubjectOutput:
        sid = subject.get("subject", "?")
        out = SubjectOutput(subject=subject, sid=sid)
        try:
            data = prepare_subject(subject, self.protocol)
        except Exception as err:  # an input that still fails: mark the subject failed, keep the others' rows
            found = find_input_error(err) or NexusInputError(subject.get("t1"), f"{type(err).__name__}: {err}")
            engine.state.input_errors.append((sid, found))
            engine.state.rows.extend({"subject": sid, "method": m, "error": f"input: {found}"} for m in self.methods)
            self._bar.update(len(self.methods))
            return out
        for key in self.required:
            if key not in data:
                raise NexusInputError(subject.get("t1"), "Table 5 needs a segmentation (seg) for every test subject")
        out.data, out.grid = data, TargetGrid.like(data["t1"])
        out.gt = {c: data[c][0].as_subclass(torch.Tensor) for c in CONTRASTS}
        for m, fn in self.methods.items():
            self._bar.set_postfix_str(f"{subject['subject']} {m}")
            t0 = time.perf_counter()
            try:
                pred = fn(data, out.grid, **self.method_options.get(m, {}))
                seconds = time.perf_counter() - t0
                for c in CONTRASTS:
                    if tuple(pred[c].shape[-3:]) != out.grid.shape or not torch.allclose(
                            pred[c].affine.double(), out.grid.affine, atol=1e-4):
                        raise RuntimeError(f"{m} returned {c} on a grid other than the requested one")
                out.results[m] = MethodResult(pred=pred, seconds=seconds)
            except Exception as err:  # reported in the table, not dropped
                out.results[m] = MethodResult(error=err)
            self._bar.update(1)
        return out
