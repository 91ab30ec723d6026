"""Back-projection (``ibp``) beside every trained run of ``nexus-sr experiment`` and in its tables; the
generalisation report's ibp and lesion-by-size tables (synthetic per-subject results, no training)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import nexus_monai.experiments as experiments
from nexus_monai.experiments.tables import write_tables

REPO = Path(__file__).resolve().parents[2]


def _frame(seeds=(0, 1), subjects=("s1", "s2", "s3")) -> pd.DataFrame:
    """Per-subject results of two rows: trilinear, ibp and nexus_inr in every run (as `_evaluate` scores them)."""
    rng = np.random.default_rng(0)
    rows = []
    for row, offset in (("baseline", 2.0), ("mmf", 3.0)):
        for seed in seeds:
            for i, s in enumerate(subjects):
                base = 20.0 + i
                for method, gain in (("trilinear", 0.0), ("ibp", 1.5), ("nexus_inr", offset + rng.normal(0, 0.3))):
                    rows.append({"table": "table2", "form": "default", "row": row, "seed": seed, "split": "test",
                                 "kind": "image", "subject": s, "method": method, "error": np.nan,
                                 "psnr_t1": base + gain, "psnr_t2": base + 2 * gain, "ssim_t1": 0.9, "ssim_t2": 0.8})
    return pd.DataFrame(rows)


def test_experiment_tables_show_ibp_and_each_row_minus_ibp(tmp_path):
    frame = _frame()
    written = write_tables("table2", "default", frame, tmp_path, n_planned=4, failures=[],
                           command="nexus-sr experiment")
    md = written["md"].read_text()
    lines = md.splitlines()
    ibp_line = next(line for line in lines if line.startswith("| (ibp) |"))
    assert "| 2 | 22.50 ± 0.00 |" in ibp_line  # psnr_t1: mean over subjects 21 + 1.5, the same for both seeds
    assert next(i for i, line in enumerate(lines) if line.startswith("| (trilinear) |")) < lines.index(ibp_line)
    assert "Network's own contribution" in md
    ours = frame[frame["method"] == "nexus_inr"].set_index(["row", "seed", "subject"])
    ibp = frame[frame["method"] == "ibp"].set_index(["row", "seed", "subject"])
    for row, label in (("baseline", "Baseline"), ("mmf", "+MMF")):
        d = (ours.loc[row, "psnr_t1"] - ibp.loc[row, "psnr_t1"]).to_numpy()
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        line = next(x for x in lines if x.startswith(f"| {label} vs ibp |"))
        assert f"| 6 | {d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]" in line
    assert "Lesion fidelity" not in md  # no lesion columns in these results: no lesion table
    # with lesion columns: a lesion-fidelity table beside PSNR, references first, values = mean over seeds
    lesion = frame.assign(lesion_contrast_t2=np.where(frame["method"] == "ibp", 0.5, 0.4) + 0.1 * frame["seed"],
                          imprint_t2=0.02, imprint_t2_gt=0.01)
    (tmp_path / "lesion").mkdir()
    lmd = write_tables("table2", "default", lesion, tmp_path / "lesion", n_planned=4, failures=[],
                       command="x")["md"].read_text().splitlines()
    head = lmd.index(next(x for x in lmd if x.startswith("| Row | T2w-only contrast recovered |")))
    assert lmd[head + 2].startswith("| (trilinear) | 0.450 ± 0.071 |")  # seeds 0, 1: 0.40 and 0.50
    assert lmd[head + 3].startswith("| (ibp) | 0.550 ± 0.071 | 0.020 ± 0.000 | 0.010 ± 0.000 |")
    assert lmd[head + 4].startswith("| Baseline | 0.450 ± 0.071 |")
    # without ibp rows (older results) the table is as before: no ibp line, no contribution section
    (tmp_path / "old").mkdir()
    old = write_tables("table2", "default", frame[frame["method"] != "ibp"], tmp_path / "old", n_planned=4,
                       failures=[], command="x")
    old_md = old["md"].read_text()
    assert "(ibp)" not in old_md and "Network's own contribution" not in old_md and "(trilinear)" in old_md


def test_every_trained_run_is_scored_beside_trilinear_and_ibp(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiments, "evaluate_run", lambda path: seen.append(json.loads(Path(path).read_text())))
    (run,) = [r for r in experiments.plan_runs("table2", "default", [0]) if r.row == "baseline"]
    ctx = {"datalist": tmp_path / "dataset.json", "splits": ["test"], "lpips": False, "jobs": 1}
    experiments._evaluate(run, ctx, tmp_path)
    assert seen[0]["methods"][:3] == ["trilinear", "ibp", "nexus_inr"]
    assert set(seen[0]["options"]) == {"nexus_inr"}  # ibp needs no checkpoint


@pytest.fixture(scope="module")
def report():
    path = REPO / "scripts" / "generalisation_report.py"
    spec = importlib.util.spec_from_file_location("generalisation_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_subject(folder: Path, methods: dict, lesion: bool = True) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for m, gain in methods.items():
        for i in range(3):
            row = {"subject": f"s{i}", "method": m, "error": np.nan, "psnr_t1": 20 + i + gain, "psnr_t2": 22 + i + gain,
                   "psnr_eroded_t1": 25 + gain, "psnr_eroded_t2": 26 + gain}
            if lesion:
                row.update({"lesion_contrast_t2": 0.4 + gain / 10, "lesion_kept_t2": 0.5, "imprint_t1": 0.01,
                            "imprint_t1_gt": 0.01, "lesion_contrast_t1": 0.5, "imprint_t2": 0.02,
                            "imprint_t2_gt": 0.01})
                for c in ("t1", "t2"):
                    for b, value in (("small", 0.2 + gain / 10), ("slab", 0.5), ("large", np.nan)):
                        row[f"lesion_contrast_{c}_{b}"] = value
                        row[f"lesion_kept_{c}_{b}"] = 0.0 if b == "small" else (1.0 if b == "slab" else np.nan)
                        row[f"n_lesions_{c}_{b}"] = {"small": 2, "slab": 1, "large": 0}[b]
            rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "per_subject.csv", index=False)
    return folder


def test_generalisation_report_lists_ibp_its_gain_table_and_lesions_by_size(report, tmp_path):
    new = _per_subject(tmp_path / "new", {"trilinear": 0.0, "ibp": 1.0, "nexus_inr": 3.0})
    old = _per_subject(tmp_path / "old", {"trilinear": 0.0, "ibp": 1.0, "nexus_inr": 2.0})
    out = tmp_path / "report.md"
    assert report.main(["--out", str(out), f"test_anatomy={new}", f"test_anatomy={old}:_old",
                        "--methods", "nexus_inr,nexus_inr_old"]) == 0
    md = out.read_text()
    assert "nexus_inr_old" in md and "ibp_old" not in md and "trilinear_old" not in md  # references never suffixed
    gains, over_ibp = md.split("Gain over back-projection")[0], md.split("Gain over back-projection")[1]
    assert "| ibp | 3 | +1.00" in gains  # ibp listed by --methods default: always shown beside trilinear
    assert "| nexus_inr | 3 | +2.00" in over_ibp.split("Lesion fidelity")[0]  # 3.0 - 1.0: the network's own gain
    assert "| nexus_inr_old | 3 | +1.00" in over_ibp.split("Lesion fidelity")[0]
    by_size = md.split("Lesion fidelity by size")[1]
    assert "T2w-only d < 0.75 slab: recovered / kept (lesions)" in by_size
    line = next(x for x in by_size.splitlines() if x.startswith("| ibp |"))
    assert "0.300 ± 0.000 / 0.00 (6)" in line and "0.500 ± 0.000 / 1.00 (3)" in line and "- (0)" in line
    # runs without the by-size columns (older evaluate folders): no size table, no crash
    plain = _per_subject(tmp_path / "plain", {"trilinear": 0.0, "nexus_inr": 1.0}, lesion=False)
    assert report.main(["--out", str(tmp_path / "p.md"), f"test={plain}"]) == 0
    text = (tmp_path / "p.md").read_text()
    assert "by size" not in text and "Gain over back-projection" not in text
