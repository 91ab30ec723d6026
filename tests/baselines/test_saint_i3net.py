"""SAINT and I3Net: networks, the shared thick-slice inference path, and both bundles end to end
(train -> evaluate -> inference -> evaluate method) on tiny data (6 mm voxels)."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.fft
import torch
from monai.bundle import run as bundle_run
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.baselines.i3net import i3net
from nexus_monai.baselines.interpolation import upsample
from nexus_monai.baselines.lrtv import natural_hr_grid
from nexus_monai.baselines.saint import saint
from nexus_monai.data.brats import load_datalist
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.methods import get_method
from nexus_monai.evaluation.table1 import prepare_subject
from nexus_monai.geometry import TargetGrid, make_affine
from nexus_monai.networks.i3net import I3Net, dct_matrix
from nexus_monai.networks.saint import SAINT
from nexus_monai.networks.slice_sr import ResidualSR2d, over_slices
from nexus_monai.transforms import SimulateAnisotropicAcquisition
from nexus_monai.transforms.protocols import load_protocol

REPO = Path(__file__).resolve().parents[2]


def _phantom(shape=(20, 18, 16)):
    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 100 + 200
    return MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=make_affine((1.1, 1.1, 1.1), (-10.0, -9.0, -8.0), (0, 8, 0)))


def _perturb(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_over_slices_matches_a_loop_over_slices():
    net = _perturb(ResidualSR2d(2, 4, 1))
    x = torch.rand(2, 2, 5, 6, 7)
    for axis in range(3):
        got = over_slices(net, x, axis, chunk=3)
        ref = torch.stack([net(x.select(2 + axis, s)) for s in range(x.shape[2 + axis])], dim=2 + axis)
        assert torch.allclose(got, ref, atol=1e-6)


def test_dct_matrix_is_scipy_orthonormal_dct():
    x = np.random.default_rng(0).random(9)
    c = dct_matrix(9, torch.float64)
    assert np.allclose(c.numpy() @ x, scipy.fft.dct(x, type=2, norm="ortho"))
    assert torch.allclose(c @ c.T, torch.eye(9, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("make,neighbours", [(lambda: SAINT(features=4, blocks=1, fusion_features=4, fusion_blocks=1), 0), (lambda: I3Net(4, 4, 1), 4)])
@pytest.mark.parametrize("axis,factor", [("z", 2.0), ("y", 2.5)])
def test_untrained_network_is_exactly_the_bspline_and_grid_is_kept(make, neighbours, axis, factor):
    """Zero-initialised tails: the network's output is its B-spline input, so the whole path
    (axis detection, canonical layout, scaling, affine) must reproduce cubic interpolation."""
    hr = _phantom()
    lr = SimulateAnisotropicAcquisition(axis, factor)(hr)
    fn = saint if neighbours == 0 else i3net
    grid = natural_hr_grid(lr.shape, lr.affine, "xyz".index(axis), factor)
    out = fn(lr, grid, network=make())
    ref = upsample(lr, grid, "bspline").clamp(min=0)
    assert tuple(out.shape) == (1, *grid.shape) and torch.allclose(out.affine.double(), grid.affine, atol=1e-6)
    assert torch.allclose(out.as_subclass(torch.Tensor), ref.as_subclass(torch.Tensor), rtol=1e-4, atol=1e-2)
    # trained-like weights: still on the requested (here: another, oblique) grid, finite
    other = TargetGrid((16, 15, 14), make_affine((1.2, 1.2, 1.1), (-9.0, -8.0, -7.0), (4, 0, 3)))
    out2 = fn(lr, other, network=_perturb(make()))
    assert tuple(out2.shape) == (1, 16, 15, 14) and torch.allclose(out2.affine.double(), other.affine, atol=1e-6)
    assert torch.isfinite(out2).all()


def test_networks_reject_wrong_inputs_and_scans_without_thick_axis():
    with pytest.raises(ValueError, match="SAINT expects"):
        SAINT(4, 1, 4, 1)(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="I3Net expects"):
        I3Net(4, 4, 1)(torch.zeros(1, 3, 4, 4, 4))
    hr = _phantom()
    iso = MetaTensor(hr.as_subclass(torch.Tensor), affine=make_affine((1.0, 1.0, 1.0)))
    with pytest.raises(NexusInputError, match="no thick axis.*SAINT"):
        saint(iso, TargetGrid.like(iso), network=SAINT(4, 1, 4, 1))
    lr = SimulateAnisotropicAcquisition("z", 2)(hr)
    with pytest.raises(NexusInputError, match="factor 4 does not match"):
        i3net(lr, TargetGrid.like(hr), network=I3Net(4, 4, 1), factor=4)


@pytest.mark.parametrize("name", ["saint", "i3net"])
def test_inference_config_repeats_the_training_network(name):
    from monai.bundle import ConfigParser

    cfg = {}
    for f in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / name / "configs" / f"{f}.yaml"))
        cfg[f] = (parser.get("network_def"), parser.get("neighbours"))
    assert cfg["train"] == cfg["inference"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_bundle_dataset):
    return tiny_bundle_dataset(tmp_path_factory.mktemp("sliceaw") / "data", n=3)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["saint", "i3net"])
def test_bundle_train_evaluate_infer_and_method(name, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # bundles include transforms/*.yaml relative to the repository root
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    bundle = tmp_path / "bundles" / name  # load_bundle parses from <bundle>/../.. like the repository
    shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
    subject = load_datalist(tiny_data / "dataset.json", "test")[0]
    data = prepare_subject(subject, load_protocol("nexus"))
    grid = TargetGrid.like(data["t1"])
    with pytest.raises(NexusInputError, match="checkpoint not found"):
        get_method(name)(data, grid, bundle=str(bundle))

    cfg = str(bundle / "configs" / "train.yaml")
    common = {"bundle_root": str(bundle), "dataset_dir": str(tiny_data), "patch_size": [12, 12, 12]}
    mlruns = f"sqlite:///{tmp_path}/mlruns.db"
    bundle_run("training", config_file=cfg, tracking="mlflow", tracking_uri=mlruns, run_name=f"{name}_test", max_epochs=2, val_interval=1, **common)
    assert (bundle / "models" / "model.pt").exists()
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"val_psnr", "val_psnr_bspline"} <= set().union(*(r.data.metrics.keys() for r in runs))

    bundle_run("evaluating", config_file=[cfg, str(bundle / "configs" / "evaluate.yaml")], **common)
    assert (bundle / "eval" / "metrics.csv").exists()

    lr_path = tmp_path / "t2_lr.nii.gz"
    nib.save(nib.Nifti1Image(data["t2_lr"][0].numpy(), data["t2_lr"].affine.numpy()), str(lr_path))
    bundle_run("inference", config_file=str(bundle / "configs" / "inference.yaml"), bundle_root=str(bundle),
               images=[str(lr_path)], target_like=subject["t2"], output_dir=str(tmp_path / "infer"))
    out, ref = nib.load(str(tmp_path / "infer" / "t2_lr_sr.nii.gz")), nib.load(subject["t2"])
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-4)
    assert np.isfinite(np.asarray(out.dataobj)).all()

    pred = get_method(name)(data, grid, bundle=str(bundle))
    for c in ("t1", "t2"):
        assert tuple(pred[c].shape) == (1, *grid.shape) and torch.allclose(pred[c].affine.double(), grid.affine, atol=1e-5)
        assert torch.isfinite(pred[c]).all()
