"""Bundles stand alone: a bundle folder copied anywhere runs with `python -m monai.bundle run` from any
working directory; configs hold every piece they need (no file macros, copies equal to the protocol
files); the protocol YAMLs and the metadata schema ship in a plain (non-editable) wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

from nexus_monai import bundle_paths
from nexus_monai.transforms.protocols import load_protocol

REPO = Path(__file__).resolve().parents[1]
BUNDLE_CONFIGS = sorted((REPO / "bundles").glob("*/configs/*.yaml"))
TINY = ["--network_def#features", "4", "--network_def#encoder_options", "{'blocks':1,'layers':1,'growth':4}",
        "--network_def#decoder_hidden", "16", "--network_def#attn_heads", "2", "--patch_size", "[16,16,16]",
        "--num_points", "64", "--batch_size", "1", "--max_epochs", "1", "--val_interval", "1", "--ckpt_interval", "1"]


@pytest.mark.parametrize("path", BUNDLE_CONFIGS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_configs_include_no_other_file(path):
    """No `%file#id` macro: MONAI resolves those against the working directory."""
    text = path.read_text()
    assert not re.search(r"%[^\s\"'#]+\.(ya?ml|json)#", text), f"{path} includes another file"
    if re.search(r"^bundle_root:", text, flags=re.M):
        assert "bundle_paths.bundle_root()" in text  # never a path relative to the working directory


@pytest.mark.parametrize("name", ["nexus_inr", "arssr", "cycleinr", "saint", "i3net"])
def test_copied_protocol_equals_the_protocol_file(name):
    """The acquisition protocol copied into a bundle is the package's `nexus` protocol, section by section."""
    bundle = yaml.safe_load((REPO / "bundles" / name / "configs" / "train.yaml").read_text())
    source = yaml.safe_load((REPO / "transforms" / "brats_t1axial_t2coronal.yaml").read_text())
    assert bundle["protocol"] == source["protocol"] == load_protocol("nexus").config
    pre = bundle.get("preprocessing")
    if name in ("nexus_inr", "arssr", "cycleinr"):  # the INR bundles list frame + both acquisitions in preprocessing
        assert source["frame"] in pre and source["acquisition"][0] in pre and source["acquisition"][1] in pre


def test_bundle_root_of_and_argv():
    assert bundle_paths.bundle_root_of("/x/nexus_inr/configs/train.yaml") == str(Path("/x/nexus_inr").resolve())
    assert bundle_paths._config_from_argv(["run", "--config_file", "['/a/b/configs/t.yaml','/a/b/configs/e.yaml']"]) \
        == "/a/b/configs/t.yaml"
    assert bundle_paths._config_from_argv(["run", "--config_file=/c/configs/x.yaml"]) == "/c/configs/x.yaml"


def test_bundle_root_without_a_workflow_asks_for_it(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    import nexus_monai

    parser = ConfigParser({"bundle_root": "$nexus_monai.bundle_paths.bundle_root()"}, globals={"nexus_monai": nexus_monai})
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("bundle_root")
    assert "--bundle_root" in str(err.value.__cause__)  # MONAI wraps the expression's error


def test_default_bundle_hint(tmp_path, monkeypatch):
    assert bundle_paths.default_bundle("nexus_inr") == REPO / "bundles" / "nexus_inr"
    monkeypatch.setenv("NEXUS_MONAI_BUNDLES", str(tmp_path))
    from nexus_monai.errors import NexusInputError

    with pytest.raises(NexusInputError, match="pass --bundle"):
        bundle_paths.default_bundle("nexus_inr")


def test_copied_bundle_trains_from_another_folder(tiny_bundle_dataset, tmp_path):
    """The real CLI, as a user types it: absolute config path, working directory elsewhere, a copied
    and zipped-then-unzipped bundle; outputs land in the copied bundle's own folder."""
    data = tiny_bundle_dataset(tmp_path / "data", n=3)
    archive = tmp_path / "nexus_inr.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (REPO / "bundles" / "nexus_inr").rglob("*"):
            if f.is_file() and "models" not in f.parts and "eval" not in f.parts:
                zf.write(f, Path("nexus_inr") / f.relative_to(REPO / "bundles" / "nexus_inr"))
    elsewhere = tmp_path / "unzipped"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(elsewhere)
    bundle = elsewhere / "nexus_inr"
    workdir = tmp_path / "somewhere_else"
    workdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(bundle / "configs" / "train.yaml"),
           "--dataset_dir", str(data), *TINY]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    assert (bundle / "eval" / "validation_subjects.csv").is_file()
    assert not any(workdir.iterdir())  # nothing written where the command was typed


def test_wheel_ships_protocols_and_schema(tmp_path):
    """A plain `pip install .` (a wheel, not editable) reads the protocols and the schema from the package."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "bundles", "tests", "docs", "*.egg-info", "build",
                                                              "__pycache__", ".pytest_cache", "results", "runs", "data"))
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = wheels.glob("nexus_monai-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"nexus_monai/protocols/brats_t1axial_t2coronal.yaml", "nexus_monai/protocols/ssmcsr_x4.yaml",
            "nexus_monai/bundle_schema/meta_schema.json"} <= names
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # what pip install does with a pure-Python wheel
        zf.extractall(target)
    code = ("import nexus_monai, sys; from nexus_monai.transforms.protocols import load_protocol; "
            "from nexus_monai.bundle_paths import metadata_schema_path; "
            "assert nexus_monai.__file__.startswith(sys.argv[1]); "
            "print(load_protocol('nexus').config['contrasts']['t2']['factor'], load_protocol('ssmcsr').name, "
            "metadata_schema_path().is_file())")
    env = {k: v for k, v in os.environ.items() if k != "NEXUS_MONAI_TRANSFORMS"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4", "ssmcsr", "True"]
