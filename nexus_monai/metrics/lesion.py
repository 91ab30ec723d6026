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

**By size** (when the voxel volume and the slab thicknesses are given): a lesion's diameter is the
equivalent-sphere diameter ``d = (6 V / pi)^(1/3)`` of its whole instance (``V`` = voxel count x voxel
volume, mm^3); on each contrast ``c`` it is visible on, ``d`` is divided by the slab thickness of ``c``
(the LR scan's spacing along its thick axis, = factor x HR spacing for the simulated protocols) and
binned by :data:`SIZE_BINS`: ``small`` (d < 0.75 slab: mostly inside one slab, its contrast partly
averaged away by the acquisition), ``slab`` (0.75-1.5 slab: about one slab) and ``large``
(d > 1.5 slab: spans two slabs or more, physically recoverable). Columns
``lesion_contrast_<c>_<bin>``, ``lesion_kept_<c>_<bin>``, ``n_lesions_<c>_<bin>`` (one-contrast lesions)
and ``lesion_contrast_both_<c>_<bin>``, ``lesion_kept_both_<c>_<bin>``, ``n_lesions_both_<c>_<bin>``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from scipy import ndimage

from nexus_monai.geometry import as_affine, spacing
from nexus_monai.keys import (
    CONTRASTS,
    LESION_BOTH,
    LESION_CLASS_STRIDE,
    LESION_T1_ONLY,
    LESION_T2_ONLY,
    lesion_visible_only_on,
)
from nexus_monai.metrics.image_quality import as_mask, as_volume

__all__ = ["RING_VOXELS", "KEPT_THRESHOLD", "MIN_GT_CONTRAST", "SIZE_BINS", "SIZE_BIN_LABELS", "LESION_PROTOCOL",
           "check_lesion_map",
           "lesion_ring", "lesion_contrast", "lesion_records", "lesion_fidelity_row", "lesion_geometry",
           "equivalent_diameter_mm", "size_bin", "size_columns"]

RING_VOXELS = 2
KEPT_THRESHOLD = 0.5
MIN_GT_CONTRAST = 0.02
"""Smallest |GT contrast| (in units of the GT's 99.5th brain percentile) a recovered ratio is taken of."""
SIZE_BINS = (("small", 0.0, 0.75), ("slab", 0.75, 1.5), ("large", 1.5, math.inf))
"""``(name, lower, upper)`` of lesion diameter / slab thickness; a bin holds ``lower <= d / slab < upper``."""
SIZE_BIN_LABELS = {name: (f"d < {hi:g}" if lo == 0 else f"d ≥ {lo:g}" if hi == math.inf else f"{lo:g} ≤ d < {hi:g}")
                   + " slab" for name, lo, hi in SIZE_BINS}
"""Table header of each size bin (``d``: lesion diameter / slab thickness)."""

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
    f"over lesions, then mean ± std over subjects. By size (columns <column>_<bin>): lesion diameter = "
    f"equivalent-sphere diameter (6 V / pi)^(1/3) of the whole instance (V in mm^3) divided by the slab "
    f"thickness of the contrast that shows it (the LR scan's spacing along its thick axis, factor x HR "
    f"spacing); bins " + ", ".join(f"{name} {label}" for name, label in SIZE_BIN_LABELS.items()) + "."
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


def equivalent_diameter_mm(voxels: int, voxel_mm3: float) -> float:
    """Diameter (mm) of the sphere whose volume is ``voxels * voxel_mm3`` mm^3: ``(6 V / pi)^(1/3)``."""
    return float((6.0 * voxels * voxel_mm3 / math.pi) ** (1.0 / 3.0))


def size_bin(slabs: float) -> str | None:
    """Name of the :data:`SIZE_BINS` bin of ``slabs`` (diameter / slab thickness); None if not finite."""
    if not math.isfinite(slabs):
        return None
    return next(name for name, lo, hi in SIZE_BINS if lo <= slabs < hi)


def lesion_geometry(lr_affines: Mapping, hr_affine) -> dict:
    """``{"voxel_mm3", "slab_mm": {c: mm}}`` for :func:`lesion_fidelity_row` from the scans' affines.

    ``lr_affines[c]`` / ``hr_affine``: 4x4 affines or MetaTensors (their affine is used).
    ``voxel_mm3``: volume of one voxel of the HR grid the lesion map lies on (``|det|`` of its 3x3 part).
    ``slab_mm[c]``: slab thickness of contrast ``c``, the LR scan's largest voxel spacing (its thick axis:
    factor x HR spacing for a simulated thick-slice acquisition).
    """
    voxel = float(abs(torch.linalg.det(as_affine(hr_affine).reshape(-1, 4, 4)[0, :3, :3])))
    return {"voxel_mm3": voxel, "slab_mm": {c: float(spacing(lr_affines[c]).reshape(-1, 3)[0].max())
                                            for c in lr_affines}}


def lesion_records(gt: Mapping, pred: Mapping, lesions, mask, voxel_mm3: float | None = None,
                   slab_mm: Mapping[str, float] | None = None) -> list[dict]:
    """One record per lesion instance: contrasts on both volumes of both contrasts and the derived scores.

    ``gt[c]`` / ``pred[c]``: ``(X, Y, Z)`` volumes (already intensity-normalised) for ``c`` in
    ``("t1", "t2")``; ``lesions``: the instance map on the same grid; ``mask``: brain mask.
    Record keys: ``label``, ``class``, ``voxels`` (inside the mask), ``ring_voxels``, ``status``
    (``"ok"``, ``"outside mask"``, ``"no ring"``), ``gt_contrast_<c>``, ``contrast_<c>`` (output) for both
    contrasts, ``recovered_<c>`` / ``kept_<c>`` on each contrast the lesion is visible on (NaN / absent
    when ``|gt_contrast_<c>| < MIN_GT_CONTRAST``, status ``"no gt contrast on <c>"``), and for one-contrast lesions
    ``imprint`` / ``imprint_gt`` (|contrast| of output / GT on the other contrast).
    With ``voxel_mm3`` (HR voxel volume) also ``diameter_mm`` (equivalent sphere of the whole instance),
    and with ``slab_mm`` (``{c: slab thickness in mm}``) ``slabs_<c>`` (diameter / slab of ``c``).
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
        if voxel_mm3 is not None:
            rec["diameter_mm"] = equivalent_diameter_mm(int(les.sum()), voxel_mm3)
            for c, slab in (slab_mm or {}).items():
                rec[f"slabs_{c}"] = rec["diameter_mm"] / float(slab)
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


def size_columns(contrasts=CONTRASTS) -> list[str]:
    """Names of the by-size columns :func:`lesion_fidelity_row` adds (see the module docstring)."""
    return [f"{stem}_{c}_{name}" for stem in ("lesion_contrast", "lesion_kept", "n_lesions",
                                              "lesion_contrast_both", "lesion_kept_both", "n_lesions_both")
            for c in contrasts for name, _, _ in SIZE_BINS]


def _size_row(records: list[dict]) -> dict:
    row: dict = {}
    for c in CONTRASTS:
        for part, cls in (("", lesion_visible_only_on(c)), ("_both", LESION_BOTH)):
            scored = [r for r in records if r["class"] == cls and _scored(r, c)]
            for name, _, _ in SIZE_BINS:
                hit = [r for r in scored if size_bin(r.get(f"slabs_{c}", math.nan)) == name]
                row[f"lesion_contrast{part}_{c}_{name}"] = _mean(r[f"recovered_{c}"] for r in hit)
                row[f"lesion_kept{part}_{c}_{name}"] = _mean(r[f"kept_{c}"] for r in hit)
                row[f"n_lesions{part}_{c}_{name}"] = len(hit)
    return row


def lesion_fidelity_row(gt: Mapping, pred: Mapping, lesions, mask, voxel_mm3: float | None = None,
                        slab_mm: Mapping[str, float] | None = None) -> dict:
    """Per-subject lesion columns (means over the subject's scored lesions; NaN where none).

    For each contrast ``c`` with ``o`` the other: ``lesion_contrast_<c>``, ``lesion_kept_<c>``,
    ``n_lesions_<c>`` over lesions visible on ``c`` only; ``imprint_<o>`` / ``imprint_<o>_gt`` over those
    same lesions; ``lesion_contrast_both_<c>``, ``lesion_kept_both_<c>`` and ``n_lesions_both_<c>`` over
    lesions visible on both; ``n_lesions_excluded`` (degenerate lesions, see the module docstring).
    With ``voxel_mm3`` and ``slab_mm`` for both contrasts (e.g. from :func:`lesion_geometry`) also the
    by-size columns :func:`size_columns` (bins :data:`SIZE_BINS` of diameter / slab thickness).
    """
    by_size = voxel_mm3 is not None and slab_mm is not None
    if by_size and set(slab_mm) != set(CONTRASTS):
        raise ValueError(f"slab_mm needs the slab thickness of {CONTRASTS}, got {sorted(slab_mm)}")
    if by_size and not (voxel_mm3 > 0 and all(float(v) > 0 for v in slab_mm.values())):
        raise ValueError(f"voxel volume and slab thicknesses must be > 0, got {voxel_mm3} and {dict(slab_mm)}")
    records = lesion_records(gt, pred, lesions, mask, voxel_mm3 if by_size else None, slab_mm if by_size else None)
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
    if by_size:
        row.update(_size_row(records))
    return row
