"""Lesion metric v2 on hand-built volumes: an exaggerated lesion, a dark ring and a painted false lesion each
score worse than the truth; capped mean, |ratio - 1|, ring bias, within-slab part, false positives and the
counterfactual imprint against hand computation; the generator's per-class switch."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.data.synth import lesions as synth_lesions
from nexus_monai.data.synth.physics import draw_physics
from nexus_monai.geometry import TargetGrid, make_affine, thick_slice_affine
from nexus_monai.keys import LESION_BOTH, LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY
from nexus_monai.metrics.lesion import EXAGGERATED, lesion_fidelity_row, lesion_geometry, lesion_records
from nexus_monai.metrics.lesion_counterfactual import counterfactual_imprint_row
from nexus_monai.metrics.lesion_false_positives import SMALLEST_LESION_MM3, min_blob_voxels
from nexus_monai.metrics.lesion_within_slab import within_slab_part
from nexus_monai.transforms.acquisition import slice_profile_matrix

SHAPE = (24, 24, 24)
T2A = LESION_T2_ONLY * LESION_CLASS_STRIDE + 1
T2B = LESION_T2_ONLY * LESION_CLASS_STRIDE + 2
T1A = LESION_T1_ONLY * LESION_CLASS_STRIDE + 3


def _world():
    """Brain = box minus a 2-voxel border; two T2w-only cubes (+0.3 on T2w), one T1w-only cube (-0.2 on T1w)."""
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    lab = np.zeros(SHAPE, np.int32)
    lab[5:8, 5:8, 5:8] = T2A
    lab[15:18, 5:8, 5:8] = T2B
    lab[5:8, 15:18, 15:18] = T1A
    gt = {"t1": np.where(mask, 0.5, 0.0), "t2": np.where(mask, 0.6, 0.0)}
    gt["t2"][(lab == T2A) | (lab == T2B)] += 0.3
    gt["t1"][lab == T1A] -= 0.2
    return gt, lab, mask


def _ring(lab, value, mask):
    from scipy import ndimage
    dist = ndimage.distance_transform_edt(lab != value)
    return (dist <= 2) & (lab == 0) & mask


def test_exaggerated_lesion_scores_worse_than_the_truth():
    gt, lab, mask = _world()
    pred = {c: v.copy() for c, v in gt.items()}
    pred["t2"][lab == T2A] += 0.15  # 1.5x the GT contrast: ratio 1.5
    pred["t2"][lab == T2B] -= 0.15  # halved: ratio 0.5
    truth = lesion_fidelity_row(gt, gt, lab, mask)
    row = lesion_fidelity_row(gt, pred, lab, mask)
    # hand: ratios 1.5 and 0.5 -> capped mean (1 + 0.5) / 2, uncapped mean 1.0 (v1 called this perfect)
    assert row["lesion_contrast_t2"] == pytest.approx(0.75) and row["lesion_contrast_uncapped_t2"] == pytest.approx(1.0)
    assert row["lesion_error_t2"] == pytest.approx(0.5) and row["lesion_exaggerated_t2"] == 0.5
    assert truth["lesion_contrast_t2"] == 1.0 and truth["lesion_error_t2"] == 0 and truth["lesion_exaggerated_t2"] == 0
    only_exaggerated = {c: v.copy() for c, v in gt.items()}
    only_exaggerated["t2"][lab == T2A] += 0.15
    ex = lesion_fidelity_row(gt, only_exaggerated, lab, mask)
    assert ex["lesion_contrast_t2"] == truth["lesion_contrast_t2"]  # capped: no credit for painting stronger ...
    assert ex["lesion_error_t2"] > truth["lesion_error_t2"] and ex["lesion_exaggerated_t2"] > 0  # ... but charged
    assert ex["lesion_exaggerated_t2"] == pytest.approx(0.5) and 1.5 > EXAGGERATED


def test_dark_ring_scores_worse_than_the_truth_with_the_hand_ring_bias():
    gt, lab, mask = _world()
    pred = {c: v.copy() for c, v in gt.items()}
    ring = _ring(lab, T2A, mask)
    pred["t2"][ring] -= 0.06  # a dark halo: the lesion-minus-ring contrast rises to 0.36
    rec = next(r for r in lesion_records(gt, pred, lab, mask) if r["label"] == T2A)
    assert rec["recovered_t2"] == pytest.approx(0.36 / 0.3) and rec["capped_t2"] == 1.0
    assert rec["ring_bias_t2"] == pytest.approx(-0.06 / 0.3)
    # recovered - 1 = lesion bias - ring bias (lesion unchanged here)
    assert rec["recovered_t2"] - 1 == pytest.approx(0.0 - rec["ring_bias_t2"])
    row, truth = lesion_fidelity_row(gt, pred, lab, mask), lesion_fidelity_row(gt, gt, lab, mask)
    assert row["ring_bias_t2"] == pytest.approx(-0.2 / 2) and truth["ring_bias_t2"] == 0  # mean over 2 lesions
    assert row["lesion_error_t2"] > truth["lesion_error_t2"]
    assert row["lesion_contrast_uncapped_t2"] > 1.0  # v1 rewarded the halo


def _lr_scans(gt, axis=1, k=3.0, noise=0.01, seed=0):
    """MetaTensor LR scans of both contrasts: the HR grid's slabs along ``axis`` (+ Gaussian noise)."""
    hr = make_affine((1.0, 1.0, 1.0))
    m = slice_profile_matrix(SHAPE[axis], k).float()
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for c, v in gt.items():
        y = (torch.as_tensor(v, dtype=torch.float32).movedim(axis, -1) @ m.T).movedim(-1, axis)
        y = torch.where(y != 0, y + noise * torch.randn(y.shape, generator=rng), y)
        out[c] = MetaTensor(y[None], affine=thick_slice_affine(hr, axis, k))
    return out, hr


def test_painted_false_lesion_is_counted_and_the_truth_has_none():
    gt, lab, mask = _world()
    lr, hr = _lr_scans(gt)
    geo = lesion_geometry(lr, hr)
    sigma = {c: geo["lr_noise_sd"][c] for c in gt}
    assert 0.005 < sigma["t2"] < 0.02  # the scan's own noise (0.01), estimated from the scan
    pred = {c: v.copy() for c, v in gt.items()}
    pred["t2"][12:14, 15:17, 8:10] += 0.3  # a painted T2w hyperintensity in normal tissue (8 voxels)
    pred["t1"][15:17, 12:14, 14:16] -= 0.3  # a dark T1w blob
    pred["t2"][17:19, 17:19, 17:19] -= 0.3  # dark on T2w: not a T2w false lesion
    pred["t2"][6, 9, 6] += 0.3  # touching the lesion's 2-voxel margin: not normal tissue
    row = lesion_fidelity_row(gt, pred, lab, mask, **geo)
    truth = lesion_fidelity_row(gt, gt, lab, mask, **geo)
    assert truth["false_positives_t1"] == truth["false_positives_t2"] == 0
    assert row["false_positives_t2"] == 1 and row["false_positive_voxels_t2"] == 8
    assert row["false_positives_t1"] == 1 and row["false_positive_voxels_t1"] == 8
    assert row["fp_threshold_t2"] == pytest.approx(3 * sigma["t2"])
    # scales: the noise SD is in raw units and divided by the GT scale
    scaled = lesion_fidelity_row(gt, pred, lab, mask, scales={"t1": 2.0, "t2": 2.0}, **geo)
    assert scaled["fp_threshold_t2"] == pytest.approx(1.5 * sigma["t2"])
    assert row["false_positive_excess_t2"] == 1
    # a blurred step edge exceeds 3 sigma but is no bump: on a 2 mm grid (top-hat cube 7 voxels) bright tissue
    # at x >= 12 (10 voxels deep, wider than the cube) spreads into x = 11
    edge_gt = {c: v.copy() for c, v in gt.items()}
    edge_gt["t2"][12:22, 2:22, 12:22] += 0.4
    blurred = {c: v.copy() for c, v in edge_gt.items()}
    blurred["t2"][11, 2:22, 12:22] += 0.2
    fp_keys = {"voxel_mm3": 8.0, "lr_noise_sd": {"t1": 0.01, "t2": 0.01}}
    edge = lesion_fidelity_row(edge_gt, blurred, lab, mask, **fp_keys)
    assert edge["false_positive_excess_t2"] == 1 and edge["false_positives_t2"] == 0
    painted = {c: v.copy() for c, v in blurred.items()}
    painted["t2"][14:16, 14:16, 4:6] += 0.3  # the same painted bump beside it is still counted
    assert lesion_fidelity_row(edge_gt, painted, lab, mask, **fp_keys)["false_positives_t2"] == 1
    # a blob smaller than the smallest lesion the generator makes is not counted
    assert min_blob_voxels(1.0) == math.ceil(SMALLEST_LESION_MM3) == 5 and min_blob_voxels(8.0) == 1
    tiny = {c: v.copy() for c, v in gt.items()}
    tiny["t2"][12:14, 15:17, 8] += 0.3  # 4 voxels of 1 mm^3 < 4.19 mm^3
    assert lesion_fidelity_row(gt, tiny, lab, mask, **geo)["false_positives_t2"] == 0


def test_within_slab_part_against_the_pseudo_inverse_by_hand():
    """On the natural HR grid the resampling is the identity: w = (I - D^+ D) x along the thick axis."""
    gt, lab, mask = _world()
    lr, hr = _lr_scans(gt, axis=1, k=3.0, noise=0.0)
    grid = TargetGrid(SHAPE, hr)
    d = slice_profile_matrix(SHAPE[1], 3.0).numpy()
    null = np.eye(SHAPE[1]) - np.linalg.pinv(d) @ d
    w = within_slab_part(torch.as_tensor(gt["t2"], dtype=torch.float32), lr["t2"].shape, lr["t2"].affine, grid)
    hand = np.einsum("ij,xjz->xiz", null, gt["t2"])
    np.testing.assert_allclose(w.numpy(), hand, atol=2e-5)
    measured = np.einsum("ij,xjz->xiz", np.linalg.pinv(d) @ d, gt["t2"])  # A^+ A x: no within-slab part
    w2 = within_slab_part(torch.as_tensor(measured, dtype=torch.float32), lr["t2"].shape, lr["t2"].affine, grid)
    assert float(w2.abs().max()) < 1e-4
    geo = lesion_geometry(lr, hr)
    row = lesion_fidelity_row(gt, {"t1": gt["t1"], "t2": measured}, lab, mask, **geo)
    rec_gt = lesion_records(gt, gt, lab, mask)
    gc = next(r["gt_contrast_t2"] for r in rec_gt if r["label"] == T2A)
    ring = _ring(lab, T2A, mask)
    hand_gt = (hand[lab == T2A].mean() - hand[ring].mean()) / gc
    assert 0.05 < hand_gt and row["within_slab_t2"] == pytest.approx(0.0, abs=1e-3)  # measured part only
    recs = lesion_records(gt, gt, lab, mask, within={"t2": (hand, hand)})
    assert next(r for r in recs if r["label"] == T2A)["within_slab_gt_t2"] == pytest.approx(hand_gt)
    assert row["within_slab_gt_t2_slab"] == pytest.approx(row["within_slab_gt_t2"])  # 3-voxel cubes, 3 mm slabs


def test_extent_across_the_slabs_bins_an_elongated_lesion():
    gt, lab, mask = _world()
    lab[10:13, 3:21, 11:14] = LESION_T2_ONLY * LESION_CLASS_STRIDE + 4  # 18 voxels long along y (the thick axis)
    gt["t2"][lab == LESION_T2_ONLY * LESION_CLASS_STRIDE + 4] += 0.3
    lr, hr = _lr_scans(gt, axis=1, k=6.0, noise=0.0)
    geo = lesion_geometry(lr, hr)
    assert geo["slab_mm"]["t2"] == 6.0 and np.allclose(geo["thick_dir"]["t2"], [0, 1, 0])
    recs = {r["label"]: r for r in lesion_records(gt, gt, lab, mask, geo["voxel_mm3"], geo["slab_mm"],
                                                  geo["thick_dir"], geo["hr_affine"])}
    assert recs[LESION_T2_ONLY * LESION_CLASS_STRIDE + 4]["slabs_t2"] == pytest.approx(18 / 6)  # 3 slabs across
    assert recs[T2A]["slabs_t2"] == pytest.approx(3 / 6)
    row = lesion_fidelity_row(gt, gt, lab, mask, **geo)
    assert row["n_lesions_t2_small"] == 2 and row["n_lesions_t2_large"] == 1 and row["n_lesions_t2_slab"] == 0


def test_counterfactual_imprint_by_hand_and_zero_for_the_truth():
    gt, lab, mask = _world()
    without = {c: v.copy() for c, v in gt.items()}
    without["t2"][(lab == T2A) | (lab == T2B)] -= 0.3  # the render without the T2w-only lesions
    out_with = {c: v.copy() for c, v in gt.items()}
    out_with["t1"][lab == T2A] += 0.03  # the method leaks lesion A into T1w
    row = counterfactual_imprint_row(gt, out_with, without, lab, mask, "t2")
    assert row["imprint_cf_t1"] == pytest.approx((0.03 / 0.3 + 0.0) / 2) and row["n_imprint_cf_t1"] == 2
    assert row["imprint_cf_signed_t1"] == pytest.approx(0.05)
    assert counterfactual_imprint_row(gt, gt, without, lab, mask, "t2")["imprint_cf_t1"] == 0.0  # the truth: 0
    t1 = counterfactual_imprint_row(gt, gt, gt, lab, mask, "t1")
    assert t1["imprint_cf_t2"] == 0.0 and t1["n_imprint_cf_t2"] == 1


def test_generator_per_class_switch_gives_white_matter_signal_to_that_class_only():
    physics = draw_physics(np.random.default_rng(0))
    eye = np.eye(3)
    tissue = (physics.tissues["wm"][0] * 1.2, physics.tissues["wm"][1] * 2.0, 0.7, physics.tissues["wm"][3])
    made = [synth_lesions.Lesion(k, np.zeros(3), np.ones(3), eye, tissue)
            for k in (LESION_T2_ONLY, LESION_T1_ONLY, LESION_BOTH)]
    plain = synth_lesions.lesion_signals(made, "t2", physics)
    with synth_lesions.lesion_classes_off({LESION_T2_ONLY}):
        off = synth_lesions.lesion_signals(made, "t2", physics)
    wm = synth_lesions.signal("t2", physics.sequences["t2"], *physics.tissues["wm"])
    assert off[1] == pytest.approx(wm) and plain[1] != pytest.approx(wm)
    np.testing.assert_array_equal(off[2:], plain[2:])
    np.testing.assert_array_equal(synth_lesions.lesion_signals(made, "t2", physics), plain)  # switch restored
    assert SMALLEST_LESION_MM3 == pytest.approx(4 / 3 * math.pi * 1.0**3)  # the generator's 1 mm sphere
