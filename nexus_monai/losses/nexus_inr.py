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

``feature_norm`` (ours, off = the paper's equations): L_KD and L_CMFA on features scaled to unit
length per query point. Nothing bounds the encoders' feature scale, and the plain distances grew
with it (measured on the CPU default: L_KD 0.5 -> 259 within 25 epochs, swamping L_SR).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nexus_monai.keys import T2_SELF, Z_T1_SHARED, Z_T2_FUSED, modality_logits_key, seg_logits_key

__all__ = ["NexusINRLoss", "brats_label_to_class"]


def brats_label_to_class(label: torch.Tensor) -> torch.Tensor:
    """BraTS labels 0/1/2/4 -> classes 0/1/2/3 (any other value raises)."""
    label = label.long()
    out = torch.where(label == 4, torch.full_like(label, 3), label)
    if bool(~((label == 0) | (label == 1) | (label == 2) | (label == 4)).all()):
        raise ValueError(f"labels outside {{0, 1, 2, 4}}: {sorted(set(torch.unique(label).tolist()) - {0, 1, 2, 4})}")
    return out


class NexusINRLoss(nn.Module):
    """Weighted sum of the Nexus-INR terms; ``forward`` returns ``{"loss": total, "sr_t1": ..., ...}``."""

    def __init__(self, sr: str = "l1", w_t1: float = 1.0, w_t2: float = 1.0, w_kd: float = 0.1, w_t2self: float = 0.5,
                 w_cmfa: float = 0.1, w_fdl: float = 0.01, w_seg: float = 0.1, feature_norm: bool = False,
                 cmfa_reduction: str = "sum"):
        super().__init__()
        if sr not in ("l1", "mse"):
            raise ValueError(f"sr must be 'l1' or 'mse', got {sr!r}")
        if cmfa_reduction not in ("sum", "mean"):
            raise ValueError(f"cmfa_reduction must be 'sum' (eq. 18's L1 norm) or 'mean', got {cmfa_reduction!r}")
        self.cmfa_reduction = cmfa_reduction
        self.sr = F.l1_loss if sr == "l1" else F.mse_loss
        self.feature_norm = bool(feature_norm)
        self.w = {"sr_t1": w_t1, "sr_t2": w_t2, "kd": w_kd, "t2self": w_t2self, "cmfa": w_cmfa, "fdl": w_fdl,
                  "seg": w_seg}

    def forward(self, out: Mapping[str, torch.Tensor], target_t1: torch.Tensor, target_t2: torch.Tensor,
                label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        terms = {"sr_t1": self.sr(out["t1"], target_t1), "sr_t2": self.sr(out["t2"], target_t2)}
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
        return terms
