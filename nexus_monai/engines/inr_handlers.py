"""Ignite handlers for implicit SR training: loss terms per epoch, validation report, resume.

* :class:`LossTermsHandler` -- epoch means of every ``loss_<term>`` of the trainer's output go
  to ``engine.state.metrics["train_<term>"]`` (so StatsHandler prints and MLFlowHandler logs
  each term separately).
* :class:`SRValidationReport` -- after each validation: per-subject CSV of the model, trilinear and
  back-projection (``ibp``: trilinear + the consistency guard of ``nexus-sr predict``, no network)
  PSNR/SSIM and lesion fidelity (``<prefix>_subjects.csv``), a JSON summary (gains over trilinear and
  over ibp), the reference metrics into ``state.metrics`` (``trilinear_psnr_t1``, ``ibp_psnr_t1``...),
  and a PNG panel (LR / trilinear / ibp / model / GT for T1w and T2w) written to ``output_dir``; panel
  and rows are left in ``state.validation_report`` for
  :class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger` (MLflow image and table).
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
from nexus_monai.engines.consistency import consistency_guard, guard_options_from_env
from nexus_monai.engines.inr import subject_scores
from nexus_monai.keys import CONTRASTS, LESIONS
from nexus_monai.metrics.image_quality import as_mask, intensity_scale
from nexus_monai.metrics.lesion import lesion_fidelity_row, lesion_geometry
from nexus_monai.metrics.subject_row import SCALE_PERCENTILE
from nexus_monai.transforms.interpolation import upsample
from nexus_monai.visualize import save_panel, to_uint8

__all__ = ["AuxLossWarmup", "LossTermsHandler", "SRValidationReport", "TrainingCheckpoint"]


class LossTermsHandler:
    """Average each ``loss_*`` entry of ``engine.state.output`` over the epoch into ``state.metrics``.

    Each entry is averaged over the iterations that reported it (a diagnostic such as the loss on
    lesion points is absent from a batch without lesions, not zero).
    """

    def __init__(self, prefix: str = "train_"):
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._counts = defaultdict(float), defaultdict(int)

    def _update(self, engine: Engine) -> None:
        out = engine.state.output or {}
        if isinstance(out, (list, tuple)):  # decollated: the scalar losses are replicated per item
            out = out[0] if out else {}
        for k, v in out.items():
            if k.startswith("loss"):
                self._sums[k] += float(v)
                self._counts[k] += 1

    def _complete(self, engine: Engine) -> None:
        for k, v in self._sums.items():
            engine.state.metrics[self.prefix + k] = v / max(self._counts[k], 1)


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
    """Per-subject CSV, JSON summary, reference metrics (trilinear, ibp) and a PNG panel after each validation.

    Back-projection (``ibp``) is the trilinear interpolation of each LR scan corrected by
    :func:`~nexus_monai.engines.consistency.consistency_guard` with the options of ``nexus-sr predict``
    (``NEXUS_GUARD_OPTIONS`` honoured): the floor the network must clear, so ``model - ibp`` is its own
    contribution. It does not depend on the network, so it is computed once per subject and reused in
    later validations. Subjects with a lesion instance map also get the lesion columns by lesion size
    relative to each contrast's slab thickness (the LR scan's thick spacing) for model, trilinear and ibp.

    Args:
        output_dir: folder for ``<prefix>_subjects.csv``, ``<prefix>_summary.json`` and
            ``<prefix>_panel_epochNNN.png`` (None: nothing written, e.g. on non-zero DDP ranks).
        prefix: file name prefix.
        ibp: score back-projection beside trilinear (default True).
    """

    def __init__(self, output_dir: str | None, prefix: str = "validation", ibp: bool = True):
        self.output_dir = Path(output_dir) if output_dir else None
        self.prefix = prefix
        self.ibp = bool(ibp)
        self._ibp_cache: dict = {}  # subject key -> {"scores": ..., "volumes": ... (the panel's subject only)}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.panel = [], None

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        lesions = out.get(LESIONS)
        grid = out["grid"]
        lr_up = {c: upsample(out["lr"][c], grid, "trilinear") for c in CONTRASTS}  # MetaTensors (1, X, Y, Z)
        tri = {c: lr_up[c][0].as_subclass(torch.Tensor) for c in CONTRASTS}
        scores = dict(out.get("scores") or subject_scores(out["gt"], out["pred"], lesions))
        ref = subject_scores(out["gt"], tri, lesions)  # lesion columns when the subject has a map
        if lesions is not None:  # lesion columns by size relative to each contrast's slab thickness
            geometry = lesion_geometry(out["lr"], grid.affine)
            scores.update(_lesion_sizes(out["gt"], out["pred"], lesions, geometry))
            ref.update(_lesion_sizes(out["gt"], tri, lesions, geometry))
        row = {"subject": out["subject"], **{f"model_{k}": v for k, v in scores.items()},
               **{f"trilinear_{k}": v for k, v in ref.items()}}
        ibp = None
        if self.ibp:
            ibp_scores, ibp = self._back_projection(out, lr_up, lesions, need_volumes=self.panel is None)
            row.update({f"ibp_{k}": v for k, v in ibp_scores.items()})
        self.rows.append(row)
        if self.panel is None:
            self.panel = self._tiles(out, tri, ibp)

    def _back_projection(self, out: dict, lr_up: dict, lesions, need_volumes: bool) -> tuple[dict, dict | None]:
        """``(scores, volumes or None)`` of ibp for this subject: trilinear + predict's guard, computed once per
        subject and reused (volumes are kept for one subject only, the panel's)."""
        lr = out["lr"]
        key = (str(out["subject"]), tuple(out["grid"].shape),
               *((tuple(lr[c].shape), round(float(lr[c].as_subclass(torch.Tensor).double().sum()), 3))
                 for c in CONTRASTS))
        hit = self._ibp_cache.get(key)
        if hit is None or (need_volumes and hit["volumes"] is None):
            guarded, _, _ = consistency_guard(lr_up, lr, out["grid"], guard_options_from_env())
            vol = {c: guarded[c][0].as_subclass(torch.Tensor).float() for c in CONTRASTS}
            scores = subject_scores(out["gt"], vol, lesions)
            if lesions is not None:
                scores.update(_lesion_sizes(out["gt"], vol, lesions, lesion_geometry(lr, out["grid"].affine)))
            if need_volumes:
                for other in self._ibp_cache.values():
                    other["volumes"] = None
            hit = {"scores": scores, "volumes": vol if need_volumes else None}
            self._ibp_cache[key] = hit
        return dict(hit["scores"]), hit["volumes"]

    @staticmethod
    def _tiles(out: dict, tri: dict, ibp: dict | None = None) -> list[list[np.ndarray]]:
        rows = []
        for c in CONTRASTS:
            gt = out["gt"][c].numpy()
            thick = int(np.argmax(out["lr"][c].affine[:3, :3].norm(dim=0).numpy()))  # LR thick axis
            view = (thick + 1) % 3  # a slice plane that contains the thick axis
            mid = int(np.argmax((gt > 0).sum(axis=tuple(a for a in range(3) if a != view))))
            vmax = intensity_scale(gt, gt > 0) if (gt > 0).any() else 1.0
            nearest = upsample(out["lr"][c], out["grid"], "nearest")[0].as_subclass(torch.Tensor).numpy()
            vols = [nearest, tri[c].numpy()] + ([ibp[c].numpy()] if ibp is not None else []) + [
                out["pred"][c].numpy(), gt]
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
            if k.startswith(("trilinear_", "ibp_")):
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
        if self.ibp:  # the network's own contribution: model minus back-projection
            summary["psnr_gain_over_ibp_db"] = {c: means[f"model_psnr_{c}"] - means[f"ibp_psnr_{c}"]
                                                for c in CONTRASTS}
        write_text_atomic(self.output_dir / f"{self.prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
        panel = self.output_dir / f"{self.prefix}_panel_epoch{epoch:04d}.png"
        save_panel(self.panel, panel, row_labels=["T1w", "T2w"],
                   col_labels=["LR (nearest)", "trilinear"] + (["ibp"] if self.ibp else []) + ["model", "GT HR"])
        # for the tracking handler (nexus_monai.engines.mlflow_logging.MLflowRunLogger): an MLflow image and table
        engine.state.validation_report = {"epoch": epoch, "panel": str(panel), "rows": list(self.rows)}


def _lesion_sizes(gt: dict, pred: dict, lesions, geometry: dict) -> dict:
    """The lesion columns that need the LR scans (:func:`~nexus_monai.metrics.lesion.lesion_geometry`: by size,
    within-slab part, false positives; metric v2) of one subject, on the intensities
    :func:`~nexus_monai.engines.inr.subject_scores` scores (GT-percentile scale, mask GT T1w > 0)."""
    g0 = gt["t1"].numpy()
    mask = as_mask(g0 > 0, g0.shape)
    scales = {c: intensity_scale(gt[c].numpy(), mask, SCALE_PERCENTILE) for c in CONTRASTS}
    return lesion_fidelity_row({c: gt[c].numpy() / scales[c] for c in CONTRASTS},
                               {c: pred[c].numpy() / scales[c] for c in CONTRASTS}, lesions, mask, scales=scales,
                               **geometry)


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
