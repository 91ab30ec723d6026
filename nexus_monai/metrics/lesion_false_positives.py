"""False-positive lesions: lesion-sized blobs that a method paints into normal tissue.

A cross-contrast method can paint a hyperintensity onto an ambiguous bump (or carry one contrast's
lesion into the other); the contrast-recovered figures never charge for it. Here, per contrast:

* **normal tissue**: the brain mask minus every lesion dilated by :data:`FP_MARGIN_VOXELS` (2) voxels
  (a Euclidean ball), minus the ``exclude`` mask (the evaluation passes the tumour labels dilated the
  same way: a tumour is not normal tissue);
* **excess**: ``output - ground truth`` (normalised intensities);
* **blob**: a 26-connected component of normal-tissue voxels whose excess is above ``+3 sigma``
  (bright) or, on T1w only, below ``-3 sigma`` (dark: T1w lesions are either), with ``sigma`` the
  scan's noise standard deviation in the same normalised units (see below), AND where the output has a
  bump the ground truth does not: its white top-hat (bright; black top-hat for dark) exceeds the ground
  truth's by ``3 sigma`` too. The top-hat is ``v - opening(v)`` (``closing(v) - v``) with a flat cube of
  side ``2 ceil(R / h) + 1`` voxels, ``R`` = :data:`LARGEST_LESION_RADIUS_MM` (the generator's largest
  sphere), ``h`` the HR spacing: it keeps structures up to a lesion's size and is ~0 across a step edge.
  Without this second condition (column ``false_positive_excess_<c>``, the literal count) every blurred
  tissue boundary is a "lesion": hundreds to thousands of 1-voxel blobs per subject for every method on
  the 2 mm world, trilinear included (docs/evaluation_protocol.md);
* **false positive**: a blob of at least ``min_voxels`` voxels, the smallest lesion volume the generator
  makes (:data:`SMALLEST_LESION_MM3`, mm^3) in voxels of the HR grid, rounded up, at least 1.

``sigma`` is the noise SD of the contrast's LR scan estimated from the scan itself
(:func:`~nexus_monai.transforms.consistency.estimate_noise_sigma`, the same estimate the consistency
guard uses), divided by the ground truth's intensity scale. It needs nothing the evaluation does not
see (no recorded draw), works on real scans too, and is the same number for every method of a subject.
On a noise-free LR scan the estimate is a floor set by anatomical texture, never 0 on a brain; where it
is 0 (a piecewise-constant phantom) the false-positive columns are NaN.

Columns (per subject, per contrast ``c``): ``false_positives_<c>`` (count), ``false_positive_voxels_<c>``
(voxels in them), ``false_positive_excess_<c>`` (count without the bump condition), ``fp_threshold_<c>``
(the ``3 sigma`` used, normalised units).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from nexus_monai.data.synth.lesions import LESION_RANGES, smallest_lesion_mm3

__all__ = ["FP_SIGMAS", "FP_MARGIN_VOXELS", "SMALLEST_LESION_MM3", "LARGEST_LESION_RADIUS_MM", "FP_SIGNS",
           "normal_tissue", "min_blob_voxels", "tophat_side", "false_positive_blobs"]

FP_SIGMAS = 3.0
FP_MARGIN_VOXELS = 2
SMALLEST_LESION_MM3 = smallest_lesion_mm3()
"""Volume (mm^3) of the smallest lesion the embedded generator draws (its smallest sphere)."""
LARGEST_LESION_RADIUS_MM = max(r["radius_mm"][1] for r in LESION_RANGES.values() if "radius_mm" in r)
"""Largest sphere radius (mm) the generator draws: the top-hat keeps bumps up to this size."""
FP_SIGNS = {"t1": (1, -1), "t2": (1,)}
"""Which excess signs count per contrast: bright on T2w; bright or dark on T1w."""


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    dx, dy, dz = np.meshgrid(r, r, r, indexing="ij")
    return dx**2 + dy**2 + dz**2 <= radius**2


def normal_tissue(mask: np.ndarray, any_lesion: np.ndarray, exclude: np.ndarray | None = None,
                  margin: int = FP_MARGIN_VOXELS) -> np.ndarray:
    """Bool: ``mask`` minus ``any_lesion`` (and ``exclude``) dilated by a radius-``margin`` ball."""
    away = any_lesion if exclude is None else (any_lesion | exclude)
    if away.any():
        away = ndimage.binary_dilation(away, structure=_ball(margin))
    return mask & ~away


def min_blob_voxels(voxel_mm3: float | None) -> int:
    """Smallest false-positive blob in voxels: ``ceil(SMALLEST_LESION_MM3 / voxel_mm3)``, at least 1."""
    if voxel_mm3 is None or not voxel_mm3 > 0:
        return 1
    return max(1, int(math.ceil(SMALLEST_LESION_MM3 / float(voxel_mm3) - 1e-9)))


def tophat_side(spacing_mm: float | None) -> int:
    """Side (voxels) of the top-hat's flat cube: ``2 ceil(LARGEST_LESION_RADIUS_MM / spacing) + 1``."""
    h = float(spacing_mm) if spacing_mm and spacing_mm > 0 else 1.0
    return 2 * int(math.ceil(LARGEST_LESION_RADIUS_MM / h - 1e-9)) + 1


def _tophat(v: np.ndarray, sign: int, side: int) -> np.ndarray:
    """White (sign +1: ``v - opening(v)``) or black (sign -1: ``closing(v) - v``) top-hat, flat cube ``side``."""
    if sign > 0:
        return v - ndimage.grey_opening(v, size=(side,) * 3)
    return ndimage.grey_closing(v, size=(side,) * 3) - v


def _count(hot: np.ndarray, min_voxels: int) -> tuple[int, int]:
    if not hot.any():
        return 0, 0
    labels, n = ndimage.label(hot, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = sizes >= int(min_voxels)
    return int(big.sum()), int(sizes[big].sum())


def false_positive_blobs(gt: np.ndarray, pred: np.ndarray, normal: np.ndarray, sigma: float, contrast: str,
                         min_voxels: int = 1, side: int = 3) -> dict:
    """``{"count", "voxels", "excess_count", "threshold"}`` of the false-positive blobs (module docstring).

    ``gt`` / ``pred`` ``(X, Y, Z)`` normalised intensities, ``normal`` the bool normal-tissue mask,
    ``sigma`` the noise SD in the same units (> 0), ``contrast`` ``"t1"`` or ``"t2"`` (:data:`FP_SIGNS`),
    ``side`` the top-hat cube (:func:`tophat_side`).
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"noise SD must be a finite number > 0, got {sigma}")
    threshold = FP_SIGMAS * float(sigma)
    g, p = np.asarray(gt, np.float32), np.asarray(pred, np.float32)
    excess = p - g
    count = voxels = excess_count = 0
    for sign in FP_SIGNS[contrast]:
        hot = normal & (sign * excess > threshold)
        excess_count += _count(hot, min_voxels)[0]
        if hot.any():
            hot &= (_tophat(p, sign, side) - _tophat(g, sign, side)) > threshold
        n, v = _count(hot, min_voxels)
        count += n
        voxels += v
    return {"count": count, "voxels": voxels, "excess_count": excess_count, "threshold": threshold}
