"""Writing the dataset: subject folders, ``dataset.json``, README, montage, and the embedded cache.

Files per subject ``<ID>`` (``SynBraTS_NNNN`` for training/validation/test, ``SynBraTSTA_NNNN`` for
the test-only anatomy family): ``<ID>/<ID>_{t1,t1ce,t2,flair}.nii.gz`` (float32),
``<ID>_seg.nii.gz`` (uint8 labels {0, 1, 2, 4}), ``<ID>_lesions.nii.gz`` (int16 instance map, the
``keys.py`` encoding), the noise-free renders ``<ID>_<modality>_clean.nii.gz`` (datalist keys
``<modality>_clean``: what LR scans are simulated from and scored against) and ``<ID>_params.json``.
Each datalist entry also carries every scan's drawn thick-slice acquisition
(``<modality>_slice_profile``, ``_thickness_ratio``, ``_slab_offset``, ``_lr_noise``, ``_noise_seed``;
see :data:`~nexus_monai.data.synth.physics.LR_ACQUISITION_RANGES`). Each folder is written into a hidden temporary
folder and renamed, so a killed run leaves no half-written subject; ``dataset.json`` is written
last (atomically), so an existing datalist means a complete dataset.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from nexus_monai.data.datalist import DEFAULT_PROPORTIONS, default_cache_dir, split_counts
from nexus_monai.data.io import save_volume, write_text_atomic
from nexus_monai.data.synth.grid import SIZES
from nexus_monai.data.synth.physics import MODALITIES
from nexus_monai.data.synth.readme import README_FIRST_LINE, readme_text
from nexus_monai.data.synth.sources import TEST_ONLY_SOURCE
from nexus_monai.data.synth.subject import SimulatedSubject, simulate_subject
from nexus_monai.errors import NexusInputError
from nexus_monai.keys import LESION_BOTH, LESION_T1_ONLY, LESION_T2_ONLY, LESIONS, lesion_class
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.visualize import to_uint8

__all__ = ["GENERATOR_VERSION", "SPLIT_PROPORTIONS", "split_subjects", "generate_dataset", "ensure_embedded_dataset"]

GENERATOR_VERSION = "3.0.0"
"""Version of the simulation recipe; bump when the same arguments would give different data
(it keys the embedded-dataset cache, so an old cached dataset is never reused)."""

SPLIT_PROPORTIONS = DEFAULT_PROPORTIONS
"""Training / validation / test proportions (the paper's 48/10/15 of 73 BraTS subjects)."""

TEST_ANATOMY_SPLIT = "test_anatomy"
_SUBJECT_RE = re.compile(r"^SynBraTS(TA)?_\d{4,}$")
_SEG_COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 4: (250, 220, 30)}
_LESION_COLOURS = {LESION_T2_ONLY: (255, 60, 200), LESION_T1_ONLY: (60, 160, 255), LESION_BOTH: (60, 255, 200)}


def split_subjects(subjects: int, seed: int) -> dict[str, list[int]]:
    """Seeded train/validation/test split of subject indices ``1..subjects``.

    Sizes from :func:`nexus_monai.data.datalist.split_counts` (48/10/15 proportions, the rule
    every datalist uses); the order from ``default_rng([seed, 0])``. Lists are sorted."""
    n_train, n_val, n_test = split_counts(subjects, SPLIT_PROPORTIONS)
    order = np.random.default_rng([int(seed), 0]).permutation(np.arange(1, subjects + 1))
    return {
        "training": sorted(int(i) for i in order[n_val + n_test :]),
        "validation": sorted(int(i) for i in order[:n_val]),
        "test": sorted(int(i) for i in order[n_val : n_val + n_test]),
    }


def _montage_png(subject: SimulatedSubject, spacing: float) -> bytes:
    """PNG bytes of a 6 x 3 panel montage (rows t1, t1ce, t2, flair, seg over FLAIR through the
    tumour centroid, lesion classes over T2w through the slices richest in lesions; columns axial,
    coronal, sagittal), 1 pixel per mm; axial and coronal in neurological orientation (subject
    right on the right), anterior / superior up, sagittal with anterior on the left."""
    from PIL import Image, ImageDraw, ImageFont

    seg, lesions = subject.seg, subject.lesions
    centre = [int(round(v)) for v in np.argwhere(seg > 0).mean(0)] if seg.any() else [n // 2 for n in seg.shape]
    les_centre = (  # per view, the slice holding the most lesion voxels
        [int(np.argmax((lesions > 0).sum(axis=tuple(b for b in range(3) if b != a)))) for a in range(3)]
        if lesions.any() else centre
    )
    zoom = max(1, int(round(spacing)))
    side = max(seg.shape) * zoom

    def planes(vol, at):
        i, j, k = at
        return [vol[:, :, k].T[::-1], vol[:, j, :].T[::-1], vol[i, :, :].T[::-1, ::-1]]

    def panel(img2d):
        img2d = np.repeat(np.repeat(img2d, zoom, axis=0), zoom, axis=1)
        out = np.zeros((side, side) + img2d.shape[2:], img2d.dtype)
        r0, c0 = (side - img2d.shape[0]) // 2, (side - img2d.shape[1]) // 2
        out[r0 : r0 + img2d.shape[0], c0 : c0 + img2d.shape[1]] = img2d
        return out

    def grey(vol):  # the evaluation's display scale: 99.5th brain percentile -> white
        return to_uint8(vol, intensity_scale(vol, subject.brain) if subject.brain.any() else 1.0)

    def overlay(background, labels, colours, at):
        row = []
        for p_img, p_lab in zip(planes(background, at), planes(labels, at)):
            rgb = np.repeat(p_img[..., None], 3, axis=2).astype(np.float32)
            for label, colour in colours.items():
                hit = p_lab == label
                rgb[hit] = 0.45 * rgb[hit] + 0.55 * np.array(colour, np.float32)
            row.append(panel(rgb.astype(np.uint8)))
        return row

    rows = []
    for modality in MODALITIES:
        g = grey(subject.images[modality])
        rows.append([np.repeat(panel(p)[..., None], 3, axis=2) for p in planes(g, centre)])
    rows.append(overlay(grey(subject.images["flair"]), seg, _SEG_COLOURS, centre))
    rows.append(overlay(grey(subject.images["t2"]), lesion_class(lesions), _LESION_COLOURS, les_centre))

    label_w, pad = 70, 4
    canvas = np.zeros((len(rows) * (side + pad) + pad, label_w + 3 * (side + pad), 3), np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y0, x0 = pad + r * (side + pad), label_w + c * (side + pad)
            canvas[y0 : y0 + side, x0 : x0 + side] = tile
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for r, name in enumerate([*MODALITIES, "seg", "lesions"]):
        draw.text((6, pad + r * (side + pad) + side // 2 - 6), name, fill=(255, 255, 255), font=font)
    draw.text((6, 4), "SIMULATED", fill=(255, 120, 120), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _is_previous_output(out_dir: Path) -> bool:
    try:
        with (out_dir / "README.txt").open("r", encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n")
    except OSError:
        return False
    return first == README_FIRST_LINE or first.startswith("nexus_monai SYNTHETIC BraTS-format dataset")


def _subject_name(index: int, test_anatomy: bool = False) -> str:
    return f"SynBraTS{'TA' if test_anatomy else ''}_{index:04d}"


def _write_subject(out_dir: Path, name: str, subject: SimulatedSubject) -> None:
    """Write one subject folder atomically: into a hidden temporary folder, then renamed."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    old = out_dir / f".{name}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    for modality in MODALITIES:
        save_volume(subject.images[modality], tmp / f"{name}_{modality}.nii.gz", affine=subject.affine,
                    dtype=np.float32)
        save_volume(subject.clean[modality], tmp / f"{name}_{modality}_clean.nii.gz", affine=subject.affine,
                    dtype=np.float32)
    save_volume(subject.seg, tmp / f"{name}_seg.nii.gz", affine=subject.affine, dtype=np.uint8)
    save_volume(subject.lesions, tmp / f"{name}_{LESIONS}.nii.gz", affine=subject.affine, dtype=np.int16)
    params = json.dumps(subject.parameters, indent=1, sort_keys=True) + "\n"
    (tmp / f"{name}_params.json").write_text(params, encoding="utf-8")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _datalist_entry(name: str, subject: SimulatedSubject) -> dict:
    params = subject.parameters
    entry = {"subject": name, "brats_format": "2020", "anatomy_source": params["anatomy"]["source"],
             "family": params["family"], "field_T": params["field_T"]}
    for key in (*MODALITIES, "seg", LESIONS):
        entry[key] = f"{name}/{name}_{key}.nii.gz"
    for modality in MODALITIES:
        entry[f"{modality}_clean"] = f"{name}/{name}_{modality}_clean.nii.gz"
    for modality in MODALITIES:
        drawn = params["lr_acquisition"][modality]
        entry[f"{modality}_slice_profile"] = drawn["profile"]
        for field in ("thickness_ratio", "slab_offset", "lr_noise", "noise_seed"):
            entry[f"{modality}_{field}"] = drawn[field]
    return entry


def _check_count(out_dir: Path, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise NexusInputError(out_dir, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def generate_dataset(out_dir: str | os.PathLike, subjects: int, seed: int, size: str = "small",
                     test_anatomy: int = 5, only_splits: Sequence[str] | None = None) -> Path:
    """Generate ``subjects`` simulated BraTS-2020-format subjects plus ``test_anatomy`` subjects of
    the test-only anatomy family under ``out_dir``; return it.

    Writes the subject folders (see the module docstring; ``size="full"`` 240 x 240 x 155 at
    1 mm, ``"small"`` 120 x 120 x 78 at 2 mm; qform/sform code 1), ``README.txt`` (says
    SIMULATED, version, seed, size, sources and licences, every randomised range),
    ``dataset.json`` (MONAI datalist: a seeded 48/10/15 training/validation/test split of the
    ``SynBraTS`` subjects and a ``test_anatomy`` split of the ``SynBraTSTA`` subjects, paths
    relative to ``out_dir``) and ``montage.png`` (subject 1). Same arguments -> byte-identical files.
    ``only_splits`` (e.g. ``("test",)``): write only the subjects of those splits (the others' lists
    stay empty; the split itself is the full run's), e.g. the test split on the 1 mm grid.

    ``out_dir`` must be new, empty, or a previous output of this function (its subject folders
    are replaced; other subject folders are removed). Raises :class:`NexusInputError` for bad
    arguments or a foreign non-empty folder, before anything is written.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise NexusInputError(out_dir, f"subjects must be an integer >= 1, got {subjects!r}")
    seed = _check_count(out_dir, "seed", seed)
    test_anatomy = _check_count(out_dir, "test_anatomy", test_anatomy)
    if size not in SIZES:
        raise NexusInputError(out_dir, f"size must be one of {sorted(SIZES)}, got {size!r}")
    subjects = int(subjects)
    if out_dir.exists() and not out_dir.is_dir():
        raise NexusInputError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_previous_output(out_dir):
        raise NexusInputError(
            out_dir, "folder is not empty and is not a previous synthetic dataset (no matching README.txt); "
            "choose a new or empty folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    split = split_subjects(subjects, seed)
    split[TEST_ANATOMY_SPLIT] = list(range(1, test_anatomy + 1))
    generator = f"nexus_monai.data.synth {GENERATOR_VERSION}"
    write_text_atomic(out_dir / "README.txt", readme_text(generator, subjects, seed, size, split).encode("utf-8"))

    _, spacing = SIZES[size]
    held_out = set(split["validation"]) | set(split["test"])
    jobs = [(i, False) for i in range(1, subjects + 1)] + [(i, True) for i in split[TEST_ANATOMY_SPLIT]]
    if only_splits is not None:
        unknown = sorted(set(only_splits) - set(split))
        if unknown:
            raise NexusInputError(out_dir, f"only_splits: unknown split(s) {unknown} (have {sorted(split)})")
        keep = {(i, part == TEST_ANATOMY_SPLIT) for part in only_splits for i in split[part]}
        jobs = [j for j in jobs if j in keep]
        split = {part: (ids if part in only_splits else []) for part, ids in split.items()}
    entries, montage = {}, None
    for index, is_ta in tqdm(jobs, desc=f"synth {size}", unit="subject"):
        subject = simulate_subject(seed, index, size, held_out=index in held_out and not is_ta, test_anatomy=is_ta)
        name = _subject_name(index, is_ta)
        _write_subject(out_dir, name, subject)
        entries[(index, is_ta)] = _datalist_entry(name, subject)
        if montage is None and not is_ta:
            montage = _montage_png(subject, spacing)
        del subject

    wanted = {_subject_name(i, t) for i, t in jobs}
    for child in sorted(out_dir.iterdir()):
        if child.is_dir() and _SUBJECT_RE.match(child.name) and child.name not in wanted:
            shutil.rmtree(child)

    shape, _ = SIZES[size]
    datalist = {
        "name": "SynBraTS",
        "description": (
            "SIMULATED BraTS-2020-format brain MRI (t1, t1ce, t2, flair, seg, lesions) generated from public "
            "templates (MNI152 2009, MNI152NLin6Asym; test_anatomy: ROBEX reference); not patient data. "
            "Validation/test subjects have held-out warps; test_anatomy subjects a test-only anatomy source."
        ),
        "simulated": True,
        "seed": seed,
        "size": size,
        "generator": generator,
        "shape": list(shape),
        "spacing_mm": [spacing] * 3,
        "labels": {"0": "background", "1": "necrotic tumour core", "2": "peritumoral oedema", "4": "enhancing tumour"},
        "lesion_labels": {"1": "T2w/FLAIR only", "2": "T1w only", "3": "both (perivascular space)",
                          "encoding": "class * 1000 + instance"},
        "modality": {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"},
        "numTraining": len(split["training"]),
        "test_anatomy_source": TEST_ONLY_SOURCE,
    }
    for part in ("training", "validation", "test"):
        datalist[part] = [entries[(i, False)] for i in split[part]]
    datalist[TEST_ANATOMY_SPLIT] = [entries[(i, True)] for i in split[TEST_ANATOMY_SPLIT]]
    if montage is not None:
        write_text_atomic(out_dir / "montage.png", montage)
    write_text_atomic(out_dir / "dataset.json", (json.dumps(datalist, indent=2) + "\n").encode("utf-8"))
    return out_dir


def ensure_embedded_dataset(
    root: str | os.PathLike | None = None, subjects: int = 24, seed: int = 0, size: str = "small",
    test_anatomy: int = 5, only_splits: Sequence[str] | None = None,
) -> Path:
    """The ``dataset.json`` of the embedded dataset, generating it on first use.

    ``root`` defaults to ``<cache>/synbrats_<size>_n<subjects>_ta<test_anatomy>_s<seed>_v<GENERATOR_VERSION>``
    (plus ``_only_<splits>`` with ``only_splits``, see :func:`generate_dataset`).
    An existing complete dataset (its ``dataset.json`` written last, with matching generator
    version, seed, size and counts) is reused.
    """
    only = sorted(only_splits) if only_splits is not None else None
    name = f"synbrats_{size}_n{subjects}_ta{test_anatomy}_s{seed}_v{GENERATOR_VERSION}"
    name += f"_only_{'+'.join(only)}" if only is not None else ""
    root = Path(root) if root else default_cache_dir() / name
    datalist = root / "dataset.json"
    if datalist.exists():
        try:
            meta = json.loads(datalist.read_text())
            n = sum(len(meta.get(k, [])) for k in ("training", "validation", "test"))
            expected = subjects if only is None else sum(
                len(ids) for part, ids in split_subjects(subjects, seed).items() if part in only)
            expected_ta = test_anatomy if only is None or TEST_ANATOMY_SPLIT in only else 0
            if (meta.get("seed") == seed and meta.get("size") == size and n == expected
                    and len(meta.get(TEST_ANATOMY_SPLIT, [])) == expected_ta
                    and meta.get("generator") == f"nexus_monai.data.synth {GENERATOR_VERSION}"):
                return datalist
        except (json.JSONDecodeError, OSError):
            pass
    generate_dataset(root, subjects, seed, size, test_anatomy=test_anatomy, only_splits=only)
    return datalist
