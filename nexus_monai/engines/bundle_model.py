"""A trained bundle's model, loaded once per process: the cohort methods of the evaluation and the baselines.

:func:`bundle_model` goes through :func:`nexus_monai.engines.predict.load_bundle` (the bundle's
``configs/inference.yaml``, its ``network_def`` and checkpoint) and keeps the result keyed by the
bundle folder, the config overlays and the checkpoint, so ``nexus-sr evaluate`` loads each model
once however many subjects it scores. A missing checkpoint (``<bundle>/models/model.pt``, or
``weights``) or one that does not match ``network_def`` is a one-line ``NexusInputError``.

Device: the CPU, unless the environment variable ``NEXUS_EVAL_DEVICE`` names another (``cuda``,
``cuda:1``, or ``auto`` = CUDA when available); ``python -m nexus_monai.ops.gpu_run`` sets it so the
cohort models of its evaluations run on the GPU. The outputs come back on the CPU either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nexus_monai.engines.predict import load_bundle
from nexus_monai.paths import in_repo

__all__ = ["bundle_folder", "bundle_model", "eval_device"]

_BUNDLE_MODELS: dict = {}


def bundle_folder(bundle: str | os.PathLike) -> Path:
    """``bundle`` as given, or relative to the repository root when the working directory lacks it."""
    return in_repo(bundle)


def eval_device() -> str:
    """The device cohort models are loaded on: ``NEXUS_EVAL_DEVICE`` (``auto``: CUDA when available), else ``cpu``."""
    name = os.environ.get("NEXUS_EVAL_DEVICE", "").strip() or "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def bundle_model(bundle: str | os.PathLike = "bundles/nexus_inr", overlays: tuple = (),
                 weights: str | os.PathLike | None = None) -> tuple[torch.nn.Module, object]:
    """A trained bundle's ``(network, inferer)`` on :func:`eval_device`, loaded once per process (cohort models).

    ``overlays``: config files merged over ``inference.yaml`` (the form the checkpoint was trained
    with); ``weights``: a checkpoint instead of ``<bundle>/models/model.pt``. The inferer's own
    progress bar is switched off (the evaluation shows one bar over subjects x methods).
    """
    folder = bundle_folder(bundle)
    device = eval_device()
    key = (str(folder.resolve()), tuple(overlays), None if weights is None else str(Path(weights).resolve()), device)
    if key not in _BUNDLE_MODELS:
        network, inferer, _ = load_bundle(folder, overlays, weights=weights, device=device)
        if hasattr(inferer, "progress"):
            inferer.progress = False
        _BUNDLE_MODELS[key] = (network, inferer)
    return _BUNDLE_MODELS[key]

