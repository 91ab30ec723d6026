"""Voxel-wise image-quality metrics for 3D volumes: intensity scale, PSNR, SSIM (docs/evaluation_protocol.md).

Every function takes numpy arrays or torch tensors (``MetaTensor`` included) of shape
``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``; masks are anything whose non-zero voxels are
brain. Intensities are expected already divided by :func:`intensity_scale` of the ground truth,
so ``data_range=1`` means "1 = the GT's 99.5th brain percentile". Values are computed in float64
(SSIM: float32 inside MONAI).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import SSIMMetric
from scipy import ndimage

__all__ = ["as_volume", "as_mask", "volume_pair", "intensity_scale", "psnr", "erode_mask", "brain_bbox", "ssim3d"]


def as_volume(x, *, name: str = "volume", dtype=np.float64) -> np.ndarray:
    """Return ``x`` as a numpy ``(X, Y, Z)`` array of ``dtype`` (drops a leading channel of 1)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected shape (X, Y, Z) or (1, X, Y, Z), got {tuple(np.shape(x))}")
    return arr.astype(dtype, copy=False)


def as_mask(mask, shape: tuple[int, ...], *, allow_empty: bool = False) -> np.ndarray:
    """``mask`` as a boolean ``(X, Y, Z)`` array of ``shape``; an empty mask raises unless ``allow_empty``."""
    m = as_volume(mask, name="mask", dtype=bool)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {shape}")
    if not allow_empty and not m.any():
        raise ValueError("mask is empty: the metric is undefined")
    return m


def volume_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """``(gt, pred)`` as float64 ``(X, Y, Z)`` arrays of the same shape (else ``ValueError``)."""
    g, p = as_volume(gt, name="gt"), as_volume(pred, name="pred")
    if g.shape != p.shape:
        raise ValueError(f"gt shape {g.shape} differs from pred shape {p.shape}")
    return g, p


def intensity_scale(gt, mask, percentile: float = 99.5) -> float:
    """The ``percentile``-th percentile (numpy linear interpolation) of ``gt`` inside ``mask``.

    Both GT and prediction are divided by this ONE number before any metric; the prediction is
    never normalised on its own. Raises if the mask is empty or the value is not positive.
    """
    g = as_volume(gt, name="gt")
    m = as_mask(mask, g.shape)
    scale = float(np.percentile(g[m], percentile))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"intensity scale must be a positive number, got {scale}")
    return scale


def psnr(gt, pred, mask=None, data_range: float = 1.0) -> float:
    """PSNR in dB: ``10 log10(data_range**2 / MSE)``.

    MSE is the mean squared error over the voxels of ``mask`` if given, else over the whole
    volume. Returns ``inf`` for identical inputs.
    """
    g, p = volume_pair(gt, pred)
    sq = (g - p) ** 2
    mse = float(sq[as_mask(mask, g.shape)].mean()) if mask is not None else float(sq.mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def erode_mask(mask, voxels: int = 3) -> np.ndarray:
    """Erode a 3D mask by ``voxels`` voxels with a Euclidean ball structuring element.

    The ball is every offset with ``dx**2 + dy**2 + dz**2 <= voxels**2`` (radius 3 -> 123
    voxels): a voxel survives iff all voxels within Euclidean distance ``voxels`` are in the
    mask. Outside the array counts as background. Returns a bool ``(X, Y, Z)`` array (may be
    empty for small masks).
    """
    m = as_volume(mask, name="mask", dtype=bool)
    if voxels <= 0:
        return m.copy()
    r = np.arange(-voxels, voxels + 1)
    dx, dy, dz = np.meshgrid(r, r, r, indexing="ij")
    ball = dx**2 + dy**2 + dz**2 <= voxels**2
    return ndimage.binary_erosion(m, structure=ball, border_value=0)


def brain_bbox(mask, margin: int = 0) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of the non-zero voxels of ``mask``, grown by ``margin`` voxels
    on each side and clipped to the volume."""
    m = as_volume(mask, name="mask", dtype=bool)
    if not m.any():
        raise ValueError("mask is empty: no bounding box")
    out = []
    for axis in range(3):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, m.shape[axis])))
    return tuple(out)


def ssim3d(gt, pred, mask, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
           margin: int | None = None, device: str | torch.device | None = None) -> float:
    """3D SSIM with MONAI ``SSIMMetric(spatial_dims=3)`` on the brain bounding box.

    Window: Gaussian, ``win_size**3`` voxels (default 11x11x11), standard deviation ``sigma``
    voxels (default 1.5), k1=0.01, k2=0.03, population (co)variances. MONAI filters in "valid"
    mode, so the SSIM map holds one value per window lying fully inside the crop. The crop is
    the mask's bounding box grown by ``margin`` voxels (default ``win_size // 2``, clipped to
    the volume), so the map has one window centred on every bounding-box voxel (as long as the
    brain is at least ``margin`` voxels from the volume edge); SSIM is the mean of that map.
    Equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=data_range)`` on the same crop up to MONAI's float32
    rounding (within 2e-5 in tests/metrics/test_metrics.py). ``device``: where MONAI's filtering runs
    (e.g. a GPU: the 11^3 window filters are most of a validation's metric time on CPU; default CPU).
    """
    g, p = volume_pair(gt, pred)
    m = as_mask(mask, g.shape)
    box = brain_bbox(m, win_size // 2 if margin is None else margin)
    g, p = g[box], p[box]
    if min(g.shape) < win_size:
        raise ValueError(f"SSIM crop {g.shape} is smaller than the {win_size}^3 window")
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, kernel_type="gaussian",
                        win_size=win_size, kernel_sigma=sigma, k1=0.01, k2=0.03)
    device = torch.device(device or "cpu")
    value = metric(torch.from_numpy(np.ascontiguousarray(p))[None, None].to(device),
                   torch.from_numpy(np.ascontiguousarray(g))[None, None].to(device))
    return float(value.reshape(-1)[0])
