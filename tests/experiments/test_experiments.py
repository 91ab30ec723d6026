"""The paper's form and the ablation tables: paper.yaml / paper_cpu.yaml / every experiment overlay train
at batch 2 with rotations on, z-score predictions map back to scanner units, `nexus-sr experiment`
(bad input, a tiny Table 2 with 2 seeds, re-run skips), paired intervals. Tiny data and networks."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.data import MetaTensor
from scipy import stats

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.cli import main
from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.experiments import plan_runs
from nexus_monai.experiments.tables import paired_interval
from nexus_monai.geometry import TargetGrid, make_affine
from nexus_monai.networks import NexusINR

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "nexus_inr" / "configs"
TINY = {"network_def#features": 4, "network_def#encoder_options": {"blocks": 1, "layers": 1, "growth": 4},
        "network_def#decoder_hidden": 16, "network_def#attn_heads": 2, "patch_size": [16, 16, 16], "num_points": 64}
TINY_OVERRIDES = ["network_def#features=4", "network_def#encoder_options={blocks: 1, layers: 1, growth: 4}",
                  "network_def#decoder_hidden=16", "network_def#attn_heads=2", "patch_size=[16,16,16]", "num_points=64",
                  "batch_size=2", "rot90_prob=1.0"]
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiments").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import make_tiny_bundle_dataset

    return make_tiny_bundle_dataset(tmp_path_factory.mktemp("expdata") / "data", n=3)


def _merged(*names):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml")] + [str(CONFIGS / n) for n in names])
    return parser


def test_paper_form_turns_off_every_addition_and_states_sources():
    p = _merged("paper.yaml")
    net, loss = p.get("network_def"), p.get("loss")
    for key in ("rel_coord", "residual", "zero_init", "lr_intensity_input", "cross_input", "bidirectional", "sel_residual"):
        assert net[key] is False, key
    assert net["pe"] is True and net["mmf"] and net["kd_attn"] and net["sel"] and net["features"] == 128
    assert loss["cmfa_reduction"] == "sum" and loss["feature_norm"] is False
    assert p.get("intensity_norm") == "zscore" and p.get("rot90_prob") > 0 and p.get("aux_warmup_epochs") == 0
    assert p.get("batch_size") == 22 and p.get("learning_rate") == 1e-4
    # every value states its source: a section / equation of the paper, or "paper silent"
    for line in (CONFIGS / "paper.yaml").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.search(r"#.*(§|eq\. |paper silent)", line), line
    # paper_cpu.yaml: the same form block, the CPU default's width and schedule
    block = lambda name: (CONFIGS / name).read_text().split("# --- the paper's form")[1]  # noqa: E731
    assert block("paper.yaml") == block("paper_cpu.yaml")
    cpu, default = _merged("paper_cpu.yaml"), _merged()
    for key in ("batch_size", "learning_rate", "max_epochs", "patch_size", "network_def#features", "network_def#decoder_hidden"):
        assert cpu.get(key) == default.get(key), key
    assert cpu.get("network_def#residual") is False and default.get("network_def#residual") is True


def test_evaluate_yaml_defaults_to_the_test_split():
    assert _merged("evaluate.yaml").get("eval_split") == "test"


@pytest.mark.parametrize("files", [("paper.yaml",), ("paper_cpu.yaml",)]
                         + [(("paper_cpu.yaml",) if i % 2 else ()) + (f"experiments/{e}.yaml",) for i, e in enumerate(EXPERIMENTS)],
                         ids=lambda f: "+".join(Path(x).stem for x in f) or "default")
def test_forms_and_overlays_train_two_iterations_at_batch_2_with_rotations(files, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    validate = files[0] in ("paper.yaml", "paper_cpu.yaml")  # z-scored validation: scored in scanner units
    tiny = dict(TINY)
    for encoder, options in (("srresnet", {"blocks": 1}), ("rescnn", {"depth": 2})):
        if f"experiments/{encoder}.yaml" in files:
            tiny["network_def#encoder_options"] = options  # the tiny RDN's options do not fit other encoders
    bundle_run("training", config_file=[str(CONFIGS / "train.yaml")] + [str(CONFIGS / f) for f in files],
               dataset_dir=str(tiny_data), max_epochs=1, val_interval=1 if validate else 10, ckpt_interval=1,
               ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), batch_size=2, rot90_prob=1.0,
               num_workers=0, **tiny)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2  # 3 training subjects at batch 2
    if validate:  # the best-validation checkpoint exists: the z-scored validation ran and scored
        assert (tmp_path / "models" / "model.pt").is_file()


def test_zscore_predictions_map_back_to_scanner_units():
    """An untrained residual network returns its input's trilinear interpolation in the training space;
    through predict_volumes that must equal the trilinear interpolation of the RAW scans, whichever
    normaliser (the maps are affine), with the background back at exactly 0."""
    torch.manual_seed(0)
    net = NexusINR(features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4}, decoder_hidden=8, attn_heads=2,
                   pe=False, residual=True, zero_init=True).eval()
    rng = np.random.default_rng(0)
    vol = np.zeros((12, 12, 6), np.float32)
    vol[2:10, 2:10, 1:5] = 200 + 300 * rng.random((8, 8, 4))
    t1 = MetaTensor(torch.from_numpy(vol)[None], affine=make_affine((2.0, 2.0, 4.0), (0, 0, 0)))
    t2 = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol[:, ::2, :].repeat(2, 2) * 2))[None],
                    affine=make_affine((2.0, 4.0, 2.0), (0, 0, 0)))
    grid = TargetGrid((12, 12, 12), make_affine((2.0, 2.0, 2.0), (0, 0, 0)))
    out = {m: predict_volumes(net, t1, t2, grid, ImplicitGridInferer(intensity_norm=m, max_memory_gib=None))
           for m in ("percentile", "zscore")}
    for c, lr in (("t1", t1), ("t2", t2)):
        ref = upsample(lr, grid, "trilinear")[0].as_subclass(torch.Tensor)
        inside = ref > 1.0
        for m in out:
            pred = out[m][c][0].as_subclass(torch.Tensor)
            assert torch.allclose(pred[inside], ref[inside], rtol=1e-4, atol=1e-2), (m, c)
        z = out["zscore"][c][0].as_subclass(torch.Tensor)
        assert float(z[ref == 0].abs().max()) < 1e-3  # background stays (numerically) 0, not the mean intensity


def test_paired_interval_is_the_t_interval_of_paired_differences():
    a = pd.DataFrame({"seed": [0, 0, 1, 1], "subject": ["s1", "s2", "s1", "s2"], "m": [1.0, 2.0, 1.5, 2.5]})
    b = a.assign(m=[1.5, 2.1, 2.5, 2.6])
    d = np.array([0.5, 0.1, 1.0, 0.1])
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    mean, lo, hi, n = paired_interval(a, b, "m")
    assert n == 4 and mean == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half) and hi == pytest.approx(d.mean() + half)


def test_plan_runs_is_rows_x_seeds_of_one_form():
    runs = plan_runs("table4", "paper_cpu", [0, 1])
    assert sorted(r.name for r in runs) == ["paper_cpu_mlp_seed0", "paper_cpu_mlp_seed1", "paper_cpu_siren_seed0",
                                            "paper_cpu_siren_seed1"]
    assert all(r.overlays[0].name == "paper_cpu.yaml" for r in runs)


@pytest.mark.parametrize("args, match", [(["table9"], "unknown table"), (["table2", "--form", "gpu"], "unknown form"),
                                         (["table2", "--seeds", "0,x"], "--seeds"), (["table2", "--seeds", ""], "--seeds"),
                                         (["table3", "--seeds", "1,1"], "twice"), (["table4", "--jobs", "0"], "--jobs")])
def test_bad_input_is_one_line_exit_2_before_any_training(args, match, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["experiment", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]
    assert not out.exists()


def test_table4_two_seeds_then_rerun_skips_every_run(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")  # the one store, honoured
    out = tmp_path / "t2"
    # Table 4 (2 rows x 2 seeds = 4 trainings) exercises the same runner as Table 2 (8) at half the cost;
    # Table 2's rows are trained by test_forms_and_overlays_train_two_iterations_at_batch_2_with_rotations
    cmd = ["experiment", "table4", "--seeds", "0,1", "--max-epochs", "1", "--data", str(tiny_data), "--no-lpips", "--out", str(out),
           "--jobs", "2"]  # two trainings at once: the suite runs on 2 cores
    cmd += [a for o in TINY_OVERRIDES for a in ("--override", o)]
    assert main(cmd) == 0
    first = capsys.readouterr().out
    assert first.count("finished in") == 4
    rows = pd.read_csv(out / "table4.csv")
    ours = rows[(rows["method"] == "nexus_inr") & (rows["split"] == "test")]
    assert sorted(ours["row"].unique()) == ["mlp", "siren"]
    assert ours.groupby("row")["seed"].nunique().eq(2).all() and len(ours) == 2 * 2 * 3  # rows x seeds x subjects
    assert np.isfinite(ours["psnr_t1"]).all() and np.isfinite(ours["ssim_t2"]).all()
    md = (out / "table4.md").read_text()
    for text in ("MLP", "SIREN", "33.21", "vs MLP", "t interval", "Runs finished: 4 of 4"):
        assert text in md, text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nexus_table4").experiment_id])
    assert sorted((r.data.tags["row"], r.data.tags["seed"]) for r in runs) == sorted((r, s) for r in ours["row"].unique() for s in "01")
    assert all(r.data.tags["form"] == "default" and "network_def.mmf" in r.data.params for r in runs)
    assert all(any(k.startswith("test/nexus_inr/psnr_t1") for k in r.data.metrics) for r in runs)
    logs = {p: p.stat().st_mtime for p in out.glob("runs/*/train.log")}
    assert main(cmd) == 0  # the same command again: every run skipped, the table rewritten from the results
    again = capsys.readouterr().out
    assert again.count("done earlier, skipped") == 4 and "finished in" not in again
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/train.log")} == logs
    assert len(pd.read_csv(out / "table4.csv")) == len(rows)
