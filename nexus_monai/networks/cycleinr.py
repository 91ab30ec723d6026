"""CycleINR (Fang et al., CVPR 2024), re-implemented from the paper (no public code).

A single-contrast local implicit function that upsamples a thick-slice volume along its thick
axis: an encoder turns the LR volume ``(B, 1, x, y, z)`` into latent codes on the SAME LR grid,
a query point (a world position, mm) is mapped into that grid through the volume's own affine,
and its latent is obtained by **local-attention latent sampling** -- the trilinearly sampled
latent attends to the latent codes of the ``attn_window`` LR voxels around it (with the offsets
embedded) instead of being the plain trilinear lookup -- and decoded by an MLP with the offset
inside the LR voxel (LIIF-style). The paper's cycle-consistency loss (the SR output re-degraded
by the acquisition operator must give back the LR input) lives in
:mod:`nexus_monai.losses.cycleinr`; training in :mod:`nexus_monai.engines.cycleinr`.

Choices where the paper is silent or CPU-sized (ours): encoders from
:mod:`~nexus_monai.networks.encoders` (RDN default), the attention block
:class:`~nexus_monai.networks.attention.LocalWindowCrossAttention` (3 x 3 x 3 LR voxels, 4 heads),
and ``residual=True`` (the decoder predicts a correction over the trilinear LR intensity).

:class:`CycleINRPair` applies ONE CycleINR per contrast (T1w and T2w each get their own weights;
no information crosses contrasts) behind the ``encode`` / ``decode`` interface of
:class:`~nexus_monai.networks.nexus_inr.NexusINR`, so
:class:`~nexus_monai.engines.inr.ImplicitGridInferer`, ``predict_volumes`` and the bundle
machinery run it unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from nexus_monai.geometry import sample_at_voxel
from nexus_monai.keys import CONTRASTS
from nexus_monai.networks.attention import LocalWindowCrossAttention
from nexus_monai.networks.decoders import build_decoder
from nexus_monai.networks.encoders import build_encoder
from nexus_monai.networks.nexus_inr import lookup

__all__ = ["CycleINR", "CycleINRPair"]


class CycleINR(nn.Module):
    """Single-contrast CycleINR: LR volume + world query points -> intensities at the points.

    Args:
        encoder: ``"rdn" | "srresnet" | "rescnn"``; ``encoder_options`` go to its constructor.
        features: latent code dimension C.
        decoder: ``"mlp" | "siren"``, ``decoder_hidden`` x ``decoder_layers``.
        local_attention: local-attention latent sampling (off: plain trilinear lookup, ablation).
        attn_heads, attn_window: heads and window (LR voxels per axis, odd) of the attention.
        residual: predict a correction over the trilinear LR intensity (ours, see module doc).
    """

    def __init__(
        self,
        encoder: str = "rdn",
        features: int = 32,
        encoder_options: Mapping | None = None,
        decoder: str = "mlp",
        decoder_hidden: int = 128,
        decoder_layers: int = 4,
        local_attention: bool = True,
        attn_heads: int = 4,
        attn_window: Sequence[int] = (3, 3, 3),
        residual: bool = True,
    ):
        super().__init__()
        self.features = int(features)
        self.local_attention, self.residual = bool(local_attention), bool(residual)
        self.encoder = build_encoder(encoder, 1, self.features, **dict(encoder_options or {}))
        self.attention = LocalWindowCrossAttention(self.features, attn_heads,
                                                   attn_window) if self.local_attention else None
        self.decoder = build_decoder(decoder, self.features + 3 + 1, 1, hidden=decoder_hidden,
                                     hidden_layers=decoder_layers)

    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 1, x, y, z)`` -> ``{"latent": (B, C, x, y, z)}`` (+ the attention's projected keys)."""
        latent = self.encoder(image)
        out = {"latent": latent}
        if self.attention is not None:
            out["kv"] = self.attention.project_keys(latent)
        return out

    def query(self, encoded: Mapping[str, torch.Tensor], image: torch.Tensor, affine: torch.Tensor,
              world: torch.Tensor) -> torch.Tensor:
        """Intensities ``(B, K)`` at world points ``(B, K, 3)`` mm; ``affine`` ``(B, 4, 4)`` is the LR scan's."""
        z, index = lookup(encoded["latent"], affine, world)  # (B, K, C), continuous LR voxel index
        if self.attention is not None:
            z = self.attention(z, encoded["latent"], index, encoded.get("kv"))
        x = sample_at_voxel(image, index)[:, 0]  # (B, K) trilinear LR intensity
        rel = 2.0 * (index - torch.round(index))  # offset inside the LR voxel, [-1, 1] per axis
        y = self.decoder(torch.cat((z, rel, x[..., None]), dim=-1))[..., 0]
        return y + x if self.residual else y

    def forward(self, image: torch.Tensor, affine: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
        """``image (B, 1, x, y, z)``, ``affine (B, 4, 4)``, ``world (B, K, 3)`` -> ``(B, K)``."""
        return self.query(self.encode(image), image, affine, world)


class CycleINRPair(nn.Module):
    """One :class:`CycleINR` per contrast behind the two-contrast ``encode`` / ``decode`` interface.

    Keyword arguments are those of :class:`CycleINR`, used for both contrasts.
    """

    def __init__(self, **options):
        super().__init__()
        self.nets = nn.ModuleDict({c: CycleINR(**options) for c in CONTRASTS})

    def encode(self, t1: torch.Tensor, t2: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Latent codes of each LR scan on its own grid: ``{"t1": {...}, "t2": {...}}``."""
        return {c: self.nets[c].encode(img) for c, img in zip(CONTRASTS, (t1, t2))}

    def decode(self, maps: Mapping, t1: torch.Tensor, t2: torch.Tensor, t1_affine: torch.Tensor,
               t2_affine: torch.Tensor,
               query_world: torch.Tensor, query_norm: torch.Tensor | None = None, aux: bool = False) -> dict[str,
               torch.Tensor]:
        """Both contrasts at ``query_world (B, K, 3)`` -> ``{"t1": (B, K), "t2": (B, K)}``.

        ``query_norm`` and ``aux`` are accepted for interface compatibility and unused (CycleINR
        has no absolute positional encoding and no auxiliary outputs).
        """
        images, affines = {"t1": t1, "t2": t2}, {"t1": t1_affine, "t2": t2_affine}
        return {c: self.nets[c].query(maps[c], images[c], affines[c], query_world) for c in CONTRASTS}

    def forward(self, t1, t2, t1_affine, t2_affine, query_world, query_norm=None, aux: bool = False) -> dict[str,
                                                                                                             torch.Tensor]:
        return self.decode(self.encode(t1, t2), t1, t2, t1_affine, t2_affine, query_world, query_norm, aux)
