"""MLflowRunLogger: hyper-parameters as params, tags, the model with its sha256, validation panels as MLflow
images and rows as MLflow tables, in the run MONAI's MLFlowHandler opened; one tracking URI everywhere."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import MLFlowHandler
from PIL import Image

from nexus_monai.engines import mlflow_logging as ml
from nexus_monai.engines.segmentation import BraTSRegionMetrics

RAW_CONFIG = {
    "imports": ["$import torch"],
    "learning_rate": 0.001,
    "batch_size": 2,
    "patch_size": [32, 32, 32],
    "dataset_dir": "embedded",
    "seed": 7,
    "ckpt_dir": "$@bundle_root + '/models'",
    "protocol": {"name": "nexus", "contrasts": {"t1": {"axis": "z", "factor": 2}}},
    "network_def": {"_target_": "nexus_monai.networks.NexusINR", "features": "@width", "mmf": True, "kd_attn": False},
    "width": 16,
    "loss": {"_target_": "nexus_monai.losses.NexusINRLoss", "w_kd": 0.01, "w_seg": 0.0},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
    "train": {"trainer": {"_target_": "SupervisedTrainer"}},
}


def test_config_params_flattens_literals_and_resolves_references():
    params = ml.config_params(RAW_CONFIG)
    assert params["learning_rate"] == "0.001" and params["batch_size"] == "2" and params["seed"] == "7"
    assert params["patch_size"] == "[32, 32, 32]" and params["dataset_dir"] == "embedded"
    assert params["network_def.features"] == "16"  # @width resolved
    assert params["network_def.mmf"] == "true" and params["network_def.kd_attn"] == "false"
    assert params["network_def._target_"] == "nexus_monai.networks.NexusINR"
    assert params["loss.w_kd"] == "0.01" and params["optimizer.lr"] == "0.001"
    assert params["protocol.contrasts.t1.factor"] == "2"
    assert not any(k.startswith(("imports", "train", "ckpt_dir", "optimizer.params")) for k in params)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_MONAI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = ml.tracking_uri()
    assert default == f"sqlite:///{tmp_path / 'cache' / 'mlflow' / 'mlruns.db'}"
    assert (tmp_path / "cache" / "mlflow").is_dir()
    assert ml.artifact_location(default) == (tmp_path / "cache" / "mlflow" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert ml.tracking_uri() == "sqlite:///elsewhere.db"
    assert ml.tracking_uri("sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_logger_is_inert_without_tracking(tmp_path):
    logger = ml.MLflowRunLogger(executed_config=True, tracking_uri=f"sqlite:///{tmp_path}/x.db", run_name="r")
    engine = Engine(lambda e, b: None)
    logger.attach(engine)
    engine.run([0], max_epochs=1)
    assert not (tmp_path / "x.db").exists()  # nothing created, nothing logged


def test_run_with_params_tags_model_images_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    executed = tmp_path / "config_20260101_000000.json"
    executed.write_text(json.dumps(RAW_CONFIG))
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    torch.save({"w": torch.arange(4.0)}, model)
    panel = tmp_path / "panel.png"
    Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)).save(panel)

    common = {"tracking_uri": uri, "experiment_name": "unit_sr", "run_name": "unit_run"}
    trainer = Engine(lambda e, b: {"loss": 0.5})
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def report(engine):  # what SRValidationReport leaves for the logger
        rows = [{"subject": "s1", "psnr": 30.5}, {"subject": "s2", "psnr": float("nan")}]
        engine.state.validation_report = {"epoch": trainer.state.epoch, "panel": str(panel), "rows": rows}

    ml.MLflowRunLogger(executed_config=str(executed), tags={"bundle": "nexus_inr", "protocol": "nexus"},
                       model_file=str(model), **common).attach(trainer)
    ml.MLflowRunLogger(executed_config=str(executed), report=True, **common).attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    # MONAI's own handlers, as `--tracking mlflow` appends them (after ours)
    MLFlowHandler(close_on_complete=True, output_transform=lambda o: o["loss"], **common).attach(trainer)
    MLFlowHandler(iteration_log=False, **common).attach(evaluator)
    trainer.run([0, 1], max_epochs=2)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("unit_sr")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # MONAI's handlers and ours share ONE run
    run = runs[0]
    assert run.info.run_name == "unit_run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.001" and params["network_def.mmf"] == "true" and params["loss.w_kd"] == "0.01"
    tags = run.data.tags
    assert tags["bundle"] == "nexus_inr" and tags["protocol"] == "nexus"
    assert tags["git_commit"] and tags["nexus_monai_version"]
    assert tags["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    # images: one per validation, keyed and stepped
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert steps == [1, 2] and all("validation_panel" in p for p in images)
    # tables: MLflow's table JSON per validation
    tables = sorted(a.path for a in client.list_artifacts(run.info.run_id, "validation"))
    assert tables == ["validation/epoch_0001.json", "validation/epoch_0002.json"]
    local = client.download_artifacts(run.info.run_id, "validation/epoch_0002.json", str(tmp_path / "dl"))
    table = json.loads(open(local).read())
    assert table["columns"] == ["subject", "psnr"] and table["data"][0] == ["s1", 30.5] and table["data"][1][1] is None
    # artifacts sit beside the sqlite store, not in the working directory
    assert experiment.artifact_location.startswith((tmp_path / "store").as_uri())
    assert not os.path.exists("mlruns") or os.path.abspath("mlruns") != str(tmp_path / "store" / "mlruns")


@pytest.mark.parametrize("value, expected", [(float("inf"), None), (np.float32(1.5), 1.5), ("a", "a")])
def test_table_cells(value, expected):
    assert ml._cell(value) == expected


def test_segmentation_validation_reaches_mlflow_as_image_and_table(tmp_path, monkeypatch):
    """seg_unet / seg_transunet: BraTSRegionMetrics leaves the per-case rows and a panel of the first case
    in ``state.validation_report``; the logger turns them into an MLflow image and table."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    label = torch.zeros(3, 12, 10, 8)
    label[1, 3:9, 2:8, 2:6] = 1  # whole tumour
    label[0, 4:8, 3:7, 3:5] = 1  # tumour core inside it
    label[2, 5:7, 4:6, 4] = 1  # enhancing tumour, largest on slice 4
    pred = label.clone()
    pred[2] = 0  # enhancing tumour missed
    image = torch.rand(4, 12, 10, 8) + 0.1
    item = {"image": MetaTensor(image, affine=affine), "pred": MetaTensor(pred, affine=affine),
            "label": MetaTensor(label, affine=affine,
                                meta={"filename_or_obj": "/d/BraTS20_Training_007_seg.nii.gz"})}
    common = {"tracking_uri": uri, "experiment_name": "unit_seg", "run_name": "seg_run"}
    evaluator = Engine(lambda e, b: [item])
    BraTSRegionMetrics(output_dir=tmp_path / "eval", prefix="validation").attach(evaluator)
    ml.MLflowRunLogger(executed_config=str(tmp_path / "none.json"), report=True, **common).attach(evaluator)
    MLFlowHandler(iteration_log=False, close_on_complete=True, **common).attach(evaluator)
    evaluator.run([0], max_epochs=1)

    report = evaluator.state.validation_report
    assert report["epoch"] == 1 and [r["case"] for r in report["rows"]] == ["BraTS20_Training_007_seg.nii.gz"]
    row = report["rows"][0]
    assert row["dice_WT"] == pytest.approx(1.0) and row["dice_TC"] == pytest.approx(1.0) and row["dice_ET"] == 0.0
    with Image.open(report["panel"]) as png:  # image | label | prediction of slice 4, grey levels per region
        panel = np.asarray(png)
    assert panel.ndim == 2 and panel.shape[1] > 3 * 2 * 12
    tiles = BraTSRegionMetrics()._tiles(item)
    assert [t.shape for t in tiles] == [(12, 10)] * 3
    assert int(tiles[1].max()) == 255 and int(tiles[2].max()) == 170  # label reaches ET (3), prediction TC (2)
    assert np.array_equal(tiles[1] // 85, label.numpy().sum(0)[..., 4].astype(np.uint8))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("unit_seg").experiment_id])[0]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert images and all("validation_panel" in p for p in images)
    local = client.download_artifacts(run.info.run_id, "validation/epoch_0001.json", str(tmp_path / "dl"))
    table = json.loads(open(local).read())
    case = table["data"][0][table["columns"].index("case")]
    assert case == "BraTS20_Training_007_seg.nii.gz"
    assert table["data"][0][table["columns"].index("dice_ET")] == 0.0


def test_slice_stack_validation_reaches_mlflow_as_image_and_table(tmp_path, monkeypatch):
    """saint / i3net: SliceStackValidationReport leaves per-case rows (named by subject and contrast) and a
    panel of the first case in ``state.validation_report``; the logger turns them into an MLflow image and table."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Compose, DeleteItemsd

    from nexus_monai.baselines.slice_stack import SliceStackValidationReport, ThickSliceTrainingPaird
    from nexus_monai.networks.saint import SAINT

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    gen = torch.Generator().manual_seed(0)
    hr = torch.zeros(1, 16, 16, 16)
    hr[:, 3:13, 2:14, 4:12] = torch.rand(1, 10, 12, 8, generator=gen) * 0.8 + 0.1
    data = [{"image": hr.clone(), "subject": "s01", "contrast": c, "axis": a, "factor": f, "profile": "gaussian"}
            for c, a, f in (("t1", "z", 2.0), ("t2", "y", 4.0))]
    transform = Compose([ThickSliceTrainingPaird(keys="image", label_key="label"),
                         DeleteItemsd(keys=["axis", "factor", "profile"])])
    loader = DataLoader(Dataset(data, transform), batch_size=1)
    network = SAINT(features=4, blocks=1, fusion_features=4, fusion_blocks=1).eval()  # untrained: the B-spline
    common = {"tracking_uri": uri, "experiment_name": "unit_saint", "run_name": "saint_run"}
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network)
    SliceStackValidationReport(output_dir=tmp_path / "eval").attach(evaluator)
    ml.MLflowRunLogger(executed_config=str(tmp_path / "none.json"), report=True, **common).attach(evaluator)
    MLFlowHandler(iteration_log=False, close_on_complete=True, **common).attach(evaluator)
    evaluator.run()

    report = evaluator.state.validation_report
    assert report["epoch"] == 1 and [r["case"] for r in report["rows"]] == ["s01_t1", "s01_t2"]
    base, target = transform(data[0])["image"][0].numpy(), transform(data[0])["label"][0].numpy()
    expected = 10 * np.log10(1.0 / np.mean((base.astype(np.float64) - target) ** 2))  # PSNR of the B-spline input
    row = report["rows"][0]
    assert row["bspline_psnr"] == pytest.approx(expected, rel=1e-5)
    assert row["psnr"] == pytest.approx(row["bspline_psnr"], abs=1e-3) and 0 < row["ssim"] <= 1
    with Image.open(report["panel"]) as png:  # B-spline input | network | target
        assert np.asarray(png).shape[1] > 3 * 2 * 16

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("unit_saint").experiment_id])[0]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert images and all("validation_panel" in p for p in images)
    local = client.download_artifacts(run.info.run_id, "validation/epoch_0001.json", str(tmp_path / "dl"))
    table = json.loads(open(local).read())
    assert [r[table["columns"].index("case")] for r in table["data"]] == ["s01_t1", "s01_t2"]
    assert table["data"][0][table["columns"].index("bspline_psnr")] == pytest.approx(expected, rel=1e-5)
