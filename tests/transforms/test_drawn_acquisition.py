"""The drawn thick-slice acquisition (issue 27): every config passes it, the LR scans carry it in
their affine and noise only, and no method reads more than a NIfTI header tells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor

from nexus_monai.data.io import load_volume, save_volume
from nexus_monai.geometry import TargetGrid, make_affine, voxel_to_world
from nexus_monai.transforms.acquisition import (
    DRAWN_KEY_ARGUMENTS,
    SimulateAnisotropicAcquisitiond,
    drawn_acquisition_arguments,
)

ROOT = Path(__file__).resolve().parents[2]
HR_AFFINE = make_affine((2.0, 2.0, 2.0), (-15.0, 3.0, 11.0))
SIMULATION = "SimulateAnisotropicAcquisitiond"


def _simulations(node, found: list) -> list:
    """Every mapping whose ``_target_`` is the dictionary acquisition transform, anywhere in ``node``."""
    if isinstance(node, dict):
        target = str(node.get("_target_", ""))
        if target.split(".")[-1] == SIMULATION:
            found.append(node)
        for value in node.values():
            _simulations(value, found)
    elif isinstance(node, list):
        for value in node:
            _simulations(value, found)
    return found


def _config_files() -> list[Path]:
    files = sorted((ROOT / "transforms").glob("*.yaml"))
    for pattern in ("*.yaml", "*.yml", "*.json"):
        files += sorted((ROOT / "bundles").glob(f"*/configs/**/{pattern}"))
    return files


def test_every_config_that_simulates_scans_passes_the_drawn_acquisition():
    checked = []
    for path in _config_files():
        text = path.read_text()
        content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        for node in _simulations(content, []):
            contrast = node["keys"] if isinstance(node["keys"], str) else node["keys"][0]
            missing = [a for a in DRAWN_KEY_ARGUMENTS if a not in node]
            assert not missing, f"{path.relative_to(ROOT)}: {contrast} acquisition does not pass {missing}"
            want = drawn_acquisition_arguments(contrast)
            assert {a: node[a] for a in DRAWN_KEY_ARGUMENTS} == want, f"{path.relative_to(ROOT)}: {contrast}"
            checked.append(path)
    # the shared protocol and the bundles that simulate their own validation scans
    names = {p.relative_to(ROOT).as_posix() for p in checked}
    assert {"transforms/brats_t1axial_t2coronal.yaml", "bundles/nexus_inr/configs/train.yaml",
            "bundles/arssr/configs/train.yaml", "bundles/cycleinr/configs/train.yaml"} <= names


def _hr(values: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32)[None], affine=HR_AFFINE.clone())


def test_drawn_slab_offset_is_in_the_affine_and_lr_comes_from_the_noise_free_render():
    n = 16
    world_z = voxel_to_world(torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"),
                                         -1).reshape(-1, 3), HR_AFFINE)[:, 2].reshape(n, n, n)
    clean = (world_z + 100.0).numpy()  # a ramp of world z: each LR value must equal its own centre's world z
    noisy = clean + np.random.default_rng(0).normal(0, 5.0, clean.shape)
    data = {"t1": _hr(noisy), "t1_clean": _hr(clean), "t1_slice_profile": "gaussian", "t1_thickness_ratio": 1.2,
            "t1_slab_offset": 0.3, "t1_lr_noise": 0.0, "t1_noise_seed": 3}
    out = SimulateAnisotropicAcquisitiond("t1", "z", 2, output_keys="t1_lr",
                                          **drawn_acquisition_arguments("t1"))(data)["t1_lr"]
    assert out.shape == (1, n, n, n // 2)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in out.shape[1:]], indexing="ij"),
                      -1).reshape(-1, 3)
    lr_world_z = voxel_to_world(idx, out.affine)[:, 2].reshape(out.shape[1:])
    inner = slice(2, n // 2 - 2)  # away from the border, where the cut kernel is renormalised
    np.testing.assert_allclose(out[0][..., inner].numpy(), lr_world_z[..., inner].numpy() + 100.0, atol=1e-3)
    # the first slab centre sits 0.3 HR voxel (0.6 mm) above the undrawn one: HR z index 0.5 + 0.3
    assert float(out.affine[2, 3]) == pytest.approx(11.0 + 2.0 * 0.8)
    assert out.meta["acquisition"] == {"axis": 2, "factor": 2.0}  # the header's facts only


def test_drawn_noise_is_rician_on_the_lr_scan_only_and_reproducible():
    rng = np.random.default_rng(1)
    clean = np.zeros((16, 16, 16))
    clean[3:13, 3:13, 2:14] = 100.0 + rng.uniform(0, 20, (10, 10, 12))
    base = {"t2": _hr(clean), "t2_slice_profile": "boxcar", "t2_thickness_ratio": 0.8, "t2_slab_offset": -0.2,
            "t2_noise_seed": 7}
    make = SimulateAnisotropicAcquisitiond("t2", "y", 4, output_keys="t2_lr", **drawn_acquisition_arguments("t2"))
    quiet = make({**base, "t2_lr_noise": 0.0})["t2_lr"]
    noisy = make({**base, "t2_lr_noise": 0.03})["t2_lr"]
    again = make({**base, "t2_lr_noise": 0.03})["t2_lr"]
    assert torch.equal(noisy, again)
    assert torch.equal(noisy == 0, quiet == 0)  # outside the brain stays 0
    inside = quiet[0] > quiet.max() * 0.5
    sigma = 0.03 * float(torch.quantile(quiet[quiet != 0].double(), 0.995))
    resid = (noisy[0] - quiet[0])[inside].double()
    assert float(resid.std()) == pytest.approx(sigma, rel=0.25)
    assert torch.equal(base["t2"], _hr(clean))  # the HR ground truth is untouched


def _round_trip(img: MetaTensor, path: Path) -> MetaTensor:
    save_volume(img[0], path, affine=img.affine)
    return load_volume(path)


def test_every_method_sees_only_the_header(tmp_path):
    """Outputs unchanged when the simulated scans (drawn profile, gap, offset, noise) make a NIfTI round trip."""
    from nexus_monai.engines.consistency import GuardOptions, consistency_guard
    from nexus_monai.engines.inr import ImplicitGridInferer
    from nexus_monai.engines.predict import predict_volumes
    from nexus_monai.evaluation.methods import get_method
    from nexus_monai.geometry import WorldNormalizer
    from nexus_monai.transforms.observations import lr_observations
    from tests.helpers import tiny_net

    rng = np.random.default_rng(2)
    x, y, z = np.meshgrid(*[np.arange(16)] * 3, indexing="ij")
    brain = (x - 7.5) ** 2 + (y - 7.5) ** 2 + (z - 7.5) ** 2 < 49
    hr = {c: np.where(brain, 100.0 + 30 * np.sin(x / 2.0 + s) * np.cos(z / 3.0) + rng.normal(0, 2, brain.shape), 0.0)
          for c, s in (("t1", 0.0), ("t2", 1.0))}
    data = {"t1": _hr(hr["t1"]), "t2": _hr(hr["t2"]),
            "t1_slice_profile": "boxcar", "t1_thickness_ratio": 0.8, "t1_slab_offset": 0.3, "t1_lr_noise": 0.02,
            "t1_noise_seed": 1, "t2_slice_profile": "gaussian", "t2_thickness_ratio": 1.25, "t2_slab_offset": -0.4,
            "t2_lr_noise": 0.01, "t2_noise_seed": 2}
    for c, axis, k in (("t1", "z", 2), ("t2", "y", 4)):
        acquire = SimulateAnisotropicAcquisitiond(c, axis, k, output_keys=f"{c}_lr", **drawn_acquisition_arguments(c))
        data = acquire(data)
    simulated = {f"{c}_lr": data[f"{c}_lr"] for c in ("t1", "t2")}
    read = {k: _round_trip(v, tmp_path / f"{k}.nii.gz") for k, v in simulated.items()}
    assert "acquisition_draw" not in read["t1_lr"].meta
    grid = TargetGrid((16, 16, 16), HR_AFFINE.clone())

    def outputs(inputs):
        res = {m: get_method(m)(inputs, grid) for m in ("trilinear", "cubic", "ibp")}
        res["lrtv"] = {"t1": get_method("lrtv")(inputs, grid, iterations=2)["t1"]}
        raw = predict_volumes(tiny_net(0).eval(), inputs["t1_lr"], inputs["t2_lr"], grid, ImplicitGridInferer())
        res["network"] = raw
        lr = {c: inputs[f"{c}_lr"] for c in ("t1", "t2")}
        res["network_guarded"] = consistency_guard(raw, lr, grid, GuardOptions())[0]
        norm = WorldNormalizer.from_grids([(tuple(v.shape[1:]), v.affine) for v in inputs.values()])
        obs = lr_observations(inputs["t2_lr"], 100.0, norm, forward_model="profile")  # SSMCSR's forward model
        res["ssmcsr_observations"] = {"t2": torch.cat([obs.centres.flatten(), obs.offsets.flatten(),
                                                       obs.weights.flatten(), obs.step])}
        return res

    before, after = outputs(simulated), outputs(read)
    for method, pred in before.items():
        for c, v in pred.items():
            a, b = torch.as_tensor(v).float(), torch.as_tensor(after[method][c]).float()
            scale = float(a.abs().max()) or 1.0
            assert torch.allclose(a, b, atol=1e-4 * scale), f"{method} {c} changed after a NIfTI round trip"
