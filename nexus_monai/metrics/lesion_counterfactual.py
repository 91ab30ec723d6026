"""Counterfactual imprint: how much of a one-contrast lesion a method carries into the other contrast.

The v1 imprint (``|contrast|`` of the output on the contrast that should not show the lesion) has a
floor: noise and partial volume give the ground truth itself a non-zero ``|contrast|`` there, and a
smooth output scores below the truth. Here the subject is rendered twice by the generator, with and
without one class of single-contrast lesions (the per-class switch
:func:`~nexus_monai.data.synth.lesions.lesion_classes_off`; every other draw identical), the method runs
on both, and for every lesion of that class (visible on ``c`` only, ``o`` the other contrast):

    ``imprint_cf = |mean over the lesion of (out_o(with) - out_o(without))| / |GT contrast on c|``

(normalised intensities, each contrast divided by its own GT scale). The ground truth's own value is
exactly 0 (its ``o`` render does not change), so any non-zero value is the method's: the lesion seen
on ``c`` leaking into ``o``, in units of the lesion's own contrast. Signed mean beside it
(``imprint_cf_signed_<o>``): positive = the leak has the lesion's sign on ``c`` scaled the same way.

Columns: ``imprint_cf_<o>``, ``imprint_cf_signed_<o>``, ``n_imprint_cf_<o>`` (lesions scored).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from nexus_monai.keys import CONTRASTS, LESION_CLASS_STRIDE, lesion_visible_only_on
from nexus_monai.metrics.image_quality import as_mask, as_volume
from nexus_monai.metrics.lesion import MIN_GT_CONTRAST, RING_VOXELS, check_lesion_map, lesion_contrast, lesion_ring

__all__ = ["counterfactual_imprint_row", "counterfactual_columns"]


def counterfactual_columns(contrast_shown: str) -> list[str]:
    """Columns :func:`counterfactual_imprint_row` writes for lesions visible on ``contrast_shown`` only."""
    o = next(c for c in CONTRASTS if c != contrast_shown)
    return [f"imprint_cf_{o}", f"imprint_cf_signed_{o}", f"n_imprint_cf_{o}"]


def counterfactual_imprint_row(gt_with: Mapping, out_with: Mapping, out_without: Mapping, lesions, mask,
                               contrast_shown: str) -> dict:
    """Imprint of the lesions visible on ``contrast_shown`` only, from the outputs with and without them.

    ``gt_with[c]`` / ``out_with[c]`` / ``out_without[c]``: ``(X, Y, Z)`` normalised volumes (divided by the
    GT scale of ``c``) on one grid; ``lesions``: the instance map (the same for both renders); ``mask``: brain
    mask. Lesions outside the mask, without ring voxels or with ``|GT contrast| < MIN_GT_CONTRAST`` on
    ``contrast_shown`` are left out.
    """
    c = contrast_shown
    o = next(x for x in CONTRASTS if x != c)
    klass = lesion_visible_only_on(c)
    g = as_volume(gt_with[c], name=f"gt[{c}]")
    lab = check_lesion_map(lesions, g.shape)
    m = as_mask(mask, g.shape)
    delta = as_volume(out_with[o], name=f"out_with[{o}]") - as_volume(out_without[o], name=f"out_without[{o}]")
    if delta.shape != g.shape:
        raise ValueError(f"outputs {delta.shape} and ground truth {g.shape} differ in shape")
    any_lesion = lab != 0
    values = [v for v in np.unique(lab[any_lesion]).tolist() if v // LESION_CLASS_STRIDE == klass]
    ratios = []
    for value in values:
        les = lab == value
        inside = les & m
        ring = lesion_ring(les, m, any_lesion, RING_VOXELS)
        own = lesion_contrast(g, inside, ring)
        if not (math.isfinite(own) and abs(own) >= MIN_GT_CONTRAST):
            continue
        ratios.append(float(delta[inside].mean()) / own)
    return {f"imprint_cf_{o}": float(np.mean(np.abs(ratios))) if ratios else math.nan,
            f"imprint_cf_signed_{o}": float(np.mean(ratios)) if ratios else math.nan,
            f"n_imprint_cf_{o}": len(ratios)}
