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

Cross-contrast path in the null space of the own acquisition (``cross_null_space``, ours, off by
default). A contrast's LR scan measures slab averages along its thick axis; what the other contrast
adds must not overwrite them (e.g. erase a lesion only this contrast shows, or paint in one only the
other shows). With the switch, contrast m's output is

    y_m(p) = D_m(own features of m at p) [+ x_m(p) with ``residual``] + G_m(p) - mean_j G_m(p_j)

where D_m sees ONLY m's own LR scan (its encoders, MMF, SEL; no attention, no ``cross_input``) and
every cross-contrast input (the KD-Attn-fused feature, the other contrast's shared feature and LR
intensity) goes to a separate head G_m (an MLP). ``p_j``, j = 1..k, are the k points of p's slab of
m: p moved along m's thick LR axis to the centres of the k equal sub-slabs of p's LR voxel (thick
axis = the LR array axis of largest spacing, k = that spacing / the finest other spacing, rounded;
read from the affine). On a grid aligned with the slabs (the HR grid of the acquisition, and every
training patch) the sub-slab centres are the HR voxel centres of the slab, so the cross term sums to
zero over every slab: the slab averages along m's thick axis are D_m's alone (boxcar slab; the
acquisitions' Gaussian profile reaches a little beyond the slab, so there it is the boxcar part of
the null space). The cost: G_m (and m's attention) at k extra points per query. ``zero_init``
starts G_m's last layer at zero too, so an untrained network is still exactly trilinear.

Any-protocol switches (ours, off by default so earlier checkpoints load and behave as before):
``acquisition_input`` tells the network each scan's acquisition, its spacing per array axis read from
the affine (``s_m = log2(spacing in mm)``, ``(B, 3)``): FiLM modulation of every looked-up encoder
feature of contrast m, ``z * (1 + gamma(s_m)) + beta(s_m)`` (per channel, starting at identity; FiLM
commutes with the trilinear lookup, so it equals modulating the feature map), and ``[s_m, s_other]``
as 6 more decoder inputs. ``data_consistency`` adds the soft consistency step
(:class:`~nexus_monai.networks.data_consistency.SoftDataConsistency`, ``self.consistency``) that the
training step applies to the decoded plates and :class:`~nexus_monai.engines.inr.ImplicitGridInferer`
to the stitched volume. ``protocol_range_mm`` (stored, not a weight): the spacing range per array axis
the weights were trained on, which prediction checks.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from nexus_monai.geometry import as_affine, sample_at_voxel, voxel_to_world, world_to_voxel
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
from nexus_monai.networks.data_consistency import SoftDataConsistency
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
        cross_null_space: every cross-contrast contribution to a contrast goes through a head whose
            output has zero slab average along that contrast's thick axis (module docstring; ours,
            off by default; exclusive with ``cross_input``). ``cross_hidden``: that head's width
            (default ``decoder_hidden``), two hidden layers.
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
        cross_null_space: bool = False,
        cross_hidden: int | None = None,
        acquisition_input: bool = False,
        data_consistency: bool = False,
        consistency_tau: float = 0.05,
        protocol_range_mm: Mapping | None = None,
    ):
        super().__init__()
        if cross_null_space and cross_input:
            raise ValueError("cross_null_space and cross_input are exclusive: with cross_null_space every "
                             "cross-contrast input goes through the null-space head; set cross_input: false")
        self.cross_null_space = bool(cross_null_space)
        opts = dict(encoder_options or {})
        self.mmf, self.kd_attn, self.sel, self.bidirectional = bool(mmf), bool(kd_attn), bool(sel), bool(bidirectional)
        self.rel_coord, self.residual, self.cross_input = bool(rel_coord), bool(residual), bool(cross_input)
        self.sel_residual, self.lr_intensity_input = bool(sel_residual), bool(lr_intensity_input)
        self.features = int(features)
        self.acquisition_input = bool(acquisition_input)
        self.protocol_range_mm = None if protocol_range_mm is None else {str(k): [float(v) for v in r]
                                                                         for k, r in dict(protocol_range_mm).items()}
        self.consistency = SoftDataConsistency(CONTRASTS, consistency_tau) if data_consistency else None
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
            + (6 if self.acquisition_input else 0)
        )
        if self.acquisition_input:  # FiLM per contrast and branch: (gamma, beta) from log2 spacing, identity at start
            self.film = nn.ModuleDict({f"{m}_{b}": nn.Linear(3, 2 * c) for m in CONTRASTS for b in branches})
            for lin in self.film.values():
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.decoders = nn.ModuleDict(
            {
                m: build_decoder(decoder, in_dim, 1, hidden=decoder_hidden, hidden_layers=decoder_layers)
                for m in CONTRASTS
            }
        )
        if self.cross_null_space:
            xin_cross = 2 * xin + (3 if self.rel_coord else 0)
            width = int(cross_hidden or decoder_hidden)
            self.cross_heads = nn.ModuleDict({
                m: nn.Sequential(nn.Linear(2 * c + xin_cross, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                                 nn.ReLU(inplace=True), nn.Linear(width, 1))
                for m in CONTRASTS})
        if self.residual and zero_init:
            branches = list(self.decoders.values())
            if self.cross_null_space:
                branches += list(self.cross_heads.values())
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
        z, idx, x, rel = self._point_inputs(maps, images, affines, query_world, spec=self.mmf)
        out: dict[str, torch.Tensor] = {}
        shared = {m: self._attended(m, maps, z, idx) for m in CONTRASTS}
        # with cross_null_space the own path sees the own contrast only (the attention goes to the cross head)
        own = {m: z[f"{m}_shared"] for m in CONTRASTS} if self.cross_null_space else shared
        f = {}
        for m in CONTRASTS:
            f[m] = self.proj[m](torch.cat((own[m], z[f"{m}_spec"]), -1)) + own[m] if self.mmf else own[m]
        h = dict(f)
        if self.sel:
            for m in CONTRASTS:
                logits = self.seg_head[m](f[m])
                h[m] = self.seg_fuse[m](torch.cat((f[m], logits), -1)) + (f[m] if self.sel_residual else 0)
                out[seg_logits_key(m)] = logits
        e = self.pe(query_norm) if self.pe is not None else None
        acq = {}
        if self.acquisition_input:
            s = {m: self.log_spacing(affines[m]) for m in CONTRASTS}
            k_pts = query_world.shape[1]
            for m in CONTRASTS:
                o = "t2" if m == "t1" else "t1"
                acq[m] = torch.cat((s[m], s[o]), -1)[:, None, :].expand(-1, k_pts, 6).to(rel[m].dtype)
        for m in CONTRASTS:
            other = "t2" if m == "t1" else "t1"
            cross = self._cross(h[other], x[other]) if self.cross_input else None
            out[m] = self._decode_one(m, h[m], e, rel[m], x[m], cross, acq.get(m))
            if self.cross_null_space:
                out[m] = out[m] + self._null_space_cross(m, maps, images, affines, shared[m], z, x, rel, idx[m])
        if aux:
            out[Z_T1_SHARED] = z["t1_shared"]
            out[Z_T2_SHARED] = z["t2_shared"]
            out[Z_T2_FUSED] = shared["t2"]
            if self.kd_attn:  # eq. 10-11: the unfused T2w shared feature through the T2w decoder
                cross = self._cross(h["t1"], x["t1"]) if self.cross_input else None
                out[T2_SELF] = self._decode_one("t2", z["t2_shared"], e, rel["t2"], x["t2"], cross, acq.get("t2"))
            if self.mmf:
                for m in CONTRASTS:
                    out[modality_logits_key(m)] = self.modality_classifier(z[f"{m}_spec"])
        return out

    def _point_inputs(self, maps, images, affines, world: torch.Tensor, spec: bool = True):
        """Per-point lookups ``(z, idx, x, rel)`` of both contrasts at ``world`` ``(B, N, 3)``: shared (and
        specific) features ``(B, N, C)``, continuous LR indices ``(B, N, 3)``, trilinear LR intensities
        ``(B, N)`` and in-voxel offsets ``(B, N, 3)`` in [-1, 1]."""
        z, idx, x, rel = {}, {}, {}, {}
        for m in CONTRASTS:
            z[f"{m}_shared"], idx[m] = lookup(maps[f"{m}_shared"], affines[m], world)
            x[m] = sample_at_voxel(images[m], idx[m])[:, 0]  # (B, N) trilinear LR intensity
            rel[m] = 2.0 * (idx[m] - torch.round(idx[m]))  # offset inside the LR voxel, [-1, 1]
            if spec and self.mmf:
                z[f"{m}_spec"] = sample_at_voxel(maps[f"{m}_spec"], idx[m]).permute(0, 2, 1)
            if self.acquisition_input:
                s = self.log_spacing(affines[m]).to(z[f"{m}_shared"].dtype)
                for name in [n for n in (f"{m}_shared", f"{m}_spec") if n in z]:
                    gamma, beta = self.film[name](s)[:, None, :].chunk(2, dim=-1)
                    z[name] = z[name] * (1.0 + gamma) + beta
        return z, idx, x, rel

    @staticmethod
    def log_spacing(affine: torch.Tensor) -> torch.Tensor:
        """``log2`` of the spacing in mm per array axis (column norms of the affine) ``(B, 3)``."""
        a = as_affine(affine).reshape(-1, 4, 4)
        return torch.log2(torch.linalg.norm(a[:, :3, :3].float(), dim=1).clamp_min(1e-3))

    def _attended(self, m: str, maps, z, idx) -> torch.Tensor:
        """Contrast ``m``'s shared feature after KD-Attn to the other contrast (unchanged without attention)."""
        if self.kd_attn and m == "t2":
            return self.attn_t2(z["t2_shared"], maps["t1_shared"], idx["t1"], maps.get("kv_for_t2"))
        if self.kd_attn and self.bidirectional and m == "t1":
            return self.attn_t1(z["t1_shared"], maps["t2_shared"], idx["t2"], maps.get("kv_for_t1"))
        return z[f"{m}_shared"]

    def _cross_head(self, m: str, attended, z, x, rel) -> torch.Tensor:
        """G_m on the cross-contrast inputs at some points -> ``(B, N)``."""
        o = "t2" if m == "t1" else "t1"
        parts = [attended, z[f"{o}_shared"]]
        parts += [x[m][..., None], x[o][..., None]] if self.lr_intensity_input else []
        parts += [rel[m]] if self.rel_coord else []
        return self.cross_heads[m](torch.cat(parts, -1))[..., 0]

    @staticmethod
    def slab_geometry(affine: torch.Tensor) -> tuple[int, int]:
        """``(thick axis, k)`` of an LR grid from its affine ``(4, 4)`` or ``(B, 4, 4)`` (every item alike):
        the array axis of largest spacing and that spacing / the finest other spacing, rounded (>= 1)."""
        a = as_affine(affine).reshape(-1, 4, 4)
        sp = torch.linalg.norm(a[:, :3, :3].double(), dim=1)  # (B, 3) column norms
        axis = sp.argmax(1)
        if not bool((axis == axis[0]).all()):
            raise ValueError("cross_null_space: the items of a batch have their thick axes on different array axes")
        ax = int(axis[0])
        others = [i for i in range(3) if i != ax]
        k = torch.round(sp[:, ax] / sp[:, others].min(1).values)
        if not bool((k == k[0]).all()):
            raise ValueError(f"cross_null_space: the items of a batch have different slab factors {k.tolist()}")
        return ax, max(int(k[0]), 1)

    def _null_space_cross(self, m: str, maps, images, affines, attended_p: torch.Tensor, z, x, rel,
                          idx_m: torch.Tensor) -> torch.Tensor:
        """``G_m(p) - mean_j G_m(p_j)`` ``(B, K)``: the cross term with zero mean over p's slab of m."""
        b, k_pts, _ = idx_m.shape
        axis, k = self.slab_geometry(affines[m])
        slab = torch.floor(idx_m[..., axis] + 0.5)  # (B, K) p's LR voxel along the thick axis
        subs = (torch.arange(k, device=idx_m.device, dtype=idx_m.dtype) + 0.5) / k - 0.5
        sub_idx = idx_m[:, :, None, :].expand(b, k_pts, k, 3).clone()
        sub_idx[..., axis] = slab[..., None] + subs
        sub_world = voxel_to_world(sub_idx.reshape(b, k_pts * k, 3), affines[m])
        zs, idx_s, xs, rels = self._point_inputs(maps, images, affines, sub_world, spec=False)
        g_sub = self._cross_head(m, self._attended(m, maps, zs, idx_s), zs, xs, rels).reshape(b, k_pts, k)
        return self._cross_head(m, attended_p, z, x, rel) - g_sub.mean(-1)

    def lookup_margin(self, affines: Mapping[str, torch.Tensor]) -> int:
        """LR voxels beyond a query's own continuous index that :meth:`decode` may read in any grid
        (for tiled decoding): 0, or with ``cross_null_space`` the reach of the slab points ``p_j``
        (less than one LR voxel of m along its thick axis, expressed in each grid's voxels)."""
        if not self.cross_null_space:
            return 0
        reach = 1
        for m in CONTRASTS:
            a_m = as_affine(affines[m]).reshape(-1, 4, 4)[0].double()
            axis, _ = self.slab_geometry(a_m)
            for o in CONTRASTS:
                inv = torch.linalg.inv(as_affine(affines[o]).reshape(-1, 4, 4)[0].double())[:3, :3]
                reach = max(reach, math.ceil(float((inv @ a_m[:3, axis]).abs().max()) - 1e-9))
        return reach

    def _cross(self, h_other: torch.Tensor, x_other: torch.Tensor) -> torch.Tensor:
        return torch.cat((h_other, x_other[..., None]), -1) if self.lr_intensity_input else h_other

    def _decode_one(self, m: str, h: torch.Tensor, e: torch.Tensor | None, rel: torch.Tensor, x: torch.Tensor,
                    cross: torch.Tensor | None = None, acq: torch.Tensor | None = None) -> torch.Tensor:
        parts = [h] + ([e] if e is not None else []) + ([rel] if self.rel_coord else [])
        parts += [x[..., None]] if self.lr_intensity_input else []
        parts += [cross] if cross is not None else []
        parts += [acq] if acq is not None else []
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
