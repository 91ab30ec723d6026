"""Lesion-aware training samples: lesion rings equal the fidelity metric's, patches are centred on a
contrast-specific lesion at the configured rate (one lesion picked uniformly, not by size), query
points fall in lesions + rings at the configured fraction and uniformly inside them, and the
lesion map travels with the images through crops and flips. Tolerances: binomial standard deviations."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.geometry import make_affine, thick_slice_affine
from nexus_monai.keys import QUERY_LESION
from nexus_monai.metrics.lesion import lesion_ring
from nexus_monai.transforms import (
    ComputeWorldNormalizerd,
    LesionRegion,
    LesionRegiond,
    RandPairedPatchd,
    SampleQueryPointsd,
    lesion_instances,
    lesion_region,
)

HR = make_affine((1.0, 1.0, 1.0), (-20.0, -20.0, -20.0))


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def test_lesion_region_ring_is_the_metric_ring():
    lab = np.zeros((20, 20, 20), np.int64)
    lab[5, 5, 5] = 1001  # one voxel
    lab[12:15, 11:14, 12:16] = 2002  # a 3 x 3 x 4 block
    code = lesion_region(lab, ring=2)
    assert (code[lab > 0] == lab[lab > 0]).all()
    everyone = np.ones(lab.shape, bool)
    for v in (1001, 2002):
        ring = lesion_ring(lab == v, everyone, lab > 0, voxels=2)  # the fidelity metric's ring
        np.testing.assert_array_equal(code == -v, ring)
    assert (code == -1001).sum() == 32  # radius-2 Euclidean ball: 33 voxels, minus the centre
    assert set(np.unique(code)) == {0, 1001, -1001, 2002, -2002}
    # the array / dict twins keep the affine and the (1, X, Y, Z) layout
    img = MetaTensor(torch.as_tensor(lab)[None].float(), affine=HR)
    out = LesionRegion(ring=2)(img)
    assert out.shape == (1, 20, 20, 20) and torch.equal(out.affine, img.affine)
    np.testing.assert_array_equal(out[0].numpy(), code)
    d = LesionRegiond("lesions", output_keys="region")({"lesions": img})
    np.testing.assert_array_equal(d["region"][0].numpy(), code)
    assert lesion_instances(lab).keys() == {1001, 2002} and len(lesion_instances(lab)[2002]) == 36
    assert lesion_instances(lab, classes=(3,)) == {}


def _subject(shape=(40, 40, 40)) -> dict:
    """An HR subject with a brain mask on x < 10 only (ordinary patches never reach the lesions),
    two contrast-specific lesions of very different size and a lesion seen on both."""
    lab = torch.zeros(shape)
    lab[33, 33, 33] = 1001  # T2w-only, one voxel
    lab[26:32, 30:36, 8:14] = 2002  # T1w-only, 216 voxels
    lab[33, 8:12, 25] = 3003  # visible on both: not a contrast-specific class
    brain = torch.zeros(shape)
    brain[:10] = 1
    hr = MetaTensor(lab[None].clone(), affine=HR)
    t1 = MetaTensor(lab[None] * 0.001 + brain[None], affine=HR)  # encodes the lesion map: a flip check
    t1_lr = MetaTensor(torch.zeros(1, shape[0], shape[1], shape[2] // 2), affine=thick_slice_affine(HR, "z", 2))
    t2_lr = MetaTensor(torch.zeros(1, shape[0], shape[1] // 4, shape[2]), affine=thick_slice_affine(HR, "y", 4))
    return {"t1": t1, "brain": MetaTensor(brain[None], affine=HR), "lesions": hr, "t1_lr": t1_lr, "t2_lr": t2_lr}


def test_patches_are_centred_on_a_uniformly_picked_contrast_specific_lesion_at_the_configured_rate():
    subject = _subject()
    p, n = 0.4, 240
    xform = RandPairedPatchd(["t1", "brain", "lesions"], ["t1_lr", "t2_lr"], (8, 8, 8), mask_key="brain",
                             flip_prob=0.5, lesion_key="lesions", lesion_patch_prob=p)
    xform.set_random_state(0)
    hits = {1001: 0, 2002: 0, 3003: 0}
    for _ in range(n):
        out = xform(subject)
        lab = out["lesions"][0]
        for v in hits:
            hits[v] += int(bool((lab == v).any()))
        # the map was cropped and flipped with the images, and the LR patches still cover the same box
        torch.testing.assert_close(out["t1"][0], lab * 0.001 + out["brain"][0])
        assert tuple(out["t1_lr"].shape[1:]) == (8, 8, 4) and tuple(out["t2_lr"].shape[1:]) == (8, 2, 8)
    # each contrast-specific lesion with probability p / 2 (uniform over instances, not over voxels)
    assert _within(hits[1001], n, p / 2) and _within(hits[2002], n, p / 2), hits
    assert hits[3003] == 0


def test_lesion_patch_prob_zero_is_the_ordinary_draw():
    subject = _subject()
    kw = dict(hr_keys=["t1", "brain", "lesions"], lr_keys=["t1_lr", "t2_lr"], patch_size=(8, 8, 8), mask_key="brain",
              flip_prob=0.5)
    a, b = RandPairedPatchd(**kw), RandPairedPatchd(**kw, lesion_key="lesions", lesion_patch_prob=0.0)
    a.set_random_state(3)
    b.set_random_state(3)
    for _ in range(5):
        torch.testing.assert_close(a(subject)["t1"], b(subject)["t1"])


def test_lesion_options_reject_bad_values():
    with pytest.raises(ValueError, match="lesion_key"):
        RandPairedPatchd("t1", "t1_lr", (8, 8, 8), lesion_patch_prob=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RandPairedPatchd("t1", "t1_lr", (8, 8, 8), lesion_key="lesions", lesion_patch_prob=1.5)
    with pytest.raises(ValueError, match="lesion_key"):
        SampleQueryPointsd("t1", lesion_point_fraction=0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SampleQueryPointsd("t1", lesion_key="lesions", lesion_point_fraction=-0.1)


def _patch(lab: torch.Tensor) -> dict:
    shape = tuple(lab.shape)
    index = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)  # value = flat index
    d = {"t1": MetaTensor(index, affine=HR), "lesions": MetaTensor(lab[None].clone(), affine=HR)}
    return ComputeWorldNormalizerd("t1")(d)


def test_query_points_fall_in_lesions_and_rings_at_the_configured_fraction_uniformly():
    lab = torch.zeros(16, 16, 16)
    lab[3:6, 3:6, 3:6] = 1005  # T2w-only: 27 voxels, ring around it
    lab[12, 12, 12] = 3001  # seen on both: not over-sampled (default classes)
    d = _patch(lab)
    code = lesion_region(lab.numpy(), ring=2).reshape(-1)
    region = np.flatnonzero(np.abs(code) // 1000 == 1)
    rest = np.setdiff1d(np.arange(code.size), region)
    k, f, n = 256, 0.25, 400
    n_in = round(f * k)
    assert region.size > n_in
    xform = SampleQueryPointsd("t1", num_points=k, lesion_key="lesions", lesion_point_fraction=f)
    xform.set_random_state(1)
    counts = np.zeros(code.size, np.int64)
    for _ in range(n):
        out = xform(d)
        flat = out["query_t1"][:, 0].long().numpy()
        assert np.unique(flat).size == k
        assert np.isin(flat, region).sum() == n_in  # exactly the configured fraction of the K points
        np.testing.assert_array_equal(out[QUERY_LESION].numpy(), code[flat])  # the region code travels along
        counts[flat] += 1
    # uniform inside the region and outside it: every voxel's count within 5 binomial std
    for sel, p in ((region, n_in / region.size), (rest, (k - n_in) / rest.size)):
        sd = math.sqrt(n * p * (1 - p))
        assert np.abs(counts[sel] - n * p).max() <= 5 * sd, (counts[sel].min(), counts[sel].max(), n * p)


def test_query_points_small_region_and_defaults():
    lab = torch.zeros(16, 16, 16)
    lab[8, 8, 8] = 2001  # one voxel + its 32-voxel ring: fewer than f * K
    d = _patch(lab)
    out = SampleQueryPointsd("t1", num_points=200, lesion_key="lesions", lesion_point_fraction=0.5)(d)
    assert (out[QUERY_LESION] == 2001).sum() == 1 and (out[QUERY_LESION] == -2001).sum() == 32
    # fraction 0: the same points as without a lesion map, plus their codes
    a = SampleQueryPointsd("t1", num_points=100)
    b = SampleQueryPointsd("t1", num_points=100, lesion_key="lesions")
    a.set_random_state(5)
    b.set_random_state(5)
    oa, ob = a(d), b(d)
    torch.testing.assert_close(oa["query_t1"], ob["query_t1"])
    assert QUERY_LESION not in oa and ob[QUERY_LESION].shape == (100,)
    # a sample without a lesion map: zeros (a batch still collates) and one warning
    with pytest.warns(UserWarning, match="no lesion map"):
        out = SampleQueryPointsd("t1", num_points=50, lesion_key="lesions", lesion_point_fraction=0.3)(
            {k: v for k, v in d.items() if k != "lesions"})
    assert out[QUERY_LESION].shape == (50,) and int(out[QUERY_LESION].abs().sum()) == 0
