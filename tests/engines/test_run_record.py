"""Training budget: TrainingRunRecord writes it beside the checkpoint, evaluate reads it beside each row."""

import json
import math

import pandas as pd
from ignite.engine import Engine, Events

from nexus_monai.engines.run_record import RUN_RECORD, TrainingRunRecord, read_run_record
from nexus_monai.evaluation.methods import METHODS, training_budget
from nexus_monai.evaluation.table1 import markdown_table, summarise
from nexus_monai.transforms.protocols import load_protocol


def _engine(ckpt_dir):
    engine = Engine(lambda e, batch: batch)
    TrainingRunRecord(ckpt_dir).attach(engine)
    return engine


def test_record_counts_steps_and_adds_resumed_sessions(tmp_path):
    _engine(tmp_path).run([0, 1, 2], max_epochs=2)
    first = read_run_record(tmp_path)
    assert first["steps"] == 6 and first["epochs"] == 2 and first["max_epochs"] == 2
    assert first["finished"] is True and first["sessions"] == 1 and first["seconds"] >= 0

    resumed = _engine(tmp_path)  # a resumed run: the trainer's state restored from its checkpoint
    resumed.load_state_dict({"iteration": 6, "epoch_length": 3, "max_epochs": 2})
    resumed.run([0, 1, 2], max_epochs=4)
    second = read_run_record(tmp_path)
    assert second["steps"] == 12 and second["epochs"] == 4 and second["sessions"] == 2
    assert second["seconds"] >= first["seconds"]

    _engine(tmp_path).run([0, 1], max_epochs=1)  # a fresh start replaces the record
    third = read_run_record(tmp_path)
    assert third["steps"] == 2 and third["sessions"] == 1


def test_record_is_written_after_each_epoch_of_an_unfinished_run(tmp_path):
    engine = _engine(tmp_path)

    @engine.on(Events.ITERATION_COMPLETED)
    def stop(e):
        if e.state.iteration == 4:
            raise KeyboardInterrupt  # a kill in epoch 2: epoch 1's record is on disk

    try:
        engine.run([0, 1, 2], max_epochs=3)
    except KeyboardInterrupt:
        pass
    record = read_run_record(tmp_path)
    assert record["steps"] == 3 and record["finished"] is False


def test_a_run_stopped_before_its_last_epoch_is_not_finished(tmp_path):
    """ignite fires COMPLETED after terminate() (a wall-clock budget stop): the record says finished: false."""
    engine = _engine(tmp_path)

    @engine.on(Events.EPOCH_COMPLETED)
    def budget(e):
        if e.state.epoch == 2:
            e.terminate()

    engine.run([0, 1, 2], max_epochs=5)
    record = read_run_record(tmp_path)
    assert record["epochs"] == 2 and record["max_epochs"] == 5 and record["finished"] is False

    stopped_at_the_end = _engine(tmp_path / "b")  # a stop after the last epoch: the run did finish
    stopped_at_the_end.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    stopped_at_the_end.run([0, 1], max_epochs=2)
    assert read_run_record(tmp_path / "b")["finished"] is True


def test_training_budget_reads_the_bundle_record(tmp_path, monkeypatch):
    def fake(inputs, grid, **_):
        raise AssertionError("not called")

    fake.bundle = str(tmp_path / "bundle")
    monkeypatch.setitem(METHODS, "budget_for_test", fake)
    assert all(math.isnan(v) for v in training_budget("budget_for_test").values())  # no record yet
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / RUN_RECORD).write_text(json.dumps({"steps": 1200, "seconds": 511.5}))
    assert training_budget("budget_for_test") == {"train_steps": 1200.0, "train_seconds": 511.5}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RUN_RECORD).write_text(json.dumps({"steps": 30, "seconds": 9.0}))
    assert training_budget("budget_for_test", {"weights": str(tmp_path / "other" / "model.pt")})["train_steps"] == 30
    assert all(math.isnan(v) for v in training_budget("trilinear").values())  # no cohort training

    frame = pd.DataFrame([{"subject": "a", "method": m, "psnr_t1": 30.0, "seconds": 1.0, "error": ""}
                          for m in ("trilinear", "budget_for_test")])
    table = summarise(frame, ["trilinear", "budget_for_test"])
    table["train_steps"] = [math.nan, 1200.0]
    table["train_seconds"] = [math.nan, 511.5]
    md = markdown_table(table, load_protocol("nexus"), n_subjects=1)
    assert "training (steps, s)" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 1200, 512 |" in rows["budget_for_test"] and "| - |" in rows["trilinear"]
