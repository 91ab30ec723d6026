import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.baselines.lrtv import lrtv, natural_hr_grid
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.methods import get_method
from nexus_monai.geometry import TargetGrid, make_affine, thick_slice_affine
from nexus_monai.transforms import SimulateAnisotropicAcquisition
from nexus_monai.transforms.acquisition import slice_profile_matrix


def _phantom(shape=(24, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    vol = (vol > 0).astype(np.float64) * 80 + ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 100 + 100
    return MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=make_affine((1.0, 1.0, 1.0), (-12.0, -12.0, -8.0)))


def _degrade(x: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    w = slice_profile_matrix(x.shape[axis], factor, "gaussian").to(torch.float32)
    return (x.movedim(axis, -1) @ w.T).movedim(-1, axis)


@pytest.mark.parametrize("axis,factor", [(2, 2.0), (1, 2.5)])
def test_lrtv_on_grid_and_fits_data_better_than_trilinear(axis, factor):
    hr = _phantom()
    lr = SimulateAnisotropicAcquisition(axis, factor)(hr)
    grid = natural_hr_grid(lr.shape, lr.affine, axis, factor)
    assert torch.allclose(thick_slice_affine(grid.affine, axis, factor), lr.affine.double(), atol=1e-6)
    out, hist = lrtv(lr, grid, iterations=15, return_history=True)
    assert tuple(out.shape) == (1, *grid.shape)
    assert torch.allclose(out.affine.double(), grid.affine, atol=1e-6)
    assert torch.isfinite(out).all()
    # the ADMM objective goes down from the B-spline start
    assert len(hist) == 16 and all(np.isfinite(hist))
    assert hist[-1] < hist[0]
    assert hist[-1] <= min(hist[:3])
    y = lr[0].as_subclass(torch.Tensor)
    tri = upsample(lr, grid, "trilinear")[0].as_subclass(torch.Tensor)
    err_lrtv = float(((_degrade(out[0].as_subclass(torch.Tensor), axis, factor) - y) ** 2).mean())
    err_tri = float(((_degrade(tri, axis, factor) - y) ** 2).mean())
    assert err_lrtv < err_tri


def test_lrtv_resamples_onto_other_grid_and_registers():
    hr = _phantom()
    lr = SimulateAnisotropicAcquisition("z", 2)(hr)
    grid = TargetGrid((20, 22, 18), make_affine((1.1, 1.0, 0.9), (-11.0, -11.0, -8.0)))
    out = lrtv(lr, grid, iterations=3)
    assert tuple(out.shape) == (1, 20, 22, 18)
    assert torch.allclose(out.affine.double(), grid.affine, atol=1e-6)
    assert torch.isfinite(out).all()
    res = get_method("lrtv")({"t1_lr": lr, "t2_lr": SimulateAnisotropicAcquisition("y", 4)(hr)}, TargetGrid.like(hr), iterations=2)
    assert set(res) == {"t1", "t2"} and all(tuple(v.shape) == (1, 24, 24, 16) for v in res.values())


def test_lrtv_input_errors():
    hr = _phantom()
    with pytest.raises(NexusInputError, match="no thick axis"):
        lrtv(hr, TargetGrid.like(hr), iterations=1)
    lr = SimulateAnisotropicAcquisition("z", 2)(hr)
    with pytest.raises(NexusInputError, match="factor"):
        lrtv(lr, TargetGrid.like(hr), factor=3, iterations=1)
    with pytest.raises(NexusInputError, match="axis"):
        lrtv(lr, TargetGrid.like(hr), axis="x", iterations=1)


def test_baseline_command_writes_lrtv_on_the_requested_grid(tmp_path):
    import nibabel as nib

    from nexus_monai.cli import main
    from nexus_monai.data.io import save_volume
    from nexus_monai.geometry import make_affine

    rng = np.random.default_rng(0)
    from scipy import ndimage

    hr = ndimage.gaussian_filter(rng.random((20, 20, 16)), 2.0).astype(np.float32) + 1.0
    save_volume(hr, tmp_path / "hr.nii.gz", affine=make_affine((1.0, 1.0, 1.0), (0, 0, 0)))
    assert main(["degrade", "--image", str(tmp_path / "hr.nii.gz"), "--axis", "z", "--factor", "2", "--out", str(tmp_path / "lr.nii.gz")]) == 0
    assert main(["baseline", "--method", "lrtv", "--image", str(tmp_path / "lr.nii.gz"), "--like", str(tmp_path / "hr.nii.gz"), "--out", str(tmp_path / "sr.nii.gz")]) == 0
    out, ref = nib.load(str(tmp_path / "sr.nii.gz")), nib.load(str(tmp_path / "hr.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-5)
    assert np.isfinite(np.asarray(out.dataobj)).all()
