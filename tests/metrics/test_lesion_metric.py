"""Lesion fidelity metric on hand-built volumes (recovered contrast, detection, false imprint, encoding)."""

import math

import numpy as np
import pytest
from scipy import ndimage

from nexus_monai.keys import LESION_BOTH, LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY
from nexus_monai.metrics import metric_protocol_text, subject_metric_row
from nexus_monai.metrics.lesion import (
    KEPT_THRESHOLD,
    check_lesion_map,
    lesion_fidelity_row,
    lesion_records,
    lesion_ring,
)

SHAPE = (28, 28, 28)
T2_LESION = LESION_T2_ONLY * LESION_CLASS_STRIDE + 1
T1_LESION = LESION_T1_ONLY * LESION_CLASS_STRIDE + 7
BOTH_LESION = LESION_BOTH * LESION_CLASS_STRIDE + 2


def _sphere(center, radius, shape=SHAPE):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def _world(noise: float = 0.0, seed: int = 0):
    """A cubic brain with three lesions: T2w-only (+0.3 on T2w), T1w-only (-0.2 on T1w), both."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[2:26, 2:26, 2:26] = True
    lab = np.zeros(SHAPE, np.int32)
    lab[_sphere((8, 8, 8), 2.5)] = T2_LESION
    lab[_sphere((19, 9, 14), 2)] = T1_LESION
    lab[_sphere((14, 19, 19), 2)] = BOTH_LESION
    t1 = np.where(mask, 0.5 + noise * rng.standard_normal(SHAPE), 0.0)
    t2 = np.where(mask, 0.6 + noise * rng.standard_normal(SHAPE), 0.0)
    t2[lab == T2_LESION] += 0.3
    t1[lab == T1_LESION] -= 0.2
    t1[lab == BOTH_LESION] += 0.25
    t2[lab == BOTH_LESION] += 0.15
    return {"t1": t1, "t2": t2}, lab, mask


def _ring_reference(lab, value, mask):
    """Independent ring: voxels within Euclidean distance 2 of the lesion (distance transform)."""
    lesion = lab == value
    dist = ndimage.distance_transform_edt(~lesion)
    return (dist <= 2) & ~lesion & mask & (lab == 0)


def _scale_contrast(vol, lab, value, mask, factor):
    """``vol`` with the lesion's contrast over its ring mean multiplied by ``factor``."""
    out = vol.copy()
    ring_mean = vol[_ring_reference(lab, value, mask)].mean()
    les = lab == value
    out[les] = ring_mean + factor * (vol[les] - ring_mean)
    return out


def test_ring_matches_distance_transform_and_excludes_lesions_and_outside():
    gt, lab, mask = _world()
    mask[:, :, :8] = False  # cut the T2w lesion by the mask: the ring must stay inside it
    for value in (T2_LESION, T1_LESION, BOTH_LESION):
        ring = lesion_ring(lab == value, mask, lab != 0)
        np.testing.assert_array_equal(ring, _ring_reference(lab, value, mask))
        assert not (ring & (lab != 0)).any() and not (ring & ~mask).any()


@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("factor", [1.0, 0.0, 0.5, -0.3, 1.4])
def test_recovered_contrast_copy_erase_halve(noise, factor):
    """Copied exactly -> 1, erased (set to the ring mean) -> 0, halved -> 0.5, on every lesion and contrast."""
    gt, lab, mask = _world(noise)
    own = {"t1": T1_LESION, "t2": T2_LESION}
    pred = {c: _scale_contrast(_scale_contrast(gt[c], lab, own[c], mask, factor), lab, BOTH_LESION, mask, factor)
            for c in ("t1", "t2")}
    recs = {r["label"]: r for r in lesion_records(gt, pred, lab, mask)}
    assert recs[T2_LESION]["recovered_t2"] == pytest.approx(factor, abs=1e-9)
    assert recs[T1_LESION]["recovered_t1"] == pytest.approx(factor, abs=1e-9)
    assert recs[BOTH_LESION]["recovered_t1"] == pytest.approx(factor, abs=1e-9)
    assert recs[BOTH_LESION]["recovered_t2"] == pytest.approx(factor, abs=1e-9)
    assert "recovered_t1" not in recs[T2_LESION] and "recovered_t2" not in recs[T1_LESION]
    row = lesion_fidelity_row(gt, pred, lab, mask)
    for key in ("lesion_contrast_t2", "lesion_contrast_t1", "lesion_contrast_both_t1", "lesion_contrast_both_t2"):
        assert row[key] == pytest.approx(min(factor, 1.0), abs=1e-9)  # v2: capped at 1
    for key in ("lesion_contrast_uncapped_t2", "lesion_contrast_uncapped_t1"):
        assert row[key] == pytest.approx(factor, abs=1e-9)  # v1 kept beside
    assert row["lesion_kept_t2"] == float(factor >= KEPT_THRESHOLD)
    assert row["n_lesions_t2"] == row["n_lesions_t1"] == row["n_lesions_both_t1"] == 1
    assert row["n_lesions_excluded"] == 0


def test_contrast_against_hand_computed_means():
    gt, lab, mask = _world(noise=0.05, seed=3)
    pred = {c: gt[c] * 0.9 + 0.02 for c in gt}
    rec = next(r for r in lesion_records(gt, pred, lab, mask) if r["label"] == T2_LESION)
    les, ring = lab == T2_LESION, _ring_reference(lab, T2_LESION, mask)
    ref_gt = gt["t2"][les].mean() - gt["t2"][ring].mean()
    ref_out = pred["t2"][les].mean() - pred["t2"][ring].mean()
    assert rec["gt_contrast_t2"] == pytest.approx(ref_gt, rel=1e-12)
    assert rec["recovered_t2"] == pytest.approx(ref_out / ref_gt, rel=1e-12)  # = 0.9
    assert rec["voxels"] == les.sum() and rec["ring_voxels"] == ring.sum()


def test_detection_threshold_and_kept_fraction():
    gt, lab, mask = _world()
    lab2, second = lab.copy(), LESION_T2_ONLY * LESION_CLASS_STRIDE + 2
    lab2[_sphere((19, 20, 6), 2)] = second
    gt["t2"][lab2 == second] += 0.3
    just_kept = _scale_contrast(gt["t2"], lab2, T2_LESION, mask, KEPT_THRESHOLD)
    pred = {"t1": gt["t1"], "t2": _scale_contrast(just_kept, lab2, second, mask, 0.49)}
    recs = {r["label"]: r for r in lesion_records(gt, pred, lab2, mask)}
    assert recs[T2_LESION]["kept_t2"] is True
    assert recs[second]["kept_t2"] is False
    row = lesion_fidelity_row(gt, pred, lab2, mask)
    assert row["lesion_kept_t2"] == 0.5 and row["n_lesions_t2"] == 2
    assert row["lesion_contrast_t2"] == pytest.approx((0.5 + 0.49) / 2)


def test_false_imprint_on_the_other_contrast():
    gt, lab, mask = _world()
    pred = {c: gt[c].copy() for c in gt}
    pred["t1"][lab == T2_LESION] += 0.08  # the T2w-only lesion leaks onto T1w output
    pred["t2"][lab == T1_LESION] -= 0.05  # the T1w-only lesion leaks onto T2w output (sign ignored)
    gt["t1"][lab == T2_LESION] += 0.01   # and the ground truth itself shows a faint trace there
    row = lesion_fidelity_row(gt, pred, lab, mask)
    assert row["imprint_t1"] == pytest.approx(0.08, abs=1e-12)
    assert row["imprint_t1_gt"] == pytest.approx(0.01, abs=1e-12)
    assert row["imprint_t2"] == pytest.approx(0.05, abs=1e-12)
    assert row["imprint_t2_gt"] == pytest.approx(0.0, abs=1e-12)
    # lesions visible on both contrasts have no "other" contrast: no imprint recorded
    assert all("imprint" not in r for r in lesion_records(gt, pred, lab, mask) if r["class"] == LESION_BOTH)


def test_degenerate_lesions_are_reported_and_left_out():
    gt, lab, mask = _world()
    flat = LESION_T2_ONLY * LESION_CLASS_STRIDE + 5  # labelled but with no contrast in the ground truth
    lab[_sphere((19, 20, 6), 2)] = flat
    outside = LESION_T2_ONLY * LESION_CLASS_STRIDE + 6  # entirely outside the brain mask
    lab[0:2, 0:2, 0:2] = outside
    cut = LESION_T1_ONLY * LESION_CLASS_STRIDE + 9  # half outside: scored on its inside part
    lab[_sphere((3, 20, 20), 2)] = cut
    gt["t1"][(lab == cut) & mask] -= 0.2
    recs = {r["label"]: r for r in lesion_records(gt, gt, lab, mask)}
    assert recs[flat]["status"] == "no gt contrast on t2" and math.isnan(recs[flat]["recovered_t2"])
    assert "imprint" in recs[flat]  # still scored for imprint
    assert recs[outside]["status"] == "outside mask" and recs[outside]["voxels"] == 0
    assert recs[cut]["status"] == "ok" and recs[cut]["recovered_t1"] == pytest.approx(1.0)
    assert 0 < recs[cut]["voxels"] < (lab == cut).sum()
    row = lesion_fidelity_row(gt, gt, lab, mask)
    assert row["n_lesions_excluded"] == 2 and row["n_lesions_t2"] == 1 and row["n_lesions_t1"] == 2
    assert row["lesion_contrast_t2"] == pytest.approx(1.0)
    no_t1 = np.where(lab // LESION_CLASS_STRIDE == LESION_T1_ONLY, 0, lab)
    assert math.isnan(lesion_fidelity_row(gt, gt, no_t1, mask)["lesion_contrast_t1"])


@pytest.mark.parametrize("bad, message", [
    (4001, "break the encoding"),   # class 4 does not exist
    (2000, "break the encoding"),   # instance 0
    (-1001, "break the encoding"),  # negative
    (1000.5, "non-integer"),
])
def test_encoding_errors(bad, message):
    _, lab, mask = _world()
    lab = lab.astype(np.float64)
    lab[0, 0, 0] = bad
    with pytest.raises(ValueError, match=message):
        check_lesion_map(lab)


def test_shape_mismatch_and_valid_map():
    _, lab, _ = _world()
    with pytest.raises(ValueError, match="differs from image shape"):
        check_lesion_map(lab[:-1], SHAPE)
    assert check_lesion_map(lab[None], SHAPE).dtype == np.int64  # channel-first accepted


def test_subject_row_normalises_and_states_the_definition():
    """Through the protocol: raw intensities x 1000 -> same recovered contrast, imprint in normalised units."""
    gt, lab, mask = _world(noise=0.02, seed=1)
    raw_gt = {c: 1000 * v for c, v in gt.items()}
    raw_pred = {c: v.copy() for c, v in raw_gt.items()}
    raw_pred["t2"] = _scale_contrast(raw_pred["t2"], lab, T2_LESION, mask, 0.5)
    raw_pred["t1"][lab == T2_LESION] += 40.0
    row = subject_metric_row(raw_gt, raw_pred, mask, lpips=False, lesions=lab)
    assert row["lesion_contrast_t2"] == pytest.approx(0.5, abs=1e-9)
    les, ring = lab == T2_LESION, _ring_reference(lab, T2_LESION, mask)
    gt_c = (raw_gt["t1"][les].mean() - raw_gt["t1"][ring].mean()) / row["scale_t1"]
    assert row["imprint_t1_gt"] == pytest.approx(abs(gt_c), rel=1e-9)
    assert row["imprint_t1"] == pytest.approx(abs(gt_c + 40.0 / row["scale_t1"]), rel=1e-9)
    assert "lesion_contrast_t2" not in subject_metric_row(raw_gt, raw_pred, mask, lpips=False)
    text = metric_protocol_text()
    assert "Lesion fidelity" in text and "radius 2 voxels" in text and ">= 0.5" in text
