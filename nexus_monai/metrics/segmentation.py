"""Dice and HD95 on the BraTS evaluation regions TC / WT / ET (docs/evaluation_protocol.md), with MONAI's metrics.

Regions come from MONAI's :class:`~monai.transforms.ConvertToMultiChannelBasedOnBratsClasses`
(channel order TC, WT, ET; TC = labels 1|4, WT = 1|2|4, ET = 4). Dice is MONAI's
:class:`~monai.metrics.DiceMetric`; HD95 is MONAI's
:class:`~monai.metrics.HausdorffDistanceMetric` with ``percentile=95`` and the voxel ``spacing``
passed to the metric call, so it is in mm.

What MONAI 1.6.1 computes for HD95 (matched by the independent reference in the tests): the
surface of a mask is its inner boundary, ``mask & ~scipy.ndimage.binary_erosion(mask)``
(6-connected erosion; voxels on the image border count as boundary); distances are exact
Euclidean distances in mm between surface-voxel centres (nearest surface voxel of the other
mask); HD95 is ``max(q95(d(pred->gt)), q95(d(gt->pred)))`` with ``torch.quantile`` (linear
interpolation), i.e. the larger of the two directed 95th percentiles, not the 95th percentile of
the pooled distances.

What MONAI 1.6.1 returns natively when a region is empty (checked, not assumed):

============================  =======================  =========================  ===========
case                          DiceMetric (default,     DiceMetric                 HD95
                              ``ignore_empty=True``)   (``ignore_empty=False``)   (``percentile=95``)
============================  =======================  =========================  ===========
both empty                    NaN                      1.0                        NaN
prediction empty, GT not      0.0                      0.0                        NaN
GT empty, prediction not      NaN                      0.0                        NaN
============================  =======================  =========================  ===========

(With one mask empty the directed distances are all ``inf``; the plain Hausdorff distance,
``percentile=None``, is ``inf``, and ``torch.quantile`` of ``inf`` values gives NaN.) MONAI's
reductions then drop NaN silently, which would make averages over subjects depend on which cases
happen to be empty. This module never passes those native values on: every empty case gets the
explicit value of :data:`EMPTY_POLICY`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

__all__ = ["REGIONS", "BRATS_LABELS", "HD_PERCENTILE", "EMPTY_POLICY", "brats_regions",
           "fov_diagonal_mm", "dice_hd95", "summarise_segmentation"]

REGIONS = ("TC", "WT", "ET")
"""Channel order of :class:`ConvertToMultiChannelBasedOnBratsClasses` (and of every region mask here)."""

BRATS_LABELS = (0, 1, 2, 4)
"""Labels allowed in a BraTS label map (BraTS 2020/2021): background, necrotic core, edema, enhancing tumour."""

HD_PERCENTILE = 95

EMPTY_POLICY = (
    "Empty-region policy for Dice and HD95 (MONAI 1.6.1 returns NaN for HD95 whenever either mask "
    "is empty, and NaN for Dice when the ground truth is empty, which its averages then drop "
    "silently): when prediction and ground truth of a region are both empty the region is "
    "scored as perfect agreement on absence, Dice 1 and HD95 0 mm; when exactly one of them is "
    "empty the region scores Dice 0 and HD95 equal to a penalty of the diagonal of the image's "
    "field of view in mm, sqrt(sum((n_i * spacing_i)^2)), which is larger than any distance "
    "between two voxels of that image; every such one-sided case is counted (empty_cases) and "
    "named with its voxel counts (empty_detail), and both-empty regions are named there too. No "
    "case is ever dropped: means are over all subjects and all three regions (TC, WT, ET)."
)


def _dims(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def brats_regions(label):
    """Region masks ``(3, X, Y, Z)`` bool in the order :data:`REGIONS` from a BraTS label map.

    ``label``: numpy array or torch tensor (``MetaTensor`` included) of shape ``(X, Y, Z)`` or
    ``(1, X, Y, Z)`` with values in {0, 1, 2, 4} (integers or integral floats). The conversion is
    MONAI's :class:`ConvertToMultiChannelBasedOnBratsClasses` (``et_label=4``); the result has
    the input's type (numpy in, numpy out; torch in, torch out). Raises ``ValueError`` for
    another shape or labels outside {0, 1, 2, 4}.
    """
    if not isinstance(label, torch.Tensor):
        label = np.asarray(label)
    shape = _dims(label)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)):
        raise ValueError(f"label map: expected shape (X, Y, Z) or (1, X, Y, Z), got {shape}")
    if isinstance(label, torch.Tensor):
        values = torch.unique(label.detach()).cpu().numpy()
    else:
        values = np.unique(label)
    bad = [v for v in values.tolist() if v not in BRATS_LABELS]  # NaN never equals a label
    if bad:
        raise ValueError(f"label map: labels outside {{0, 1, 2, 4}}: {sorted(map(str, bad))[:10]}")
    out = ConvertToMultiChannelBasedOnBratsClasses(et_label=4)(label)
    return out.bool() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=bool)


def _as_region_masks(x, name: str) -> np.ndarray:
    """``x`` as a numpy bool ``(3, X, Y, Z)`` array; values must be 0/1 (or bool)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[0] != len(REGIONS):
        raise ValueError(f"{name}: expected region masks of shape (3, X, Y, Z) in the order "
                         f"{'/'.join(REGIONS)}, got {tuple(arr.shape)}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: region masks must be binary (bool or 0/1); "
                             f"use brats_regions() to convert a label map")
        arr = arr.astype(bool)
    return arr


def _as_spacing(spacing) -> list[float]:
    try:
        sp = [float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing: expected 3 numbers (mm), got {spacing!r}") from err
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: expected 3 positive finite voxel sizes in mm, got {spacing!r}")
    return sp


def fov_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view, ``sqrt(sum((n_i * s_i)^2))`` mm: the HD95 penalty of
    :data:`EMPTY_POLICY` (strictly larger than any distance between two voxel centres)."""
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def dice_hd95(pred, gt, spacing) -> dict:
    """Dice and HD95 (mm) per BraTS region of one subject, with the empty-mask policy applied.

    ``pred`` / ``gt``: region masks ``(3, X, Y, Z)`` in the order :data:`REGIONS` (bool or 0/1,
    numpy or torch; e.g. from :func:`brats_regions`) on the same grid. ``spacing``: the voxel size
    ``(sx, sy, sz)`` in mm of that grid, passed to MONAI's ``HausdorffDistanceMetric`` call so
    HD95 is in mm (Dice does not depend on it).

    Regions where both masks are non-empty get MONAI's values (``DiceMetric``;
    ``HausdorffDistanceMetric(percentile=95)``, see the module docstring for the surface
    definition). Empty regions never get MONAI's native values (1.6.1: Dice NaN when the GT is
    empty, 0 when only the prediction is; HD95 NaN whenever either is empty) but those of
    :data:`EMPTY_POLICY`:

    * both empty: Dice 1, HD95 0 mm (named in ``empty_detail``, not counted);
    * exactly one empty: Dice 0, HD95 = :func:`fov_diagonal_mm` of the grid; counted in
      ``empty_cases`` and named in ``empty_detail``, e.g. ``"ET: prediction empty, GT 37 voxels"``.

    Returns ``{"dice_TC", "dice_WT", "dice_ET", "hd95_TC", "hd95_WT", "hd95_ET", "dice_mean",
    "hd95_mean"}`` (floats, means over the three regions) plus ``"empty_cases"`` (int) and
    ``"empty_detail"`` (``"; "``-joined, ``""`` when no region is empty). Raises ``ValueError``
    when shapes differ, masks are not ``(3, X, Y, Z)`` binary, or ``spacing`` is not 3 positive
    numbers.
    """
    p = _as_region_masks(pred, "pred")
    g = _as_region_masks(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    sp = _as_spacing(spacing)
    penalty = fov_diagonal_mm(p.shape[1:], sp)

    p_t = torch.from_numpy(p).float()[None]  # (1, 3, X, Y, Z)
    g_t = torch.from_numpy(g).float()[None]
    n_pred = p.reshape(len(REGIONS), -1).sum(axis=1)
    n_gt = g.reshape(len(REGIONS), -1).sum(axis=1)

    dice_native = DiceMetric(include_background=True, reduction="none")(p_t, g_t)[0]
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=HD_PERCENTILE, reduction="none")

    row: dict = {}
    details: list[str] = []
    empty_cases = 0
    for c, region in enumerate(REGIONS):
        np_, ng = int(n_pred[c]), int(n_gt[c])
        if np_ == 0 and ng == 0:
            dice, hd = 1.0, 0.0
            details.append(f"{region}: both empty")
        elif np_ == 0 or ng == 0:
            dice, hd = 0.0, penalty
            empty_cases += 1
            details.append(f"{region}: prediction empty, GT {ng} voxels" if np_ == 0
                           else f"{region}: GT empty, prediction {np_} voxels")
        else:
            dice = float(dice_native[c])
            with warnings.catch_warnings():  # MONAI calls its own deprecated argument internally
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                hd = float(hd_metric(p_t[:, c:c + 1], g_t[:, c:c + 1], spacing=sp)[0, 0])
            if not (math.isfinite(dice) and math.isfinite(hd)):
                raise RuntimeError(f"{region}: MONAI returned Dice {dice}, HD95 {hd} for non-empty masks")
        row[f"dice_{region}"] = dice
        row[f"hd95_{region}"] = hd
    row["dice_mean"] = float(np.mean([row[f"dice_{r}"] for r in REGIONS]))
    row["hd95_mean"] = float(np.mean([row[f"hd95_{r}"] for r in REGIONS]))
    row["empty_cases"] = empty_cases
    row["empty_detail"] = "; ".join(details)
    return row


_METRIC_KEYS = tuple(f"{m}_{r}" for m in ("dice", "hd95") for r in (*REGIONS, "mean"))


def summarise_segmentation(rows: list[dict]) -> dict:
    """Mean over subjects of every Dice/HD95 key of :func:`dice_hd95` rows, plus totals.

    Returns ``{key: mean}`` for ``dice_TC`` … ``hd95_mean``, ``{key}_std`` (population std,
    ``ddof=0``, as in the other tables), ``"empty_cases"`` (total over subjects, int) and
    ``"n_subjects"``. Plain means: a NaN in a row (which :func:`dice_hd95` never produces) shows
    up as NaN rather than being dropped. Raises ``ValueError`` on an empty list or a row missing a
    key.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("summarise_segmentation: no rows")
    out: dict = {}
    for key in _METRIC_KEYS:
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"summarise_segmentation: row {missing[0]} has no '{key}'")
        vals = np.array([float(r[key]) for r in rows], dtype=np.float64)
        out[key] = float(vals.mean())
        out[f"{key}_std"] = float(vals.std(ddof=0))
    out["empty_cases"] = int(sum(int(r.get("empty_cases", 0)) for r in rows))
    out["n_subjects"] = len(rows)
    return out
