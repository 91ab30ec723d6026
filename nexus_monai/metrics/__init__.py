"""Metrics of the evaluation protocol (docs/evaluation_protocol.md): PSNR, SSIM, LPIPS, mutual information; Dice/HD95.

Tables get every number from :func:`subject_metric_row` and print :func:`metric_protocol_text`;
segmentation tables use :func:`dice_hd95` / :func:`summarise_segmentation` and print :data:`EMPTY_POLICY`.
"""

from nexus_monai.metrics.image_quality import brain_bbox, erode_mask, intensity_scale, psnr, ssim3d
from nexus_monai.metrics.lesion import LESION_PROTOCOL, lesion_fidelity_row, lesion_geometry, lesion_records
from nexus_monai.metrics.lpips import AlexNetLPIPS, load_lpips, lpips_status, lpips_volume
from nexus_monai.metrics.mutual_information import mi_errors, mutual_information
from nexus_monai.metrics.subject_row import PROTOCOL, metric_protocol_text, subject_metric_row
from nexus_monai.metrics.segmentation import (
    EMPTY_POLICY,
    REGIONS,
    brats_regions,
    dice_hd95,
    summarise_segmentation,
)

__all__ = [
    "AlexNetLPIPS",
    "PROTOCOL",
    "brain_bbox",
    "erode_mask",
    "intensity_scale",
    "LESION_PROTOCOL",
    "lesion_fidelity_row",
    "lesion_geometry",
    "lesion_records",
    "load_lpips",
    "lpips_status",
    "lpips_volume",
    "mi_errors",
    "metric_protocol_text",
    "mutual_information",
    "psnr",
    "ssim3d",
    "subject_metric_row",
    "EMPTY_POLICY",
    "REGIONS",
    "brats_regions",
    "dice_hd95",
    "summarise_segmentation",
]
