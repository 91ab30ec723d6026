"""Ignite handler: BraTS region Dice and HD95 (mm) per case, for validation and evaluation.

MONAI's ``MeanDice`` handler stays the key metric; this handler adds what it cannot: HD95 in mm
(voxel spacing read from each case's affine) and the explicit empty-mask policy of
:func:`nexus_monai.metrics.segmentation.dice_hd95`. After each epoch it puts ``dice_mean``,
``hd95_mean``, ``dice_<R>``, ``hd95_<R>`` and ``empty_cases`` into ``engine.state.metrics`` (so
MLflow and ``StatsHandler`` log them) and, with ``output_dir``, writes ``<prefix>_cases.csv``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from nexus_monai.data.io import write_text_atomic
from nexus_monai.geometry import spacing
from nexus_monai.metrics.segmentation import dice_hd95, summarise_segmentation

__all__ = ["BraTSRegionMetrics"]


class BraTSRegionMetrics:
    """Attach to a (decollated) evaluator whose outputs hold region masks ``pred`` and ``label``
    of shape ``(3, X, Y, Z)`` (TC, WT, ET) as MetaTensors."""

    def __init__(self, output_dir: str | os.PathLike | None = None, prefix: str = "regions", pred_key: str = "pred",
                 label_key: str = "label"):
        self.output_dir = Path(output_dir) if output_dir else None
        self.prefix, self.pred_key, self.label_key = prefix, pred_key, label_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _iteration(self, engine: Engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for item in outputs:
            pred, label = item[self.pred_key], item[self.label_key]
            sp = spacing(label.affine).tolist() if hasattr(label, "affine") else [1.0, 1.0, 1.0]
            row = dice_hd95(pred.detach().cpu() > 0.5, label.detach().cpu() > 0.5, sp)
            meta = getattr(label, "meta", {})
            row["case"] = os.path.basename(str(meta.get("filename_or_obj", len(self.rows))))
            self.rows.append(row)

    def _epoch(self, engine: Engine) -> None:
        if not self.rows:
            return
        summary = summarise_segmentation(self.rows)
        for key, value in summary.items():
            if isinstance(value, (int, float)):
                engine.state.metrics[key] = value
        if self.output_dir is not None:
            buf = io.StringIO()
            keys = ["case"] + [k for k in self.rows[0] if k != "case"]
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
            write_text_atomic(self.output_dir / f"{self.prefix}_cases.csv", buf.getvalue())
