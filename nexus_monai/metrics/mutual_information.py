"""Histogram mutual information between two volumes and the ε_MI errors of SSMCSR (McGinnis et al., MICCAI 2023).

MI (nats) is estimated from a joint histogram of the two volumes' values inside the brain mask,
``bins`` equal-width bins per image spanning that image's own min..max inside the mask (the
maximum falls in the last bin; a constant image has one occupied bin)::

    MI(a, b) = sum_xy p(x, y) log(p(x, y) / (p(x) p(y)))

Because the bin edges follow each image's own range, MI is unchanged by a positive affine
intensity change of either image (up to values landing exactly on a bin edge).
"""

from __future__ import annotations

import numpy as np

from nexus_monai.metrics.image_quality import as_mask, as_volume

__all__ = ["bin_labels", "joint_histogram", "mutual_information", "mi_errors"]


def bin_labels(values: np.ndarray, bins: int = 32) -> np.ndarray:
    """Integer bin index in ``[0, bins)`` of each value for ``bins`` equal-width bins over
    ``values.min()..values.max()``; the maximum goes to the last bin."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.int64)
    idx = np.floor((v - lo) / (hi - lo) * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def joint_histogram(a, b, mask=None, bins: int = 32) -> np.ndarray:
    """``(bins, bins)`` voxel counts of (bin of ``a``, bin of ``b``) over the mask (all voxels if None)."""
    x, y = as_volume(a, name="a"), as_volume(b, name="b")
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if mask is not None:
        m = as_mask(mask, x.shape)
        x, y = x[m], y[m]
    la, lb = bin_labels(x, bins), bin_labels(y, bins)
    return np.bincount(la * bins + lb, minlength=bins * bins).reshape(bins, bins)


def mutual_information(a, b, mask=None, bins: int = 32) -> float:
    """Mutual information (natural log, nats) of two same-shape volumes inside ``mask``."""
    counts = joint_histogram(a, b, mask, bins).astype(np.float64)
    p_xy = counts / counts.sum()
    p_x = p_xy.sum(axis=1, keepdims=True)
    p_y = p_xy.sum(axis=0, keepdims=True)
    nz = p_xy > 0
    return float(np.sum(p_xy[nz] * np.log(p_xy[nz] / (p_x * p_y)[nz])))


def mi_errors(gt1, gt2, pred1, pred2, mask, bins: int = 32) -> dict[str, float]:
    """ε_MI of SSMCSR for one subject (contrast 1 and 2, all volumes the same shape).

    - ``eps_mi_1 = |MI(pred1, gt2) - MI(gt1, gt2)|``
    - ``eps_mi_2 = |MI(pred2, gt1) - MI(gt2, gt1)|``
    - ``eps_mi_joint = |MI(pred1, pred2) - MI(gt1, gt2)|`` (the paper's ε̂_MI)

    The paper averages these over subjects; this returns the per-subject terms.
    """
    mi_gt = mutual_information(gt1, gt2, mask, bins)
    return {
        "eps_mi_1": abs(mutual_information(pred1, gt2, mask, bins) - mi_gt),
        "eps_mi_2": abs(mutual_information(pred2, gt1, mask, bins) - mi_gt),
        "eps_mi_joint": abs(mutual_information(pred1, pred2, mask, bins) - mi_gt),
    }
