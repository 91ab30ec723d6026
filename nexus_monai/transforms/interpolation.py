"""Interpolation onto any grid: trilinear, cubic B-spline and nearest-neighbour resampling of an LR scan.

The interpolation baselines of Table 1 (:mod:`nexus_monai.baselines.interpolation`) and every stage
that needs an LR scan on an HR grid (validation panels, comparisons, B-spline initialisations) use
this one function.

All are SimpleITK's resamplers (``sitkLinear``; ``sitkBSpline`` = cubic B-spline interpolation
with prefiltering; ``sitkNearestNeighbor``) evaluated at the world positions of the target voxels, so any target grid
works: another spacing, another scan's grid, an oblique affine. Target voxels beyond the
outermost LR sample centre (up to half an LR voxel, e.g. the first/last HR slice of a z x 2 scan)
are extrapolated by repeating the edge value (ITK evaluates inside the half-voxel border), and
voxels outside the LR field of view are 0.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from nexus_monai.geometry import TargetGrid, as_affine, spacing

__all__ = ["METHODS", "to_sitk", "upsample"]

METHODS = {
    "trilinear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "cubic": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _itk_geometry(affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origin, spacing, direction)`` in ITK's LPS convention from a RAS voxel->world affine."""
    a = as_affine(affine).numpy()
    sp = spacing(a).numpy()
    direction = _RAS_TO_LPS @ (a[:3, :3] / sp)
    origin = _RAS_TO_LPS @ a[:3, 3]
    return origin, sp, direction


def to_sitk(volume: torch.Tensor | np.ndarray, affine) -> sitk.Image:
    """A SimpleITK float image of a 3D volume ``(X, Y, Z)`` / ``(1, X, Y, Z)`` with its world geometry."""
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    arr = arr[0] if arr.ndim == 4 else arr
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=np.float64))  # ITK index (i, j, k)
    origin, sp, direction = _itk_geometry(affine)
    img.SetOrigin(origin.tolist())
    img.SetSpacing(sp.tolist())
    img.SetDirection(direction.flatten().tolist())
    return img


def upsample(image: MetaTensor, grid: TargetGrid, method: str = "trilinear") -> MetaTensor:
    """Resample an LR MetaTensor ``(C, x, y, z)`` onto ``grid``; returns ``(C, X, Y, Z)`` float32."""
    if method not in METHODS:
        raise ValueError(f"interpolation method must be one of {sorted(METHODS)}, got {method!r}")
    origin, sp, direction = _itk_geometry(grid.affine)
    ref = sitk.Image([int(s) for s in grid.shape], sitk.sitkFloat64)
    ref.SetOrigin(origin.tolist())
    ref.SetSpacing(sp.tolist())
    ref.SetDirection(direction.flatten().tolist())
    channels = []
    for c in range(image.shape[0]):
        src = to_sitk(image[c].as_subclass(torch.Tensor), image.affine)
        out = sitk.Resample(src, ref, sitk.Transform(), METHODS[method], 0.0, sitk.sitkFloat64)
        channels.append(sitk.GetArrayFromImage(out).transpose(2, 1, 0))
    arr = torch.as_tensor(np.stack(channels).astype(np.float32))
    meta = {k: v for k, v in image.meta.items() if k != "affine"} if isinstance(image, MetaTensor) else {}
    meta["interpolation"] = method
    return MetaTensor(arr, affine=grid.affine.clone(), meta=meta)
