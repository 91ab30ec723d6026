"""PSNR, SSIM, erosion, scale rule, mutual information and the subject row against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import mutual_info_score

from nexus_monai.metrics import (
    PROTOCOL,
    brain_bbox,
    erode_mask,
    intensity_scale,
    mi_errors,
    mutual_information,
    metric_protocol_text,
    psnr,
    ssim3d,
    subject_metric_row,
)

N = 24


def _grid(n=N):
    return np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij")


def _ellipsoid(n=N):
    x, y, z = _grid(n)
    return ((x - 11.5) ** 2 / 64 + (y - 12) ** 2 / 81 + (z - 12.5) ** 2 / 49) < 1


def _phantom(seed=0, n=N):
    """Brain-like volume: smooth structure inside an ellipsoid, exactly 0 outside."""
    x, y, z = _grid(n)
    rng = np.random.default_rng(seed)
    inside = 300 + 200 * np.sin(x / 3) * np.cos(y / 4) + 50 * z / n + 10 * rng.standard_normal(x.shape)
    return np.where(_ellipsoid(n), inside, 0.0)


# ---------------------------------------------------------------- scale and PSNR

def test_intensity_scale_is_masked_percentile():
    gt, mask = _phantom(), _ellipsoid()
    assert intensity_scale(gt, mask) == pytest.approx(np.percentile(gt[mask], 99.5), rel=1e-12)
    assert intensity_scale(torch.from_numpy(gt)[None], torch.from_numpy(mask)[None], 50) == pytest.approx(
        np.median(gt[mask]), rel=1e-12)
    with pytest.raises(ValueError, match="empty"):
        intensity_scale(gt, np.zeros_like(mask))


def test_psnr_whole_volume_matches_skimage():
    rng = np.random.default_rng(1)
    gt = rng.random((N, N, N))
    pred = gt + 0.05 * rng.standard_normal(gt.shape)
    assert psnr(gt, pred) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=1.0), abs=1e-10)
    assert psnr(gt, pred, data_range=2.0) == pytest.approx(
        peak_signal_noise_ratio(gt, pred, data_range=2.0), abs=1e-10)


def test_psnr_masked_hand_computed():
    mask = _ellipsoid()
    gt = np.zeros((N, N, N))
    pred = np.where(mask, 0.1, 0.5)  # error 0.1 inside the brain, 0.5 outside
    assert psnr(gt, pred, mask) == pytest.approx(20.0, abs=1e-12)  # 10 log10(1 / 0.01)
    frac = mask.mean()
    expected_whole = 10 * math.log10(1 / (0.01 * frac + 0.25 * (1 - frac)))
    assert psnr(gt, pred) == pytest.approx(expected_whole, abs=1e-12)
    assert psnr(gt, gt, mask) == math.inf


def test_inputs_accept_channel_first_torch_and_check_shapes():
    gt, mask = _phantom() / 500, _ellipsoid()
    pred = gt + 0.01
    ref = psnr(gt, pred, mask)
    assert psnr(torch.from_numpy(gt)[None], torch.from_numpy(pred).float()[None], torch.from_numpy(mask)[None]) \
        == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="shape"):
        psnr(gt, pred[:-1])
    with pytest.raises(ValueError, match="shape"):
        psnr(gt[None, None], pred[None, None])


# ---------------------------------------------------------------- erosion and bounding box

@pytest.mark.parametrize("voxels", [1, 2, 3])
def test_erode_mask_is_euclidean_ball(voxels):
    """A voxel survives iff its Euclidean distance to the nearest background voxel (outside the
    array counting as background) exceeds ``voxels``."""
    mask = _ellipsoid()
    mask[3:6, 10:14, 10:14] = True  # a thin appendage that must vanish
    padded = np.pad(mask, voxels + 1)
    dist = ndimage.distance_transform_edt(padded)[(slice(voxels + 1, -voxels - 1),) * 3]
    np.testing.assert_array_equal(erode_mask(mask, voxels), dist > voxels)


def test_erode_box_shrinks_by_radius():
    mask = np.zeros((N, N, N), bool)
    mask[2:20, 4:19, 5:22] = True
    eroded = erode_mask(mask, 3)
    expected = np.zeros_like(mask)
    expected[5:17, 7:16, 8:19] = True
    np.testing.assert_array_equal(eroded, expected)


def test_brain_bbox_with_margin_is_clipped():
    mask = np.zeros((N, N, N), bool)
    mask[2, 10, 20] = mask[8, 15, 21] = True
    assert brain_bbox(mask) == (slice(2, 9), slice(10, 16), slice(20, 22))
    assert brain_bbox(mask, 5) == (slice(0, 14), slice(5, 21), slice(15, 24))


# ---------------------------------------------------------------- SSIM

def _skimage_ssim(gt, pred, mask, sample_cov=False):
    box = brain_bbox(mask, 5)
    return structural_similarity(gt[box], pred[box], data_range=1.0, win_size=11, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=sample_cov)


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.05, 0.2])
def test_ssim3d_matches_skimage_population_covariance(noise):
    """MONAI SSIMMetric (float32, valid filtering) == skimage (float64, Gaussian sigma 1.5 ->
    11-tap window, population covariance, border strip of 5 cropped) on the same crop."""
    mask = _ellipsoid()
    gt = _phantom() / 500
    pred = gt + noise * np.random.default_rng(2).standard_normal(gt.shape)
    assert ssim3d(gt, pred, mask) == pytest.approx(_skimage_ssim(gt, pred, mask), abs=2e-5)


def test_ssim3d_settings_are_population_not_sample_covariance():
    """Low-intensity independent textures make the two covariance conventions differ by ~1e-4,
    while float32 rounding stays < 1e-6: only population covariance matches."""
    mask = _ellipsoid()
    rng = np.random.default_rng(3)
    gt = 0.05 + 0.03 * rng.standard_normal(mask.shape)
    pred = 0.05 + 0.03 * rng.standard_normal(mask.shape)
    ours = ssim3d(gt, pred, mask)
    assert ours == pytest.approx(_skimage_ssim(gt, pred, mask), abs=2e-6)
    assert abs(ours - _skimage_ssim(gt, pred, mask, sample_cov=True)) > 5e-5


def test_ssim3d_uses_only_the_brain_box():
    mask = _ellipsoid()
    gt = _phantom() / 500
    pred = gt.copy()
    box = brain_bbox(mask, 5)
    outside = np.ones_like(mask)
    outside[box] = False
    pred[outside] = 7.0  # garbage outside the crop does not count
    assert ssim3d(gt, pred, mask) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="window"):
        ssim3d(gt, gt, mask, margin=0, win_size=23)


# ---------------------------------------------------------------- mutual information

def _binned(x, bins=32):
    """Independent binning: numpy digitize on linspace edges (max -> last bin)."""
    edges = np.linspace(x.min(), x.max(), bins + 1)
    return np.digitize(x, edges[1:-1])


def test_mi_hand_computed_two_by_two():
    a = np.array([0.0, 0.0, 1.0, 1.0]).reshape(2, 2, 1)
    b = np.array([0.0, 1.0, 1.0, 1.0]).reshape(2, 2, 1)
    # joint p: (0,0)=1/4, (0,1)=1/4, (1,1)=1/2; p_a = (1/2, 1/2), p_b = (1/4, 3/4)
    expected = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    assert mutual_information(a, b, bins=2) == pytest.approx(expected, abs=1e-14)


def test_mi_matches_sklearn_and_is_symmetric():
    rng = np.random.default_rng(4)
    mask = _ellipsoid()
    a = _phantom(5)
    b = np.sqrt(np.abs(a)) + 3 * rng.standard_normal(a.shape)
    ref = mutual_info_score(_binned(a[mask]), _binned(b[mask]))
    assert mutual_information(a, b, mask) == pytest.approx(ref, abs=1e-12)
    assert mutual_information(b, a, mask) == pytest.approx(ref, abs=1e-12)
    ref_all = mutual_info_score(_binned(a.ravel(), 16), _binned(b.ravel(), 16))
    assert mutual_information(a, b, bins=16) == pytest.approx(ref_all, abs=1e-12)


def test_mi_self_is_binned_entropy_and_scale_invariant():
    mask = _ellipsoid()
    a = _phantom(6)
    counts, _ = np.histogram(a[mask], bins=32)
    p = counts[counts > 0] / counts.sum()
    entropy = -np.sum(p * np.log(p))
    assert mutual_information(a, a, mask) == pytest.approx(entropy, abs=1e-12)
    assert mutual_information(a / 437.0, a, mask) == pytest.approx(entropy, abs=1e-12)
    assert mutual_information(np.full(a.shape, 3.0), a, mask) == 0.0


def test_mi_errors_definitions():
    mask = _ellipsoid()
    gt1, gt2 = _phantom(7), np.sqrt(_phantom(8))
    rng = np.random.default_rng(9)
    mi_gt = mutual_info_score(_binned(gt1[mask]), _binned(gt2[mask]))
    # perfect predictions: every error is 0
    zero = {"eps_mi_1": 0, "eps_mi_2": 0, "eps_mi_joint": 0}
    assert mi_errors(gt1, gt2, gt1, gt2, mask) == pytest.approx(zero, abs=1e-12)
    # constant pred1 shares no information: eps_1 = eps_joint = MI(gt1, gt2)
    pred2 = gt2 + 2 * rng.standard_normal(gt2.shape)
    err = mi_errors(gt1, gt2, np.ones_like(gt1), pred2, mask)
    assert err["eps_mi_1"] == pytest.approx(mi_gt, abs=1e-12)
    assert err["eps_mi_joint"] == pytest.approx(mi_gt, abs=1e-12)
    mi_p2_g1 = mutual_info_score(_binned(pred2[mask]), _binned(gt1[mask]))
    assert err["eps_mi_2"] == pytest.approx(abs(mi_p2_g1 - mi_gt), abs=1e-12)


# ---------------------------------------------------------------- subject row

def _subject(seed=0, n=N):
    t1 = _phantom(seed, n)
    t2 = np.where(t1 > 0, 1000.0 - t1, 0.0)
    return {"t1": t1, "t2": t2}


def test_subject_row_scale_rule_prediction_uses_gt_scale():
    """pred = 2 gt: after dividing both by the GT's scale s, MSE = mean((gt/s)^2), so PSNR is known.
    Normalising the prediction by its own percentile would instead give a perfect score."""
    gt = _subject()
    mask = _ellipsoid()
    pred = {c: 2 * v for c, v in gt.items()}
    row = subject_metric_row(gt, pred, mask, lpips=False)
    for c in ("t1", "t2"):
        s = np.percentile(gt[c][mask], 99.5)
        g = gt[c] / s
        assert row[f"scale_{c}"] == pytest.approx(s, rel=1e-12)
        assert row[f"psnr_{c}"] == pytest.approx(-10 * np.log10(np.mean(g[mask] ** 2)), abs=1e-9)
        assert row[f"psnr_volume_{c}"] == pytest.approx(-10 * np.log10(np.mean(g ** 2)), abs=1e-9)
        inner = erode_mask(mask, 3)
        assert row[f"psnr_eroded_{c}"] == pytest.approx(-10 * np.log10(np.mean(g[inner] ** 2)), abs=1e-9)
        assert row[f"ssim_{c}"] < 0.99
        assert math.isnan(row[f"lpips_{c}"])
    # MI ignores a positive rescaling, so a doubled prediction has no MI error
    assert row["eps_mi_t1"] == row["eps_mi_t2"] == row["eps_mi_joint"] == 0.0
    assert row["lpips_status"] == "disabled"


def test_subject_row_keys_default_mask_and_small_volume_lpips():
    gt = _subject(1)
    rng = np.random.default_rng(10)
    pred = {c: v + 20 * rng.standard_normal(v.shape) for c, v in gt.items()}
    row = subject_metric_row(gt, pred, None)  # mask = gt t1 > 0
    explicit = subject_metric_row(gt, pred, gt["t1"] > 0, lpips=False)
    for key in ("psnr_t1", "psnr_eroded_t2", "ssim_t2", "eps_mi_joint"):
        assert row[key] == explicit[key]
    expected = {f"{m}_{c}" for m in ("scale", "psnr", "psnr_eroded", "psnr_volume", "ssim", "lpips")
                for c in ("t1", "t2")} | {"eps_mi_t1", "eps_mi_t2", "eps_mi_joint", "lpips_status"}
    assert set(row) == expected
    assert row["psnr_t1"] < row["psnr_volume_t1"]  # the zero background inflates whole-volume PSNR
    # 24^3 slices are below AlexNet's 31-px minimum: LPIPS is reported unavailable, not computed
    assert math.isnan(row["lpips_t1"]) and row["lpips_status"].startswith("unavailable")


def test_subject_row_other_contrast_names():
    gt = _subject(2)
    gt = {"dir": gt["t1"], "flair": gt["t2"]}
    pred = {c: 1.1 * v for c, v in gt.items()}
    row = subject_metric_row(gt, pred, lpips=False, contrasts=("dir", "flair"))
    assert {"psnr_dir", "psnr_flair", "eps_mi_dir", "eps_mi_flair", "eps_mi_joint"} <= set(row)


def test_metric_protocol_text_names_every_choice():
    for needle in ("99.5th percentile", "eroded by 3", "11x11x11", "sigma 1.5", "v0.1", "three axes",
                   "32x32", "[-1, 1]"):
        assert needle in PROTOCOL
    assert metric_protocol_text().startswith(PROTOCOL)
    assert "\n" not in PROTOCOL
