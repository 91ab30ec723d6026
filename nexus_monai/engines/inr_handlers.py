"""Ignite handlers for implicit SR training: loss terms per epoch, validation report, resume.

* :class:`LossTermsHandler` -- epoch means of every ``loss_<term>`` of the trainer's output go
  to ``engine.state.metrics["train_<term>"]`` (so StatsHandler prints and MLFlowHandler logs
  each term separately).
* :class:`SRValidationReport` -- after each validation: per-subject CSV of Nexus-INR and
  trilinear PSNR/SSIM (``<prefix>_subjects.csv``), a JSON summary, trilinear reference metrics
  into ``state.metrics`` (``trilinear_psnr_t1``...), and a PNG panel (LR / trilinear / model / GT
  for T1w and T2w) written to ``output_dir``; panel and rows are left in ``state.validation_report``
  for :class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger` (MLflow image and table).
* :class:`TrainingCheckpoint` -- periodic full-state checkpoints (network, optimizer, scheduler,
  trainer) written atomically and, on start, resume from the newest one that loads, so a killed
  run continues (even one killed while writing a checkpoint).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from nexus_monai.data.io import write_text_atomic
from nexus_monai.engines.checkpoints import AtomicCheckpointSaver, load_newest
from nexus_monai.engines.inr import subject_scores
from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.visualize import save_panel, to_uint8

__all__ = ["AuxLossWarmup", "LossTermsHandler", "SRValidationReport", "TrainingCheckpoint"]


class LossTermsHandler:
    """Average each ``loss_*`` entry of ``engine.state.output`` over the epoch into ``state.metrics``."""

    def __init__(self, prefix: str = "train_"):
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._n = defaultdict(float), 0

    def _update(self, engine: Engine) -> None:
        out = engine.state.output or {}
        if isinstance(out, (list, tuple)):  # decollated: the scalar losses are replicated per item
            out = out[0] if out else {}
        for k, v in out.items():
            if k.startswith("loss"):
                self._sums[k] += float(v)
        self._n += 1

    def _complete(self, engine: Engine) -> None:
        for k, v in self._sums.items():
            engine.state.metrics[self.prefix + k] = v / max(self._n, 1)


class AuxLossWarmup:
    """Keep the auxiliary loss weights at 0 for the first ``warmup_epochs`` epochs, then restore them.

    ``loss`` is a :class:`~nexus_monai.losses.NexusINRLoss` (its ``w`` dict of term weights);
    ``terms`` are the weights held at 0 (default: the feature and segmentation terms L_KD,
    L_CMFA, L_FDL, L_seg; the SR and T2Self terms always count). Set at every epoch start from
    ``engine.state.epoch``, so a resumed run gets the right weights. Every term is still computed
    and logged during the warm-up. Why (measured on the CPU default, unseen anatomy): with the
    auxiliary terms on from step 0, Adam moves the shared encoders at full step size for them
    while the zero-initialised decoders pass no L_SR gradient back yet, and the SR output stayed
    exactly trilinear for 250+ steps; with L_SR alone first, it left trilinear within 100 steps.
    """

    def __init__(self, loss, warmup_epochs: int, terms=("kd", "cmfa", "fdl", "seg")):
        self.loss, self.warmup_epochs, self.terms = loss, int(warmup_epochs), tuple(terms)
        unknown = set(self.terms) - set(loss.w)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; the loss has {sorted(loss.w)}")
        self.weights = {k: float(loss.w[k]) for k in self.terms}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._set)

    def _set(self, engine: Engine) -> None:
        on = engine.state.epoch > self.warmup_epochs  # state.epoch is 1-based inside EPOCH_STARTED
        for k in self.terms:
            self.loss.w[k] = self.weights[k] if on else 0.0


class SRValidationReport:
    """Per-subject CSV, JSON summary, trilinear reference metrics and a PNG panel after each validation.

    Args:
        output_dir: folder for ``<prefix>_subjects.csv``, ``<prefix>_summary.json`` and
            ``<prefix>_panel_epochNNN.png`` (None: nothing written, e.g. on non-zero DDP ranks).
        prefix: file name prefix.
    """

    def __init__(self, output_dir: str | None, prefix: str = "validation"):
        self.output_dir = Path(output_dir) if output_dir else None
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.panel = [], None

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        tri = {c: upsample(out["lr"][c], out["grid"], "trilinear")[0].as_subclass(torch.Tensor) for c in CONTRASTS}
        scores = out.get("scores") or subject_scores(out["gt"], out["pred"])
        ref = subject_scores(out["gt"], tri, out.get("lesions"))  # lesion columns when the subject has a map
        row = {"subject": out["subject"], **{f"model_{k}": v for k, v in scores.items()},
               **{f"trilinear_{k}": v for k, v in ref.items()}}
        self.rows.append(row)
        if self.panel is None:
            self.panel = self._tiles(out, tri)

    @staticmethod
    def _tiles(out: dict, tri: dict) -> list[list[np.ndarray]]:
        rows = []
        for c in CONTRASTS:
            gt = out["gt"][c].numpy()
            thick = int(np.argmax(out["lr"][c].affine[:3, :3].norm(dim=0).numpy()))  # LR thick axis
            view = (thick + 1) % 3  # a slice plane that contains the thick axis
            mid = int(np.argmax((gt > 0).sum(axis=tuple(a for a in range(3) if a != view))))
            vmax = intensity_scale(gt, gt > 0) if (gt > 0).any() else 1.0
            nearest = upsample(out["lr"][c], out["grid"], "nearest")[0].as_subclass(torch.Tensor).numpy()
            vols = [nearest, tri[c].numpy(), out["pred"][c].numpy(), gt]
            rows.append([to_uint8(np.take(v, mid, axis=view), vmax) for v in vols])
        return rows

    def _complete(self, engine: Engine) -> None:
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r if k != "subject"))  # lesion columns: some subjects
        with warnings.catch_warnings():  # a lesion column no subject has: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            means = {k: float(np.nanmean([r.get(k, np.nan) for r in self.rows])) for k in keys}
        for k, v in means.items():
            if k.startswith("trilinear_"):
                engine.state.metrics[k] = v
        epoch = engine.state.epoch  # ValidationHandler runs the evaluator with the trainer's epoch
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        header = ["subject"] + keys
        lines = [",".join(header)] + [
            ",".join([str(r["subject"])] + [f"{r.get(k, np.nan):.6f}" for k in keys]) for r in self.rows
        ]
        write_text_atomic(self.output_dir / f"{self.prefix}_subjects.csv", "\n".join(lines) + "\n")
        gain = {c: means[f"model_psnr_{c}"] - means[f"trilinear_psnr_{c}"] for c in CONTRASTS}
        summary = {"epoch": epoch, "subjects": len(self.rows), "mean": means, "psnr_gain_over_trilinear_db": gain}
        write_text_atomic(self.output_dir / f"{self.prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
        panel = self.output_dir / f"{self.prefix}_panel_epoch{epoch:04d}.png"
        save_panel(self.panel, panel, row_labels=["T1w", "T2w"],
                   col_labels=["LR (nearest)", "trilinear", "model", "GT HR"])
        # for the tracking handler (nexus_monai.engines.mlflow_logging.MLflowRunLogger): an MLflow image and table
        engine.state.validation_report = {"epoch": epoch, "panel": str(panel), "rows": list(self.rows)}


class TrainingCheckpoint:
    """Periodic full-state checkpoints of a trainer that survive a kill, and resume from the newest one that loads.

    Saves ``save_dict`` (network, optimizer, lr_scheduler, ...) plus the trainer it is attached
    to (under ``"trainer"``) every ``save_interval`` epochs (``checkpoint_epoch=N.pt``, the newest
    ``n_saved`` kept) through :class:`~nexus_monai.engines.checkpoints.AtomicCheckpointSaver`
    (temporary file, fsync, rename; the previous checkpoint is deleted only after the new one is
    complete). With ``resume`` the newest checkpoint in ``ckpt_dir`` that loads is restored when
    the trainer starts (network, optimizer, scheduler, epoch and iteration); one log line names it
    and why any newer one was skipped (e.g. truncated by a disk-full). After the first new save,
    checkpoints of earlier runs in ``ckpt_dir`` (skipped or superseded ones) are removed, so a
    later resume cannot pick a stale one. The trainer is added at ``attach`` time, so bundle
    configs need no reference from a handler back to the trainer (a circular reference).

    Build it on every DDP rank: ignite synchronises ranks while it creates the saver; only
    rank 0 writes.
    """

    pattern = re.compile(r"checkpoint_epoch=(\d+)\.pt$")

    def __init__(self, ckpt_dir: str, save_dict: dict, save_interval: int = 5, n_saved: int = 1, resume: bool = True,
                 map_location="cpu"):
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.n_saved = int(n_saved)
        self.resume = bool(resume)
        self.map_location = map_location
        self.loaded: Path | None = None
        self.saver: AtomicCheckpointSaver | None = None

    def candidates(self) -> list[Path]:
        """Every ``checkpoint_epoch=N.pt`` in ``ckpt_dir``, newest (highest N) first."""
        if not self.ckpt_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := self.pattern.search(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def latest(self) -> Path | None:
        """The newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (None if there is none)."""
        found = self.candidates()
        return found[0] if found else None

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load, objects)
        self.saver = AtomicCheckpointSaver(save_dir=str(self.ckpt_dir), save_dict=objects,
                                           save_interval=self.save_interval,
                                           n_saved=self.n_saved, epoch_level=True)
        self.saver.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=max(self.save_interval, 1)), self._prune)

    def _load(self, engine: Engine, objects: dict) -> None:
        self.loaded = load_newest(self.candidates(), objects, engine, self.map_location, engine.logger)

    def _prune(self, engine: Engine) -> None:
        """Remove checkpoints this run did not write (earlier runs', skipped ones) once it has saved its own."""
        keep = set(self.saver.saved_files()) if self.saver is not None else set()
        if not keep or idist.get_rank() != 0:
            return
        for path in self.candidates():
            if path.name not in keep:
                path.unlink(missing_ok=True)
