"""NIfTI io checks, BraTS discovery (2020/2021/2023), datalists and label remapping."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from nexus_monai.data.brats import (
    brats_loader,
    discover_brats,
    load_datalist,
    make_datalist,
    split_counts,
    write_datalist,
)
from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.errors import NexusInputError, find_input_error
from nexus_monai.geometry import make_affine

AFFINE = make_affine((1.0, 1.0, 1.0), (-4, -4, -4)).numpy()


def _write(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _seg(shape=(8, 8, 8), labels=(0, 1, 2, 4)):
    seg = np.zeros(shape, np.uint8)
    for n, lab in enumerate(labels):
        seg[n, :2, :2] = lab
    return seg


def make_subject(root, sid, fmt="2020", labels=(0, 1, 2, 4), skip=(), shape=(8, 8, 8)):
    suffix = {"2020": ["_t1", "_t1ce", "_t2", "_flair", "_seg"], "2023": ["-t1n", "-t1c", "-t2w", "-t2f", "-seg"]}[fmt]
    rng = np.random.default_rng(abs(hash(sid)) % 1000)
    for mod, suf in zip(("t1", "t1ce", "t2", "flair", "seg"), suffix):
        if mod in skip:
            continue
        data = _seg(shape, labels) if mod == "seg" else rng.random(shape, dtype=np.float32) + 0.1
        _write(root / sid / f"{sid}{suf}.nii.gz", data)
    return root / sid


def test_save_load_round_trip_keeps_affine(tmp_path):
    a = make_affine((0.8, 1.5, 3.0), (1, 2, 3), rotation_deg=(10, 0, -20))
    data = torch.rand(1, 5, 6, 7)
    out = save_volume(data, tmp_path / "x.nii.gz", affine=a)
    img = load_volume(out)
    assert img.shape == (1, 5, 6, 7)
    assert torch.allclose(img.affine, a, atol=1e-5)
    assert torch.allclose(img.as_subclass(torch.Tensor), data)
    assert not [p for p in tmp_path.iterdir() if p.name != "x.nii.gz"]  # no temp files left


def test_io_bad_inputs_give_one_line_errors(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.ones((6, 6, 6), np.float32))
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    four_d = _write(tmp_path / "4d.nii.gz", np.ones((6, 6, 6, 3), np.float32))
    nan = np.ones((6, 6, 6), np.float32)
    nan[1, 2, 3] = np.nan
    nanf = _write(tmp_path / "nan.nii.gz", nan)
    notnii = tmp_path / "fake.nii.gz"
    notnii.write_bytes(gzip.compress(b"hello world" * 50))
    big = _write(tmp_path / "big.nii.gz", np.random.default_rng(0).random((24, 24, 24), dtype=np.float32))
    trunc_data = tmp_path / "trunc_data.nii.gz"
    trunc_data.write_bytes(big.read_bytes()[:-2000])
    cases = {trunc: "truncated", trunc_data: "truncated", four_d: "3D", nanf: "NaN", tmp_path / "missing.nii.gz": "not found", notnii: "header"}  # gzip of text: no NIfTI header
    for path, word in cases.items():
        with pytest.raises(NexusInputError) as info:
            load_volume(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and word in msg, msg
    # a 4D file with a singleton 4th axis is a 3D scan
    assert load_volume(_write(tmp_path / "s.nii.gz", np.ones((6, 6, 6, 1), np.float32))).shape == (1, 6, 6, 6)


def test_discovery_of_all_brats_editions(tmp_path):
    make_subject(tmp_path, "BraTS20_Training_001")
    make_subject(tmp_path, "BraTS2021_00007")
    make_subject(tmp_path / "nested", "BraTS-GLI-00002-000", fmt="2023", labels=(0, 1, 2, 3))
    subjects = discover_brats(tmp_path)
    by_id = {s["subject"]: s for s in subjects}
    assert [by_id[k]["brats_format"] for k in ("BraTS20_Training_001", "BraTS2021_00007", "BraTS-GLI-00002-000")] == ["2020", "2021", "2023"]
    s23 = by_id["BraTS-GLI-00002-000"]
    assert s23["t1"].endswith("-t1n.nii.gz") and s23["t2"].endswith("-t2w.nii.gz") and s23["flair"].endswith("-t2f.nii.gz")
    data = brats_loader(["t1", "t2", "seg"])(s23)
    assert set(torch.unique(data["seg"]).tolist()) == {0, 1, 2, 4}  # 2023's 3 -> 4
    data = brats_loader(["t1", "seg"])(by_id["BraTS20_Training_001"])
    assert set(torch.unique(data["seg"]).tolist()) == {0, 1, 2, 4}


def test_discovery_errors(tmp_path):
    with pytest.raises(NexusInputError, match="not found"):
        discover_brats(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NexusInputError, match="no BraTS subjects"):
        discover_brats(tmp_path / "empty")
    make_subject(tmp_path / "a", "BraTS20_Training_001", skip=("t2",))
    with pytest.raises(NexusInputError, match="missing modality 't2'") as info:
        discover_brats(tmp_path / "a")
    assert "BraTS20_Training_001" in str(info.value)
    make_subject(tmp_path / "b", "BraTS20_Training_001")
    _write(tmp_path / "b" / "BraTS20_Training_001" / "BraTS20_Training_002_flair.nii.gz", np.ones((8, 8, 8), np.float32))
    with pytest.raises(NexusInputError, match="mismatched subjects"):
        discover_brats(tmp_path / "b")
    make_subject(tmp_path / "c", "BraTS20_Training_003")
    _write(tmp_path / "c" / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii.gz", np.ones((8, 8, 9), np.float32))
    with pytest.raises(NexusInputError, match="differs"):
        discover_brats(tmp_path / "c")


def test_label_3_in_2020_seg_is_an_error(tmp_path):
    make_subject(tmp_path, "BraTS20_Training_009", labels=(0, 1, 3))
    subject = discover_brats(tmp_path)[0]
    with pytest.raises(Exception) as info:
        brats_loader(["t1", "seg"])(subject)
    err = find_input_error(info.value)
    assert err is not None and "BraTS20_Training_009_seg.nii.gz" in str(err) and "[3]" in str(err)


def test_nan_and_4d_modalities_are_named(tmp_path):
    sid = "BraTS20_Training_010"
    make_subject(tmp_path, sid)
    bad = np.ones((8, 8, 8), np.float32)
    bad[0, 0, 0] = np.inf
    _write(tmp_path / sid / f"{sid}_t2.nii.gz", bad)
    with pytest.raises(Exception) as info:
        brats_loader(["t1", "t2"])(discover_brats(tmp_path)[0])
    assert f"{sid}_t2.nii.gz: 1 voxels are NaN or Inf" in str(find_input_error(info.value))


@pytest.mark.parametrize("n,expected", [(73, (48, 10, 15)), (8, (5, 1, 2)), (3, (1, 1, 1)), (1, (1, 0, 0)), (20, (13, 3, 4))])
def test_split_counts(n, expected):
    assert split_counts(n) == expected


def test_datalist_is_seeded_relative_and_loadable(tmp_path):
    for i in range(8):
        make_subject(tmp_path, f"BraTS20_Training_{i:03d}")
    subjects = discover_brats(tmp_path)
    a = make_datalist(subjects, seed=1, base_dir=tmp_path)
    b = make_datalist(subjects, seed=1, base_dir=tmp_path)
    c = make_datalist(subjects, seed=2, base_dir=tmp_path)
    assert a == b and a != c
    assert [len(a[k]) for k in ("training", "validation", "test")] == [5, 1, 2]
    ids = [s["subject"] for k in ("training", "validation", "test") for s in a[k]]
    assert sorted(ids) == sorted(s["subject"] for s in subjects)
    assert not a["training"][0]["t1"].startswith("/")
    path = write_datalist(tmp_path / "dataset.json", a)
    json.loads(path.read_text())
    test = load_datalist(path, "test")
    assert load_volume(test[0]["t1"]).shape == (1, 8, 8, 8)
    with pytest.raises(NexusInputError, match="no 'holdout' split"):
        load_datalist(path, "holdout")
