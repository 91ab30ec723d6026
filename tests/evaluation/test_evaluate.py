"""`nexus-sr evaluate` end to end on tiny BraTS-format subjects (6 mm voxels -> 40x40x27 frame)."""

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nexus_monai.cli import main
from nexus_monai.evaluation.methods import METHODS, register_method
from nexus_monai.geometry import make_affine


if "broken_for_test" not in METHODS:

    @register_method("broken_for_test")
    def _broken(inputs, grid, **_):
        raise RuntimeError("this method always fails")


def test_evaluate_interpolation_table(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "res"
    code = main(["evaluate", "--data", str(data), "--methods", "trilinear,cubic,broken_for_test", "--protocol", "nexus", "--out", str(out), "--quiet", "--no-mlflow"])
    assert code == 0
    rows = pd.read_csv(out / "per_subject.csv")
    assert len(rows) == 9
    ok = rows[rows["method"] != "broken_for_test"]
    for col in ("psnr_t1", "psnr_t2", "ssim_t1", "ssim_t2", "psnr_eroded_t1", "psnr_volume_t2", "eps_mi_joint"):
        assert np.isfinite(ok[col]).all(), col
    assert (ok["psnr_t1"] > 15).all() and (ok["ssim_t1"] <= 1).all()
    broken = rows[rows["method"] == "broken_for_test"]
    assert broken["error"].str.contains("always fails").all()
    table = pd.read_csv(out / "table1.csv")
    assert list(table["method"]) == ["trilinear", "cubic", "broken_for_test"]
    assert table.loc[table["method"] == "broken_for_test", "failed"].item() == 3
    md = (out / "table1.md").read_text()
    assert "| trilinear |" in md and "this method always fails" in md and "99.5th percentile" in md
    panels = list(out.glob("panel_*.png"))
    assert len(panels) == 1  # one subject, every method: GT + 3 columns of 80 px (40 voxels x zoom 2) + 4 px gaps, labels 90 px
    assert Image.open(panels[0]).size[0] == 90 + 4 * (80 + 4)
    assert not (out / "mlruns.db").exists()
    # the table mean is the mean of the per-subject rows
    tri = ok[ok["method"] == "trilinear"]
    assert math.isclose(table.loc[0, "psnr_t1_mean"], tri["psnr_t1"].mean(), rel_tol=1e-9)


def test_evaluate_manifest_marks_the_complete_table_set(tiny_dataset, tmp_path, monkeypatch):
    """The manifest is written last and lists every table file and panel with its sha256; a later run
    that dies while rewriting the tables leaves the folder without a manifest (incomplete), never a
    mix of two runs' files that claims to be whole."""
    from nexus_monai.data.staging import MANIFEST, check_manifest
    from nexus_monai.errors import NexusInputError
    from nexus_monai.evaluation import table1

    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "res"
    args = ["evaluate", "--data", str(data), "--methods", "trilinear", "--protocol", "nexus", "--out", str(out), "--quiet",
            "--no-mlflow", "--no-lpips"]
    assert main(args) == 0
    body = check_manifest(out)
    assert {"per_subject.csv", "table1.csv", "table1.md"} <= set(body["files"])
    assert any(n.startswith("panel_") for n in body["files"])
    (out / "table1.md").write_text("edited")
    with pytest.raises(NexusInputError, match="changed"):
        check_manifest(out)

    def killed(*a, **k):  # the run dies after per_subject.csv, before the summary tables
        raise KeyboardInterrupt

    monkeypatch.setattr(table1, "summarise", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (out / MANIFEST).exists()
    with pytest.raises(NexusInputError, match="incomplete"):
        check_manifest(out)


def test_evaluate_ssmcsr_protocol_reports_mi_errors(tiny_dataset, tmp_path):
    data = tiny_dataset(tmp_path / "data", n=1)
    assert main(["evaluate", "--data", str(data / "dataset.json"), "--methods", "trilinear", "--protocol", "ssmcsr", "--no-lpips", "--out", str(tmp_path / "r"), "--quiet", "--no-mlflow"]) == 0
    md = (tmp_path / "r" / "table1.md").read_text()
    assert "ε_MI^T1" in md and "z×4" in md


def test_evaluate_bad_data_is_one_line(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", n=1)
    sid = "BraTS20_Training_000"
    seg = np.zeros((36, 36, 24), np.uint8)
    seg[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(seg, make_affine((6.0, 6.0, 6.0), (-105, -105, -75)).numpy()), str(data / sid / f"{sid}_seg.nii.gz"))
    code = main(["evaluate", "--data", str(data), "--methods", "trilinear", "--out", str(tmp_path / "r"), "--quiet", "--no-lpips", "--no-mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{sid}_seg.nii.gz" in err[0] and "[3]" in err[0]


def test_unknown_method_and_missing_datalist_file_fail_before_any_work(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", n=2)
    out = tmp_path / "r"
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear,nope", "--out", str(out), "--quiet", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "available:" in err[0] and "cycleinr" in err[0]
    missing = data / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    missing.unlink()
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear", "--out", str(out), "--quiet", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "file not found" in err[0]
    assert not out.exists()  # the first subject is fine, yet nothing ran: every check comes first
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear", "--weights", "trilinear=x.pt", "--out", str(out), "--quiet", "--no-mlflow"]) == 2
    assert "not a cohort bundle" in capsys.readouterr().err


def test_evaluate_logs_a_named_mlflow_run_with_tables_and_panels(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")  # honoured (one store everywhere)
    data = tiny_dataset(tmp_path / "data", n=2)
    out = tmp_path / "res"
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear,broken_for_test", "--no-lpips", "--quiet", "--run-name", "tiny_eval", "--out", str(out)]) == 0
    from mlflow.tracking import MlflowClient

    assert not (out / "mlruns.db").exists()  # no private store per output folder
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    exp = client.get_experiment_by_name("nexus_monai_evaluate")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny_eval" and run.info.status == "FINISHED"
    assert run.data.params["protocol"] == "nexus" and run.data.params["split"] == "test" and run.data.params["n_subjects"] == "2"
    table = pd.read_csv(out / "table1.csv")
    assert math.isclose(run.data.metrics["trilinear/psnr_t1_mean"], table.loc[0, "psnr_t1_mean"], rel_tol=1e-9)
    assert run.data.metrics["broken_for_test/failed"] == 2 and "always fails" in run.data.tags["failed/broken_for_test"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "panels")}
    assert {"per_subject.csv", "table1.csv", "table1.md"} <= names and any(n.endswith(".png") for n in names)
    assert "table1.json" in names  # the table as an MLflow table
    assert any(a.path.startswith("images/panel_") for a in client.list_artifacts(run.info.run_id, "images"))


def test_select_subjects_embedded_uses_the_bundles_datalist(tiny_dataset, tmp_path, monkeypatch):
    """``--data embedded`` resolves to the same datalist the bundles train on (dataset_dir: embedded)."""
    import nexus_monai.evaluation.table1 as table1
    from nexus_monai.evaluation.table1 import select_subjects

    data = tiny_dataset(tmp_path / "data")
    seen = []
    monkeypatch.setattr(table1, "resolve_datalist", lambda d, seed=0: seen.append((d, seed)) or data / "dataset.json")
    subjects = select_subjects("embedded", "test", seed=3)
    assert seen == [("embedded", 3)] and len(subjects) == 3


if "oracle_for_test" not in METHODS:

    @register_method("oracle_for_test")
    def _oracle(inputs, grid, **_):
        """The HR ground truth itself (a perfect method: every lesion kept exactly)."""
        return {c: inputs[c] for c in ("t1", "t2")}


def add_lesion_maps(root, which=(0,), value=1001):
    """Give subjects ``which`` (sorted order) a T2w-only lesion (radius 2 voxels, +300 on T2w) and a
    ``lesions`` entry in ``dataset.json``; the others keep no lesion map."""
    import json

    dl = json.loads((root / "dataset.json").read_text())
    entries = [e for split in dl.values() if isinstance(split, list) for e in split if isinstance(e, dict)]
    subjects = sorted({e["subject"] for e in entries})
    for i in which:
        entry = next(e for e in entries if e["subject"] == subjects[i])
        t2_path = str(root / entry["t2"])  # datalist paths are relative to its folder
        t2 = nib.load(t2_path)
        grid = np.indices(t2.shape)
        lesion = sum((g - c) ** 2 for g, c in zip(grid, (12, 20, 12))) <= 4
        nib.save(nib.Nifti1Image(np.where(lesion, t2.get_fdata() + 300, t2.get_fdata()).astype(np.float32), t2.affine), t2_path)
        path = str(root / f"{entry['subject']}_lesions.nii.gz")
        nib.save(nib.Nifti1Image(np.where(lesion, value, 0).astype(np.int16), t2.affine), path)
        for e in entries:  # every split listing the subject (bundle datasets list it in all three)
            if e["subject"] == subjects[i]:
                e["lesions"] = path  # absolute
    (root / "dataset.json").write_text(json.dumps(dl))
    return root


def test_evaluate_reports_lesion_fidelity_and_training_budget(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    data = add_lesion_maps(tiny_dataset(tmp_path / "data", n=2))
    out = tmp_path / "res"
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear,oracle_for_test", "--no-lpips", "--quiet", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "per_subject.csv").set_index(["method", "subject"])
    with_map, without = sorted(rows.index.get_level_values("subject").unique())
    oracle = rows.loc[("oracle_for_test", with_map)]
    # a perfect output recovers the full contrast; n_lesions 1 and none excluded also proves the lesion map
    # went through the same frame as the images (misplaced, it would have no ground-truth contrast)
    assert oracle["lesion_contrast_t2"] == pytest.approx(1.0) and oracle["lesion_kept_t2"] == 1
    assert oracle["n_lesions_t2"] == 1 and oracle["n_lesions_excluded"] == 0
    assert oracle["imprint_t1"] == pytest.approx(oracle["imprint_t1_gt"])
    tri = rows.loc[("trilinear", with_map)]
    assert 0 < tri["lesion_contrast_t2"] < 0.95  # T2w y x 4 slabs blur a 5-voxel lesion
    assert math.isnan(rows.loc[("trilinear", without), "lesion_contrast_t2"])  # no map: NaN, no crash
    table = pd.read_csv(out / "table1.csv").set_index("method")
    assert table.loc["oracle_for_test", "lesion_contrast_t2_mean"] == pytest.approx(1.0)
    assert table["train_steps"].isna().all() and table["train_seconds"].isna().all()  # no cohort training
    md = (out / "table1.md").read_text()
    assert "## Lesion fidelity" in md and "training (steps, s)" in md and "2-voxel" not in md
    assert "Lesion fidelity v2 (subjects with a lesion instance map)" in md
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("nexus_monai_evaluate").experiment_id])
    assert run.data.metrics["oracle_for_test/lesion_contrast_t2_mean"] == pytest.approx(1.0)
    assert run.data.metrics["trilinear/lesion_kept_t2_mean"] in (0.0, 1.0)


def test_evaluate_bad_lesion_map_fails_before_any_work(tiny_dataset, tmp_path, capsys):
    data = add_lesion_maps(tiny_dataset(tmp_path / "data", n=1), value=4001)  # class 4 does not exist
    out = tmp_path / "res"
    assert main(["evaluate", "--data", str(data), "--methods", "trilinear", "--no-lpips", "--quiet", "--out", str(out), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "_lesions.nii.gz" in err and "break the encoding" in err
    assert not (out / "per_subject.csv").exists()
