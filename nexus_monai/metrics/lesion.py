"""Lesion fidelity: does a finding that only one contrast shows survive super-resolution?

Cross-contrast SR borrows the sharper scan's edges; a lesion visible on one contrast only (e.g. a
T2w-only white-matter hyperintensity) has no edge on the other to borrow and can be smoothed away
while PSNR still rises. These metrics measure it per lesion, from a lesion instance map encoded as
in :mod:`nexus_monai.keys` (``value = class * 1000 + instance``).

Definitions (all on intensities already divided by the ground truth's scale, see
:func:`~nexus_monai.metrics.subject_row.subject_metric_row`):

* **Ring** of a lesion: its dilation by a Euclidean ball of radius :data:`RING_VOXELS` (2) voxels,
  minus the lesion, restricted to the brain mask and excluding every voxel of any lesion.
* **Contrast** of a lesion on a volume: mean over the lesion's voxels inside the brain mask minus
  mean over its ring.
* **Recovered contrast** on a contrast the lesion is visible on: contrast of the output / contrast
  of the ground truth (1 = perfect, 0 = erased, < 0 = inverted, > 1 = exaggerated).
* **Kept**: recovered contrast >= :data:`KEPT_THRESHOLD` (0.5).
* **False imprint** of a lesion visible on one contrast only, on the OTHER contrast: ``|contrast|``
  of the output there, beside ``|contrast|`` of the ground truth there (the two are in the same
  units, so "no larger than the ground truth's" can be checked per lesion and per subject).

Degenerate lesions are reported with a ``status`` and left out of every average: ``"outside
mask"`` (no voxel inside the brain mask; a lesion cut by the mask is scored on its inside part),
``"no ring"`` (no ring voxel survives the mask and the other lesions) and ``"no gt contrast on <c>"``
(``|GT contrast| < MIN_GT_CONTRAST`` on a contrast it should be visible on: a ratio would be noise;
that contrast's ratio is left out, the lesion is still scored for imprint and, if visible on both,
on the other contrast).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import ndimage

from nexus_monai.keys import (
    CONTRASTS,
    LESION_BOTH,
    LESION_CLASS_STRIDE,
    LESION_T1_ONLY,
    LESION_T2_ONLY,
    lesion_visible_only_on,
)
from nexus_monai.metrics.image_quality import as_mask, as_volume

__all__ = ["RING_VOXELS", "KEPT_THRESHOLD", "MIN_GT_CONTRAST", "LESION_PROTOCOL", "check_lesion_map",
           "lesion_ring", "lesion_contrast", "lesion_records", "lesion_fidelity_row"]

RING_VOXELS = 2
KEPT_THRESHOLD = 0.5
MIN_GT_CONTRAST = 0.02
"""Smallest |GT contrast| (in units of the GT's 99.5th brain percentile) a recovered ratio is taken of."""

LESION_PROTOCOL = (
    f"Lesion fidelity (subjects with a lesion instance map): per lesion, contrast = mean inside the lesion "
    f"minus mean in a ring around it (the lesion dilated by a Euclidean ball of radius {RING_VOXELS} voxels, "
    f"minus the lesion, restricted to the brain mask, excluding all lesions), on the normalised "
    f"intensities. Contrast recovered = contrast of the output / contrast of the ground truth on the "
    f"contrast the lesion is visible on (1 = perfect, 0 = erased); a lesion counts as kept when it "
    f"recovers >= {KEPT_THRESHOLD}. Columns lesion_contrast_<c> / lesion_kept_<c>: mean recovered contrast "
    f"and kept fraction over the lesions visible on <c> only (lesion_*_both_<c>: lesions visible on both). "
    f"False imprint imprint_<o>: mean |contrast| of the output on the other contrast <o> over the lesions "
    f"its ground truth does not show, beside imprint_<o>_gt, the ground truth's |contrast| there. Lesions "
    f"outside the brain mask, without ring voxels, or with |GT contrast| < {MIN_GT_CONTRAST} (ratio only) "
    f"are left out and counted; a lesion cut by the mask is scored on its inside part. Per-subject means "
    f"over lesions, then mean ± std over subjects."
)

_CLASSES = (LESION_T2_ONLY, LESION_T1_ONLY, LESION_BOTH)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    dx, dy, dz = np.meshgrid(r, r, r, indexing="ij")
    return dx**2 + dy**2 + dz**2 <= radius**2


def check_lesion_map(label_map, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``label_map`` as an int64 ``(X, Y, Z)`` array, or ``ValueError`` if it breaks the encoding.

    Valid values: 0, or ``class * 1000 + n`` with class in {1, 2, 3} and instance ``n`` in 1-999.
    """
    raw = as_volume(label_map, name="lesion map", dtype=np.float64)
    if shape is not None and raw.shape != tuple(shape):
        raise ValueError(f"lesion map shape {raw.shape} differs from image shape {tuple(shape)}")
    if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
        raise ValueError("lesion map has non-integer values")
    lab = raw.astype(np.int64)
    values = np.unique(lab[lab != 0])
    cls, inst = values // LESION_CLASS_STRIDE, values % LESION_CLASS_STRIDE
    bad = values[(values < 0) | ~np.isin(cls, _CLASSES) | (inst == 0)]
    if bad.size:
        raise ValueError(f"lesion map values {bad[:5].tolist()} break the encoding "
                         f"class*{LESION_CLASS_STRIDE}+instance "
                         f"(classes {list(_CLASSES)}, instances 1-{LESION_CLASS_STRIDE - 1})")
    return lab


def lesion_ring(lesion: np.ndarray, mask: np.ndarray, any_lesion: np.ndarray, voxels: int = RING_VOXELS) -> np.ndarray:
    """Bool ring: ``lesion`` dilated by a radius-``voxels`` Euclidean ball, minus ``any_lesion``, inside ``mask``."""
    return ndimage.binary_dilation(lesion, structure=_ball(voxels)) & mask & ~any_lesion


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, ring: np.ndarray) -> float:
    """Mean of ``image`` over ``lesion`` minus mean over ``ring`` (NaN if either is empty)."""
    if not lesion.any() or not ring.any():
        return math.nan
    return float(image[lesion].mean() - image[ring].mean())


def lesion_records(gt: Mapping, pred: Mapping, lesions, mask) -> list[dict]:
    """One record per lesion instance: contrasts on both volumes of both contrasts and the derived scores.

    ``gt[c]`` / ``pred[c]``: ``(X, Y, Z)`` volumes (already intensity-normalised) for ``c`` in
    ``("t1", "t2")``; ``lesions``: the instance map on the same grid; ``mask``: brain mask.
    Record keys: ``label``, ``class``, ``voxels`` (inside the mask), ``ring_voxels``, ``status``
    (``"ok"``, ``"outside mask"``, ``"no ring"``), ``gt_contrast_<c>``, ``contrast_<c>`` (output) for both
    contrasts, ``recovered_<c>`` / ``kept_<c>`` on each contrast the lesion is visible on (NaN / absent
    when ``|gt_contrast_<c>| < MIN_GT_CONTRAST``, status ``"no gt contrast on <c>"``), and for one-contrast lesions
    ``imprint`` / ``imprint_gt`` (|contrast| of output / GT on the other contrast).
    """
    g = {c: as_volume(gt[c], name=f"gt[{c}]") for c in CONTRASTS}
    shape = g[CONTRASTS[0]].shape
    p = {c: as_volume(pred[c], name=f"pred[{c}]") for c in CONTRASTS}
    for c in CONTRASTS:
        if g[c].shape != shape or p[c].shape != shape:
            raise ValueError(f"contrast {c}: gt {g[c].shape} / pred {p[c].shape} differ from {shape}")
    lab = check_lesion_map(lesions, shape)
    m = as_mask(mask, shape)
    any_lesion = lab != 0
    pad = RING_VOXELS
    records = []
    boxes = ndimage.find_objects(lab)  # index v-1 -> bounding box of value v (None if absent)
    for value in np.unique(lab[any_lesion]).tolist():
        box = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in boxes[value - 1])  # numpy clips stops
        les = (lab[box] == value)
        inside = les & m[box]
        ring = lesion_ring(les, m[box], any_lesion[box])
        cls = value // LESION_CLASS_STRIDE
        rec = {"label": value, "class": cls, "voxels": int(inside.sum()), "ring_voxels": int(ring.sum())}
        rec["status"] = "outside mask" if not inside.any() else ("no ring" if not ring.any() else "ok")
        for c in CONTRASTS:
            rec[f"gt_contrast_{c}"] = lesion_contrast(g[c][box], inside, ring)
            rec[f"contrast_{c}"] = lesion_contrast(p[c][box], inside, ring)
        if rec["status"] == "ok":
            visible = (CONTRASTS if cls == LESION_BOTH
                       else tuple(c for c in CONTRASTS if lesion_visible_only_on(c) == cls))
            for c in visible:
                gc = rec[f"gt_contrast_{c}"]
                if abs(gc) < MIN_GT_CONTRAST:
                    rec[f"recovered_{c}"], rec["status"] = math.nan, f"no gt contrast on {c}"
                else:
                    rec[f"recovered_{c}"] = rec[f"contrast_{c}"] / gc
                    # a lesion halved exactly is kept: allow float rounding of the ratio at the threshold
                    rec[f"kept_{c}"] = bool(rec[f"recovered_{c}"] >= KEPT_THRESHOLD - 1e-9)
            if cls != LESION_BOTH:
                other = next(c for c in CONTRASTS if c not in visible)
                rec["imprint"] = abs(rec[f"contrast_{other}"])
                rec["imprint_gt"] = abs(rec[f"gt_contrast_{other}"])
        records.append(rec)
    return records


def _scored(record: dict, c: str) -> bool:
    return math.isfinite(record.get(f"recovered_{c}", math.nan))


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else math.nan


def lesion_fidelity_row(gt: Mapping, pred: Mapping, lesions, mask) -> dict:
    """Per-subject lesion columns (means over the subject's scored lesions; NaN where none).

    For each contrast ``c`` with ``o`` the other: ``lesion_contrast_<c>``, ``lesion_kept_<c>``,
    ``n_lesions_<c>`` over lesions visible on ``c`` only; ``imprint_<o>`` / ``imprint_<o>_gt`` over those
    same lesions; ``lesion_contrast_both_<c>``, ``lesion_kept_both_<c>`` and ``n_lesions_both_<c>`` over
    lesions visible on both; ``n_lesions_excluded`` (degenerate lesions, see the module docstring).
    """
    records = lesion_records(gt, pred, lesions, mask)
    row: dict = {}
    for c in CONTRASTS:
        o = next(x for x in CONTRASTS if x != c)
        own = [r for r in records if r["class"] == lesion_visible_only_on(c) and _scored(r, c)]
        row[f"lesion_contrast_{c}"] = _mean(r[f"recovered_{c}"] for r in own)
        row[f"lesion_kept_{c}"] = _mean(r[f"kept_{c}"] for r in own)
        row[f"n_lesions_{c}"] = len(own)
        imprinted = [r for r in records if r["class"] == lesion_visible_only_on(c) and "imprint" in r]
        row[f"imprint_{o}"] = _mean(r["imprint"] for r in imprinted)
        row[f"imprint_{o}_gt"] = _mean(r["imprint_gt"] for r in imprinted)
    for c in CONTRASTS:
        both = [r for r in records if r["class"] == LESION_BOTH and _scored(r, c)]
        row[f"lesion_contrast_both_{c}"] = _mean(r[f"recovered_{c}"] for r in both)
        row[f"lesion_kept_both_{c}"] = _mean(r[f"kept_{c}"] for r in both)
        row[f"n_lesions_both_{c}"] = len(both)
    row["n_lesions_excluded"] = sum(r["status"] != "ok" for r in records)
    return row
