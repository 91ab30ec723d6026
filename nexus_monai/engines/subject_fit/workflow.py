"""The subject-fit workflow: an ignite engine whose iteration is one Adam step on a batch of LR observations.

Loss (McGinnis et al., MICCAI 2023, eq. 1, as in the authors' code): batches of ``batch_size``
observations drawn from both scans shuffled together; ``alpha * MSE(T1w observations) + beta *
MSE(T2w observations)``, each the mean over that contrast's observations in the batch
(per-contrast masks: a T1w observation supervises only the T1w output). Adam, cosine learning-rate
decay to 0 over the run: the progress fraction is ``max(iteration / (epochs x iterations per epoch),
elapsed / max_seconds)``, so with a wall-clock budget the schedule anneals within the budget.

Warm-up (ours): with ``point_warmup = w`` the first fraction ``w`` of the run (progress as above)
renders every voxel with the point model, which costs one INR sample instead of 4-10; the
``profile`` model then refines.

:class:`SubjectFitter` builds the observations, the network, this workflow and its handlers
(:mod:`~nexus_monai.engines.subject_fit.handlers`) and runs it; the JSON log holds the settings,
the loss and MI curves, the stop epoch and reason (``mi_plateau``, ``max_epochs``, ``time_budget``)
and times.
"""

from __future__ import annotations

import math
import time
from typing import Mapping

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.data import MetaTensor

from nexus_monai.engines.subject_fit.handlers import EpochLosses, MIEarlyStopping, TimeBudget
from nexus_monai.engines.subject_fit.options import SubjectFitOptions
from nexus_monai.engines.subject_fit.result import SubjectFit
from nexus_monai.engines.subject_fit.sampler import ObservationBatches, intensity_scales, mi_probe, subject_observations
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, field_of_view, plain_tensor
from nexus_monai.keys import CONTRASTS
from nexus_monai.networks.ssmcsr import SSMCSRNet
from nexus_monai.transforms.observations import LRObservations

__all__ = ["SubjectFitWorkflow", "SubjectFitter", "check_subject_scans"]


class SubjectFitWorkflow(Engine):
    """``Engine`` over :class:`~nexus_monai.engines.subject_fit.sampler.ObservationBatches`: each
    iteration is one Adam step on the batch's observations of both contrasts.

    Args:
        network: the INR ``(n, 3) normalised positions -> (n, 2)`` (T1w, T2w).
        observations: ``{"t1": LRObservations, "t2": ...}``; batch index ``i < n_t1`` is T1w
            observation ``i``, else T2w observation ``i - n_t1``.
        options: the fit's settings (learning rate, warm-up, loss weights, budget).
        total_iterations: epochs x iterations per epoch (the schedule's length).
        t_start: ``time.perf_counter()`` at the start of the fit (the budget's origin).
    Output of an iteration: ``{"loss", "loss_t1", "loss_t2", "lr"}`` (a contrast without
    observations in the batch has a NaN term).
    """

    def __init__(self, network: torch.nn.Module, observations: Mapping[str, LRObservations], options: SubjectFitOptions,
                 total_iterations: int, t_start: float, device: torch.device | str = "cpu"):
        super().__init__(self._iteration)
        self.network, self.observations, self.options = network, dict(observations), options
        self.device = torch.device(device)
        self.optimizer = torch.optim.Adam(network.parameters(), lr=options.learning_rate)
        self.total_iterations, self.t_start = int(total_iterations), float(t_start)
        self.n_t1 = len(self.observations["t1"].targets)

    def progress_fraction(self) -> float:
        """Fraction of the run done: iterations or, with a budget, elapsed seconds, whichever is further."""
        p = (self.state.iteration - 1) / self.total_iterations
        if self.options.max_seconds:
            p = max(p, (time.perf_counter() - self.t_start) / self.options.max_seconds)
        return min(p, 1.0)

    def _iteration(self, engine: Engine, index: torch.Tensor) -> dict:
        o = self.options
        index = index.to(self.device)
        progress = self.progress_fraction()
        lr_now = 0.5 * o.learning_rate * (1.0 + math.cos(math.pi * progress))
        point = progress < o.point_warmup
        for group in self.optimizer.param_groups:
            group["lr"] = lr_now
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        terms = {}
        weights = o.loss_weights
        for ch, c in enumerate(CONTRASTS):
            sel = index[index < self.n_t1] if c == "t1" else index[index >= self.n_t1] - self.n_t1
            if sel.numel() == 0:
                terms[c] = float("nan")
                continue
            obs = self.observations[c]
            err = ((obs.render(self.network, sel, ch, point) - obs.targets[sel]) ** 2).mean()
            loss = loss + weights[c] * err
            terms[c] = float(err.detach())
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "loss_t1": terms["t1"], "loss_t2": terms["t2"], "lr": lr_now}


def _source(img, default: str) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj") or default)


def check_subject_scans(lr: Mapping[str, MetaTensor]) -> None:
    """Both LR scans present, single-channel 3D, finite, with overlapping fields of view (else one-line error)."""
    for c in CONTRASTS:
        img = lr.get(c)
        if img is None:
            raise NexusInputError(None, f"missing {c} LR scan")
        src = _source(img, f"{c} LR scan")
        if img.ndim != 4 or img.shape[0] != 1:
            raise NexusInputError(src, f"expected a single-channel (1, x, y, z) volume, got shape {tuple(img.shape)}")
        if not torch.isfinite(plain_tensor(img)).all():
            raise NexusInputError(src, "LR volume contains NaN or infinite values")
    boxes = [field_of_view(lr[c].shape[-3:], lr[c].affine) for c in CONTRASTS]
    lo = torch.maximum(boxes[0].min(0).values, boxes[1].min(0).values)
    hi = torch.minimum(boxes[0].max(0).values, boxes[1].max(0).values)
    if bool(torch.any(hi <= lo)):
        raise NexusInputError(_source(lr["t2"], "t2 LR scan"),
                              "its field of view does not overlap the t1 scan's (not registered?)")


class SubjectFitter:
    """Fits one SSMCSR INR to a subject's two LR scans (see :mod:`nexus_monai.engines.subject_fit`).

    Keyword settings: the fields of :class:`~nexus_monai.engines.subject_fit.options.SubjectFitOptions`
    (variant, forward model, network size, schedule, budget, MI early stopping, seed), plus
    ``device`` (torch device), ``chunk_size`` (points per decoding chunk) and ``progress`` (a bar).
    ``config`` holds the frozen options; ``options`` the same as a plain dict.
    """

    def __init__(self, device: str | torch.device = "cpu", chunk_size: int = 32768, progress: bool = False, **settings):
        self.config = SubjectFitOptions(**settings)
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.progress = progress

    @property
    def options(self) -> dict:
        """The settings as a dict (as written to the fit log)."""
        return self.config.as_dict()

    def fit(self, t1_lr: MetaTensor, t2_lr: MetaTensor) -> SubjectFit:
        """Fit the INR to ``t1_lr`` / ``t2_lr`` (``(1, x, y, z)`` MetaTensors, own affines)."""
        o = self.config
        lr = {"t1": t1_lr, "t2": t2_lr}
        check_subject_scans(lr)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        torch.manual_seed(o.seed)
        normalizer = WorldNormalizer.from_grids([(lr[c].shape[-3:], as_affine(lr[c].affine)) for c in CONTRASTS])
        scales = intensity_scales(lr)
        obs = subject_observations(lr, scales, normalizer, o, self.device)
        network = SSMCSRNet(o.variant, o.num_frequencies, o.sigma, o.hidden, o.trunk_layers, o.head_hidden,
                            seed=o.seed).to(self.device)
        batches = ObservationBatches(len(obs["t1"].targets) + len(obs["t2"].targets), o.batch_size, o.seed)
        probe = mi_probe(lr, normalizer, o.mi_points, o.seed).to(self.device)
        log = {"settings": o.as_dict(),
               "normalizer": {"centre_mm": normalizer.centre.tolist(), "scale_mm": normalizer.scale},
               "intensity_scales": scales,
               "observations": {c: {"voxels": len(obs[c].targets), "taps": obs[c].taps, "thick_axis": obs[c].thick_axis,
                                    "factor": obs[c].factor} for c in CONTRASTS},
               "iterations_per_epoch": len(batches), "epochs": [], "mi_curve": [], "stop_reason": "max_epochs"}
        workflow = SubjectFitWorkflow(network, obs, o, len(batches) * o.epochs, t_start, self.device)
        mi_stop = MIEarlyStopping(network, probe, log, t_start, o.mi_every, o.mi_patience, o.mi_tolerance,
                                  stop=o.mi_stopping, chunk_size=self.chunk_size)
        EpochLosses(log, t_start).attach(workflow)
        TimeBudget(log, t_start, o.max_seconds).attach(workflow)
        mi_stop.attach(workflow)
        if self.progress:
            ProgressBar(persist=False).attach(workflow, output_transform=lambda out: {"loss": out["loss"]})
        t_loop = time.perf_counter()
        workflow.run(batches, max_epochs=o.epochs)
        if log["stop_reason"] == "time_budget" and not mi_stop.recorded_now(workflow):
            mi_stop.record(workflow)
        state = workflow.state
        budget_stop = log["stop_reason"] == "time_budget"
        log["stop_epoch"] = round(state.iteration / len(batches), 3) if budget_stop else state.epoch
        log["iterations"] = state.iteration
        log["seconds_setup"] = round(t_loop - t_start, 3)
        log["seconds_fit"] = round(time.perf_counter() - t_start, 3)
        log["cpu_seconds_fit"] = round(time.process_time() - cpu_start, 3)  # all threads of this process
        log["threads"] = torch.get_num_threads()
        network.eval()
        return SubjectFit(network, normalizer, scales, {c: lr[c] for c in CONTRASTS}, log, self.chunk_size)

    def fit_predict(self, t1_lr: MetaTensor, t2_lr: MetaTensor, grid: TargetGrid) -> tuple[dict, dict]:
        """``(predictions on grid, log)``: fit, then render both contrasts on ``grid``."""
        fit = self.fit(t1_lr, t2_lr)
        return fit.predict(grid), fit.log
