"""Segmentation bundles end to end through `monai.bundle run`: training (with MLflow), evaluating,
inference, then Table 5 with the trained segmenter. Tiny data (6 mm voxels) and tiny networks."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.bundle import run as bundle_run

from nexus_monai.data.brats import load_datalist
from nexus_monai.evaluation.downstream import FrozenSegmenter
from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
from nexus_monai.transforms.protocols import load_protocol

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "seg_unet": {"network_def#channels": [4, 8, 16, 32]},
    "seg_transunet": {"network_def#feature_size": 4, "network_def#hidden_size": 16, "network_def#num_layers": 1, "network_def#num_heads": 2, "network_def#mlp_dim": 32},
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_bundle_dataset):
    return tiny_bundle_dataset(tmp_path_factory.mktemp("segdata") / "data", n=3)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["seg_unet", "seg_transunet"])
def test_segmentation_bundle_train_evaluate_infer_and_table5(name, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # bundles include transforms/*.yaml relative to the repository root
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    bundle = tmp_path / name
    shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
    cfg = str(bundle / "configs" / "train.yaml")
    common = {"bundle_root": str(bundle), "dataset_dir": str(tiny_data), "roi_size": [16, 16, 16], **TINY[name]}
    mlruns = f"sqlite:///{tmp_path}/mlruns.db"
    bundle_run(
        "training", config_file=cfg, tracking="mlflow", tracking_uri=mlruns, run_name=f"{name}_test",
        max_epochs=2, val_interval=1, batch_size=1, num_samples=1, **common,
    )
    assert (bundle / "models" / "model.pt").exists()
    cases = pd.read_csv(bundle / "eval" / "validation_cases.csv")
    assert len(cases) == 3 and np.isfinite(cases["hd95_mean"]).all() and cases["dice_mean"].between(0, 1).all()

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(r.info.run_name == f"{name}_test" for r in runs)
    metric_keys = set().union(*(r.data.metrics.keys() for r in runs))
    assert {"val_mean_dice", "dice_mean", "hd95_mean"} <= metric_keys

    bundle_run("evaluating", config_file=[cfg, str(bundle / "configs" / "evaluate.yaml")], **common)
    assert len(pd.read_csv(bundle / "eval" / "test_cases.csv")) == 3
    assert (bundle / "eval" / "metrics.csv").exists()

    subject = load_datalist(tiny_data / "dataset.json", "test")[0]
    bundle_run(
        "inference", config_file=str(bundle / "configs" / "inference.yaml"),
        t1_files=[subject["t1"]], t2_files=[subject["t2"]], output_dir=str(tmp_path / "infer"),
        **{k: v for k, v in common.items() if k != "dataset_dir"},
    )
    out = list((tmp_path / "infer").glob("*_seg.nii.gz"))
    assert len(out) == 1
    seg, ref = nib.load(str(out[0])), nib.load(subject["t1"])
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}

    segmenter = FrozenSegmenter(bundle, overrides={"roi_size": [16, 16, 16], **TINY[name]})
    res = tmp_path / "res"
    evaluate_methods(select_subjects(tiny_data, "test", max_subjects=2), ["trilinear"], load_protocol("nexus"), res, lpips=False, progress=False, segmenters={name: segmenter})
    t5 = pd.read_csv(res / "table5.csv")
    assert list(t5["input"]) == ["Original LR", "trilinear", "Original HR"]
    assert np.isfinite(t5["hd95_mean_mean"]).all()
    md = (res / "table5.md").read_text()
    assert "| Original HR |" in md and "Empty-region policy" in md


def test_missing_segmenter_weights_is_one_clear_error(tmp_path):
    from nexus_monai.errors import NexusInputError

    shutil.copytree(REPO / "bundles" / "seg_unet" / "configs", tmp_path / "seg_unet" / "configs")
    with pytest.raises(NexusInputError, match="no trained weights"):
        FrozenSegmenter(tmp_path / "seg_unet")


def test_inputs_off_the_label_grid_are_resampled_with_a_warning(caplog):
    import torch
    from monai.data import MetaTensor

    from nexus_monai.evaluation.downstream import segmentation_rows
    from nexus_monai.geometry import make_affine, thick_slice_affine

    a = make_affine((2.0, 2.0, 2.0), (0, 0, 0))
    seg = torch.zeros(1, 16, 16, 16)
    seg[0, 4:10, 4:10, 4:10] = 2
    seg[0, 6:8, 6:8, 6:8] = 4
    seg = MetaTensor(seg, affine=a)
    img = MetaTensor((seg > 0).float() * 100 + 1, affine=a)
    coarse = MetaTensor(img[:, :, :, ::2].clone(), affine=thick_slice_affine(a, "z", 2))
    seen = []

    def oracle(t1, t2):  # "segments" the bright region; records the grid it was given
        seen.append(tuple(t1.shape[1:]))
        wt = t1[0] > 50
        return torch.stack([wt, wt, torch.zeros_like(wt)])

    with caplog.at_level("WARNING"):
        rows = segmentation_rows("s1", {"HR": {"t1": img, "t2": img}, "LR": {"t1": coarse, "t2": img}}, seg, {"oracle": oracle})
    assert seen == [(16, 16, 16), (16, 16, 16)]
    assert [r["resampled"] for r in rows] == [False, True]
    assert "resampled" in caplog.text
    assert rows[0]["dice_WT"] == pytest.approx(1.0) and rows[0]["dice_ET"] == 0.0
    assert rows[0]["empty_cases"] == 1  # ET: prediction empty, GT not -> counted


@pytest.mark.integration
def test_multi_gpu_overlay_runs_two_gloo_processes(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 with the DDP overlay (gloo on CPU) trains, validates, saves."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", "['bundles/seg_unet/configs/train.yaml','bundles/seg_unet/configs/multi_gpu_train.yaml']",
        "--dataset_dir", str(tiny_data), "--bundle_root", str(tmp_path), "--max_epochs", "2", "--val_interval", "1",
        "--batch_size", "1", "--num_samples", "1", "--roi_size", "[16,16,16]", "--network_def#channels", "[4,8,16,32]",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").exists()
    assert len(pd.read_csv(tmp_path / "eval" / "validation_cases.csv")) == 3
