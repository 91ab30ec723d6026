"""ArSSR: random-scale acquisition transform, identity with Nexus-INR's Table 2 Baseline network,
and the bundle end to end (`monai.bundle run training`, then `nexus-sr evaluate`). Tiny data."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.data import MetaTensor

from nexus_monai.cli import main
from nexus_monai.geometry import thick_slice_affine
from nexus_monai.networks import NexusINR
from nexus_monai.transforms import RandSimulateAnisotropicAcquisitiond, SimulateAnisotropicAcquisition

REPO = Path(__file__).resolve().parents[2]
BASELINE_SWITCHES = {"mmf": False, "kd_attn": False, "sel": False, "bidirectional": False, "cross_input": False}


def _oblique_volume(shape=(20, 18, 24)):
    affine = torch.tensor([[0.0, 1.2, 0.1, -30.0], [0.9, 0.0, 0.0, 12.0], [0.05, 0.0, 1.5, 4.0], [0, 0, 0, 1]], dtype=torch.float64)
    return MetaTensor(torch.rand((1,) + shape), affine=affine)


def test_random_acquisition_draws_factors_per_key_and_sets_the_lr_affine():
    hr = _oblique_volume()
    t = RandSimulateAnisotropicAcquisitiond(["a", "b"], axes=["z", "y"], factor_range=(1.5, 4.5), output_keys=["a_lr", "b_lr"])
    t.set_random_state(0)
    seen = set()
    for _ in range(6):
        d = t({"a": hr, "b": hr.clone()})
        for key, axis in (("a_lr", 2), ("b_lr", 1)):
            acq = d[key].meta["acquisition"]
            assert acq["axis"] == axis and 1.5 <= acq["factor"] <= 4.5
            seen.add(round(acq["factor"], 6))
            # exactly the deterministic acquisition with the drawn factor: values, shape and affine
            ref = SimulateAnisotropicAcquisition(axis, acq["factor"])(hr)
            assert d[key].shape == ref.shape and d[key].shape[axis + 1] == int(np.floor(hr.shape[axis + 1] / acq["factor"] + 1e-9))
            torch.testing.assert_close(d[key].as_tensor(), ref.as_tensor())
            torch.testing.assert_close(d[key].affine, thick_slice_affine(hr.affine, axis, acq["factor"]))
        assert d["a"] is hr  # the HR input is kept
    assert len(seen) == 12  # every key and call gets its own factor
    again = RandSimulateAnisotropicAcquisitiond(["a", "b"], axes=["z", "y"], factor_range=(1.5, 4.5), output_keys=["a_lr", "b_lr"])
    again.set_random_state(0)
    assert again({"a": hr, "b": hr})["a_lr"].meta["acquisition"]["factor"] == pytest.approx(
        RandSimulateAnisotropicAcquisitiond(["a"], "z", (1.5, 4.5)).set_random_state(0)({"a": hr})["a"].meta["acquisition"]["factor"])


def test_random_acquisition_random_axis_and_bad_settings():
    hr = _oblique_volume()
    t = RandSimulateAnisotropicAcquisitiond("a", axes=None, factor_range=(2, 2)).set_random_state(1)
    axes = {t({"a": hr})["a"].meta["acquisition"]["axis"] for _ in range(20)}
    assert axes == {0, 1, 2}
    with pytest.raises(ValueError, match="factor_range"):
        RandSimulateAnisotropicAcquisitiond("a", "z", (0.5, 2))
    with pytest.raises(ValueError, match="factor_range"):
        RandSimulateAnisotropicAcquisitiond("a", "z", (3, 2))
    with pytest.raises(ValueError, match="one per key"):
        RandSimulateAnisotropicAcquisitiond(["a", "b"], ["z", "y", "x"])


def _network_def(bundle: str, **switches) -> NexusINR:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
    for k, v in switches.items():
        parser[f"network_def#{k}"] = v
    return parser.get_parsed_content("network_def")


def test_arssr_is_the_nexus_inr_baseline_row():
    """The ArSSR bundle's network IS NexusINR with the Table 2 Baseline switches: same class, same
    parameters, same outputs for the same weights; and nothing crosses contrasts."""
    arssr = _network_def("arssr")
    baseline = _network_def("nexus_inr", **BASELINE_SWITCHES)
    assert type(arssr) is NexusINR and type(baseline) is NexusINR
    assert not (arssr.mmf or arssr.kd_attn or arssr.sel or arssr.cross_input or arssr.bidirectional)
    sa, sb = arssr.state_dict(), baseline.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
    for p in arssr.decoders.parameters():  # leave trilinear (zero-initialised last layer)
        torch.nn.init.normal_(p, std=0.1)
    baseline.load_state_dict(arssr.state_dict())
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.rand(1, 1, 10, 10, 5, generator=g), torch.rand(1, 1, 10, 3, 10, generator=g)
    a1 = torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0]))[None]
    a2 = torch.diag(torch.tensor([1.0, 4.0, 1.0, 1.0]))[None]
    q = torch.rand(1, 50, 3, generator=g) * 8
    with torch.no_grad():
        oa, ob = arssr(t1, t2, a1, a2, q, q), baseline(t1, t2, a1, a2, q, q)
        other = arssr(t1, torch.rand(1, 1, 10, 3, 10, generator=g), a1, a2, q, q)
    torch.testing.assert_close(oa["t1"], ob["t1"])
    torch.testing.assert_close(oa["t2"], ob["t2"])
    torch.testing.assert_close(oa["t1"], other["t1"])  # T1w ignores the T2w scan: single-contrast models
    assert not torch.allclose(oa["t2"], other["t2"])


def test_inference_network_def_equals_training_network_def():
    train = ConfigParser.load_config_file(str(REPO / "bundles/arssr/configs/train.yaml"))
    infer = ConfigParser.load_config_file(str(REPO / "bundles/arssr/configs/inference.yaml"))
    assert infer["network_def"] == train["network_def"]


TINY = {"patch_size": [16, 16, 16], "num_points": 128}  # the default (small) network; tiny patches


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bundle_dataset):
    tmp = tmp_path_factory.mktemp("arssr")
    data = tiny_bundle_dataset(tmp / "data", n=3)
    cwd = os.getcwd()
    os.chdir(REPO)  # the configs include bundles/nexus_inr and transforms/ relative to the repository root
    try:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        bundle_run("training", config_file="bundles/arssr/configs/train.yaml", bundle_root=str(tmp / "arssr"),
                   dataset_dir=str(data), max_epochs=3, val_interval=3, ckpt_interval=1, tracking="mlflow",
                   tracking_uri=f"sqlite:///{tmp}/mlruns.db", run_name="arssr_test", **TINY)
    finally:
        os.chdir(cwd)
    return tmp, data


@pytest.mark.integration
def test_bundle_trains_with_random_scales_and_evaluates_through_nexus_sr(trained, tmp_path):
    tmp, data = trained
    models = tmp / "arssr" / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=3.pt").is_file()
    report = pd.read_csv(tmp / "arssr" / "eval" / "validation_subjects.csv")
    assert len(report) == 3 and np.isfinite(report.filter(like="psnr").to_numpy(float)).all()
    # --tracking mlflow works with the included sections (its handler lists are literal in the file)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlruns.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = next(r for r in runs if r.info.run_name == "arssr_test")
    assert {"train_loss_sr_t1", "train_loss_sr_t2", "val_psnr_t1", "val_psnr_t2"} <= set(run.data.metrics)
    assert "train_loss_seg" not in run.data.metrics  # the Baseline has no auxiliary terms
    out = tmp_path / "res"
    code = main(["evaluate", "--data", str(data), "--methods", "trilinear,arssr", "--weights", f"arssr={models / 'model.pt'}",
                 "--no-lpips", "--no-mlflow", "--quiet", "--out", str(out)])
    assert code == 0
    rows = pd.read_csv(out / "per_subject.csv")
    ar = rows[rows["method"] == "arssr"]
    assert len(ar) == 3 and (ar["error"].fillna("") == "").all()
    assert np.isfinite(ar[["psnr_t1", "psnr_t2", "ssim_t1", "ssim_t2"]].to_numpy(float)).all()
