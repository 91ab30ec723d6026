"""Tests of the embedded synthetic BraTS-format dataset (nexus_monai.data.synth).

Two ``small`` runs of 3 subjects with the same seed plus one 1-subject run with another seed
(about 15-25 s on 2 CPU cores, most of it loading the MNI152 template once).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nexus_monai.data import synth
from nexus_monai.errors import NexusInputError

SEED = 7
N_SUBJECTS = 3


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    first = synth.generate_dataset(root / "a", N_SUBJECTS, SEED, "small")
    second = synth.generate_dataset(root / "b", N_SUBJECTS, SEED, "small")
    other = synth.generate_dataset(root / "c", 1, SEED + 1, "small")
    return first, second, other


def test_same_seed_is_byte_identical(runs):
    first, second, _ = runs
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    assert len(a) == N_SUBJECTS * 6 + 3  # 5 NIfTI + params per subject, README, datalist, montage
    for name in a:
        assert a[name] == b[name], name


def test_gzip_header_has_no_timestamp_or_name(runs):
    data = (runs[0] / "SynBraTS_0001" / "SynBraTS_0001_t1.nii.gz").read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\x00\x00\x00\x00"  # MTIME = 0
    assert not data[3] & 0x08  # no FNAME (the temporary file name) stored


def test_different_seed_differs(runs):
    first, _, other = runs
    for modality in ("t1", "seg"):
        name = f"SynBraTS_0001/SynBraTS_0001_{modality}.nii.gz"
        a = np.asarray(nib.load(first / name).dataobj)
        c = np.asarray(nib.load(other / name).dataobj)
        assert not np.array_equal(a, c)


def test_geometry_labels_and_background(runs):
    root = runs[0]
    expected_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    expected_affine[:3, 3] = [-119.0, -119.0, -77.0]  # field of view centred at world 0
    for index in range(1, N_SUBJECTS + 1):
        name = f"SynBraTS_{index:04d}"
        images = {}
        for modality in (*synth.MODALITIES, "seg"):
            img = nib.load(root / name / f"{name}_{modality}.nii.gz")
            assert img.shape == (120, 120, 78)
            np.testing.assert_allclose(img.affine, expected_affine)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            images[modality] = np.asarray(img.dataobj)
        seg = images.pop("seg")
        assert seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        brain = images["t1"] > 0
        assert 125_000 < brain.sum() < 300_000  # 1.0-2.4 L inside the brain mask (8 mm^3 voxels)
        for modality, volume in images.items():
            assert volume.dtype == np.float32
            assert np.isfinite(volume).all()
            assert np.array_equal(volume > 0, brain), modality  # background exactly 0, brain > 0
        assert not np.any(seg[~brain])


def test_tissue_contrasts(runs):
    """Means over pure-tissue voxels away from the tumour follow the MR physics."""
    root = runs[0]
    split = synth.split_subjects(N_SUBJECTS, SEED)
    held_out = 1 in split["validation"] + split["test"]
    subject = synth.simulate_subject(SEED, 1, "small", held_out=held_out)
    written = np.asarray(nib.load(root / "SynBraTS_0001" / "SynBraTS_0001_t1.nii.gz").dataobj)
    np.testing.assert_array_equal(written, subject.images["t1"])  # files are this simulation
    lesion = subject.fractions["oedema"] + subject.fractions["enhancing"] + subject.fractions["necrosis"]
    free = ~ndimage.binary_dilation(lesion > 0.01, iterations=3) & subject.brain
    means = {}
    for modality, volume in subject.images.items():
        means[modality] = {t: float(volume[free & (subject.fractions[t] > 0.9)].mean()) for t in ("wm", "gm", "csf")}
    assert means["t1"]["wm"] > means["t1"]["gm"] > means["t1"]["csf"]
    assert means["t2"]["csf"] > means["t2"]["gm"] > means["t2"]["wm"]
    assert means["flair"]["csf"] < 0.5 * min(means["flair"]["wm"], means["flair"]["gm"])
    assert means["flair"]["gm"] > means["flair"]["wm"]
    enhancing = (subject.seg == 4) & (subject.fractions["enhancing"] > 0.9)
    ratio_ce = subject.images["t1ce"][enhancing].mean() / means["t1ce"]["wm"]
    ratio_pre = subject.images["t1"][enhancing].mean() / means["t1"]["wm"]
    assert ratio_ce > 1.2 * ratio_pre  # gadolinium enhancement
    oedema = (subject.seg == 2) & (subject.fractions["oedema"] > 0.8)
    assert subject.images["flair"][oedema].mean() > means["flair"]["gm"]


def test_datalist_readme_and_montage(runs):
    root = runs[0]
    datalist = json.loads((root / "dataset.json").read_text())
    assert datalist["simulated"] is True and datalist["seed"] == SEED and datalist["size"] == "small"
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    names = [e["subject"] for k in ("training", "validation", "test") for e in datalist[k]]
    assert sorted(names) == [f"SynBraTS_{i:04d}" for i in range(1, N_SUBJECTS + 1)]
    for part in ("training", "validation", "test"):
        for entry in datalist[part]:
            assert entry["brats_format"] == "2020"
            for key in (*synth.MODALITIES, "seg"):
                assert entry[key] == f"{entry['subject']}/{entry['subject']}_{key}.nii.gz"
                assert (root / entry[key]).is_file()
    readme = (root / "README.txt").read_text()
    assert "SIMULATED" in readme and "not patient data" in readme
    assert f"seed: {SEED}" in readme and "size: small" in readme and "T1 ms" in readme
    from PIL import Image

    png = root / "montage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 500 and image.size[1] > 800


@pytest.mark.parametrize(
    "subjects, expected",
    [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (7, 1, 2)), (73, (48, 10, 15)), (146, (96, 20, 30))],
)
def test_split_sizes(subjects, expected):
    split = synth.split_subjects(subjects, 0)
    assert tuple(len(split[k]) for k in ("training", "validation", "test")) == expected
    assert sorted(sum(split.values(), [])) == list(range(1, subjects + 1))
    assert split == synth.split_subjects(subjects, 0)


def test_bad_arguments(tmp_path):
    with pytest.raises(NexusInputError, match="subjects"):
        synth.generate_dataset(tmp_path / "x", 0, 0, "small")
    with pytest.raises(NexusInputError, match="size"):
        synth.generate_dataset(tmp_path / "x", 1, 0, "medium")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NexusInputError, match="not empty") as err:
        synth.generate_dataset(foreign, 1, 0, "small")
    assert str(foreign) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written


def test_rerun_into_previous_output_replaces_it(runs, tmp_path):
    import shutil

    target = tmp_path / "again"
    shutil.copytree(runs[0], target)  # a previous 3-subject output (seed SEED)
    synth.generate_dataset(target, 1, SEED + 1, "small")
    assert _files(target) == _files(runs[2])  # subjects 2-3 removed, the rest replaced


def test_synth_loads_through_the_brats_loader(runs):
    """The embedded data takes the same path as real BraTS: discovery, datalist, loader."""
    from nexus_monai.data.brats import brats_loader, discover_brats, load_datalist

    datalist = runs[0]
    root = datalist.parent if datalist.is_file() else datalist
    found = discover_brats(root)
    assert [s["subject"] for s in found] == [f"SynBraTS_{i:04d}" for i in range(1, N_SUBJECTS + 1)]
    assert all(s["brats_format"] == "2020" for s in found)
    entries = load_datalist(root / "dataset.json", "training") + load_datalist(root / "dataset.json", "test")
    data = brats_loader(["t1", "t1ce", "t2", "flair", "seg"])(entries[0])
    assert data["t1"].shape == (1, 120, 120, 78)
    assert np.allclose(np.diag(data["t1"].affine.numpy())[:3], 2.0)
    assert set(np.unique(data["seg"].numpy()).tolist()) <= {0, 1, 2, 4}
    assert set(found[0]) >= {"t1", "t1ce", "t2", "flair", "seg"}
