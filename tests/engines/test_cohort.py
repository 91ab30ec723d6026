"""``nexus-sr predict --datalist``: a cohort of 4 tiny subjects (one corrupt, one as DICOM series) over 2 CPU ranks,
then resumed with 1 rank.

The two ranks are two forked processes with torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
(forked, not spawned: a spawned process would spend ~6 s importing torch and MONAI), each running the
real command line at the same time on the same output folder.
"""

import contextlib
import csv
import io
import json
import multiprocessing as mp
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from nexus_monai.cli import main
from nexus_monai.engines.cohort import read_cohort
from nexus_monai.errors import NexusInputError

from dicom_helpers import write_series
from helpers import BUNDLE, make_tiny_pair, predict_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RAW = ("--keep-background", "--no-register")  # the phantom has no zero background; registration is not tested here


def _cohort_argv(pair, datalist, out):
    return ["predict", "--bundle", str(BUNDLE), "--config", str(pair["overlay"]), "--weights", str(pair["weights"]),
            "--datalist", str(datalist), "--spacing", "2", "--out", str(out), "--threads", "1", "--quiet", *RAW]


def _rank_main(rank, world, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    os._exit(rc)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    pair = make_tiny_pair(d / "pair")
    root = d / "study"
    entries = []
    for i in range(4):
        sub = root / f"sub-{i:02d}"
        sub.mkdir(parents=True)
        for c in ("t1", "t2"):
            shutil.copy(pair[c], sub / f"{c}.nii.gz")
        entries.append({"t1": f"sub-{i:02d}/t1.nii.gz", "t2": f"sub-{i:02d}/t2.nii.gz"})
    raw = (root / "sub-01" / "t2.nii.gz").read_bytes()
    (root / "sub-01" / "t2.nii.gz").write_bytes(raw[: len(raw) // 2])  # corrupt: truncated
    for c in ("t1", "t2"):  # sub-03 as DICOM series folders (float32 -> int16 at 0.01 steps)
        img = nib.load(str(pair[c]))
        write_series(root / "sub-03" / f"{c}_series", np.asarray(img.dataobj), img.affine, slope=0.01)
    entries[3] = {"t1": "sub-03/t1_series", "t2": "sub-03/t2_series", "name": "dicom_subject"}
    entries[2]["mask"] = "sub-02/no_such_mask.nii.gz"  # a per-subject option reaches predict: an error row
    (root / "cohort.json").write_text(json.dumps({"testing": entries}))
    return d, pair, root / "cohort.json"


def _table(out):
    with open(out / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cohort_over_two_ranks_then_resumed_with_one(cohort, tmp_path):
    d, pair, datalist = cohort
    out = tmp_path / "out"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, _cohort_argv(pair, datalist, out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]  # a failed subject does not fail its rank

    rows = _table(out)
    assert [r["subject"] for r in rows] == ["sub-00_t1", "sub-01_t1", "sub-02_t1", "dicom_subject"]  # datalist order
    assert [r["status"] for r in rows] == ["done", "error", "error", "done"]
    assert [r["rank"] for r in rows] == ["0", "1", "0", "1"]  # subject i on rank i % 2
    assert "t2.nii.gz" in rows[1]["error"] and "truncated" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[2]["error"].endswith("no_such_mask.nii.gz: mask file not found")
    assert all(float(r["seconds_predict"]) > 0 and r["grid_shape"] == "8x8x8" for r in rows if r["status"] == "done")
    assert not (out / "sub-01_t1").exists() and not (out / "sub-02_t1").exists()  # nothing half-written
    assert sorted(p.name for p in (out / "cohort_ranks").iterdir()) == [
        "rank0_of_2.csv", "rank0_of_2.done", "rank1_of_2.csv", "rank1_of_2.done"]
    # every output equals the single-subject command's (the series subject included: same scans, int16 steps)
    single = tmp_path / "single"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(predict_args(pair, single, "--spacing", "2", *RAW)) == 0
    ref = nib.load(str(single / "t1w_sr.nii.gz"))
    for name in ("sub-00_t1", "dicom_subject"):
        got = nib.load(str(out / name / "t1w_sr.nii.gz"))
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
        np.testing.assert_allclose(got.get_fdata(), ref.get_fdata(), atol=0.05)

    before = (out / "sub-00_t1" / "t1w_sr.nii.gz").stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(_cohort_argv(pair, datalist, out)) == 0  # WORLD_SIZE unset: one rank resumes
    rows = _table(out)
    assert [r["status"] for r in rows] == ["skipped", "error", "error", "skipped"]
    assert {r["rank"] for r in rows} == {"0"}
    assert (out / "sub-00_t1" / "t1w_sr.nii.gz").stat().st_mtime_ns == before


@pytest.mark.parametrize("content,words", [
    ("{", "not a JSON datalist"), ('{"training": []}', "non-empty 'testing' list"),
    ('{"testing": [{"t1": "a.nii.gz"}]}', "needs \"t1\" and \"t2\""),
    ('{"testing": [{"t1": "a", "t2": "b", "name": "../x"}]}', "not a plain folder name"),
    ('{"testing": [{"t1": "a", "t2": "b", "name": "s"}, {"t1": "c", "t2": "d", "name": "s"}]}', "share the output"),
])
def test_bad_datalist_one_line(tmp_path, content, words):
    path = tmp_path / "cohort.json"
    path.write_text(content)
    with pytest.raises(NexusInputError) as err:
        read_cohort(path)
    assert words in str(err.value) and str(err.value).startswith(str(path))


def test_cohort_needs_a_grid_before_any_work(cohort, tmp_path):
    _, pair, datalist = cohort
    argv = [a for a in _cohort_argv(pair, datalist, tmp_path / "o") if a not in ("--spacing", "2")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 2
    assert "give --spacing or --like" in err.getvalue() and not (tmp_path / "o" / "cohort_ranks").exists()
