"""Intensity normalisations of the two protocols (docs/evaluation_protocol.md).

* :class:`ZScoreLikeReferenced`: z-score several keys with the mean/std of ONE reference key
  (over its non-zero voxels). Models see LR inputs z-scored by their own statistics and the HR
  targets z-scored by the same numbers, so predictions map back to scanner units with
  :meth:`inverse` (MONAI ``Invertd`` works through the recorded transform).
* :class:`ScaleByMaskPercentiled`: the evaluation scale: divide GT and predictions by the 99.5th
  percentile of the GT inside the brain mask (one number per subject and contrast; a prediction
  is never normalised on its own). Background stays 0.

* :func:`intensity_normalizer`: the training normaliser as a config choice (``"percentile"``:
  divide by the LR scan's 99.5th percentile; ``"zscore"``: zero mean / unit variance, Zhang et
  al. 2025 §4.2), the HR target always by the SAME numbers as its LR input.
  :func:`reference_normalization` gives the same map as ``(offset, scale)`` for inference.

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

__all__ = ["ZScoreLikeReferenced", "ScaleByMaskPercentiled", "INTENSITY_NORMS", "intensity_normalizer",
           "reference_normalization", "zscore_stats"]

INTENSITY_NORMS = ("percentile", "zscore")


def zscore_stats(ref: torch.Tensor) -> tuple[float, float]:
    """``(mean, std)`` of the non-zero voxels of ``ref`` (std 1 when constant)."""
    ref = ref.as_subclass(torch.Tensor).float() if isinstance(ref, torch.Tensor) else torch.as_tensor(ref).float()
    fg = ref[ref != 0]
    if fg.numel() < 2:
        raise ValueError("reference has no non-zero voxels to compute a z-score")
    mean, std = float(fg.mean()), float(fg.std())
    return mean, (std if std > 0 else 1.0)


class ZScoreLikeReferenced(MapTransform, InvertibleTransform):
    """``(x - mean_ref) / std_ref`` for every key, statistics from ``ref_key``'s non-zero voxels.

    With ``keep_zero_background`` voxels that are exactly 0 stay 0 (BraTS background). The
    statistics are stored under ``"<ref_key>_zscore"`` (``{"mean", "std"}``) and in each key's
    applied operations, so :meth:`inverse` restores scanner units.
    """

    def __init__(self, keys: KeysCollection, ref_key: str, keep_zero_background: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.keep_zero_background = keep_zero_background

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        try:
            mean, std = zscore_stats(d[self.ref_key])
        except ValueError as err:
            raise ValueError(f"reference {self.ref_key!r}: {err}") from err
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

    def __init__(self, keys: KeysCollection, ref_key: str, mask_key: str | None = None, percentile: float = 99.5,
                 allow_missing_keys: bool = False):
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


def intensity_normalizer(mode: str, keys: KeysCollection, ref_key: str,
                         allow_missing_keys: bool = False) -> MapTransform:
    """The training-time normaliser of ``keys`` by statistics of ``ref_key`` (the LR scan).

    ``"percentile"``: :class:`ScaleByMaskPercentiled` (divide by the 99.5th percentile of the
    reference's non-zero voxels; background stays 0). ``"zscore"``: :class:`ZScoreLikeReferenced`
    with the mean / std of the reference's non-zero voxels applied to EVERY voxel
    (``keep_zero_background=False``), an affine map, so predictions map back exactly and the zero
    background becomes one constant ``-mean / std`` that no brain voxel shares.
    """
    if mode == "percentile":
        return ScaleByMaskPercentiled(keys, ref_key=ref_key, allow_missing_keys=allow_missing_keys)
    if mode == "zscore":
        return ZScoreLikeReferenced(keys, ref_key=ref_key, keep_zero_background=False,
                                    allow_missing_keys=allow_missing_keys)
    raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {mode!r}")


def reference_normalization(ref: torch.Tensor, mode: str) -> tuple[float, float]:
    """``(offset, scale)`` with ``normalised = (x - offset) / scale``: :func:`intensity_normalizer`'s map for
    ``ref``."""
    if mode == "percentile":
        r = ref.as_subclass(torch.Tensor) if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
        return 0.0, (intensity_scale(r, r != 0) if bool((r != 0).any()) else 1.0)
    if mode == "zscore":
        return zscore_stats(ref)
    raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {mode!r}")
