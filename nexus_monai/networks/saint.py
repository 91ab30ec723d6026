"""SAINT network: spatially aware slice interpolation, a CPU-sized RE-IMPLEMENTATION of

    C. Peng, W.-A. Lin, H. Liao, R. Chellappa, S. K. Zhou, "SAINT: Spatially Aware
    Interpolation NeTwork for Medical Slice Synthesis", CVPR 2020 (written from the paper).

Input: the canonical thick-slice layout of :mod:`nexus_monai.baselines.slice_stack`,
``(B, 3, X, Y, Z)`` with the thick axis last and channels ``[B-spline base, t, 1/k]``: ``t`` is
the position of each HR slice between its two LR neighbours (0..1) and ``1/k`` the inverse
factor (the voxel-spacing information SAINT conditions on, so one model serves every factor).
Output ``(B, 1, X, Y, Z)``.

Stage 1, marginal super-resolution: ONE 2D network (:class:`~nexus_monai.networks.slice_sr.ResidualSR2d`)
applied to the sagittal (``X`` fixed: images over ``(Y, Z)``) and the coronal (``Y`` fixed:
``(X, Z)``) slices, which both contain the thick axis. Stage 2, residual fusion: a 2D network on
the axial slices (``Z`` fixed: ``(X, Y)``) takes the two stage-1 volumes as channels and adds a
residual to their mean.

Differences from the paper (CPU-sized, stated in the bundle docs): SAINT's upsampling layer
generates its filters from the spacing; here the network refines a cubic B-spline
interpolation and sees the spacing as the ``t``/``1/k`` channels; the two stages are trained
jointly end to end (L1 on the fused output) instead of one after the other.
"""

from __future__ import annotations

import torch
from torch import nn

from nexus_monai.networks.slice_sr import ResidualSR2d, over_slices

__all__ = ["SAINT"]


class SAINT(nn.Module):
    """``(B, 3, X, Y, Z) -> (B, 1, X, Y, Z)`` (thick axis Z; channels base, t, 1/k).

    Args:
        features, blocks: stage-1 (marginal SR) network width and depth.
        fusion_features, fusion_blocks: stage-2 (residual fusion) network width and depth.
        res_scale: residual scaling of both networks.
        slice_chunk: 2D slices per network call (memory bound on whole volumes).
    """

    def __init__(self, features: int = 32, blocks: int = 4, fusion_features: int = 16, fusion_blocks: int = 2,
                 res_scale: float = 1.0, slice_chunk: int = 64):
        super().__init__()
        self.msr = ResidualSR2d(3, features, blocks, res_scale, base="first")
        self.fusion = ResidualSR2d(2, fusion_features, fusion_blocks, res_scale, base="mean")
        self.slice_chunk = int(slice_chunk)

    def marginal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: the sagittal and coronal estimates, each ``(B, 1, X, Y, Z)``."""
        return over_slices(self.msr, x, 0, self.slice_chunk), over_slices(self.msr, x, 1, self.slice_chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"SAINT expects (B, 3, X, Y, Z) = [base, t, 1/k] with the thick axis last, got "
                             f"{tuple(x.shape)}")
        sag, cor = self.marginal(x)
        return over_slices(self.fusion, torch.cat((sag, cor), dim=1), 2, self.slice_chunk)
