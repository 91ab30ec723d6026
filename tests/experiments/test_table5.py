"""Table 5 (`nexus-sr experiment table5`): every row present (scored or "not run: <why>"), paired differences
to trilinear equal an independent scipy computation, re-runs skip finished subject x row files, a retrained
segmenter re-scores the cached outputs. Tiny data (6 mm voxels) and a tiny untrained U-Net segmenter."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import UNet
from scipy import stats

from nexus_monai.cli import main
from nexus_monai.evaluation.downstream import paired_differences, t_interval
from nexus_monai.experiments.table5 import METHOD_ROWS, ROWS, resolve_rows, run_table5

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
TINY = {"roi_size": [16, 16, 16], "network_def#channels": [4, 8, 16, 32]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_bundle_dataset):
    return tiny_bundle_dataset(tmp_path_factory.mktemp("t5data") / "data", n=3)


def _segmenter(folder: Path, seed: int) -> Path:
    """A seg_unet bundle folder with a tiny (untrained, seeded) U-Net checkpoint."""
    shutil.copytree(REPO / "bundles" / "seg_unet" / "configs", folder / "configs", dirs_exist_ok=True)
    torch.manual_seed(seed)
    net = UNet(3, 2, 3, (4, 8, 16, 32), (2, 2, 2), num_res_units=1, norm="INSTANCE")
    (folder / "models").mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict()}, folder / "models" / "model.pt")
    return folder


def _mtimes(root: Path, pattern: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


def test_every_row_is_scored_or_not_run_and_reruns_skip_finished_rows(tiny_data, tmp_path, capsys):
    seg = _segmenter(tmp_path / "seg_unet", seed=0)
    bad_ckpt = tmp_path / "not_a_checkpoint.pt"
    bad_ckpt.write_text("not a checkpoint")
    out = tmp_path / "t5"
    kwargs = dict(data=str(tiny_data), weights={"arssr": str(bad_ckpt)}, segmenters=[str(seg), "seg_missing"],
                  segmenter_overrides={"seg_unet": TINY}, mlflow=False)
    run_table5(out, methods=["cubic"], **kwargs)
    rows = pd.read_csv(out / "table5.csv")
    assert sorted(rows["input"].unique()) == sorted(["Original LR", "trilinear", "cubic", "Original HR"])
    assert len(rows) == 4 * 3 and (rows["segmenter"] == "seg_unet").all() and (rows["error"].fillna("") == "").all()
    assert rows["dice_mean"].between(0, 1).all() and np.isfinite(rows["hd95_mean"]).all()
    md = (out / "table5.md").read_text()
    table = [line for line in md.split("## `test`, segmenter `seg_unet`")[1].split("Paired difference")[0].splitlines()
             if line.startswith("| ") and not line.startswith("| Input")]
    cells = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in table]
    assert [c[0] for c in cells] == list(ROWS)  # every row, in order, none dropped
    status = {c[0]: c[-1] for c in cells}
    assert status["smore"].startswith("not run: not requested")
    assert status["nexus_inr_paper_cpu"].startswith("not run: no paper_cpu model given")
    assert status["arssr"].startswith("not run:") and "not_a_checkpoint.pt" in status["arssr"]
    assert status["cubic"] == status["trilinear"] == status["Original HR"] == ""
    assert "Segmenter `seg_missing`: not run:" in md and "| Original HR | 3 |" in md

    # the same command again: nothing recomputed, nothing rewritten but the tables
    before = _mtimes(out, "rows/*/*/*.json")
    capsys.readouterr()
    run_table5(out, methods=["cubic"], **kwargs)
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    assert _mtimes(out, "rows/*/*/*.json") == before

    # a row added later: only its files are computed, the finished rows are kept as they are
    run_table5(out, methods=["cubic", "ibp"], **kwargs)
    after = _mtimes(out, "rows/*/*/*.json")
    assert {p: t for p, t in after.items() if p in before} == before
    assert sorted(p.name for p in set(after) - set(before)) == ["ibp__seg_unet.json"] * 3
    assert set(pd.read_csv(out / "table5.csv")["input"]) == {"Original LR", "trilinear", "cubic", "ibp", "Original HR"}

    # a retrained segmenter: every row re-scored from the cached method outputs (not recomputed)
    outputs = _mtimes(out, "outputs/*/*/*")
    _segmenter(seg, seed=1)
    run_table5(out, methods=["cubic", "ibp"], **kwargs)
    assert all(_mtimes(out, "rows/*/*/*.json")[p] != t for p, t in after.items())
    assert _mtimes(out, "outputs/*/*/*") == outputs
    assert len(pd.read_csv(out / "table5.csv")) == 5 * 3  # the old segmenter's rows are not mixed in


def test_paired_differences_match_an_independent_scipy_reference(tiny_data, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    subjects = [f"s{i}" for i in range(7)]
    ref = rng.random(7)
    frame = pd.DataFrame({"split": "test", "segmenter": "u", "subject": subjects * 2,
                          "input": ["trilinear"] * 7 + ["hr"] * 7, "m": np.r_[ref, ref + 0.1 + 0.05 * rng.random(7)]})
    frame = frame.drop(index=13)  # s6 has no "hr" row: only the 6 common subjects are paired
    got = paired_differences(frame, "trilinear", ["m"]).iloc[0]
    a = frame[(frame["input"] == "hr")].set_index("subject")["m"]
    b = frame[(frame["input"] == "trilinear")].set_index("subject")["m"].loc[a.index]
    res = stats.ttest_rel(a.to_numpy(), b.to_numpy())
    ci = res.confidence_interval(0.95)
    assert got["n"] == 6 and got["input"] == "hr"
    assert got["m_diff"] == pytest.approx((a - b).mean())
    assert (got["m_lo"], got["m_hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert np.isnan(t_interval([0.3])[1]) and t_interval([])[3] == 0

    # and the written summary of a real run equals scipy's paired interval on its own per-subject rows
    seg = _segmenter(tmp_path / "seg_unet", seed=0)
    out = tmp_path / "t5"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    run_table5(out, data=str(tiny_data), methods=["cubic"], segmenters=[str(seg)],
               segmenter_overrides={"seg_unet": TINY}, progress=False, mlflow=True)
    rows, summary = pd.read_csv(out / "table5.csv"), pd.read_csv(out / "table5_summary.csv")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("nexus_table5").experiment_id])
    hr = summary[summary["input"] == "Original HR"].iloc[0]
    assert run.data.metrics["test/seg_unet/Original HR/dice_mean_mean"] == pytest.approx(hr["dice_mean_mean"])
    assert "table5.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    for name in ("Original HR", "cubic"):
        x = rows[rows["input"] == name].set_index("subject")["hd95_mean"].sort_index()
        y = rows[rows["input"] == "trilinear"].set_index("subject")["hd95_mean"].loc[x.index]
        s = summary[summary["input"] == name].iloc[0]
        assert s["hd95_mean_diff"] == pytest.approx((x - y).mean())
        if (x - y).std() > 0:
            ci = stats.ttest_rel(x, y).confidence_interval(0.95)
            assert (s["hd95_mean_lo"], s["hd95_mean_hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert s["hd95_mean_mean"] == pytest.approx(x.mean()) and s["hd95_mean_std"] == pytest.approx(x.std(ddof=0))


def test_paper_cpu_row_takes_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "paper_cpu_mmf_kdattn_sel_seed0"
    run.mkdir(parents=True)
    opts = {"bundle": "bundles/nexus_inr", "weights": str(REPO / "bundles/nexus_inr/models/model.pt"), "overlays": []}
    (run / "evaluate.json").write_text(json.dumps({"options": {"nexus_inr": opts}}))
    specs = resolve_rows({"nexus_inr_paper_cpu": str(run)})
    assert specs["nexus_inr_paper_cpu"] == ("nexus_inr", opts)
    assert set(specs) == set(METHOD_ROWS)


@pytest.mark.parametrize("args, match", [(["--weights", "foo=x.pt"], "unknown Table 5 row"),
                                         (["--methods", "trilinear,magic"], "unknown Table 5 method"),
                                         (["--weights", "arssr"], "ROW=PATH"),
                                         (["--weights", "arssr=/nonexistent.pt"], "checkpoint not found")])
def test_bad_table5_arguments_are_one_line_exit_2(args, match, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["experiment", "table5", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]
    assert not out.exists()
