"""Fourier positional encoding of normalised world coordinates.

Input: coordinates ``(..., 3)`` already normalised by the subject's ONE
:class:`~nexus_monai.geometry.WorldNormalizer` (about ``[-1, 1]``). Output:
``(..., out_features)`` = ``[sin(2 pi B p), cos(2 pi B p)]`` (plus ``p`` itself when
``include_input``), with ``B``:

* ``"log_linear"``: axis-aligned frequencies ``2^0 .. 2^(L-1)`` (NeRF style), ``3 * 2 * L`` features;
* ``"gaussian"``: ``num_frequencies`` random rows drawn from ``N(0, sigma^2)`` (Tancik et al. 2020;
  SSMCSR uses 256 rows -> 512 features, sigma 4), fixed by ``seed`` and stored as a buffer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FourierFeatures"]


class FourierFeatures(nn.Module):
    """``(..., in_features) -> (..., out_features)`` Fourier features of normalised coordinates."""

    def __init__(self, in_features: int = 3, num_frequencies: int = 6, mode: str = "log_linear", sigma: float = 4.0,
                 include_input: bool = False, seed: int = 0):
        super().__init__()
        if mode == "log_linear":
            freqs = 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
            b = torch.kron(torch.eye(in_features), freqs[:, None])  # (in * L, in)
        elif mode == "gaussian":
            gen = torch.Generator().manual_seed(int(seed))
            b = torch.randn(num_frequencies, in_features, generator=gen) * float(sigma)
        else:
            raise ValueError(f"mode must be 'log_linear' or 'gaussian', got {mode!r}")
        self.register_buffer("B", b)
        self.include_input = include_input
        self.out_features = 2 * b.shape[0] + (in_features if include_input else 0)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * p @ self.B.T
        parts = [torch.sin(proj), torch.cos(proj)] + ([p] if self.include_input else [])
        return torch.cat(parts, dim=-1)
