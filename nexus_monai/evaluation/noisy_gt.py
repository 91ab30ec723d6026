"""Scores against the noisy HR scans, kept beside the noise-free ground truth for one release (issue 27).

Since generator 3.0.0 the embedded dataset's LR scans are simulated from a noise-free render and every
method is scored against it; :meth:`~nexus_monai.transforms.protocols.Protocol.prepare_subject` keeps
the noisy HR scans (the ground truth until then) as ``t1_noisy`` / ``t2_noisy``. The columns here are
the same PSNR / SSIM against those, prefixed ``noisy_gt_``, so old and new figures can be compared.
"""

from __future__ import annotations

from typing import Mapping

import torch

from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics import subject_metric_row

__all__ = ["noisy_gt_columns"]


def noisy_gt_columns(data: Mapping, pred: Mapping, mask: torch.Tensor) -> dict:
    """``noisy_gt_psnr_*`` / ``noisy_gt_ssim_*`` of ``pred`` (``{c: (X, Y, Z)}``) against ``data["<c>_noisy"]``
    inside ``mask`` (the brain of the noise-free ground truth); ``{}`` when the subject has no noisy scans."""
    if not all(f"{c}_noisy" in data for c in CONTRASTS):
        return {}
    noisy = {c: data[f"{c}_noisy"][0].as_subclass(torch.Tensor) for c in CONTRASTS}
    row = subject_metric_row(noisy, dict(pred), mask, lpips=False)
    return {f"noisy_gt_{k}": v for k, v in row.items() if k.startswith(("psnr_", "ssim_"))}
