"""Handlers of :class:`~nexus_monai.evaluation.evaluator.MethodEvaluator` (MONAI's handler shape: each has
``attach(engine)`` and acts on the engine's events, reading ``engine.state.output``, a
:class:`~nexus_monai.evaluation.evaluator.SubjectOutput`, and writing to ``engine.state``).

Attach in this order (ignite fires handlers of one event in attach order):

- :class:`SubjectScores` (every iteration): PSNR / SSIM / LPIPS / MI / lesion-fidelity row of each method
  on the subject's HR grid (:func:`~nexus_monai.metrics.subject_metric_row`) into ``state.rows``;
- :class:`SegmentationScores` (every iteration, Table 5): each frozen segmenter on "Original LR"
  (nearest neighbour), every scored method's output and "Original HR" into ``state.seg_rows``;
- :class:`PanelWriter` (the first subjects): ``panel_<subject>.png``, every method, a failed one black;
- :class:`TableWriter` (run completed): ``per_subject.csv``, the summary tables, and last the manifest
  that marks the file set complete;
- :class:`MLflowLogger` (run completed): one MLflow run with the tables and panels (:func:`log_mlflow`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from PIL import Image

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.data.io import write_text_atomic
from nexus_monai.data.staging import write_manifest
from nexus_monai.errors import find_input_error
from nexus_monai.evaluation.downstream import segmentation_rows
from nexus_monai.evaluation.noisy_gt import noisy_gt_columns
from nexus_monai.evaluation.panels import save_panel, to_uint8
from nexus_monai.keys import CONTRASTS, LESIONS
from nexus_monai.metrics import intensity_scale, subject_metric_row
from nexus_monai.metrics.lesion import lesion_geometry
from nexus_monai.transforms.protocols import Protocol

__all__ = ["SubjectScores", "SegmentationScores", "PanelWriter", "TableWriter", "MLflowLogger", "log_mlflow"]


class SubjectScores:
    """Metric row per method of each subject (``lpips``: compute LPIPS, else reported as n/a).

    A method that raised, or whose scoring raises, gets a row with its error (``ExceptionType: message``);
    an input error among them is also added to ``state.input_errors``. Scored outputs go to
    ``output.ok`` for the handlers after this one.
    """

    def __init__(self, lpips: bool = True):
        self.lpips = lpips

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out.data is None:  # inputs failed: the evaluator wrote the rows
            return
        data, grid = out.data, out.grid
        for m, result in out.results.items():
            row = {"subject": out.subject["subject"], "method": m}
            try:
                if result.error is not None:
                    raise result.error
                pred = result.pred
                pv = {c: pred[c].as_subclass(torch.Tensor).reshape(grid.shape) for c in CONTRASTS}
                lesions = data[LESIONS][0] if LESIONS in data else None  # no map: no lesion columns (NaN in tables)
                sizes = lesion_geometry({c: data[f"{c}_lr"] for c in CONTRASTS}, data["t1"]) if lesions is not None \
                    else None  # lesion size / slab, within-slab operator and LR noise SD of each contrast
                if sizes is not None and "seg" in data:  # a tumour is not normal tissue (false positives)
                    sizes["exclude"] = data["seg"][0].as_subclass(torch.Tensor).numpy() > 0
                row.update(subject_metric_row(out.gt, pv, None, lpips=self.lpips, lesions=lesions,  # default mask
                                              lesion_geometry=sizes))
                row.update(noisy_gt_columns(data, pv, out.gt["t1"] > 0))  # beside the noise-free GT, one release
                row["seconds"] = result.seconds
                row["error"] = ""
                out.ok[m] = pred
            except Exception as err:  # reported in the table, not dropped
                if find_input_error(err) is not None:
                    engine.state.input_errors.append((out.sid, find_input_error(err)))
                row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
            engine.state.rows.append(row)


class SegmentationScores:
    """Table 5 rows: every segmenter (name -> :class:`~nexus_monai.evaluation.downstream.FrozenSegmenter`)
    on "Original LR", each scored method's output and "Original HR", against the subject's labels, inputs
    zeroed outside the brain (HR T1w > 0)."""

    def __init__(self, segmenters: Mapping):
        self.segmenters = segmenters

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out.data is None:
            return
        data = out.data
        inputs = {"Original LR": {c: upsample(data[f"{c}_lr"], out.grid, "nearest") for c in CONTRASTS}}
        inputs.update({m: {c: pred[c] for c in CONTRASTS} for m, pred in out.ok.items()})
        inputs["Original HR"] = {c: data[c] for c in CONTRASTS}
        brain = (data["t1"].as_subclass(torch.Tensor) > 0).float()
        engine.state.seg_rows += segmentation_rows(out.subject["subject"], inputs, data["seg"], self.segmenters,
                                                   brain_mask=brain)


def _slice_tiles(volumes: dict, gt: dict, axis_for: dict) -> list[list[np.ndarray]]:
    """Panel tiles: per contrast, the widest brain slice across each contrast's thick axis, GT first."""
    rows = []
    for c in CONTRASTS:
        g = gt[c].numpy()
        vmax = intensity_scale(g, g > 0)
        ax = axis_for[c]
        mid = int(np.argmax((g > 0).sum(axis=tuple(a for a in range(3) if a != ax))))  # widest brain slice
        take = lambda v: np.take(v, mid, axis=ax)  # noqa: E731
        rows.append([to_uint8(take(g), vmax)] + [to_uint8(take(v[c]), vmax) for v in volumes.values()])
    return rows


class PanelWriter:
    """``panel_<subject>.png`` of the first ``n_subjects`` subjects (by datalist order): the ground truth and
    every method (a failed one as a black tile) on a slice across each contrast's thick axis."""

    def __init__(self, out_dir: str | os.PathLike, protocol: Protocol, methods: Sequence[str], n_subjects: int = 1):
        self.out = Path(out_dir)
        self.protocol, self.methods, self.n_subjects = protocol, list(methods), n_subjects

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if out.data is None or engine.state.iteration > self.n_subjects:
            return
        grid = out.grid
        axis_for = {c: ("xyz".index(str(self.protocol.contrast(c)["axis"])) + 1) % 3 for c in CONTRASTS}
        blank = {c: np.zeros(grid.shape, np.float32) for c in CONTRASTS}
        shown = {m: ({c: out.ok[m][c].as_subclass(torch.Tensor).reshape(grid.shape).numpy() for c in CONTRASTS}
                     if m in out.ok else blank) for m in self.methods}
        panel = self.out / f"panel_{out.subject['subject']}.png"
        save_panel(_slice_tiles(shown, out.gt, axis_for), panel, row_labels=["T1w", "T2w"],
                   col_labels=["GT HR"] + [m if m in out.ok else f"{m} (failed)" for m in self.methods])
        engine.state.panels.append(panel)


class TableWriter:
    """At the end: ``per_subject.csv`` (``state.rows``), then ``table1.csv`` / ``table1.md`` from
    ``table1(frame) -> (summary frame, markdown)``; with ``table5`` also ``table5_per_subject.csv`` and
    ``table5.csv`` / ``table5.md`` from ``table5(seg_frame)``; last the manifest listing the files and panels
    of this run (:func:`~nexus_monai.data.staging.write_manifest`). Sets ``state.frame``, ``state.table``,
    ``state.files``."""

    def __init__(self, out_dir: str | os.PathLike, table1: Callable[[pd.DataFrame], tuple[pd.DataFrame, str]],
                 table5: Callable[[pd.DataFrame], tuple[pd.DataFrame, str]] | None = None):
        self.out, self.table1, self.table5 = Path(out_dir), table1, table5

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state, out = engine.state, self.out
        state.frame = frame = pd.DataFrame(state.rows)
        write_text_atomic(out / "per_subject.csv", frame.to_csv(index=False))
        state.table, markdown = self.table1(frame)
        write_text_atomic(out / "table1.csv", state.table.to_csv(index=False))
        write_text_atomic(out / "table1.md", markdown)
        names = ["per_subject.csv", "table1.csv", "table1.md"]
        if self.table5 is not None:
            seg_frame = pd.DataFrame(state.seg_rows)
            write_text_atomic(out / "table5_per_subject.csv", seg_frame.to_csv(index=False))
            t5, markdown5 = self.table5(seg_frame)
            write_text_atomic(out / "table5.csv", t5.to_csv(index=False))
            write_text_atomic(out / "table5.md", markdown5)
            names += ["table5_per_subject.csv", "table5.csv", "table5.md"]
        state.files = [out / n for n in names]  # written by THIS run (a stale table5 of an earlier run is not listed)
        # last: marks the file set as complete. Names relative to the folder: with a relative --out, paths
        # like results/t1/per_subject.csv would be read as results/t1/results/t1/per_subject.csv.
        write_manifest(out, names + [Path(p).name for p in state.panels])


class MLflowLogger:
    """At the end, after :class:`TableWriter`: :func:`log_mlflow` of ``state.table`` with the tables and panels
    as artifacts; ``settings``: ``tracking_uri``, ``run_name``, ``experiment``, ``params``."""

    def __init__(self, out_dir: str | os.PathLike, settings: Mapping):
        self.out, self.settings = Path(out_dir), dict(settings)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        log_mlflow(engine.state.table, engine.state.files + engine.state.panels, out_dir=self.out, **self.settings)


def log_mlflow(table: pd.DataFrame, artifacts: Sequence[Path], out_dir: str | os.PathLike,
               tracking_uri: str | None = None,
               run_name: str = "evaluate", experiment: str = "nexus_monai_evaluate",
               params: Mapping | None = None) -> str:
    """One MLflow run: ``params``, every numeric table column as ``<method>/<column>``, the files as artifacts.

    ``tracking_uri`` default: ``MLFLOW_TRACKING_URI``, else the project's one store
    (:func:`nexus_monai.engines.mlflow_logging.tracking_uri`), so evaluations sit beside training runs;
    the table is also an MLflow table (``table1.json``) and each panel an MLflow image. NaN values
    (e.g. LPIPS unavailable) are not logged. Returns the run id.
    """
    from mlflow.tracking import MlflowClient

    from nexus_monai.engines.mlflow_logging import ensure_experiment
    from nexus_monai.engines.mlflow_logging import tracking_uri as project_uri

    uri = project_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name(ensure_experiment(experiment, uri)).experiment_id
    run = client.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    try:
        for k, v in (params or {}).items():
            client.log_param(run_id, k, str(v)[:6000])
        for _, r in table.iterrows():
            for col, v in r.items():
                if col in ("method",) or not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v,
                                                                                                                bool):
                    continue
                if math.isfinite(float(v)):
                    client.log_metric(run_id, f"{r['method']}/{col}", float(v))
            if isinstance(r.get("first_error"), str):
                client.set_tag(run_id, f"failed/{r['method']}", r["first_error"][:4000])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="panels" if str(path).endswith(".png") else None)
            if str(path).endswith(".png"):
                client.log_image(run_id, np.asarray(Image.open(path).convert("RGB")), key=Path(path).stem)
        client.log_table(run_id, data=table.astype(object).where(table.notna(), None), artifact_file="table1.json")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
