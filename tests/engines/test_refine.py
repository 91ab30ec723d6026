"""Test-time refinement (``nexus-sr predict --refine``) and the data-consistency guard.

Tiny phantom (16^3, T1w z x 2 / T2w y x 4 by the acquisition transform) and a tiny seeded Nexus-INR
written as a bundle overlay + checkpoint, as in test_serving. The guard is checked against a case
built by hand: an HR volume with a small bright blob, its LR scans, and a "raw output" without
the blob.
"""

import hashlib
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.cli import main
from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.engines.consistency import CONSISTENCY_NAMES, GuardOptions, consistency_guard
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.engines.refine import RefineOptions, check_refine_seconds, lr_consistency_loss, refine_network
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, make_affine
from nexus_monai.transforms import SimulateAnisotropicAcquisition
from nexus_monai.transforms.consistency import AcquisitionModel, lr_residual

from helpers import BUNDLE, TINY_OVERLAY


def _phantom(n=16, seed=0):
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 2.0)
    vol = (vol > 0) * 80.0 + ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.5) * 40 + 100
    vol[:2] = 0
    return vol.astype(np.float32)


def _acquire(hr: MetaTensor) -> dict:
    """Both LR scans as a reader would see them (no acquisition metadata: thick axis from the affine)."""
    out = {}
    for c, (axis, k) in {"t1": ("z", 2), "t2": ("y", 4)}.items():
        lr = SimulateAnisotropicAcquisition(axis, k)(hr)
        out[c] = MetaTensor(lr.as_tensor().clone(), affine=lr.affine.clone())
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine_case")
    hr = MetaTensor(torch.as_tensor(_phantom())[None], affine=make_affine((1.0, 1.0, 1.0), (-8.0, -8.0, -8.0)))
    lr = _acquire(hr)
    for c in lr:
        save_volume(lr[c], d / f"{c}_lr.nii.gz")
    (d / "tiny.yaml").write_text(TINY_OVERLAY.replace("decoder_hidden: 8", "decoder_hidden: 32"))  # learns within 60 steps
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.yaml"), str(d / "tiny.yaml")])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save({"model": net.state_dict()}, d / "w.pt")
    net.eval()
    return {"dir": d, "hr": hr, "lr": {c: load_volume(d / f"{c}_lr.nii.gz") for c in lr}, "net": net,
            "files": {c: d / f"{c}_lr.nii.gz" for c in lr}}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refinement_lowers_the_lr_consistency_loss_and_leaves_the_cohort_network_alone(case):
    net, lr = case["net"], case["lr"]
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    before = lr_consistency_loss(net, lr["t1"], lr["t2"])
    opts = RefineOptions(max_seconds=600, max_iterations=60, learning_rate=3e-3, batch_size=512, eval_every=10)
    result = refine_network(net, lr["t1"], lr["t2"], opts)
    after = lr_consistency_loss(result.network, lr["t1"], lr["t2"])
    assert result.log["iterations"] == 60 and result.log["stop_reason"] == "max_iterations"
    assert "refined" in result.chosen.values()
    for c in ("t1", "t2"):
        if result.chosen[c] == "refined":  # the held-out rule accepted it: it must fit the data better
            assert after[c] < before[c]
            assert result.log["best_holdout_mse"][c] < 0.99 * result.log["cohort_holdout_mse"][c]
        else:
            assert after[c] == before[c]
    assert sum(after.values()) < sum(before.values())
    for k, v in net.state_dict().items():  # the cohort model is a copy source, never modified
        assert torch.equal(v, before_state[k])


def test_safeguard_returns_the_cohort_output_unchanged_when_refinement_does_not_help(case):
    net, lr = case["net"], case["lr"]
    grid = TargetGrid.like(case["hr"])
    # a learning rate so large that every step wrecks the decoder: held-out MSE never beats the cohort's
    opts = RefineOptions(max_seconds=600, max_iterations=10, learning_rate=50.0, batch_size=256, eval_every=5)
    result = refine_network(net, lr["t1"], lr["t2"], opts)
    assert result.chosen == {"t1": "cohort", "t2": "cohort"} and result.network is net
    ref = predict_volumes(net, lr["t1"], lr["t2"], grid)
    out = predict_volumes(result.network, lr["t1"], lr["t2"], grid)
    for c in ("t1", "t2"):
        assert torch.equal(out[c].as_tensor(), ref[c].as_tensor())


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "abc"])
def test_check_refine_seconds_refuses_bad_budgets(value):
    with pytest.raises(NexusInputError, match="refine"):
        check_refine_seconds(value, "--refine")
    assert check_refine_seconds("0") == 0.0 and check_refine_seconds(2.5) == 2.5


def _predict(case, out, *extra):
    return main(["predict", "--bundle", str(BUNDLE), "--config", str(case["dir"] / "tiny.yaml"), "--weights", str(case["dir"] / "w.pt"),
                 "--t1", str(case["files"]["t1"]), "--t2", str(case["files"]["t2"]), "--spacing", "1", "--out", str(out),
                 "--threads", "1", "--quiet", "--keep-background", "--no-register", *extra])


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "ten"])
def test_predict_refine_bad_value_is_one_line_exit_2(case, tmp_path, capsys, value):
    out = tmp_path / "out"
    code = _predict(case, out, f"--refine={value}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --refine: ")
    assert not out.exists()


def test_predict_refine_and_guard_write_outputs_and_leave_inputs_untouched(case, tmp_path):
    hashes = {c: _sha(p) for c, p in case["files"].items()}
    assert _predict(case, tmp_path / "refined", "--refine", "2") == 0
    assert {c: _sha(p) for c, p in case["files"].items()} == hashes
    for c in ("t1", "t2"):
        sr = nib.load(str(tmp_path / "refined" / f"{c}w_sr.nii.gz"))
        res = nib.load(str(tmp_path / "refined" / CONSISTENCY_NAMES[c]))
        assert res.shape == sr.shape == (16, 16, 16)
        assert np.allclose(res.affine, sr.affine) and np.allclose(sr.affine, case["hr"].affine.numpy(), atol=1e-5)
        assert np.isfinite(np.asarray(res.dataobj)).all()
    # --no-guard: the network's raw output, no residual maps
    assert _predict(case, tmp_path / "raw", "--no-guard") == 0
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["t1w_sr.nii.gz", "t2w_sr.nii.gz"]
    raw = predict_volumes(case["net"], case["lr"]["t1"], case["lr"]["t2"], TargetGrid.like(case["hr"]))
    for c in ("t1", "t2"):
        np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "raw" / f"{c}w_sr.nii.gz")).dataobj), raw[c][0].numpy(),
                                   rtol=1e-6, atol=1e-4)


def _lesion_case():
    """HR phantom + a bright blob of radius 2.5 voxels; LR of both; a raw output that lost the blob."""
    vol = _phantom(20, seed=1)
    idx = np.indices(vol.shape)
    blob = ((idx - np.array([10, 11, 10])[:, None, None, None]) ** 2).sum(0) <= 2.5 ** 2
    affine = make_affine((1.0, 1.0, 1.0), (-10.0, -10.0, -10.0))
    hr = MetaTensor(torch.as_tensor(vol + 120.0 * blob)[None], affine=affine)
    raw = MetaTensor(torch.as_tensor(vol)[None], affine=affine)
    return hr, raw, _acquire(hr), torch.as_tensor(blob)


def test_guard_restores_a_lost_lesion_and_lowers_the_lr_residual():
    hr, raw, lr, blob = _lesion_case()
    grid = TargetGrid.like(hr)
    # the local setting (residuals beyond 3x the noise only): nothing changes away from the lesion
    local = GuardOptions(k=3.0, floor=0.01, iterations=5)
    out, maps, report = consistency_guard({"t1": raw, "t2": raw}, lr, grid, local)
    full, _, _ = consistency_guard({"t1": raw, "t2": raw}, lr, grid)  # the default: full data consistency
    truth, lost = hr[0], raw[0]
    for c in ("t1", "t2"):
        model = AcquisitionModel.of(lr[c], grid)
        before = lr_residual(model, lost).norm()
        after = lr_residual(model, out[c][0]).norm()
        assert after < 0.5 * before, c
        assert report[c]["corrected"] and report[c]["residual_rms_after"] < report[c]["residual_rms_before"]
        # the blob comes partly back: its mean moves at least 40 % of the way toward the truth
        restored = (out[c][0][blob].mean() - lost[blob].mean()) / (truth[blob].mean() - lost[blob].mean())
        assert restored > 0.4, (c, float(restored))
        full_residual = lr_residual(model, full[c][0]).norm()
        full_restored = (full[c][0][blob].mean() - lost[blob].mean()) / (truth[blob].mean() - lost[blob].mean())
        assert full_residual < after and full_restored >= restored - 1e-6, (c, float(full_restored))
        # far from the blob (more than a slab away) nothing changes
        far = torch.ones_like(blob)
        far[4:17, 4:18, 4:17] = False
        assert torch.equal(out[c][0][far], lost[far])
        # the residual map: output grid and affine, largest where the lesion was lost
        assert tuple(maps[c].shape[-3:]) == grid.shape and torch.allclose(maps[c].affine, grid.affine)
    raw_maps = consistency_guard({"t1": raw}, lr, grid, GuardOptions(correct=False))[1]
    peak = np.unravel_index(int(raw_maps["t1"][0].argmax()), grid.shape)
    assert blob[peak], "the raw output's residual peaks inside the lost lesion"


def test_guard_leaves_a_consistent_output_alone():
    hr, _, lr, _ = _lesion_case()
    out, maps, report = consistency_guard({"t1": hr, "t2": hr}, lr, TargetGrid.like(hr))
    for c in ("t1", "t2"):
        assert report[c]["voxels_above_before"] == 0 and not report[c]["corrected"]
        assert torch.equal(out[c].as_tensor(), hr.as_tensor())
        assert float(maps[c].abs().max()) < 1e-3


def test_nexus_inr_refined_method_is_registered_with_a_budget_option(case, monkeypatch):
    from nexus_monai.evaluation.methods import METHODS

    assert "nexus_inr_refined" in METHODS and getattr(METHODS["nexus_inr_refined"], "bundle", None) == "bundles/nexus_inr"
    method = METHODS["nexus_inr_refined"]
    monkeypatch.setattr("nexus_monai.evaluation.methods.bundle_model", lambda *a, **k: (case["net"], None))
    monkeypatch.setenv("NEXUS_REFINE_OPTIONS", '{"max_iterations": 3, "batch_size": 64}')
    inputs = {"t1_lr": case["lr"]["t1"], "t2_lr": case["lr"]["t2"]}
    pred = method(inputs, TargetGrid.like(case["hr"]), max_seconds=600)
    assert set(pred) == {"t1", "t2"} and tuple(pred["t1"].shape) == (1, 16, 16, 16)
    assert math.isfinite(float(pred["t2"].sum()))


def test_serving_params_refine_seconds_and_guard():
    from nexus_monai.serving.params import MAX_REFINE_SECONDS, ServingError, parse_params

    p = parse_params({"refine_seconds": 30, "guard": False})
    assert p.refine_seconds == 30.0 and p.guard is False and p.ignored == ()
    assert parse_params(None).refine_seconds == 0.0 and parse_params(None).guard is True
    for bad in (-1, "nan", float("inf"), MAX_REFINE_SECONDS + 1, True, "soon"):
        with pytest.raises(ServingError, match="refine_seconds"):
            parse_params({"refine_seconds": bad})
    with pytest.raises(ServingError, match="guard"):
        parse_params({"guard": "maybe"})


def test_bundle_inference_takes_refine_seconds_and_guard(case, tmp_path, monkeypatch):
    from monai.bundle import run as bundle_run

    monkeypatch.chdir(BUNDLE.parents[1])
    files = [str(BUNDLE / "configs" / "inference.yaml"), str(case["dir"] / "tiny.yaml")]
    common = dict(config_file=files, ckpt_path=str(case["dir"] / "w.pt"), input_t1=str(case["files"]["t1"]),
                  input_t2=str(case["files"]["t2"]), target_spacing=[1.0, 1.0, 1.0], progress=False, device="$torch.device('cpu')")
    bundle_run("inference", output_dir=str(tmp_path / "a"), refine_seconds=1, **common)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(["t1w_sr.nii.gz", "t2w_sr.nii.gz", *CONSISTENCY_NAMES.values()])
    bundle_run("inference", output_dir=str(tmp_path / "b"), guard=False, **common)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["t1w_sr.nii.gz", "t2w_sr.nii.gz"]


def test_monailabel_request_passes_refine_and_guard_and_reports_the_residual(case, tmp_path):
    from nexus_monai.serving.models import BundleModel
    from nexus_monai.serving.monailabel_app.lib.infers.sr_request import predict_request, prepare_request, write_result

    model = BundleModel(BUNDLE, [str(case["dir"] / "tiny.yaml")], weights=case["dir"] / "w.pt", device="cpu")
    data = prepare_request({"image": str(case["files"]["t2"]), "refine_seconds": "1", "guard": True, "spacing": 2})
    assert data["sr_params"].refine_seconds == 1.0 and data["sr_params"].guard is True
    path, info = write_result(predict_request(model, data, tmp_path), model.name)
    assert info["contrast"] == "t2" and info["refine"]["chosen"]["t2"] in ("refined", "cohort")
    assert info["consistency"]["threshold"] > 0 and nib.load(path).shape == (8, 8, 8)
    data = prepare_request({"image": str(case["files"]["t1"]), "guard": "false", "spacing": 2})
    assert "consistency" not in write_result(predict_request(model, data, tmp_path), model.name)[1]


def test_per_contrast_networks_predict_each_contrast_from_its_own_network(case):
    import copy

    from nexus_monai.engines.refine import PerContrastINR, contrast_networks

    net, lr, grid = case["net"], case["lr"], TargetGrid(case["hr"].shape[-3:], case["hr"].affine)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.decoders.parameters():
            p.add_(0.05)
    both = PerContrastINR(net, other)
    assert contrast_networks(both) == {"t1": net, "t2": other} and contrast_networks(net) == {"t1": net, "t2": net}
    pred = predict_volumes(both, lr["t1"], lr["t2"], grid)
    a, b = predict_volumes(net, lr["t1"], lr["t2"], grid), predict_volumes(other, lr["t1"], lr["t2"], grid)
    assert torch.allclose(pred["t1"].as_tensor(), a["t1"].as_tensor()) and torch.allclose(pred["t2"].as_tensor(), b["t2"].as_tensor())
    assert not torch.allclose(a["t2"].as_tensor(), b["t2"].as_tensor())


def test_resampling_matches_sample_at_world_and_maps_follow_an_oblique_grid():
    from nexus_monai.geometry import sample_at_world, world_to_voxel
    from nexus_monai.transforms.consistency import _resample

    src = make_affine((1.3, 0.9, 2.0), (-5.0, -3.0, -7.0), rotation_deg=(10.0, 0.0, 5.0))
    x = torch.rand(20, 25, 12, generator=torch.Generator().manual_seed(0))
    grid = TargetGrid((17, 19, 23), make_affine((1.0, 1.1, 0.8), (-6.0, -4.0, -9.0), rotation_deg=(0.0, 7.0, 0.0)))
    world = grid.world_coords(torch.float64).reshape(-1, 3)
    ref = sample_at_world(x[None], src, world.float(), padding_mode="zeros")[0].reshape(grid.shape)
    idx = world_to_voxel(world, src).reshape(*grid.shape, 3)
    core = ((idx >= 0) & (idx <= torch.tensor([19.0, 24.0, 11.0]))).all(-1)  # away from the half-voxel border
    outside = ((idx < -0.5) | (idx > torch.tensor([19.5, 24.5, 11.5]))).any(-1)
    out = _resample(x, src, grid)
    assert core.sum() > 1000 and outside.sum() > 1000
    assert torch.allclose(out[core], ref[core], atol=1e-5) and bool((out[outside] == 0).all())
    # the guard's maps on an oblique output grid carry that grid and affine
    hr, raw, lr, _ = _lesion_case()
    oblique = TargetGrid((18, 21, 19), make_affine((1.1, 1.0, 1.2), (-9.0, -10.0, -9.5), rotation_deg=(6.0, 0.0, 9.0)))
    pred = {c: MetaTensor(_resample(raw[0], raw.affine, oblique)[None], affine=oblique.affine) for c in ("t1", "t2")}
    out, maps, report = consistency_guard(pred, lr, oblique)
    for c in ("t1", "t2"):
        assert tuple(maps[c].shape) == (1, *oblique.shape) and torch.allclose(maps[c].affine, oblique.affine)
        assert torch.allclose(out[c].affine, oblique.affine) and report[c]["residual_rms_after"] <= report[c]["residual_rms_before"]
