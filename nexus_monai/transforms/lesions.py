"""Lesion-aware training samples: where the contrast-specific lesions of a patch are, and their rings.

The synthetic generator writes a lesion instance map per subject (``keys.LESIONS``, values
``class * 1000 + instance``, see :mod:`nexus_monai.keys`). For training only (inference never
needs it) the map marks the voxels a lesion-aware objective should see more often and weigh more:

* :func:`lesion_region` / :class:`LesionRegion` / :class:`LesionRegiond`: a signed per-voxel code,
  ``+v`` inside lesion ``v`` (its instance value), ``-v`` in its ring (voxels outside every lesion
  within ``ring`` voxels, Euclidean, of lesion ``v``; a ring voxel between two lesions belongs to
  the nearer), ``0`` elsewhere. The ring is where a lesion's contrast edge lies; the lesion
  fidelity metric (:mod:`nexus_monai.metrics.lesion`) measures contrast against a ring of the same
  radius.
* :func:`lesion_instances`: the instances of the selected visibility classes and their voxels
  (the patch sampler picks one uniformly, then a voxel of it).

:class:`~nexus_monai.transforms.patches.RandPairedPatchd` (``lesion_patch_prob``) and
:class:`~nexus_monai.transforms.query.SampleQueryPointsd` (``lesion_point_fraction``) use these.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from nexus_monai.keys import LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY

__all__ = ["DEFAULT_LESION_CLASSES", "RING_VOXELS", "lesion_instances", "lesion_region", "LesionRegion",
           "LesionRegiond", "lesion_label_array"]

DEFAULT_LESION_CLASSES = (LESION_T2_ONLY, LESION_T1_ONLY)
"""The contrast-specific classes: what only one contrast shows, the findings cross-contrast SR can erase or invent."""
RING_VOXELS = 2
"""Default ring radius (voxels), the lesion-fidelity metric's."""


def lesion_label_array(label_map) -> np.ndarray:
    """A lesion map ``(X, Y, Z)`` or ``(1, X, Y, Z)`` (tensor or array) as an int64 ``(X, Y, Z)`` array."""
    a = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"lesion map must have one channel, got shape {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"lesion map must be 3D (optionally with one channel), got shape {a.shape}")
    return np.rint(a).astype(np.int64)


def lesion_instances(label_map, classes: Sequence[int] = DEFAULT_LESION_CLASSES) -> dict[int, np.ndarray]:
    """``{instance value: voxel indices (n, 3)}`` of the lesions of visibility ``classes`` in ``label_map``."""
    lab = lesion_label_array(label_map)
    sel = np.isin(lab // LESION_CLASS_STRIDE, np.asarray(list(classes), dtype=np.int64)) & (lab > 0)
    if not sel.any():
        return {}
    idx = np.argwhere(sel)
    values = lab[tuple(idx.T)]
    order = np.argsort(values, kind="stable")
    idx, values = idx[order], values[order]
    uniq, starts = np.unique(values, return_index=True)
    return {int(v): part for v, part in zip(uniq, np.split(idx, starts[1:]))}


def lesion_region(label_map, ring: int = RING_VOXELS) -> np.ndarray:
    """Signed code ``(X, Y, Z)`` int64: ``+v`` inside lesion ``v``, ``-v`` in its ``ring``-voxel ring, 0 elsewhere."""
    lab = lesion_label_array(label_map)
    out = lab.copy()
    if ring <= 0 or not (lab > 0).any():
        return out
    dist, nearest = ndimage.distance_transform_edt(lab <= 0, return_indices=True)
    in_ring = (lab <= 0) & (dist <= ring)
    out[in_ring] = -lab[tuple(n[in_ring] for n in nearest)]
    return out


class LesionRegion(Transform):
    """Array transform: a lesion instance map ``(1, X, Y, Z)`` -> its signed region code (same shape, int64,
    a MetaTensor keeps its affine). See :func:`lesion_region`."""

    def __init__(self, ring: int = RING_VOXELS):
        self.ring = int(ring)

    def __call__(self, label_map: torch.Tensor) -> torch.Tensor:
        code = torch.as_tensor(lesion_region(label_map, self.ring))[None]
        if isinstance(label_map, MetaTensor):
            meta = {k: v for k, v in label_map.meta.items() if k != "affine"}
            return MetaTensor(code, affine=label_map.affine, meta=meta)
        return code


class LesionRegiond(MapTransform):
    """Dictionary twin of :class:`LesionRegion`: ``keys`` (lesion maps) -> region codes, in place or in
    ``output_keys``."""

    def __init__(self, keys: KeysCollection, ring: int = RING_VOXELS, output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.op = LesionRegion(ring)
        self.output_keys = list(self.keys) if output_keys is None else (
            [output_keys] if isinstance(output_keys, str) else list(output_keys))
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys {self.output_keys} must match keys {list(self.keys)}")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, out in zip(self.keys, self.output_keys):
            if key in d:
                d[out] = self.op(d[key])
            elif not self.allow_missing_keys:
                raise KeyError(f"key {key!r} not found")
        return d
