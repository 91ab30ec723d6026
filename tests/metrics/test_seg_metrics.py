"""BraTS regions, Dice and HD95 (mm) against hand-computed values and an independent scipy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from nexus_monai.metrics import EMPTY_POLICY, REGIONS, brats_regions, dice_hd95, summarise_segmentation
from nexus_monai.metrics.segmentation import fov_diagonal_mm

SHAPE = (24, 22, 14)
ANISO = (1.0, 1.0, 3.0)


# ---------------------------------------------------------------- independent reference
def _surface(mask: np.ndarray) -> np.ndarray:
    """Inner boundary: foreground voxels with a 6-neighbour outside the mask (or the image)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _ref_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """max of the two directed 95th percentiles of surface-to-surface distances (mm), via EDT."""
    sp, sg = _surface(pred), _surface(gt)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def _ellipsoid(centre, radii, shape=SHAPE, spacing=ANISO):
    """Ellipsoid with radii in mm on an anisotropic grid."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((g - c * s) / r) ** 2 for g, c, r, s in zip(grids, centre, radii, spacing)) <= 1.0


def _box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ---------------------------------------------------------------- regions
def test_brats_regions_on_hand_made_label_map():
    lab = np.zeros((4, 3, 2), dtype=np.int16)
    lab[0, 0, 0] = 1  # necrotic core: TC, WT
    lab[1, 1, 1] = 2  # edema only: WT
    lab[2, 2, 0] = 4  # enhancing only: TC, WT, ET
    lab[3, 0, 1] = 2
    expect = {"TC": {(0, 0, 0), (2, 2, 0)}, "WT": {(0, 0, 0), (1, 1, 1), (2, 2, 0), (3, 0, 1)},
              "ET": {(2, 2, 0)}}
    assert REGIONS == ("TC", "WT", "ET")
    for inp in (lab, lab[None], torch.from_numpy(lab), torch.from_numpy(lab)[None], lab.astype(np.float32)):
        out = brats_regions(inp)
        assert tuple(out.shape) == (3, 4, 3, 2)
        arr = out.numpy() if isinstance(out, torch.Tensor) else out
        assert arr.dtype == bool
        assert isinstance(out, torch.Tensor) == isinstance(inp, torch.Tensor)
        for c, r in enumerate(REGIONS):
            assert {tuple(int(i) for i in v) for v in np.argwhere(arr[c])} == expect[r], r


def test_brats_regions_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="labels outside"):
        brats_regions(np.array([[[0, 3]]]))
    with pytest.raises(ValueError, match="shape"):
        brats_regions(np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        brats_regions(np.zeros((3, 3)))


# ---------------------------------------------------------------- Dice
def test_dice_on_overlapping_boxes_matches_hand_computation():
    a = _box((2, 2, 2), (10, 10, 6))      # 8*8*4 = 256
    b = _box((5, 4, 3), (13, 12, 8))      # 8*8*5 = 320, overlap 5*6*3 = 90
    c = _box((3, 3, 3), (7, 7, 7))        # 4*4*4 = 64
    d = _box((3, 3, 5), (7, 7, 9))        # 64, overlap 4*4*2 = 32
    pred = np.stack([a, c, a])
    gt = np.stack([b, d, a])
    row = dice_hd95(pred, gt, ANISO)
    assert row["dice_TC"] == pytest.approx(2 * 90 / (256 + 320), abs=1e-6)  # 0.3125
    assert row["dice_WT"] == pytest.approx(2 * 32 / (64 + 64), abs=1e-6)    # 0.5
    assert row["dice_ET"] == pytest.approx(1.0, abs=1e-6)
    assert row["hd95_ET"] == pytest.approx(0.0, abs=1e-6)
    assert row["dice_mean"] == pytest.approx((0.3125 + 0.5 + 1.0) / 3, abs=1e-6)
    assert row["empty_cases"] == 0 and row["empty_detail"] == ""
    # torch 0/1 float inputs give the same numbers
    row_t = dice_hd95(torch.from_numpy(pred).float(), torch.from_numpy(gt).to(torch.uint8), ANISO)
    for k in ("dice_TC", "dice_WT", "hd95_TC", "hd95_WT"):
        assert row_t[k] == pytest.approx(row[k], abs=1e-6)


# ---------------------------------------------------------------- HD95
def test_hd95_single_voxels_uses_spacing():
    p = _box((5, 5, 5), (6, 6, 6))
    g = _box((5, 5, 7), (6, 6, 8))  # 2 voxels apart along z: 6 mm at 3 mm slices, 2 voxels if ignored
    row = dice_hd95(np.stack([p] * 3), np.stack([g] * 3), ANISO)
    assert row["hd95_TC"] == pytest.approx(6.0, abs=1e-5)
    assert dice_hd95(np.stack([p] * 3), np.stack([g] * 3), (1, 1, 1))["hd95_TC"] == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("spacing", [ANISO, (0.8, 1.3, 2.5)])
def test_hd95_matches_scipy_reference_on_anisotropic_spacing(spacing):
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(3):
        cp = rng.uniform([9, 9, 5], [14, 13, 8])  # centre in voxels, radii in mm
        cg = cp + rng.uniform(-1, 1, size=3) * [1, 1, 0] + [0, 0, rng.choice([-1, 1]) * rng.uniform(1, 2)]
        rp = rng.uniform([5, 4, 9], [8, 7, 15])
        rg = rp * rng.uniform(0.8, 1.2, size=3)
        p, g = _ellipsoid(cp, rp, spacing=spacing), _ellipsoid(cg, rg, spacing=spacing)
        p |= _box((1, 1, 10), (3, 4, 12))  # a second, distant component in the prediction
        preds.append(p)
        gts.append(g)
    pred, gt = np.stack(preds), np.stack(gts)
    row = dice_hd95(pred, gt, spacing)
    for c, r in enumerate(REGIONS):
        ref = _ref_hd95(pred[c], gt[c], spacing)
        iso = _ref_hd95(pred[c], gt[c], (1.0, 1.0, 1.0))
        assert abs(ref - iso) > 0.5, "test case must be sensitive to the spacing"
        assert row[f"hd95_{r}"] == pytest.approx(ref, abs=1e-4), r
        inter = np.logical_and(pred[c], gt[c]).sum()
        assert row[f"dice_{r}"] == pytest.approx(2 * inter / (pred[c].sum() + gt[c].sum()), abs=1e-6)
    assert row["hd95_mean"] == pytest.approx(np.mean([row[f"hd95_{r}"] for r in REGIONS]))


# ---------------------------------------------------------------- empty-mask policy
def test_empty_policy_both_pred_and_gt_empty():
    ref = _box((4, 4, 4), (9, 9, 7))
    ref_n = int(ref.sum())
    empty = np.zeros(SHAPE, dtype=bool)
    small = _box((10, 10, 2), (12, 13, 4))
    pred = np.stack([empty, empty, small])   # TC: both empty; WT: pred empty; ET: GT empty
    gt = np.stack([empty, ref, empty])
    row = dice_hd95(pred, gt, ANISO)
    diag = math.sqrt((24 * 1.0) ** 2 + (22 * 1.0) ** 2 + (14 * 3.0) ** 2)
    assert fov_diagonal_mm(SHAPE, ANISO) == pytest.approx(diag)
    assert (row["dice_TC"], row["hd95_TC"]) == (1.0, 0.0)
    assert (row["dice_WT"], row["hd95_WT"]) == (0.0, pytest.approx(diag))
    assert (row["dice_ET"], row["hd95_ET"]) == (0.0, pytest.approx(diag))
    assert row["empty_cases"] == 2
    assert "TC: both empty" in row["empty_detail"]
    assert f"WT: prediction empty, GT {ref_n} voxels" in row["empty_detail"]
    assert f"ET: GT empty, prediction {int(small.sum())} voxels" in row["empty_detail"]
    assert all(math.isfinite(v) for k, v in row.items() if k.startswith(("dice", "hd95")))
    assert row["dice_mean"] == pytest.approx(1 / 3) and row["hd95_mean"] == pytest.approx(2 * diag / 3)
    assert "both empty" in EMPTY_POLICY and "field of view" in EMPTY_POLICY

    summary = summarise_segmentation([row, dice_hd95(np.stack([ref] * 3), np.stack([ref] * 3), ANISO)])
    assert summary["empty_cases"] == 2 and summary["n_subjects"] == 2
    assert summary["dice_WT"] == pytest.approx(0.5)
    assert summary["hd95_WT"] == pytest.approx(diag / 2)
    assert summary["dice_WT_std"] == pytest.approx(0.5)
    assert summary["dice_mean"] == pytest.approx((1 / 3 + 1) / 2)


def test_bad_inputs_raise():
    a = np.zeros((3, *SHAPE), dtype=bool)
    with pytest.raises(ValueError, match="differs"):
        dice_hd95(a, np.zeros((3, 24, 22, 13), dtype=bool), ANISO)
    with pytest.raises(ValueError, match=r"\(3, X, Y, Z\)"):
        dice_hd95(a[:2], a[:2], ANISO)
    with pytest.raises(ValueError, match="binary"):
        dice_hd95(np.full(a.shape, 4, dtype=np.uint8), a, ANISO)
    with pytest.raises(ValueError, match="spacing"):
        dice_hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        dice_hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="no rows"):
        summarise_segmentation([])
