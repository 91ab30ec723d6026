"""Lesion fidelity by lesion size relative to the slab thickness: binning on lesions of known sizes."""

import math

import numpy as np
import pytest
import torch

from nexus_monai.geometry import make_affine
from nexus_monai.keys import LESION_BOTH, LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY
from nexus_monai.metrics import subject_metric_row
from nexus_monai.metrics.lesion import (
    LESION_PROTOCOL,
    SIZE_BINS,
    lesion_fidelity_row,
    lesion_geometry,
    lesion_records,
    size_bin,
    size_columns,
)

SHAPE = (56, 40, 40)
SLAB = {"t1": 2.0, "t2": 4.0}  # mm, on a 1 mm HR grid


def _ball(center, radius):
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


# (class, instance, centre, radius in voxels, factor the prediction keeps of the GT contrast)
LESIONS = [
    (LESION_T2_ONLY, 1, (8, 8, 8), 1, 0.2),      # 7 voxels: d = 2.37 mm = 0.59 T2w slab -> small
    (LESION_T2_ONLY, 2, (20, 8, 8), 2, 0.6),     # 33 voxels: d = 3.98 mm = 0.99 slab -> slab
    (LESION_T2_ONLY, 3, (36, 12, 12), 4, 1.0),   # 257 voxels: d = 7.89 mm = 1.97 slab -> large
    (LESION_T2_ONLY, 4, (36, 28, 28), 4, 0.8),   # large too: the bin averages 1.0 and 0.8
    (LESION_T1_ONLY, 1, (8, 30, 30), 0, 0.3),    # 1 voxel: d = 1.24 mm = 0.62 T1w slab -> small
    (LESION_T1_ONLY, 2, (20, 30, 30), 1, 0.7),   # 7 voxels: d = 2.37 mm = 1.19 slab -> slab
    (LESION_BOTH, 1, (48, 20, 20), 3, 0.5),      # 123 voxels: d = 6.17 mm: 3.1 T1w slabs, 1.5 T2w slabs
]


def _world():
    """Brain = the whole box but a 2-voxel border; T2w-only lesions +0.3 on T2w, T1w-only -0.2 on T1w."""
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    lab = np.zeros(SHAPE, np.int32)
    gt = {"t1": np.where(mask, 0.5, 0.0), "t2": np.where(mask, 0.6, 0.0)}
    pred = {c: v.copy() for c, v in gt.items()}
    step = {LESION_T2_ONLY: {"t2": 0.3}, LESION_T1_ONLY: {"t1": -0.2}, LESION_BOTH: {"t1": 0.25, "t2": 0.15}}
    for cls, inst, centre, radius, factor in LESIONS:
        les = _ball(centre, radius)
        lab[les] = cls * LESION_CLASS_STRIDE + inst
        for c, delta in step[cls].items():
            gt[c][les] += delta
            pred[c][les] += factor * delta  # ring stays at the background: recovered = factor exactly
    return gt, pred, lab, mask


def _expected_bin(voxels: int, voxel_mm3: float, slab: float) -> str:
    """Reference binning written out by hand (independent of the module's helpers)."""
    d = (6 * voxels * voxel_mm3 / math.pi) ** (1 / 3)
    r = d / slab
    return "small" if r < 0.75 else ("slab" if r < 1.5 else "large")


def test_size_bins_are_half_open_and_documented():
    assert [b[0] for b in SIZE_BINS] == ["small", "slab", "large"]
    assert size_bin(0.0) == "small" and size_bin(0.7499) == "small" and size_bin(0.75) == "slab"
    assert size_bin(1.4999) == "slab" and size_bin(1.5) == "large" and size_bin(40.0) == "large"
    assert size_bin(math.nan) is None
    assert "extent across the slabs" in LESION_PROTOCOL and "d < 0.75 slab" in LESION_PROTOCOL
    assert "0.75 ≤ d < 1.5 slab" in LESION_PROTOCOL and "d ≥ 1.5 slab" in LESION_PROTOCOL


def test_records_carry_the_equivalent_sphere_diameter_in_slabs():
    gt, pred, lab, mask = _world()
    recs = {r["label"]: r for r in lesion_records(gt, pred, lab, mask, voxel_mm3=1.0, slab_mm=SLAB)}
    for cls, inst, *_ in LESIONS:
        value = cls * LESION_CLASS_STRIDE + inst
        n = int((lab == value).sum())
        d = (6 * n / math.pi) ** (1 / 3)
        assert recs[value]["diameter_mm"] == pytest.approx(d)
        for c in ("t1", "t2"):
            assert recs[value][f"slabs_{c}"] == pytest.approx(d / SLAB[c])
    assert (lab == 1001).sum() == 7 and (lab == 1003).sum() == 257  # the sizes the comments above state
    assert "diameter_mm" not in lesion_records(gt, pred, lab, mask)[0]  # no geometry: no size


def test_binned_contrast_and_kept_on_lesions_of_known_size():
    gt, pred, lab, mask = _world()
    row = lesion_fidelity_row(gt, pred, lab, mask, voxel_mm3=1.0, slab_mm=SLAB)
    assert set(size_columns()) <= set(row)
    # what the hand-made world puts in each bin (the expected bin from the voxel counts, by hand)
    expected: dict = {}
    for cls, inst, _, _, factor in LESIONS:
        n = int((lab == cls * LESION_CLASS_STRIDE + inst).sum())
        for c in ("t1", "t2"):
            if cls == LESION_BOTH or (cls == LESION_T2_ONLY) == (c == "t2"):
                part = "_both" if cls == LESION_BOTH else ""
                expected.setdefault((part, c, _expected_bin(n, 1.0, SLAB[c])), []).append(factor)
    assert expected[("", "t2", "small")] == [0.2] and expected[("", "t2", "large")] == [1.0, 0.8]
    assert expected[("_both", "t1", "large")] == [0.5] and expected[("_both", "t2", "large")] == [0.5]
    for part in ("", "_both"):
        for c in ("t1", "t2"):
            for name, _, _ in SIZE_BINS:
                factors = expected.get((part, c, name), [])
                assert row[f"n_lesions{part}_{c}_{name}"] == len(factors)
                if factors:
                    assert row[f"lesion_contrast{part}_{c}_{name}"] == pytest.approx(np.mean(factors))
                    assert row[f"lesion_kept{part}_{c}_{name}"] == pytest.approx(np.mean([f >= 0.5 for f in factors]))
                else:
                    assert math.isnan(row[f"lesion_contrast{part}_{c}_{name}"])
    # the bins partition the lesions: counts add up to the overall count, the overall columns are unchanged
    plain = lesion_fidelity_row(gt, pred, lab, mask)
    assert not set(size_columns()) & set(plain)
    for k, v in plain.items():
        assert row[k] == pytest.approx(v, nan_ok=True), k
    for c in ("t1", "t2"):
        assert sum(row[f"n_lesions_{c}_{n}"] for n, _, _ in SIZE_BINS) == plain[f"n_lesions_{c}"]


def test_anisotropic_voxels_count_in_the_diameter():
    """The same voxels at 1 x 1 x 2 mm are twice the volume: d grows by 2^(1/3) and can change bin."""
    gt, pred, lab, mask = _world()
    row1 = lesion_fidelity_row(gt, pred, lab, mask, voxel_mm3=1.0, slab_mm={"t1": 2.0, "t2": 3.0})
    row2 = lesion_fidelity_row(gt, pred, lab, mask, voxel_mm3=2.0, slab_mm={"t1": 2.0, "t2": 3.0})
    # T2w lesion 1 (7 voxels): d = 2.37 mm -> 0.79 slabs of 3 mm, x 2^(1/3) -> 1.00: slab both times;
    # T2w lesion 2 (33 voxels): d = 3.98 mm -> 1.33 slabs (slab), x 2^(1/3) -> 1.67 (large)
    assert row1["n_lesions_t2_slab"] == 2 and row1["n_lesions_t2_large"] == 2
    assert row2["n_lesions_t2_slab"] == 1 and row2["n_lesions_t2_large"] == 3
    assert row2["lesion_contrast_t2_slab"] == pytest.approx(0.2)
    assert row1["lesion_contrast_t2_slab"] == pytest.approx(0.4)


def test_geometry_from_affines_and_bad_geometry():
    hr = make_affine((1.0, 1.0, 2.0), (0, 0, 0))
    lr = {"t1": make_affine((1.0, 1.0, 4.0), (0, 0, 1)), "t2": make_affine((1.0, 4.0, 2.0), (0, 1.5, 0))}
    geo = lesion_geometry(lr, hr)
    assert geo["voxel_mm3"] == pytest.approx(2.0) and geo["slab_mm"] == {"t1": 4.0, "t2": 4.0}
    gt, pred, lab, mask = _world()
    with pytest.raises(ValueError, match="slab_mm needs"):
        lesion_fidelity_row(gt, pred, lab, mask, voxel_mm3=1.0, slab_mm={"t2": 4.0})
    with pytest.raises(ValueError, match="must be > 0"):
        lesion_fidelity_row(gt, pred, lab, mask, voxel_mm3=1.0, slab_mm={"t1": 0.0, "t2": 4.0})


def test_subject_row_passes_the_geometry_through():
    gt, pred, lab, mask = _world()
    raw_gt = {c: torch.as_tensor(v * 1000.0) for c, v in gt.items()}  # raw units: the row normalises
    raw_pred = {c: torch.as_tensor(v * 1000.0) for c, v in pred.items()}
    geo = {"voxel_mm3": 1.0, "slab_mm": SLAB}
    row = subject_metric_row(raw_gt, raw_pred, mask, lpips=False, lesions=lab, lesion_geometry=geo)
    assert row["lesion_contrast_t2_small"] == pytest.approx(0.2) and row["n_lesions_t1_slab"] == 1
    assert "lesion_contrast_t2_small" not in subject_metric_row(raw_gt, raw_pred, mask, lpips=False, lesions=lab)
