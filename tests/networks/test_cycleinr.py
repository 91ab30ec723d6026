"""CycleINR (re-implemented from the paper): thick-axis lines + acquisition operator, cycle loss,
local-attention sampling, a real fitting check, and the bundle end to end through `nexus-sr evaluate`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.cli import main
from nexus_monai.engines.cycleinr import CycleINRTrainStep, cycleinr_predict_lines
from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import TargetGrid, make_affine, sample_at_world, world_to_voxel
from nexus_monai.losses.cycleinr import CycleINRLoss
from nexus_monai.networks.cycleinr import CycleINR, CycleINRPair
from nexus_monai.transforms import RandPairedPatchd
from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisition, slice_profile_matrix
from nexus_monai.transforms.lines import SampleThickAxisLinesd, thick_axis_operator

ROOT = Path(__file__).resolve().parents[2]
TINY_NET = {"encoder": "rdn", "features": 8, "encoder_options": {"blocks": 1, "layers": 2, "growth": 8},
            "decoder_hidden": 32, "decoder_layers": 2, "attn_heads": 2}


def _hr_volume(shape=(32, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min()) + 0.1
    affine = make_affine((1.0, 1.2, 0.9), (-20.0, 5.0, 3.0))
    return MetaTensor(torch.as_tensor(vol)[None], affine=affine)


def _paired_batch(specs, seed=0, flip_prob=0.0, shape=(48, 48, 48), patch=32, num_lines=16):
    """HR volume(s), their thick-slice LR scans, one paired patch and the thick-axis lines."""
    d = {}
    for key, (axis, factor) in specs.items():
        d[key] = _hr_volume(shape, seed + len(d))
        d[f"{key}_lr"] = SimulateAnisotropicAcquisition(axis, factor, "gaussian")(d[key])
    keys = list(specs)
    full = dict(d)
    patcher = RandPairedPatchd(keys, [f"{k}_lr" for k in keys], (patch,) * 3, min_foreground=0.0, flip_prob=flip_prob)
    patcher.set_random_state(seed)
    d = patcher(d)
    lines = SampleThickAxisLinesd(keys, [f"{k}_lr" for k in keys], "gaussian", num_lines=num_lines).set_random_state(seed)
    return lines(d), full


@pytest.mark.parametrize("axis,factor", [(2, 2), (1, 4), (0, 3)])
def test_operator_rows_are_the_acquisition_profile(axis, factor):
    n = 30
    op, valid = thick_axis_operator(n, n // factor, factor, lr_offset=-(factor - 1) / (2 * factor))
    full = slice_profile_matrix(n, factor, "gaussian")
    assert valid.any() and not valid.all()  # border rows reach past the patch
    for m in np.flatnonzero(valid.numpy()):
        assert torch.allclose(op[m], full[m]) and op[m, 0] == 0 and op[m, -1] == 0
    assert (op[~valid] == 0).all()


def test_t2_cycle_term_is_zero_at_16_voxels_because_no_row_is_exact():
    """Why `loss_cycle_t2` logs 0 at 16^3 patches: the x4 Gaussian profile (support +-4 sigma = +-6.8 HR voxels)
    of every LR slice of a 16-voxel line reaches past it, so no row is exact; 32 voxels give 4 of 8. The loss
    says so with a warning instead of silently scoring a zero term."""
    offset = -(4 - 1) / (2 * 4)  # slabs aligned with the patch, as RandPairedPatchd cuts them
    assert not thick_axis_operator(16, 4, 4, lr_offset=offset)[1].any()
    assert int(thick_axis_operator(32, 8, 4, lr_offset=offset)[1].sum()) == 4
    assert int(thick_axis_operator(16, 8, 2, lr_offset=-1 / 4)[1].sum()) > 0  # T1w x2 at 16 voxels: exact rows
    loss = CycleINRLoss(w_cycle=1.0)
    batch = {"t2_lines_hr": torch.zeros(1, 2, 16), "t2_lines_lr": torch.ones(1, 2, 4),
             "t2_lines_operator": torch.zeros(1, 4, 16), "t2_lines_valid": torch.zeros(1, 4)}
    with pytest.warns(UserWarning, match="no exact t2 row"):
        terms = loss({"t2": torch.zeros(1, 2, 16)}, batch)
    assert float(terms["cycle_t2"]) == 0.0


@pytest.mark.parametrize("axis,factor,flip", [(2, 2, 0.0), (1, 4, 0.0), (2, 2, 1.0), (1, 4, 1.0)])
def test_lines_reproduce_the_lr_scan_and_the_hr_volume(axis, factor, flip):
    d, full = _paired_batch({"t1": (axis, factor)}, seed=3, flip_prob=flip)
    world, hr, lr = d["t1_lines_world"], d["t1_lines_hr"], d["t1_lines_lr"]
    op, valid = d["t1_lines_operator"], d["t1_lines_valid"].bool()
    n = d["t1"].shape[axis + 1]
    assert hr.shape == (16, n) and lr.shape == (16, n // factor) and op.shape == (n // factor, n)
    assert valid.sum() >= 2
    # HR values == the FULL HR volume sampled at the line's world points (independent of the crop/flip)
    vol = full["t1"].as_subclass(torch.Tensor)
    vox = world_to_voxel(world.double(), full["t1"].affine).numpy()
    ref = ndimage.map_coordinates(vol[0].double().numpy(), vox.T, order=1).reshape(hr.shape)
    np.testing.assert_allclose(hr.numpy(), ref, atol=1e-5)
    # the acquisition operator on the HR line gives the simulated LR scan on every exact row
    np.testing.assert_allclose((hr.double() @ op.double().T)[:, valid].numpy(), lr[:, valid].double().numpy(), atol=1e-5)
    # and each exact row is the full LR scan at the world centre of its slab (the profile's centroid)
    lr_vol = full["t1_lr"].as_subclass(torch.Tensor)[0].double().numpy()
    lines = world.double().reshape(16, n, 3)
    for m in np.flatnonzero(valid.numpy()):
        centre = torch.einsum("n,lnc->lc", op[m].double(), lines)  # (16, 3) world mm
        vox = world_to_voxel(centre, full["t1_lr"].affine).numpy()
        np.testing.assert_allclose(vox[:, axis], np.rint(vox[:, axis]), atol=1e-4)  # an LR voxel centre
        np.testing.assert_allclose(lr[:, m].double().numpy(), ndimage.map_coordinates(lr_vol, vox.T, order=1), atol=1e-5)


def test_cycle_loss_zero_on_truth_and_hand_values():
    d, _ = _paired_batch({"t1": (2, 2)}, seed=1)
    batch = {k: v[None] for k, v in d.items() if "_lines_" in k}
    loss = CycleINRLoss(w_cycle=1.0)
    truth = loss({"t1": batch["t1_lines_hr"]}, batch)
    assert truth["cycle_t1"] < 1e-6 and truth["rec_t1"] == 0  # re-degraded HR == LR input
    shifted = loss({"t1": batch["t1_lines_hr"] + 0.25}, batch)  # rows sum to 1: every LR value off by 0.25
    assert torch.isclose(shifted["rec_t1"], torch.tensor(0.25)) and torch.isclose(shifted["cycle_t1"], torch.tensor(0.25), atol=1e-6)
    assert torch.isclose(shifted["loss"], torch.tensor(0.5), atol=1e-6)
    assert CycleINRLoss(w_cycle=0.0)({"t1": batch["t1_lines_hr"] + 0.25}, batch)["loss"].item() == pytest.approx(0.25)


def test_zero_decoder_gives_trilinear_and_attention_changes_sampling():
    torch.manual_seed(0)
    lr = SimulateAnisotropicAcquisition(2, 2)(_hr_volume((20, 18, 16)))
    image = lr.as_subclass(torch.Tensor)[None]
    affine = lr.affine[None].float()
    world = (torch.rand(1, 50, 3) * torch.tensor([14.0, 16.0, 10.0]) + torch.tensor([-18.0, 7.0, 5.0]))
    net = CycleINR(**TINY_NET)
    last = [m for m in net.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    with torch.no_grad():
        out = net(image, affine, world)[0].numpy()
    vox = world_to_voxel(world[0].double(), lr.affine).numpy()
    ref = ndimage.map_coordinates(image[0, 0].double().numpy(), vox.T, order=1, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-4)
    # with a live decoder the attended latent differs from the plain trilinear latent
    torch.manual_seed(1)
    a, plain = CycleINR(**TINY_NET), CycleINR(**TINY_NET, local_attention=False)
    plain.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("attention.")})
    with torch.no_grad():
        assert not torch.allclose(a(image, affine, world), plain(image, affine, world))


def test_pair_runs_in_the_grid_inferer_with_the_right_grid():
    net = CycleINRPair(**TINY_NET)
    t1 = SimulateAnisotropicAcquisition(2, 2)(_hr_volume((16, 16, 16), 0))
    t2 = SimulateAnisotropicAcquisition(1, 4)(_hr_volume((16, 16, 16), 1))
    grid = TargetGrid.from_spacing((16, 16, 16), _hr_volume((16, 16, 16)).affine, 1.5)
    out = ImplicitGridInferer(chunk_size=500)(t1, t2, net, grid)
    assert out["t1"].shape == grid.shape and out["t2"].shape == grid.shape
    assert torch.isfinite(out["t1"]).all() and out["t2"].abs().sum() > 0


class _Engine:
    def __init__(self, network, optimizer, loss):
        self.network, self.optimizer, self.loss_function, self.device = network, optimizer, loss, "cpu"
        self.state = type("S", (), {})()


def test_training_steps_fit_a_batch_better_than_trilinear():
    """A real fitting check: a few dozen steps on one batch beat the trilinear start on its HR lines."""
    torch.manual_seed(0)
    d, _ = _paired_batch({"t1": (2, 2), "t2": (1, 4)}, seed=2, shape=(32, 32, 32), patch=24, num_lines=12)
    batch = {k: (v[None] if not isinstance(v, MetaTensor) else MetaTensor(v.as_subclass(torch.Tensor)[None], affine=v.affine))
             for k, v in d.items() if k.endswith("_lr") or "_lines_" in k}
    net = CycleINRPair(**TINY_NET)
    for sub in net.nets.values():  # start exactly at trilinear
        last = [m for m in sub.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    engine = _Engine(net, torch.optim.Adam(net.parameters(), lr=3e-3), CycleINRLoss(w_cycle=1.0))
    step = CycleINRTrainStep()
    first = step(engine, batch)
    for _ in range(40):
        last_out = step(engine, batch)
    assert set(first) >= {"loss", "loss_rec_t1", "loss_cycle_t2"}
    assert last_out["loss_rec_t1"] < 0.7 * first["loss_rec_t1"] and last_out["loss_rec_t2"] < 0.7 * first["loss_rec_t2"]
    with torch.no_grad():
        preds = cycleinr_predict_lines(net, batch)
    assert preds["t2"].shape == batch["t2_lines_hr"].shape


# --- the bundle end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_dataset):
    """Train bundles/cycleinr for one tiny epoch on 3 tiny subjects (6 mm voxels) in a subprocess."""
    tmp = tmp_path_factory.mktemp("cycleinr")
    data = tiny_dataset(tmp / "data", n=3)
    content = json.loads((data / "dataset.json").read_text())
    content["training"] = content["test"]
    content["validation"] = content["test"][:1]
    (data / "dataset.json").write_text(json.dumps(content))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundles/cycleinr/configs/train.yaml",
           "--dataset_dir", str(data), "--ckpt_dir", str(tmp / "models"), "--output_dir", str(tmp / "eval"),
           "--max_epochs", "1", "--val_interval", "1", "--patch_size", "[16,16,16]", "--num_lines", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"data": data, "ckpt": tmp / "models" / "model.pt", "tmp": tmp}


@pytest.mark.integration
def test_bundle_trains_and_evaluates_through_nexus_sr(tiny_bundle, tmp_path):
    assert tiny_bundle["ckpt"].is_file() and (tiny_bundle["tmp"] / "eval" / "validation_subjects.csv").is_file()
    out = tmp_path / "res"
    code = main(["evaluate", "--data", str(tiny_bundle["data"]), "--methods", "trilinear,cycleinr", "--weights", f"cycleinr={tiny_bundle['ckpt']}",
                 "--no-lpips", "--no-mlflow", "--quiet", "--out", str(out)])
    assert code == 0
    rows = pd.read_csv(out / "per_subject.csv")
    cyc = rows[rows["method"] == "cycleinr"]
    assert len(cyc) == 3 and (cyc["error"].fillna("") == "").all()
    for col in ("psnr_t1", "psnr_t2", "ssim_t1", "ssim_t2", "seconds"):
        assert np.isfinite(cyc[col]).all(), col
    assert (cyc["psnr_t1"] > 10).all()


@pytest.mark.integration
def test_mismatching_or_missing_checkpoint_fails_before_any_work(tiny_bundle, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": CycleINRPair(features=8).state_dict()}, wrong)
    for ckpt, problem in ((wrong, "does not match"), (tmp_path / "absent.pt", "checkpoint not found")):
        out = tmp_path / f"res_{ckpt.stem}"
        code = main(["evaluate", "--data", str(tiny_bundle["data"]), "--methods", "trilinear,cycleinr", "--weights", f"cycleinr={ckpt}",
                     "--no-lpips", "--no-mlflow", "--quiet", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and str(ckpt.name) in err[0] and problem in err[0], err
        assert not out.exists()  # nothing was run, nothing written
