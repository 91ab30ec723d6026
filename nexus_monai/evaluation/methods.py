"""Registry of super-resolution methods evaluated side by side (LIIF-style: by name).

A method is a callable ``(inputs, grid, **options) -> {"t1": MetaTensor, "t2": MetaTensor}``
where ``inputs`` holds the subject's LR scans ``t1_lr`` and ``t2_lr`` (``(1, x, y, z)``
MetaTensors with their own affines) and ``grid`` is the :class:`~nexus_monai.geometry.TargetGrid`
to predict both contrasts on. Later issues register cohort and subject-specific models here.
"""

from __future__ import annotations

from typing import Callable, Mapping

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.geometry import TargetGrid

__all__ = ["METHODS", "register_method", "get_method"]

METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator adding a method to :data:`METHODS` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@register_method("trilinear")
def trilinear(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """Trilinear interpolation of each LR scan onto ``grid`` (SimpleITK)."""
    return {c: upsample(inputs[f"{c}_lr"], grid, "trilinear") for c in ("t1", "t2")}


@register_method("cubic")
def cubic(inputs: Mapping, grid: TargetGrid, **_) -> dict:
    """Cubic B-spline interpolation of each LR scan onto ``grid`` (SimpleITK ``sitkBSpline``)."""
    return {c: upsample(inputs[f"{c}_lr"], grid, "bspline") for c in ("t1", "t2")}


@register_method("lrtv")
def lrtv_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """LRTV (Shi et al., TMI 2015; re-implementation) of each LR scan onto ``grid``, per volume."""
    from nexus_monai.baselines.lrtv import lrtv

    return {c: lrtv(inputs[f"{c}_lr"], grid, **options) for c in ("t1", "t2")}


_BUNDLE_MODELS: dict = {}


def bundle_model(bundle: str = "bundles/nexus_inr", overlays: tuple = ()):
    """A trained bundle's ``(network, inferer)``, loaded once per process (cohort models)."""
    key = (str(bundle), tuple(overlays))
    if key not in _BUNDLE_MODELS:
        from nexus_monai.engines.predict import load_bundle

        network, inferer, _ = load_bundle(bundle, overlays, device="cpu")
        _BUNDLE_MODELS[key] = (network, inferer)
    return _BUNDLE_MODELS[key]


@register_method("nexus_inr")
def nexus_inr_method(inputs: Mapping, grid: TargetGrid, bundle: str = "bundles/nexus_inr", **_) -> dict:
    """Nexus-INR from ``bundles/nexus_inr/models/model.pt`` (train the bundle first)."""
    from nexus_monai.engines.predict import predict_volumes

    network, inferer = bundle_model(bundle)
    return predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer)


@register_method("smore")
def smore_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SMORE (Zhao et al., TMI 2021; re-implementation): self-supervised 2D SR per LR scan, no training data."""
    from nexus_monai.baselines.smore import smore

    return {c: smore(inputs[f"{c}_lr"], grid, **options) for c in ("t1", "t2")}


@register_method("saint")
def saint_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """SAINT (Peng et al., CVPR 2020; re-implementation) from ``bundles/saint/models/model.pt`` (train the bundle first)."""
    from nexus_monai.baselines.saint import saint

    return {c: saint(inputs[f"{c}_lr"], grid, **options) for c in ("t1", "t2")}


@register_method("i3net")
def i3net_method(inputs: Mapping, grid: TargetGrid, **options) -> dict:
    """I3Net (Song et al., TMI 2024; re-implementation) from ``bundles/i3net/models/model.pt`` (train the bundle first)."""
    from nexus_monai.baselines.i3net import i3net

    return {c: i3net(inputs[f"{c}_lr"], grid, **options) for c in ("t1", "t2")}
