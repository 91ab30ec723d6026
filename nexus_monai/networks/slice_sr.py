"""2D slice super-resolution networks over thick-slice volumes (SMORE, SAINT, I3Net share these).

Convention (the "canonical" thick-slice layout of :mod:`nexus_monai.baselines.slice_stack`): a
volume ``(B, C, X, Y, Z)`` has its thick (through-plane) axis LAST (``Z``) and is already on the
HR grid along it (cubic B-spline pre-upsampled), so every network predicts a residual over that
interpolation and any (non-integer) factor works. Channel 0 of every input is that B-spline base.

* :class:`ResidualSR2d` -- EDSR-style residual CNN (Lim et al., CVPR-W 2017; no upsampling tail,
  as SMORE uses it on pre-interpolated slices): head conv, ``blocks`` residual blocks
  (conv-ReLU-conv, scaled by ``res_scale``), body conv + global skip, tail conv to 1 channel,
  output ``base + tail`` where ``base`` is input channel 0 (or the mean of the channels).
  ``(B, C, H, W) -> (B, 1, H, W)``.
* :func:`over_slices` -- run a 2D network on every slice of a volume along one spatial axis, in
  chunks of slices (bounded memory for whole volumes).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["ResidualSR2d", "over_slices"]


class _ResBlock2d(nn.Module):
    def __init__(self, features: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(features, features, 3, padding=1))
        self.res_scale = float(res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class ResidualSR2d(nn.Module):
    """EDSR-style 2D residual SR network on pre-interpolated slices: ``(B, C, H, W) -> (B, 1, H, W)``.

    Args:
        in_channels: input channels; channel 0 is the interpolated image (the residual's base).
        features: feature maps per conv (EDSR: 64-256; SMORE's default is CPU-sized here).
        blocks: residual blocks.
        res_scale: residual scaling inside the blocks (EDSR: 0.1 for wide models, 1 for small).
        base: ``"first"`` (output = channel 0 + residual) or ``"mean"`` (mean of the input
            channels + residual; SAINT's fusion of several estimates).
    """

    def __init__(self, in_channels: int = 1, features: int = 32, blocks: int = 4, res_scale: float = 1.0,
                 base: str = "first"):
        super().__init__()
        if base not in ("first", "mean"):
            raise ValueError(f"base must be 'first' or 'mean', got {base!r}")
        self.base = base
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock2d(features, res_scale) for _ in range(blocks)],
                                  nn.Conv2d(features, features, 3, padding=1))
        self.tail = nn.Conv2d(features, 1, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # starts as the interpolation itself
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.body(h)
        base = x[:, :1] if self.base == "first" else x.mean(dim=1, keepdim=True)
        return base + self.tail(h)


def over_slices(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axis: int,
                chunk: int = 64) -> torch.Tensor:
    """Apply a 2D ``net`` ``(N, C, H, W) -> (N, C', H, W)`` to every slice of ``x`` along a spatial axis.

    Args:
        x: ``(B, C, X, Y, Z)``.
        axis: spatial axis held fixed per slice: 0 (images over ``(Y, Z)``), 1 (``(X, Z)``) or
            2 (``(X, Y)``). The remaining two axes keep their order, so ``Z`` stays the image's
            last (width) axis whenever it is one of them.
        chunk: slices per network call (memory bound for whole volumes).

    Returns:
        ``(B, C', X, Y, Z)``.
    """
    b, c = x.shape[:2]
    moved = x.movedim(2 + axis, 1)  # (B, S, C, H, W)
    s, h, w = moved.shape[1], moved.shape[3], moved.shape[4]
    flat = moved.reshape(b * s, c, h, w)
    outs = [net(flat[i : i + chunk]) for i in range(0, flat.shape[0], max(1, int(chunk)))]
    out = torch.cat(outs, dim=0)
    return out.reshape(b, s, out.shape[1], h, w).movedim(1, 2 + axis)
