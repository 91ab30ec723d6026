"""Geometry contract (README: Geometry): world <-> voxel <-> grid_sample, target grids, normaliser."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nexus_monai.geometry import (
    TargetGrid,
    WorldNormalizer,
    field_of_view,
    grid_to_voxel,
    hr_affine_of_thick_slices,
    make_affine,
    parse_axis,
    sample_at_world,
    spacing,
    thick_slice_affine,
    voxel_centres,
    voxel_to_grid,
    voxel_to_world,
    world_to_voxel,
)

AFFINES = {
    "iso": make_affine((1, 1, 1), (-90, -126, -72)),
    "aniso": make_affine((0.8, 1.2, 3.0), (10, -5, 2)),
    "oblique": make_affine((1.0, 1.5, 2.0), (-20, 30, 7), rotation_deg=(12, -25, 40)),
    "flipped": torch.tensor([[-1.0, 0, 0, 90], [0, -1, 0, 126], [0, 0, 2, -72], [0, 0, 0, 1]], dtype=torch.float64),
}


@pytest.mark.parametrize("name", AFFINES)
def test_world_voxel_round_trip(name):
    a = AFFINES[name]
    idx = torch.rand(50, 3, dtype=torch.float64) * 30 - 5
    world = voxel_to_world(idx, a)
    assert torch.allclose(world_to_voxel(world, a), idx, atol=1e-10)
    # against nibabel's own affine application
    ref = nib.affines.apply_affine(a.numpy(), idx.numpy())
    assert np.allclose(world.numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("name", AFFINES)
def test_spacing_is_column_norm(name):
    a = AFFINES[name]
    expected = nib.affines.voxel_sizes(a.numpy())
    assert np.allclose(spacing(a).numpy(), expected)


def test_grid_coordinates_follow_grid_sample_convention():
    shape = (5, 7, 9)
    vol = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, 1, *shape)
    idx = torch.tensor([[0, 0, 0], [4, 6, 8], [2, 3, 1], [1, 5, 7]], dtype=torch.float64)
    grid = voxel_to_grid(idx, shape)
    out = F.grid_sample(vol, grid[None, :, None, None, :], align_corners=False, mode="nearest")[0, 0, :, 0, 0]
    expected = torch.tensor([vol[0, 0, int(i), int(j), int(k)] for i, j, k in idx.tolist()], dtype=torch.float64)
    assert torch.equal(out, expected)
    assert torch.allclose(grid_to_voxel(grid, shape), idx)
    # align_corners=False: voxel edges map to -1 / +1
    edges = voxel_to_grid(torch.tensor([[-0.5, -0.5, -0.5], [4.5, 6.5, 8.5]]), shape)
    assert torch.allclose(edges, torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))


@pytest.mark.parametrize("name", AFFINES)
def test_sample_at_world_is_exact_at_voxel_centres_and_trilinear_between(name):
    a = AFFINES[name]
    shape = (6, 5, 4)
    vol = torch.rand(2, *shape, dtype=torch.float64)
    idx = torch.tensor([[1, 2, 3], [5, 0, 0], [0, 4, 2]], dtype=torch.float64)
    got = sample_at_world(vol, a, voxel_to_world(idx, a))
    expected = torch.stack([vol[:, int(i), int(j), int(k)] for i, j, k in idx.tolist()], dim=1)
    assert torch.allclose(got, expected, atol=1e-10)
    # a linear function of the index is reproduced exactly by trilinear sampling
    c = voxel_centres(shape, dtype=torch.float64)
    lin = (0.5 * c[..., 0] - 2.0 * c[..., 1] + 3.0 * c[..., 2])[None]
    p = torch.tensor([[1.3, 2.7, 0.4], [4.9, 0.1, 2.5]], dtype=torch.float64)
    got = sample_at_world(lin, a, voxel_to_world(p, a))
    assert torch.allclose(got[0], 0.5 * p[:, 0] - 2.0 * p[:, 1] + 3.0 * p[:, 2], atol=1e-9)


def test_sample_at_world_batched():
    a = torch.stack([AFFINES["iso"], AFFINES["oblique"]])
    vol = torch.rand(2, 1, 4, 4, 4, dtype=torch.float64)
    idx = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    pts = torch.stack([voxel_to_world(idx, a[0]), voxel_to_world(idx, a[1])])
    got = sample_at_world(vol, a, pts)
    assert got.shape == (2, 1, 1)
    assert torch.allclose(got[:, 0, 0], vol[:, 0, 1, 2, 3])


@pytest.mark.parametrize("name", AFFINES)
@pytest.mark.parametrize("axis,factor", [("z", 2), ("y", 4), ("x", 3), ("z", 2.5)])
def test_thick_slice_affine_maps_slab_centres(name, axis, factor):
    """LR voxel n sits at the world position of HR index n*k + (k-1)/2 along the thick axis."""
    a = AFFINES[name]
    ax = parse_axis(axis)
    lr = thick_slice_affine(a, axis, factor)
    n = torch.tensor([[0.0, 0.0, 0.0], [2.0, 3.0, 1.0]], dtype=torch.float64)
    n_hr = n.clone()
    n_hr[:, ax] = n[:, ax] * factor + (factor - 1) / 2
    assert torch.allclose(voxel_to_world(n, lr), voxel_to_world(n_hr, a), atol=1e-10)
    assert math.isclose(float(spacing(lr)[ax]), float(spacing(a)[ax]) * factor, rel_tol=1e-12)
    assert torch.allclose(hr_affine_of_thick_slices(lr, axis, factor), a, atol=1e-10)


@pytest.mark.parametrize("name", AFFINES)
def test_from_spacing_keeps_field_of_view_and_inverts_thick_slices(name):
    a = AFFINES[name]
    hr_shape = (12, 16, 20)
    lr_affine = thick_slice_affine(a, "z", 2)
    g = TargetGrid.from_spacing((12, 16, 10), lr_affine, spacing(a))
    assert g.shape == hr_shape
    assert torch.allclose(g.affine, a, atol=1e-10)
    assert torch.allclose(field_of_view(g.shape, g.affine), field_of_view(hr_shape, a), atol=1e-9)
    half = TargetGrid.from_spacing(hr_shape, a, spacing(a) / 2)
    assert half.shape == (24, 32, 40)
    assert torch.allclose(field_of_view(half.shape, half.affine), field_of_view(hr_shape, a), atol=1e-9)
    # direction cosines are kept (oblique stays oblique)
    assert torch.allclose(half.affine[:3, :3] / spacing(half.affine), a[:3, :3] / spacing(a), atol=1e-12)


def test_target_grid_like_and_bad_input():
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), AFFINES["oblique"].numpy())
    g = TargetGrid.like(img)
    assert g.shape == (4, 5, 6) and torch.allclose(g.affine, AFFINES["oblique"])
    with pytest.raises(ValueError):
        TargetGrid.from_spacing((4, 4, 4), AFFINES["iso"], -1.0)
    with pytest.raises(ValueError):
        TargetGrid((4, 4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        parse_axis("w")


def test_iter_world_chunks_covers_grid_exactly():
    g = TargetGrid((5, 3, 7), AFFINES["oblique"])
    full = g.world_coords(dtype=torch.float64).reshape(-1, 3)
    got = torch.zeros_like(full)
    sizes = []
    for start, stop, coords in g.iter_world_chunks(16, dtype=torch.float64):
        got[start:stop] = coords
        sizes.append(stop - start)
    assert max(sizes) == 16 and sum(sizes) == g.num_voxels
    assert torch.allclose(got, full)


def test_world_normalizer_is_shared_and_isotropic():
    a = AFFINES["iso"]
    hr_shape = (20, 24, 16)
    t1 = (hr_shape[:2] + (8,), thick_slice_affine(a, "z", 2))
    t2 = ((20, 6, 16), thick_slice_affine(a, "y", 4))
    norm = WorldNormalizer.from_grids([t1, t2])
    fov = field_of_view(hr_shape, a)
    n = norm(fov)
    assert float(n.abs().max()) == pytest.approx(1.0)
    # one isotropic scale: distances scale uniformly
    p = torch.rand(10, 3, dtype=torch.float64) * 20
    d_world = torch.cdist(p, p)
    d_norm = torch.cdist(norm(p), norm(p))
    assert torch.allclose(d_norm * norm.scale, d_world)
    # both LR grids and the HR grid share the box (LR fields of view equal the HR one)
    assert torch.allclose(norm.inverse(n), fov)
    again = WorldNormalizer.from_dict(norm.to_dict())
    assert torch.allclose(again(p), norm(p))
