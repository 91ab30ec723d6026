"""Thick-slice stacks for the 2D slice-SR baselines (SMORE, SAINT, I3Net): geometry, inputs, pairs.

One scan with a thick axis ``a`` and factor ``k`` (read from its affine with
:func:`~nexus_monai.baselines.lrtv.detect_thick_axis`) is super-resolved on its natural HR grid
(:func:`~nexus_monai.baselines.lrtv.natural_hr_grid`: the grid whose thick-slice acquisition is
exactly the LR grid), then resampled onto the requested grid when that differs.

Canonical layout: the networks see volumes with the thick axis moved LAST
(:func:`to_canonical` / :func:`from_canonical`), already interpolated onto the HR grid along it
with cubic B-splines (:func:`~nexus_monai.baselines.interpolation.upsample`, so non-integer
factors need nothing special). :func:`thick_slice_channels` adds what the networks condition on:

* channel 0: the B-spline base (the networks predict a residual over it);
* channel 1: ``t``, where each HR slice lies between its two LR neighbours: with the LR slice
  coordinate ``u = (z - (k - 1)/2) / k`` of HR index ``z`` (slab centres, as in the acquisition
  model), ``t = u - floor(u)`` in ``[0, 1)``;
* channel 2: ``1 / k``;
* channels 3...: ``neighbours`` acquired LR slices ``floor(u) - n/2 + 1 ... floor(u) + n/2``
  (clamped at the ends), for I3Net.

Intensities: each LR scan is divided by the 99.5th percentile of its non-zero voxels before the
network and multiplied back after (cohort training divides each HR volume by its own such
number, a close match since the slice profile preserves the mean). Outputs are clamped at 0
(magnitude images).

Training pairs (:func:`degrade_and_interpolate`) go through the SAME acquisition operator as
everything else (:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix` along the
axis) and the same B-spline interpolation as inference.

:class:`SliceStackValidationReport` (a validation handler of the saint and i3net bundles) leaves
per-case PSNR/SSIM of the network and of its B-spline input, and a panel of the first case, in
``engine.state.validation_report`` for the MLflow image and table of a tracked run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.baselines.lrtv import detect_thick_axis, natural_hr_grid
from nexus_monai.data.brats import load_datalist
from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.engines.bundle_model import bundle_model
from nexus_monai.engines.epoch_report import EpochReport
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, as_affine, parse_axis, spacing, thick_slice_affine
from nexus_monai.metrics.image_quality import intensity_scale, psnr, ssim3d
from nexus_monai.paths import REPO_BUNDLES
from nexus_monai.transforms.acquisition import apply_along_axis, slice_profile_matrix
from nexus_monai.visualize import save_panel, to_uint8

__all__ = [
    "REPO_BUNDLES",
    "check_thick_scan",
    "to_canonical",
    "from_canonical",
    "thick_slice_channels",
    "degrade_and_interpolate",
    "training_pair",
    "ThickSliceTrainingPaird",
    "contrast_items",
    "SliceStackValidationReport",
    "on_requested_grid",
    "prepare_scan",
    "predict_thick_axis",
    "cohort_network",
    "super_resolve_files",
]


def check_thick_scan(lr, axis=None, factor=None, source=None, method: str = "this method") -> tuple[int, float,
                                                                                                    torch.Tensor]:
    """``(axis, factor, affine)`` of a single-channel LR scan ``(1, x, y, z)``; one-line errors.

    Isotropic volumes, explicit ``axis``/``factor`` that contradict the affine, non-finite
    voxels and non-3D inputs raise :class:`NexusInputError` naming ``source``.
    """
    src = (
        source
        if source is not None
        else (lr.meta.get("filename_or_obj") if isinstance(lr, MetaTensor) else None) or f"{method} input"
    )
    if lr.ndim != 4 or lr.shape[0] != 1:
        raise NexusInputError(src, f"expected a single-channel (1, x, y, z) volume, got shape {tuple(lr.shape)}")
    affine = as_affine(lr.affine) if isinstance(lr, MetaTensor) else torch.eye(4, dtype=torch.float64)
    try:
        det_axis, det_factor = detect_thick_axis(affine, src)
    except NexusInputError as err:
        raise NexusInputError(src, err.problem.replace("LRTV", method)) from None
    sp = [round(float(s), 4) for s in spacing(affine)]
    if axis is not None and parse_axis(axis) != det_axis:
        raise NexusInputError(src,
                              f"thick axis {axis!r} does not match the volume, whose spacing {sp} mm makes axis "
                              f"{'xyz'[det_axis]} the thick one")
    if factor is not None and abs(float(factor) - det_factor) > 1e-3 * det_factor:
        raise NexusInputError(src,
                              f"factor {factor} does not match the volume's spacing {sp} mm, which implies a factor of "
                              f"{det_factor:.4g} along axis {'xyz'[det_axis]}")
    if not torch.isfinite(lr.as_subclass(torch.Tensor) if isinstance(lr, MetaTensor) else lr).all():
        raise NexusInputError(src, "LR volume contains NaN or infinite values")
    if lr.shape[1 + det_axis] < 2:
        raise NexusInputError(src,
                              f"only {lr.shape[1 + det_axis]} slice along the thick axis {'xyz'[det_axis]}; at least 2 "
                              f"are needed")
    return det_axis, det_factor, affine


def to_canonical(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Move spatial ``axis`` (0/1/2 of the last three dims) to the end: ``(..., X, Y, Z)``."""
    return x.movedim(x.ndim - 3 + axis, -1)


def from_canonical(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Inverse of :func:`to_canonical`."""
    return x.movedim(-1, x.ndim - 3 + axis)


def thick_slice_channels(base: torch.Tensor, lr: torch.Tensor, factor: float, neighbours: int = 0) -> torch.Tensor:
    """Network input ``(3 + neighbours, X, Y, Zh)`` from canonical ``base (X, Y, Zh)`` and ``lr (X, Y, M)``."""
    k = float(factor)
    n_hr, m = base.shape[-1], lr.shape[-1]
    z = torch.arange(n_hr, dtype=torch.float64)
    u = (z - (k - 1.0) / 2.0) / k
    fl = torch.floor(u)
    t = (u - fl).to(base.dtype)
    chans = [base, t.expand_as(base), torch.full_like(base, 1.0 / k)]
    if neighbours % 2:
        raise ValueError(f"neighbours must be even, got {neighbours}")
    for j in range(-neighbours // 2 + 1, neighbours // 2 + 1):
        idx = torch.clamp(fl.long() + j, 0, m - 1)
        chans.append(lr.index_select(-1, idx))
    return torch.stack(chans, dim=0)


def degrade_and_interpolate(hr: torch.Tensor, axis: int, factor: float,
                            profile: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate a thick-slice acquisition of a 3D array and interpolate it back.

    ``hr`` ``(A, B, C)`` on a unit grid; returns ``(lr, base)``: ``lr`` with ``floor(n / factor)``
    samples along ``axis`` (the acquisition operator), and ``base`` its cubic B-spline
    interpolation back onto the HR grid ``(A, B, C)`` through the thick-slice affine.
    """
    w = slice_profile_matrix(hr.shape[axis], factor, profile)
    lr = apply_along_axis(hr.to(torch.float64), w, axis).to(torch.float32)
    eye = torch.eye(4, dtype=torch.float64)
    lr_img = MetaTensor(lr[None], affine=thick_slice_affine(eye, axis, factor))
    base = upsample(lr_img, TargetGrid(tuple(hr.shape), eye), "bspline")[0].as_subclass(torch.Tensor)
    return lr, base


def training_pair(hr: torch.Tensor, axis, factor: float, profile: str = "gaussian",
                  neighbours: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs (3 + n, X, Y, Zh), target (1, X, Y, Zh))`` in the canonical layout from an HR ``(1, ...)`` volume."""
    a = parse_axis(axis)
    x = (hr.as_subclass(torch.Tensor) if isinstance(hr, MetaTensor) else torch.as_tensor(hr)).float()[0]
    lr, base = degrade_and_interpolate(x, a, factor, profile)
    inputs = thick_slice_channels(to_canonical(base, a), to_canonical(lr, a), factor, neighbours)
    return inputs.contiguous(), to_canonical(x, a)[None].contiguous()


class ThickSliceTrainingPaird(MapTransform):
    """Dictionary transform: HR ``keys`` -> network inputs (same key) and target (``label_key``).

    The thick axis, factor and slice profile of every item come from its ``axis_key``,
    ``factor_key`` and ``profile_key`` entries (one per contrast, from the protocol; see
    :func:`contrast_items`). Outputs are plain tensors in the canonical layout (thick axis last),
    so they carry no affine.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", neighbours: int = 0, axis_key: str = "axis",
                 factor_key: str = "factor", profile_key: str = "profile", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.neighbours = label_key, int(neighbours)
        self.axis_key, self.factor_key, self.profile_key = axis_key, factor_key, profile_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.label_key] = training_pair(d[key], d[self.axis_key], float(d[self.factor_key]),
                                                      str(d.get(self.profile_key, "gaussian")), self.neighbours)
        return d


def contrast_items(datalist: str | os.PathLike, split: str, protocol: Mapping,
                   contrasts: Sequence[str] = ("t1", "t2")) -> list[dict]:
    """One item per subject and contrast of a datalist split, with the protocol's acquisition.

    ``{"image": path, "contrast": c, "axis": "z", "factor": 2.0, "profile": "gaussian"}``.
    """
    items = []
    for subject in load_datalist(datalist, split):
        for c in contrasts:
            acq = protocol["contrasts"][c]
            items.append(
                {
                    "image": subject[c],
                    "subject": subject.get("subject", ""),
                    "contrast": c,
                    "axis": str(acq["axis"]),
                    "factor": float(acq["factor"]),
                    "profile": str(acq.get("profile", "gaussian")),
                }
            )
    if not items:
        raise NexusInputError(datalist, f"split {split!r} has no subjects")
    return items


class SliceStackValidationReport(EpochReport):
    """Per-case rows and a panel of the first case after each validation of a slice-stack network.

    Reads the evaluator's decollated output (``image`` = network input, channel 0 the B-spline
    base; ``pred``; ``label`` = HR target; canonical layout, thick axis last) and, when the batch
    kept them, the items' ``subject`` and ``contrast``. Rows: ``case``, ``psnr``/``ssim`` of the
    network and ``bspline_psnr``/``bspline_ssim`` of its input (PSNR over the whole volume with data
    range 1, as the bundles' key metric; SSIM on the target's non-zero voxels). Panel: B-spline
    input, network and target on the slice across the thick axis (first axis) with the most
    target voxels, saved as ``<output_dir>/<prefix>_panel_epochNNNN.png`` (without ``output_dir``
    the tiles side by side as an array). Left in ``engine.state.validation_report`` as
    ``{"epoch", "panel", "rows"}`` for :class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger`.
    """

    def _iteration(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else []
        for i, out in enumerate(engine.state.output):
            vols = {k: out[k].detach().cpu().as_subclass(torch.Tensor).float().numpy()[0]
                    for k in ("image", "pred", "label")}
            item = batch[i] if i < len(batch) and isinstance(batch[i], Mapping) else {}
            name = "_".join(str(item[k]) for k in ("subject", "contrast") if item.get(k)) or str(len(self.rows))
            gt, mask = vols["label"], vols["label"] > 0
            row = {"case": name}
            for tag, key in (("", "pred"), ("bspline_", "image")):
                row[f"{tag}psnr"] = psnr(gt, vols[key])
                row[f"{tag}ssim"] = ssim3d(gt, vols[key], mask) if mask.any() else float("nan")
            self.rows.append(row)
            if self.panel is None:
                x = int(np.argmax(mask.sum((1, 2))))
                vmax = intensity_scale(gt, mask) if mask.any() else 1.0
                self.panel = [to_uint8(vols[k][x], vmax) for k in ("image", "pred", "label")]

    def _epoch(self, engine: Engine) -> None:
        if not self.rows:
            return
        epoch = engine.state.epoch  # ValidationHandler runs the evaluator with the trainer's epoch
        panel = None
        if self.panel:
            if self.output_dir is not None:
                panel = self.output_dir / f"{self.prefix}_panel_epoch{epoch:04d}.png"
                save_panel([self.panel], panel, col_labels=["B-spline input", "network", "target"])
                panel = str(panel)
            else:  # the tiles side by side, oriented as save_panel shows them
                panel = np.hstack([np.flipud(t.T) for t in self.panel])
        engine.state.validation_report = {"epoch": epoch, "panel": panel, "rows": list(self.rows)}


def on_requested_grid(volume: torch.Tensor, hr_grid: TargetGrid, grid: TargetGrid, meta: dict) -> MetaTensor:
    """A result ``(X, Y, Z)`` on ``hr_grid`` as a MetaTensor ``(1, ...)`` on ``grid`` (trilinear if they differ)."""
    arr = volume.float()[None].contiguous()
    same = tuple(grid.shape) == tuple(hr_grid.shape) and torch.allclose(as_affine(grid.affine), hr_grid.affine,
                                                                        atol=1e-5)
    if same:
        return MetaTensor(arr, affine=as_affine(grid.affine).clone(), meta=dict(meta))
    out = upsample(MetaTensor(arr, affine=hr_grid.affine.clone(), meta=dict(meta)), grid, "trilinear")
    out.meta.update({k: v for k, v in meta.items() if k not in ("affine",)})
    return out


def prepare_scan(lr, axis=None, factor=None, source=None, method: str = "this method"):
    """Shared first steps: checks, natural HR grid, intensity scale, B-spline base on that grid.

    Returns ``(axis, factor, hr_grid, scale, base, lr)``: ``base`` ``(X, Y, Z)`` on ``hr_grid`` and
    ``lr`` ``(x, y, z)``, both divided by ``scale``.
    """
    a, k, affine = check_thick_scan(lr, axis, factor, source, method)
    hr_grid = natural_hr_grid(lr.shape, affine, a, k)
    y = lr.as_subclass(torch.Tensor).float() if isinstance(lr, MetaTensor) else torch.as_tensor(lr).float()
    scale = intensity_scale(y, y != 0) if bool((y != 0).any()) else 1.0
    y = y / scale
    base = upsample(MetaTensor(y, affine=affine), hr_grid, "bspline")[0].as_subclass(torch.Tensor)
    return a, k, hr_grid, scale, base, y[0]


def predict_thick_axis(lr, grid: TargetGrid, network: torch.nn.Module, *, neighbours: int = 0, axis=None, factor=None,
                       source=None, method: str = "slice_sr") -> MetaTensor:
    """A cohort slice-SR network (SAINT, I3Net) on one LR scan ``(1, x, y, z)`` -> ``(1, *grid.shape)``."""
    a, k, hr_grid, scale, base, y = prepare_scan(lr, axis, factor, source, method)
    x = thick_slice_channels(to_canonical(base, a), to_canonical(y, a), k, neighbours)
    device = next(network.parameters()).device
    network.eval()
    with torch.no_grad():
        out = network(x[None].to(device))[0, 0].float().cpu()
    out = torch.clamp(from_canonical(out, a), min=0.0) * scale
    meta = {k_: v for k_, v in lr.meta.items() if k_ != "affine"} if isinstance(lr, MetaTensor) else {}
    meta[method] = {"axis": a, "factor": k}
    return on_requested_grid(out, hr_grid, grid, meta)


def cohort_network(name: str, bundle: str | os.PathLike | None = None,
                   weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The trained network of ``bundles/<name>`` (``models/model.pt`` or ``weights``), loaded once per process.

    Shares the cache of :func:`nexus_monai.engines.bundle_model.bundle_model`. A missing checkpoint
    raises one line: ``<path>: checkpoint not found (train the bundle first ...)``.
    """
    network, _ = bundle_model(bundle if bundle is not None else REPO_BUNDLES / name, weights=weights)
    return network


def super_resolve_files(fn, images: Sequence[str], output_dir: str | os.PathLike, spacing_mm=None, like=None,
                        postfix: str = "sr") -> list[Path]:
    """Apply ``fn(lr MetaTensor, grid) -> MetaTensor`` to NIfTI files; writes ``<name>_<postfix>.nii.gz``.

    The grid is ``like``'s, or each input's field of view at ``spacing_mm`` (default: the natural
    HR grid of the scan). Outputs are written atomically.
    """
    out_dir = Path(output_dir)
    written = []
    for path in images:
        lr = load_volume(path)
        if like:
            grid = TargetGrid.like(load_volume(like))
        elif spacing_mm:
            sp = [float(s) for s in (spacing_mm if isinstance(spacing_mm, (list, tuple)) else [spacing_mm] * 3)]
            grid = TargetGrid.from_spacing(lr.shape[1:], lr.affine, sp)
        else:
            a, k, affine = check_thick_scan(lr, source=path)
            grid = natural_hr_grid(lr.shape, affine, a, k)
        name = Path(path).name.split(".nii")[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(save_volume(fn(lr, grid), out_dir / f"{name}_{postfix}.nii.gz"))
    return written

