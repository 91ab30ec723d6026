"""Zero-padding / cropping to a fixed field of view in mm (the paper's 240 x 240 x 160 mm frame).

The voxel size comes from each image's affine, so the same protocol works for 1 mm BraTS
(240 x 240 x 160 voxels) and the 2 mm embedded data (120 x 120 x 80 voxels). The padding and
cropping itself is MONAI's ``ResizeWithPadOrCrop`` (symmetric, affine updated).
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ResizeWithPadOrCrop

from nexus_monai.geometry import spacing

__all__ = ["frame_shape", "PadToFramed"]


def frame_shape(frame_mm: Sequence[float], affine) -> tuple[int, int, int]:
    """Voxels needed to span ``frame_mm`` along i, j, k at the affine's spacing (rounded)."""
    sp = spacing(affine)
    return tuple(max(1, int(round(float(f) / float(s)))) for f, s in zip(frame_mm, sp))


class PadToFramed(MapTransform):
    """Pad with zeros / crop ``keys`` (one grid) symmetrically to ``frame_mm`` (mm per axis).

    Every present key must hold a loaded image with an affine (a MetaTensor); a key that still holds
    its datalist path (not listed in the loader before the frame) is a ``TypeError`` naming the key.
    """

    def __init__(self, keys: KeysCollection, frame_mm: Sequence[float] = (240.0, 240.0, 160.0),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.frame_mm = tuple(float(f) for f in frame_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not hasattr(d[key], "affine"):
                raise TypeError(f"PadToFramed: key {key!r} holds {d[key]!r}, not a loaded image; load it before the "
                                "frame (LoadVolumed with the frame's keys) or delete it")
            size = frame_shape(self.frame_mm, d[key].affine)
            d[key] = ResizeWithPadOrCrop(spatial_size=size, mode="constant")(d[key])
        return d
