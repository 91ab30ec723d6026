"""Intensity normalisations of the two protocols (docs/evaluation_protocol.md).

* :class:`ZScoreLikeReferenced`: z-score several keys with the mean/std of ONE reference key
  (over its non-zero voxels). Models see LR inputs z-scored by their own statistics and the HR
  targets z-scored by the same numbers, so predictions map back to scanner units with
  :meth:`inverse` (MONAI ``Invertd`` works through the recorded transform).
* :class:`ScaleByMaskPercentiled`: the evaluation scale: divide GT and predictions by the 99.5th
  percentile of the GT inside the brain mask (one number per subject and contrast; a prediction
  is never normalised on its own). Background stays 0.

Zero-padding/cropping to the paper's 240 x 240 x 160 frame is MONAI's
``ResizeWithPadOrCropd(spatial_size=...)``, which updates the affine; the protocol YAMLs use it.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from nexus_monai.metrics.image_quality import intensity_scale

__all__ = ["ZScoreLikeReferenced", "ScaleByMaskPercentiled"]


class ZScoreLikeReferenced(MapTransform, InvertibleTransform):
    """``(x - mean_ref) / std_ref`` for every key, statistics from ``ref_key``'s non-zero voxels.

    With ``keep_zero_background`` voxels that are exactly 0 stay 0 (BraTS background). The
    statistics are stored under ``"<ref_key>_zscore"`` (``{"mean", "std"}``) and in each key's
    applied operations, so :meth:`inverse` restores scanner units.
    """

    def __init__(self, keys: KeysCollection, ref_key: str, keep_zero_background: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.keep_zero_background = keep_zero_background

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = d[self.ref_key].as_subclass(torch.Tensor).float()
        fg = ref[ref != 0]
        if fg.numel() < 2:
            raise ValueError(f"reference {self.ref_key!r} has no non-zero voxels to compute a z-score")
        mean, std = float(fg.mean()), float(fg.std())
        std = std if std > 0 else 1.0
        d[f"{self.ref_key}_zscore"] = {"mean": torch.tensor(mean), "std": torch.tensor(std)}
        for key in self.key_iterator(d):
            img = d[key]
            out = (img - mean) / std
            if self.keep_zero_background:
                out = torch.where(img == 0, torch.zeros_like(out), out)
            if isinstance(out, MetaTensor):
                self.push_transform(out, extra_info={"mean": mean, "std": std, "zero_bg": self.keep_zero_background})
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in [k for k in self.keys if k in d]:  # Invertd passes only the key it inverts
            info = self.pop_transform(d[key])["extra_info"]
            img = d[key]
            out = img * info["std"] + info["mean"]
            if info["zero_bg"]:
                out = torch.where(img == 0, torch.zeros_like(out), out)
            d[key] = out
        return d


class ScaleByMaskPercentiled(MapTransform):
    """Divide ``keys`` by the ``percentile`` of ``ref_key`` inside ``mask_key`` (default ref > 0).

    The number is stored under ``"<ref_key>_scale"``. Use one instance per contrast, e.g.
    ``keys=["t1", "pred_t1"], ref_key="t1"``.
    """

    def __init__(self, keys: KeysCollection, ref_key: str, mask_key: str | None = None, percentile: float = 99.5, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mask_key, self.percentile = ref_key, mask_key, float(percentile)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = d[self.ref_key]
        mask = d[self.mask_key] if self.mask_key else ref != 0
        scale = intensity_scale(ref, mask, percentile=self.percentile)
        d[f"{self.ref_key}_scale"] = torch.tensor(scale)
        for key in self.key_iterator(d):
            d[key] = d[key] / scale
        return d
