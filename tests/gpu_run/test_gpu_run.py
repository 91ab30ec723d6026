"""The GPU run driver (``python -m nexus_monai.ops.gpu_run``) on the CPU with tiny networks: two configurations
trained side by side, one ended cleanly by the wall-clock budget with a best-validation model.pt, both
scored on validation and test with trilinear and ibp beside, tables, fp16 weight parts of at most the file
limit that load back into the network, the timings JSON, at most 8 files out; the budget handler alone;
bad plans are one-line errors."""

import json
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from ignite.engine import Engine, Events

from nexus_monai.engines.budget import BUDGET_RECORD, WallClockBudget
from nexus_monai.errors import NexusInputError
from nexus_monai.ops.gpu_run import load_fp16_parts, load_plan, main, run_plan, save_fp16_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"network_def#features": 4, "network_def#encoder_options": {"blocks": 1, "layers": 1, "growth": 4},
        "network_def#decoder_hidden": 16, "network_def#attn_heads": 2, "patch_size": [16, 16, 16], "num_points": 64,
        "val_interval": 1, "ckpt_interval": 1000}


def test_budget_handler_validates_the_last_weights_and_stops(tmp_path):
    validations = []
    validator = Engine(lambda e, b: None)
    validator.add_event_handler(Events.COMPLETED, lambda e: validations.append(trainer.state.epoch))
    trainer = Engine(lambda e, b: time.sleep(0.02))
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), lambda e: validator.run([0]))  # ValidationHandler
    budget = WallClockBudget(0.6, validator=validator, ckpt_dir=tmp_path)
    budget.attach(trainer)
    trainer.run([0, 1], max_epochs=100_000)
    record = json.loads((tmp_path / BUDGET_RECORD).read_text())
    assert budget.stopped and record["stopped"] and trainer.state.epoch < 100_000
    assert validations[-1] == trainer.state.epoch == record["epoch"]  # the last weights were validated
    assert record["final_validation"] == (trainer.state.epoch % 2 != 0)
    # a run that completes within the budget is not stopped, and says so
    done = Engine(lambda e, b: None)
    WallClockBudget(3600, ckpt_dir=tmp_path / "b").attach(done)
    done.run([0], max_epochs=3)
    assert json.loads((tmp_path / "b" / BUDGET_RECORD).read_text())["stopped"] is False and done.state.epoch == 3
    with pytest.raises(ValueError, match="seconds"):
        WallClockBudget(0)


def test_fp16_parts_round_trip_and_size_limit(tmp_path):
    torch.manual_seed(0)
    state = {"big.weight": torch.randn(300, 100), "small.bias": torch.randn(7), "steps": torch.tensor([3, 4]),
             "mid": torch.randn(40, 40)}
    torch.save({"model": state}, tmp_path / "model.pt")
    limit = 64 * 1024 + 24_000  # 24 kB of tensors per part (64 KiB kept for the structure): big.weight (60 kB) is cut
    files = save_fp16_parts(tmp_path / "model.pt", tmp_path / "w", "run0", max_bytes=limit)
    assert len(files) >= 2 and all(f.stat().st_size <= limit for f in files)
    back = load_fp16_parts(files)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        expected = v.half().to(v.dtype) if v.is_floating_point() else v
        assert torch.equal(back[k], expected), k
    with pytest.raises(NexusInputError, match="parts"):
        load_fp16_parts(files[:1])


def test_bad_plan_is_a_one_line_error(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("budget_s: 10\nruns:\n  - {row: baseline, seed: 0, configs: [experiments/nope.yaml]}\n")
    with pytest.raises(NexusInputError, match="nope.yaml"):
        load_plan(plan)
    assert main(["run", "--plan", str(plan), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(plan) in err[0]
    plan.write_text("budget_s: -1\nruns: [{row: baseline, seed: 0}]\n")
    with pytest.raises(NexusInputError, match="budget_s"):
        load_plan(plan)


@pytest.mark.integration
def test_two_configs_side_by_side_one_stopped_by_the_budget(tiny_bundle_dataset, tmp_path_factory, tmp_path):
    data = tiny_bundle_dataset(tmp_path_factory.mktemp("gpurun") / "data", n=2)
    plan = {"form": "tiny", "budget_s": 8, "splits": ["validation", "test"], "overrides": dict(TINY),
            "runs": [{"row": "baseline", "seed": 0, "configs": ["experiments/baseline.yaml"],
                      "overrides": {"max_epochs": 1}},
                     {"row": "mmf_kdattn_sel", "seed": 1, "configs": [], "overrides": {"max_epochs": 100_000}}]}
    (tmp_path / "plan.yaml").write_text(__import__("yaml").safe_dump(plan))
    out = tmp_path / "out"
    timings = run_plan(load_plan(tmp_path / "plan.yaml"), data / "dataset.json", tmp_path / "work", out, device="cpu",
                       grace_s=240)
    files = sorted(out.iterdir())
    assert 3 <= len(files) <= 8 and all(f.stat().st_size <= 15 * 2**20 for f in files)
    runs = timings["runs"]
    short, long = runs["tiny_baseline_seed0"], runs["tiny_mmf_kdattn_sel_seed1"]
    assert short["exit"] == 0 and short["epochs"] == 1 and short["stopped_by_budget"] is False
    assert long["exit"] == 0 and long["stopped_by_budget"] is True and 1 <= long["epochs"] < 100_000
    assert json.loads((out / "timings.json").read_text())["runs"] == runs
    work = tmp_path / "work" / "runs" / "tiny_mmf_kdattn_sel_seed1" / "models"
    assert (work / "model.pt").is_file()  # best-validation checkpoint of the stopped run
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        rows = pd.read_csv(tar.extractfile("tables/gpu_runs.csv"))
        summary = tar.extractfile("tables/summary.md").read().decode()
    assert {"tables/summary.csv", "tables/table2.md", "tables/table2.csv", "tables/timings.json",
            "runs/tiny_baseline_seed0/train.log"} <= names
    got = rows.groupby(["run", "split"])["method"].apply(set).to_dict()
    assert got == {(r, s): {"trilinear", "ibp", "nexus_inr"} for r in runs for s in ("validation", "test")}
    assert rows["psnr_t1"].notna().all() and "stopped by budget" in summary
    # the fp16 weights of the stopped run load back into its network (fp16-rounded values)
    parts = sorted(out.glob("tiny_mmf_kdattn_sel_seed1.fp16.*.pt"))
    assert parts and set(timings["weights"]["packed_best_validation_first"]) == set(runs)
    state = load_fp16_parts(parts)
    ref = torch.load(work / "model.pt", weights_only=True)
    ref = ref.get("model", ref)
    assert state.keys() == ref.keys()
    for k in ref:
        assert state[k].dtype == ref[k].dtype
        torch.testing.assert_close(state[k], ref[k].half().to(ref[k].dtype) if ref[k].is_floating_point() else ref[k])
