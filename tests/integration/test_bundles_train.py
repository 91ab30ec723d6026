"""Every bundle's README training command, then its evaluation command, on a tiny dataset written by
the CURRENT embedded-data generator (``nexus_monai.data.synth``).

The other bundle tests train on hand-made subjects (``tests/conftest.py``) that only have the keys
those tests were written for. Here the subjects come from ``generate_dataset`` itself, with every
datalist key it writes today (``lesions`` since generator 2.0.0), so a key the generator gains
reaches every bundle's transforms in this test before it reaches a user: ArSSR and CycleINR once
framed the lesion map without loading it and failed before the first step, unnoticed.

Tiny: 2 ``small`` subjects (2 mm) coarsened 3x to 6 mm (40 x 40 x 26 voxels; block mean for
images, centre voxel for label maps, affines kept consistent), every subject in every split,
tiny networks and one short epoch through each bundle's own override keys.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from monai.bundle import run as bundle_run

from nexus_monai.data.io import load_volume
from nexus_monai.data.synth import generate_dataset
from nexus_monai.keys import LESIONS
from nexus_monai.transforms import PadToFramed
from nexus_monai.transforms.protocols import load_protocol

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parents[1].name for p in (REPO / "bundles").glob("*/configs/train.yaml"))
COARSEN = 3  # 2 mm -> 6 mm
SHORT = {"max_epochs": 1, "val_interval": 1}
INR_TINY = {"network_def#features": 4, "network_def#encoder_options": {"blocks": 1, "layers": 1, "growth": 4},
            "network_def#decoder_hidden": 16, "patch_size": [16, 16, 16]}
# per bundle: the overrides that make its network and schedule tiny (its own config keys)
TINY = {
    "nexus_inr": {**SHORT, **INR_TINY, "network_def#attn_heads": 2, "num_points": 128, "batch_size": 1},
    "arssr": {**SHORT, **INR_TINY, "num_points": 128},
    "cycleinr": {**SHORT, **INR_TINY, "network_def#attn_heads": 2, "num_lines": 8},
    "saint": {**SHORT, "patch_size": [12, 12, 12], "network_def#features": 4, "network_def#blocks": 1,
              "network_def#fusion_features": 4, "network_def#fusion_blocks": 1},
    "i3net": {**SHORT, "patch_size": [12, 12, 12], "network_def#features": 4, "network_def#blocks": 1},
    "seg_unet": {**SHORT, "roi_size": [16, 16, 16], "batch_size": 1, "num_samples": 1,
                 "network_def#channels": [4, 8, 16, 32]},
    "seg_transunet": {**SHORT, "roi_size": [16, 16, 16], "batch_size": 1, "num_samples": 1,
                      "network_def#feature_size": 4, "network_def#hidden_size": 16, "network_def#num_layers": 1,
                      "network_def#num_heads": 2, "network_def#mlp_dim": 32},
    "ssmcsr": {"max_subjects": 1, **{f"fit#{k}": v for k, v in dict(
        hidden=16, trunk_layers=2, head_hidden=8, num_frequencies=16, mi_points=2000, batch_size=256, epochs=1,
        max_seconds=None).items()}},
}


def _coarsen(path: Path, k: int = COARSEN) -> None:
    """Rewrite a NIfTI at ``k`` x its voxel size: images by block mean, integer label maps by the block's
    centre voxel (both sample the same point: the block centre, which the new affine's voxel centres are)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    data = data[tuple(slice(0, s // k * k) for s in data.shape)]
    if np.issubdtype(data.dtype, np.integer):
        out = data[k // 2::k, k // 2::k, k // 2::k]
    else:
        x, y, z = (s // k for s in data.shape)
        out = data.reshape(x, k, y, k, z, k).mean((1, 3, 5)).astype(data.dtype)
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.full(3, (k - 1) / 2)
    affine[:3, :3] *= k
    nib.save(nib.Nifti1Image(out, affine), str(path))


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """2 subjects from the current generator, coarsened, every subject in every split; returns the folder."""
    root = generate_dataset(tmp_path_factory.mktemp("synth") / "data", subjects=2, seed=0, size="small", test_anatomy=0)
    datalist = json.loads((root / "dataset.json").read_text())
    everyone = sorted((e for part in ("training", "validation", "test") for e in datalist[part]),
                      key=lambda e: e["subject"])
    for entry in everyone:
        for value in entry.values():
            if isinstance(value, str) and value.endswith((".nii", ".nii.gz")):
                _coarsen(root / value)
    datalist["training"] = datalist["validation"] = datalist["test"] = everyone
    (root / "dataset.json").write_text(json.dumps(datalist, indent=1))
    # the fixture exercises what it is for: the generator's lesion maps, with lesions left after coarsening
    assert all(LESIONS in e for e in everyone)
    assert all(np.asarray(nib.load(str(root / e[LESIONS])).dataobj).any() for e in everyone)
    return root


def _readme_command(name: str, workflow: str) -> list[str]:
    """The bundle README's ``python -m monai.bundle run <workflow> --config_file ...`` line, as config paths
    relative to the repository root (optional ``[--flag ...]`` parts dropped)."""
    readme = (REPO / "bundles" / name / "docs" / "README.md").read_text()
    for line in readme.splitlines():
        if f"-m monai.bundle run {workflow} --config_file" in line and not line.lstrip().startswith("torchrun"):
            args = shlex.split(line.split("[--")[0].split("#")[0])
            config = args[args.index("--config_file") + 1]
            files = config.strip("[]").replace("'", "").split(",") if config.startswith("[") else [config]
            return [f.strip() for f in files]
    raise AssertionError(f"bundles/{name}/docs/README.md has no `monai.bundle run {workflow}` command")


def _run(name: str, workflow: str, workdir: Path, bundle: Path, data: Path, **extra) -> None:
    """Run the README command from ``workdir`` (holding ``bundles/<name>/configs``, a copy of the bundle)."""
    configs = [str(workdir / f) for f in _readme_command(name, workflow)]
    assert all(Path(c).is_file() for c in configs), configs
    bundle_run(workflow, config_file=configs if len(configs) > 1 else configs[0], bundle_root=str(bundle),
               dataset_dir=str(data), **TINY[name], **extra)


def test_every_bundle_has_tiny_overrides():
    """A new bundle must join this test (with overrides that make it tiny) to be covered."""
    assert sorted(TINY) == BUNDLES


@pytest.mark.parametrize("name", BUNDLES)
def test_readme_training_then_evaluation_on_the_current_generator(name, synth_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")  # never the user's store
    bundle = tmp_path / "bundles" / name
    shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
    monkeypatch.chdir(tmp_path)  # the README's relative config paths now name the copy
    subjects = sorted(e["subject"] for e in json.loads((synth_data / "dataset.json").read_text())["validation"])

    _run(name, "training", tmp_path, bundle, synth_data)
    if name == "ssmcsr":  # subject-specific: `training` fits the test split, no weights
        rows = pd.read_csv(bundle / "eval" / "fit_subjects.csv")
        assert len(rows) == 1 and np.isfinite(rows[["psnr_t1", "psnr_t2"]].to_numpy()).all()
        hr = load_volume(synth_data / json.loads((synth_data / "dataset.json").read_text())["test"][0]["t1"])
        ref = PadToFramed("t1", load_protocol("nexus").config["frame_mm"])({"t1": hr})["t1"]  # HR voxels, protocol frame
        out = nib.load(str(bundle / "eval" / rows["subject"][0] / "t1w_sr.nii.gz"))
        assert out.shape == tuple(ref.shape[1:]) and np.allclose(out.affine, ref.affine.numpy(), atol=1e-4)
        _run(name, "evaluating", tmp_path, bundle, synth_data)
        assert len(pd.read_csv(bundle / "eval" / "test_subjects.csv")) == 1
        return

    assert (bundle / "models" / "model.pt").is_file()
    if name in ("nexus_inr", "arssr", "cycleinr"):
        rows = pd.read_csv(bundle / "eval" / "validation_subjects.csv")
        assert len(rows) == len(subjects)
        assert np.isfinite(rows[["model_psnr_t1", "model_psnr_t2", "model_ssim_t2"]].to_numpy()).all()
        lesion = rows.filter(like="lesion")  # the lesion map reached validation and was scored
        assert lesion.shape[1] > 0 and np.isfinite(lesion.to_numpy(float)).any()
        _run(name, "evaluating", tmp_path, bundle, synth_data)
        assert len(pd.read_csv(bundle / "eval" / "evaluation_subjects.csv")) == len(subjects)
    elif name.startswith("seg_"):
        cases = pd.read_csv(bundle / "eval" / "validation_cases.csv")
        assert len(cases) == len(subjects) and cases["dice_mean"].between(0, 1).all()
        _run(name, "evaluating", tmp_path, bundle, synth_data)
        assert len(pd.read_csv(bundle / "eval" / "test_cases.csv")) == len(subjects)
    else:  # slice-stack baselines (saint, i3net)
        _run(name, "evaluating", tmp_path, bundle, synth_data)
    metrics = dict(pd.read_csv(bundle / "eval" / "metrics.csv", header=None).to_numpy())  # MetricsSaver: name,value
    scores = [float(v) for k, v in metrics.items() if "psnr" in k or "dice" in k]
    assert scores and np.isfinite(scores).all(), metrics


def _transform_lists(node):
    """Every list of transform dicts (``_target_``) anywhere in a parsed config."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _transform_lists(value)
    elif isinstance(node, list):
        if any(isinstance(x, dict) and "_target_" in x for x in node):
            yield node
        for value in node:
            yield from _transform_lists(value)


def _keys(item) -> set:
    keys = item.get("keys", [])
    return {keys} if isinstance(keys, str) else set(keys)


@pytest.mark.parametrize("path", sorted((REPO / "bundles").glob("*/configs/*.yaml")),
                         ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_every_framed_key_is_loaded_or_dropped_first(path):
    """Static form of the same guard: a key the frame lists is loaded (or deleted) earlier in the same list."""
    config = yaml.safe_load(path.read_text()) or {}
    for steps in _transform_lists(config):
        loaded, dropped = set(), set()
        for item in steps:
            target = str(item.get("_target_", "")) if isinstance(item, dict) else ""
            if target.endswith("LoadVolumed"):
                loaded |= _keys(item)
            elif target.endswith("DeleteItemsd"):
                dropped |= _keys(item)
            elif target.endswith("PadToFramed"):
                missing = _keys(item) - loaded - dropped
                assert not missing, f"{path.relative_to(REPO)}: the frame lists {sorted(missing)}, never loaded before it"


def test_frame_names_a_key_that_was_never_loaded():
    """The failure this module guards against, as a one-line error instead of `'str' has no attribute`."""
    image = torch.zeros(1, 4, 4, 4)
    from monai.data import MetaTensor

    frame = PadToFramed(keys=["t1", LESIONS], frame_mm=(24, 24, 24), allow_missing_keys=True)
    with pytest.raises(TypeError, match=r"key 'lesions' holds 'a/b_lesions.nii.gz', not a loaded image"):
        frame({"t1": MetaTensor(image), LESIONS: "a/b_lesions.nii.gz"})
    assert frame({"t1": MetaTensor(image)})["t1"].shape == (1, 24, 24, 24)  # absent keys stay allowed
