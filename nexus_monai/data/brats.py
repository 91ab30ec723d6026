"""BraTS discovery, seeded datalists and the subject loader.

Subject folders are recognised by their file names:

* 2020 / 2021: ``<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`` (e.g. ``BraTS20_Training_001``,
  ``BraTS2021_00000``; the embedded ``SynBraTS_0001`` subjects use these names too);
* 2023: ``<ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (e.g. ``BraTS-GLI-00000-000``).

Every subject becomes a dict with canonical keys ``t1, t1ce, t2, flair, seg`` (paths),
``subject`` and ``brats_format`` (``"2020"``, ``"2021"`` or ``"2023"``). Labels are remapped to
{0, 1, 2, 4} at load time (2023's enhancing tumour 3 -> 4).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform

from nexus_monai.data.datalist import (  # noqa: F401  (re-exported: the public names of this module)
    DEFAULT_PROPORTIONS,
    default_cache_dir,
    load_datalist,
    make_datalist,
    split_counts,
    write_datalist,
)
from nexus_monai.data.dicom import load_scan
from nexus_monai.data.synth import ensure_embedded_dataset
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import as_affine

__all__ = [
    "MODALITIES",
    "BRATS_LABELS",
    "discover_brats",
    "split_counts",
    "make_datalist",
    "write_datalist",
    "load_datalist",
    "resolve_datalist",
    "LoadVolumed",
    "RemapBraTSLabelsd",
    "brats_loader",
]

MODALITIES = ("t1", "t1ce", "t2", "flair", "seg")
BRATS_LABELS = (0, 1, 2, 4)

_SUFFIXES = {
    "2020": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
_EXT = (".nii.gz", ".nii")
_FILE_RE = re.compile(r"^(?P<id>.+?)(?P<suffix>_t1|_t1ce|_t2|_flair|_seg|-t1n|-t1c|-t2w|-t2f|-seg)\.nii(\.gz)?$")


def _find(folder: Path, name: str) -> Path | None:
    for ext in _EXT:
        p = folder / f"{name}{ext}"
        if p.exists():
            return p
    return None


def _subject_from_folder(folder: Path, required: Sequence[str]) -> dict | None:
    """The subject dict of one folder, ``None`` if it holds no BraTS files at all."""
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and _FILE_RE.match(f.name)]
    if not files:
        return None
    ids = {_FILE_RE.match(f.name)["id"] for f in files}
    foreign = sorted(i for i in ids if i != folder.name)
    if foreign:
        bad = next(f for f in files if _FILE_RE.match(f.name)["id"] == foreign[0])
        raise NexusInputError(bad,
                              f"file belongs to subject {foreign[0]!r}, not to its folder {folder.name!r} (mismatched "
                              f"subjects)")
    fmt = "2023" if any(_FILE_RE.match(f.name)["suffix"].startswith("-") for f in files) else "2020"
    if fmt == "2020" and folder.name.startswith("BraTS2021"):
        fmt = "2021"
    suffixes = _SUFFIXES["2023" if fmt == "2023" else "2020"]
    subject = {"subject": folder.name, "brats_format": fmt}
    for mod, suffix in suffixes.items():
        path = _find(folder, folder.name + suffix)
        if path is not None:
            subject[mod] = str(path)
        elif mod in required:
            raise NexusInputError(folder, f"missing modality {mod!r} (expected {folder.name}{suffix}.nii.gz)")
    return subject


def _check_headers(subject: dict, keys: Sequence[str]) -> None:
    """All present modalities of a subject share one grid (header only, cheap)."""
    ref_key, ref = None, None
    for key in keys:
        if key not in subject:
            continue
        try:
            img = nib.load(subject[key])
        except Exception as err:
            raise NexusInputError(subject[key], f"cannot read NIfTI header ({type(err).__name__}: {err})") from err
        geo = (tuple(img.shape[:3]), np.asarray(img.affine))
        if ref is None:
            ref_key, ref = key, geo
        elif geo[0] != ref[0] or not np.allclose(geo[1], ref[1], atol=1e-3):
            raise NexusInputError(subject[key],
                                  f"grid {geo[0]} differs from {ref_key} {ref[0]} of the same subject (shape or affine "
                                  f"mismatch)")


def discover_brats(root: str | os.PathLike, required: Sequence[str] = ("t1", "t2"),
                   check_headers: bool = True) -> list[dict]:
    """All subjects under ``root`` (folders at any depth), sorted by subject ID.

    Raises :class:`NexusInputError` for a missing root, no subjects, a subject missing a
    ``required`` modality, files of another subject in a folder, or modalities on different grids.
    """
    root = Path(root)
    if not root.is_dir():
        raise NexusInputError(root, "dataset folder not found")
    subjects = []
    for folder in sorted({p.parent for ext in _EXT for p in root.rglob(f"*{ext}")}):
        subject = _subject_from_folder(folder, required)
        if subject is not None:
            if check_headers:
                _check_headers(subject, MODALITIES)
            subjects.append(subject)
    if not subjects:
        raise NexusInputError(root, "no BraTS subjects found (expected <ID>/<ID>_t1.nii.gz or <ID>/<ID>-t1n.nii.gz)")
    dup = {s["subject"] for s in subjects if sum(t["subject"] == s["subject"] for t in subjects) > 1}
    if dup:
        raise NexusInputError(root, f"subject IDs found in more than one folder: {sorted(dup)}")
    return subjects


def resolve_datalist(dataset_dir: str | os.PathLike | None = None, seed: int = 0, embedded_subjects: int = 24) -> Path:
    """A datalist JSON for bundles: the embedded dataset, a folder's ``dataset.json``, or a BraTS root.

    * ``None`` / ``""`` / ``"embedded"``: the embedded simulated dataset (generated on first use).
    * a folder containing ``dataset.json``, or a JSON file: used as is.
    * a BraTS root: discovered, split with ``seed`` (48/10/15) and written (absolute paths) to
      ``<cache>/datalists/<folder name>_s<seed>.json``.
    """
    if dataset_dir in (None, "", "embedded"):
        return ensure_embedded_dataset(subjects=embedded_subjects, seed=seed)
    path = Path(dataset_dir)
    if path.is_file():
        return path
    if (path / "dataset.json").exists():
        return path / "dataset.json"
    datalist = make_datalist(discover_brats(path), seed=seed, name=path.name, source=str(path.resolve()))
    return write_datalist(default_cache_dir() / "datalists" / f"{path.name}_s{seed}.json", datalist)


class LoadVolumed(MapTransform):
    """Load NIfTI paths (or DICOM series folders) under ``keys`` as checked ``(1, X, Y, Z)`` MetaTensors (see
    :func:`~nexus_monai.data.dicom.load_scan`).

    With ``same_grid`` every loaded key must share the first key's shape and affine.
    """

    def __init__(self, keys: KeysCollection, same_grid: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.same_grid = same_grid

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first = None
        for key in self.key_iterator(d):
            d[key] = load_scan(d[key])
            if self.same_grid:
                if first is None:
                    first = key
                elif d[key].shape[1:] != d[first].shape[1:] or not torch.allclose(as_affine(d[key]),
                                                                                  as_affine(d[first]), atol=1e-3):
                    raise NexusInputError(d[key].meta["filename_or_obj"],
                                          f"grid {tuple(d[key].shape[1:])} differs from {first} "
                                          f"{tuple(d[first].shape[1:])} (shape or affine mismatch)")
        return d


class RemapBraTSLabelsd(MapTransform):
    """Map BraTS labels to {0, 1, 2, 4} and reject anything else.

    2023 segmentations use 3 for enhancing tumour (-> 4). In 2020/2021 data a 3 is an error
    (those editions never use it), as is any label outside {0, 1, 2, 3, 4}.
    """

    def __init__(self, keys: KeysCollection = "seg", format_key: str = "brats_format", default_format: str = "2020",
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.format_key, self.default_format = format_key, default_format

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        fmt = str(d.get(self.format_key, self.default_format))
        for key in self.key_iterator(d):
            seg = d[key]
            source = getattr(seg, "meta", {}).get("filename_or_obj", key)
            values = torch.unique(
                seg.as_subclass(torch.Tensor) if hasattr(seg, "as_subclass") else torch.as_tensor(seg)
            )
            if not torch.all(values == values.round()):
                raise NexusInputError(source, "segmentation has non-integer labels")
            present = {int(v) for v in values.tolist()}
            allowed = {0, 1, 2, 3, 4} if fmt == "2023" else set(BRATS_LABELS)
            bad = sorted(present - allowed)
            if bad:
                raise NexusInputError(source,
                                      f"labels {bad} not allowed in a BraTS {fmt} segmentation (expected "
                                      f"{sorted(allowed)})")
            if fmt == "2023" and 3 in present:
                seg = seg.clone()
                seg[seg == 3] = 4
            d[key] = seg
        return d


def brats_loader(keys: Sequence[str] = ("t1", "t2", "seg"), same_grid: bool = True) -> Compose:
    """The transform that turns a datalist entry into checked MetaTensors (labels remapped)."""
    keys = list(keys)
    steps = [LoadVolumed(keys, same_grid=same_grid)]
    if "seg" in keys:
        steps.append(RemapBraTSLabelsd("seg"))
    return Compose(steps)
