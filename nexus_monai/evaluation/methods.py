"""Registry of super-resolution methods evaluated side by side (LIIF-style: by name).

A method is a callable ``(inputs, grid, **options) -> {"t1": MetaTensor, "t2": MetaTensor}``
where ``inputs`` holds the subject's LR scans ``t1_lr`` and ``t2_lr`` (``(1, x, y, z)``
MetaTensors with their own affines) and ``grid`` is the :class:`~nexus_monai.geometry.TargetGrid`
to predict both contrasts on. Later issues register cohort and subject-specific models here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nexus_monai.baselines.i3net import i3net
from nexus_monai.baselines.interpolation import upsample
from nexus_monai.baselines.lrtv import lrtv
from nexus_monai.baselines.saint import saint
from nexus_monai.baselines.smore import smore
from nexus_monai.data.io import write_text_atomic
from nexus_monai.engines.bundle_model import bundle_folder, bundle_model
from nexus_monai.engines.consistency import consistency_guard, guard_options_from_env
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.engines.refine import RefineOptions, contrast_networks, refine_network
from nexus_monai.engines.run_record import read_run_record
from nexus_monai.engines.subject_fit import SubjectFitter
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid
from nexus_monai.keys import CONTRASTS
from nexus_monai.transforms.consistency import thick_axis_of

__all__ = ["METHODS", "register_method", "get_method", "register_cohort_bundle", "bundle_model", "check_methods",
           "training_budget"]

METHODS: dict[str, Callable] = {}


def register_method(name: str, bundle: str | None = None):
    """Decorator adding a method to :data:`METHODS` under ``name``.

    ``bundle``: the bundle folder whose ``models/model.pt`` the method predicts with (cohort
    models); :func:`check_methods` then loads and checks it before any work starts.
    """

    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if bundle is not None:
            fn.bundle = bundle
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _per_scan(fn: Callable, lr, grid: TargetGrid, **options):
    """``fn(lr, grid, **options)`` for a thick-slice scan; an isotropic scan (no thick axis, e.g. a protocol's
    T1w factor 1) has nothing for a slice-SR method to recover: it is interpolated onto ``grid`` (B-spline)."""
    if thick_axis_of(lr)[0] is None:
        return upsample(lr, grid, "bspline")
    return fn(lr, grid, **options)


@register_method("trilinear")
def trilinear(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """Trilinear interpolation of each LR scan onto ``grid`` (SimpleITK)."""
    return {c: upsample(inputs[f"{c}_lr"], grid, "trilinear") for c in CONTRASTS}


@register_method("cubic")
def cubic(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """Cubic B-spline interpolation of each LR scan onto ``grid`` (SimpleITK ``sitkBSpline``)."""
    return {c: upsample(inputs[f"{c}_lr"], grid, "bspline") for c in CONTRASTS}


@register_method("lrtv")
def lrtv_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """LRTV (Shi et al., TMI 2015; re-implementation) of each LR scan onto ``grid``, per volume."""
    return {c: _per_scan(lrtv, inputs[f"{c}_lr"], grid, **options) for c in CONTRASTS}


# --- cohort models: trained bundles, loaded once per process (nexus_monai.engines.bundle_model) ---
def register_cohort_bundle(name: str, bundle: str | None = None, description: str = "") -> Callable:
    """Register method ``name``: the bundle ``bundle`` (default ``bundles/<name>``) predicting both contrasts.

    The bundle's ``configs/inference.yaml`` provides ``network`` (with the two-contrast
    ``encode`` / ``decode`` interface) and ``inferer`` (``inferer(t1_lr, t2_lr, network, grid)``);
    prediction is :func:`nexus_monai.engines.predict.predict_volumes` (each LR scan scaled by its
    own 99.5th percentile, outputs scaled back). Options ``bundle=`` / ``weights=`` override the
    folder / checkpoint per call (``nexus-sr evaluate --weights NAME=CKPT``); ``overlays=`` (a
    list of config files merged over ``inference.yaml``: the form / experiment overlays the
    checkpoint was trained with, as ``nexus-sr experiment`` passes them).
    """
    folder = bundle or f"bundles/{name}"

    def method(inputs: Mapping, grid: TargetGrid, bundle: str = folder, weights: str | None = None,
               overlays: Sequence[str] = (),
               **_) -> dict:
        network, inferer = bundle_model(bundle, overlays=tuple(overlays), weights=weights)
        return predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer)

    method.__name__ = f"{name}_method"
    method.__doc__ = f"{description or name} from ``{folder}/models/model.pt`` (train the bundle first)."
    return register_method(name, bundle=folder)(method)


def check_methods(names: Sequence[str], options: Mapping[str, Mapping] | None = None) -> None:
    """Fail before any work: unknown names and cohort bundles whose checkpoint is missing or mismatching.

    ``options``: per-method keyword options (``{"cycleinr": {"weights": path}}``). Raises a
    one-line :class:`~nexus_monai.errors.NexusInputError`; loading the bundles here also warms
    :func:`bundle_model`'s cache for the run.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise NexusInputError(
            None, f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(METHODS))}"
        )
    if len(set(names)) != len(names):
        raise NexusInputError(None, f"a method is listed twice in {','.join(names)}")
    options = options or {}
    for extra in set(options) - set(names):
        raise NexusInputError(None, f"options given for {extra!r}, which is not among the methods {','.join(names)}")
    for n in names:
        opts = dict(options.get(n, {}))
        if getattr(METHODS[n], "bundle", None):
            bundle_model(opts.get("bundle", METHODS[n].bundle), overlays=tuple(opts.get("overlays", ())),
                         weights=opts.get("weights"))
        elif "weights" in opts:
            raise NexusInputError(opts["weights"], f"method {n!r} is not a cohort bundle; it takes no checkpoint")


def training_budget(name: str, options: Mapping | None = None) -> dict:
    """``{"train_steps", "train_seconds"}`` of a cohort method's bundle training (NaN when not recorded).

    Read from the ``training_run.json`` the bundle's training writes beside its checkpoint
    (:class:`~nexus_monai.engines.run_record.TrainingRunRecord`): ``<bundle>/models/`` or the folder
    of the ``weights`` option. Methods without cohort training (interpolation, per-subject fits) get NaN.
    """
    opts = dict(options or {})
    bundle = getattr(METHODS.get(name), "bundle", None)
    record = None
    if bundle is not None:
        bundle = opts.get("bundle", bundle)
        folder = Path(opts["weights"]).parent if opts.get("weights") else bundle_folder(bundle) / "models"
        record = read_run_record(folder)
    if not record:
        return {"train_steps": math.nan, "train_seconds": math.nan}
    return {"train_steps": float(record.get("steps", math.nan)),
            "train_seconds": float(record.get("seconds", math.nan))}


nexus_inr_method = register_cohort_bundle("nexus_inr", description="Nexus-INR")


@register_method("nexus_inr_refined", bundle="bundles/nexus_inr")
def nexus_inr_refined_method(inputs: Mapping, grid: TargetGrid, bundle: str = "bundles/nexus_inr",
                             weights: str | None = None,
                             **options) -> dict:
    """Nexus-INR refined on the subject's own two LR scans (ours, :mod:`nexus_monai.engines.refine`).

    The cohort model of ``bundles/nexus_inr`` is copied and fine-tuned through the acquisition model
    under the held-out safeguard, then predicts like ``nexus_inr`` (no consistency guard). Settings:
    :class:`~nexus_monai.engines.refine.RefineOptions` defaults (60 s), overridden by the JSON object
    in the environment variable ``NEXUS_REFINE_OPTIONS`` (e.g. ``{"max_seconds": 180}``), then by
    keyword ``options``.
    """
    settings = {**json.loads(os.environ.get("NEXUS_REFINE_OPTIONS") or "{}"), **options}
    try:
        refine_options = RefineOptions(**settings)
    except TypeError as err:
        raise NexusInputError(None, f"nexus_inr_refined: {err}") from None
    network, inferer = bundle_model(bundle, weights=weights)
    result = refine_network(network, inputs["t1_lr"], inputs["t2_lr"], refine_options,
                            intensity_norm=getattr(inferer, "intensity_norm", "percentile"))
    nets = contrast_networks(result.network)  # one network per contrast when their best states differ
    pred = predict_volumes(nets["t1"], inputs["t1_lr"], inputs["t2_lr"], grid, inferer)
    if nets["t2"] is not nets["t1"]:
        pred["t2"] = predict_volumes(nets["t2"], inputs["t1_lr"], inputs["t2_lr"], grid, inferer)["t2"]
    return pred


def _guarded(pred: dict, inputs: Mapping, grid: TargetGrid) -> dict:
    """``pred`` after the data-consistency guard of ``nexus-sr predict``: its default
    :class:`~nexus_monai.engines.consistency.GuardOptions`, overridden by the JSON object in the
    environment variable ``NEXUS_GUARD_OPTIONS`` (e.g. ``{"k": 0, "floor": 0, "iterations": 10}``)."""
    options = guard_options_from_env()
    lr = {c: inputs[f"{c}_lr"] for c in CONTRASTS}
    outputs, _, _ = consistency_guard({c: pred[c] for c in CONTRASTS}, lr, grid, options)
    return {**pred, **outputs}


@register_method("ibp")
def ibp_method(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """Back-projection without a network: ``trilinear``, then the consistency guard of ``nexus-sr predict``.

    The guard's correction is iterative back-projection of the LR residual (Irani and Peleg, "Improving
    resolution by image registration", CVGIP: Graphical Models and Image Processing, 1991) started from the
    trilinear interpolation, with the guard's settings (``NEXUS_GUARD_OPTIONS`` honoured as for the guarded
    methods). It is the floor a learned method must clear, on PSNR and on lesion fidelity alike; the
    difference ``nexus_inr_guarded - ibp`` is the network's own contribution to ``predict``'s output.
    """
    return _guarded(trilinear(inputs, grid), inputs, grid)


@register_method("nexus_inr_guarded", bundle="bundles/nexus_inr")
def nexus_inr_guarded_method(inputs: Mapping, grid: TargetGrid, bundle: str = "bundles/nexus_inr",
                             weights: str | None = None, overlays: Sequence[str] = (), **_) -> dict:
    """Nexus-INR as ``nexus-sr predict`` runs it by default: the cohort output, then the consistency guard."""
    network, inferer = bundle_model(bundle, tuple(overlays), weights)
    return _guarded(predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer), inputs, grid)


ANY_PROTOCOL_OVERLAY = "bundles/nexus_inr/configs/any_protocol.yaml"
ANY_PROTOCOL_WEIGHTS = "bundles/nexus_inr/models_any_protocol/model.pt"


@register_method("nexus_inr_any_protocol")
def nexus_inr_any_protocol_method(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """The any-protocol Nexus-INR (``configs/any_protocol.yaml``, docs/any_protocol.md): weights from
    ``bundles/nexus_inr/models_any_protocol/model.pt`` (train that overlay first; ``NEXUS_ANY_PROTOCOL_WEIGHTS``
    names another checkpoint); its consistency layer is its guard (raw = guarded), and it prints each scan's
    protocol and refuses one outside its trained range."""
    weights = os.environ.get("NEXUS_ANY_PROTOCOL_WEIGHTS") or str(bundle_folder(ANY_PROTOCOL_WEIGHTS))
    if not Path(weights).is_file():
        raise NexusInputError(weights, "no any-protocol checkpoint: train bundles/nexus_inr/configs/any_protocol.yaml")
    network, inferer = bundle_model("bundles/nexus_inr", (str(bundle_folder(ANY_PROTOCOL_OVERLAY)),), weights)
    return predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer)


@register_method("nexus_inr_refined_guarded", bundle="bundles/nexus_inr")
def nexus_inr_refined_guarded_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """``nexus-sr predict --refine S`` with its default guard: ``nexus_inr_refined``, then the guard."""
    return _guarded(nexus_inr_refined_method(inputs, grid, **options), inputs, grid)


arssr_method = register_cohort_bundle("arssr",
                                      description="ArSSR (Wu et al. 2022; Nexus-INR's Table 2 Baseline network, "
                                                  "random-scale training)")
cycleinr_method = register_cohort_bundle("cycleinr",
                                         description="CycleINR (re-implemented from Fang et al., CVPR 2024)")


@register_method("smore")
def smore_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SMORE (Zhao et al., TMI 2021; re-implementation): self-supervised 2D SR per LR scan, no training data."""
    return {c: _per_scan(smore, inputs[f"{c}_lr"], grid, **options) for c in CONTRASTS}


@register_method("saint", bundle="bundles/saint")
def saint_method(inputs: Mapping, grid: TargetGrid, bundle: str = "bundles/saint", weights: str | None = None,
                 **options) -> dict:
    """SAINT (Peng et al., CVPR 2020; re-implementation) from ``bundles/saint/models/model.pt``, one LR scan
    at a time."""
    network, _ = bundle_model(bundle, weights=weights)
    return {c: _per_scan(saint, inputs[f"{c}_lr"], grid, network=network, **options) for c in CONTRASTS}


@register_method("i3net", bundle="bundles/i3net")
def i3net_method(inputs: Mapping, grid: TargetGrid, bundle: str = "bundles/i3net", weights: str | None = None,
                 **options) -> dict:
    """I3Net (Song et al., TMI 2024; re-implementation) from ``bundles/i3net/models/model.pt``, one LR scan
    at a time."""
    network, _ = bundle_model(bundle, weights=weights)
    return {c: _per_scan(i3net, inputs[f"{c}_lr"], grid, network=network, **options) for c in CONTRASTS}


# --- SSMCSR (McGinnis et al. 2023): subject-specific INRs fitted on the fly on each subject's two LR scans ---
def _ssmcsr(variant: str, inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """Fit one SSMCSR INR on ``t1_lr`` / ``t2_lr`` and render it on ``grid``.

    Settings: :class:`~nexus_monai.engines.subject_fit.SubjectFitter` defaults (the CPU setting of
    ``bundles/ssmcsr``), overridden by the JSON object in the environment variable
    ``NEXUS_SSMCSR_OPTIONS`` (e.g. ``{"max_seconds": 120}``), then by keyword ``options``.
    """
    settings = {**json.loads(os.environ.get("NEXUS_SSMCSR_OPTIONS") or "{}"), **options, "variant": variant}
    log_dir = settings.pop("log_dir", None)  # optional: keep each fit's JSON log (curves, stop epoch, times)
    pred, log = SubjectFitter(**settings).fit_predict(inputs["t1_lr"], inputs["t2_lr"], grid)
    if log_dir:
        write_text_atomic(Path(log_dir) / f"{inputs.get('subject', 'subject')}_ssmcsr_{variant}.json",
                          json.dumps(log, indent=2, default=float) + "\n")
    return pred


@register_method("ssmcsr_split_head")
def ssmcsr_split_head_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SSMCSR split-head INR (shared trunk, one head per contrast), fitted per subject."""
    return _ssmcsr("split_head", inputs, grid, **options)


@register_method("ssmcsr_vanilla")
def ssmcsr_vanilla_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SSMCSR vanilla INR (one network, two outputs), fitted per subject."""
    return _ssmcsr("vanilla", inputs, grid, **options)


@register_method("ssmcsr_single")
def ssmcsr_single_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SSMCSR single-contrast baseline: one INR per contrast, fitted per subject."""
    return _ssmcsr("single", inputs, grid, **options)
