"""README command (a) leaves the checkout clean: run in a temporary `git clone` of this repository (with
the command's own text, shrunk by overrides to 1 epoch on one tiny subject), it trains into
runs/nexus_inr/, evaluates THAT model, and `git status` shows nothing afterwards (the shipped weights
untouched). The clone's code is the one imported (PYTHONPATH), so the test sees the committed tree."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_OVERRIDES = ["--max_epochs", "1", "--val_interval", "1", "--patch_size", "[16,16,16]", "--num_points", "256"]
EVAL_OVERRIDES = ["--max-subjects", "1", "--no-lpips", "--no-mlflow", "--quiet"]


def command_a() -> list[str]:
    """The line after README's ``# (a)`` comment, split at ``&&`` into its commands."""
    lines = (REPO / "README.md").read_text().splitlines()
    line = next(lines[i + 1] for i, ln in enumerate(lines) if ln.startswith("# (a)"))
    return [part.strip() for part in line.split("&&")]


def _git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_command_a_trains_into_a_run_folder_and_leaves_git_status_clean(tmp_path, tiny_bundle_dataset):
    clone = tmp_path / "repo"
    _git("clone", "-q", str(REPO), str(clone), cwd=tmp_path)
    data = tiny_bundle_dataset(tmp_path / "data", n=1)
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    parts = command_a()
    installs = [p for p in parts if p.startswith("pip install")]  # the suite's environment is installed already
    assert len(installs) == 3 and parts[:3] == installs
    parts = parts[3:]
    assert [p.split()[:4] for p in parts] == [["python", "-m", "monai.bundle", "run"],
                                              ["nexus-sr", "evaluate", "--data", "embedded"]]
    train, evaluate = (shlex.split(p) for p in parts)
    train = [sys.executable, *train[1:], "--dataset_dir", str(data), *TRAIN_OVERRIDES]
    evaluate = [sys.executable, "-m", "nexus_monai", *evaluate[1:], *EVAL_OVERRIDES]
    evaluate[evaluate.index("--data") + 1] = str(data)
    for cmd in (train, evaluate):
        done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(cmd)}\n{done.stderr[-3000:]}"

    run = clone / "runs" / "nexus_inr" / "models"
    record = json.loads((run / "training_run.json").read_text())
    assert (run / "model.pt").is_file() and record["epochs"] == 1 and record["finished"] is True
    weights = evaluate[evaluate.index("--weights") + 1]
    assert weights == "nexus_inr=runs/nexus_inr/models/model.pt"
    table = pd.read_csv(clone / "results" / "table1_nexus_inr" / "table1.csv").set_index("method")
    # the evaluated model is the run's: its training budget is the run's record, not the shipped one's 800 steps
    assert table.loc["nexus_inr", "train_steps"] == record["steps"] and table.loc["nexus_inr", "failed"] == 0
    assert _git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""
