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
