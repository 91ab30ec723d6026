"""The shared key vocabulary: contrast names, datalist and batch keys, network outputs, the lesion-map encoding.

In the spirit of MONAI's ``CommonKeys``: modules that exchange dictionaries agree on these names
here, once, instead of repeating bare strings.

Lesion instance maps (``LESIONS`` datalist key, an integer NIfTI on the subject's HR grid):
``0`` is no lesion; a lesion of visibility class ``v`` and instance number ``n`` (1-999) carries the
value ``v * LESION_CLASS_STRIDE + n``. Classes: ``LESION_T2_ONLY`` (visible on T2w only, e.g.
white-matter hyperintensities), ``LESION_T1_ONLY`` (visible on T1w only) and ``LESION_BOTH``
(visible on both, e.g. perivascular spaces). Nearest-neighbour resampling keeps the encoding.

Batch keys of the cohort INRs (written by :class:`~nexus_monai.transforms.query.SampleQueryPointsd`,
read by :func:`~nexus_monai.engines.inr.inr_inputs`): the LR scans ``lr_key(c)`` (``"t1_lr"``), the
query points ``QUERY_WORLD`` (world mm) and ``QUERY_NORM`` (normalised), the HR values at the points
``query_key(c)`` (``"query_t1"``), the tumour label ``QUERY_LABEL`` and, for lesion-aware training
only, ``QUERY_LESION``: the lesion region code at the points (``+v`` inside lesion ``v`` of the
encoding below, ``-v`` in its ring, 0 elsewhere; :mod:`nexus_monai.transforms.lesions`).

Network outputs read by the Nexus-INR loss (:class:`~nexus_monai.losses.NexusINRLoss`) besides the
two contrasts: the shared T1w feature ``Z_T1_SHARED``, the fused T2w feature ``Z_T2_FUSED``, the
T2w decoded from its own features ``T2_SELF``, the modality classifier logits
``modality_logits_key(c)`` and the segmentation logits ``seg_logits_key(c)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CONTRASTS",
    "LESIONS",
    "QUERY_WORLD",
    "QUERY_NORM",
    "QUERY_LABEL",
    "QUERY_LESION",
    "lr_key",
    "query_key",
    "Z_T1_SHARED",
    "Z_T2_SHARED",
    "Z_T2_FUSED",
    "T2_SELF",
    "modality_logits_key",
    "seg_logits_key",
    "LESION_CLASS_STRIDE",
    "LESION_T2_ONLY",
    "LESION_T1_ONLY",
    "LESION_BOTH",
    "lesion_class",
    "lesion_visible_only_on",
]

CONTRASTS = ("t1", "t2")
"""The two contrasts every multi-contrast method takes and returns, in this order."""

LESIONS = "lesions"
"""Datalist / batch key of the lesion instance map."""

QUERY_WORLD = "query_world"
QUERY_NORM = "query_norm"
QUERY_LABEL = "query_label"
QUERY_LESION = "query_lesion"

Z_T1_SHARED = "z_t1_shared"
Z_T2_SHARED = "z_t2_shared"
Z_T2_FUSED = "z_t2_fused"
T2_SELF = "t2_self"


def lr_key(contrast: str) -> str:
    """Batch / datalist key of a contrast's LR scan: ``"t1" -> "t1_lr"``."""
    return f"{contrast}_lr"


def query_key(key: str) -> str:
    """Batch key of the values of image ``key`` at the query points: ``"t1" -> "query_t1"``."""
    return f"query_{key}"


def modality_logits_key(contrast: str) -> str:
    """Network-output key of the modality classifier logits on a contrast's specific features."""
    return f"modality_logits_{contrast}"


def seg_logits_key(contrast: str) -> str:
    """Network-output key of the segmentation-head logits decoded from a contrast's features."""
    return f"seg_logits_{contrast}"


LESION_CLASS_STRIDE = 1000
LESION_T2_ONLY = 1
LESION_T1_ONLY = 2
LESION_BOTH = 3


def lesion_class(label_map) -> np.ndarray:
    """Visibility class (0, ``LESION_T2_ONLY``, ``LESION_T1_ONLY`` or ``LESION_BOTH``) of each voxel."""
    return np.asarray(label_map).astype(np.int64) // LESION_CLASS_STRIDE


def lesion_visible_only_on(contrast: str) -> int:
    """The lesion class visible on ``contrast`` alone (``"t1"`` or ``"t2"``)."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    return LESION_T1_ONLY if contrast == "t1" else LESION_T2_ONLY
