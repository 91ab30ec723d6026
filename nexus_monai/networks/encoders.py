"""3D convolutional feature encoders for implicit super-resolution (shape-preserving).

Every encoder maps an LR volume ``(B, in_channels, x, y, z)`` to a feature map
``(B, features, x, y, z)`` on the SAME voxel grid (no up/down-sampling: the implicit decoder
does the upsampling by looking features up at world coordinates), so the input's affine is the
feature map's affine.

* :class:`RDN` -- residual dense network (Zhang et al., CVPR 2018), as the 3D encoder of ArSSR and
  Nexus-INR (paper: feature dim 128).
* :class:`SRResNet` -- residual blocks of SRGAN's generator (Ledig et al., CVPR 2017) without the
  upsampling tail.
* :class:`ResCNN` -- plain conv/ReLU stack with a global residual (Du et al., 2020).

:func:`build_encoder` chooses one by name (``"rdn" | "srresnet" | "rescnn"``), so configs pick it.

Inference speed: inside :func:`channels_last_convs` every encoder convolution runs on
channels-last (NDHWC) tensors -- oneDNN's fast direct 3D convolution on this layout -- and the
1 x 1 x 1 convolutions become one GEMM over the voxels (oneDNN's channels-last 1 x 1 x 1 kernel is
slow on CPU). Same parameters, same state dict, same values up to float rounding; training and
any code outside the context use the ordinary ``nn.Conv3d`` path.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RDN", "SRResNet", "ResCNN", "build_encoder", "ENCODERS", "EncoderConv3d", "channels_last_convs"]

_CL = torch.channels_last_3d
_LAYOUT = threading.local()  # per thread: the serving workers infer on threads


@contextmanager
def channels_last_convs(enabled: bool = True):
    """While active (in this thread), :class:`EncoderConv3d` layers compute in channels-last layout."""
    previous = getattr(_LAYOUT, "channels_last", False)
    _LAYOUT.channels_last = bool(enabled)
    try:
        yield
    finally:
        _LAYOUT.channels_last = previous


class EncoderConv3d(nn.Conv3d):
    """``nn.Conv3d`` (stride 1, 'same' padding) with the channels-last inference path of :func:`channels_last_convs`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(_LAYOUT, "channels_last", False) or x.dim() != 5:
            return super().forward(x)
        x = x.contiguous(memory_format=_CL)
        if self.kernel_size == (1, 1, 1) and self.groups == 1:  # a GEMM over voxels: (N*D*H*W, Cin) x (Cin, Cout)
            n, c, d, h, w = x.shape
            rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)
            weight = self.weight.reshape(self.out_channels, c).t()
            y = torch.addmm(self.bias, rows, weight) if self.bias is not None else rows @ weight
            return y.reshape(n, d, h, w, self.out_channels).permute(0, 4, 1, 2, 3)
        return F.conv3d(x, self.weight.contiguous(memory_format=_CL), self.bias, self.stride, self.padding,
                        self.dilation,
                        self.groups)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv3d:
    return EncoderConv3d(cin, cout, k, padding=k // 2)


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.conv = _conv(cin, growth)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.act(self.conv(x))), dim=1)


class _ResidualDenseBlock(nn.Module):
    """``layers`` densely connected 3x3x3 convs (growth ``growth``), 1x1x1 local fusion, local residual."""

    def __init__(self, features: int, growth: int, layers: int):
        super().__init__()
        self.dense = nn.Sequential(*[_DenseLayer(features + i * growth, growth) for i in range(layers)])
        self.fuse = _conv(features + layers * growth, features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(self.dense(x))


class RDN(nn.Module):
    """Residual dense network encoder: ``(B, in_channels, x, y, z) -> (B, features, x, y, z)``.

    Args:
        in_channels: input channels (1 per modality).
        features: G0, the feature dimension of every block and of the output (paper: 128).
        blocks: D, number of residual dense blocks.
        layers: C, conv layers per block.
        growth: G, growth rate of the dense layers.
    """

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 3, layers: int = 4, growth: int = 32):
        super().__init__()
        self.out_channels = features
        self.shallow1 = _conv(in_channels, features)
        self.shallow2 = _conv(features, features)
        self.blocks = nn.ModuleList([_ResidualDenseBlock(features, growth, layers) for _ in range(blocks)])
        self.global_fuse = nn.Sequential(_conv(blocks * features, features, 1), _conv(features, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f_1 = self.shallow1(x)
        h = self.shallow2(f_1)
        outs = []
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return f_1 + self.global_fuse(torch.cat(outs, dim=1))


class _ResBlock(nn.Module):
    def __init__(self, features: int, norm: bool):
        super().__init__()
        layers = [_conv(features, features)]
        layers += [nn.BatchNorm3d(features)] if norm else []
        layers += [nn.PReLU(features), _conv(features, features)]
        layers += [nn.BatchNorm3d(features)] if norm else []
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet encoder: ``(B, in_channels, x, y, z) -> (B, features, x, y, z)``.

    Args:
        features: feature dimension (output channels).
        blocks: residual blocks (conv-[BN]-PReLU-conv-[BN] + skip).
        norm: batch norm inside the blocks as in SRGAN (off by default: tiny batches of patches).
    """

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 8, norm: bool = False):
        super().__init__()
        self.out_channels = features
        self.head = nn.Sequential(_conv(in_channels, features, 3), nn.PReLU(features))
        self.body = nn.Sequential(*[_ResBlock(features, norm) for _ in range(blocks)])
        self.tail = _conv(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return h + self.tail(self.body(h))


class ResCNN(nn.Module):
    """ResCNN encoder: conv + ``depth`` conv/ReLU layers + global residual.

    ``(B, in_channels, x, y, z) -> (B, features, x, y, z)``.
    """

    def __init__(self, in_channels: int = 1, features: int = 64, depth: int = 8):
        super().__init__()
        self.out_channels = features
        self.head = _conv(in_channels, features)
        body = []
        for _ in range(depth):
            body += [_conv(features, features), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return h + self.body(h)


ENCODERS = {"rdn": RDN, "srresnet": SRResNet, "rescnn": ResCNN}


def build_encoder(name: str, in_channels: int = 1, features: int = 64, **options) -> nn.Module:
    """An encoder by name (``rdn``, ``srresnet``, ``rescnn``) with its own keyword options."""
    key = str(name).lower()
    if key not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[key](in_channels=in_channels, features=features, **options)
