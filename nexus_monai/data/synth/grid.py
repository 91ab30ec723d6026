"""Output grids and smooth random fields shared by every stage of the generator.

Geometry (all lengths in mm, world frame RAS as nibabel reads it)
-----------------------------------------------------------------
The output frame is the BraTS one: ``full`` = 240 x 240 x 155 voxels of 1 mm, ``small`` =
120 x 120 x 78 voxels of 2 mm covering the same field of view. The affine is a plain diagonal
(``diag(s, s, s)``) whose translation puts the centre of the field of view at world (0, 0, 0),
i.e. near the centre of the brain, as in BraTS.

Smooth random fields (:class:`SmoothField`) are drawn in millimetres, independent of the grid
they are evaluated on, so the ``small`` and ``full`` versions of a subject share every field.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SIZES", "FOV_MM", "COARSE_MM", "SmoothField", "rotation", "grid_axes", "output_affine", "to_jsonable"]

SIZES: dict[str, tuple[tuple[int, int, int], float]] = {
    "full": ((240, 240, 155), 1.0),
    "small": ((120, 120, 78), 2.0),
}
"""Output grid per size: (shape in voxels, isotropic spacing in mm)."""

FOV_MM = np.array([240.0, 240.0, 155.0])  # field of view shared by both sizes (BraTS frame)
COARSE_MM = 4.0  # probe grid used to place the brain and the tumour (same for both sizes)


class SmoothField:
    """Unit-variance smooth random field(s) on a box, from Gaussian radial-basis functions.

    Control points every ``corr_mm`` over ``[low - corr, high + corr]`` per axis carry i.i.d.
    N(0, 1) coefficients; the basis is separable and row-normalised so the field has variance 1
    everywhere. Coefficients are drawn at construction (their number depends only on the box in
    mm), so the same draw evaluated on a 1 mm or 2 mm grid gives the same field.
    """

    def __init__(self, rng: np.random.Generator, low, high, corr_mm: float, n_fields: int = 1):
        self.corr = float(corr_mm)
        self.points = []
        for lo, hi in zip(np.asarray(low, float), np.asarray(high, float)):
            n = int(math.ceil((hi - lo) / self.corr)) + 3
            self.points.append(lo - self.corr + self.corr * np.arange(n))
        self.coef = rng.standard_normal((n_fields, *(len(p) for p in self.points)))

    def _basis(self, axis: int, coords: np.ndarray) -> np.ndarray:
        diff = np.asarray(coords, float)[:, None] - self.points[axis][None, :]
        basis = np.exp(-0.5 * (diff / self.corr) ** 2)
        return basis / np.sqrt((basis**2).sum(axis=1, keepdims=True))

    def at(self, points: np.ndarray) -> np.ndarray:
        """Evaluate at scattered world points ``(N, 3)`` (mm): ``(n_fields, N)``."""
        bx, by, bz = (self._basis(a, points[:, a]) for a in range(3))
        out = np.einsum("nabc,pa->npbc", self.coef, bx, optimize=True)
        out = np.einsum("npbc,pb->npc", out, by, optimize=True)
        return np.einsum("npc,pc->np", out, bz, optimize=True)

    def __call__(self, ax: np.ndarray, ay: np.ndarray, az: np.ndarray) -> np.ndarray:
        """Evaluate on the grid ``ax x ay x az`` (world mm per axis): ``(n_fields, X, Y, Z)``."""
        bx, by, bz = self._basis(0, ax), self._basis(1, ay), self._basis(2, az)
        out = np.empty((self.coef.shape[0], len(bx), len(by), len(bz)))
        for n, coef in enumerate(self.coef):
            part = np.tensordot(bx, coef, axes=([1], [0]))  # (X, b, c)
            part = np.tensordot(part, by, axes=([1], [1]))  # (X, c, Y)
            out[n] = np.tensordot(part, bz, axes=([1], [1]))  # (X, Y, Z)
        return out


def rotation(angles_deg) -> np.ndarray:
    """3 x 3 rotation ``Rz Ry Rx`` from angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid_axes(shape, spacing: float) -> list[np.ndarray]:
    """World coordinates (mm) of voxel centres per axis; the field of view is centred at 0."""
    return [(np.arange(n) - (n - 1) / 2.0) * spacing for n in shape]


def output_affine(size: str) -> np.ndarray:
    """The 4 x 4 RAS affine (mm) of the output grid of ``size``: diagonal, centred at world 0."""
    shape, spacing = SIZES[size]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * spacing for n in shape]
    return affine


def to_jsonable(value):
    """Parameters as plain JSON types, floats rounded to 6 decimals (stable text)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value
