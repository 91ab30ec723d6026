"""I3Net: inter- and intra-slice interpolation network, a CPU-sized RE-IMPLEMENTATION of

    H. Song, X. Mao, J. Yu, Q. Li, Y. Wang, "I3Net: Inter-Intra-slice Interpolation Network
    for Medical Slice Synthesis", IEEE TMI 2024 (written from the paper, no code copied).

I3Net synthesises the missing slices in the ACQUISITION plane (the slices perpendicular to the
thick axis, "axial" in the paper) from the neighbouring acquired slices. Input: the canonical
layout of :mod:`nexus_monai.baselines.slice_stack` with neighbours,
``(B, 3 + n, X, Y, Z)``, thick axis last, channels ``[B-spline base, t, 1/k, LR slice
floor(u) - n/2 + 1, ..., floor(u) + n/2]`` where ``u`` is the HR slice's position in LR slice
units; every output slice ``Z = z`` is predicted by a 2D network on the ``(X, Y)`` plane.

* Inter-slice (through-plane) branch: convolutions over the stacked neighbour slices (the
  channel dimension carries the through-plane information).
* Intra-slice (in-plane) branch: features go to the frequency domain with an orthonormal 2D
  DCT-II; every frequency's feature vector is layer-normalised (so all frequency bands get the
  same scale and learning opportunity) and mixed by a channel MLP, then brought back with the
  inverse DCT: global in-plane context at linear cost in the number of frequencies.
* :class:`I2Block` adds both branches to its input; the head/tail convs and a residual over the
  B-spline base complete the network.

Differences from the paper (CPU-sized, stated in the bundle docs): the windowed MLP-Mixer on
DCT features is a per-frequency channel MLP over the whole plane (no windows, no token mixing),
and the cross-view block (online fusion with the coronal/sagittal views) is not implemented.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nexus_monai.networks.slice_sr import over_slices

__all__ = ["I3Net", "I2Block", "dct_matrix"]


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: ``C @ x`` transforms, ``C.T @ y`` inverts."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


class _FrequencyMixer(nn.Module):
    """DCT -> per-frequency LayerNorm over channels -> channel MLP -> inverse DCT. ``(N, F, H, W)``."""

    def __init__(self, features: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.mlp = nn.Sequential(nn.Linear(features, features * expansion), nn.GELU(),
                                 nn.Linear(features * expansion, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch, cw = dct_matrix(x.shape[-2], x.dtype, x.device), dct_matrix(x.shape[-1], x.dtype, x.device)
        f = ch @ x @ cw.T  # (N, F, H, W) frequencies
        f = self.mlp(self.norm(f.movedim(1, -1))).movedim(-1, 1)
        return ch.T @ f @ cw


class I2Block(nn.Module):
    """Inter-intra-slice block: ``x + inter(x) + intra(x)``, ``(N, F, H, W) -> (N, F, H, W)``."""

    def __init__(self, features: int):
        super().__init__()
        self.inter = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(features, features, 3, padding=1))
        self.intra = _FrequencyMixer(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inter(x) + self.intra(x)


class _I3Net2d(nn.Module):
    def __init__(self, in_channels: int, features: int, blocks: int):
        super().__init__()
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.blocks = nn.Sequential(*[I2Block(features) for _ in range(blocks)])
        self.tail = nn.Conv2d(features, 1, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return x[:, :1] + self.tail(h + self.blocks(h))


class I3Net(nn.Module):
    """``(B, 3 + neighbours, X, Y, Z) -> (B, 1, X, Y, Z)``, one 2D pass per acquisition-plane slice.

    Args:
        neighbours: acquired (LR) slices around each output slice given as channels (even).
        features: feature maps of the 2D network.
        blocks: :class:`I2Block` count.
        slice_chunk: slices per network call (memory bound on whole volumes).
    """

    def __init__(self, neighbours: int = 4, features: int = 32, blocks: int = 3, slice_chunk: int = 32):
        super().__init__()
        self.in_channels = 3 + int(neighbours)
        self.net = _I3Net2d(self.in_channels, features, blocks)
        self.slice_chunk = int(slice_chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3Net expects (B, {self.in_channels}, X, Y, Z) with the thick axis last, got "
                             f"{tuple(x.shape)}")
        return over_slices(self.net, x, 2, self.slice_chunk)
