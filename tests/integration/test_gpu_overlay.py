"""configs/gpu.yaml: merges over train.yaml, train.yaml + paper.yaml (+ an experiment) and inference.yaml,
and a bundle training with it runs on a CPU-only machine (bf16 autocast on CPU, persistent workers),
leaving an fp32 checkpoint. Tiny data and network."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser

from nexus_monai.engines.inr import ImplicitGridInferer, INRTrainStep
from nexus_monai.engines.predict import bundle_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "nexus_inr" / "configs"
TINY_CLI = ["--network_def#features", "4", "--network_def#encoder_options", "{'blocks':1,'layers':1,'growth':4}",
            "--network_def#decoder_hidden", "16", "--network_def#attn_heads", "2", "--patch_size", "[16,16,16]",
            "--num_points", "128", "--batch_size", "1"]


@pytest.mark.parametrize("overlays", [[], ["paper.yaml"], ["paper.yaml", "experiments/baseline.yaml"]])
def test_gpu_overlay_merges_over_training_configs(overlays):
    files = [str(CONFIGS / f) for f in ["train.yaml", *overlays, "gpu.yaml"]]
    parser = ConfigParser()
    parser.read_config(files)
    train_only = ConfigParser.load_config_files([str(CONFIGS / f) for f in ["train.yaml", *overlays]])
    assert parser["amp"] is True
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, ImplicitGridInferer) and inferer.amp and inferer.chunk_size == 262144
    assert inferer.max_memory_gib == "auto"
    step = parser.get_parsed_content("train#trainer#iteration_update")
    assert isinstance(step, INRTrainStep) and step.amp and not step.channels_last
    # train.yaml's initialize steps kept, in order, the GPU settings after set_determinism (which resets cudnn)
    init = parser["initialize"]
    assert init[:len(train_only["initialize"])] == train_only["initialize"]
    assert any("cudnn, 'benchmark', True" in step for step in init[len(train_only["initialize"]):])
    assert parser["train#dataloader#pin_memory"] is True
    assert parser.get_parsed_content("train#dataloader#persistent_workers") is True
    assert parser["validate#dataloader#num_workers"] == 0
    # everything else as the configs below it say (the paper's width stays)
    for key in ("network_def", "loss", "patch_size", "batch_size", "learning_rate", "max_epochs", "intensity_norm"):
        assert parser[key] == train_only[key], key
    if overlays:
        assert parser["network_def"]["features"] == 128 and parser["batch_size"] == 22


def test_gpu_overlay_over_inference_config():
    with bundle_config(REPO / "bundles" / "nexus_inr", "inference.yaml",
                       [str(CONFIGS / "paper.yaml"), str(CONFIGS / "gpu.yaml")]) as (parser, _, _):
        parser["device"] = "$torch.device('cpu')"
        inferer = parser.get_parsed_content("inferer")
        assert inferer.amp and inferer.chunk_size == 262144 and inferer.intensity_norm == "zscore"
        assert parser["network_def"]["features"] == 128
    with bundle_config(REPO / "bundles" / "nexus_inr", "inference.yaml") as (parser, _, _):
        inferer = parser.get_parsed_content("inferer")
        assert not inferer.amp and inferer.chunk_size == 32768 and inferer.max_memory_gib == "auto"


def test_training_with_the_gpu_overlay_runs_on_cpu(tiny_bundle_dataset, tmp_path):
    data = tiny_bundle_dataset(tmp_path / "data", n=3)
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           "['bundles/nexus_inr/configs/train.yaml','bundles/nexus_inr/configs/gpu.yaml']",
           "--dataset_dir", str(data), "--bundle_root", str(root), "--max_epochs", "2", "--val_interval", "1",
           "--ckpt_interval", "1", "--num_workers", "1", *TINY_CLI]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)  # the checkpoint stays fp32
    rows = pd.read_csv(root / "eval" / "validation_subjects.csv")
    assert len(rows) >= 3 and rows.filter(like="psnr").notna().all().all()
