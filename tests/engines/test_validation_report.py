"""SRValidationReport: back-projection (ibp) beside trilinear, once per subject; lesion columns by size."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from helpers import add_t2_lesion
import nexus_monai.engines.inr_handlers as handlers
from nexus_monai.engines.consistency import GuardOptions, consistency_guard
from nexus_monai.engines.inr import subject_scores
from nexus_monai.engines.inr_handlers import SRValidationReport
from nexus_monai.evaluation.table1 import select_subjects
from nexus_monai.geometry import TargetGrid
from nexus_monai.keys import LESIONS
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.transforms.protocols import load_protocol, prepare_subject

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def outputs(tiny_dataset, tmp_path_factory):
    """Two validation outputs as INRValidationStep leaves them (the model: cubic B-spline); the first subject
    has a T2w-only lesion map."""
    root = add_t2_lesion(tiny_dataset(tmp_path_factory.mktemp("report_data"), n=2))
    outs = []
    for entry in select_subjects(root, "test"):
        data = prepare_subject(entry, load_protocol("nexus"))
        grid = TargetGrid.like(data["t1"])
        lr = {c: data[f"{c}_lr"] for c in ("t1", "t2")}
        out = {"subject": entry["subject"], "grid": grid, "lr": lr,
               "gt": {c: data[c][0].as_subclass(torch.Tensor).float() for c in ("t1", "t2")},
               "pred": {c: upsample(lr[c], grid, "bspline")[0].as_subclass(torch.Tensor) for c in ("t1", "t2")}}
        if LESIONS in data:
            out[LESIONS] = data[LESIONS][0].as_subclass(torch.Tensor)
        outs.append(out)
    assert sum(LESIONS in o for o in outs) == 1
    return outs


def _run(report: SRValidationReport, outs: list, epochs: int = 1) -> Engine:
    engine = Engine(lambda e, batch: batch)
    report.attach(engine)
    engine.run(outs, max_epochs=epochs)
    return engine


def _ibp_reference(out: dict) -> dict:
    """Back-projection composed here: trilinear, then the guard with predict's default options."""
    lr, grid = out["lr"], out["grid"]
    guarded, _, _ = consistency_guard({c: upsample(lr[c], grid, "trilinear") for c in lr}, lr, grid, GuardOptions())
    return {c: guarded[c][0].as_subclass(torch.Tensor) for c in lr}


def test_report_scores_ibp_beside_trilinear_once_per_subject(outputs, tmp_path, monkeypatch):
    monkeypatch.delenv("NEXUS_GUARD_OPTIONS", raising=False)
    calls = []
    real = handlers.consistency_guard
    monkeypatch.setattr(handlers, "consistency_guard", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = SRValidationReport(str(tmp_path), prefix="validation")
    engine = _run(report, outputs, epochs=2)
    assert len(calls) == len(outputs)  # the network-free ibp: once per subject, reused at the second validation
    rows = pd.read_csv(tmp_path / "validation_subjects.csv").set_index("subject")
    for out in outputs:
        ref = subject_scores(out["gt"], _ibp_reference(out), out.get(LESIONS))
        for k in ("psnr_t1", "psnr_t2", "ssim_t2", "psnr_eroded_t1"):
            assert rows.loc[out["subject"], f"ibp_{k}"] == pytest.approx(ref[k], abs=1e-5), k
        # back-projection beats trilinear on these subjects (the guard makes the output consistent with the scans)
        assert rows.loc[out["subject"], "ibp_psnr_t2"] > rows.loc[out["subject"], "trilinear_psnr_t2"]
    assert engine.state.metrics["ibp_psnr_t1"] == pytest.approx(rows["ibp_psnr_t1"].mean(), abs=1e-5)
    summary = json.loads((tmp_path / "validation_summary.json").read_text())
    for c in ("t1", "t2"):
        assert summary["psnr_gain_over_ibp_db"][c] == pytest.approx(
            rows[f"model_psnr_{c}"].mean() - rows[f"ibp_psnr_{c}"].mean(), abs=1e-5)
    assert set(summary["psnr_gain_over_trilinear_db"]) == {"t1", "t2"}
    report_rows = engine.state.validation_report["rows"]  # what MLflowRunLogger logs as the MLflow table
    assert all("ibp_psnr_t1" in r for r in report_rows)
    # the panel: LR / trilinear / ibp / model / GT, one tile more than without ibp
    with_ibp = Image.open(engine.state.validation_report["panel"]).size[0]
    plain = _run(SRValidationReport(str(tmp_path / "plain"), ibp=False), outputs[:1])
    assert "ibp_psnr_t1" not in pd.read_csv(tmp_path / "plain" / "validation_subjects.csv")
    assert with_ibp > Image.open(plain.state.validation_report["panel"]).size[0]


def test_report_lesion_columns_by_size_for_model_trilinear_and_ibp(outputs, tmp_path, monkeypatch):
    monkeypatch.delenv("NEXUS_GUARD_OPTIONS", raising=False)
    _run(SRValidationReport(str(tmp_path)), outputs)
    rows = pd.read_csv(tmp_path / "validation_subjects.csv").set_index("subject")
    with_map = next(o["subject"] for o in outputs if LESIONS in o)
    for who in ("model", "trilinear", "ibp"):
        r = rows.loc[with_map]
        assert r[f"{who}_n_lesions_t2_slab"] == 1 and r[f"{who}_n_lesions_t2_small"] == 0
        assert r[f"{who}_lesion_contrast_t2_slab"] == pytest.approx(r[f"{who}_lesion_contrast_t2"])
        # metric v2 beside: uncapped ratio, within-slab part (the GT's is the same for every output), FP count
        assert r[f"{who}_lesion_contrast_t2"] == pytest.approx(min(r[f"{who}_lesion_contrast_uncapped_t2"], 1.0))
        assert r[f"{who}_within_slab_gt_t2"] == pytest.approx(r["model_within_slab_gt_t2"])
        assert r[f"{who}_false_positives_t2"] >= 0 and np.isfinite(r[f"{who}_within_slab_t2"])
    # back-projection keeps more of the T2w-only lesion than trilinear
    assert rows.loc[with_map, "ibp_lesion_contrast_t2"] > rows.loc[with_map, "trilinear_lesion_contrast_t2"]
    other = next(o["subject"] for o in outputs if LESIONS not in o)
    assert np.isnan(rows.loc[other, "ibp_lesion_contrast_t2_slab"])  # no map: NaN in the CSV
