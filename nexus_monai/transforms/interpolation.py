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

SimpleITK is optional at run time: without it (a GPU server given only the minimal run-time
wheelhouse, see ``scripts/wheelhouse.py``) ``trilinear`` and ``nearest`` are computed by
:func:`resample_torch` with ITK's semantics (float64, the same half-voxel border; equal to
SimpleITK within 1e-5 relative, tested), and ``cubic`` / ``bspline`` are a one-line error.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from nexus_monai.geometry import TargetGrid, as_affine, spacing, voxel_to_grid, voxel_to_voxel

try:
    import SimpleITK as sitk
except ImportError:  # the minimal GPU run-time wheelhouse leaves it out (a 53 MB wheel): torch fallback below
    sitk = None

__all__ = ["METHODS", "HAVE_SIMPLEITK", "resample_torch", "to_sitk", "upsample"]

HAVE_SIMPLEITK = sitk is not None
METHODS = {
    "trilinear": sitk.sitkLinear if sitk else "trilinear",
    "bspline": sitk.sitkBSpline if sitk else "bspline",
    "cubic": sitk.sitkBSpline if sitk else "bspline",
    "nearest": sitk.sitkNearestNeighbor if sitk else "nearest",
}
_TORCH_METHODS = ("trilinear", "nearest")
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
    if sitk is None:
        raise ImportError("SimpleITK is not installed (pip install SimpleITK)")
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
    if sitk is None:
        if method not in _TORCH_METHODS:
            raise ImportError(f"{method} interpolation needs SimpleITK, which is not installed "
                              f"(pip install SimpleITK; without it only {', '.join(_TORCH_METHODS)})")
        arr = resample_torch(image, grid, method)
        meta = {k: v for k, v in image.meta.items() if k != "affine"} if isinstance(image, MetaTensor) else {}
        meta["interpolation"] = method
        return MetaTensor(arr, affine=grid.affine.clone(), meta=meta)
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


def resample_torch(image: torch.Tensor, grid: TargetGrid, method: str = "trilinear",
                   slab_voxels: int = 1 << 21) -> torch.Tensor:
    """ITK's ``sitkLinear`` / ``sitkNearestNeighbor`` resampling in torch (no SimpleITK), float64 on the CPU.

    ``image``: ``(C, x, y, z)`` with an affine (MetaTensor); returns ``(C, X, Y, Z)`` float32 on ``grid``.
    As ITK: a target voxel whose continuous LR index lies in ``[-0.5, n - 0.5)`` along every axis is
    inside (edge values repeated within the half-voxel border), others are 0; nearest rounds half up.
    Worked through ``grid`` in slabs of about ``slab_voxels`` target voxels (bounded memory).
    """
    if method not in _TORCH_METHODS:
        raise ValueError(f"resample_torch supports {', '.join(_TORCH_METHODS)}, got {method!r}")
    vol = (image.as_subclass(torch.Tensor) if isinstance(image, MetaTensor) else torch.as_tensor(image))
    vol = vol.detach().to("cpu", torch.float64)
    n = torch.tensor(vol.shape[1:], dtype=torch.float64)
    flat = vol.reshape(vol.shape[0], -1)
    strides = (vol.shape[2] * vol.shape[3], vol.shape[3], 1)
    shape = tuple(int(s) for s in grid.shape)
    out = torch.zeros((vol.shape[0],) + shape, dtype=torch.float32)
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    yz = torch.stack(torch.meshgrid(torch.arange(shape[1], dtype=torch.float64),
                                    torch.arange(shape[2], dtype=torch.float64), indexing="ij"), dim=-1)
    for x0 in range(0, shape[0], step):
        xs = torch.arange(x0, min(shape[0], x0 + step), dtype=torch.float64)
        idx = torch.cat([xs[:, None, None, None].expand(-1, shape[1], shape[2], 1),
                         yz[None].expand(len(xs), -1, -1, -1)], dim=-1).reshape(-1, 3)
        c = voxel_to_voxel(idx, grid.affine, as_affine(image.affine)).to(torch.float64)
        inside = ((c >= -0.5) & (c < n - 0.5)).all(dim=-1)
        if method == "nearest":
            i = torch.minimum(torch.floor(c + 0.5).clamp_min(0), n - 1).long()
            values = flat[:, i[:, 0] * strides[0] + i[:, 1] * strides[1] + i[:, 2]]
        else:  # border padding = ITK's edge repetition inside the half-voxel border
            g = voxel_to_grid(c, vol.shape[1:]).reshape(1, 1, 1, -1, 3)
            values = F.grid_sample(vol[None], g, mode="bilinear", padding_mode="border",
                                   align_corners=False).reshape(vol.shape[0], -1)
        values = torch.where(inside, values, torch.zeros((), dtype=torch.float64))
        out[:, x0:x0 + len(xs)] = values.reshape(vol.shape[0], len(xs), shape[1], shape[2]).float()
    return out
