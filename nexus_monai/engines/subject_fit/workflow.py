"""Per-subject fitting of the SSMCSR INR (McGinnis et al., MICCAI 2023) on one subject's two LR scans, no HR anywhere.

Data. Every LR voxel of each scan inside that scan's signal mask (non-zero voxels dilated by
``mask_dilation`` LR voxels, so the zero edge around the brain is fitted too) is one observation:
its world position (mm, from the scan's own affine), its intensity divided by the scan's 99.5th
percentile of non-zero voxels (about ``[0, 1]``; outputs are multiplied back) and the contrast it
belongs to. Coordinates go through ONE :class:`~nexus_monai.geometry.WorldNormalizer` built from
both LR grids (never each grid by its own min/max).

Forward models (how the INR ``f`` renders one LR voxel; ``forward_model``):

* ``"point"`` (the paper and its code): ``f`` at the LR voxel centre.
* ``"profile"`` (OURS, beyond the paper): the slice-profile-weighted average of ``f`` at the HR
  sample positions of the voxel's slab, with the weights of the acquisition operator itself
  (:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix` on the HR grid whose thick-slice
  acquisition is exactly the LR grid, :func:`~nexus_monai.transforms.consistency.natural_hr_grid`). Taps
  below ``tap_threshold`` x the row's largest weight are dropped and the rest renormalised
  (0.02 keeps 4 taps at factor 2 and 10 at factor 4 for the Gaussian profile, >98 % of the mass).
  The thick axis and factor come from the scan's ``meta["acquisition"]`` when it was simulated here,
  else from its affine (largest spacing relative to the other two, in-plane spacing assumed equal);
  an isotropic scan falls back to ``point``.

Warm-up (ours): with ``point_warmup = w`` the first fraction ``w`` of the run (progress as defined
below) renders every voxel with the point model, which costs one INR sample instead of 4-10; the
``profile`` model then refines. Measured on a 2 mm subject this is what makes the profile model pay
off within a CPU budget (see ``bundles/ssmcsr/docs/README.md``).

Loss (paper eq. 1, as in its code): batches of ``batch_size`` observations drawn from both scans
shuffled together; ``alpha * MSE(T1w observations) + beta * MSE(T2w observations)``, each the mean
over that contrast's observations in the batch (per-contrast masks: a T1w observation supervises
only the T1w output). Adam, cosine learning-rate decay to 0 over the run: the progress fraction is
``max(iteration / (epochs x iterations per epoch), elapsed / max_seconds)``, so with a wall-clock
budget the schedule anneals within the budget.

MI early stopping (ours, stated precisely; the paper's criterion computed without any HR data):
after every ``mi_every`` epochs the mutual information (nats, 32-bin joint histogram,
:func:`~nexus_monai.metrics.mutual_information.mutual_information`) of the two PREDICTED contrasts
is computed on a fixed random sample of ``mi_points`` voxels of the HR grid (the T1w field of view
at the finest LR spacing) inside the brain mask estimated from the inputs (both LR scans non-zero
after trilinear interpolation). Training stops at the first check ``j > mi_patience`` whose last
``mi_patience`` consecutive changes are all below ``mi_tolerance`` nats:
``max_{i=j-p+1..j} |MI_i - MI_{i-1}| < tol``; the network of that check is the result. Single-
contrast INRs run their full schedule (the paper uses MI only for the multi-contrast models).

The loop is an ignite :class:`~ignite.engine.Engine`; the JSON log holds the settings, the loss
and MI curves, the stop epoch and reason (``mi_plateau``, ``max_epochs``, ``time_budget``) and times.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import MetaTensor

from nexus_monai.data.io import load_volume, save_volume, write_text_atomic
from nexus_monai.data.staging import check_output_dir, staged_output_dir
from nexus_monai.engines.predict import _check_reachable, target_grid
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, field_of_view, sample_at_world, spacing
from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics import subject_metric_row
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.metrics.mutual_information import mutual_information
from nexus_monai.networks.ssmcsr import SSMCSR_VARIANTS, SSMCSRNet
from nexus_monai.transforms.acquisition import PROFILES
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.transforms.observations import LRObservations, lr_observations
from nexus_monai.transforms.protocols import load_protocol
from nexus_monai.transforms.query import iter_query_chunks

__all__ = ["FORWARD_MODELS", "CONTRASTS", "OUTPUT_NAMES", "LRObservations", "lr_observations", "MIPlateau",
           "SubjectFitter", "SubjectFit", "render_grid", "write_fit_outputs"]

FORWARD_MODELS = ("point", "profile")
OUTPUT_NAMES = {"t1": "t1w_sr.nii.gz", "t2": "t2w_sr.nii.gz", "log": "fit_log.json"}


def _plain(x) -> torch.Tensor:
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _source(img, default: str) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj") or default)


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


class _Batches:
    """Re-iterable shuffled batches of observation indices (a new seeded permutation per epoch)."""

    def __init__(self, total: int, batch_size: int, seed: int):
        self.total, self.batch_size = int(total), int(batch_size)
        self.gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.total, generator=self.gen)
        return iter(perm.split(self.batch_size))


@torch.no_grad()
def render_grid(network: torch.nn.Module, normalizer: WorldNormalizer, lr: Mapping[str, torch.Tensor], grid: TargetGrid,
                chunk_size: int = 32768, skip_empty: bool = True) -> dict[str, torch.Tensor]:
    """The INR on every voxel of ``grid`` -> ``{"t1": (X, Y, Z), "t2": ...}`` in the network's intensity units.

    Decoded in chunks of ``chunk_size`` points (bounded memory). With ``skip_empty`` points where
    BOTH LR scans interpolate to exactly 0 (no signal within one LR voxel) are 0 and not decoded.
    """
    was_training = network.training
    network.eval()
    out = torch.zeros(grid.num_voxels, 2)
    vols = {c: _plain(lr[c]).float()[None] for c in CONTRASTS}
    affines = {c: as_affine(lr[c].affine) for c in CONTRASTS}
    for start, stop, world, norm in iter_query_chunks(grid, normalizer, chunk_size):
        if skip_empty:
            signal = sum(sample_at_world(vols[c], affines[c], world[None], padding_mode="zeros")[0, 0].abs() for c in CONTRASTS)
            keep = torch.nonzero(signal > 0)[:, 0]
            if keep.numel():
                out[start:stop][keep] = network(norm[keep]).float()
        else:
            out[start:stop] = network(norm).float()
    network.train(was_training)
    return {c: out[:, i].reshape(grid.shape) for i, c in enumerate(CONTRASTS)}


def _mi_probe(lr: Mapping[str, MetaTensor], normalizer: WorldNormalizer, points: int, seed: int) -> torch.Tensor:
    """Normalised positions ``(n, 3)`` of a fixed sample of HR voxels inside the inputs' brain mask."""
    t1 = lr["t1"]
    finest = float(min(spacing(lr[c].affine).min() for c in CONTRASTS))
    grid = TargetGrid.from_spacing(t1.shape[-3:], t1.affine, finest)
    world = grid.world_coords(torch.float64).reshape(-1, 3)
    inside = torch.ones(len(world), dtype=torch.bool)
    for c in CONTRASTS:
        v = sample_at_world(_plain(lr[c]).float()[None], as_affine(lr[c].affine), world[None].float(), padding_mode="zeros")[0, 0]
        inside &= v > 0
    idx = torch.nonzero(inside)[:, 0]
    if idx.numel() > points:
        pick = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(int(seed)))[:points]
        idx = idx[pick.sort().values]
    return normalizer(world[idx]).float()


@dataclass
class SubjectFit:
    """A fitted subject: the network, its normaliser, the per-contrast intensity scales and the log."""

    network: SSMCSRNet
    normalizer: WorldNormalizer
    scales: dict
    lr: dict
    log: dict = field(default_factory=dict)
    chunk_size: int = 32768

    def predict(self, grid: TargetGrid) -> dict[str, MetaTensor]:
        """Both contrasts on ``grid`` as ``(1, X, Y, Z)`` MetaTensors with the grid's affine, input units."""
        t0 = time.perf_counter()
        pred = render_grid(self.network, self.normalizer, self.lr, grid, self.chunk_size)
        self.log["seconds_predict"] = round(time.perf_counter() - t0, 3)
        self.log["output_grid"] = {"shape": list(grid.shape), "spacing_mm": [round(float(s), 4) for s in grid.spacing]}
        return {c: MetaTensor((pred[c] * self.scales[c])[None], affine=grid.affine.clone()) for c in CONTRASTS}


class SubjectFitter:
    """Fits one SSMCSR INR to a subject's two LR scans (see the module docstring for every rule).

    Args (defaults = the CPU setting documented in ``bundles/ssmcsr/docs/README.md``; the paper's
    are in brackets):
        variant: ``split_head`` | ``vanilla`` | ``single``.
        forward_model: ``profile`` (ours) | ``point`` [paper].
        profile: slice profile of the ``profile`` model (the acquisition's: gaussian|boxcar|none).
        tap_threshold: relative weight below which profile taps are dropped.
        hidden, trunk_layers, head_hidden: network size [1024, 5, 512].
        num_frequencies, sigma: Fourier features [256 -> 512 features, 4].
        learning_rate [4e-4], batch_size (LR voxels per step) [1000], epochs (passes over all
        observations) [50], max_seconds: wall-clock budget of the fit, prediction excluded (None: none;
        the default 840 s leaves a 15-minute budget room for rendering the output).
        alpha, beta: loss weights of T1w / T2w [1, 1]. mask_dilation: LR voxels around the signal.
        point_warmup: fraction of the run (progress, as for the schedule) fitted with the cheap point
            model before the ``profile`` model takes over (ours; 0: none).
        early_stopping: MI plateau rule (ignored for ``single``); mi_every (epochs), mi_points,
        mi_patience, mi_tolerance (nats).
        seed: network initialisation, Fourier matrix, batch order, MI sample. device: torch device.
    """

    def __init__(self, variant: str = "split_head", forward_model: str = "profile", profile: str = "gaussian",
                 tap_threshold: float = 0.02, hidden: int = 256, trunk_layers: int = 5, head_hidden: int = 128,
                 num_frequencies: int = 256, sigma: float = 4.0, learning_rate: float = 2e-3, batch_size: int = 250,
                 epochs: int = 50, max_seconds: float | None = 840.0, alpha: float = 1.0, beta: float = 1.0,
                 mask_dilation: int = 1, point_warmup: float = 0.4, early_stopping: bool = True, mi_every: int = 1, mi_points: int = 32768,
                 mi_patience: int = 3, mi_tolerance: float = 0.002, seed: int = 0, device: str | torch.device = "cpu",
                 chunk_size: int = 32768, progress: bool = False):
        if variant not in SSMCSR_VARIANTS:
            raise NexusInputError(None, f"unknown SSMCSR variant {variant!r}; choose one of {', '.join(SSMCSR_VARIANTS)}")
        if forward_model not in FORWARD_MODELS:
            raise NexusInputError(None, f"unknown forward model {forward_model!r}; choose one of {', '.join(FORWARD_MODELS)}")
        if profile not in PROFILES:
            raise NexusInputError(None, f"unknown slice profile {profile!r}; choose one of {', '.join(PROFILES)}")
        if int(batch_size) < 1 or int(epochs) < 1 or (max_seconds is not None and not float(max_seconds) > 0):
            raise NexusInputError(None, "batch_size and epochs must be >= 1 and max_seconds > 0")
        self.options = dict(variant=variant, forward_model=forward_model, profile=profile, tap_threshold=float(tap_threshold),
                            hidden=int(hidden), trunk_layers=int(trunk_layers), head_hidden=int(head_hidden),
                            num_frequencies=int(num_frequencies), sigma=float(sigma), learning_rate=float(learning_rate),
                            batch_size=int(batch_size), epochs=int(epochs), max_seconds=None if max_seconds is None else float(max_seconds),
                            alpha=float(alpha), beta=float(beta), mask_dilation=int(mask_dilation),
                            point_warmup=float(point_warmup), early_stopping=bool(early_stopping),
                            mi_every=int(mi_every), mi_points=int(mi_points), mi_patience=int(mi_patience),
                            mi_tolerance=float(mi_tolerance), seed=int(seed))
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.progress = progress

    # -- inputs ---------------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(lr: Mapping[str, MetaTensor]) -> None:
        for c in CONTRASTS:
            img = lr.get(c)
            if img is None:
                raise NexusInputError(None, f"missing {c} LR scan")
            src = _source(img, f"{c} LR scan")
            if img.ndim != 4 or img.shape[0] != 1:
                raise NexusInputError(src, f"expected a single-channel (1, x, y, z) volume, got shape {tuple(img.shape)}")
            if not torch.isfinite(_plain(img)).all():
                raise NexusInputError(src, "LR volume contains NaN or infinite values")
        boxes = [field_of_view(lr[c].shape[-3:], lr[c].affine) for c in CONTRASTS]
        lo = torch.maximum(boxes[0].min(0).values, boxes[1].min(0).values)
        hi = torch.minimum(boxes[0].max(0).values, boxes[1].max(0).values)
        if bool(torch.any(hi <= lo)):
            raise NexusInputError(_source(lr["t2"], "t2 LR scan"), "its field of view does not overlap the t1 scan's (not registered?)")

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, t1_lr: MetaTensor, t2_lr: MetaTensor) -> SubjectFit:
        """Fit the INR to ``t1_lr`` / ``t2_lr`` (``(1, x, y, z)`` MetaTensors, own affines)."""
        o = self.options
        lr = {"t1": t1_lr, "t2": t2_lr}
        self._check_inputs(lr)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        torch.manual_seed(o["seed"])
        normalizer = WorldNormalizer.from_grids([(lr[c].shape[-3:], as_affine(lr[c].affine)) for c in CONTRASTS])
        scales = {}
        for c in CONTRASTS:
            x = _plain(lr[c]).float()
            scales[c] = float(intensity_scale(x, x != 0)) if bool((x != 0).any()) else 1.0
        obs = {c: lr_observations(lr[c], scales[c], normalizer, o["forward_model"], o["profile"], o["tap_threshold"], o["mask_dilation"])
               for c in CONTRASTS}
        obs = {c: LRObservations(*(getattr(v, f).to(self.device) if isinstance(getattr(v, f), torch.Tensor) else getattr(v, f)
                                   for f in ("centres", "targets", "slab", "offsets", "weights", "step", "thick_axis", "factor")))
               for c, v in obs.items()}
        network = SSMCSRNet(o["variant"], o["num_frequencies"], o["sigma"], o["hidden"], o["trunk_layers"], o["head_hidden"],
                            seed=o["seed"]).to(self.device)
        optimizer = torch.optim.Adam(network.parameters(), lr=o["learning_rate"])
        n1 = len(obs["t1"].targets)
        total = n1 + len(obs["t2"].targets)
        batches = _Batches(total, o["batch_size"], o["seed"])
        total_iters = len(batches) * o["epochs"]
        probe = _mi_probe(lr, normalizer, o["mi_points"], o["seed"]).to(self.device)
        plateau = MIPlateau(o["mi_patience"], o["mi_tolerance"])
        use_mi_stop = o["early_stopping"] and o["variant"] != "single"
        weights = {"t1": o["alpha"], "t2": o["beta"]}
        log = {"settings": dict(o), "normalizer": {"centre_mm": normalizer.centre.tolist(), "scale_mm": normalizer.scale},
               "intensity_scales": scales,
               "observations": {c: {"voxels": len(obs[c].targets), "taps": obs[c].taps, "thick_axis": obs[c].thick_axis,
                                    "factor": obs[c].factor} for c in CONTRASTS},
               "iterations_per_epoch": len(batches), "epochs": [], "mi_curve": [], "stop_reason": "max_epochs"}
        t_loop = time.perf_counter()

        def progress_fraction(engine: Engine) -> float:
            p = (engine.state.iteration - 1) / total_iters
            if o["max_seconds"]:
                p = max(p, (time.perf_counter() - t_start) / o["max_seconds"])
            return min(p, 1.0)

        def step(engine: Engine, index: torch.Tensor) -> dict:
            index = index.to(self.device)
            progress = progress_fraction(engine)
            lr_now = 0.5 * o["learning_rate"] * (1.0 + math.cos(math.pi * progress))
            point = progress < o["point_warmup"]
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            network.train()
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=self.device)
            terms = {}
            for ch, c in enumerate(CONTRASTS):
                sel = index[index < n1] if c == "t1" else index[index >= n1] - n1
                if sel.numel() == 0:
                    terms[c] = float("nan")
                    continue
                err = ((obs[c].render(network, sel, ch, point) - obs[c].targets[sel]) ** 2).mean()
                loss = loss + weights[c] * err
                terms[c] = float(err.detach())
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach()), "loss_t1": terms["t1"], "loss_t2": terms["t2"], "lr": lr_now}

        engine = Engine(step)
        sums: dict = {}

        @engine.on(Events.EPOCH_STARTED)
        def _reset(_):
            sums.clear()

        @engine.on(Events.ITERATION_COMPLETED)
        def _accumulate(eng):
            for k in ("loss_t1", "loss_t2"):
                v = eng.state.output[k]
                if not math.isnan(v):
                    sums[k] = sums.get(k, 0.0) + v
                    sums[k + "_n"] = sums.get(k + "_n", 0) + 1
            if o["max_seconds"] and time.perf_counter() - t_start >= o["max_seconds"]:
                log["stop_reason"] = "time_budget"
                eng.terminate()

        def record_mi(eng: Engine) -> float:
            with torch.no_grad():
                network.eval()
                pred = torch.cat([network(chunk) for chunk in probe.split(self.chunk_size)]).cpu().numpy()
                network.train()
            mi = mutual_information(pred[:, 0].reshape(-1, 1, 1), pred[:, 1].reshape(-1, 1, 1), bins=32) if len(pred) else float("nan")
            log["mi_curve"].append({"epoch": eng.state.epoch, "iteration": eng.state.iteration,
                                    "seconds": round(time.perf_counter() - t_start, 2), "mi": mi})
            return mi

        @engine.on(Events.EPOCH_COMPLETED)
        def _epoch_end(eng):
            entry = {"epoch": eng.state.epoch, "seconds": round(time.perf_counter() - t_start, 2), "lr": eng.state.output["lr"]}
            for k in ("loss_t1", "loss_t2"):
                entry[k] = sums.get(k, 0.0) / max(sums.get(k + "_n", 0), 1)
            log["epochs"].append(entry)
            if eng.state.epoch % o["mi_every"] == 0:
                mi = record_mi(eng)
                if plateau.update(mi) and use_mi_stop:
                    log["stop_reason"] = "mi_plateau"
                    eng.terminate()

        if self.progress:
            ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": out["loss"]})
        engine.run(batches, max_epochs=o["epochs"])
        if log["stop_reason"] == "time_budget" and (not log["mi_curve"] or log["mi_curve"][-1]["iteration"] != engine.state.iteration):
            record_mi(engine)
        log["stop_epoch"] = engine.state.epoch if log["stop_reason"] != "time_budget" else round(engine.state.iteration / len(batches), 3)
        log["iterations"] = engine.state.iteration
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


def write_fit_outputs(pred: Mapping[str, MetaTensor], log: Mapping, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``t1w_sr.nii.gz``, ``t2w_sr.nii.gz`` and ``fit_log.json`` in ``out_dir``; all three or none.

    Written into a temporary sibling folder that replaces ``out_dir`` in one rename, so even a
    killed run leaves the previous complete output or this one, never a mix."""
    out = Path(out_dir)
    with staged_output_dir(out) as stage:
        for c in CONTRASTS:
            save_volume(pred[c], stage / OUTPUT_NAMES[c])
        write_text_atomic(stage / OUTPUT_NAMES["log"], json.dumps(log, indent=2, default=float) + "\n")
    return {k: out / name for k, name in OUTPUT_NAMES.items()}


# --- fitting the subjects of a datalist (the bundle's `training` / `evaluating`) -----------------
def check_datalist(entries, keys_hr=("t1", "t2"), keys_lr=("t1_lr", "t2_lr")) -> list[dict]:
    """Every entry must name existing files: ``t1_lr``/``t2_lr`` (real LR scans) or ``t1``/``t2`` (HR,
    simulated with the protocol). Raises one :class:`NexusInputError` before any fitting starts."""
    entries = list(entries)
    if not entries:
        raise NexusInputError(None, "the datalist split has no subjects to fit")
    for e in entries:
        keys = keys_lr if all(k in e for k in keys_lr) else keys_hr
        for k in keys:
            if k not in e:
                raise NexusInputError(e.get("subject"), f"datalist entry has neither {'/'.join(keys_lr)} nor {k!r}")
            if not Path(e[k]).is_file():
                raise NexusInputError(e[k], f"{k} file of subject {e.get('subject', '?')} not found")
    return entries


class FitSubjectStep:
    """``Engine(FitSubjectStep(...))`` over datalist entries: fit one subject per iteration.

    An entry with ``t1_lr``/``t2_lr`` is fitted as is and rendered at ``target_spacing`` (mm) over
    the T1w field of view; an entry with HR ``t1``/``t2`` is put on the protocol frame, its LR scans
    are simulated with the protocol (as ``nexus-sr evaluate`` does) and the result is rendered on
    the HR grid and scored with :func:`~nexus_monai.metrics.subject_metric_row` (and trilinear, for
    the gain). Writes ``<output_dir>/<subject>/{t1w_sr,t2w_sr}.nii.gz`` and ``fit_log.json``.
    Output: ``[{"subject", "loss", "seconds_fit", "stop_reason", "stop_epoch", metrics...}]`` (one
    subject, as a decollated list like MONAI's engines, so ``from_engine(["loss"], first=True)`` works).
    """

    def __init__(self, fitter: SubjectFitter, output_dir: str | os.PathLike, protocol: str = "nexus",
                 target_spacing=(1.0, 1.0, 1.0), compare_trilinear: bool = True, lpips: bool = False):
        self.fitter, self.output_dir, self.protocol_name = fitter, Path(output_dir), protocol
        self.target_spacing, self.compare_trilinear, self.lpips = target_spacing, compare_trilinear, lpips
        self._protocol = None

    def __call__(self, engine: Engine, entry: Mapping) -> dict:
        entry = entry[0] if isinstance(entry, (list, tuple)) else entry
        name = str(entry.get("subject") or Path(str(entry.get("t1_lr", entry.get("t1")))).name.split(".")[0])
        gt = None
        if "t1_lr" in entry and "t2_lr" in entry:
            lr = {c: load_volume(entry[f"{c}_lr"]) for c in CONTRASTS}
            grid = target_grid(lr["t1"], list(self.target_spacing))
        else:
            self._protocol = self._protocol or load_protocol(self.protocol_name)
            data = self._protocol.prepare_subject(dict(entry))
            lr = {c: data[f"{c}_lr"] for c in CONTRASTS}
            grid = TargetGrid.like(data["t1"])
            gt = {c: _plain(data[c])[0] for c in CONTRASTS}
        pred, log = self.fitter.fit_predict(lr["t1"], lr["t2"], grid)
        log["subject"] = name
        write_fit_outputs(pred, log, self.output_dir / name)
        last = log["epochs"][-1] if log["epochs"] else {}
        row = {"subject": name, "loss": float(last.get("loss_t1", math.nan) + last.get("loss_t2", math.nan)),
               "seconds_fit": log["seconds_fit"], "seconds_predict": log["seconds_predict"],
               "stop_reason": log["stop_reason"], "stop_epoch": log["stop_epoch"],
               "mi_final": log["mi_curve"][-1]["mi"] if log["mi_curve"] else math.nan}
        if gt is not None:
            scores = subject_metric_row(gt, {c: _plain(pred[c])[0] for c in CONTRASTS}, None, lpips=self.lpips)
            row.update({k: v for k, v in scores.items() if k != "lpips_status"})
            if self.compare_trilinear:
                tri = {c: _plain(upsample(lr[c], grid, "trilinear"))[0] for c in CONTRASTS}
                ref = subject_metric_row(gt, tri, None, lpips=False)
                for c in CONTRASTS:
                    row[f"trilinear_psnr_{c}"] = ref[f"psnr_{c}"]
                    row[f"gain_psnr_{c}"] = row[f"psnr_{c}"] - ref[f"psnr_{c}"]
        return [row]


class FitSubjectsReport:
    """Collects the rows of :class:`FitSubjectStep`; at the end writes ``<output_dir>/<prefix>_subjects.csv``
    and ``<prefix>_summary.json`` and puts the mean of every numeric column in ``engine.state.metrics``
    (so StatsHandler prints and an attached MLFlowHandler logs them)."""

    def __init__(self, output_dir: str | os.PathLike, prefix: str = "fit"):
        self.output_dir, self.prefix = Path(output_dir), prefix
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.rows.extend(dict(r) for r in e.state.output))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        frame = pd.DataFrame(self.rows)
        write_text_atomic(self.output_dir / f"{self.prefix}_subjects.csv", frame.to_csv(index=False))
        summary = {}
        for col in frame.columns:
            if col != "subject" and pd.api.types.is_numeric_dtype(frame[col]):
                vals = frame[col].astype(float).dropna()
                if len(vals):
                    summary[col] = float(vals.mean())
                    engine.state.metrics[col] = summary[col]
        write_text_atomic(self.output_dir / f"{self.prefix}_summary.json", json.dumps({"subjects": len(frame), "mean": summary}, indent=2) + "\n")


def fit_files(fitter: SubjectFitter, t1: str | os.PathLike, t2: str | os.PathLike, out_dir: str | os.PathLike,
              spacing_mm=None, like: str | os.PathLike | None = None, max_voxels: float = 2e9) -> dict:
    """Fit on two LR NIfTI files and write both SR volumes + ``fit_log.json`` (``nexus-sr fit-subject``
    and the bundle's ``inference``). The grid is ``spacing_mm`` over the T1w field of view or the grid
    of ``like``; inputs and grid are checked before any fitting (one-line :class:`NexusInputError`)."""
    sources = {"t1": str(t1), "t2": str(t2)}
    for c, path in sources.items():
        if path in ("", "None") or not Path(path).exists():
            raise NexusInputError(path if path not in ("", "None") else None, f"missing {c} input scan" if path in ("", "None") else "file not found")
    check_output_dir(out_dir, OUTPUT_NAMES.values())
    lr = {c: load_volume(p) for c, p in sources.items()}
    if spacing_mm is not None and not isinstance(spacing_mm, (list, tuple)):
        spacing_mm = [float(spacing_mm)] * 3
    grid = target_grid(lr["t1"], None if like else spacing_mm, like)
    _check_reachable(grid, lr, sources, max_voxels)
    pred, log = fitter.fit_predict(lr["t1"], lr["t2"], grid)
    log["inputs"] = sources
    written = write_fit_outputs(pred, log, out_dir)
    return {**written, "grid_shape": grid.shape, "log": log, "log_path": written["log"]}
