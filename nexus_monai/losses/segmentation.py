"""Loss for the multi-label BraTS regions (TC, WT, ET overlap, one sigmoid per channel).

MONAI 1.6.1's ``DiceCELoss(sigmoid=True)`` adds a *softmax* cross-entropy across channels whenever
there is more than one output channel, which is wrong for overlapping regions. This is the same
Dice + cross-entropy idea with the per-channel binary cross-entropy that sigmoid outputs need.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceBCELoss"]


class DiceBCELoss(nn.Module):
    """``lambda_dice * DiceLoss(sigmoid) + lambda_bce * BCEWithLogits`` over ``(B, C, X, Y, Z)`` logits.

    Args:
        lambda_dice, lambda_bce: weights of the two terms.
        squared_pred, smooth_nr, smooth_dr: passed to MONAI's ``DiceLoss``.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0, squared_pred: bool = True,
                 smooth_nr: float = 0.0, smooth_dr: float = 1e-5):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = float(lambda_dice), float(lambda_bce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target.float())
