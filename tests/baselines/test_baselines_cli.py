"""Interpolation baselines against scipy, and the degrade / upsample commands end to end."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.cli import main
from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.geometry import TargetGrid, make_affine, voxel_centres, world_to_voxel
from nexus_monai.transforms import SimulateAnisotropicAcquisition

OBLIQUE = make_affine((1.0, 1.0, 1.0), (-10, 5, 3), rotation_deg=(5, 10, -15))


def _smooth(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float64)


@pytest.mark.parametrize("method,order", [("trilinear", 1), ("bspline", 3)])
@pytest.mark.parametrize("axis,factor", [("z", 2), ("y", 4)])
def test_upsample_matches_scipy_on_any_grid(method, order, axis, factor):
    hr = MetaTensor(torch.as_tensor(_smooth((20, 24, 28)))[None], affine=OBLIQUE)
    lr = SimulateAnisotropicAcquisition(axis, factor)(hr)
    grid = TargetGrid.from_spacing(hr.shape[1:], hr.affine, 0.75)  # a finer grid than HR, oblique
    out = upsample(lr, grid, method)
    assert out.shape[1:] == grid.shape and torch.allclose(out.affine, grid.affine)
    # independent reference: scipy at the LR continuous index of every target voxel
    idx = world_to_voxel(voxel_centres(grid.shape, grid.affine, dtype=torch.float64), lr.affine).numpy()
    src = lr[0].numpy()
    coeffs = ndimage.spline_filter(src, order=3, mode="mirror") if order == 3 else src
    ref = ndimage.map_coordinates(coeffs, idx.reshape(-1, 3).T, order=order, prefilter=False, mode="mirror").reshape(grid.shape)
    inside = np.all((idx >= 2) & (idx <= np.array(src.shape) - 3), axis=-1)
    assert inside.sum() > 100
    np.testing.assert_allclose(out[0].numpy()[inside], ref[inside], atol=1e-4 if order == 1 else 2e-3)


def test_upsample_to_like_grid_round_trips_hr(tmp_path):
    a = make_affine((1.0, 1.0, 1.0), (0, 0, 0))
    x = torch.as_tensor(_smooth((16, 16, 16)))[None].float()
    hr = MetaTensor(x, affine=a)
    lr = SimulateAnisotropicAcquisition("z", 2, "none")(hr)
    out = upsample(lr, TargetGrid.like(hr), "trilinear")
    assert torch.allclose(out.affine, hr.affine)
    # point-sampled at slab centres then linearly interpolated: close to the smooth HR in the interior
    assert float((out[0, :, :, 2:-2] - hr[0, :, :, 2:-2]).abs().max()) < 0.05


def test_degrade_and_upsample_commands(tmp_path, capsys):
    a = make_affine((1.0, 1.0, 1.0), (-8, -8, -8))
    hr_path = save_volume(torch.as_tensor(_smooth((16, 16, 16)))[None], tmp_path / "hr.nii.gz", affine=a)
    assert main(["degrade", "--image", str(hr_path), "--axis", "z", "--factor", "2", "--out", str(tmp_path / "lr.nii.gz")]) == 0
    lr = nib.load(str(tmp_path / "lr.nii.gz"))
    assert lr.shape == (16, 16, 8)
    assert np.allclose(nib.affines.voxel_sizes(lr.affine), (1, 1, 2))
    assert np.allclose(lr.affine[:3, 3], (-8, -8, -7.5))  # slab-centre origin
    assert main(["upsample", "--image", str(tmp_path / "lr.nii.gz"), "--like", str(hr_path), "--method", "cubic", "--out", str(tmp_path / "up.nii.gz")]) == 0
    up = load_volume(tmp_path / "up.nii.gz")
    assert up.shape == (1, 16, 16, 16) and torch.allclose(up.affine, a, atol=1e-5)
    assert main(["upsample", "--image", str(tmp_path / "lr.nii.gz"), "--spacing", "0.5", "--out", str(tmp_path / "half.nii.gz")]) == 0
    assert nib.load(str(tmp_path / "half.nii.gz")).shape == (32, 32, 32)
    assert main(["degrade", "--image", str(hr_path), "--axis", "y", "--factor", "2.5", "--profile", "boxcar", "--out", str(tmp_path / "lr25.nii.gz")]) == 0
    assert nib.load(str(tmp_path / "lr25.nii.gz")).shape == (16, 6, 16)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["degrade", "--image", "{tmp}/missing.nii.gz", "--axis", "z", "--factor", "2"], "missing.nii.gz: file not found"),
        (["degrade", "--image", "{tmp}/hr.nii.gz", "--axis", "z", "--factor", "40"], "fewer than one slab"),
        (["degrade", "--image", "{tmp}/hr.nii.gz", "--axis", "w", "--factor", "2"], "--axis"),
        (["degrade", "--image", "{tmp}/bad.nii.gz", "--axis", "z", "--factor", "2"], "bad.nii.gz: corrupt or truncated"),
    ],
)
def test_command_errors_are_one_line_and_write_nothing(tmp_path, args, needle, capsys):
    save_volume(torch.rand(1, 8, 8, 8), tmp_path / "hr.nii.gz", affine=np.eye(4))
    (tmp_path / "bad.nii.gz").write_bytes((tmp_path / "hr.nii.gz").read_bytes()[:40])
    out = tmp_path / "out.nii.gz"
    code = main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nii.gz", "hr.nii.gz"]


@pytest.mark.integration
def test_real_console_entry_point_prints_one_error_line(tmp_path):
    """The installed module entry point (a fresh interpreter): exit code 2 and one stderr line."""
    res = subprocess.run(
        [sys.executable, "-m", "nexus_monai", "degrade", "--image", str(tmp_path / "nope.nii.gz"), "--axis", "z", "--factor", "2", "--out", str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2
    assert [line for line in res.stderr.splitlines() if line.strip()] == [f"error: {tmp_path / 'nope.nii.gz'}: file not found"]
