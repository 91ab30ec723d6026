"""The Table 1 evaluator and its handlers: the rows are the metric code's on the protocol's inputs, failures
are rows (a failed method, a subject whose inputs fail), Table 5 scores every input that exists, and the
manifest lists exactly this run's files. Tiny subjects (6 mm voxels, 36x36x24)."""

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from nexus_monai.data.staging import check_manifest
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.evaluator import MethodEvaluator
from nexus_monai.evaluation.handlers import SubjectScores
from nexus_monai.evaluation.methods import METHODS, get_method, register_method
from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
from nexus_monai.geometry import TargetGrid, make_affine
from nexus_monai.metrics import subject_metric_row
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.transforms.protocols import load_protocol, prepare_subject


def _broken(inputs, grid, **_):
    raise RuntimeError("this method always fails")


class ThresholdSegmenter:
    """A stand-in for a frozen segmentation bundle: BraTS regions from T2w thresholds."""

    def __call__(self, t1, t2):
        x = t2.as_subclass(torch.Tensor)[0]
        return torch.stack([x > 700, x > 800, x > 850])


def test_rows_are_the_metric_code_on_the_protocol_inputs(tiny_dataset, tmp_path, one_torch_thread):
    """Only the evaluator and the score handler: rows in subject x method order, each equal to
    subject_metric_row on trilinear of the protocol's LR scans computed here without the evaluator."""
    subjects = select_subjects(tiny_dataset(tmp_path / "data", n=2), "test")
    protocol = load_protocol("nexus")
    evaluator = MethodEvaluator({"trilinear": get_method("trilinear"), "broken": _broken}, protocol, progress=False)
    SubjectScores(lpips=False).attach(evaluator)
    rows = evaluator.run(subjects).rows
    assert [(r["subject"], r["method"]) for r in rows] == [(s["subject"], m) for s in subjects
                                                           for m in ("trilinear", "broken")]
    assert all(r["error"] == "RuntimeError: this method always fails" for r in rows[1::2])
    data = prepare_subject(subjects[1], protocol)
    grid = TargetGrid.like(data["t1"])
    gt = {c: data[c][0].as_subclass(torch.Tensor) for c in ("t1", "t2")}
    pred = {c: upsample(data[f"{c}_lr"], grid, "trilinear").as_subclass(torch.Tensor).reshape(grid.shape)
            for c in ("t1", "t2")}
    expected = subject_metric_row(gt, pred, None, lpips=False)
    got = rows[2]
    assert got["error"] == "" and got["seconds"] > 0
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == value, key


def test_relative_output_folder(tiny_dataset, tmp_path, monkeypatch, one_torch_thread):
    """`--out results/x` (relative, as README command (a) writes it): the manifest lists the files by name."""
    subjects = select_subjects(tiny_dataset(tmp_path / "data", n=1), "test")
    monkeypatch.chdir(tmp_path)
    evaluate_methods(subjects, ["trilinear"], load_protocol("nexus"), "results/t1", lpips=False, progress=False)
    assert set(check_manifest(tmp_path / "results" / "t1")["files"]) == {
        "per_subject.csv", "table1.csv", "table1.md", "panel_BraTS20_Training_000.png"}


def test_failed_input_failed_method_table5_and_manifest(tiny_dataset, tmp_path, one_torch_thread):
    data = tiny_dataset(tmp_path / "data", n=2)
    bad = "BraTS20_Training_001"
    seg = np.zeros((36, 36, 24), np.uint8)
    seg[0, 0, 0] = 3  # not a BraTS label: the subject's inputs fail in prepare_subject
    nib.save(nib.Nifti1Image(seg, make_affine((6.0, 6.0, 6.0), (-105, -105, -75)).numpy()),
             str(data / bad / f"{bad}_seg.nii.gz"))
    out = tmp_path / "res"
    if "broken_for_evaluator_test" not in METHODS:
        register_method("broken_for_evaluator_test")(_broken)
    with pytest.raises(NexusInputError, match=r"labels \[3\].*1 failed input"):
        evaluate_methods(select_subjects(data, "test"), ["trilinear", "broken_for_evaluator_test"],
                         load_protocol("nexus"), out, lpips=False, progress=False,
                         segmenters={"thr": ThresholdSegmenter()})
    rows = pd.read_csv(out / "per_subject.csv")
    assert list(zip(rows["subject"], rows["method"])) == [
        ("BraTS20_Training_000", "trilinear"), ("BraTS20_Training_000", "broken_for_evaluator_test"),
        (bad, "trilinear"), (bad, "broken_for_evaluator_test")]
    assert rows["error"].iloc[2].startswith("input: ") and rows["error"].iloc[3].startswith("input: ")
    table = pd.read_csv(out / "table1.csv")
    assert list(table["failed"]) == [1, 2] and list(table["n"]) == [1, 0]
    t5 = pd.read_csv(out / "table5_per_subject.csv")  # the failed method is no input; the failed subject no row
    assert list(t5["input"]) == ["Original LR", "trilinear", "Original HR"]
    assert set(t5["subject"]) == {"BraTS20_Training_000"}
    files = set(check_manifest(out)["files"])  # written last, after the tables: the set is complete
    assert files == {"per_subject.csv", "table1.csv", "table1.md", "table5_per_subject.csv", "table5.csv",
                     "table5.md", "panel_BraTS20_Training_000.png"}
