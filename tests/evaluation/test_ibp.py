"""Back-projection baseline ``ibp`` (trilinear + predict's consistency guard) and its place in every table."""

import json
import math

import pandas as pd
import pytest
import torch

from helpers import add_t2_lesion
from nexus_monai.cli import main
from nexus_monai.engines.consistency import GuardOptions, consistency_guard
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.methods import get_method
from nexus_monai.evaluation.table1 import select_subjects
from nexus_monai.geometry import TargetGrid, spacing
from nexus_monai.metrics.lesion import lesion_geometry
from nexus_monai.transforms.consistency import AcquisitionModel, lr_residual
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.transforms.protocols import load_protocol, prepare_subject


@pytest.fixture(scope="module")
def subject(tiny_dataset, tmp_path_factory):
    root = tiny_dataset(tmp_path_factory.mktemp("ibp_data"), n=1)
    (entry,) = select_subjects(root, "test")
    return prepare_subject(entry, load_protocol("nexus"))


def _composition(data, options: GuardOptions) -> dict:
    """Trilinear (SimpleITK resampling) then the guard, composed here step by step."""
    grid = TargetGrid.like(data["t1"])
    lr = {c: data[f"{c}_lr"] for c in ("t1", "t2")}
    tri = {c: upsample(lr[c], grid, "trilinear") for c in lr}
    out, _, _ = consistency_guard(tri, lr, grid, options)
    return out


def test_ibp_equals_trilinear_then_the_guard(subject, monkeypatch):
    monkeypatch.delenv("NEXUS_GUARD_OPTIONS", raising=False)
    grid = TargetGrid.like(subject["t1"])
    pred = get_method("ibp")(subject, grid)
    ref = _composition(subject, GuardOptions())
    tri = get_method("trilinear")(subject, grid)
    for c in ("t1", "t2"):
        assert tuple(pred[c].shape) == (1, *grid.shape) and torch.allclose(pred[c].affine.double(), grid.affine)
        assert torch.equal(pred[c].as_tensor(), ref[c].as_tensor())
        # the guard acted: the output differs from trilinear and its re-acquisition is closer to the scan
        model = AcquisitionModel.of(subject[f"{c}_lr"], grid, "gaussian")
        r_ibp = lr_residual(model, pred[c].as_tensor()[0].float())[model.covered]
        r_tri = lr_residual(model, tri[c].as_tensor()[0].float())[model.covered]
        assert not torch.equal(pred[c].as_tensor(), tri[c].as_tensor())
        assert float(r_ibp.pow(2).mean()) < 0.5 * float(r_tri.pow(2).mean())


def test_ibp_honours_the_guard_environment(subject, monkeypatch):
    grid = TargetGrid.like(subject["t1"])
    monkeypatch.setenv("NEXUS_GUARD_OPTIONS", json.dumps({"iterations": 0}))
    pred, tri = get_method("ibp")(subject, grid), get_method("trilinear")(subject, grid)
    assert all(torch.equal(pred[c].as_tensor(), tri[c].as_tensor()) for c in ("t1", "t2"))  # no correction
    monkeypatch.setenv("NEXUS_GUARD_OPTIONS", json.dumps({"k": 3, "iterations": 2}))
    pred, ref = get_method("ibp")(subject, grid), _composition(subject, GuardOptions(k=3, iterations=2))
    assert all(torch.equal(pred[c].as_tensor(), ref[c].as_tensor()) for c in ("t1", "t2"))
    monkeypatch.setenv("NEXUS_GUARD_OPTIONS", json.dumps({"k": -1}))
    with pytest.raises(NexusInputError, match="^NEXUS_GUARD_OPTIONS: guard: k and floor"):
        get_method("ibp")(subject, grid)


def test_slab_thickness_is_the_protocol_factor_times_hr_spacing(subject):
    geo = lesion_geometry({c: subject[f"{c}_lr"] for c in ("t1", "t2")}, subject["t1"])
    protocol = load_protocol("nexus")
    hr = spacing(subject["t1"].affine)
    for c in ("t1", "t2"):
        spec = protocol.contrast(c)
        assert geo["slab_mm"][c] == pytest.approx(float(spec["factor"]) * float(hr["xyz".index(str(spec["axis"]))]))
    assert geo["voxel_mm3"] == pytest.approx(float(hr.prod()))




def test_evaluate_default_methods_put_ibp_beside_trilinear_with_lesion_sizes(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("NEXUS_GUARD_OPTIONS", raising=False)
    data = add_t2_lesion(tiny_dataset(tmp_path / "data", n=1))
    out = tmp_path / "res"
    assert main(["evaluate", "--data", str(data), "--no-lpips", "--quiet", "--no-mlflow", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "per_subject.csv").set_index("method")
    assert list(rows.index) == ["trilinear", "ibp", "cubic"] and rows["error"].isna().all()
    # ibp's row is the metric of trilinear + guard; back-projection raises the masked PSNR here
    assert (rows.loc["ibp", ["psnr_t1", "psnr_t2"]] > rows.loc["trilinear", ["psnr_t1", "psnr_t2"]]).all()
    for m in rows.index:  # the one lesion: 1.0 T2w slab -> bin "slab", the others empty
        assert rows.loc[m, "n_lesions_t2_slab"] == 1 and rows.loc[m, "n_lesions_t2_small"] == 0
        assert rows.loc[m, "lesion_contrast_t2_slab"] == pytest.approx(rows.loc[m, "lesion_contrast_t2"])
        assert math.isnan(rows.loc[m, "lesion_contrast_t2_large"])
    table = pd.read_csv(out / "table1.csv").set_index("method")
    assert table.loc["ibp", "lesion_contrast_t2_slab_mean"] == pytest.approx(rows.loc["ibp", "lesion_contrast_t2"])
    md = (out / "table1.md").read_text()
    assert "| ibp |" in md and "## Lesion fidelity by size" in md and "T2w-only 0.75 ≤ d < 1.5 slab" in md
    assert "extent across the slabs" in md  # the protocol sentence
    by_size = md.split("## Lesion fidelity by size")[1]
    ibp_line = next(line for line in by_size.splitlines() if line.startswith("| ibp |"))
    assert f"{rows.loc['ibp', 'lesion_contrast_t2']:.3f} ± 0.000" in ibp_line
