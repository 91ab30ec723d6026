"""One MONAI Label infer request for a super-resolution model, in plain Python (no monailabel import).

MONAI Label hands an infer task a request dict: ``image`` is the path of ONE datastore scan
(MONAI Label resolved the image id), plus the client's ``params`` merged in. A multi-contrast
model needs the subject's other scan too; it is found next to ``image`` by the contrast token in
the file name (``..._t1.nii.gz`` <-> ``..._t2.nii.gz``, ``-t1n`` <-> ``-t2w``, ``_T1w`` <->
``_T2w``), or given by the app as ``companion_path`` (resolved from a datastore id, never taken
from the client). The three steps below are what :class:`NexusSRInfer` runs as its pre-transform,
inferer and writer stages:

1. :func:`prepare_request`: the pair of scans and the parsed params.
2. :func:`predict_request`: ``BundleModel.predict`` (``predict_files``, as ``nexus-sr predict``).
3. :func:`write_result`: the requested contrast as one standalone temporary NIfTI + result JSON
   (MONAI Label deletes the file after sending it; the rest of the work folder is removed here).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nexus_monai.serving.params import ServingError, parse_params

__all__ = ["scan_contrast", "companion_scan", "prepare_request", "PrepareSRRequest", "predict_request", "write_result",
           "CONTRAST_TOKENS"]

# file-name tokens per contrast (BraTS 2020/2021: t1/t2; BraTS 2023: t1n/t2w; BIDS: T1w/T2w)
CONTRAST_TOKENS = {"t1": ("t1", "t1w", "t1n"), "t2": ("t2", "t2w")}
_SEPARATORS = re.compile(r"([_\-.])")


def _split_name(name: str) -> tuple[str, str]:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def scan_contrast(path: str | os.PathLike) -> str | None:
    """``"t1"`` / ``"t2"`` from the file name's contrast token (the last one wins), ``None`` if absent or ambiguous."""
    stem, _ = _split_name(Path(path).name)
    for token in reversed(_SEPARATORS.split(stem)):
        for contrast, tokens in CONTRAST_TOKENS.items():
            if token.lower() in tokens:
                return contrast
    return None


def companion_scan(path: str | os.PathLike, contrast: str) -> Path | None:
    """The existing scan of ``contrast`` beside ``path`` whose name differs only in the contrast token."""
    path = Path(path)
    stem, suffix = _split_name(path.name)
    parts = _SEPARATORS.split(stem)
    for i in reversed(range(len(parts))):
        own = parts[i].lower()
        if not any(own in tokens for tokens in CONTRAST_TOKENS.values()):
            continue
        for token in CONTRAST_TOKENS[contrast]:
            for cased in (token, token.upper(), token[:1].upper() + token[1:]):
                candidate = path.with_name("".join(parts[:i] + [cased] + parts[i + 1:]) + suffix)
                if candidate != path and candidate.is_file():
                    return candidate
        return None
    return None


def prepare_request(data: dict, inputs=("t1", "t2"), outputs=("t1", "t2")) -> dict:
    """Add ``sr_scans`` ({contrast: path}) and ``sr_params`` (:class:`InferParams`) to a MONAI Label request.

    The returned contrast defaults to the contrast of ``image``. Raises :class:`ServingError`
    (400) when the image's contrast or its companion cannot be found.
    """
    image = data.get("image")
    if not isinstance(image, (str, os.PathLike)) or not Path(image).is_file():
        raise ServingError(400,
                           "the request has no image file (MONAI Label resolves the image id to a datastore path)",
                           "image")
    own = scan_contrast(image)
    if own is None:
        raise ServingError(400,
                           f"cannot tell the contrast of {Path(image).name!r} (expect a token {CONTRAST_TOKENS} in the "
                           f"file name)", "image")
    scans = {own: Path(image)}
    for other in inputs:
        if other == own:
            continue
        companion = data.get("companion_path") or companion_scan(image, other)
        if companion is None or not Path(companion).is_file():
            raise ServingError(400,
                               f"missing modality {other}: no {other} scan beside {Path(image).name!r} (same name, "
                               f"contrast token "
                                    f"{'/'.join(CONTRAST_TOKENS[other])})", other)
        scans[other] = Path(companion)
    params = {
        k: data[k]
        for k in ("spacing", "target_spacing", "like", "contrast", "contrasts", "refine_seconds", "guard")
        if data.get(k) not in (None, "")
    }
    if "contrast" not in params and "contrasts" not in params:
        params["contrast"] = own  # the viewer gets back the contrast it sent
    parsed = parse_params(params, inputs, outputs)
    if parsed.like not in (None, *inputs):
        raise ServingError(400, "like must name one of the subject's scans here (t1 or t2)", "params")
    if len(parsed.contrasts) != 1:
        raise ServingError(400, f"MONAI Label returns one image: ask for one contrast, got {list(parsed.contrasts)}",
                           "params")
    return {**data, "sr_scans": scans, "sr_params": parsed}


class PrepareSRRequest:
    """:func:`prepare_request` as a MONAI Label pre-transform (a named callable: MONAI Label logs its class name)."""

    def __init__(self, inputs=("t1", "t2"), outputs=("t1", "t2")):
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)

    def __call__(self, data: dict) -> dict:
        return prepare_request(data, self.inputs, self.outputs)


def predict_request(model, data: dict, workdir: str | os.PathLike | None = None) -> dict:
    """Run ``model.predict`` on the prepared pair into a fresh temporary folder; adds ``sr_result`` and
    ``sr_folder``."""
    folder = Path(tempfile.mkdtemp(prefix="nexus-monailabel-", dir=workdir))
    try:
        result = model.predict(data["sr_scans"], folder, data["sr_params"])
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {**data, "sr_result": result, "sr_folder": folder}


def write_result(data: dict, model_name: str = "nexus_inr") -> tuple[str, dict[str, Any]]:
    """``(path of the requested contrast, result JSON)``: the NIfTI is moved to a standalone temporary file."""
    contrast = data["sr_params"].contrasts[0]
    source = Path(data["sr_result"][contrast])
    fd, target = tempfile.mkstemp(prefix=f"{model_name}_{contrast}w_sr_", suffix=".nii.gz")
    os.close(fd)
    try:
        shutil.move(str(source), target)
    finally:
        shutil.rmtree(data["sr_folder"], ignore_errors=True)
    result = data["sr_result"]
    info = {"model": model_name, "contrast": contrast, "grid_shape": list(result["grid_shape"]),
            "spacing_mm": list(result["spacing_mm"]), "inputs": {c: Path(p).name for c, p in data["sr_scans"].items()}}
    if "consistency" in result:  # MONAI Label returns one image: the guard's residual is summarised here
        info["consistency"] = result["consistency"][contrast]
    if "refine" in result:
        info["refine"] = {k: result["refine"][k] for k in ("chosen", "iterations", "seconds")}
    return target, info

