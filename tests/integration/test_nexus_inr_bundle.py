"""Nexus-INR bundle end to end through `monai.bundle run` (training with MLflow, evaluating,
inference), `nexus-sr predict` (same outputs, bad input), resume after a kill, and the DDP overlay.
Tiny data (6 mm voxels) and a tiny network."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import run as bundle_run

from nexus_monai.cli import main
from nexus_monai.data.brats import load_datalist
from nexus_monai.geometry import TargetGrid, thick_slice_affine

REPO = Path(__file__).resolve().parents[2]
# A tiny network and schedule; the keys are the bundle's own (overridable from the command line).
TINY = {
    "network_def#features": 4,
    "network_def#encoder_options": {"blocks": 1, "layers": 1, "growth": 4},
    "network_def#decoder_hidden": 16,
    "network_def#attn_heads": 2,
    "patch_size": [16, 16, 16],
    "num_points": 128,
    "batch_size": 1,
}
TINY_CLI = ["--network_def#features", "4", "--network_def#encoder_options", "{'blocks':1,'layers':1,'growth':4}",
            "--network_def#decoder_hidden", "16", "--network_def#attn_heads", "2", "--patch_size", "[16,16,16]",
            "--num_points", "128", "--batch_size", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_bundle_dataset):
    return tiny_bundle_dataset(tmp_path_factory.mktemp("inrdata") / "data", n=3)


@pytest.fixture(scope="module")
def lr_pair(tmp_path_factory, tiny_data):
    """One subject's simulated LR scans on their own grids (T1 z x 2, T2 y x 4), as files."""
    out = tmp_path_factory.mktemp("lr")
    subject = load_datalist(tiny_data / "dataset.json", "test")[0]
    paths = {}
    for c, (axis, k) in {"t1": ("z", 2), "t2": ("y", 4)}.items():
        paths[c] = out / f"{c}_lr.nii.gz"
        assert main(["degrade", "--image", subject[c], "--axis", axis, "--factor", str(k), "--out", str(paths[c])]) == 0
    return paths


# the tiny phantom's brain touches the volume border (not a zero background) and its scans are
# simulated without motion: compared voxel by voxel with the bundle's inference, so no registration step
RAW = ("--keep-background", "--no-register")


def _overlay(path: Path) -> Path:
    """The tiny network as a config overlay file (what a user passes to `predict --config`)."""
    lines = [f"{k}: {json.dumps(v)}" for k, v in TINY.items() if k.startswith("network_def")]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_bundle(tiny_data, tmp_path_factory):
    """train.yaml run through `monai.bundle run training` with MLflow for 2 epochs."""
    tmp = tmp_path_factory.mktemp("bundle")
    cwd = os.getcwd()
    os.chdir(REPO)  # bundle configs include transforms/*.yaml relative to the repository root
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    bundle = tmp / "nexus_inr"
    shutil.copytree(REPO / "bundles" / "nexus_inr" / "configs", bundle / "configs")
    mlruns = f"sqlite:///{tmp}/mlruns.db"
    try:
        bundle_run("training", config_file=str(bundle / "configs" / "train.yaml"), tracking="mlflow", tracking_uri=mlruns,
                   run_name="nexus_inr_test", bundle_root=str(bundle), dataset_dir=str(tiny_data), max_epochs=2,
                   val_interval=1, ckpt_interval=1, **TINY)
    finally:
        os.chdir(cwd)
    return bundle, mlruns


def test_training_writes_checkpoints_reports_and_mlflow_run(trained_bundle):
    bundle, mlruns = trained_bundle
    models = bundle / "models"
    assert (models / "model.pt").exists() and (models / "checkpoint_epoch=2.pt").exists()
    state = torch.load(models / "checkpoint_epoch=2.pt", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"] == 6  # 3 subjects, batch 1
    rows = pd.read_csv(bundle / "eval" / "validation_subjects.csv")
    assert len(rows) == 3 and np.isfinite(rows[["model_psnr_t1", "model_psnr_t2", "trilinear_psnr_t1", "model_ssim_t2"]].to_numpy()).all()
    summary = json.loads((bundle / "eval" / "validation_summary.json").read_text())
    assert summary["epoch"] == 2 and set(summary["psnr_gain_over_trilinear_db"]) == {"t1", "t2"}
    assert (bundle / "eval" / "validation_panel_epoch0002.png").exists()

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.info.run_name == "nexus_inr_test")
    keys = set(run.data.metrics)
    assert {"val_psnr_avg", "val_psnr_t1", "val_psnr_t2", "val_ssim_t1", "val_ssim_t2", "trilinear_psnr_t1"} <= keys
    assert {"train_loss_sr_t1", "train_loss_sr_t2", "train_loss_kd", "train_loss_t2self", "train_loss_cmfa",
            "train_loss_fdl", "train_loss_seg"} <= keys
    params = run.data.params  # hyper-parameters of the executed config (MLflowRunLogger)
    assert params["network_def.kd_attn"] == "true" and params["network_def.features"] == str(TINY["network_def#features"])
    assert params["batch_size"] and params["learning_rate"] and params["patch_size"] and "loss.w_kd" in params
    assert run.data.tags["bundle"] == "nexus_inr" and run.data.tags["protocol"] == "nexus" and run.data.tags["git_commit"]
    import hashlib

    assert run.data.tags["model_sha256"] == hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert any("validation_panel+step+2+" in p and p.endswith(".png") for p in images)  # MLflow image, one per epoch
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert {"validation/epoch_0001.json", "validation/epoch_0002.json"} <= tables  # MLflow tables of subject rows


def test_evaluating_writes_metrics(trained_bundle, tiny_data, monkeypatch):
    bundle, _ = trained_bundle
    monkeypatch.chdir(REPO)
    cfg = [str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "evaluate.yaml")]
    bundle_run("evaluating", config_file=cfg, bundle_root=str(bundle), dataset_dir=str(tiny_data), eval_split="test", **TINY)
    rows = pd.read_csv(bundle / "eval" / "evaluation_subjects.csv")
    assert len(rows) == 3
    metrics = (bundle / "eval" / "metrics.csv").read_text()
    assert "val_psnr_avg" in metrics and "val_ssim_t2" in metrics


def test_inference_and_predict_give_the_same_volumes_on_the_requested_grid(trained_bundle, lr_pair, tmp_path, monkeypatch):
    bundle, _ = trained_bundle
    monkeypatch.chdir(REPO)
    bundle_run("inference", config_file=str(bundle / "configs" / "inference.yaml"), bundle_root=str(bundle),
               input_t1=str(lr_pair["t1"]), input_t2=str(lr_pair["t2"]), target_spacing=[3.0, 3.0, 3.0],
               output_dir=str(tmp_path / "infer"), progress=False,
               **{k: v for k, v in TINY.items() if k.startswith("network_def")})
    t1_lr = nib.load(str(lr_pair["t1"]))
    expected = TargetGrid.from_spacing(t1_lr.shape, t1_lr.affine, 3.0)
    infer = {c: nib.load(str(tmp_path / "infer" / f"{c}w_sr.nii.gz")) for c in ("t1", "t2")}
    for img in infer.values():
        assert img.shape == expected.shape
        assert np.allclose(img.affine, expected.affine.numpy(), atol=1e-5)
        assert np.isfinite(np.asarray(img.dataobj)).all()

    overlay = _overlay(tmp_path / "tiny.yaml")
    code = main(["predict", *RAW, "--bundle", str(bundle), "--config", str(overlay), "--t1", str(lr_pair["t1"]), "--t2", str(lr_pair["t2"]),
                 "--spacing", "3", "--out", str(tmp_path / "pred"), "--quiet"])
    assert code == 0
    for c in ("t1", "t2"):
        pred = nib.load(str(tmp_path / "pred" / f"{c}w_sr.nii.gz"))
        assert np.allclose(pred.affine, infer[c].affine)
        # equal up to the encoder tiling, which predict plans from the memory left in the process
        # (tiled == untiled within 1e-5 of the intensity range, tests/test_tiling.py)
        ref = np.asarray(infer[c].dataobj)
        np.testing.assert_allclose(np.asarray(pred.dataobj), ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    # another scan's grid (the T2 LR grid, thick along y) and an oblique grid
    code = main(["predict", *RAW, "--bundle", str(bundle), "--config", str(overlay), "--t1", str(lr_pair["t1"]), "--t2", str(lr_pair["t2"]),
                 "--like", str(lr_pair["t2"]), "--out", str(tmp_path / "like"), "--quiet"])
    assert code == 0
    ref = nib.load(str(lr_pair["t2"]))
    out = nib.load(str(tmp_path / "like" / "t1w_sr.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-5)


def test_predict_on_an_oblique_grid_matches_the_affine(trained_bundle, lr_pair, tmp_path, monkeypatch):
    from nexus_monai.geometry import make_affine

    bundle, _ = trained_bundle
    t1 = nib.load(str(lr_pair["t1"]))
    centre = t1.affine[:3, :3] @ (np.array(t1.shape) / 2) + t1.affine[:3, 3]
    oblique = make_affine((4.0, 4.0, 4.0), (0, 0, 0), (10.0, -5.0, 20.0)).numpy()
    oblique[:3, 3] = centre - oblique[:3, :3] @ np.array([10, 10, 6])
    ref = tmp_path / "oblique_ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 12), np.float32), oblique), str(ref))
    code = main(["predict", *RAW, "--bundle", str(bundle), "--config", str(_overlay(tmp_path / "tiny.yaml")), "--t1", str(lr_pair["t1"]),
                 "--t2", str(lr_pair["t2"]), "--like", str(ref), "--out", str(tmp_path / "obl"), "--quiet"])
    assert code == 0
    out = nib.load(str(tmp_path / "obl" / "t2w_sr.nii.gz"))
    assert out.shape == (20, 20, 12) and np.allclose(out.affine, oblique, atol=1e-5)
    assert np.asarray(out.dataobj).std() > 0


def _bad_inputs(lr_pair, tmp: Path) -> dict:
    t1 = nib.load(str(lr_pair["t1"]))
    data = np.asarray(t1.dataobj).astype(np.float32)
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(lr_pair["t1"].read_bytes()[:200])
    nan = tmp / "nan.nii.gz"
    bad = data.copy()
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, t1.affine), str(nan))
    four_d = tmp / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), t1.affine), str(four_d))
    far = tmp / "far.nii.gz"
    shifted = t1.affine.copy()
    shifted[:3, 3] += 5000.0
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), shifted), str(far))
    return {"corrupt": corrupt, "nan": nan, "4d": four_d, "far": far}


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"),
    ("corrupt", "corrupt.nii.gz"),
    ("nan", "NaN"),
    ("4d", "4D"),
    ("far", "unreachable"),
])
def test_predict_bad_input_is_one_line_and_writes_nothing(case, match, trained_bundle, lr_pair, tmp_path, capsys):
    bundle, _ = trained_bundle
    bad = _bad_inputs(lr_pair, tmp_path)
    t1, t2, grid = str(lr_pair["t1"]), str(lr_pair["t2"]), ["--spacing", "3"]
    if case == "missing":
        t2 = str(tmp_path / "no_such_t2.nii.gz")
    elif case == "far":
        grid = ["--like", str(bad["far"])]
    else:
        t1 = str(bad[case])
    out = tmp_path / "out"
    code = main(["predict", *RAW, "--bundle", str(bundle), "--config", str(_overlay(tmp_path / "tiny.yaml")), "--t1", t1, "--t2", t2,
                 *grid, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_predict_checkpoint_that_does_not_match_the_network(trained_bundle, lr_pair, tmp_path, capsys):
    bundle, _ = trained_bundle
    code = main(["predict", *RAW, "--bundle", str(bundle), "--t1", str(lr_pair["t1"]), "--t2", str(lr_pair["t2"]), "--spacing", "3",
                 "--out", str(tmp_path / "out"), "--quiet"])  # default (larger) network_def vs the tiny checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not match the network_def" in err[0]
    assert not (tmp_path / "out").exists()


def _train_cmd(tiny_data, root, max_epochs):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundles/nexus_inr/configs/train.yaml",
            "--dataset_dir", str(tiny_data), "--bundle_root", str(root), "--max_epochs", str(max_epochs), "--val_interval", "100",
            "--ckpt_interval", "1", *TINY_CLI]


def test_killed_training_resumes_from_its_last_checkpoint(tiny_data, tmp_path):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    root = tmp_path / "run"
    cmd = _train_cmd(tiny_data, root, 40)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((root / "models").glob("checkpoint_epoch=*.pt")):
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # let at least one checkpoint be complete on disk
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = sorted(int(p.name.split("=")[1][:-3]) for p in (root / "models").glob("checkpoint_epoch=*.pt"))
    assert saved and saved[-1] < 40, "training was not killed before finishing"
    killed_at = saved[-1]
    res = subprocess.run(_train_cmd(tiny_data, root, killed_at + 2), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {root / 'models'}" in res.stdout + res.stderr
    assert f"epoch {killed_at}" in res.stdout + res.stderr
    state = torch.load(root / "models" / f"checkpoint_epoch={killed_at + 2}.pt", weights_only=False)
    assert state["trainer"]["iteration"] == (killed_at + 2) * state["trainer"]["epoch_length"]
    # it trained only the remaining epochs: the first epoch after resuming is killed_at + 1
    assert f"Epoch[{killed_at + 1}]" in res.stdout + res.stderr and "Epoch[1] Metrics" not in res.stdout + res.stderr


def test_multi_gpu_overlay_runs_two_gloo_processes(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 with the DDP overlay (gloo on CPU) trains 2 iterations, validates, saves."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           "--config_file", "['bundles/nexus_inr/configs/train.yaml','bundles/nexus_inr/configs/multi_gpu_train.yaml']",
           "--dataset_dir", str(tiny_data), "--bundle_root", str(tmp_path), "--max_epochs", "1", "--val_interval", "1",
           "--ckpt_interval", "1", *TINY_CLI]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").exists()
    assert len(pd.read_csv(tmp_path / "eval" / "validation_subjects.csv")) == 3
    # 3 training subjects, batch 1, 2 ranks, DistributedSampler(even_divisible): 2 iterations per rank
    state = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 2


def test_inference_network_def_equals_training_network_def():
    """inference.yaml spells network_def out (MONAI Label reads that file alone): it must not drift."""
    from monai.bundle import ConfigParser

    train = ConfigParser.load_config_file(str(REPO / "bundles/nexus_inr/configs/train.yaml"))
    infer = ConfigParser.load_config_file(str(REPO / "bundles/nexus_inr/configs/inference.yaml"))
    assert infer["network_def"] == train["network_def"]
