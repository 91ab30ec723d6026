"""Whole-volume prediction of both contrasts from two LR scans on files (``nexus-sr predict``,
the bundle's ``inference`` and the evaluation method ``nexus_inr`` all go through here).

Intensities: each LR scan is mapped into the network's training space by its own statistics
(the inferer's ``intensity_norm``: divided by its 99.5th percentile of non-zero voxels, or
z-scored by the mean / std of its non-zero voxels), and the outputs are mapped back, so they are
in the input's units.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import torch
from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv
from monai.data import MetaTensor

from nexus_monai.data.dicom import check_same_patient, is_series_folder, load_scan
from nexus_monai.data.dicom_write import check_series_grid, write_derived_series
from nexus_monai.data.io import save_volume, write_text_atomic
from nexus_monai.data.staging import check_output_dir, staged_output_dir
from nexus_monai.engines.any_protocol import conform_protocol
from nexus_monai.engines.consistency import CONSISTENCY_NAMES, consistency_guard
from nexus_monai.engines.inr import CONTRASTS, ImplicitGridInferer, normalised_zero, unnormalise
from nexus_monai.engines.refine import RefineOptions, check_refine_seconds, contrast_networks, refine_network
from nexus_monai.engines.scan_prep import REGISTRATION_NAME, ScanOptions, prepare_scans, report_json
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, field_of_view, spacing
from nexus_monai.transforms.intensity import reference_normalization

__all__ = ["predict_volumes", "predict_files", "target_grid", "check_reachable", "load_weights", "bundle_config",
           "load_bundle", "OUTPUT_NAMES", "DICOM_NAMES", "OUT_FORMATS", "output_names"]

OUTPUT_NAMES = {"t1": "t1w_sr.nii.gz", "t2": "t2w_sr.nii.gz"}
DICOM_NAMES = {"t1": "t1w_sr", "t2": "t2w_sr"}  # --out-format dicom: one derived series folder per contrast
OUT_FORMATS = ("nifti", "dicom")
MAX_SPACING_MM = 1000.0  # a target voxel larger than a metre is a typo (1e308 would overflow the affine)


def target_grid(reference: MetaTensor, spacing_mm: Sequence[float] | float | None = None,
                like: str | os.PathLike | None = None) -> TargetGrid:
    """The output grid: the field of view of ``reference`` at ``spacing_mm``, or the grid of the ``like`` file."""
    if like is not None and is_series_folder(like):
        return TargetGrid.like(load_scan(like))  # a DICOM series folder (its checks raise one line)
    if like is not None:
        try:
            img = nib.load(str(like))
        except Exception as err:  # noqa: BLE001 - any reader failure becomes one line
            raise NexusInputError(like, f"cannot read the reference grid ({type(err).__name__})") from err
        if len(img.shape) < 3 or (len(img.shape) > 3 and any(int(n) != 1 for n in img.shape[3:])):
            raise NexusInputError(like, f"reference grid must be a 3D image, got shape {tuple(img.shape)}")
        try:
            return TargetGrid.like(img)
        except ValueError as err:  # non-finite or singular affine, empty shape
            raise NexusInputError(like, f"unusable reference grid: {err}") from None
    if spacing_mm is None:
        raise NexusInputError(None, "give a target spacing (mm) or a reference image for the output grid")
    values = list(spacing_mm) if isinstance(spacing_mm, (list, tuple)) else [spacing_mm] * 3
    ok = len(values) == 3 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
    sp = [float(v) for v in values] if ok else []
    if not ok or not all(math.isfinite(v) and 0 < v <= MAX_SPACING_MM for v in sp):
        raise NexusInputError(
            None, f"target spacing must be 3 finite numbers in (0, {MAX_SPACING_MM:g}] mm, got {spacing_mm}"
        )
    try:
        return TargetGrid.from_spacing(reference.shape[-3:], reference.affine, sp)
    except ValueError as err:
        raise NexusInputError(None, f"target spacing {sp} mm: {err}") from None


def check_reachable(grid: TargetGrid, lr: Mapping[str, MetaTensor], sources: Mapping[str, str],
                    max_voxels: float) -> None:
    """Raise a one-line :class:`NexusInputError` if ``grid`` has more than ``max_voxels`` voxels or
    misses the field of view of any scan in ``lr`` (``sources`` names each scan's file for the message)."""
    if grid.num_voxels > max_voxels:
        raise NexusInputError(None,
                              f"target grid {grid.shape} has {grid.num_voxels:,} voxels, above the limit of "
                              f"{int(max_voxels):,}")
    out_box = field_of_view(grid.shape, grid.affine)
    lo_o, hi_o = out_box.min(0).values, out_box.max(0).values
    for c, img in lr.items():
        box = field_of_view(img.shape[-3:], img.affine)
        lo, hi = box.min(0).values, box.max(0).values
        if bool(torch.any(hi_o < lo)) or bool(torch.any(lo_o > hi)):
            raise NexusInputError(
                sources.get(c), "the target grid does not overlap this scan's field of view (unreachable target grid)"
            )


def predict_volumes(network, t1_lr: MetaTensor, t2_lr: MetaTensor, grid: TargetGrid,
                    inferer: ImplicitGridInferer | None = None, conform: bool = True) -> dict:
    """``{"t1": MetaTensor (1, X, Y, Z), "t2": ...}`` on ``grid`` in the inputs' intensity units.

    ``conform``: a network that states its trained protocol range (``protocol_range_mm``, the any-protocol
    model) prints each scan's protocol, refuses one outside the range and resamples a finer in-plane grid
    first (:func:`~nexus_monai.engines.any_protocol.conform_protocol`); other networks: nothing changes."""
    inferer = inferer or ImplicitGridInferer()
    if conform and getattr(getattr(network, "module", network), "protocol_range_mm", None):
        t1_lr, t2_lr = conform_protocol(network, {"t1": t1_lr, "t2": t2_lr}).values()
    mode = getattr(inferer, "intensity_norm", "percentile")
    scaled, maps = {}, {}
    for c, img in (("t1", t1_lr), ("t2", t2_lr)):
        x = img.as_subclass(torch.Tensor).float()
        x = x[None] if x.ndim == 3 else x
        maps[c] = reference_normalization(x, mode) if bool((x != 0).any()) else (0.0, 1.0)
        scaled[c] = MetaTensor((x - maps[c][0]) / maps[c][1], affine=img.affine)
    if mode == "percentile":
        pred = inferer(scaled["t1"], scaled["t2"], network, grid)
        return {c: MetaTensor((pred[c] * maps[c][1])[None], affine=grid.affine.clone()) for c in CONTRASTS}
    background = {c: normalised_zero(*maps[c]) for c in CONTRASTS}
    pred = inferer(scaled["t1"], scaled["t2"], network, grid, background=background)
    return {c: MetaTensor(unnormalise(pred[c], *maps[c])[None], affine=grid.affine.clone()) for c in CONTRASTS}


def predict_files(network, t1: str | os.PathLike, t2: str | os.PathLike, out_dir: str | os.PathLike,
                  spacing_mm: Sequence[float] | float | None = None, like: str | os.PathLike | None = None,
                  inferer: ImplicitGridInferer | None = None, max_voxels: float = 2e9,
                  refine_seconds: float = 0.0, guard: bool = True, out_format: str = "nifti",
                  scans: ScanOptions | None = None) -> dict[str, Path]:
    """Read both LR scans, predict on the requested grid, write ``t1w_sr.nii.gz`` / ``t2w_sr.nii.gz``.

    ``refine_seconds`` > 0: a copy of the network is first fine-tuned on the two scans for that
    budget (:func:`~nexus_monai.engines.refine.refine_network`, with its held-out safeguard).
    ``guard`` (default on): the data-consistency guard (:func:`~nexus_monai.engines.consistency.consistency_guard`)
    corrects the output toward the scans where its re-acquisition departs from them beyond noise and
    writes ``t1w_consistency.nii.gz`` / ``t2w_consistency.nii.gz`` (the LR residual on the output grid).

    Every input and the output folder are checked before any work (one-line
    :class:`NexusInputError`). The outputs are written into a temporary sibling folder that
    replaces ``out_dir`` in one rename (:func:`~nexus_monai.data.staging.staged_output_dir`): a
    killed run leaves the previous complete output or the new one, never a mix. ``out_dir`` must
    be new, empty or an earlier output of this command.

    ``t1`` / ``t2`` are NIfTI files or DICOM series folders (:func:`~nexus_monai.data.dicom.load_scan`).
    ``out_format="dicom"`` writes each contrast as a derived DICOM series folder (``DICOM_NAMES``, see
    :func:`~nexus_monai.data.dicom_write.write_derived_series`; needs ``t1`` as a series) instead of NIfTI.
    ``scans`` (the CLI passes ``ScanOptions()`` by default; None: the scans as read): brain mask or skull
    stripping, the zero-background check and T2w -> T1w registration
    (:func:`~nexus_monai.engines.scan_prep.prepare_scans`), whose report is the result's ``"scans"`` and
    ``registration.json`` beside the outputs.
    The result's ``"seconds"`` holds the wall-clock time of ``load``, ``predict`` (refinement, network,
    guard) and ``write``; ``"dicom"`` (series inputs only) each series' slice facts (``DicomSeries.summary``).
    """
    started = time.perf_counter()
    sources = {"t1": str(t1), "t2": str(t2)}
    for c, path in sources.items():
        if path in ("", "None") or not Path(path).exists():
            raise NexusInputError(path if path not in ("", "None") else None,
                                  f"missing {c} input scan" if path in ("", "None") else "file not found")
    refine_seconds = check_refine_seconds(refine_seconds, "refine_seconds")
    names = output_names(out_format, sources["t1"])
    out = check_output_dir(out_dir, [*OUTPUT_NAMES.values(), *DICOM_NAMES.values(), *CONSISTENCY_NAMES.values(),
                                     REGISTRATION_NAME])
    lr, report = {c: load_scan(p) for c, p in sources.items()}, {}
    series = {c: lr[c].meta["dicom"] for c in CONTRASTS if "dicom" in lr[c].meta}  # slice thickness, gap ...
    if is_series_folder(t1) and is_series_folder(t2):
        check_same_patient(t1, t2)
    grid = target_grid(lr["t1"], spacing_mm, like)
    check_reachable(grid, lr, sources, max_voxels)
    if out_format == "dicom":
        check_series_grid(grid.affine, grid.shape, like)  # a sheared grid has no slices: before any work
    if scans is not None:  # mask / skull / zero-background check, then T2w -> T1w registration (its affine only)
        lr, report["scans"] = prepare_scans(lr, sources, scans)
    lr_net = conform_protocol(network, lr, sources)  # one line per scan; the any-protocol model's range check
    loaded = time.perf_counter()
    maps = {}
    if refine_seconds > 0:
        refined = refine_network(network, lr["t1"], lr["t2"], RefineOptions(max_seconds=refine_seconds),
                                 progress=bool(getattr(inferer, "progress", False)),
                                 intensity_norm=getattr(inferer, "intensity_norm", "percentile"))
        network, report["refine"] = refined.network, refined.log
    nets = contrast_networks(network)  # a refined model may hold one network per contrast
    pred = predict_volumes(nets["t1"], lr_net["t1"], lr_net["t2"], grid, inferer, conform=False)
    if nets["t2"] is not nets["t1"]:
        pred["t2"] = predict_volumes(nets["t2"], lr_net["t1"], lr_net["t2"], grid, inferer, conform=False)["t2"]
    if guard and getattr(nets["t1"], "consistency", None) is None:  # a consistency-trained network: raw = guarded
        pred, maps, report["consistency"] = consistency_guard(pred, lr, grid)
    predicted = time.perf_counter()
    sp = [round(float(v), 4) for v in spacing(grid.affine)]
    with staged_output_dir(out) as stage:
        for c in CONTRASTS:
            if out_format == "dicom":
                write_derived_series(pred[c], stage / names[c], c, sources, grid_note=f"Output spacing {sp} mm.")
            else:
                save_volume(pred[c], stage / names[c])
            if c in maps:
                save_volume(maps[c], stage / CONSISTENCY_NAMES[c])
        if report.get("scans"):
            write_text_atomic(stage / REGISTRATION_NAME, report_json(report["scans"]))
    seconds = {"load": loaded - started, "predict": predicted - loaded, "write": time.perf_counter() - predicted}
    return {"grid_shape": grid.shape, "spacing_mm": sp, **{c: out / names[c] for c in CONTRASTS},
            **{f"{c}_consistency": out / CONSISTENCY_NAMES[c] for c in maps}, **report,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}, **({"dicom": series} if series else {})}


def output_names(out_format: str, t1: str | os.PathLike | None = None) -> dict[str, str]:
    """The output name per contrast for ``out_format`` (``OUTPUT_NAMES`` or ``DICOM_NAMES``); a one-line error
    for an unknown format, or for ``dicom`` when ``t1`` is given and is not a DICOM series folder."""
    if out_format not in OUT_FORMATS:
        raise NexusInputError(None, f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")
    if out_format == "dicom" and t1 is not None and not is_series_folder(t1):
        raise NexusInputError(t1, "--out-format dicom needs the t1 input as a DICOM series folder (the derived series "
                                  "takes its patient, study and frame of reference)")
    return DICOM_NAMES if out_format == "dicom" else OUTPUT_NAMES


def load_weights(network: torch.nn.Module, path: str | os.PathLike,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a ``CheckpointSaver`` file (``{"model": state}``, ``{"network": state}`` or a bare state dict).

    A missing file or a checkpoint whose tensors do not match the network raises a one-line
    :class:`NexusInputError` before any prediction.
    """
    path = Path(path)
    if not path.is_file():
        raise NexusInputError(path, "checkpoint not found (train the bundle first or pass the weights path)")
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise NexusInputError(path, f"cannot read checkpoint ({type(err).__name__})") from err
    for key in ("model", "network"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    target = network.module if hasattr(network, "module") else network
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(first[1:3]).strip() if len(first) > 1 else first[0]
        raise NexusInputError(path, f"checkpoint does not match the network_def ({detail[:300]})") from err
    return network


@contextmanager
def bundle_config(bundle: str | os.PathLike, config: str = "inference.yaml", overlays: Sequence[str] = ()):
    """Parse ``<bundle>/configs/<config>`` (+ ``overlays``) with MONAI's ``ConfigParser``.

    Yields ``(parser, bundle_root, files)``; ``bundle_root`` is already set in the parser. Bundle
    configs are self-contained (no paths relative to the working directory), so nothing here
    changes the process's working directory (safe in a threaded server). A missing config or
    overlay raises a one-line :class:`NexusInputError` before anything is parsed.
    """
    root = Path(bundle).resolve()
    path = root / "configs" / config
    if not path.is_file():
        raise NexusInputError(root, f"not a bundle folder (configs/{config} missing)")
    files = [str(path)] + [str(Path(o).resolve()) for o in overlays]
    for f in files[1:]:
        if not Path(f).is_file():
            raise NexusInputError(f, "config overlay not found")
    parser = ConfigParser()
    parser.read_config(files[0])
    # a training overlay's keys inside sections this config lacks (loss#..., train#...) are skipped
    for overlay in files[1:]:
        for key, value in ConfigParser.load_config_file(overlay).items():
            nested = str(key).replace("::", "#")
            if "#" in nested and nested.lstrip("+").split("#")[0] not in parser.config:
                continue
            merge_kv(parser, key, value)
    parser["bundle_root"] = str(root)
    yield parser, root, files


def load_bundle(bundle: str | os.PathLike, overlays: Sequence[str] = (), weights: str | os.PathLike | None = None,
                device: str | torch.device | None = None, overrides: Mapping | None = None):
    """``(network with weights, ImplicitGridInferer, parser)`` from ``<bundle>/configs/inference.yaml``.

    ``overlays``: extra config files merged over it (e.g. the ``paper.yaml`` the checkpoint was
    trained with, whose ``network_def#...`` keys then apply); parsed by :func:`bundle_config`.
    """
    with bundle_config(bundle, "inference.yaml", overlays) as (parser, _, _):
        if device is not None:
            parser["device"] = f"$torch.device('{device}')"
        for k, v in (overrides or {}).items():
            parser[k] = v
        if weights is not None:
            parser["ckpt_path"] = str(weights)
        network = parser.get_parsed_content("network")
        load_weights(network, parser.get_parsed_content("ckpt_path"), parser.get_parsed_content("device"))
        inferer = parser.get_parsed_content("inferer")
    network.eval()
    return network, inferer, parser
