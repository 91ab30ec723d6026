import builtins
import io

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.baselines.slice_stack import degrade_and_interpolate, thick_slice_channels
from nexus_monai.baselines.smore import fourier_burst_accumulation, smore, smore_training_pairs
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.methods import get_method
from nexus_monai.geometry import TargetGrid, make_affine
from nexus_monai.transforms import SimulateAnisotropicAcquisition

TINY = dict(features=8, blocks=2, iterations=25, batch_size=4, patch=12)


def _phantom(shape=(24, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    vol = (vol > 0).astype(np.float64) * 80 + ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 100 + 100
    return MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=make_affine((1.0, 1.0, 1.0), (-12.0, -12.0, -8.0), (0, 0, 10)))


def test_boxcar_degradation_and_bspline_match_independent_references():
    x = torch.as_tensor(np.random.default_rng(1).random((3, 10, 16)), dtype=torch.float32)
    lr, base = degrade_and_interpolate(x, 2, 2, "boxcar")
    # boxcar with an integer factor = slab mean of each pair of voxels (hand-computed)
    assert torch.allclose(lr, (x[..., 0::2] + x[..., 1::2]) / 2, atol=1e-6)
    # cubic B-spline through the slab centres: HR index z sits at LR coordinate (z - 0.5) / 2
    coords = (np.arange(16) - 0.5) / 2
    ref = np.stack([[ndimage.map_coordinates(lr[i, j].double().numpy(), [coords], order=3, mode="mirror") for j in range(10)] for i in range(3)])
    assert np.allclose(base[..., 3:-3].numpy(), ref[..., 3:-3], atol=1e-4)


def test_thick_slice_channels_positions_and_neighbours_by_hand():
    base = torch.zeros(1, 1, 6)
    lr = torch.arange(3, dtype=torch.float32).reshape(1, 1, 3) * 10  # LR slices 0, 10, 20
    ch = thick_slice_channels(base, lr, 2.0, neighbours=2)[:, 0, 0]
    # HR z -> LR u = (z - 0.5) / 2 = -0.25, 0.25, 0.75, 1.25, 1.75, 2.25
    assert torch.allclose(ch[1], torch.tensor([0.75, 0.25, 0.75, 0.25, 0.75, 0.25]))
    assert torch.allclose(ch[2], torch.full((6,), 0.5))
    assert ch[3].tolist() == [0, 0, 0, 10, 10, 20]  # floor(u), clamped at 0
    assert ch[4].tolist() == [0, 10, 10, 20, 20, 20]  # floor(u) + 1, clamped at the last slice


def test_smore_pairs_are_the_input_slices_and_their_degraded_copies():
    lr = torch.as_tensor(np.random.default_rng(2).random((8, 6, 5)), dtype=torch.float32)  # canonical (X, Y, M)
    pairs = smore_training_pairs(lr, 2.0, "boxcar")
    assert len(pairs) == 2
    (b0, t0), (b1, t1) = pairs
    assert torch.equal(t0, lr.movedim(-1, 0)) and torch.equal(t1, lr.movedim(-1, 0).transpose(1, 2))
    assert b0.shape == t0.shape and b1.shape == t1.shape
    # the degraded direction is W: re-degrading the input along W gives what degrading the target gives
    assert torch.allclose(degrade_and_interpolate(t0, 2, 2.0, "boxcar")[1], b0)


@pytest.mark.parametrize("axis,factor", [(2, 2.0), (1, 2.5)])
def test_smore_on_the_requested_grid_and_learns(axis, factor):
    hr = _phantom()
    lr = SimulateAnisotropicAcquisition(axis, factor)(hr)
    grid = TargetGrid.like(hr)
    out, hist = smore(lr, grid, return_history=True, **TINY)
    assert tuple(out.shape) == (1, *grid.shape)
    assert torch.allclose(out.affine.double(), grid.affine, atol=1e-6)
    assert torch.isfinite(out).all() and float(out.min()) >= 0
    assert np.mean(hist[-5:]) < np.mean(hist[:5])  # the self-supervised training reduces its loss
    other = TargetGrid((20, 22, 18), make_affine((1.1, 1.0, 0.9), (-11.0, -11.0, -8.0), (5, 0, 0)))
    out2 = smore(lr, other, **dict(TINY, iterations=2))
    assert tuple(out2.shape) == (1, 20, 22, 18) and torch.allclose(out2.affine.double(), other.affine, atol=1e-6)


def test_smore_reads_no_file(monkeypatch):
    """Self-supervised: the training pairs come from the LR volume in memory, no HR (or any) file is opened."""
    import nibabel
    import SimpleITK

    def refuse(*args, **kwargs):
        raise AssertionError(f"SMORE tried to read a file: {args[:1]}")

    hr = _phantom()
    lr = SimulateAnisotropicAcquisition("z", 2)(hr)
    for target, name in ((builtins, "open"), (io, "open"), (nibabel, "load"), (SimpleITK, "ReadImage")):
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.setattr("nexus_monai.data.io.load_volume", refuse)
    out = smore(lr, TargetGrid.like(hr), **dict(TINY, iterations=3))
    assert tuple(out.shape) == (1, 24, 24, 16)


def test_smore_method_and_fba_fusion():
    hr = _phantom()
    inputs = {"t1_lr": SimulateAnisotropicAcquisition("z", 2)(hr), "t2_lr": SimulateAnisotropicAcquisition("y", 4)(hr), "t1": hr, "t2": hr}
    res = get_method("smore")(inputs, TargetGrid.like(hr), **dict(TINY, iterations=3, fuse="fba"))
    assert set(res) == {"t1", "t2"} and all(tuple(v.shape) == (1, 24, 24, 16) for v in res.values())
    # FBA of identical estimates is that estimate; of two, a per-frequency convex combination
    a = torch.rand(6, 5, 4)
    assert torch.allclose(fourier_burst_accumulation([a, a]), a, atol=1e-5)
    b = torch.rand(6, 5, 4)
    fa, fb, ff = (torch.fft.fftn(v.double()) for v in (a, b, fourier_burst_accumulation([a, b], 2.0)))
    wa = fa.abs() ** 2 / (fa.abs() ** 2 + fb.abs() ** 2)
    assert torch.allclose(ff, wa * fa + (1 - wa) * fb, atol=1e-4)


def test_smore_input_errors():
    hr = _phantom()
    with pytest.raises(NexusInputError, match="no thick axis"):
        smore(hr, TargetGrid.like(hr), **TINY)
    lr = SimulateAnisotropicAcquisition("z", 2)(hr)
    with pytest.raises(NexusInputError, match="factor 3 does not match"):
        smore(lr, TargetGrid.like(hr), factor=3, **TINY)
    with pytest.raises(NexusInputError, match="thick axis 'x' does not match"):
        smore(lr, TargetGrid.like(hr), axis="x", **TINY)
    bad = lr.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NexusInputError, match="NaN"):
        smore(bad, TargetGrid.like(hr), **TINY)


def test_baseline_command_smore_and_isotropic_error(tmp_path, capsys, monkeypatch):
    from functools import partial

    import nibabel as nib

    import nexus_monai.baselines.smore as smore_module

    monkeypatch.setattr(smore_module, "smore", partial(smore, **dict(TINY, iterations=5)))  # the CLI looks it up at call time

    from nexus_monai.cli import main
    from nexus_monai.data.io import save_volume

    hr = ndimage.gaussian_filter(np.random.default_rng(0).random((20, 20, 16)), 2.0).astype(np.float32) + 1.0
    save_volume(hr, tmp_path / "hr.nii.gz", affine=make_affine((1.0, 1.0, 1.0), (0, 0, 0)))
    assert main(["degrade", "--image", str(tmp_path / "hr.nii.gz"), "--axis", "y", "--factor", "2", "--out", str(tmp_path / "lr.nii.gz")]) == 0
    assert main(["baseline", "--method", "smore", "--image", str(tmp_path / "lr.nii.gz"), "--like", str(tmp_path / "hr.nii.gz"), "--out", str(tmp_path / "sr.nii.gz")]) == 0
    out, ref = nib.load(str(tmp_path / "sr.nii.gz")), nib.load(str(tmp_path / "hr.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-5)
    assert np.isfinite(np.asarray(out.dataobj)).all()
    capsys.readouterr()
    assert main(["baseline", "--method", "smore", "--image", str(tmp_path / "hr.nii.gz"), "--spacing", "1", "--out", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "hr.nii.gz" in err and "no thick axis" in err and "\n" not in err
    assert not (tmp_path / "x.nii.gz").exists()
