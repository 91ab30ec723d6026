"""LR observations of a scan for fitting an implicit field through the acquisition model.

Every LR voxel of a scan inside its signal mask is one observation: its world position (as
normalised coordinates of a subject's :class:`~nexus_monai.geometry.WorldNormalizer`), its intensity
and how a field renders it: the ``point`` model (the field at the voxel centre) or the ``profile``
model (the slice-profile-weighted average of the field at the HR sample positions of its slab along
the thick axis, with the weights of :func:`~nexus_monai.transforms.acquisition.slice_profile_matrix`
on the scan's natural HR grid). Used by SSMCSR's subject fit (:mod:`nexus_monai.engines.subject_fit`)
and the test-time refinement of Nexus-INR (:mod:`nexus_monai.engines.refine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import WorldNormalizer, as_affine, plain_tensor, voxel_to_world
from nexus_monai.transforms.acquisition import num_thick_slices, slice_profile_matrix
from nexus_monai.transforms.consistency import natural_hr_grid, thick_axis_of

__all__ = ["LRObservations", "lr_observations"]


def _source(img, default: str) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj") or default)


@dataclass
class LRObservations:
    """The observed voxels of one LR scan and how the INR renders them.

    ``centres``: ``(N, 3)`` normalised positions of the LR voxel centres; ``targets``: ``(N,)``
    scaled intensities; ``slab``: ``(N,)`` index of each voxel's slab (its LR index along the thick
    axis); ``offsets`` / ``weights``: ``(M, T)`` tap positions (HR voxels from the slab centre) and
    weights per slab (padded taps have weight 0); ``step``: ``(3,)`` one HR voxel along the thick
    axis, in normalised units. The point model is ``T = 1``, offset 0, weight 1.
    """

    centres: torch.Tensor
    targets: torch.Tensor
    slab: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor
    step: torch.Tensor
    thick_axis: int | None = None
    factor: float = 1.0

    @property
    def taps(self) -> int:
        return int(self.offsets.shape[1])

    def render(self, network: torch.nn.Module, index: torch.Tensor, channel: int, point: bool = False) -> torch.Tensor:
        """Predicted LR intensities ``(B,)`` of observations ``index`` ``(B,)`` from output ``channel``
        (``point``: the INR at the voxel centres, whatever the forward model)."""
        if point:
            return network(self.centres[index])[..., channel]
        slab = self.slab[index]
        off, w = self.offsets[slab], self.weights[slab]  # (B, T)
        pts = self.centres[index][:, None, :] + off[..., None] * self.step  # (B, T, 3)
        out = network(pts)[..., channel]
        return (out * w).sum(-1)


def _profile_taps(n_slabs: int, factor: float, profile: str, tap_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slab tap offsets (HR voxels from the slab centre) and weights, ``(M, T)`` each."""
    n_hr = int(math.ceil(n_slabs * factor - 1e-6))
    if num_thick_slices(n_hr, factor) != n_slabs:
        n_hr += 1
    w = slice_profile_matrix(n_hr, factor, profile)[:n_slabs]  # (M, n_hr) the acquisition operator
    keep = w > tap_threshold * w.max(dim=1, keepdim=True).values
    w = torch.where(keep, w, torch.zeros_like(w))
    w = w / w.sum(dim=1, keepdim=True)
    taps = int(keep.sum(1).max())
    centre = torch.arange(n_slabs, dtype=torch.float64) * factor + (factor - 1.0) / 2.0
    offsets = torch.zeros(n_slabs, taps, dtype=torch.float64)
    weights = torch.zeros(n_slabs, taps, dtype=torch.float64)
    for n in range(n_slabs):
        idx = torch.nonzero(keep[n])[:, 0]
        offsets[n, : idx.numel()] = idx.to(torch.float64) - centre[n]
        weights[n, : idx.numel()] = w[n, idx]
    return offsets.float(), weights.float()


def lr_observations(lr: MetaTensor, scale: float, normalizer: WorldNormalizer, forward_model: str = "point",
                    profile: str = "gaussian", tap_threshold: float = 0.02, mask_dilation: int = 1) -> LRObservations:
    """Observations of one LR scan ``(1, x, y, z)`` (see :class:`LRObservations`)."""
    src = _source(lr, "LR scan")
    x = plain_tensor(lr)[0].float() / scale
    affine = as_affine(lr.affine)
    signal = (x != 0).numpy()
    if not signal.any():
        raise NexusInputError(src, "the scan has no non-zero voxel to fit")
    mask = ndimage.binary_dilation(signal, iterations=int(mask_dilation)) if mask_dilation > 0 else signal
    index = torch.as_tensor(np.argwhere(mask))
    centres = normalizer(voxel_to_world(index.to(torch.float64), affine)).float()
    targets = x[index[:, 0], index[:, 1], index[:, 2]].contiguous()
    axis, factor = None, 1.0
    acquired = (getattr(lr, "meta", None) or {}).get("acquisition")
    if forward_model == "profile" and isinstance(acquired, Mapping) and float(acquired.get("factor", 1.0)) > 1.0:
        axis, factor = int(acquired["axis"]), float(acquired["factor"])  # simulated here: the exact setting
    elif forward_model == "profile":
        # (None, 1.0) for an isotropic scan: the point model is its exact forward model
        axis, factor = thick_axis_of(MetaTensor(x, affine=affine))
    if axis is None:
        return LRObservations(centres, targets, torch.zeros(len(targets), dtype=torch.long), torch.zeros(1, 1),
                              torch.ones(1, 1), torch.zeros(3), None, 1.0)
    hr = natural_hr_grid(x.shape, affine, axis, factor)
    step = (hr.affine[:3, axis] / normalizer.scale).float()  # one HR voxel along the thick axis
    offsets, weights = _profile_taps(x.shape[axis], factor, profile, tap_threshold)
    return LRObservations(centres, targets, index[:, axis].contiguous(), offsets, weights, step, axis, factor)
