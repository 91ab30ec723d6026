"""BraTS region channels (TC, WT, ET; MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` order)
back to a BraTS label map {0, 1, 2, 4} for saving segmentations as NIfTI."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["BraTSRegionsToLabels", "BraTSRegionsToLabelsd"]


class BraTSRegionsToLabels(Transform):
    """``(3, X, Y, Z)`` binary regions (TC, WT, ET) -> ``(1, X, Y, Z)`` labels.

    Nested as BraTS defines them: WT -> 2 (oedema), TC -> 1 (necrotic core), ET -> 4 (enhancing),
    each later region overwriting the earlier one, so an ET voxel is 4 even where TC/WT disagree.
    """

    def __call__(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.shape[0] != 3:
            raise ValueError(f"expected 3 region channels (TC, WT, ET), got shape {tuple(regions.shape)}")
        r = regions.as_subclass(torch.Tensor) > 0.5 if isinstance(regions,
                                                                  MetaTensor) else torch.as_tensor(regions) > 0.5
        out = torch.zeros((1, *r.shape[1:]), dtype=torch.uint8, device=r.device)
        out[0][r[1]] = 2
        out[0][r[0]] = 1
        out[0][r[2]] = 4
        if isinstance(regions, MetaTensor):
            return MetaTensor(out, affine=regions.affine, meta={k: v for k, v in regions.meta.items() if k != "affine"})
        return out


class BraTSRegionsToLabelsd(MapTransform):
    """Dictionary twin of :class:`BraTSRegionsToLabels`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convert = BraTSRegionsToLabels()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d
