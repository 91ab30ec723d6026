"""Ignite handler: BraTS region Dice and HD95 (mm) per case, for validation and evaluation.

MONAI's ``MeanDice`` handler stays the key metric; this handler adds what it cannot: HD95 in mm
(voxel spacing read from each case's affine) and the explicit empty-mask policy of
:func:`nexus_monai.metrics.segmentation.dice_hd95`. After each epoch it puts ``dice_mean``,
``hd95_mean``, ``dice_<R>``, ``hd95_<R>`` and ``empty_cases`` into ``engine.state.metrics`` (so
MLflow and ``StatsHandler`` log them) and, with ``output_dir``, writes ``<prefix>_cases.csv``.

For the tracking handler (:class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger`, an MLflow
image and table per validation) it leaves ``engine.state.validation_report``: the epoch, the
per-case rows and a panel of the epoch's first case -- the slice (last axis) with the most labelled
region voxels (TC + WT + ET): the image's first channel, the label's regions and the predicted regions (grey levels 0
none, 1 whole tumour, 2 tumour core, 3 enhancing tumour); with ``output_dir`` also saved as
``<prefix>_panel_epochNNNN.png``.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import torch
from ignite.engine import Engine

from nexus_monai.data.io import write_text_atomic
from nexus_monai.engines.epoch_report import EpochReport
from nexus_monai.geometry import spacing
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.metrics.segmentation import dice_hd95, summarise_segmentation
from nexus_monai.visualize import save_panel, to_uint8

__all__ = ["BraTSRegionMetrics"]


class BraTSRegionMetrics(EpochReport):
    """Attach to a (decollated) evaluator whose outputs hold region masks ``pred`` and ``label``
    of shape ``(3, X, Y, Z)`` (TC, WT, ET) as MetaTensors."""

    def __init__(self, output_dir: str | os.PathLike | None = None, prefix: str = "regions", pred_key: str = "pred",
                 label_key: str = "label", image_key: str = "image"):
        super().__init__(output_dir, prefix)
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key

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
            if self.panel is None:
                self.panel = self._tiles(item)

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
        epoch = engine.state.epoch  # ValidationHandler runs the evaluator with the trainer's epoch
        panel = None
        if self.panel:
            if self.output_dir is not None:
                panel = self.output_dir / f"{self.prefix}_panel_epoch{epoch:04d}.png"
                save_panel([self.panel], panel, col_labels=["image", "label", "prediction"][-len(self.panel):])
                panel = str(panel)
            else:  # the tiles side by side, oriented as save_panel shows them
                panel = np.hstack([np.flipud(t.T) for t in self.panel])
        engine.state.validation_report = {"epoch": epoch, "panel": panel, "rows": list(self.rows)}

    def _tiles(self, item) -> list[np.ndarray]:
        """Image (first channel), label and predicted regions on the slice (last axis) with most labelled voxels."""
        label = item[self.label_key].detach().cpu().as_subclass(torch.Tensor).numpy() > 0.5  # (3, X, Y, Z)
        pred = item[self.pred_key].detach().cpu().as_subclass(torch.Tensor).numpy() > 0.5
        z = int(np.argmax(label.sum((0, 1, 2))))  # most labelled voxels, all three regions counted
        tiles = [to_uint8(label.sum(0)[..., z], 3.0), to_uint8(pred.sum(0)[..., z], 3.0)]  # nested: 1 WT, 2 TC, 3 ET
        image = item.get(self.image_key) if hasattr(item, "get") else None
        if image is not None:
            img = image.detach().cpu().as_subclass(torch.Tensor).numpy()[0]
            vmax = intensity_scale(img, img > 0) if (img > 0).any() else 1.0
            tiles.insert(0, to_uint8(img[..., z], vmax))
        return tiles
