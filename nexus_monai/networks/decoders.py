"""Implicit decoders: per-point MLPs mapping a query vector to intensities.

``(..., in_features) -> (..., out_features)``; they act on the last dimension only, so the
same module decodes ``(B, K, D)`` training batches and ``(N, D)`` inference chunks.

* :class:`MLPDecoder` -- ``hidden_layers`` x ``hidden`` ReLU layers (paper: 4 x 256).
* :class:`SIRENDecoder` -- sine activations with SIREN's initialisation (Sitzmann et al., 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLPDecoder", "SIRENDecoder", "build_decoder", "DECODERS"]


class MLPDecoder(nn.Module):
    """``(..., in_features) -> (..., out_features)`` through ``hidden_layers`` ReLU layers of width ``hidden``."""

    def __init__(self, in_features: int, out_features: int = 1, hidden: int = 256, hidden_layers: int = 4):
        super().__init__()
        layers, width = [], in_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Sine(nn.Module):
    def __init__(self, cin: int, cout: int, w0: float, first: bool):
        super().__init__()
        self.linear = nn.Linear(cin, cout)
        self.w0 = w0
        bound = 1.0 / cin if first else math.sqrt(6.0 / cin) / w0
        nn.init.uniform_(self.linear.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * self.linear(x))


class SIRENDecoder(nn.Module):
    """SIREN: ``hidden_layers`` sine layers (``sin(w0 * (Wx + b))``) and a linear output layer.

    ``(..., in_features) -> (..., out_features)``; ``w0`` = 30 as in the SIREN paper.
    """

    def __init__(self, in_features: int, out_features: int = 1, hidden: int = 256, hidden_layers: int = 4,
                 w0: float = 30.0):
        super().__init__()
        layers, width = [], in_features
        for i in range(hidden_layers):
            layers.append(_Sine(width, hidden, w0, first=i == 0))
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_features)
        bound = math.sqrt(6.0 / width) / w0
        nn.init.uniform_(self.out.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))


DECODERS = {"mlp": MLPDecoder, "siren": SIRENDecoder}


def build_decoder(name: str, in_features: int, out_features: int = 1, **options) -> nn.Module:
    """A decoder by name (``mlp``, ``siren``)."""
    key = str(name).lower()
    if key not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[key](in_features=in_features, out_features=out_features, **options)
