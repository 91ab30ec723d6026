"""Data consistency of a super-resolved volume with the LR scan it was computed from (operator math).

The acquisition operator of an LR scan ``y`` (thick axis ``a``, factor ``k``, slice profile ``p``)
applied to an SR volume ``x`` on any output grid:

    ``A x = D_p(S x)``

``S`` resamples ``x`` (trilinear) onto the scan's *natural HR grid* (:func:`natural_hr_grid`: the
scan's in-plane grid with ``k`` samples per slab along ``a``, whose thick-slice acquisition is
exactly the LR grid) and ``D_p`` is :func:`~nexus_monai.transforms.acquisition.slice_profile_matrix`
along ``a``: each LR voxel is the slice-profile-weighted average of ``x`` along its thick axis,
the same operator that simulates the LR scans and that SSMCSR's ``profile`` forward model uses.
A scan with no thick axis (isotropic spacing) has ``D = I`` (point sampling at its voxel centres).

* :func:`lr_residual` -- ``r = y - A x`` per LR voxel (input units) and which LR voxels the output
  grid covers (a slab whose HR samples fall outside the output grid has no residual).
* :func:`back_project` -- ``B r``: every natural-HR voxel gets the profile-weighted average of the
  residuals of the slabs that see it (``D^T r / D^T 1``), resampled to the output grid; with it a
  residual map on the output grid and the iterative back-projection step (Irani and Peleg's IBP,
  "Improving resolution by image registration", CVGIP 1991, with this back-projection kernel).
* :func:`estimate_noise_sigma` -- the noise level of an LR scan (rule in its docstring).
* :func:`consistency_threshold` -- ``max(k x noise, floor x intensity reference)`` of an LR scan.
* :func:`correct_toward_data` -- a few IBP steps restricted to where the residual exceeds that
  threshold (soft threshold, rule in its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nexus_monai.geometry import (
    TargetGrid,
    as_affine,
    hr_affine_of_thick_slices,
    plain_tensor,
    spacing,
    thick_slice_affine,
)
from nexus_monai.transforms.acquisition import apply_along_axis, num_thick_slices, slice_profile_matrix

__all__ = ["natural_hr_grid", "thick_axis_of", "AcquisitionModel", "lr_residual", "back_project",
           "estimate_noise_sigma",
           "consistency_threshold", "correct_toward_data", "ISOTROPIC_TOLERANCE"]

ISOTROPIC_TOLERANCE = 1e-3  # relative spacing difference below which a scan counts as isotropic


def natural_hr_grid(lr_shape, lr_affine, axis: int, factor: float) -> TargetGrid:
    """The HR grid whose thick-slice acquisition (``axis``, ``factor``) is exactly the LR grid."""
    k = float(factor)
    shape = [int(s) for s in lr_shape[-3:]]
    hr_affine = hr_affine_of_thick_slices(lr_affine, axis, k)
    n_hr = int(math.ceil(shape[axis] * k - 1e-6))
    if num_thick_slices(n_hr, k) != shape[axis]:  # pragma: no cover - guarded by the ceil above
        n_hr += 1
    shape[axis] = n_hr
    grid = TargetGrid(tuple(shape), hr_affine)
    assert torch.allclose(thick_slice_affine(grid.affine, axis, k), as_affine(lr_affine), atol=1e-6)
    return grid


def thick_axis_of(lr) -> tuple[int | None, float]:
    """``(axis, factor)`` of an LR scan: its ``meta["acquisition"]`` when it was simulated here, else
    from its affine (the axis whose spacing is largest relative to the mean of the other two);
    ``(None, 1.0)`` for an isotropic scan."""
    acquired = (getattr(lr, "meta", None) or {}).get("acquisition")
    if isinstance(acquired, dict) and float(acquired.get("factor", 1.0)) > 1.0:
        return int(acquired["axis"]), float(acquired["factor"])
    sp = spacing(as_affine(lr.affine)).tolist()
    ratios = [sp[a] / ((sum(sp) - sp[a]) / 2.0) for a in range(3)]
    axis = max(range(3), key=lambda a: ratios[a])
    if ratios[axis] < 1.0 + ISOTROPIC_TOLERANCE:
        return None, 1.0
    return axis, float(ratios[axis])


def _resample(volume: torch.Tensor, affine, grid: TargetGrid, chunk: int = 1 << 20) -> torch.Tensor:
    """``volume`` ``(X, Y, Z)`` on ``affine`` sampled trilinearly at the voxel centres of ``grid``
    (nearest edge value in the half voxel at the border of its field of view, 0 beyond it).

    The target index -> source index map is one 4x4 matrix; coordinates are built per slab of
    ``grid`` along its first axis (about ``chunk`` points at a time, bounded memory).
    """
    vol = volume.to(torch.float32)[None, None]
    m = (torch.linalg.inv(as_affine(affine)) @ grid.affine).to(torch.float32)  # target index -> source index
    n = torch.tensor([float(v) for v in volume.shape[-3:]])
    nx, ny, nz = grid.shape
    j, k = torch.arange(ny, dtype=torch.float32), torch.arange(nz, dtype=torch.float32)
    base = j[:, None, None] * m[:3, 1] + k[None, :, None] * m[:3, 2] + m[:3, 3]  # (Y, Z, 3)
    step = max(1, chunk // (ny * nz))
    out = torch.empty(grid.shape, dtype=torch.float32)
    for i0 in range(0, nx, step):
        i = torch.arange(i0, min(i0 + step, nx), dtype=torch.float32)
        g = (2.0 * (base[None] + i[:, None, None, None] * m[:3, 0]) + 1.0) / n - 1.0  # grid_sample units
        inside = (g.abs() <= 1.0 + 1e-6).all(-1)
        sampled = F.grid_sample(vol, g.flip(-1)[None], mode="bilinear", padding_mode="border", align_corners=False)[0,
                                                                                                                    0]
        out[i0:i0 + len(i)] = sampled * inside
    return out


@dataclass
class AcquisitionModel:
    """The acquisition operator of one LR scan (``y`` ``(X, Y, Z)``, its affine) for outputs on ``grid``.

    ``axis``/``factor``/``profile``: the scan's thick-slice setting (``axis=None``: isotropic).
    ``hr``: the natural HR grid; ``matrix``: ``D`` ``(M, n_hr)`` (``None`` for ``D = I``);
    ``covered``: ``(X, Y, Z)`` bool, LR voxels whose slab lies inside the output grid.
    """

    lr: torch.Tensor
    lr_affine: torch.Tensor
    grid: TargetGrid
    axis: int | None
    factor: float
    profile: str
    hr: TargetGrid
    matrix: torch.Tensor | None
    covered: torch.Tensor

    @classmethod
    def of(cls, lr, grid: TargetGrid, profile: str = "gaussian") -> "AcquisitionModel":
        """The model of the LR MetaTensor ``lr`` (``(1, X, Y, Z)`` or ``(X, Y, Z)``) for outputs on ``grid``."""
        y = plain_tensor(lr).float()
        y = y[0] if y.ndim == 4 else y
        affine = as_affine(lr.affine)
        axis, factor = thick_axis_of(lr)
        if axis is None:
            hr, matrix = TargetGrid(tuple(y.shape), affine), None
        else:
            hr = natural_hr_grid(y.shape, affine, axis, factor)
            matrix = slice_profile_matrix(hr.shape[axis], factor, profile)[: y.shape[axis]].float()
        model = cls(y, affine, grid, axis, factor, profile, hr, matrix, torch.ones_like(y, dtype=torch.bool))
        inside = _resample(torch.ones(grid.shape), grid.affine, hr)
        model.covered = model.acquire_hr(inside) > 0.999
        return model

    def acquire_hr(self, hr_volume: torch.Tensor) -> torch.Tensor:
        """``D`` applied to a natural-HR volume -> LR grid."""
        return hr_volume if self.matrix is None else apply_along_axis(hr_volume, self.matrix, self.axis)

    def acquire(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: an output-grid volume ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) re-acquired on the LR grid."""
        x = plain_tensor(x).float()
        x = x[0] if x.ndim == 4 else x
        return self.acquire_hr(_resample(x, self.grid.affine, self.hr))

    def back_project_hr(self, r: torch.Tensor) -> torch.Tensor:
        """``D^T r / D^T 1`` on the natural HR grid (a weighted average of the residuals that see each HR voxel)."""
        if self.matrix is None:
            return r
        num = apply_along_axis(r, self.matrix.T, self.axis)
        den = apply_along_axis(torch.ones_like(r), self.matrix.T, self.axis)
        return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def lr_residual(model: AcquisitionModel, x: torch.Tensor) -> torch.Tensor:
    """``y - A x`` per LR voxel (input units); 0 at LR voxels the output grid does not cover."""
    r = model.lr - model.acquire(x)
    return torch.where(model.covered, r, torch.zeros_like(r))


def back_project(model: AcquisitionModel, r: torch.Tensor) -> torch.Tensor:
    """An LR-grid residual mapped onto the output grid: ``S'(D^T r / D^T 1)`` (trilinear ``S'``), ``(X, Y, Z)``."""
    return _resample(model.back_project_hr(r), model.hr.affine, model.grid)


def estimate_noise_sigma(lr, axes: Sequence[int] | None = None) -> float:
    """Noise standard deviation of an LR scan, in its intensity units.

    Rule: ``sigma = 1.4826 x median(|d - median(d)|) / sqrt(2)`` where ``d`` are the differences of
    neighbouring voxels along the in-plane axes (the two non-thick axes; all three for an isotropic
    scan), over the pairs where both voxels are non-zero (inside the scan's signal). For white
    noise ``d`` has standard deviation ``sqrt(2) sigma`` and the median absolute deviation is robust
    to the minority of pairs that straddle an anatomical edge; anatomy finer than one voxel counts
    as "noise" here, so on noise-free data the estimate is an upper bound set by texture.
    """
    y = plain_tensor(lr).float()
    y = y[0] if y.ndim == 4 else y
    if axes is None:
        axis, _ = thick_axis_of(lr) if hasattr(lr, "affine") else (None, 1.0)
        axes = [a for a in range(3) if a != axis]
    diffs = []
    for a in axes:
        lo, hi = y.narrow(a, 0, y.shape[a] - 1), y.narrow(a, 1, y.shape[a] - 1)
        both = (lo != 0) & (hi != 0)
        diffs.append((hi - lo)[both])
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    if d.numel() < 16:
        return 0.0
    if d.numel() > 4_000_000:  # a fixed stride subsample keeps the median cheap and deterministic
        d = d[:: d.numel() // 4_000_000 + 1]
    mad = (d - d.median()).abs().median()
    return float(1.4826 * mad / math.sqrt(2.0))


def consistency_threshold(lr, k: float = 3.0, floor: float = 0.01) -> tuple[float, float]:
    """``(threshold, sigma)``: an LR residual counts as a departure from the data above
    ``max(k * sigma, floor * p99.5)``, with ``sigma`` from :func:`estimate_noise_sigma` and ``p99.5``
    the scan's 99.5th percentile of non-zero voxels (the floor keeps noise-free or quantised scans,
    whose ``sigma`` can be 0, from treating rounding-level differences as departures)."""
    y = plain_tensor(lr).float()
    nz = y[y != 0]
    ref = float(torch.quantile(nz.flatten()[:: max(1, nz.numel() // 4_000_000)], 0.995)) if nz.numel() else 0.0
    sigma = estimate_noise_sigma(lr)
    return max(float(k) * sigma, float(floor) * ref), sigma


def correct_toward_data(model: AcquisitionModel, x: torch.Tensor, threshold: float, iterations: int = 5,
                        step: float = 1.0, region_weight: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Local iterative back-projection of the LR residual in excess of ``threshold`` (input units).

    Rule: ``e = sign(r) max(|r| - threshold, 0)`` soft-thresholds the residual ``r = y - A x`` (LR voxels
    within ``threshold`` of the data give nothing). The correction region is fixed from the input:
    the output voxels at least ``region_weight`` of whose observing weight (``back_project`` of the
    indicator of ``e != 0``) comes from LR voxels above threshold, i.e. the slabs of those voxels.
    Each iteration ``x <- x + step * back_project(e)`` inside that region only; the iterate with the
    smallest excess ``||e||_2`` is returned (the input itself if no step lowered it), so the result
    never departs further from the data than ``x`` did and nothing outside the region changes.
    Output voxels that are exactly 0 (the skipped empty background) stay 0.

    Returns ``(corrected (X, Y, Z), stats)`` with the excess norm and the number of LR voxels above
    threshold before and after, and the size of the region.
    """
    x = plain_tensor(x).float()
    x = (x[0] if x.ndim == 4 else x).clone()

    def excess(v):
        r = lr_residual(model, v)
        return torch.sign(r) * torch.clamp(r.abs() - threshold, min=0.0)

    e = excess(x)
    region = (back_project(model, (e != 0).float()) >= region_weight) & (x != 0)
    first = {"excess_l2": float(e.norm()), "voxels_above": int((e != 0).sum())}
    best, best_e, history = x, first["excess_l2"], [first["excess_l2"]]
    for _ in range(int(iterations)):
        if not bool((e != 0).any()) or not bool(region.any()):
            break
        x = torch.where(region, x + step * back_project(model, e), x)
        e = excess(x)
        history.append(float(e.norm()))
        if history[-1] < best_e:
            best, best_e = x, history[-1]
    voxels_after = int((excess(best) != 0).sum()) if best is not x else int((e != 0).sum())
    return best, {"excess_l2_before": first["excess_l2"], "excess_l2_after": best_e,
                  "voxels_above_before": first["voxels_above"],
                  "voxels_above_after": voxels_after, "region_voxels": int(region.sum()), "excess_l2_history": history}
