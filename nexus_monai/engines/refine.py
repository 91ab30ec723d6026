"""Test-time refinement of a trained cohort Nexus-INR on one subject's own two LR scans (ours).

Neither Nexus-INR (Zhang et al., "Nexus-INR: Diverse Knowledge-guided Arbitrary-Scale Multimodal
Medical Image Super-Resolution", 2025) nor SSMCSR (McGinnis et al., "Single-subject Multi-contrast
MRI Super-resolution via Implicit Neural Representations", MICCAI 2023) does this: the cohort
model is the prior, and a COPY of it is fine-tuned on the subject's own LR scans through the
acquisition forward model, with no HR data anywhere. The network given is never modified.

Forward model. Every LR voxel inside its scan's signal (non-zero voxels dilated by
``mask_dilation``) is one observation; it is rendered as the slice-profile-weighted average of the
SR field at the HR sample positions of its slab along the scan's thick axis, with the weights of
the acquisition operator itself (:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix`).
These are the observations of SSMCSR's ``profile`` forward model
(:func:`~nexus_monai.transforms.observations.lr_observations`); here the field is the Nexus-INR's
output queried at world positions, in the network's intensity space (each scan mapped by its own
statistics, ``intensity_norm``, exactly as :func:`~nexus_monai.engines.predict.predict_volumes` does).

Loss: ``MSE(T1w observations) + MSE(T2w observations)`` on shuffled batches of both scans, plus the
null-space anchor, Adam with a cosine learning-rate decay over the time budget.

Null-space anchor (part of the rule): an LR voxel sees only the profile-weighted average of the field
over its slab, so a change of the field that varies WITHIN a slab is invisible to every LR voxel,
held-out ones included. With ``D`` the refined minus the cohort field at a slab's taps and ``w`` the
tap weights, ``anchor_weight * sum_t w_t (D_t - sum_s w_s D_s)^2`` (mean over the batch) keeps that
invisible part of the change near 0, while the slab average (what the data constrain) moves freely:
within a slab the cohort model's structure is kept. Measured on one embedded test subject (60 s, one
thread, ``docs/refinement_and_consistency.md``): without the anchor the held-out LR MSE fell and the
safeguard accepted both contrasts, yet masked PSNR FELL by 0.70 (T1w) / 1.54 dB (T2w) at the brain
boundary; with ``anchor_weight = 1`` it rose by 0.28 / 0.43 dB.

By default only what comes after the encoders is tuned (KD-Attn query/output, MMF, SEL, decoders):
the encoder feature maps are computed once, which makes a step cost a few thousand decoder queries
(``train_encoder=True`` tunes all of it). Defaults (``RefineOptions``): 256 observations per step,
learning rate 5e-4, anchor weight 1, chosen on that one subject (not a tuned optimum).

Safeguard (the rule): before any step, ``holdout_fraction`` of each scan's observations (at most
``holdout_max``, drawn at random with ``seed``) are set aside and never used in the loss. Their
MSE is measured for the cohort model, then every ``eval_every`` iterations, whenever
``eval_seconds`` have passed since the last check, and at the end; for
each contrast the state with the lowest held-out MSE is kept. A contrast is refined only if that
best held-out MSE is below ``(1 - min_improvement)`` times the cohort model's; otherwise that
contrast's output is the cohort model's, unchanged (bit for bit). The held-out voxels remain part
of the network's INPUT (the scans are encoded whole), so the rule detects fine-tuning that stops
generalising to unseen observations (overfitting the trained voxels, drift of the prior), not
noise that the input itself carries.

The loop is an ignite :class:`~ignite.engine.Engine`; :class:`RefineResult` holds the network to
predict with (the cohort network, one refined copy, or :class:`PerContrastINR` of two) and a log.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from torch import nn

from nexus_monai.engines.inr import CONTRASTS
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import WorldNormalizer, as_affine, plain_tensor, world_to_voxel
from nexus_monai.transforms.acquisition import PROFILES
from nexus_monai.transforms.intensity import reference_normalization
from nexus_monai.transforms.observations import lr_observations

__all__ = ["RefineOptions", "RefineResult", "PerContrastINR", "refine_network", "check_refine_seconds",
           "lr_consistency_loss", "contrast_networks"]


def check_refine_seconds(value, source: str | None = "--refine") -> float:
    """A refinement budget in seconds as a float >= 0 (0: no refinement); anything else (negative,
    NaN, infinite, not a number) raises a one-line :class:`NexusInputError` naming ``source``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise NexusInputError(source, f"refinement budget must be a number of seconds >= 0, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise NexusInputError(source, f"refinement budget must be a finite number of seconds >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class RefineOptions:
    """Settings of :func:`refine_network` (see the module docstring for the rules).

    Args:
        max_seconds: wall-clock budget of the refinement (setup, steps and held-out checks).
        learning_rate: Adam's initial rate, decayed by a cosine to 0 over the budget.
        batch_size: LR observations per step (both scans shuffled together).
        holdout_fraction, holdout_max: held-out observations per scan (fraction, cap).
        eval_every, eval_seconds: a held-out check after every ``eval_every`` iterations and whenever
            ``eval_seconds`` have passed since the last one (``None``: an eighth of ``max_seconds``),
            so slow steps still get checked. min_improvement: relative held-out gain a refined state
            needs over the cohort model to be used.
        train_encoder: also tune the encoders (re-encodes both scans every step: slower).
        profile, tap_threshold, mask_dilation: the forward model (as SSMCSR's ``profile`` model).
        max_iterations: optional cap on steps (``None``: the budget alone). seed: split, batches.
        anchor_weight: weight of the null-space anchor (module docstring; 0: off).
    """

    max_seconds: float = 60.0
    learning_rate: float = 5e-4
    batch_size: int = 256
    holdout_fraction: float = 0.1
    holdout_max: int = 4096
    eval_every: int = 20
    eval_seconds: float | None = None
    min_improvement: float = 0.01
    train_encoder: bool = False
    profile: str = "gaussian"
    tap_threshold: float = 0.02
    mask_dilation: int = 1
    max_iterations: int | None = None
    anchor_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_refine_seconds(self.max_seconds, "refine max_seconds")
        if self.profile not in PROFILES:
            raise NexusInputError(None, f"unknown slice profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if not (0.0 < self.holdout_fraction < 1.0) or int(self.holdout_max) < 1:
            raise NexusInputError(None, "holdout_fraction must be in (0, 1) and holdout_max >= 1")
        if self.eval_seconds is not None and not self.eval_seconds > 0:
            raise NexusInputError(None, "eval_seconds must be > 0 (or None)")
        if (int(self.batch_size) < 1 or int(self.eval_every) < 1 or not self.learning_rate > 0
                or not 0 <= self.min_improvement < 1 or not self.anchor_weight >= 0):
            raise NexusInputError(None, "batch_size and eval_every must be >= 1, learning_rate > 0, "
                                        "0 <= min_improvement < 1, anchor_weight >= 0")


class PerContrastINR(nn.Module):
    """Two networks with the Nexus-INR ``encode`` / ``decode`` interface, one per output contrast.

    ``encode(t1, t2)`` -> ``{"t1": maps of the T1w network, "t2": maps of the T2w network}``;
    ``decode(maps, ...)`` -> ``{"t1": (B, K) from the T1w network, "t2": (B, K) from the T2w one}``.
    """

    def __init__(self, t1: nn.Module, t2: nn.Module):
        super().__init__()
        self.nets = nn.ModuleDict({"t1": t1, "t2": t2})

    def encode(self, t1: torch.Tensor, t2: torch.Tensor) -> dict:
        return {c: self.nets[c].encode(t1, t2) for c in CONTRASTS}

    def decode(self, maps, *args, **kwargs) -> dict:
        return {c: self.nets[c].decode(maps[c], *args, **kwargs)[c] for c in CONTRASTS}

    def forward(self, t1, t2, t1_affine, t2_affine, query_world, query_norm=None, aux: bool = False) -> dict:
        return self.decode(self.encode(t1, t2), t1, t2, t1_affine, t2_affine, query_world, query_norm)


def contrast_networks(network: nn.Module) -> dict:
    """``{"t1": net, "t2": net}``: the two networks of a :class:`PerContrastINR`, else ``network`` twice.

    Predicting each contrast with its own plain network (instead of the wrapper) keeps the inferer's
    memory-bounded tiled path, which needs a NexusINR."""
    return dict(network.nets.items()) if isinstance(network, PerContrastINR) else {c: network for c in CONTRASTS}


@dataclass
class RefineResult:
    """``network``: what to predict with; ``chosen``: ``{"t1": "refined"|"cohort", ...}``; ``log``."""

    network: nn.Module
    chosen: dict
    log: dict = field(default_factory=dict)


class _Subject:
    """One subject's scaled LR volumes, affines, normaliser and profile observations (world mm)."""

    def __init__(self, t1_lr, t2_lr, options: RefineOptions, device: torch.device, intensity_norm: str = "percentile"):
        self.vols, self.affines, self.obs, self.world, self.step = {}, {}, {}, {}, {}
        lr = {"t1": t1_lr, "t2": t2_lr}
        for c in CONTRASTS:
            x = plain_tensor(lr[c]).float()
            x = x[None] if x.ndim == 3 else x
            offset, scale = reference_normalization(x, intensity_norm) if bool((x != 0).any()) else (0.0, 1.0)
            self.vols[c] = ((x - offset) / scale)[None].to(device)  # (1, 1, X, Y, Z), as predict_volumes maps it
            self.affines[c] = as_affine(lr[c].affine).reshape(-1, 4, 4)[:1].to(device)
        grids = [(self.vols[c].shape[-3:], self.affines[c][0].cpu()) for c in CONTRASTS]
        self.normalizer = WorldNormalizer.from_grids(grids)
        for c in CONTRASTS:
            img = lr[c] if plain_tensor(lr[c]).ndim == 4 else lr[c][None]
            o = lr_observations(img, 1.0, self.normalizer, "profile", options.profile, options.tap_threshold,
                                options.mask_dilation)
            self.world[c] = self.normalizer.inverse(o.centres.double()).float().to(device)
            index = torch.round(world_to_voxel(self.world[c].double().cpu(), self.affines[c][0].cpu())).long()
            o.targets = self.vols[c][0, 0].cpu()[index[:, 0], index[:, 1], index[:, 2]]  # the values the network sees
            self.step[c] = (o.step.double() * self.normalizer.scale).float().to(device)
            for name in ("targets", "slab", "offsets", "weights"):
                setattr(o, name, getattr(o, name).to(device))
            self.obs[c] = o

    def render(self, network: nn.Module, maps: dict, index: dict, taps: bool = False):
        """Predicted LR intensities ``{c: (B_c,)}`` of observations ``index[c]`` through the profile model
        (with ``taps``: also ``({c: field at the taps (B_c, T)}, {c: tap weights (B_c, T)})``)."""
        points, sizes, weights = [], [], {}
        for c in CONTRASTS:
            o, idx = self.obs[c], index[c]
            slab = o.slab[idx]
            pts = self.world[c][idx][:, None, :] + o.offsets[slab][..., None] * self.step[c]  # (B, T, 3) world mm
            points.append(pts.reshape(-1, 3))
            sizes.append(pts.shape[:2])
            weights[c] = o.weights[slab]
        world = torch.cat(points)[None]
        out = network.decode(maps, self.vols["t1"], self.vols["t2"], self.affines["t1"], self.affines["t2"], world,
                             self.normalizer(world).float())
        pred, field, start = {}, {}, 0
        for c, (b, t) in zip(CONTRASTS, sizes):
            field[c] = out[c][0, start:start + b * t].reshape(b, t)
            pred[c] = (field[c] * weights[c]).sum(-1)
            start += b * t
        return (pred, field, weights) if taps else pred


def _split(n: int, options: RefineOptions, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, holdout)`` observation indices of one scan (a seeded random holdout)."""
    perm = torch.randperm(n, generator=gen)
    hold = min(max(1, round(options.holdout_fraction * n)), int(options.holdout_max), n - 1)
    return perm[hold:].sort().values, perm[:hold].sort().values


@torch.no_grad()
def _mse(subject: _Subject, network: nn.Module, maps: dict, index: dict, chunk: int = 2048) -> dict:
    """Mean squared error ``{c: float}`` of observations ``index[c]`` through the forward model."""
    sums = {c: 0.0 for c in CONTRASTS}
    n = max(len(index[c]) for c in CONTRASTS)
    for start in range(0, n, chunk):
        part = {c: index[c][start:start + chunk] for c in CONTRASTS}
        pred = subject.render(network, maps, part)
        for c in CONTRASTS:
            sums[c] += float(((pred[c] - subject.obs[c].targets[part[c]]) ** 2).sum())
    return {c: sums[c] / max(len(index[c]), 1) for c in CONTRASTS}


def _encode(network: nn.Module, subject: _Subject, grad: bool) -> dict:
    with torch.set_grad_enabled(grad):
        return network.encode(subject.vols["t1"], subject.vols["t2"])


def lr_consistency_loss(network: nn.Module, t1_lr, t2_lr, options: RefineOptions | None = None,
                        intensity_norm: str = "percentile") -> dict:
    """The LR-consistency loss of ``network`` on a subject: ``{c: MSE over ALL observed LR voxels of
    scan c through the profile forward model}`` (scaled intensities, as :func:`refine_network` fits)."""
    options = options or RefineOptions()
    device = next(network.parameters()).device
    subject = _Subject(t1_lr, t2_lr, options, device, intensity_norm)
    was_training = network.training
    network.eval()
    maps = _encode(network, subject, False)
    index = {c: torch.arange(len(subject.obs[c].targets), device=device) for c in CONTRASTS}
    out = _mse(subject, network, maps, index)
    network.train(was_training)
    return out


def refine_network(network: nn.Module, t1_lr, t2_lr, options: RefineOptions | None = None, progress: bool = False,
                   intensity_norm: str = "percentile") -> RefineResult:
    """Fine-tune a copy of ``network`` on the subject's LR scans ``t1_lr`` / ``t2_lr`` (``(1, x, y, z)``
    MetaTensors with their own affines, in the scans' units) under the safeguard of the module
    docstring. ``network`` itself is never modified. ``intensity_norm``: the intensity space the network
    was trained in (the inferer's, as :func:`~nexus_monai.engines.predict.predict_volumes` maps the
    scans). Returns a :class:`RefineResult`."""
    o = options or RefineOptions()
    t_start = time.perf_counter()
    base = network.module if hasattr(network, "module") else network
    device = next(base.parameters()).device
    net = copy.deepcopy(base).to(device)
    net.eval()  # no dropout / batch-norm in Nexus-INR; eval keeps any there exactly as in prediction
    for name, p in net.named_parameters():
        p.requires_grad_(o.train_encoder or not name.startswith("encoders."))
    subject = _Subject(t1_lr, t2_lr, o, device, intensity_norm)
    gen = torch.Generator().manual_seed(int(o.seed))
    train, hold = {}, {}
    for c in CONTRASTS:
        n = len(subject.obs[c].targets)
        if n < 2:
            raise NexusInputError(None, f"the {c} scan has too few observed voxels to refine on ({n})")
        tr, ho = _split(n, o, gen)
        train[c], hold[c] = tr.to(device), ho.to(device)
    maps = _encode(net, subject, False)
    cohort_maps = maps if not o.train_encoder else {k: v.detach().clone() for k, v in maps.items()}
    cohort = _mse(subject, net, maps, hold)
    best = {c: (cohort[c], 0, None) for c in CONTRASTS}  # (held-out MSE, iteration, state)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=o.learning_rate)
    n1, total = len(train["t1"]), len(train["t1"]) + len(train["t2"])
    observed = {c: {"train": len(train[c]), "holdout": len(hold[c]), "taps": subject.obs[c].taps,
                    "thick_axis": subject.obs[c].thick_axis, "factor": subject.obs[c].factor} for c in CONTRASTS}
    log = {"settings": asdict(o), "observations": observed,
           "cohort_holdout_mse": dict(cohort), "curve": [], "stop_reason": "max_iterations"}
    log["seconds_setup"] = round(time.perf_counter() - t_start, 3)

    def batches():
        while True:
            for b in torch.randperm(total, generator=gen).split(int(o.batch_size)):
                yield b

    def step(engine: Engine, batch: torch.Tensor) -> dict:
        progress_fraction = min((time.perf_counter() - t_start) / o.max_seconds, 1.0)
        if o.max_iterations:
            progress_fraction = max(progress_fraction, (engine.state.iteration - 1) / o.max_iterations)
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * o.learning_rate * (1.0 + math.cos(math.pi * progress_fraction))
        index = {"t1": train["t1"][batch[batch < n1]], "t2": train["t2"][batch[batch >= n1] - n1]}
        optimizer.zero_grad(set_to_none=True)
        m = _encode(net, subject, True) if o.train_encoder else maps
        pred, field, weights = subject.render(net, m, index, taps=True)
        terms = {c: ((pred[c] - subject.obs[c].targets[index[c]]) ** 2).mean() if len(index[c]) else pred[c].sum() * 0
                 for c in CONTRASTS}
        loss = terms["t1"] + terms["t2"]
        if o.anchor_weight > 0:  # the change of the field within each slab (invisible to the data) stays near 0
            with torch.no_grad():
                _, prior, _ = subject.render(base, cohort_maps, index, taps=True)
            for c in CONTRASTS:
                if len(index[c]):
                    change = field[c] - prior[c]
                    within = change - (change * weights[c]).sum(-1, keepdim=True)
                    terms[f"anchor_{c}"] = ((within ** 2) * weights[c]).sum(-1).mean()
                    loss = loss + o.anchor_weight * terms[f"anchor_{c}"]
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), **{f"loss_{c}": float(v.detach()) for c, v in terms.items()}}

    def check(engine: Engine) -> None:
        m = _encode(net, subject, False) if o.train_encoder else maps
        held = _mse(subject, net, m, hold)
        it = engine.state.iteration
        log["curve"].append({"iteration": it, "seconds": round(time.perf_counter() - t_start, 2),
                             "train_loss": engine.state.output["loss"], **{f"holdout_{c}": held[c] for c in CONTRASTS}})
        for c in CONTRASTS:
            if held[c] < best[c][0]:
                best[c] = (held[c], it, {k: v.detach().clone() for k, v in net.state_dict().items()})

    engine = Engine(step)
    eval_seconds = o.eval_seconds if o.eval_seconds is not None else o.max_seconds / 8.0

    @engine.on(Events.ITERATION_COMPLETED)
    def _check(eng: Engine) -> None:
        last = log["curve"][-1]["seconds"] if log["curve"] else log["seconds_setup"]
        if eng.state.iteration % int(o.eval_every) == 0 or time.perf_counter() - t_start - last >= eval_seconds:
            check(eng)

    @engine.on(Events.ITERATION_COMPLETED)
    def _stop(eng: Engine) -> None:
        if time.perf_counter() - t_start >= o.max_seconds:
            log["stop_reason"] = "time_budget"
            eng.terminate()

    @engine.on(Events.COMPLETED)
    def _last(eng: Engine) -> None:
        if eng.state.iteration and (not log["curve"] or log["curve"][-1]["iteration"] != eng.state.iteration):
            check(eng)

    if progress:
        ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": out["loss"]})
    if o.max_seconds > 0 and time.perf_counter() - t_start < o.max_seconds:
        engine.run(batches(), max_epochs=1, epoch_length=int(o.max_iterations or 10**9))
    else:
        log["stop_reason"] = "time_budget"
    chosen, states = {}, {}
    for c in CONTRASTS:
        loss, it, state = best[c]
        refined = state is not None and loss < (1.0 - o.min_improvement) * cohort[c]
        chosen[c] = "refined" if refined else "cohort"
        states[c] = (it, state) if refined else None
    nets = {}
    for c in CONTRASTS:
        if states[c] is None:
            nets[c] = base  # the cohort network itself: its output is unchanged
        elif c == "t2" and states["t1"] is not None and states["t1"][0] == states[c][0]:
            nets[c] = nets["t1"]  # the same state serves both contrasts
        else:
            copy_c = copy.deepcopy(base).to(device)
            copy_c.load_state_dict(states[c][1])
            nets[c] = copy_c.eval().requires_grad_(False)
    result_net = nets["t1"] if nets["t1"] is nets["t2"] else PerContrastINR(nets["t1"], nets["t2"])
    log.update({"iterations": engine.state.iteration or 0, "seconds": round(time.perf_counter() - t_start, 3),
                "chosen": chosen, "best_holdout_mse": {c: best[c][0] for c in CONTRASTS},
                "best_iteration": {c: best[c][1] for c in CONTRASTS},
                "threads": torch.get_num_threads()})
    return RefineResult(result_net, chosen, log)
