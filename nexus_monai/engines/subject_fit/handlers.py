"""Event handlers of the subject-fit workflow: per-epoch losses, the wall-clock budget, MI early stopping.

MI early stopping (ours, stated precisely; the paper's criterion computed without any HR data):
after every ``mi_every`` epochs the mutual information (nats, 32-bin joint histogram,
:func:`~nexus_monai.metrics.mutual_information.mutual_information`) of the two PREDICTED contrasts
is computed on the fixed probe points of :func:`~nexus_monai.engines.subject_fit.sampler.mi_probe`.
Training stops at the first check ``j > mi_patience`` whose last ``mi_patience`` consecutive changes
are all below ``mi_tolerance`` nats: ``max_{i=j-p+1..j} |MI_i - MI_{i-1}| < tol`` (:class:`MIPlateau`);
the network of that check is the result. Single-contrast INRs run their full schedule.

Each handler writes its part of the fit log (a dict shared with the workflow): ``epochs``,
``mi_curve`` and ``stop_reason`` (``mi_plateau``, ``time_budget``; ``max_epochs`` otherwise).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from ignite.engine import Engine, Events

from nexus_monai.metrics.mutual_information import mutual_information

__all__ = ["MIPlateau", "EpochLosses", "TimeBudget", "MIEarlyStopping"]

LOSS_TERMS = ("loss_t1", "loss_t2")


class MIPlateau:
    """The MI plateau rule: ``update(mi)`` returns True at the first check ``j > patience`` whose
    last ``patience`` consecutive changes ``|MI_i - MI_{i-1}|`` are all below ``tolerance`` (nats)."""

    def __init__(self, patience: int = 3, tolerance: float = 0.002):
        if patience < 1:
            raise ValueError("mi_patience must be >= 1")
        self.patience, self.tolerance = int(patience), float(tolerance)
        self.history: list[float] = []

    def update(self, mi: float) -> bool:
        self.history.append(float(mi))
        if len(self.history) <= self.patience:
            return False
        recent = np.abs(np.diff(self.history[-(self.patience + 1):]))
        return bool(np.all(recent < self.tolerance))


class EpochLosses:
    """Mean per-contrast loss of every epoch into ``log["epochs"]`` (with elapsed seconds and learning rate).

    A batch without observations of a contrast (its loss term NaN) does not count for that contrast.
    """

    def __init__(self, log: dict, t_start: float):
        self.log, self.t_start = log, t_start
        self.sums: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.sums.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def accumulate(self, engine: Engine) -> None:
        for k in LOSS_TERMS:
            v = engine.state.output[k]
            if not math.isnan(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.sums[k + "_n"] = self.sums.get(k + "_n", 0) + 1

    def epoch_completed(self, engine: Engine) -> None:
        entry = {"epoch": engine.state.epoch, "seconds": round(time.perf_counter() - self.t_start, 2),
                 "lr": engine.state.output["lr"]}
        for k in LOSS_TERMS:
            entry[k] = self.sums.get(k, 0.0) / max(self.sums.get(k + "_n", 0), 1)
        self.log["epochs"].append(entry)


class TimeBudget:
    """Stops the run after the iteration at which ``max_seconds`` since ``t_start`` have passed."""

    def __init__(self, log: dict, t_start: float, max_seconds: float | None):
        self.log, self.t_start, self.max_seconds = log, t_start, max_seconds

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.max_seconds and time.perf_counter() - self.t_start >= self.max_seconds:
            self.log["stop_reason"] = "time_budget"
            engine.terminate()


class MIEarlyStopping:
    """Every ``every`` epochs: MI of the two predicted contrasts on ``probe`` into ``log["mi_curve"]``;
    with ``stop`` the run ends at the first plateau of :class:`MIPlateau` (``stop_reason = mi_plateau``)."""

    def __init__(self, network: torch.nn.Module, probe: torch.Tensor, log: dict, t_start: float, every: int = 1,
                 patience: int = 3, tolerance: float = 0.002, stop: bool = True, chunk_size: int = 32768):
        self.network, self.probe, self.log, self.t_start = network, probe, log, t_start
        self.every, self.stop, self.chunk_size = int(every), bool(stop), int(chunk_size)
        self.plateau = MIPlateau(patience, tolerance)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def record(self, engine: Engine) -> float:
        """MI of the network's two outputs on the probe now, appended to ``log["mi_curve"]``."""
        with torch.no_grad():
            self.network.eval()
            pred = torch.cat([self.network(chunk) for chunk in self.probe.split(self.chunk_size)]).cpu().numpy()
            self.network.train()
        mi = float("nan")
        if len(pred):
            mi = mutual_information(pred[:, 0].reshape(-1, 1, 1), pred[:, 1].reshape(-1, 1, 1), bins=32)
        self.log["mi_curve"].append({"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                                     "seconds": round(time.perf_counter() - self.t_start, 2), "mi": mi})
        return mi

    def recorded_now(self, engine: Engine) -> bool:
        """Whether the last MI entry is of the engine's current iteration."""
        return bool(self.log["mi_curve"]) and self.log["mi_curve"][-1]["iteration"] == engine.state.iteration

    def epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.every == 0:
            mi = self.record(engine)
            if self.plateau.update(mi) and self.stop:
                self.log["stop_reason"] = "mi_plateau"
                engine.terminate()
