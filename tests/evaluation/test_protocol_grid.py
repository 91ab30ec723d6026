"""`nexus-sr evaluate --protocol <grid list>` on tiny subjects with the drawn acquisition (6 mm voxels)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from nexus_monai.cli import main
from nexus_monai.evaluation.methods import get_method
from nexus_monai.evaluation.protocol_grid import DERIVED
from nexus_monai.geometry import TargetGrid
from nexus_monai.transforms.protocols import load_protocol, protocol_grid


def _drawn_dataset(tiny_dataset, root, n=2):
    """The tiny dataset with noise-free renders (the HR scans before their noise) and a drawn acquisition."""
    root = tiny_dataset(root, n=n)
    datalist = json.loads((root / "dataset.json").read_text())
    rng = np.random.default_rng(0)
    for i, entry in enumerate(datalist["test"]):
        for c in ("t1", "t2"):
            img = nib.load(root / entry[c])
            clean = np.asarray(img.dataobj, dtype=np.float32)
            noisy = np.where(clean > 0, clean + rng.normal(0, 20, clean.shape), 0).astype(np.float32)
            path = entry[c].replace(".nii.gz", "_clean.nii.gz")
            nib.save(nib.Nifti1Image(clean, img.affine), str(root / path))
            nib.save(nib.Nifti1Image(noisy, img.affine), str(root / entry[c]))
            entry.update({f"{c}_clean": path, f"{c}_slice_profile": ("boxcar", "gaussian")[i % 2],
                          f"{c}_thickness_ratio": 0.8 + 0.3 * i, f"{c}_slab_offset": 0.3 - 0.5 * i,
                          f"{c}_lr_noise": 0.02, f"{c}_noise_seed": 10 + i})
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def test_grid_tables_resume_and_isotropic(tiny_dataset, tmp_path, capsys):
    data = _drawn_dataset(tiny_dataset, tmp_path / "data", n=1)
    out = tmp_path / "grid"
    args = ["evaluate", "--data", str(data), "--methods", "trilinear,ibp", "--protocol", "nexus,t2z2p5",
            "--split", "test", "--out", str(out), "--quiet", "--no-mlflow"]
    assert main(args) == 0
    assert "# Protocol grid" in capsys.readouterr().out
    rows = pd.read_csv(out / "per_subject.csv")
    assert len(rows) == 2 * 2 and (rows["error"].fillna("") == "").all()
    for name in ("nexus", "t2z2p5"):
        assert (out / name / "test" / "table1.md").read_text().startswith(f"# Protocol {name} (small world)")
    # scored against the noise-free render, the noisy HR scan beside: the noise costs PSNR there
    assert (rows["noisy_gt_psnr_t1"] < rows["psnr_t1"]).all()
    # plain evaluate scores the same way: the noisy-GT columns beside the noise-free ones
    single = tmp_path / "single"
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear", "--protocol", "nexus", "--out",
                 str(single), "--quiet", "--no-mlflow", "--no-lpips"]) == 0
    plain = pd.read_csv(single / "per_subject.csv")
    grid_row = rows[(rows["protocol"] == "nexus") & (rows["method"] == "trilinear")].iloc[0]
    assert plain["psnr_t1"].iloc[0] == pytest.approx(grid_row["psnr_t1"])
    assert plain["noisy_gt_psnr_t1"].iloc[0] == pytest.approx(grid_row["noisy_gt_psnr_t1"])
    # resumable: a stored row is kept, not recomputed
    row_file = next((out / "nexus" / "test" / "rows").glob("*__ibp.json"))
    row = json.loads(row_file.read_text())
    row["psnr_t1"] = 123.0
    row_file.write_text(json.dumps(row))
    assert main(args) == 0
    again = pd.read_csv(out / "nexus" / "test" / "per_subject.csv")
    assert 123.0 in again.loc[again["method"] == "ibp", "psnr_t1"].tolist()


def test_isotropic_and_non_integer_inputs_go_through_the_methods(tiny_dataset, tmp_path):
    """Factor 1 (T1w) through interpolation, ibp (the grid's derived one = the registered one) and a tiny
    network with the guard (the non-integer factor 2.5 goes through the grid run above)."""
    from nexus_monai.data.datalist import load_datalist
    from nexus_monai.engines.consistency import GuardOptions, consistency_guard
    from nexus_monai.engines.inr import ImplicitGridInferer
    from nexus_monai.engines.predict import predict_volumes
    from tests.helpers import tiny_net

    data = _drawn_dataset(tiny_dataset, tmp_path / "data", n=1)
    subject = load_datalist(data / "dataset.json", "test")[0]
    for protocol in ("t1iso_t2z5",):
        prepared = load_protocol(protocol).prepare_subject(subject)
        grid = TargetGrid.like(prepared["t1"])
        if protocol == "t1iso_t2z5":  # isotropic: same voxel size as the HR grid, slabs moved by the drawn offset
            assert prepared["t1_lr"].shape == prepared["t1"].shape
            assert float(prepared["t1_lr"].affine[2, 3] - prepared["t1"].affine[2, 3]) == pytest.approx(0.3 * 6.0)
        tri = get_method("trilinear")(prepared, grid)
        base, fn = DERIVED["ibp"]
        derived, registered = fn(tri, prepared, grid), get_method("ibp")(prepared, grid)
        for c in ("t1", "t2"):
            assert torch.allclose(derived[c].as_tensor(), registered[c].as_tensor())
        assert not torch.allclose(registered["t2"].as_tensor(), tri["t2"].as_tensor())  # the guard did work
        raw = predict_volumes(tiny_net(0).eval(), prepared["t1_lr"], prepared["t2_lr"], grid, ImplicitGridInferer())
        lr = {c: prepared[f"{c}_lr"] for c in ("t1", "t2")}
        guarded = consistency_guard(raw, lr, grid, GuardOptions())[0]
        cubic = get_method("cubic")(prepared, grid)
        per_scan = get_method("lrtv")(prepared, grid, iterations=1)  # no thick axis on T1w: B-spline onto the grid
        assert torch.allclose(per_scan["t1"].as_tensor(), cubic["t1"].as_tensor())
        for out in (cubic, per_scan, raw, guarded):
            for c in ("t1", "t2"):
                assert tuple(out[c].shape[-3:]) == grid.shape and torch.isfinite(out[c].as_tensor()).all()


def test_grid_file_and_unknown_names(tmp_path):
    entries = protocol_grid("grid")
    assert [e.name for e in entries] == ["nexus", "t1x2_t2z4", "t1z2_t2y6", "t1iso_t2z5", "t1y4_t2z2", "t2z2p5",
                                         "nexus_1mm"]
    assert entries[-1].world == "full" and entries[-1].protocol == "nexus"
    factors = {e.name: {c: v["factor"] for c, v in load_protocol(e.protocol).config["contrasts"].items()}
               for e in entries}
    assert factors["t1iso_t2z5"] == {"t1": 1, "t2": 5} and factors["t2z2p5"]["t2"] == 2.5
    code = main(["evaluate", "--data", str(tmp_path), "--methods", "trilinear", "--protocol", "nexus,nope",
                 "--out", str(tmp_path / "o"), "--quiet", "--no-mlflow"])
    assert code == 2
