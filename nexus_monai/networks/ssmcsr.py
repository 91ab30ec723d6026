"""SSMCSR (McGinnis et al., MICCAI 2023): a subject-specific multi-contrast implicit neural representation.

One network per subject maps normalised world coordinates (through the subject's ONE
:class:`~nexus_monai.geometry.WorldNormalizer`) to both contrasts:
``(..., 3) -> (..., 2)`` with channel 0 = T1w (contrast 1) and channel 1 = T2w (contrast 2).

Input encoding: Gaussian Fourier features ``[sin(2 pi B p), cos(2 pi B p)]`` with 256 rows of
``B ~ N(0, sigma^2)``, sigma 4 (512 features; :class:`~nexus_monai.networks.positional.FourierFeatures`).

Variants (paper §2 / Table 1; the paper's 1024-wide ReLU trunk of 5 linear layers, heads of 512):

* ``split_head``: shared trunk, then one head per contrast (``Linear(hidden, head_hidden)``,
  ReLU, ``Linear(head_hidden, 1)``);
* ``vanilla``: the same trunk and one linear output layer with 2 outputs;
* ``single``: two independent INRs (trunk + linear output each), one per contrast; they share
  nothing but the fixed Fourier matrix, so fitting them together is fitting them separately.
"""

from __future__ import annotations

import torch
from torch import nn

from nexus_monai.networks.decoders import build_decoder
from nexus_monai.networks.positional import FourierFeatures

__all__ = ["SSMCSRNet", "SSMCSR_VARIANTS"]

SSMCSR_VARIANTS = ("split_head", "vanilla", "single")


def _trunk(in_features: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` x (Linear -> ReLU) of width ``hidden``: ``(..., in) -> (..., hidden)``."""
    if layers < 1:
        raise ValueError(f"trunk_layers must be >= 1, got {layers}")
    return nn.Sequential(build_decoder("mlp", in_features, hidden, hidden=hidden, hidden_layers=layers - 1),
                         nn.ReLU(inplace=True))


class SSMCSRNet(nn.Module):
    """Subject-specific INR: normalised world coordinates ``(..., 3)`` -> ``(..., 2)`` (T1w, T2w).

    Args:
        variant: ``"split_head"``, ``"vanilla"`` or ``"single"`` (see the module docstring).
        num_frequencies: rows of the Gaussian Fourier matrix (features = 2 x rows; paper 256 -> 512).
        sigma: standard deviation of the Fourier matrix entries (paper 4).
        hidden: trunk width (paper 1024).
        trunk_layers: Linear+ReLU layers in the trunk (paper 5: input layer + 4 hidden).
        head_hidden: hidden width of each split head (paper 512).
        seed: seed of the Fourier matrix (the network weights follow torch's global seed).
    """

    def __init__(self, variant: str = "split_head", num_frequencies: int = 256, sigma: float = 4.0, hidden: int = 1024,
                 trunk_layers: int = 5, head_hidden: int = 512, seed: int = 0):
        super().__init__()
        if variant not in SSMCSR_VARIANTS:
            raise ValueError(f"unknown SSMCSR variant {variant!r}; choose one of {', '.join(SSMCSR_VARIANTS)}")
        self.variant = variant
        self.encoding = FourierFeatures(3, num_frequencies, mode="gaussian", sigma=sigma, seed=seed)
        f = self.encoding.out_features
        if variant == "single":
            self.inrs = nn.ModuleList(
                nn.Sequential(_trunk(f, hidden, trunk_layers), nn.Linear(hidden, 1)) for _ in range(2)
            )
        else:
            self.trunk = _trunk(f, hidden, trunk_layers)
            if variant == "split_head":
                self.heads = nn.ModuleList(
                    build_decoder("mlp", hidden, 1, hidden=head_hidden, hidden_layers=1) for _ in range(2)
                )
            else:
                self.out = nn.Linear(hidden, 2)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` ``(..., 3)`` normalised world positions -> ``(..., 2)`` intensities (T1w, T2w)."""
        v = self.encoding(coords)
        if self.variant == "single":
            return torch.cat([inr(v) for inr in self.inrs], dim=-1)
        h = self.trunk(v)
        if self.variant == "split_head":
            return torch.cat([head(h) for head in self.heads], dim=-1)
        return self.out(h)
