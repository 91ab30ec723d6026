"""Training step of CycleINR (re-implemented from Fang et al., CVPR 2024) for MONAI's ``SupervisedTrainer``.

A batch holds, per contrast ``c``, the LR patch ``<c>_lr`` (``(B, 1, x, y, z)`` MetaTensor with its
affine) and the HR lines along that scan's thick axis from
:class:`~nexus_monai.transforms.lines.SampleThickAxisLinesd` (``<c>_lines_world (B, L * n, 3)``
mm, HR/LR values, acquisition operator). Each contrast's CycleINR predicts the SR intensities
at the line points; :class:`~nexus_monai.losses.cycleinr.CycleINRLoss` scores them against the
HR values and, re-degraded, against the LR input. Validation and inference use the generic
:class:`~nexus_monai.engines.inr.INRValidationStep` / ``ImplicitGridInferer`` (the network is a
:class:`~nexus_monai.networks.cycleinr.CycleINRPair`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from nexus_monai.geometry import batched_affine, plain_tensor
from nexus_monai.keys import CONTRASTS

__all__ = ["CycleINRTrainStep", "cycleinr_predict_lines"]


def cycleinr_predict_lines(network, batch: Mapping, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{c: (B, L, n)}`` SR intensities on each contrast's HR lines (``network``: a ``CycleINRPair``)."""
    net = network.module if hasattr(network, "module") else network
    preds = {}
    for c in CONTRASTS:
        if f"{c}_lines_world" not in batch:
            continue
        image = plain_tensor(batch[f"{c}_lr"]).float().to(device)
        affine = batched_affine(batch[f"{c}_lr"], image.shape[0]).to(device)
        world = plain_tensor(batch[f"{c}_lines_world"]).float().to(device)
        lines, n = batch[f"{c}_lines_hr"].shape[-2:]
        preds[c] = net.nets[c](image, affine, world).reshape(image.shape[0], lines, n)
    return preds


class CycleINRTrainStep:
    """``SupervisedTrainer(iteration_update=CycleINRTrainStep())``: forward on the lines, every loss term, step.

    ``engine.state.output`` is ``{"loss": float, "loss_rec_t1": float, "loss_cycle_t1": float, ...}``.
    """

    def __init__(self, grad_clip: float | None = None):
        self.grad_clip = grad_clip

    def __call__(self, engine, batch: Mapping) -> dict:
        engine.network.train()
        device = engine.state.device if hasattr(engine.state, "device") else engine.device
        engine.optimizer.zero_grad(set_to_none=True)
        preds = cycleinr_predict_lines(engine.network, batch, device)
        terms = engine.loss_function(preds, {k: v.to(device) for k, v in batch.items() if "_lines_" in k})
        terms["loss"].backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
        engine.optimizer.step()
        return {"loss": float(terms["loss"].detach()),
                **{f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"}}
