"""Tests of the embedded synthetic BraTS-format dataset (nexus_monai.data.synth).

Two ``small`` runs of 3 subjects + 1 test-only-anatomy subject with the same seed, one re-run
with another seed into a copy, and two noise-free renderings of one subject (about 30-40 s on
one core, ~15 s of it loading the three anatomy sources once).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nexus_monai.data import synth
from nexus_monai.data.synth import anatomy, lesions, physics, sources, writer
from nexus_monai.data.synth.subject import subject_source
from nexus_monai.errors import NexusInputError
from nexus_monai.keys import LESION_BOTH, LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY, lesion_class

SEED = 7
N_SUBJECTS = 3
N_TA = 1
FILES_PER_SUBJECT = 12  # 4 images, 4 noise-free renders, seg, lesions, params ... + folder-level files below
NAMES = [f"SynBraTS_{i:04d}" for i in range(1, N_SUBJECTS + 1)] + [f"SynBraTSTA_{i:04d}" for i in range(1, N_TA + 1)]
INVISIBLE_RTOL = 1e-4  # noise-free: lesion on its invisible contrast vs normal tissue, relative to WM signal


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, name: str, key: str) -> np.ndarray:
    return np.asarray(nib.load(root / name / f"{name}_{key}.nii.gz").dataobj)


def _params(root: Path, name: str) -> dict:
    return json.loads((root / name / f"{name}_params.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    first = synth.generate_dataset(root / "a", N_SUBJECTS, SEED, "small", test_anatomy=N_TA)
    second = synth.generate_dataset(root / "b", N_SUBJECTS, SEED, "small", test_anatomy=N_TA)
    return first, second


@pytest.fixture(scope="module")
def clean_pair():
    """Subject 1 without noise and bias field, with its lesions and with every lesion given
    white-matter parameters."""
    split = synth.split_subjects(N_SUBJECTS, SEED)
    held = 1 in split["validation"] + split["test"]
    with_lesions = synth.simulate_subject(SEED, 1, "small", held_out=held, noise=False, bias=False)
    reference = synth.simulate_subject(SEED, 1, "small", held_out=held, noise=False, bias=False, lesion_contrast=False)
    return with_lesions, reference


def test_same_seed_is_byte_identical(runs):
    first, second = runs
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    assert len(a) == len(NAMES) * (FILES_PER_SUBJECT - 1) + 3  # README, datalist, montage
    for name in a:
        assert a[name] == b[name], name


def test_gzip_header_has_no_timestamp_or_name(runs):
    data = (runs[0] / "SynBraTS_0001" / "SynBraTS_0001_t1.nii.gz").read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\x00\x00\x00\x00"  # MTIME = 0
    assert not data[3] & 0x08  # no FNAME (the temporary file name) stored


def test_rerun_with_other_seed_replaces_and_differs(runs, tmp_path):
    target = tmp_path / "again"
    shutil.copytree(runs[0], target)  # a previous 3 + 1 subject output (seed SEED)
    synth.generate_dataset(target, 1, SEED + 1, "small", test_anatomy=0)
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["SynBraTS_0001"]  # the rest removed
    datalist = json.loads((target / "dataset.json").read_text())
    assert datalist["seed"] == SEED + 1 and datalist["test_anatomy"] == []
    for key in ("t1", "seg", "lesions"):
        assert not np.array_equal(_load(runs[0], "SynBraTS_0001", key), _load(target, "SynBraTS_0001", key)), key


def test_geometry_labels_and_background(runs):
    root = runs[0]
    expected_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    expected_affine[:3, 3] = [-119.0, -119.0, -77.0]  # field of view centred at world 0
    for name in NAMES:
        images = {}
        for key in (*synth.MODALITIES, "seg", "lesions"):
            img = nib.load(root / name / f"{name}_{key}.nii.gz")
            assert img.shape == (120, 120, 78)
            np.testing.assert_allclose(img.affine, expected_affine)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            images[key] = np.asarray(img.dataobj)
        seg, lesion_map = images.pop("seg"), images.pop("lesions")
        assert seg.dtype == np.uint8 and lesion_map.dtype == np.int16
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        brain = images["t1"] > 0
        assert 110_000 < brain.sum() < 320_000  # 0.9-2.6 L inside the brain mask (8 mm^3 voxels)
        for modality, volume in images.items():
            assert volume.dtype == np.float32
            assert np.isfinite(volume).all()
            assert np.array_equal(volume > 0, brain), modality  # background exactly 0, brain > 0
        assert not np.any(seg[~brain]) and not np.any(lesion_map[~brain])
        assert not np.any((lesion_map > 0) & (seg > 0))  # lesions never inside the tumour


def test_tissue_contrasts(runs, clean_pair):
    """Means over pure-tissue voxels away from the tumour and lesions follow the MR physics
    (noise- and bias-free rendering of subject 1, whose label files are checked against it)."""
    root = runs[0]
    subject = clean_pair[0]
    np.testing.assert_array_equal(_load(root, "SynBraTS_0001", "seg"), subject.seg)  # files = this simulation
    np.testing.assert_array_equal(_load(root, "SynBraTS_0001", "lesions"), subject.lesions)
    np.testing.assert_array_equal(_load(root, "SynBraTS_0001", "t1") > 0, subject.brain)
    f = subject.fractions
    abnormal = f["oedema"] + f["enhancing"] + f["necrosis"] + f["lesion"]
    free = ~ndimage.binary_dilation(abnormal > 0.01, iterations=3) & subject.brain
    means = {}
    for modality, volume in subject.images.items():
        means[modality] = {t: float(volume[free & (f[t] > 0.9)].mean()) for t in ("wm", "gm", "csf")}
    assert means["t1"]["wm"] > means["t1"]["gm"] > means["t1"]["csf"]
    assert means["t2"]["csf"] > means["t2"]["gm"] > means["t2"]["wm"]
    assert means["flair"]["csf"] < 0.5 * min(means["flair"]["wm"], means["flair"]["gm"])
    assert means["flair"]["gm"] > means["flair"]["wm"]
    enhancing = (subject.seg == 4) & (f["enhancing"] > 0.9)
    ratio_ce = subject.images["t1ce"][enhancing].mean() / means["t1ce"]["wm"]
    ratio_pre = subject.images["t1"][enhancing].mean() / means["t1"]["wm"]
    assert ratio_ce > 1.2 * ratio_pre  # gadolinium enhancement
    oedema = (subject.seg == 2) & (f["oedema"] > 0.8)
    assert subject.images["flair"][oedema].mean() > means["flair"]["gm"]


def test_datalist_readme_and_montage(runs):
    root = runs[0]
    datalist = json.loads((root / "dataset.json").read_text())
    assert datalist["simulated"] is True and datalist["seed"] == SEED and datalist["size"] == "small"
    assert datalist["generator"] == f"nexus_monai.data.synth {synth.GENERATOR_VERSION}"
    assert [len(datalist[k]) for k in ("training", "validation", "test", "test_anatomy")] == [1, 1, 1, N_TA]
    names = [e["subject"] for k in ("training", "validation", "test", "test_anatomy") for e in datalist[k]]
    assert sorted(names) == sorted(NAMES)
    for part in ("training", "validation", "test", "test_anatomy"):
        for entry in datalist[part]:
            assert entry["brats_format"] == "2020"
            for key in (*synth.MODALITIES, "seg", "lesions"):
                assert entry[key] == f"{entry['subject']}/{entry['subject']}_{key}.nii.gz"
                assert (root / entry[key]).is_file()
            params = _params(root, entry["subject"])
            for modality in synth.MODALITIES:  # the recorded acquisition is the drawn one
                drawn = params["lr_acquisition"][modality]
                assert entry[f"{modality}_slice_profile"] == drawn["profile"]
                for field in ("thickness_ratio", "slab_offset", "lr_noise", "noise_seed"):
                    assert entry[f"{modality}_{field}"] == drawn[field]
                assert entry[f"{modality}_clean"] == f"{entry['subject']}/{entry['subject']}_{modality}_clean.nii.gz"
                assert (root / entry[f"{modality}_clean"]).is_file()
    readme = (root / "README.txt").read_text()
    assert "SIMULATED" in readme and "not patient data" in readme
    assert f"seed: {SEED}" in readme and "size: small" in readme and "T1 ms" in readme
    for licence in ("BSD-3-Clause", "MIT", "ROBEX BSD", "TEST-ONLY"):
        assert licence in readme
    every_range = [*anatomy.RANGES, *physics.ACQUISITION_RANGES, *[k for r in lesions.LESION_RANGES.values() for k in r]]
    for key in every_range:
        assert f"{key}" in readme, key
    from PIL import Image

    png = root / "montage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 500 and image.size[1] > 900


def test_test_only_anatomy_never_trains_or_selects(runs):
    root = runs[0]
    datalist = json.loads((root / "dataset.json").read_text())
    for part in ("training", "validation", "test"):
        for entry in datalist[part]:
            assert entry["anatomy_source"] in synth.TRAINING_SOURCES
            assert _params(root, entry["subject"])["anatomy"]["source"] == entry["anatomy_source"]
    for entry in datalist["test_anatomy"]:
        assert entry["anatomy_source"] == synth.TEST_ONLY_SOURCE == "robex"
        assert entry["family"] == "test_anatomy" and entry["subject"].startswith("SynBraTSTA_")
    assert synth.TEST_ONLY_SOURCE not in synth.TRAINING_SOURCES
    assert {subject_source(i) for i in range(1, 50)} == set(synth.TRAINING_SOURCES)


def test_randomised_parameters_within_their_ranges(runs):
    """Every drawn value in the written parameters lies in the range the README states."""
    ar, pr = anatomy.RANGES, physics.ACQUISITION_RANGES
    for name in NAMES:
        p = _params(runs[0], name)
        field = p["field_T"]
        assert field in pr["field_T"]
        for modality, seq in p["sequences_ms"].items():
            ranges = physics.SEQUENCE_RANGES[field]["t1" if modality == "t1ce" else modality]
            for key in ("TR", "TE"):
                assert ranges[key][0] <= seq[key] <= ranges[key][1], (name, modality, key)
        noise_range = pr["noise_sigma_of_wm_15T"] if field == 1.5 else pr["noise_sigma_of_wm_3T"]
        assert all(noise_range[0] <= v <= noise_range[1] for v in p["noise_sigma_fraction_of_wm"].values())
        assert pr["bias_sd"][0] <= p["bias_sd"] <= pr["bias_sd"][1]
        assert pr["bias_grain_mm"][0] <= p["bias_grain_mm"] <= pr["bias_grain_mm"][1]
        lr = physics.LR_ACQUISITION_RANGES
        for choice in p["lr_acquisition"].values():
            assert choice["profile"] in lr["slice_profile"]
            for key, name in (("thickness_ratio", "thickness_ratio"), ("slab_offset", "slab_offset_voxels"),
                              ("lr_noise", "lr_noise_of_p995")):
                assert lr[name][0] <= choice[key] <= lr[name][1], key
        a = p["anatomy"]
        for key in ("mask_offset_mm", "mask_ragged_mm", "cortical_texture"):
            assert ar[key][0] <= a[key] <= ar[key][1], key
        assert ar["tissue_gamma"][0] <= a["gamma"] <= ar["tissue_gamma"][1]
        t1_ratio = 1.0 if field == 3.0 else physics.T1_RATIO_15T["wm"]
        wm_t1 = p["tissues_T1_ms_T2_ms_PD_GdmM"]["wm"][0] / (physics.TISSUE_PROPERTIES["wm"].t1_ms * t1_ratio)
        assert pr["relaxation_jitter_normal"][0] - 1e-6 <= wm_t1 <= pr["relaxation_jitter_normal"][1] + 1e-6
    fields = {_params(runs[0], n)["field_T"] for n in NAMES}
    assert fields <= {1.5, 3.0}


def test_anatomy_sources_load_offline():
    for name in synth.SOURCES:
        tpl = sources.load_source(name)
        gm, wm, mask = tpl.maps
        volume_l = mask.sum() * tpl.voxel_mm**3 / 1e6
        assert 1.0 < volume_l < 2.2, name
        assert gm.min() >= 0 and wm.min() >= 0 and np.all(gm + wm <= mask + 1e-5), name
        inside = mask > 0.5
        assert 0.25 < gm[inside].mean() < 0.7 and 0.15 < wm[inside].mean() < 0.5, name


def test_gaussian_mixture_tissue_split_recovers_known_classes():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(30, 30, 30))  # 0 csf, 1 gm, 2 wm
    t1w = np.array([200.0, 600.0, 900.0])[truth] + rng.normal(0, 40, truth.shape)
    mask = np.ones(truth.shape, np.float32)
    gm, wm = sources.gmm_tissue_split(t1w.astype(np.float32), mask)
    estimate = np.select([wm > 0.5, gm > 0.5], [2, 1], 0)
    assert (estimate == truth).mean() > 0.99


def test_lesions_encoded_in_white_matter_with_radii_in_range(runs, clean_pair):
    subject, _ = clean_pair
    values = np.unique(subject.lesions[subject.lesions > 0])
    classes = values // LESION_CLASS_STRIDE
    instances = values % LESION_CLASS_STRIDE
    assert set(classes.tolist()) == {LESION_T2_ONLY, LESION_T1_ONLY, LESION_BOTH}  # every class present
    assert len(set(instances.tolist())) == len(values) and instances.min() >= 1 and instances.max() <= 999
    described = subject.parameters["lesions"]
    assert len(described) == len(values)  # every placed lesion has a label
    for n, lesion in enumerate(described, start=1):
        assert lesion["class"] * LESION_CLASS_STRIDE + n in values
        assert all(1.0 <= r <= 12.0 for r in lesion["semi_axes_mm"])  # spheres 1-6 mm, elongated up to 12 mm
        voxels = subject.lesions == lesion["class"] * LESION_CLASS_STRIDE + n
        volume = voxels.sum() * 8.0
        assert volume <= 4 / 3 * np.pi * np.prod(lesion["semi_axes_mm"]) * 4 + 8.0  # partial-volume margin
        normal_wm = subject.fractions["wm"] + subject.fractions["lesion"]
        assert normal_wm[voxels].mean() > 0.75  # the lesion lies in white matter
    for klass, ranges in lesions.LESION_RANGES.items():
        count = sum(d["class"] == klass for d in described)
        assert count <= ranges["count"][1] + ranges.get("elongated_count", (0, 0))[1]
    np.testing.assert_array_equal(lesion_class(subject.lesions) > 0, subject.lesions > 0)


def test_lesions_invisible_on_the_other_contrast(clean_pair):
    """Noise-free: on its invisible contrast a lesion gives what normal tissue there would give
    (within ``INVISIBLE_RTOL`` of the WM signal); on its visible contrast it differs clearly."""
    subject, reference = clean_pair
    klass = lesion_class(subject.lesions)
    footprint = {k: ndimage.binary_dilation(klass == k, iterations=1) & subject.brain for k in (1, 2, 3)}
    wm_level = {m: float(np.median(reference.images[m][reference.fractions["wm"] > 0.95])) for m in ("t1", "t2", "flair")}

    def diff(modality, k):
        return np.abs(subject.images[modality][footprint[k]] - reference.images[modality][footprint[k]]).max() / wm_level[modality]

    def contrast(modality, k):
        core = klass == k
        return np.abs(subject.images[modality][core] - reference.images[modality][core]).mean() / wm_level[modality]

    assert diff("t1", LESION_T2_ONLY) < INVISIBLE_RTOL
    assert contrast("t2", LESION_T2_ONLY) > 0.1 and contrast("flair", LESION_T2_ONLY) > 0.05
    assert diff("t2", LESION_T1_ONLY) < INVISIBLE_RTOL
    assert contrast("t1", LESION_T1_ONLY) > 0.05
    assert contrast("t1", LESION_BOTH) > 0.05 and contrast("t2", LESION_BOTH) > 0.1
    outside = subject.brain & (subject.fractions["lesion"] == 0)
    for modality in synth.MODALITIES:  # nothing else changes
        np.testing.assert_array_equal(subject.images[modality][outside], reference.images[modality][outside])


def test_simulation_is_deterministic_per_seed():
    a = synth.simulate_subject(3, 2, "small", test_anatomy=True)
    b = synth.simulate_subject(3, 2, "small", test_anatomy=True)
    c = synth.simulate_subject(4, 2, "small", test_anatomy=True)
    for key in a.images:
        np.testing.assert_array_equal(a.images[key], b.images[key])
    np.testing.assert_array_equal(a.lesions, b.lesions)
    assert a.parameters == b.parameters
    assert a.parameters != c.parameters and not np.array_equal(a.lesions, c.lesions)


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
    with pytest.raises(NexusInputError, match="test_anatomy"):
        synth.generate_dataset(tmp_path / "x", 1, 0, "small", test_anatomy=-1)
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NexusInputError, match="not empty") as err:
        synth.generate_dataset(foreign, 1, 0, "small")
    assert str(foreign) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written


def test_embedded_cache_is_keyed_by_generator_version(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer, "generate_dataset", lambda root, *a, **k: calls.append(root))
    root = tmp_path / "cache"
    root.mkdir()
    meta = {"seed": 0, "size": "small", "training": [{}] * 2, "validation": [{}], "test": [{}], "test_anatomy": [{}]}
    (root / "dataset.json").write_text(json.dumps({**meta, "generator": "nexus_monai.data.synth 1.0.0"}))
    writer.ensure_embedded_dataset(root, subjects=4, seed=0, test_anatomy=1)
    assert calls == [root]  # an old generator's dataset is regenerated
    (root / "dataset.json").write_text(json.dumps({**meta, "generator": f"nexus_monai.data.synth {synth.GENERATOR_VERSION}"}))
    writer.ensure_embedded_dataset(root, subjects=4, seed=0, test_anatomy=1)
    assert calls == [root]  # the current one is reused
    monkeypatch.setenv("NEXUS_MONAI_CACHE", str(tmp_path))
    writer.ensure_embedded_dataset(subjects=4, seed=0, test_anatomy=1)
    assert synth.GENERATOR_VERSION in calls[-1].name


def test_synth_loads_through_the_brats_loader(runs):
    """The embedded data takes the same path as real BraTS: discovery, datalist, loader."""
    from nexus_monai.data.brats import brats_loader, discover_brats, load_datalist

    root = runs[0]
    found = discover_brats(root)
    assert sorted(s["subject"] for s in found) == sorted(NAMES)
    assert all(s["brats_format"] == "2020" for s in found)
    entries = load_datalist(root / "dataset.json", "training") + load_datalist(root / "dataset.json", "test_anatomy")
    for entry in entries:
        assert Path(entry["lesions"]).is_absolute() and Path(entry["lesions"]).is_file()
    data = brats_loader(["t1", "t1ce", "t2", "flair", "seg", "lesions"])(entries[-1])
    assert data["t1"].shape == (1, 120, 120, 78) and data["lesions"].shape == (1, 120, 120, 78)
    assert np.allclose(np.diag(data["t1"].affine.numpy())[:3], 2.0)
    assert set(np.unique(data["seg"].numpy()).tolist()) <= {0, 1, 2, 4}
    assert set(found[0]) >= {"t1", "t1ce", "t2", "flair", "seg"}


def test_recorded_slice_profile_drives_the_acquisition_transform():
    """The per-subject profile / width the datalist records reach the acquisition transforms."""
    import torch
    from monai.data import MetaTensor

    from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisitiond, slice_profile_matrix

    # boxcar of width 0.5 x 4 = 2 HR voxels centred on the slab centre n*4 + 1.5: voxels 1 and 2 only
    w = slice_profile_matrix(8, 4, "boxcar", fwhm_scale=0.5).numpy()
    np.testing.assert_allclose(w, [[0, 0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.5, 0.5, 0]], atol=1e-12)
    np.testing.assert_array_equal(slice_profile_matrix(40, 4, "boxcar", 1.0), slice_profile_matrix(40, 4, "boxcar"))
    # a Gaussian row's variance grows with the square of the width (interior rows, uncut)
    def variance(scale):
        row = slice_profile_matrix(64, 4, "gaussian", scale)[8].numpy()
        i = np.arange(64)
        return float((row * (i - (row * i).sum()) ** 2).sum())

    assert variance(1.2) / variance(1.0) == pytest.approx(1.44, rel=0.02)
    with pytest.raises(ValueError, match="fwhm_scale"):
        slice_profile_matrix(8, 2, "gaussian", 0.0)

    image = MetaTensor(torch.rand(1, 6, 6, 16, generator=torch.Generator().manual_seed(0)), affine=torch.eye(4))
    acquire = SimulateAnisotropicAcquisitiond("t1", "z", 4, "gaussian", output_keys="t1_lr",
                                             profile_key="t1_slice_profile", fwhm_scale_key="t1_fwhm_scale")
    per_subject = acquire({"t1": image, "t1_slice_profile": "boxcar", "t1_fwhm_scale": 0.5})["t1_lr"]
    expected = (image[..., 1::4] + image[..., 2::4]) / 2
    np.testing.assert_allclose(per_subject.numpy(), expected.numpy(), rtol=1e-6)
    assert per_subject.meta["acquisition"] == {"axis": 2, "factor": 4.0}  # the header's facts only
    assert per_subject.meta["acquisition_draw"]["profile"] == "boxcar"
    assert per_subject.meta["acquisition_draw"]["fwhm_scale"] == 0.5
    default = acquire({"t1": image})["t1_lr"]  # keys absent: the protocol's own profile
    plain = SimulateAnisotropicAcquisitiond("t1", "z", 4, "gaussian", output_keys="t1_lr")({"t1": image})["t1_lr"]
    np.testing.assert_array_equal(default.numpy(), plain.numpy())


def test_noise_free_render_is_the_hr_scan_without_its_noise(runs):
    """``<ID>_<m>_clean``: same brain support, and the HR scan minus it is the drawn Rician noise (sd ~ sigma)."""
    name = NAMES[0]
    p = _params(runs[0], name)
    for modality in synth.MODALITIES:
        noisy, clean = _load(runs[0], name, modality), _load(runs[0], name, f"{modality}_clean")
        np.testing.assert_array_equal(noisy > 0, clean > 0)
        inside = clean > np.percentile(clean[clean > 0], 50)  # bright tissue: Rician ~ Gaussian there
        sigma_wm = p["noise_sigma_fraction_of_wm"][modality]
        ratio = float((noisy - clean)[inside].std() / np.median(clean[inside]))
        assert 0.3 * sigma_wm < ratio < 3.0 * sigma_wm, modality
