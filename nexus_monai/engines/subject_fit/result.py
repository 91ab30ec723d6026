"""A fitted subject: rendering the SSMCSR INR on any grid, in the input scans' intensity units."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from monai.data import MetaTensor

from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, plain_tensor, sample_at_world
from nexus_monai.keys import CONTRASTS
from nexus_monai.networks.ssmcsr import SSMCSRNet
from nexus_monai.transforms.query import iter_query_chunks

__all__ = ["SubjectFit", "render_grid"]


@torch.no_grad()
def render_grid(network: torch.nn.Module, normalizer: WorldNormalizer, lr: Mapping[str, torch.Tensor], grid: TargetGrid,
                chunk_size: int = 32768, skip_empty: bool = True) -> dict[str, torch.Tensor]:
    """The INR on every voxel of ``grid`` -> ``{"t1": (X, Y, Z), "t2": ...}`` in the network's intensity units.

    Decoded in chunks of ``chunk_size`` points (bounded memory). With ``skip_empty`` points where
    BOTH LR scans interpolate to exactly 0 (no signal within one LR voxel) are 0 and not decoded.
    """
    was_training = network.training
    network.eval()
    out = torch.zeros(grid.num_voxels, 2)
    vols = {c: plain_tensor(lr[c]).float()[None] for c in CONTRASTS}
    affines = {c: as_affine(lr[c].affine) for c in CONTRASTS}
    for start, stop, world, norm in iter_query_chunks(grid, normalizer, chunk_size):
        if skip_empty:
            signal = sum(sample_at_world(vols[c], affines[c], world[None], padding_mode="zeros")[0, 0].abs()
                         for c in CONTRASTS)
            keep = torch.nonzero(signal > 0)[:, 0]
            if keep.numel():
                out[start:stop][keep] = network(norm[keep]).float()
        else:
            out[start:stop] = network(norm).float()
    network.train(was_training)
    return {c: out[:, i].reshape(grid.shape) for i, c in enumerate(CONTRASTS)}


@dataclass
class SubjectFit:
    """A fitted subject: the network, its normaliser, the per-contrast intensity scales and the log."""

    network: SSMCSRNet
    normalizer: WorldNormalizer
    scales: dict
    lr: dict
    log: dict = field(default_factory=dict)
    chunk_size: int = 32768

    def predict(self, grid: TargetGrid) -> dict[str, MetaTensor]:
        """Both contrasts on ``grid`` as ``(1, X, Y, Z)`` MetaTensors with the grid's affine, input units."""
        t0 = time.perf_counter()
        pred = render_grid(self.network, self.normalizer, self.lr, grid, self.chunk_size)
        self.log["seconds_predict"] = round(time.perf_counter() - t0, 3)
        self.log["output_grid"] = {"shape": list(grid.shape), "spacing_mm": [round(float(s), 4) for s in grid.spacing]}
        return {c: MetaTensor((pred[c] * self.scales[c])[None], affine=grid.affine.clone()) for c in CONTRASTS}
