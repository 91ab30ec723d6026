"""What a subject fit trains on: the LR observations of both scans, their batches and the MI probe points.

Every LR voxel of each scan inside that scan's signal mask is one observation
(:func:`~nexus_monai.transforms.observations.lr_observations`): its world position through ONE
:class:`~nexus_monai.geometry.WorldNormalizer` built from both LR grids, its intensity divided by the
scan's 99.5th percentile of non-zero voxels (:func:`intensity_scales`) and how the INR renders it.
Both scans' observations are shuffled together into batches (:class:`ObservationBatches`); index
``i < n_t1`` is a T1w observation, the others T2w.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from monai.data import MetaTensor

from nexus_monai.engines.subject_fit.options import SubjectFitOptions
from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, plain_tensor, sample_at_world, spacing
from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.transforms.observations import LRObservations, lr_observations

__all__ = ["ObservationBatches", "intensity_scales", "subject_observations", "mi_probe"]


class ObservationBatches:
    """Re-iterable shuffled batches of observation indices (a new seeded permutation per epoch)."""

    def __init__(self, total: int, batch_size: int, seed: int):
        self.total, self.batch_size = int(total), int(batch_size)
        self.gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.total, generator=self.gen)
        return iter(perm.split(self.batch_size))


def intensity_scales(lr: Mapping[str, MetaTensor]) -> dict[str, float]:
    """Per contrast: the 99.5th percentile of the scan's non-zero voxels (1.0 for an all-zero scan)."""
    scales = {}
    for c in CONTRASTS:
        x = plain_tensor(lr[c]).float()
        scales[c] = float(intensity_scale(x, x != 0)) if bool((x != 0).any()) else 1.0
    return scales


def subject_observations(lr: Mapping[str, MetaTensor], scales: Mapping[str, float], normalizer: WorldNormalizer,
                         options: SubjectFitOptions, device: torch.device) -> dict[str, LRObservations]:
    """Both scans' observations under ``options`` (forward model, profile, taps, mask), on ``device``."""
    out = {}
    for c in CONTRASTS:
        obs = lr_observations(lr[c], scales[c], normalizer, options.forward_model, options.profile,
                              options.tap_threshold, options.mask_dilation)
        names = ("centres", "targets", "slab", "offsets", "weights", "step", "thick_axis", "factor")
        fields = [getattr(obs, f) for f in names]
        out[c] = LRObservations(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in fields))
    return out


def mi_probe(lr: Mapping[str, MetaTensor], normalizer: WorldNormalizer, points: int, seed: int) -> torch.Tensor:
    """Normalised positions ``(n, 3)`` of a fixed sample of ``points`` HR voxels inside the inputs' brain mask.

    The HR grid is the T1w field of view at the finest LR spacing; the mask is where both LR scans,
    interpolated trilinearly, are non-zero.
    """
    t1 = lr["t1"]
    finest = float(min(spacing(lr[c].affine).min() for c in CONTRASTS))
    grid = TargetGrid.from_spacing(t1.shape[-3:], t1.affine, finest)
    world = grid.world_coords(torch.float64).reshape(-1, 3)
    inside = torch.ones(len(world), dtype=torch.bool)
    for c in CONTRASTS:
        v = sample_at_world(plain_tensor(lr[c]).float()[None], as_affine(lr[c].affine), world[None].float(),
                            padding_mode="zeros")[0, 0]
        inside &= v > 0
    idx = torch.nonzero(inside)[:, 0]
    if idx.numel() > points:
        pick = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(int(seed)))[:points]
        idx = idx[pick.sort().values]
    return normalizer(world[idx]).float()
