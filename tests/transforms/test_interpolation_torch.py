"""Trilinear / nearest without SimpleITK (the GPU run-time wheelhouse leaves its 53 MB wheel out): the torch
path equals SimpleITK's resampling on axis-aligned and oblique target grids, edges and outside included."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import nexus_monai.transforms.interpolation as interp
from nexus_monai.geometry import TargetGrid, make_affine, rotation_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lr():
    rng = np.random.default_rng(0)
    return MetaTensor(torch.from_numpy(rng.random((2, 20, 18, 9)).astype(np.float32)),
                      affine=make_affine((2.0, 2.0, 4.0), (-20, -18, -15)))


def _grids():
    oblique = make_affine((1.3, 0.9, 1.1), (-25, -22, -20)).clone()
    oblique[:3, :3] = torch.as_tensor(rotation_matrix((10, -7, 5)), dtype=torch.float64) @ oblique[:3, :3]
    # 1 mm grid over the LR field of view plus a margin: half-voxel borders and outside voxels are exercised
    return [TargetGrid((44, 40, 40), make_affine((1.0, 1.0, 1.0), (-22.5, -20.5, -18.5))), TargetGrid((44, 50, 40), oblique)]


@pytest.mark.skipif(not interp.HAVE_SIMPLEITK, reason="the reference is SimpleITK")
@pytest.mark.parametrize("method", ["trilinear", "nearest"])
def test_torch_resampling_equals_simpleitk(method):
    lr = _lr()
    for grid in _grids():
        ref = interp.upsample(lr, grid, method).as_subclass(torch.Tensor)
        got = interp.resample_torch(lr, grid, method, slab_voxels=5000)  # several slabs
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert 0.1 < float((ref == 0).float().mean()) < 0.9  # both inside and outside voxels are compared
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_upsample_without_simpleitk(monkeypatch):
    lr, grid = _lr(), _grids()[1]
    expected = interp.resample_torch(lr, grid, "trilinear")
    monkeypatch.setattr(interp, "sitk", None)
    out = interp.upsample(lr, grid, "trilinear")
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, grid.affine) and out.meta["interpolation"] == "trilinear"
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected)
    with pytest.raises(ImportError, match="needs SimpleITK"):
        interp.upsample(lr, grid, "cubic")
    with pytest.raises(ValueError, match="supports"):
        interp.resample_torch(lr, grid, "bspline")
