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
* **Recovered contrast** on a contrast the lesion is visible on: ratio = contrast of the output /
  contrast of the ground truth (1 = perfect, 0 = erased, < 0 = inverted, > 1 = exaggerated). Metric v2
  averages it **capped at 1** (``min(ratio, 1)``): painting a lesion stronger than the scan shows earns
  nothing. Beside it: the mean ``|ratio - 1|`` (error both ways), the share of **exaggerated** lesions
  (ratio > :data:`EXAGGERATED` = 1.25) and the **ring bias** ``(ring mean of output - ring mean of GT) /
  GT contrast``: since ``ratio - 1 = lesion bias - ring bias`` (both relative to the GT contrast), a dark
  halo that inflates the ratio shows as a negative ring bias. The uncapped mean (metric v1) is kept one
  release as ``lesion_contrast_uncapped_<c>``.
* **Kept**: recovered contrast >= :data:`KEPT_THRESHOLD` (0.5).
* **Within-slab part** (with the LR headers): the contrast of ``(I - A^+ A) x`` under the header's
  nominal operator (:mod:`nexus_monai.metrics.lesion_within_slab`) / the GT contrast, for the output and
  for the ground truth itself (what a perfect method would have there), overall and by size bin.
* **False imprint** of a lesion visible on one contrast only, on the OTHER contrast: ``|contrast|``
  of the output there, beside ``|contrast|`` of the ground truth there (v1; it has a noise and
  partial-volume floor; the counterfactual imprint, :mod:`nexus_monai.metrics.lesion_counterfactual`,
  does not).
* **False positives** (with the LR noise SDs): :mod:`nexus_monai.metrics.lesion_false_positives`.

Degenerate lesions are reported with a ``status`` and left out of every average: ``"outside
mask"`` (no voxel inside the brain mask; a lesion cut by the mask is scored on its inside part),
``"no ring"`` (no ring voxel survives the mask and the other lesions) and ``"no gt contrast on <c>"``
(``|GT contrast| < MIN_GT_CONTRAST`` on a contrast it should be visible on: a ratio would be noise;
that contrast's ratio is left out, the lesion is still scored for imprint and, if visible on both,
on the other contrast).

**By size** (when the voxel volume and the slab thicknesses are given): with the thick-axis direction
of each contrast (``thick_dir``, from :func:`lesion_geometry`) a lesion's size on contrast ``c`` is its
**extent across the slabs**: the length of its voxels' projection onto the thick axis of ``c`` (max - min
of the voxel centres' projections plus one voxel's projected width, mm) divided by the slab thickness of
``c`` (the LR scan's spacing along its thick axis); without ``thick_dir`` (v1) the equivalent-sphere
diameter ``d = (6 V / pi)^(1/3)`` of the instance divided by the slab thickness. Bins :data:`SIZE_BINS`:
``small`` (< 0.75 slab: inside one slab, its contrast partly averaged away by the acquisition), ``slab``
(0.75-1.5) and ``large`` (>= 1.5 slab: spans two slabs or more, physically recoverable). Columns
``<stem>_<c>_<bin>`` for the stems of :func:`size_columns` and ``n_lesions_<c>_<bin>``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import numpy as np
import torch
from scipy import ndimage

from nexus_monai.geometry import TargetGrid, as_affine, spacing
from nexus_monai.keys import (
    CONTRASTS,
    LESION_BOTH,
    LESION_CLASS_STRIDE,
    LESION_T1_ONLY,
    LESION_T2_ONLY,
    lesion_visible_only_on,
)
from nexus_monai.metrics.image_quality import as_mask, as_volume
from nexus_monai.metrics.lesion_false_positives import (
    FP_MARGIN_VOXELS,
    FP_SIGMAS,
    SMALLEST_LESION_MM3,
    false_positive_blobs,
    min_blob_voxels,
    normal_tissue,
    tophat_side,
)
from nexus_monai.metrics.lesion_within_slab import within_slab_operator

__all__ = ["RING_VOXELS", "KEPT_THRESHOLD", "EXAGGERATED", "MIN_GT_CONTRAST", "SIZE_BINS", "SIZE_BIN_LABELS",
           "LESION_PROTOCOL", "METRIC_VERSION", "check_lesion_map",
           "lesion_ring", "lesion_contrast", "lesion_records", "lesion_fidelity_row", "lesion_geometry",
           "equivalent_diameter_mm", "thick_extent_mm", "size_bin", "size_columns", "SIZE_STEMS"]

METRIC_VERSION = 2
RING_VOXELS = 2
KEPT_THRESHOLD = 0.5
EXAGGERATED = 1.25
"""A lesion whose recovered ratio is above this is counted as exaggerated."""
MIN_GT_CONTRAST = 0.02
"""Smallest |GT contrast| (in units of the GT's 99.5th brain percentile) a recovered ratio is taken of."""
SIZE_BINS = (("small", 0.0, 0.75), ("slab", 0.75, 1.5), ("large", 1.5, math.inf))
"""``(name, lower, upper)`` of lesion size / slab thickness; a bin holds ``lower <= size / slab < upper``."""
SIZE_BIN_LABELS = {name: (f"d < {hi:g}" if lo == 0 else f"d ≥ {lo:g}" if hi == math.inf else f"{lo:g} ≤ d < {hi:g}")
                   + " slab" for name, lo, hi in SIZE_BINS}
"""Table header of each size bin (``d``: lesion extent across the slabs / slab thickness)."""
SIZE_STEMS = ("lesion_contrast", "lesion_kept", "n_lesions", "lesion_exaggerated", "within_slab", "within_slab_gt",
              "lesion_contrast_both", "lesion_kept_both", "n_lesions_both")
"""Stems of the by-size columns ``<stem>_<c>_<bin>``."""

LESION_PROTOCOL = (
    f"Lesion fidelity v{METRIC_VERSION} (subjects with a lesion instance map): per lesion, contrast = mean inside "
    f"the lesion minus mean in a ring around it (the lesion dilated by a Euclidean ball of radius {RING_VOXELS} "
    f"voxels, minus the lesion, restricted to the brain mask, excluding all lesions), on the normalised "
    f"intensities; ratio = contrast of the output / contrast of the ground truth on the contrast the lesion is "
    f"visible on. lesion_contrast_<c> (contrast recovered) = mean over the lesions visible on <c> only of the "
    f"ratio CAPPED AT 1 (an exaggerated lesion earns nothing; the uncapped mean of v1 is kept one release as "
    f"lesion_contrast_uncapped_<c>); beside it lesion_error_<c> = mean |ratio - 1|, lesion_exaggerated_<c> = "
    f"share of lesions with ratio > {EXAGGERATED}, ring_bias_<c> = mean (ring mean of output - ring mean of GT) "
    f"/ GT contrast (ratio - 1 = lesion bias - ring bias: a dark halo shows here), lesion_kept_<c> = share "
    f"with ratio >= {KEPT_THRESHOLD}. within_slab_<c>: mean contrast of (I - A^+ A) x / GT contrast, A the "
    f"LR scan's nominal operator from its header (Gaussian profile, FWHM = slab), for the output and "
    f"(within_slab_<c>_gt) the ground truth. False positives false_positives_<c>: 26-connected blobs of at "
    f"least the smallest lesion volume the generator makes ({SMALLEST_LESION_MM3:.2f} mm^3, in HR voxels "
    f"rounded up) in normal tissue (brain mask minus the lesions and the tumour labels dilated by "
    f"{FP_MARGIN_VOXELS} voxels) where output - GT > {FP_SIGMAS:g} sigma (bright; on T1w also < -{FP_SIGMAS:g} "
    f"sigma, dark) and the output's top-hat (bumps up to the largest lesion) exceeds the GT's by as much "
    f"(false_positive_excess_<c>: without that condition), sigma the noise SD of that contrast's LR scan "
    f"estimated from the scan (robust MAD of in-plane neighbour differences) over the GT scale; counted per "
    f"subject. Imprint (v1) imprint_<o>: mean "
    f"|contrast| of the output on the other contrast <o> over the lesions its ground truth does not show, "
    f"beside imprint_<o>_gt; counterfactual imprint imprint_cf_<o> (when run): the other contrast's output "
    f"difference at the lesion between renders with and without that lesion class, / the lesion's own GT "
    f"contrast. Lesions outside the brain mask, without ring voxels, or with |GT contrast| < "
    f"{MIN_GT_CONTRAST} (ratio only) are left out and counted; a lesion cut by the mask is scored on its "
    f"inside part. Per-subject means over lesions, then mean ± std over subjects. By size (columns "
    f"<column>_<bin>): the lesion's extent across the slabs of the contrast that shows it (projection of its "
    f"voxels onto the LR scan's thick axis, mm) / that slab thickness; bins "
    + ", ".join(f"{name} {label}" for name, label in SIZE_BIN_LABELS.items()) + "; n per bin reported."
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


def thick_extent_mm(indices: np.ndarray, hr_affine, direction) -> float:
    """Extent (mm) of voxels ``indices`` ``(N, 3)`` of the grid ``hr_affine`` along the unit world ``direction``:
    max - min of the voxel centres' projections plus the projected width of one voxel (``sum_j |u . a_j|``)."""
    a = as_affine(hr_affine).numpy()[:3, :3]
    u = np.asarray(direction, np.float64)
    u = u / np.linalg.norm(u)
    proj = np.asarray(indices, np.float64) @ (a.T @ u)
    return float(proj.max() - proj.min() + np.abs(a.T @ u).sum())


def size_bin(slabs: float) -> str | None:
    """Name of the :data:`SIZE_BINS` bin of ``slabs`` (size / slab thickness); None if not finite."""
    if not math.isfinite(slabs):
        return None
    return next(name for name, lo, hi in SIZE_BINS if lo <= slabs < hi)


def lesion_geometry(lr: Mapping, hr_affine) -> dict:
    """What :func:`lesion_fidelity_row` needs from the LR scans beyond the volumes, from the scans themselves.

    ``lr[c]``: the LR scan of contrast ``c`` as a MetaTensor ``(1, x, y, z)`` (or a bare 4x4 affine: then
    only the size keys); ``hr_affine``: the affine of the HR grid the lesion map lies on. Returns
    ``voxel_mm3`` (``|det|`` of the HR affine's 3x3 part), ``slab_mm[c]`` (the LR scan's largest voxel
    spacing, its thick axis), ``thick_dir[c]`` (unit world vector of that axis), ``hr_affine`` (4x4 list)
    and, for MetaTensor scans, ``lr_grids[c] = (shape, affine)`` (for the within-slab part: header only)
    and ``lr_noise_sd[c]`` (the scan's noise SD estimated from its voxels, raw units; false positives).
    """
    from nexus_monai.transforms.consistency import estimate_noise_sigma

    hr = as_affine(hr_affine).reshape(-1, 4, 4)[0]
    out: dict = {"voxel_mm3": float(abs(torch.linalg.det(hr[:3, :3]))), "slab_mm": {}, "thick_dir": {},
                 "hr_affine": hr.tolist()}
    for c, scan in lr.items():
        affine = as_affine(scan).reshape(-1, 4, 4)[0]
        sp = spacing(affine)
        axis = int(torch.argmax(sp))
        out["slab_mm"][c] = float(sp[axis])
        out["thick_dir"][c] = (affine[:3, axis] / sp[axis]).tolist()
        if isinstance(scan, torch.Tensor) and scan.ndim >= 3 and hasattr(scan, "affine"):
            out.setdefault("lr_grids", {})[c] = (tuple(int(v) for v in scan.shape[-3:]), affine.tolist())
            out.setdefault("lr_noise_sd", {})[c] = float(estimate_noise_sigma(scan))
    return out


def lesion_records(gt: Mapping, pred: Mapping, lesions, mask, voxel_mm3: float | None = None,
                   slab_mm: Mapping[str, float] | None = None, thick_dir: Mapping | None = None, hr_affine=None,
                   within: Mapping | None = None) -> list[dict]:
    """One record per lesion instance: contrasts on both volumes of both contrasts and the derived scores.

    ``gt[c]`` / ``pred[c]``: ``(X, Y, Z)`` volumes (already intensity-normalised) for ``c`` in
    ``("t1", "t2")``; ``lesions``: the instance map on the same grid; ``mask``: brain mask.
    Record keys: ``label``, ``class``, ``voxels`` (inside the mask), ``ring_voxels``, ``status``
    (``"ok"``, ``"outside mask"``, ``"no ring"``), ``gt_contrast_<c>``, ``contrast_<c>`` (output) for both
    contrasts, and on each contrast the lesion is visible on ``recovered_<c>`` (the uncapped ratio),
    ``capped_<c>``, ``exaggerated_<c>``, ``ring_bias_<c>``, ``kept_<c>`` (absent when ``|gt_contrast_<c>| <
    MIN_GT_CONTRAST``, status ``"no gt contrast on <c>"``); for one-contrast lesions ``imprint`` /
    ``imprint_gt`` (|contrast| of output / GT on the other contrast). With ``within`` (``{c: (within-slab
    part of pred, of gt)}``) also ``within_slab_<c>`` / ``within_slab_gt_<c>``. With ``voxel_mm3`` (HR voxel
    volume) also ``diameter_mm``, and with ``slab_mm`` ``slabs_<c>``: the extent along ``thick_dir[c]``
    (needs ``hr_affine``) or, without ``thick_dir``, the diameter, divided by the slab of ``c``.
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
                if thick_dir is not None and hr_affine is not None:
                    idx = np.argwhere(les) + np.array([s.start for s in box])
                    rec[f"extent_mm_{c}"] = thick_extent_mm(idx, hr_affine, thick_dir[c])
                    rec[f"slabs_{c}"] = rec[f"extent_mm_{c}"] / float(slab)
                else:
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
                    continue
                ratio = rec[f"contrast_{c}"] / gc
                rec[f"recovered_{c}"] = ratio
                rec[f"capped_{c}"] = min(ratio, 1.0)
                rec[f"exaggerated_{c}"] = bool(ratio > EXAGGERATED)
                rec[f"ring_bias_{c}"] = float(p[c][box][ring].mean() - g[c][box][ring].mean()) / gc
                # a lesion halved exactly is kept: allow float rounding of the ratio at the threshold
                rec[f"kept_{c}"] = bool(ratio >= KEPT_THRESHOLD - 1e-9)
                if within is not None and c in within:
                    w_pred, w_gt = within[c]
                    rec[f"within_slab_{c}"] = lesion_contrast(w_pred[box], inside, ring) / gc
                    rec[f"within_slab_gt_{c}"] = lesion_contrast(w_gt[box], inside, ring) / gc
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


def size_columns(contrasts=CONTRASTS, within: bool = False) -> list[str]:
    """Names of the by-size columns :func:`lesion_fidelity_row` adds (see the module docstring); with
    ``within`` also the within-slab ones (present when the LR headers are given)."""
    return [f"{stem}_{c}_{name}" for stem in SIZE_STEMS if within or not stem.startswith("within_slab")
            for c in contrasts for name, _, _ in SIZE_BINS]


def _ratio_columns(row: dict, records: list[dict], c: str, suffix: str = "", part: str = "") -> None:
    """The per-lesion ratio summaries of ``records`` (already scored on ``c``) into ``row``."""
    row[f"lesion_contrast{part}_{c}{suffix}"] = _mean(r[f"capped_{c}"] for r in records)
    row[f"lesion_kept{part}_{c}{suffix}"] = _mean(r[f"kept_{c}"] for r in records)
    row[f"n_lesions{part}_{c}{suffix}"] = len(records)
    if part:
        return
    row[f"lesion_exaggerated_{c}{suffix}"] = _mean(r[f"exaggerated_{c}"] for r in records)
    if any(f"within_slab_{c}" in r for r in records) or (records == [] and suffix):
        row[f"within_slab_{c}{suffix}"] = _mean(r.get(f"within_slab_{c}") for r in records)
        row[f"within_slab_gt_{c}{suffix}"] = _mean(r.get(f"within_slab_gt_{c}") for r in records)


def _size_row(records: list[dict], within: bool) -> dict:
    row: dict = {}
    for c in CONTRASTS:
        for part, cls in (("", lesion_visible_only_on(c)), ("_both", LESION_BOTH)):
            scored = [r for r in records if r["class"] == cls and _scored(r, c)]
            for name, _, _ in SIZE_BINS:
                hit = [r for r in scored if size_bin(r.get(f"slabs_{c}", math.nan)) == name]
                _ratio_columns(row, hit, c, f"_{name}", part)
                if not within:
                    row.pop(f"within_slab_{c}_{name}", None)
                    row.pop(f"within_slab_gt_{c}_{name}", None)
    return row


_GT_WITHIN: dict = {}  # (contrast, header, content hash of the GT) -> its within-slab part; the last few only


def _within_parts(gt: Mapping, pred: Mapping, lr_grids: Mapping, hr_affine) -> dict:
    """``{c: (within-slab part of pred[c], of gt[c])}`` as numpy arrays on the HR grid (the GT's computed once
    per subject and header: every method of a subject is scored against the same GT)."""
    out = {}
    for c in CONTRASTS:
        g = np.ascontiguousarray(as_volume(gt[c], name=f"gt[{c}]"), np.float32)
        op = within_slab_operator(lr_grids[c][0], lr_grids[c][1], TargetGrid(g.shape, hr_affine))
        key = (c, repr(lr_grids[c]), repr(hr_affine), hashlib.sha1(g.tobytes()).hexdigest())
        if key not in _GT_WITHIN:
            if len(_GT_WITHIN) >= 4:
                _GT_WITHIN.pop(next(iter(_GT_WITHIN)))
            _GT_WITHIN[key] = op(torch.from_numpy(g)).numpy()
        p = np.ascontiguousarray(as_volume(pred[c], name=f"pred[{c}]"), np.float32)
        out[c] = (op(torch.from_numpy(p)).numpy(), _GT_WITHIN[key])
    return out


def lesion_fidelity_row(gt: Mapping, pred: Mapping, lesions, mask, voxel_mm3: float | None = None,
                        slab_mm: Mapping[str, float] | None = None, thick_dir: Mapping | None = None,
                        hr_affine=None, lr_grids: Mapping | None = None, lr_noise_sd: Mapping | None = None,
                        scales: Mapping[str, float] | None = None, exclude=None) -> dict:
    """Per-subject lesion columns (means over the subject's scored lesions; NaN where none).

    For each contrast ``c`` with ``o`` the other, over the lesions visible on ``c`` only:
    ``lesion_contrast_<c>`` (ratio capped at 1), ``lesion_contrast_uncapped_<c>`` (v1), ``lesion_error_<c>``
    (mean ``|ratio - 1|``), ``lesion_exaggerated_<c>``, ``ring_bias_<c>``, ``lesion_kept_<c>``,
    ``n_lesions_<c>``, ``imprint_<o>`` / ``imprint_<o>_gt``; over lesions visible on both
    ``lesion_contrast_both_<c>`` (capped), ``lesion_kept_both_<c>``, ``n_lesions_both_<c>``; and
    ``n_lesions_excluded``. Keywords from :func:`lesion_geometry`: ``voxel_mm3`` + ``slab_mm`` (+
    ``thick_dir`` + ``hr_affine``) add the by-size columns (:func:`size_columns`); ``lr_grids`` + ``hr_affine``
    the within-slab columns ``within_slab_<c>``, ``within_slab_<c>_gt`` (and by size); ``lr_noise_sd``
    (raw units, divided by ``scales[c]``, the GT intensity scale the volumes were divided by; 1 if not
    given) the false-positive columns ``false_positives_<c>``, ``false_positive_voxels_<c>``,
    ``fp_threshold_<c>``. ``exclude``: bool mask kept out of normal tissue (e.g. the tumour labels).
    """
    by_size = voxel_mm3 is not None and slab_mm is not None
    if by_size and set(slab_mm) != set(CONTRASTS):
        raise ValueError(f"slab_mm needs the slab thickness of {CONTRASTS}, got {sorted(slab_mm)}")
    if by_size and not (voxel_mm3 > 0 and all(float(v) > 0 for v in slab_mm.values())):
        raise ValueError(f"voxel volume and slab thicknesses must be > 0, got {voxel_mm3} and {dict(slab_mm)}")
    within = _within_parts(gt, pred, lr_grids, hr_affine) if lr_grids is not None and hr_affine is not None else None
    records = lesion_records(gt, pred, lesions, mask, voxel_mm3 if by_size else None, slab_mm if by_size else None,
                             thick_dir if by_size else None, hr_affine, within)
    row: dict = {}
    for c in CONTRASTS:
        o = next(x for x in CONTRASTS if x != c)
        own = [r for r in records if r["class"] == lesion_visible_only_on(c) and _scored(r, c)]
        _ratio_columns(row, own, c)
        row[f"lesion_contrast_uncapped_{c}"] = _mean(r[f"recovered_{c}"] for r in own)
        row[f"lesion_error_{c}"] = _mean(abs(r[f"recovered_{c}"] - 1.0) for r in own)
        row[f"ring_bias_{c}"] = _mean(r[f"ring_bias_{c}"] for r in own)
        imprinted = [r for r in records if r["class"] == lesion_visible_only_on(c) and "imprint" in r]
        row[f"imprint_{o}"] = _mean(r["imprint"] for r in imprinted)
        row[f"imprint_{o}_gt"] = _mean(r["imprint_gt"] for r in imprinted)
    for c in CONTRASTS:
        both = [r for r in records if r["class"] == LESION_BOTH and _scored(r, c)]
        _ratio_columns(row, both, c, part="_both")
    row["n_lesions_excluded"] = sum(r["status"] != "ok" for r in records)
    if by_size:
        row.update(_size_row(records, within is not None))
    if lr_noise_sd is not None:
        row.update(_false_positive_row(gt, pred, lesions, mask, lr_noise_sd, scales, exclude,
                                       voxel_mm3 if voxel_mm3 is not None else None))
    return row


def _false_positive_row(gt, pred, lesions, mask, lr_noise_sd, scales, exclude, voxel_mm3) -> dict:
    shape = as_volume(gt[CONTRASTS[0]], name="gt").shape
    lab = check_lesion_map(lesions, shape)
    m = as_mask(mask, shape)
    normal = normal_tissue(m, lab != 0, None if exclude is None else as_mask(exclude, shape))
    side = tophat_side(voxel_mm3 ** (1.0 / 3.0) if voxel_mm3 else None)  # the HR spacing (isotropic grids)
    row = {}
    for c in CONTRASTS:
        sigma = float(lr_noise_sd[c]) / float((scales or {}).get(c, 1.0))
        if not (sigma > 0 and math.isfinite(sigma)):  # a noise-free, texture-free scan: no noise scale, no count
            row.update({f"false_positives_{c}": math.nan, f"false_positive_voxels_{c}": math.nan,
                        f"false_positive_excess_{c}": math.nan, f"fp_threshold_{c}": math.nan})
            continue
        found = false_positive_blobs(as_volume(gt[c], name=f"gt[{c}]"), as_volume(pred[c], name=f"pred[{c}]"),
                                     normal, sigma, c, min_blob_voxels(voxel_mm3), side)
        row[f"false_positives_{c}"] = found["count"]
        row[f"false_positive_voxels_{c}"] = found["voxels"]
        row[f"false_positive_excess_{c}"] = found["excess_count"]
        row[f"fp_threshold_{c}"] = found["threshold"]
    return row
