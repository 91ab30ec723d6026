"""The any-protocol model's engine pieces (ours): consistency-trained steps and the protocol check of prediction.

* :class:`ConsistencyTrainStep` -- ``iteration_update`` for the random-acquisition training
  (:class:`~nexus_monai.transforms.random_protocol.RandomProtocold`): the network decodes whole plates,
  its soft consistency layer (``network.consistency``) corrects each contrast along that contrast's
  thick lines under the header's nominal operator, and the loss is taken on the corrected output.
* :func:`describe_scan` -- one line per scan: thick axis, spacing per array axis (mm), factor.
* :func:`conform_protocol` -- before any inference: a network that states the range it was trained on
  (``network.protocol_range_mm``) refuses a scan outside it with one :class:`NexusInputError` line, and
  a scan whose in-plane spacing is finer than the trained world grid is first resampled in-plane
  (anti-aliased) onto that grid, not refused.
"""

from __future__ import annotations

import math
import sys
from typing import Mapping

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents

from nexus_monai.engines.inr import INRTrainStep, backward_and_step, inr_inputs
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import as_affine, plain_tensor, spacing
from nexus_monai.keys import CONTRASTS
from nexus_monai.transforms.consistency import thick_axis_of

__all__ = ["ConsistencyTrainStep", "describe_scan", "conform_protocol", "range_violation"]

AXIS_NAMES = "xyz"


class ConsistencyTrainStep(INRTrainStep):
    """One optimisation step with the consistency layer inside: loss on ``x = f + A^T (A A^T + lambda I)^-1 (y - A f)``.

    The batch carries ``plate_shape`` and per contrast ``dc_<c>_op`` / ``dc_<c>_y`` / ``dc_<c>_dim`` /
    ``dc_<c>_sigma`` (:class:`~nexus_monai.transforms.random_protocol.RandomProtocold`); items may differ
    in protocol, so the step loops over the items of a batch for the consistency layer.
    ``engine.state.output`` also gets ``loss_raw_<c>`` (L1 of the uncorrected estimate, a diagnostic).
    """

    def __call__(self, engine, batch: Mapping) -> dict:
        net = engine.network.module if hasattr(engine.network, "module") else engine.network
        if getattr(net, "consistency", None) is None:
            raise ValueError("ConsistencyTrainStep needs a network with data_consistency: true")
        engine.network.train()
        device = engine.state.device if hasattr(engine.state, "device") else engine.device
        kwargs, targets = inr_inputs(batch, device)
        engine.optimizer.zero_grad(set_to_none=True)
        out = engine.network(**kwargs, aux=True)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        b = kwargs["t1"].shape[0]
        raw = {}
        for c in CONTRASTS:
            fixed = []
            raw[c] = float(F.l1_loss(out[c].detach(), targets[f"target_{c}"]))
            for i in range(b):
                shape = [int(v) for v in plain_tensor(batch["plate_shape"])[i]]
                f = out[c][i].reshape(1, *shape)
                y = plain_tensor(batch[f"dc_{c}_y"])[i][None].to(device)
                op = plain_tensor(batch[f"dc_{c}_op"])[i].to(device)
                dim = int(plain_tensor(batch[f"dc_{c}_dim"]).reshape(-1)[i])
                sigma = float(plain_tensor(batch[f"dc_{c}_sigma"]).reshape(-1)[i])
                fixed.append(net.consistency.lines(c, f, y, op, sigma, dim + 1).reshape(-1))
            out[c] = torch.stack(fixed)
        terms = engine.loss_function(out, **targets)
        backward_and_step(engine, terms, self.grad_clip)
        subject = batch.get("subject", list(range(b)))
        engine.state.output = {"subject": list(subject) if isinstance(subject, (list, tuple)) else [subject] * b,
                               "loss": float(terms["loss"].detach()),
                               **{f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"},
                               **{f"loss_raw_{c}": raw[c] for c in CONTRASTS}}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def describe_scan(name: str, lr) -> str:
    """``"t2 (path): thick y, 2.00 x 8.00 x 2.00 mm, factor 4.00"`` (``isotropic`` when no thick axis)."""
    sp = [float(v) for v in spacing(as_affine(lr.affine))]
    axis, factor = thick_axis_of(MetaTensor(torch.zeros(1), affine=as_affine(lr.affine)))
    kind = "isotropic" if axis is None else f"thick {AXIS_NAMES[axis]}, factor {factor:.2f}"
    return f"{name}: {' x '.join(f'{v:.2f}' for v in sp)} mm, {kind}"


def range_violation(lr, trained: Mapping) -> str | None:
    """Why a scan lies outside ``trained`` (``{"x"|"y"|"z": [lo, hi] mm, "factor": [lo, hi], "in_plane":
    [lo, hi] mm}``, every key optional) after in-plane resampling, or ``None``."""
    sp = [float(v) for v in spacing(as_affine(lr.affine))]
    for a, name in enumerate(AXIS_NAMES):
        if name in trained:
            lo, hi = trained[name]
            if not lo - 1e-3 <= sp[a] <= hi + 1e-3:
                return f"spacing {sp[a]:.2f} mm along array axis {name} is outside the trained {lo:g}-{hi:g} mm"
    axis, factor = thick_axis_of(MetaTensor(torch.zeros(1), affine=as_affine(lr.affine)))
    if "factor" in trained:
        lo, hi = trained["factor"]
        if not lo - 1e-3 <= factor <= hi + 1e-3:
            return f"slice spacing / in-plane spacing {factor:.2f} is outside the trained {lo:g}-{hi:g}"
    if "in_plane" in trained:
        lo, hi = trained["in_plane"]
        plane = [sp[a] for a in range(3) if a != axis] if axis is not None else sp
        if max(plane) > hi + 1e-3:
            return f"in-plane spacing {max(plane):.2f} mm is coarser than the trained {hi:g} mm"
    return None


def _resample_in_plane(lr: MetaTensor, axis: int | None, target_mm: float) -> MetaTensor:
    """``lr`` with every in-plane axis finer than ``target_mm`` resampled to it (Gaussian anti-aliasing, then
    linear interpolation at the new voxel centres; the field of view's edges kept)."""
    x = plain_tensor(lr).float()
    x = x[0] if x.ndim == 4 else x
    aff = as_affine(lr.affine).double().clone()
    sp = [float(v) for v in spacing(aff)]
    for a in range(3):
        if a == axis or sp[a] >= target_mm - 1e-6:
            continue
        f = target_mm / sp[a]
        sd = math.sqrt(f * f - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        r = max(1, int(math.ceil(3 * sd)))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sd) ** 2)
        g = g / g.sum()
        line = x.movedim(a, -1)
        shp = line.shape
        smooth = F.conv1d(F.pad(line.reshape(-1, 1, shp[-1]), (r, r), mode="replicate"), g[None, None])
        n_new = max(1, int(math.floor(shp[-1] / f + 1e-9)))
        centres = torch.arange(n_new, dtype=torch.float32) * f + (f - 1.0) / 2.0
        lo = centres.floor().long().clamp(0, shp[-1] - 1)
        hi = (lo + 1).clamp(max=shp[-1] - 1)
        w = (centres - lo.float())
        smooth = smooth[:, 0]
        res = smooth[:, lo] * (1 - w) + smooth[:, hi] * w
        x = res.reshape(*shp[:-1], n_new).movedim(-1, a)
        slab = torch.eye(4, dtype=torch.float64)
        slab[a, a] = f
        slab[a, 3] = (f - 1.0) / 2.0
        aff = aff @ slab
    return MetaTensor(x[None], affine=aff.float(), meta={})


def conform_protocol(network, lr: Mapping[str, MetaTensor], sources: Mapping[str, str] | None = None,
                     quiet: bool = False) -> dict[str, MetaTensor]:
    """Print each scan's protocol (one line each); with a network that states ``protocol_range_mm``,
    resample in-plane spacings finer than its trained world grid (``in_plane`` low end) and refuse a scan
    outside the range (:class:`NexusInputError`, one line naming the file). The lines go to stderr
    (``quiet``: none). Returns the scans to use."""
    net = network.module if hasattr(network, "module") else network
    trained = getattr(net, "protocol_range_mm", None)
    out = {}
    for c in CONTRASTS:
        name = (sources or {}).get(c, c)
        scan = lr[c]
        line = describe_scan(f"{c} ({name})", scan)
        if trained and "in_plane" in trained:
            axis, _ = thick_axis_of(MetaTensor(torch.zeros(1), affine=as_affine(scan.affine)))
            grid_mm = float(trained["in_plane"][0])
            sp = [float(v) for v in spacing(as_affine(scan.affine))]
            if any(sp[a] < grid_mm - 1e-3 for a in range(3) if a != axis):
                scan = _resample_in_plane(scan, axis, grid_mm)
                line += f" -> resampled in-plane to {grid_mm:g} mm: {describe_scan(c, scan).split(': ', 1)[1]}"
        if not quiet:
            print(f"protocol {line}", file=sys.stderr)
        if trained:
            why = range_violation(scan, trained)
            if why:
                raise NexusInputError(name, f"outside the protocol range the weights were trained on: {why}")
        out[c] = scan
    return out
