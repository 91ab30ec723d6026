"""One subject's image-quality row (docs/evaluation_protocol.md): the single place every table gets its numbers from."""

from __future__ import annotations

import math

from nexus_monai.metrics.image_quality import as_mask, as_volume, erode_mask, intensity_scale, psnr, ssim3d
from nexus_monai.metrics.lesion import LESION_PROTOCOL, lesion_fidelity_row
from nexus_monai.metrics.lpips import LPIPS_MIN_SIDE, load_lpips, lpips_status, lpips_volume
from nexus_monai.metrics.mutual_information import mi_errors

__all__ = ["SCALE_PERCENTILE", "ERODE_VOXELS", "SSIM_WIN_SIZE", "SSIM_SIGMA", "MI_BINS",
           "PROTOCOL", "metric_protocol_text", "subject_metric_row"]

SCALE_PERCENTILE = 99.5
ERODE_VOXELS = 3
SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
MI_BINS = 32

PROTOCOL = (
    f"Evaluation protocol: for each contrast, the ground-truth HR volume and the prediction are both "
    f"divided by the {SCALE_PERCENTILE}th percentile of the ground truth inside the brain mask (the "
    f"prediction is never normalised on its own; the brain mask defaults to ground-truth T1w > 0, "
    f"BraTS backgrounds being exactly 0). PSNR uses data range 1 and is reported inside the brain "
    f"mask (primary), inside the mask eroded by {ERODE_VOXELS} voxels with a Euclidean ball "
    f"(interior, edges excluded), and over the whole volume. SSIM is MONAI's 3D SSIMMetric with a "
    f"{SSIM_WIN_SIZE}x{SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} Gaussian window (sigma {SSIM_SIGMA} voxels, "
    f"k1 0.01, k2 0.03), averaged over windows centred on every voxel of the brain bounding box. "
    f"LPIPS is AlexNet-LPIPS v0.1 with ImageNet backbone weights on 2D slices along all three axes "
    f"that contain brain, each slice clipped to [0, 1], mapped to [-1, 1] and replicated to 3 "
    f"channels; the value is the mean over the three per-axis slice means. Mutual information uses "
    f"a {MI_BINS}x{MI_BINS} joint histogram of voxels inside the brain mask (equal-width bins over "
    f"each image's own range, natural log), and the errors are eps_MI(C_i) = "
    f"|MI(pred_i, GT_j) - MI(GT_i, GT_j)| and eps_MI_joint = |MI(pred_1, pred_2) - MI(GT_1, GT_2)| "
    f"per subject, averaged over subjects. {LESION_PROTOCOL}"
)


def metric_protocol_text() -> str:
    """:data:`PROTOCOL` plus one sentence on whether LPIPS weights are available here."""
    return f"{PROTOCOL} LPIPS weights: {lpips_status()}."


def subject_metric_row(gt: dict, pred: dict, mask=None, *, lpips: bool = True,
                       contrasts: tuple[str, ...] = ("t1", "t2"), lpips_batch_size: int = 32, lesions=None,
                       lesion_geometry: dict | None = None) -> dict:
    """All image-quality metrics of one subject as a flat dict.

    ``gt[c]`` / ``pred[c]``: the HR ground truth and the prediction of contrast ``c`` on the same
    grid, ``(X, Y, Z)`` or ``(1, X, Y, Z)``, raw intensities. ``mask``: brain mask on that grid;
    ``None`` -> ``gt[contrasts[0]] > 0`` (BraTS volumes are skull-stripped with a background of
    exactly 0, so this is the brain). Both volumes of a contrast are divided by the GT's
    scale (:func:`intensity_scale`) before every metric.

    Keys per contrast ``c``: ``scale_{c}`` (the divisor, raw units), ``psnr_{c}`` (dB, brain
    mask), ``psnr_eroded_{c}`` (dB, mask eroded 3 voxels; NaN if erosion empties it),
    ``psnr_volume_{c}`` (dB, whole volume), ``ssim_{c}``, ``lpips_{c}`` (NaN when LPIPS is
    disabled, its weights are missing, or a slice side is < 31 px). With exactly two contrasts
    ``(c1, c2)`` also ``eps_mi_{c1}``, ``eps_mi_{c2}``, ``eps_mi_joint`` (nats). ``lpips_status``
    is the one string value: ``"ok"``, ``"disabled"`` or ``"unavailable: <why>"``.

    ``lesions``: the subject's lesion instance map on the same grid (:mod:`nexus_monai.keys`
    encoding) or None; with a map (and the two contrasts ``("t1", "t2")``) the row also has the
    lesion-fidelity columns of :func:`~nexus_monai.metrics.lesion.lesion_fidelity_row`, computed on the
    normalised intensities; without one those columns are absent. ``lesion_geometry``:
    ``{"voxel_mm3", "slab_mm": {c: mm}}`` (:func:`~nexus_monai.metrics.lesion.lesion_geometry`) adds the
    lesion columns by size relative to the slab thickness (``lesion_contrast_t2_small``, ...) and, from LR
    MetaTensors, the within-slab and false-positive columns (metric v2); it may carry ``exclude`` (a bool mask
    kept out of the false-positive search, e.g. the tumour labels).
    """
    contrasts = tuple(contrasts)
    if mask is None:
        mask = as_volume(gt[contrasts[0]], name=f"gt[{contrasts[0]}]") > 0
    shape = as_volume(gt[contrasts[0]], name=f"gt[{contrasts[0]}]").shape
    m = as_mask(mask, shape)
    eroded = erode_mask(m, ERODE_VOXELS)

    model, status = None, "disabled"
    if lpips:
        model = load_lpips()
        if model is None:
            status = lpips_status()
        elif min(shape) < LPIPS_MIN_SIDE:
            status = f"unavailable: volume {shape} has a side < {LPIPS_MIN_SIDE} voxels, too small for AlexNet"
        else:
            status = "ok"

    row: dict = {}
    scaled_gt, scaled_pred = {}, {}
    for c in contrasts:
        g = as_volume(gt[c], name=f"gt[{c}]")
        p = as_volume(pred[c], name=f"pred[{c}]")
        if g.shape != shape or p.shape != shape:
            raise ValueError(f"contrast {c}: gt {g.shape} / pred {p.shape} differ from {shape}")
        scale = intensity_scale(g, m, SCALE_PERCENTILE)
        g, p = g / scale, p / scale
        scaled_gt[c], scaled_pred[c] = g, p
        row[f"scale_{c}"] = scale
        row[f"psnr_{c}"] = psnr(g, p, m)
        row[f"psnr_eroded_{c}"] = psnr(g, p, eroded) if eroded.any() else math.nan
        row[f"psnr_volume_{c}"] = psnr(g, p)
        row[f"ssim_{c}"] = ssim3d(g, p, m, win_size=SSIM_WIN_SIZE, sigma=SSIM_SIGMA)
        row[f"lpips_{c}"] = (lpips_volume(g, p, m, model=model, batch_size=lpips_batch_size)
                             if status == "ok" else math.nan)

    if len(contrasts) == 2:
        c1, c2 = contrasts
        err = mi_errors(scaled_gt[c1], scaled_gt[c2], scaled_pred[c1], scaled_pred[c2], m, bins=MI_BINS)
        row[f"eps_mi_{c1}"] = err["eps_mi_1"]
        row[f"eps_mi_{c2}"] = err["eps_mi_2"]
        row["eps_mi_joint"] = err["eps_mi_joint"]
    if lesions is not None:
        if set(contrasts) != {"t1", "t2"}:
            raise ValueError(f"lesion fidelity needs both contrasts t1 and t2, got {contrasts}")
        scales = {c: row[f"scale_{c}"] for c in contrasts}  # the LR noise SD is in raw units
        row.update(lesion_fidelity_row(scaled_gt, scaled_pred, lesions, m, scales=scales, **(lesion_geometry or {})))
    row["lpips_status"] = status
    return row
