"""Nexus-INR objective (Zhang et al. 2025, eq. 9, 11, 12, 18, 19, 26), every term returned separately.

``L = L_SR(t1) + L_SR(t2) + w_kd L_KD + w_t2self L_T2Self + w_cmfa L_CMFA + w_fdl L_FDL + w_seg L_seg``

* L_SR: L1 (default) or MSE between predicted and HR intensities at the query points.
* L_KD (eq. 9): mean squared distance between the attention-fused T2w shared feature and the T1w
  shared feature (the teacher is detached: the student learns to mimic it, not the reverse).
* L_T2Self (eq. 11): MSE of the T2w decoder applied to the unfused T2w shared feature.
* L_CMFA (eq. 18): L1 norm (sum over the C channels) of the difference between the batch means
  of the two modalities' shared features (the T2w one after attention, as eq. 13 defines
  ``z_2^shared``). ``cmfa_reduction="mean"`` (ours) averages over channels instead, i.e. the
  eq. 18 value divided by C.
* L_FDL (eq. 19): cross-entropy of the modality classifier on the specific features (T1w = 0, T2w = 1).
* L_seg: cross-entropy of both segmentation heads on the BraTS labels at the query points.

Terms whose inputs the network did not produce (switch off) are absent from the result.

Lesion-aware objective (ours, off by default; training signal only, inference never sees it), from
the query points' lesion region code ``lesion`` ``(B, K)`` (``+v`` inside lesion ``v``, ``-v`` in its
ring, 0 elsewhere, :mod:`nexus_monai.transforms.lesions`; ``v // 1000`` is the visibility class):

* L_SR per contrast becomes ``mean_k w_k |pred_k - gt_k|`` (or squared) with ``w_k = w_lesion`` at
  points in or around a lesion that contrast shows (T2w-only lesions in L_SR(t2), T1w-only in
  L_SR(t1), lesions seen on both in both), ``w_k = w_lesion_other`` at points in or around a lesion
  that contrast does NOT show (where it must not imprint the other contrast's finding), 1 elsewhere.
  All weights 1: exactly the plain term.
* ``lesion_contrast`` (weight ``w_lesion_contrast``): per lesion of each batch item with points both
  inside and in its ring, the contrast ``mean(inside) - mean(ring)`` of the prediction against the
  same of the ground truth, ``|c_pred - c_gt|``, averaged over lesions and both contrasts (0 when
  the batch has none). On a contrast that does not show the lesion ``c_gt`` is ~0: the term
  penalises imprinting; on one that does, it penalises erasing. The lesion-fidelity metric
  (:mod:`nexus_monai.metrics.lesion`) scores the same quantity over whole lesions.
* Diagnostics (weight 0, never in the total): ``sr_lesion_t1`` / ``sr_lesion_t2``, the unweighted
  L_SR over the points in or around any lesion (absent when the batch has none).

``feature_norm`` (ours, off = the paper's equations): L_KD and L_CMFA on features scaled to unit
length per query point. Nothing bounds the encoders' feature scale, and the plain distances grew
with it (measured on the CPU default: L_KD 0.5 -> 259 within 25 epochs, swamping L_SR).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nexus_monai.keys import (
    CONTRASTS,
    LESION_BOTH,
    LESION_CLASS_STRIDE,
    T2_SELF,
    Z_T1_SHARED,
    Z_T2_FUSED,
    lesion_visible_only_on,
    modality_logits_key,
    seg_logits_key,
)

__all__ = ["NexusINRLoss", "brats_label_to_class", "lesion_point_weights", "lesion_contrast_term"]


def brats_label_to_class(label: torch.Tensor) -> torch.Tensor:
    """BraTS labels 0/1/2/4 -> classes 0/1/2/3 (any other value raises)."""
    label = label.long()
    out = torch.where(label == 4, torch.full_like(label, 3), label)
    if bool(~((label == 0) | (label == 1) | (label == 2) | (label == 4)).all()):
        raise ValueError(f"labels outside {{0, 1, 2, 4}}: {sorted(set(torch.unique(label).tolist()) - {0, 1, 2, 4})}")
    return out


def lesion_point_weights(lesion: torch.Tensor, contrast: str, w_lesion: float = 1.0,
                         w_lesion_other: float = 1.0) -> torch.Tensor:
    """Per-point L_SR weights ``(B, K)`` of ``contrast`` from the lesion region code ``(B, K)``.

    ``w_lesion`` at points in or around a lesion ``contrast`` shows, ``w_lesion_other`` at points in
    or around a lesion visible only on the other contrast, 1 elsewhere.
    """
    cls = lesion.abs() // LESION_CLASS_STRIDE
    shown = (cls == lesion_visible_only_on(contrast)) | (cls == LESION_BOTH)
    other = "t2" if contrast == "t1" else "t1"
    hidden = cls == lesion_visible_only_on(other)
    w = torch.ones(lesion.shape, dtype=torch.float32, device=lesion.device)
    return torch.where(shown, torch.full_like(w, w_lesion), torch.where(hidden, torch.full_like(w, w_lesion_other), w))


def lesion_contrast_term(pred: torch.Tensor, target: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor | None:
    """Mean over the lesions of each item (``+v`` inside, ``-v`` ring in ``lesion`` ``(B, K)``) that have points
    both inside and in the ring of ``|(mean_in - mean_ring)(pred) - (mean_in - mean_ring)(target)|``; None if none."""
    b, k = lesion.shape
    inst = lesion.abs().long()
    item = torch.arange(b, device=lesion.device)[:, None].expand(b, k)
    key = (item * (inst.max() + 1) + inst)[inst > 0]  # one id per (item, lesion)
    if key.numel() == 0:
        return None
    inside = (lesion > 0)[inst > 0].to(pred.dtype)
    ids, group = torch.unique(key, return_inverse=True)
    n = ids.numel()

    def means(v: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, group, sel)
        total = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, group, v * sel)
        return total / count.clamp(min=1), count

    diff = pred[inst > 0] - target[inst > 0]  # the contrast of pred - target = difference of contrasts
    d_in, n_in = means(diff, inside)
    d_ring, n_ring = means(diff, 1.0 - inside)
    ok = (n_in > 0) & (n_ring > 0)
    if not bool(ok.any()):
        return None
    return (d_in - d_ring)[ok].abs().mean()


class NexusINRLoss(nn.Module):
    """Weighted sum of the Nexus-INR terms; ``forward`` returns ``{"loss": total, "sr_t1": ..., ...}``.

    ``w_lesion`` / ``w_lesion_other`` / ``w_lesion_contrast``: the lesion-aware objective (module
    docstring); with their defaults (1, 1, 0) the loss is the plain one and needs no lesion code.
    """

    def __init__(self, sr: str = "l1", w_t1: float = 1.0, w_t2: float = 1.0, w_kd: float = 0.1, w_t2self: float = 0.5,
                 w_cmfa: float = 0.1, w_fdl: float = 0.01, w_seg: float = 0.1, feature_norm: bool = False,
                 cmfa_reduction: str = "sum", w_lesion: float = 1.0, w_lesion_other: float = 1.0,
                 w_lesion_contrast: float = 0.0):
        super().__init__()
        if min(w_lesion, w_lesion_other, w_lesion_contrast) < 0:
            raise ValueError(f"lesion weights must be >= 0, got w_lesion={w_lesion}, w_lesion_other={w_lesion_other}, "
                             f"w_lesion_contrast={w_lesion_contrast}")
        self.w_lesion, self.w_lesion_other = float(w_lesion), float(w_lesion_other)
        if sr not in ("l1", "mse"):
            raise ValueError(f"sr must be 'l1' or 'mse', got {sr!r}")
        if cmfa_reduction not in ("sum", "mean"):
            raise ValueError(f"cmfa_reduction must be 'sum' (eq. 18's L1 norm) or 'mean', got {cmfa_reduction!r}")
        self.cmfa_reduction = cmfa_reduction
        self.sr = F.l1_loss if sr == "l1" else F.mse_loss
        self.feature_norm = bool(feature_norm)
        self.w = {"sr_t1": w_t1, "sr_t2": w_t2, "kd": w_kd, "t2self": w_t2self, "cmfa": w_cmfa, "fdl": w_fdl,
                  "seg": w_seg, "lesion_contrast": float(w_lesion_contrast)}

    @property
    def lesion_aware(self) -> bool:
        """Whether any lesion weight differs from the plain loss (then ``lesion`` is required)."""
        return self.w_lesion != 1.0 or self.w_lesion_other != 1.0 or self.w["lesion_contrast"] != 0.0

    def forward(self, out: Mapping[str, torch.Tensor], target_t1: torch.Tensor, target_t2: torch.Tensor,
                label: torch.Tensor | None = None, lesion: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        targets = {"t1": target_t1, "t2": target_t2}
        if lesion is None:
            if self.lesion_aware:
                raise ValueError("the lesion-aware loss (w_lesion / w_lesion_other / w_lesion_contrast set) needs the "
                                 "query points' lesion code (batch key query_lesion): keep the lesion maps in training "
                                 "(train.yaml: lesion_aware: true)")
            terms = {f"sr_{c}": self.sr(out[c], targets[c]) for c in CONTRASTS}
        else:
            lesion = lesion.reshape(out["t1"].shape).to(out["t1"].device)
            terms, near = {}, lesion != 0
            for c in CONTRASTS:
                err = self.sr(out[c], targets[c], reduction="none")
                terms[f"sr_{c}"] = (lesion_point_weights(lesion, c, self.w_lesion, self.w_lesion_other) * err).mean()
            contrast = [lesion_contrast_term(out[c], targets[c], lesion) for c in CONTRASTS]
            contrast = [t for t in contrast if t is not None]
            terms["lesion_contrast"] = (sum(contrast) / len(contrast) if contrast
                                        else out["t1"].new_zeros(()))
            if bool(near.any()):  # diagnostics: weight 0, not in the total
                diagnostics = {f"sr_lesion_{c}": self.sr(out[c][near], targets[c][near]).detach() for c in CONTRASTS}
        z1, z2 = out.get(Z_T1_SHARED), out.get(Z_T2_FUSED)
        # unit length per point: the distances cannot grow with the feature scale
        if self.feature_norm and z1 is not None:
            z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        if T2_SELF in out:
            terms["kd"] = F.mse_loss(z2, z1.detach(), reduction="none").sum(-1).mean()
            terms["t2self"] = F.mse_loss(out[T2_SELF], target_t2)
        if modality_logits_key("t1") in out:
            c = z1.shape[-1]
            gap = (z1.reshape(-1, c).mean(0) - z2.reshape(-1, c).mean(0)).abs()
            terms["cmfa"] = gap.sum() if self.cmfa_reduction == "sum" else gap.mean()
            l1, l2 = out[modality_logits_key("t1")], out[modality_logits_key("t2")]
            zeros = torch.zeros(l1.shape[:-1], dtype=torch.long, device=l1.device)
            terms["fdl"] = F.cross_entropy(l1.reshape(-1, 2), zeros.reshape(-1)) + F.cross_entropy(
                l2.reshape(-1, 2), (zeros + 1).reshape(-1)
            )
        if seg_logits_key("t1") in out and label is not None:
            cls = brats_label_to_class(label).reshape(-1)
            s1, s2 = out[seg_logits_key("t1")], out[seg_logits_key("t2")]
            terms["seg"] = F.cross_entropy(s1.reshape(-1, s1.shape[-1]),
                                           cls) + F.cross_entropy(s2.reshape(-1, s2.shape[-1]), cls)
        terms["loss"] = sum(self.w[k] * v for k, v in terms.items())
        if lesion is not None and bool(near.any()):
            terms.update(diagnostics)
        return terms
