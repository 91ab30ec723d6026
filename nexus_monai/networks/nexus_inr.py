"""Nexus-INR (Zhang et al. 2025, §3): multi-contrast arbitrary-scale super-resolution with an implicit decoder.

Two LR scans of one subject on their own grids -- T1w ``(B, 1, x1, y1, z1)`` with affine ``A1``
and T2w ``(B, 1, x2, y2, z2)`` with ``A2`` (``(B, 4, 4)``, voxel -> world mm) -- and K query
points per item given as world positions ``(B, K, 3)`` mm (plus the same points normalised by the
subject's ONE :class:`~nexus_monai.geometry.WorldNormalizer`, ``(B, K, 3)``) give both contrasts'
intensities at those points ``(B, K)``.

Pipeline (paper equation numbers):

1. Encoders on the LR grids (eq. 2-3): per modality one encoder (``mmf=False``: the ArSSR-like
   Baseline of Table 2) or a shared + a specific encoder (``mmf=True``). Feature maps stay on the
   LR grids; eq. 4-5's "upsample to the HR grid, then GridSample" is done as ONE trilinear lookup
   at each query's continuous voxel position in that modality's own grid (identical values at the
   query points, no HR feature volume).
2. KD-Attn (eq. 6): the T2w shared feature at a query attends to the T1w shared map in a local
   window (3 x 3 x 3 T1 voxels, 4 heads: linear in voxels); L_KD (eq. 9) and the T2w
   self-reconstruction L_T2Self (eq. 11) are computed from the returned auxiliaries.
   ``bidirectional=True`` (ours, off in the paper setting) lets T1w attend to T2w the same way.
3. MMF (eq. 13-16): ``f_m = proj([z_shared, z_spec]) + z_shared``; CMFA (eq. 18) and FDL
   (eq. 19, a linear modality classifier on ``z_spec``) come from the auxiliaries.
4. SEL (eq. 20-25): a segmentation head per modality on ``f_m`` (logits over BraTS labels
   0/1/2/4 as classes 0..3) and a fusion MLP ``h_m = fuse([f_m, logits])`` (with
   ``sel_residual``, ours: ``h_m = f_m + fuse([f_m, logits])``).
5. Decoder per modality (MLP 4 x 256 or SIREN) on ``[h_m, e_m, r_m, x_m]``: ``e_m`` Fourier
   encoding of the normalised world position (``pe``), ``r_m`` the query's offset inside its LR
   voxel in [-1, 1] (``rel_coord``, LIIF-style), ``x_m`` the trilinear LR intensity
   (``lr_intensity_input``; eq. 24-25 feed only ``[h_m, e_m]``); with ``residual`` the decoder
   predicts a correction added to ``x_m`` (its last layer starts at zero with ``zero_init``).
   With ``cross_input`` (ours) it also gets ``[h_other, x_other]`` (``x_other`` only with
   ``lr_intensity_input``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from nexus_monai.geometry import sample_at_voxel, world_to_voxel
from nexus_monai.keys import (
    CONTRASTS,
    T2_SELF,
    Z_T1_SHARED,
    Z_T2_FUSED,
    Z_T2_SHARED,
    modality_logits_key,
    seg_logits_key,
)
from nexus_monai.networks.attention import LocalWindowCrossAttention
from nexus_monai.networks.decoders import build_decoder
from nexus_monai.networks.encoders import build_encoder
from nexus_monai.networks.positional import FourierFeatures

__all__ = ["NexusINR", "lookup", "NUM_SEG_CLASSES"]

NUM_SEG_CLASSES = 4  # BraTS labels 0, 1, 2, 4 -> classes 0, 1, 2, 3


def lookup(feature_map: torch.Tensor, affine: torch.Tensor, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear lookup of ``(B, C, x, y, z)`` at world points ``(B, K, 3)`` through ``affine`` ``(B, 4, 4)``.

    Returns ``(features (B, K, C), voxel_index (B, K, 3))``; the index is continuous, in the map's grid.
    """
    index = world_to_voxel(world, affine).to(feature_map.dtype)
    return sample_at_voxel(feature_map, index).permute(0, 2, 1), index


def _mlp(cin: int, cout: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


class NexusINR(nn.Module):
    """Nexus-INR with the Table 2 switches and the Table 3/4 encoder/decoder choices.

    Args:
        encoder: ``"rdn" | "srresnet" | "rescnn"``; ``encoder_options`` go to its constructor.
        features: encoder feature dimension C (paper: 128).
        decoder: ``"mlp" | "siren"``; ``decoder_hidden`` x ``decoder_layers`` (paper: 256 x 4).
        mmf: shared + specific encoder per modality with residual fusion (eq. 16).
        kd_attn: T2w-from-T1w local-window cross-attention (eq. 6); ``attn_heads``, ``attn_window``.
        bidirectional: also T1w-from-T2w attention (ours; not in the paper).
        sel: segmentation heads fused back into the features (eq. 20-25).
        pe: Fourier positional encoding of normalised world coordinates;
            ``pe_frequencies`` / ``pe_mode`` / ``pe_sigma`` as in :class:`FourierFeatures`.
        rel_coord: feed the LIIF-style offset inside the LR voxel to the decoder.
        residual: predict a correction over the trilinear LR intensity.
        lr_intensity_input: append the trilinear LR intensity ``x_m`` to the decoder input (ours;
            eq. 24-25 decode ``[h_m, e_m]`` only). Independent of ``residual``, which adds
            ``x_m`` to the decoder's output.
        zero_init: with ``residual``, start the decoders' last layer at zero, so an untrained
            network returns exactly the trilinear intensity; also start every residual fusion
            branch at zero (the attention's output projection, the MMF projection of eq. 16 and,
            with ``sel_residual``, the SEL fusion), so at initialisation the Nexus modules pass
            the per-modality features through unchanged and training starts from the Baseline
            network (ours; a standard residual-learning initialisation that the paper does not
            state. Not measured in isolation: the slow start we measured on the CPU default came
            from the auxiliary losses, see ``AuxLossWarmup``).
        sel_residual: ``h_m = f_m + fuse([f_m, logits])`` instead of eq. 22-23's
            ``h_m = fuse([f_m, logits])`` (ours: the segmentation features are added to, not
            substituted for, the fused features).
        cross_input: each contrast's decoder also receives the OTHER contrast's fused feature
            and trilinear intensity at the query (ours, off in the paper setting: a direct
            cross-modal path beside KD-Attn, as in LIIF-style multi-contrast INRs).
    """

    def __init__(
        self,
        encoder: str = "rdn",
        features: int = 64,
        encoder_options: Mapping | None = None,
        decoder: str = "mlp",
        decoder_hidden: int = 256,
        decoder_layers: int = 4,
        mmf: bool = True,
        kd_attn: bool = True,
        sel: bool = True,
        bidirectional: bool = False,
        attn_heads: int = 4,
        attn_window: Sequence[int] = (3, 3, 3),
        pe: bool = True,
        pe_frequencies: int = 6,
        pe_mode: str = "log_linear",
        pe_sigma: float = 4.0,
        rel_coord: bool = True,
        residual: bool = True,
        zero_init: bool = True,
        cross_input: bool = False,
        sel_residual: bool = False,
        num_seg_classes: int = NUM_SEG_CLASSES,
        lr_intensity_input: bool = True,
    ):
        super().__init__()
        opts = dict(encoder_options or {})
        self.mmf, self.kd_attn, self.sel, self.bidirectional = bool(mmf), bool(kd_attn), bool(sel), bool(bidirectional)
        self.rel_coord, self.residual, self.cross_input = bool(rel_coord), bool(residual), bool(cross_input)
        self.sel_residual, self.lr_intensity_input = bool(sel_residual), bool(lr_intensity_input)
        self.features = int(features)
        c = self.features
        branches = ("shared", "spec") if self.mmf else ("shared",)
        self.encoders = nn.ModuleDict(
            {f"{m}_{b}": build_encoder(encoder, 1, c, **opts) for m in CONTRASTS for b in branches}
        )
        if self.kd_attn:
            self.attn_t2 = LocalWindowCrossAttention(c, attn_heads, attn_window)
            if self.bidirectional:
                self.attn_t1 = LocalWindowCrossAttention(c, attn_heads, attn_window)
        if self.mmf:
            self.proj = nn.ModuleDict({m: _mlp(2 * c, c, c) for m in CONTRASTS})
            self.modality_classifier = nn.Linear(c, 2)
        if self.sel:
            self.seg_head = nn.ModuleDict({m: _mlp(c, num_seg_classes, c) for m in CONTRASTS})
            self.seg_fuse = nn.ModuleDict({m: _mlp(c + num_seg_classes, c, c) for m in CONTRASTS})
        self.pe = FourierFeatures(3, pe_frequencies, pe_mode, pe_sigma) if pe else None
        xin = 1 if self.lr_intensity_input else 0
        in_dim = (
            c
            + (self.pe.out_features if pe else 0)
            + (3 if self.rel_coord else 0)
            + xin
            + ((c + xin) if self.cross_input else 0)
        )
        self.decoders = nn.ModuleDict(
            {
                m: build_decoder(decoder, in_dim, 1, hidden=decoder_hidden, hidden_layers=decoder_layers)
                for m in CONTRASTS
            }
        )
        if self.residual and zero_init:
            branches = list(self.decoders.values())
            if self.kd_attn:
                branches += [self.attn_t2.out] + ([self.attn_t1.out] if self.bidirectional else [])
            if self.mmf:
                branches += list(self.proj.values())
            if self.sel and self.sel_residual:
                branches += list(self.seg_fuse.values())
            for branch in branches:
                last = [mod for mod in branch.modules() if isinstance(mod, nn.Linear)][-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    # -- stage 1: encoders on the LR grids -------------------------------------------------------
    def encode(self, t1: torch.Tensor, t2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps on the LR grids: ``{"t1_shared": (B, C, x1, y1, z1), ..., "t2_spec": ...}``.

        With KD-Attn also the attention's projected keys/values of the key map
        (``"kv_for_t2"``: ``(B, x1 * y1 * z1, 2C)``), computed once per volume.
        """
        images = {"t1": t1, "t2": t2}
        maps = {name: enc(images[name.split("_")[0]]) for name, enc in self.encoders.items()}
        return self.add_attention_keys(maps)

    def add_attention_keys(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add KD-Attn's projected keys/values to the encoder ``maps`` (the hook used by tiled encoding,
        :mod:`nexus_monai.networks.tiling`, which builds the maps of a sub-box of the LR grids)."""
        if self.kd_attn:
            maps["kv_for_t2"] = self.attn_t2.project_keys(maps["t1_shared"])
            if self.bidirectional:
                maps["kv_for_t1"] = self.attn_t1.project_keys(maps["t2_shared"])
        return maps

    # -- stage 2: everything at the query points ---------------------------------------------------
    def decode(
        self,
        maps: Mapping[str, torch.Tensor],
        t1: torch.Tensor,
        t2: torch.Tensor,
        t1_affine: torch.Tensor,
        t2_affine: torch.Tensor,
        query_world: torch.Tensor,
        query_norm: torch.Tensor | None = None,
        aux: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Both contrasts at ``query_world`` ``(B, K, 3)`` -> ``{"t1": (B, K), "t2": (B, K)}`` (+ auxiliaries)."""
        images = {"t1": t1, "t2": t2}
        affines = {"t1": t1_affine, "t2": t2_affine}
        z, idx, x, rel = {}, {}, {}, {}
        for m in CONTRASTS:
            z[f"{m}_shared"], idx[m] = lookup(maps[f"{m}_shared"], affines[m], query_world)
            x[m] = sample_at_voxel(images[m], idx[m])[:, 0]  # (B, K) trilinear LR intensity
            rel[m] = 2.0 * (idx[m] - torch.round(idx[m]))  # offset inside the LR voxel, [-1, 1]
            if self.mmf:
                z[f"{m}_spec"] = sample_at_voxel(maps[f"{m}_spec"], idx[m]).permute(0, 2, 1)
        out: dict[str, torch.Tensor] = {}
        shared = {"t1": z["t1_shared"], "t2": z["t2_shared"]}
        if self.kd_attn:
            shared["t2"] = self.attn_t2(z["t2_shared"], maps["t1_shared"], idx["t1"], maps.get("kv_for_t2"))
            if self.bidirectional:
                shared["t1"] = self.attn_t1(z["t1_shared"], maps["t2_shared"], idx["t2"], maps.get("kv_for_t1"))
        f = {}
        for m in CONTRASTS:
            f[m] = self.proj[m](torch.cat((shared[m], z[f"{m}_spec"]), -1)) + shared[m] if self.mmf else shared[m]
        h = dict(f)
        if self.sel:
            for m in CONTRASTS:
                logits = self.seg_head[m](f[m])
                h[m] = self.seg_fuse[m](torch.cat((f[m], logits), -1)) + (f[m] if self.sel_residual else 0)
                out[seg_logits_key(m)] = logits
        e = self.pe(query_norm) if self.pe is not None else None
        for m in CONTRASTS:
            other = "t2" if m == "t1" else "t1"
            cross = self._cross(h[other], x[other]) if self.cross_input else None
            out[m] = self._decode_one(m, h[m], e, rel[m], x[m], cross)
        if aux:
            out[Z_T1_SHARED] = z["t1_shared"]
            out[Z_T2_SHARED] = z["t2_shared"]
            out[Z_T2_FUSED] = shared["t2"]
            if self.kd_attn:  # eq. 10-11: the unfused T2w shared feature through the T2w decoder
                cross = self._cross(h["t1"], x["t1"]) if self.cross_input else None
                out[T2_SELF] = self._decode_one("t2", z["t2_shared"], e, rel["t2"], x["t2"], cross)
            if self.mmf:
                for m in CONTRASTS:
                    out[modality_logits_key(m)] = self.modality_classifier(z[f"{m}_spec"])
        return out

    def _cross(self, h_other: torch.Tensor, x_other: torch.Tensor) -> torch.Tensor:
        return torch.cat((h_other, x_other[..., None]), -1) if self.lr_intensity_input else h_other

    def _decode_one(self, m: str, h: torch.Tensor, e: torch.Tensor | None, rel: torch.Tensor, x: torch.Tensor,
                    cross: torch.Tensor | None = None) -> torch.Tensor:
        parts = [h] + ([e] if e is not None else []) + ([rel] if self.rel_coord else [])
        parts += [x[..., None]] if self.lr_intensity_input else []
        parts += [cross] if cross is not None else []
        y = self.decoders[m](torch.cat(parts, dim=-1))[..., 0]
        return y + x if self.residual else y

    def forward(
        self,
        t1: torch.Tensor,
        t2: torch.Tensor,
        t1_affine: torch.Tensor,
        t2_affine: torch.Tensor,
        query_world: torch.Tensor,
        query_norm: torch.Tensor | None = None,
        aux: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Encode both LR volumes and decode at the query points (see :meth:`decode` for outputs)."""
        if self.pe is not None and query_norm is None:
            raise ValueError("query_norm (normalised world coordinates) is required when pe=True")
        maps = self.encode(t1, t2)
        return self.decode(maps, t1, t2, t1_affine, t2_affine, query_world, query_norm, aux=aux)
