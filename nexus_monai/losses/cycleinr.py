"""CycleINR objective (Fang et al., CVPR 2024; re-implemented from the paper), terms returned separately.

``L = sum_c [ L_rec(c) + w_cycle * L_cycle(c) ]`` over the contrasts ``c`` of the batch, with

* ``L_rec``: L1 (default) or MSE between the SR intensities on HR lines and the HR values;
* ``L_cycle``: the SR lines re-degraded by the acquisition operator (the rows of
  :func:`~nexus_monai.transforms.acquisition.slice_profile_matrix`, see
  :class:`~nexus_monai.transforms.lines.SampleThickAxisLines`) against the LR input on the same
  lines, over the exact rows only (``valid``). The LR input, not the HR, is the target: this is
  the paper's cycle, which keeps the SR output consistent with what was actually measured.

A row is exact only when its slice profile lies wholly inside the patch: the Gaussian profile of
factor ``k`` reaches ±4 sigma = ±1.7 k HR voxels from the slab centre, so a line needs about
about ``4.5 k`` voxels along the thick axis for one exact row. At 16^3 patches the T2w scan (y ×4) has
none, and its cycle term is 0 by construction (logged ``loss_cycle_t2 = 0``; a warning says so);
the bundle's 32^3 patches give 4 exact rows of 8. Patches too short for a contrast's factor leave
that contrast without a cycle term rather than scoring LR voxels against HR samples they never saw.

Shapes per contrast: ``pred (B, L, n)``, ``hr (B, L, n)``, ``lr (B, L, M)``, ``operator (B, M, n)``,
``valid (B, M)``.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

__all__ = ["CycleINRLoss", "redegrade"]


def redegrade(pred_lines: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """``(B, L, n)`` SR lines through the acquisition ``operator (B, M, n)`` -> ``(B, L, M)``."""
    return pred_lines @ operator.transpose(-1, -2)


class CycleINRLoss(nn.Module):
    """``forward(preds, batch)`` -> ``{"loss", "rec_<c>", "cycle_<c>"}``; ``preds`` maps contrast -> ``(B, L, n)``.

    ``batch`` holds ``<c>_lines_hr``, ``<c>_lines_lr``, ``<c>_lines_operator``, ``<c>_lines_valid``.

    Args:
        rec: ``"l1"`` or ``"mse"`` for both terms.
        w_cycle: weight of the cycle-consistency term (0 disables it: the ablation).
    """

    def __init__(self, rec: str = "l1", w_cycle: float = 1.0):
        super().__init__()
        if rec not in ("l1", "mse"):
            raise ValueError(f"rec must be 'l1' or 'mse', got {rec!r}")
        self.rec, self.w_cycle = rec, float(w_cycle)
        self._warned: set[str] = set()

    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() if self.rec == "l1" else (a - b) ** 2

    def forward(self, preds: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for c, pred in preds.items():
            hr = batch[f"{c}_lines_hr"].to(pred)
            terms[f"rec_{c}"] = self._dist(pred, hr).mean()
            total = total + terms[f"rec_{c}"]
            valid = batch[f"{c}_lines_valid"].to(pred)[:, None, :]  # (B, 1, M)
            cyc = self._dist(redegrade(pred, batch[f"{c}_lines_operator"].to(pred)), batch[f"{c}_lines_lr"].to(pred))
            count = (valid.expand_as(cyc)).sum()
            terms[f"cycle_{c}"] = (cyc * valid).sum() / count.clamp(min=1.0)
            if self.w_cycle and not bool(count > 0) and c not in self._warned:
                self._warned.add(c)
                warnings.warn(f"CycleINR: no exact {c} row in the batch (the slice profile reaches past the patch "
                              f"along the thick axis); its cycle term is 0. Use longer patches along that axis.",
                              stacklevel=2)
            if self.w_cycle:
                total = total + self.w_cycle * terms[f"cycle_{c}"]
        terms["loss"] = total if isinstance(total, torch.Tensor) else torch.zeros(())
        return terms
