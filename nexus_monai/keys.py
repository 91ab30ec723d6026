"""The shared key vocabulary: contrast names, datalist keys and the lesion-map encoding.

In the spirit of MONAI's ``CommonKeys``: modules that exchange dictionaries agree on these names
here, once, instead of repeating bare strings.

Lesion instance maps (``LESIONS`` datalist key, an integer NIfTI on the subject's HR grid):
``0`` is no lesion; a lesion of visibility class ``v`` and instance number ``n`` (1-999) carries the
value ``v * LESION_CLASS_STRIDE + n``. Classes: ``LESION_T2_ONLY`` (visible on T2w only, e.g.
white-matter hyperintensities), ``LESION_T1_ONLY`` (visible on T1w only) and ``LESION_BOTH``
(visible on both, e.g. perivascular spaces). Nearest-neighbour resampling keeps the encoding.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CONTRASTS",
    "LESIONS",
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
