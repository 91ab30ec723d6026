"""Acquisition simulation, frame padding, intensity, paired patches and query points."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Randomizable

from nexus_monai.geometry import (
    field_of_view,
    make_affine,
    sample_at_world,
    spacing,
    voxel_centres,
    voxel_to_world,
    world_to_voxel,
)
from nexus_monai.transforms import (
    AcquisitionRicianNoised,
    ComputeWorldNormalizerd,
    PadToFramed,
    RandPairedPatchd,
    SampleQueryPointsd,
    ScaleByMaskPercentiled,
    SimulateAnisotropicAcquisition,
    SimulateAnisotropicAcquisitiond,
    ZScoreLikeReferenced,
    slice_profile_matrix,
)
from nexus_monai.transforms.protocols import load_protocol
from nexus_monai.transforms.query import iter_query_chunks, patch_world_box

OBLIQUE = make_affine((1.0, 1.0, 1.0), (-12, 8, 30), rotation_deg=(8, -15, 22))
ANISO = make_affine((0.9, 1.1, 1.3), (5, -7, 2))


def _hr(shape=(16, 20, 24), affine=OBLIQUE, fn=None, dtype=torch.float64):
    w = voxel_centres(shape, affine, dtype=torch.float64)
    if fn is None:
        fn = lambda w: torch.sin(w[..., 0] / 4) + torch.cos(w[..., 1] / 5) * w[..., 2] / 10  # noqa: E731
    return MetaTensor(fn(w)[None].to(dtype), affine=affine.clone())


@pytest.mark.parametrize("axis,factor", [("z", 2), ("y", 4), ("x", 3)])
def test_boxcar_equals_slab_mean_exactly(axis, factor):
    hr = MetaTensor(torch.rand(1, 12, 16, 24, dtype=torch.float64), affine=ANISO)
    lr = SimulateAnisotropicAcquisition(axis, factor, "boxcar")(hr)
    ax = "xyz".index(axis)
    n = hr.shape[ax + 1] // factor
    assert lr.shape[ax + 1] == n
    for s in range(n):
        slab = hr.as_subclass(torch.Tensor).narrow(ax + 1, s * factor, factor).mean(dim=ax + 1)
        assert torch.allclose(lr.as_subclass(torch.Tensor).select(ax + 1, s), slab, rtol=0, atol=1e-14)


@pytest.mark.parametrize("profile", ["gaussian", "boxcar", "none"])
@pytest.mark.parametrize("axis,factor", [("z", 2), ("y", 4), ("z", 2.5)])
@pytest.mark.parametrize("affine", [OBLIQUE, ANISO], ids=["oblique", "aniso"])
def test_world_point_is_same_anatomy_in_hr_and_lr(profile, axis, factor, affine):
    """Anatomy linear along the thick axis: every symmetric profile keeps its value at the slab centre."""
    hr = _hr(affine=affine, fn=lambda w: 3.0 + 0.2 * w[..., 0] - 0.1 * w[..., 1] + 0.05 * w[..., 2])
    lr = SimulateAnisotropicAcquisition(axis, factor, profile)(hr)
    ax = "xyz".index(axis)
    lr_shape = lr.shape[1:]
    idx = voxel_centres(lr_shape, dtype=torch.float64)
    interior = (idx[..., ax] >= 2) & (idx[..., ax] <= lr_shape[ax] - 3)
    world = voxel_to_world(idx[interior], lr.affine)
    truth = 3.0 + 0.2 * world[:, 0] - 0.1 * world[:, 1] + 0.05 * world[:, 2]
    # exact, except boxcar at a non-integer factor whose voxel-overlap centroid is off by <= 0.05 voxel
    tol = 1e-9 if (profile != "boxcar" or float(factor).is_integer()) else 0.05 * 0.2 * 1.3
    assert torch.allclose(lr[0][interior], truth, atol=tol)
    # and sampling the HR at those world points gives the same value
    assert torch.allclose(sample_at_world(hr, hr.affine, world)[0], truth, atol=1e-9)
    assert float(spacing(lr.affine)[ax]) == pytest.approx(float(spacing(affine)[ax]) * factor)


def test_profile_matrix_properties():
    g = slice_profile_matrix(40, 2, "gaussian")
    assert g.shape == (20, 40) and torch.allclose(g.sum(1), torch.ones(20, dtype=torch.float64))
    # FWHM of the Gaussian profile equals the factor (HR voxels): measured from an interior row's variance
    for k in (2.0, 4.0, 3.3):
        w = slice_profile_matrix(80, k, "gaussian")
        row = len(w) // 2
        i = torch.arange(80, dtype=torch.float64)
        centre = row * k + (k - 1) / 2
        assert float((w[row] * i).sum()) == pytest.approx(centre, abs=1e-9)
        fwhm = 2 * np.sqrt(2 * np.log(2)) * float((w[row] * (i - centre) ** 2).sum()) ** 0.5
        assert fwhm == pytest.approx(k, rel=0.03)
    b = slice_profile_matrix(10, 2.5, "boxcar")
    assert b.shape == (4, 10)
    assert torch.allclose(b[0], torch.tensor([0.4, 0.4, 0.2, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError):
        slice_profile_matrix(10, 0.5, "gaussian")
    with pytest.raises(ValueError):
        slice_profile_matrix(10, 2, "sinc")
    with pytest.raises(ValueError):
        slice_profile_matrix(3, 4, "boxcar")


def test_rician_noise_is_seeded_and_positive():
    hr = _hr(dtype=torch.float32, fn=lambda w: 2.0 + torch.sin(w[..., 0] / 4))  # magnitude images are >= 0
    t = Compose([SimulateAnisotropicAcquisitiond("img", "z", 2, output_keys="lr"), AcquisitionRicianNoised("lr", noise_std=0.05)])
    a = t.set_random_state(3)({"img": hr})["lr"]
    b = t.set_random_state(3)({"img": hr})["lr"]
    c = t.set_random_state(4)({"img": hr})["lr"]
    clean = SimulateAnisotropicAcquisition("z", 2)(hr)
    assert not isinstance(SimulateAnisotropicAcquisitiond("img", "z", 2), Randomizable)  # cacheable
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a >= 0)
    assert 0.001 < float((a - clean).abs().mean()) < 0.5
    assert torch.allclose(a.affine, clean.affine)


def test_pad_to_frame_keeps_world_positions():
    a = make_affine((2.0, 2.0, 2.0), (-100, -110, -60))
    img = MetaTensor(torch.rand(1, 100, 110, 70), affine=a)
    out = PadToFramed("img", (240, 240, 160))({"img": img})["img"]
    assert out.shape[1:] == (120, 120, 80)
    # a voxel keeps its world position: look it up through the new affine
    world = voxel_to_world(torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64), a)
    idx = world_to_voxel(world, out.affine).round().long()[0]
    assert float(out[0, idx[0], idx[1], idx[2]]) == float(img[0, 10, 20, 30])


def test_zscore_like_reference_round_trip_and_invertd():
    ref = MetaTensor(torch.cat([torch.zeros(1, 4, 8, 8), torch.rand(1, 4, 8, 8) + 1], 1), affine=ANISO)
    other = ref.clone() * 2
    t = ZScoreLikeReferenced(["lr", "hr"], ref_key="lr")
    d = t({"lr": ref, "hr": other})
    fg = ref[ref != 0]
    assert float(d["lr"][ref != 0].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(d["lr_zscore"]["mean"]) == pytest.approx(float(fg.mean()), rel=1e-6)
    assert torch.all(d["hr"][other == 0] == 0)
    # MONAI's Invertd restores a prediction through the recorded op
    d["pred"] = d["hr"].clone()
    inv = Invertd(keys="pred", transform=t, orig_keys="hr", nearest_interp=False)(d)
    assert torch.allclose(inv["pred"].as_subclass(torch.Tensor), other.as_subclass(torch.Tensor), atol=1e-5)
    back = t.inverse(d)
    assert torch.allclose(back["hr"], other, atol=1e-5)


def test_scale_by_mask_percentile():
    gt = torch.zeros(1, 10, 10, 10)
    gt[0, 2:8, 2:8, 2:8] = torch.arange(216, dtype=torch.float32).reshape(6, 6, 6) + 1
    d = ScaleByMaskPercentiled(["gt", "pred"], ref_key="gt")({"gt": gt, "pred": gt * 2})
    scale = np.percentile(np.arange(216) + 1, 99.5)
    assert float(d["gt_scale"]) == pytest.approx(scale)
    assert torch.allclose(d["pred"], gt * 2 / scale)


def _paired_subject(affine=OBLIQUE):
    hr = _hr(shape=(32, 32, 32), affine=affine)
    mask = torch.zeros_like(hr)
    mask[:, 4:28, 4:28, 4:28] = 1
    d = {"hr": hr, "seg": MetaTensor((hr > 0.5).float(), affine=affine.clone()), "mask": mask}
    d = SimulateAnisotropicAcquisitiond("hr", "z", 2, "boxcar", output_keys="t1_lr")(d)
    d = SimulateAnisotropicAcquisitiond("hr", "y", 4, "boxcar", output_keys="t2_lr")(d)
    return ComputeWorldNormalizerd(["t1_lr", "t2_lr"])(d)


@pytest.mark.parametrize("seed", range(6))
def test_paired_patches_cover_the_same_world_box(seed):
    d = _paired_subject()
    t = RandPairedPatchd(["hr", "seg", "mask"], ["t1_lr", "t2_lr"], (8, 8, 8), mask_key="mask", flip_prob=0.5, rot90_prob=0.7)
    out = t.set_random_state(seed)(d)
    assert tuple(out["t1_lr"].shape[1:]) == (8, 8, 4) and tuple(out["t2_lr"].shape[1:]) == (8, 2, 8)  # thick axes stay
    box = field_of_view(out["hr"].shape[1:], out["hr"].affine)
    for k in ("seg", "mask", "t1_lr", "t2_lr"):
        other = field_of_view(out[k].shape[1:], out[k].affine)
        # same set of corners (order may change under flips/rotations)
        assert torch.allclose(torch.sort(other, 0).values, torch.sort(box, 0).values, atol=1e-6)
    # arrays and affines stay consistent: every LR patch voxel holds the full LR volume's value there
    for k in ("t1_lr", "t2_lr", "hr"):
        w = voxel_to_world(voxel_centres(out[k].shape[1:], dtype=torch.float64).reshape(-1, 3), out[k].affine)
        full = sample_at_world(d[k], d[k].affine, w, mode="nearest")
        assert torch.allclose(full[0], out[k][0].reshape(-1), atol=1e-9)


def test_rotations_keep_each_thick_axis_and_the_batch_collatable():
    """Rotations never move an LR patch's thick axis: T1w z x 2 / T2w y x 4 keep (8, 8, 4) / (8, 2, 8)
    (only half turns qualify there); with both contrasts thick along z, quarter turns in x-y do occur."""
    from monai.data import list_data_collate

    d = _paired_subject()
    t = RandPairedPatchd(["hr", "seg", "mask"], ["t1_lr", "t2_lr"], (8, 8, 8), mask_key="mask", rot90_prob=1.0)
    outs = [t.set_random_state(seed)(d) for seed in range(12)]
    assert {tuple(o["t1_lr"].shape[1:]) for o in outs} == {(8, 8, 4)}
    assert {tuple(o["t2_lr"].shape[1:]) for o in outs} == {(8, 2, 8)}
    assert set(t.rotations(d)) == {(2, (0, 1)), (2, (0, 2)), (2, (1, 2))}
    batch = list_data_collate([{k: o[k] for k in ("hr", "t1_lr", "t2_lr")} for o in outs[:4]])
    assert tuple(batch["t1_lr"].shape) == (4, 1, 8, 8, 4)
    # a half turn really turns the arrays (and the affine follows, so the world box is unchanged)
    assert any(not torch.equal(o["hr"], outs[0]["hr"]) for o in outs[1:])
    both_z = _paired_subject()
    both_z = SimulateAnisotropicAcquisitiond("hr", "z", 4, "boxcar", output_keys="t2_lr")(both_z)
    t = RandPairedPatchd(["hr"], ["t1_lr", "t2_lr"], (8, 8, 8), rot90_prob=1.0)
    t(both_z)
    assert (1, (0, 1)) in t.rotations(both_z) and (1, (0, 2)) not in t.rotations(both_z)
    shapes = {tuple(t.set_random_state(s)(both_z)["t2_lr"].shape[1:]) for s in range(12)}
    assert shapes == {(8, 8, 2)}


def test_paired_patches_paper_sizes_and_foreground():
    a = make_affine((1, 1, 1), (0, 0, 0))
    d = _paired_subject(a)
    d["mask"] = torch.zeros_like(d["mask"])
    d["mask"][:, 20:32, 20:32, 20:32] = 1
    t = RandPairedPatchd(["hr", "mask"], ["t1_lr", "t2_lr"], (12, 12, 12), mask_key="mask", min_foreground=0.3, max_tries=50)
    for seed in range(5):
        out = t.set_random_state(seed)(d)
        assert tuple(out["t1_lr"].shape[1:]) == (12, 12, 6) and tuple(out["t2_lr"].shape[1:]) == (12, 3, 12)
        assert float(out["mask"].mean()) >= 0.3
        start = out["patch_start"].tolist()
        assert start[2] % 2 == 0 and start[1] % 4 == 0  # slab-aligned starts


def test_paired_patches_reject_unaligned_grids():
    d = _paired_subject()
    d["t2_lr"] = MetaTensor(d["t2_lr"].as_subclass(torch.Tensor), affine=make_affine((1, 4, 1), (0, 0, 0), rotation_deg=(0, 0, 30)))
    with pytest.raises(ValueError, match="axis-aligned"):
        RandPairedPatchd(["hr"], ["t1_lr", "t2_lr"], (8, 8, 8))(d)


def test_query_points_match_hr_values_and_normaliser():
    d = _paired_subject()
    out = RandPairedPatchd(["hr", "seg"], ["t1_lr", "t2_lr"], (8, 8, 8), flip_prob=0.5, rot90_prob=0.5).set_random_state(1)(d)
    q = SampleQueryPointsd(["hr"], num_points=100, label_key="seg").set_random_state(0)(out)
    assert q["query_world"].shape == (100, 3) and q["query_hr"].shape == (100, 1) and q["query_label"].shape == (100,)
    # values are the HR ground truth at those world points (full volume lookup)
    vals = sample_at_world(d["hr"], d["hr"].affine, q["query_world"].double())[0]
    assert torch.allclose(vals.float(), q["query_hr"][:, 0], atol=1e-5)
    from nexus_monai.geometry import WorldNormalizer

    norm = WorldNormalizer.from_dict(d["world_norm"])
    assert torch.allclose(q["query_norm"], norm(q["query_world"].double()).float(), atol=1e-6)
    assert float(q["query_norm"].abs().max()) <= 1.0 + 1e-6
    everything = SampleQueryPointsd(["hr"], num_points=None)(out)
    assert everything["query_world"].shape == (512, 3)
    assert len(set(map(tuple, q["query_index"].tolist()))) == 100


def test_query_chunks_cover_output_grid():
    from nexus_monai.geometry import TargetGrid, WorldNormalizer

    g = TargetGrid((6, 5, 4), OBLIQUE)
    norm = WorldNormalizer.from_grids([(g.shape, g.affine)])
    total = 0
    for start, stop, world, n in iter_query_chunks(g, norm, max_points=7):
        assert world.shape == (stop - start, 3) and torch.allclose(n, norm(world.double()).float(), atol=1e-6)
        total += stop - start
    assert total == 120
    assert patch_world_box(g.shape, g.affine).shape == (2, 3)


@pytest.mark.parametrize("name,t1,t2", [("nexus", ("z", 2), ("y", 4)), ("ssmcsr", ("z", 4), ("y", 4))])
def test_protocol_yaml_builds_the_acquisitions(name, t1, t2):
    p = load_protocol(name)
    a = make_affine((2.0, 2.0, 2.0), (-120, -120, -80))
    hr = MetaTensor(torch.rand(1, 110, 116, 74), affine=a)
    d = p.simulation()({"t1": hr, "t2": hr.clone()})
    assert tuple(d["t1"].shape[1:]) == (120, 120, 80)
    f1, f2 = t1[1], t2[1]
    assert tuple(d["t1_lr"].shape[1:]) == (120, 120, 80 // f1)
    assert tuple(d["t2_lr"].shape[1:]) == (120, 120 // f2, 80)
    assert float(spacing(d["t2_lr"].affine)[1]) == pytest.approx(2.0 * f2)
