"""Served models: a bundle folder loaded ONCE (``load_bundle``), predicting through ``predict_files``.

A model is named by its bundle folder (``bundles/nexus_inr`` -> ``nexus_inr``). It takes the
LR scans ``t1`` and ``t2`` (NIfTI paths, each with its own affine) and writes both contrasts on
the requested grid exactly as ``nexus-sr predict`` does (same function, same files), so the REST
service, the MONAI Label app and the CLI cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from nexus_monai.engines.predict import OUTPUT_NAMES, load_bundle, predict_files
from nexus_monai.errors import NexusInputError
from nexus_monai.keys import CONTRASTS
from nexus_monai.serving.cancel import install_cancel_checks
from nexus_monai.serving.params import InferParams, ServingError

__all__ = ["BundleModel", "load_models", "split_model_option"]

INPUT_DESCRIPTIONS = {
    "t1": "T1-weighted LR scan (NIfTI, any orientation/affine; e.g. thick along z)",
    "t2": "T2-weighted LR scan (NIfTI, any orientation/affine; e.g. thick along y)",
}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BundleModel:
    """A trained bundle ready to serve.

    Args:
        bundle: bundle folder with ``configs/inference.yaml`` (``network_def``, ``inferer``, ``ckpt_path``).
        overlays: config files merged over it (e.g. the overlay the checkpoint was trained with).
        weights: checkpoint (default: the bundle's ``ckpt_path``, ``<bundle>/models/model.pt``).
        device: ``cpu``, ``cuda:0`` ... (default: the bundle's ``device``).
        chunk_size: query points decoded at once (bounds peak memory per request).
        max_output_voxels: the largest volume in voxels: larger target grids are refused (422) and
            larger uploads (by their header) 413, before any work.
        max_memory_gib: target peak RSS of an inference (the encoder tiles are planned from it, as for
            ``nexus-sr predict``; None: the bundle inferer's, ``ImplicitGridInferer``'s default). Each
            request plans against the process RSS at its start, so concurrent workers shrink their tiles.
    """

    inputs: tuple[str, ...] = ("t1", "t2")

    def __init__(self, bundle: str | os.PathLike, overlays: Sequence[str] = (),
                 weights: str | os.PathLike | None = None,
                 device: str | None = None, chunk_size: int | None = None, max_output_voxels: float = 1.5e8,
                 max_memory_gib: float | None = None):
        self.bundle = Path(bundle).resolve()
        self.name = self.bundle.name
        self.network, self.inferer, parser = load_bundle(self.bundle, overlays, weights=weights, device=device)
        self.inferer.progress = False
        install_cancel_checks(self.network)  # a disconnected client's job stops at its next module call
        if chunk_size:
            self.inferer.chunk_size = int(chunk_size)
        if max_memory_gib is not None and hasattr(self.inferer, "max_memory_gib"):
            self.inferer.max_memory_gib = float(max_memory_gib)
        self.outputs: tuple[str, ...] = tuple(CONTRASTS)
        self.max_output_voxels = float(max_output_voxels)
        self.default_spacing = tuple(float(s) for s in (parser.get("target_spacing") or [1.0, 1.0, 1.0]))
        self.device = str(parser.get_parsed_content("device"))
        self.weights = Path(parser.get_parsed_content("ckpt_path")).resolve()
        self.weights_sha256 = _sha256(self.weights)
        self.overlays = [str(Path(o).resolve()) for o in overlays]
        meta_file = self.bundle / "configs" / "metadata.json"
        self.metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.num_parameters = sum(p.numel() for p in self.network.parameters())

    @property
    def version(self) -> str:
        """The bundle's ``metadata.json`` version (``unversioned`` without one)."""
        return str(self.metadata.get("version", "unversioned"))

    def info(self) -> dict:
        """This model's entry in ``GET /info/`` (MONAI Label's per-model shape plus inputs/outputs/versions)."""
        description = self.metadata.get("description") or (
            f"{self.name}: multi-contrast arbitrary-scale super-resolution of T1w + T2w LR scans onto any grid")
        return {
            "type": "others",  # MONAI Label's InferType for a model that is neither segmentation nor deepgrow
            "labels": [],      # intensities out, no label classes
            "dimension": 3,
            "description": description,
            "version": self.version,
            "inputs": {c: INPUT_DESCRIPTIONS.get(c, c) for c in self.inputs},
            "outputs": {c: OUTPUT_NAMES[c] for c in self.outputs},
            "weights": {"file": self.weights.name, "sha256": self.weights_sha256},
            "network_parameters": self.num_parameters,
            "config": {"spacing": list(self.default_spacing), "like": None, "contrasts": list(self.outputs),
                       "output": "image",
                       "device": self.device, "chunk_size": self.inferer.chunk_size,
                       "max_output_voxels": int(self.max_output_voxels),
                       "max_memory_gib": getattr(self.inferer, "max_memory_gib", None)},
        }

    def predict(self, scans: Mapping[str, Path], out_dir: Path, params: InferParams) -> dict:
        """Run ``predict_files`` on stored uploads; returns its result (output paths, grid shape, spacing).

        ``scans``: upload field -> stored NIfTI path (``t1``, ``t2`` and, when ``params.like ==
        "like"``, the reference image). Bad content raises :class:`NexusInputError` naming the path.
        """
        missing = [c for c in self.inputs if c not in scans]
        if missing:
            raise ServingError(400,
                               f"missing modality: {self.name} needs uploads {list(self.inputs)}, got {sorted(scans)}",
                               missing[0])
        like = None
        if params.like is not None:
            if params.like not in scans:
                raise ServingError(400, f"params.like is {params.like!r} but no such upload was sent", params.like)
            like = scans[params.like]
        spacing = params.spacing_mm if (params.spacing_mm is not None or like is not None) else self.default_spacing
        return predict_files(self.network, scans["t1"], scans["t2"], out_dir, spacing_mm=None if like else spacing,
                             like=like,
                             inferer=self.inferer, max_voxels=self.max_output_voxels,
                             refine_seconds=params.refine_seconds,
                             guard=params.guard)


def split_model_option(values: Sequence[str] | None, names: Sequence[str], option: str) -> dict[str, list[str]]:
    """``--config`` / ``--weights`` values per model: ``MODEL=PATH`` for one model, a bare ``PATH`` for all.

    A bare ``--weights`` with several bundles is ambiguous and refused.
    """
    per: dict[str, list[str]] = {n: [] for n in names}
    for value in values or ():
        name, sep, path = value.partition("=")
        if sep and name in per:
            per[name].append(path)
        else:
            for n in names:
                per[n].append(value)
    if option == "--weights":
        for n, paths in per.items():
            if len(paths) > 1:
                raise NexusInputError(None,
                                      f"--weights: {len(paths)} checkpoints for model {n!r}; with several bundles "
                                      f"write --weights MODEL=PATH")
    return per


def load_models(bundles: Sequence[str], configs: Sequence[str] | None = None, weights: Sequence[str] | None = None,
                device: str | None = None, chunk_size: int | None = None, max_output_voxels: float = 1.5e8,
                max_memory_gib: float | None = None) -> dict[str, BundleModel]:
    """Load every ``--bundle`` once; ``{name: BundleModel}`` in the order given (names must be distinct)."""
    names = [Path(b).resolve().name for b in bundles]
    if len(set(names)) != len(names):
        raise NexusInputError(None,
                              f"--bundle: two bundles share a folder name ({names}); models are named by their folder")
    cfg = split_model_option(configs, names, "--config")
    wts = split_model_option(weights, names, "--weights")
    return {
        n: BundleModel(
            b,
            cfg[n],
            (wts[n] or [None])[0],
            device=device,
            chunk_size=chunk_size,
            max_output_voxels=max_output_voxels,
            max_memory_gib=max_memory_gib,
        )
        for n, b in zip(names, bundles)
    }

