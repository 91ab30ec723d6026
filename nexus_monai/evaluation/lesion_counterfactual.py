"""Counterfactual imprint in ``nexus-sr evaluate`` (``--counterfactual-imprint``): re-render, re-run, compare.

For a simulated subject (its ``<ID>_params.json`` beside the images names the generator's seed, index and
family) the subject is rendered three times by the generator: as it is, without its T2w-only lesions and
without its T1w-only lesions (:func:`~nexus_monai.data.synth.lesions.lesion_classes_off`: those lesions get
white matter's parameters; every random draw identical). Each render is written to a temporary folder with
the same datalist entry otherwise (so the protocol simulates the LR scans with the same drawn acquisition
keys), prepared by the protocol, and every method runs on all three. The imprint
(:func:`~nexus_monai.metrics.lesion_counterfactual.counterfactual_imprint_row`) compares the other
contrast's output with and without the lesions, on intensities divided by the ground truth's scale.

Cost per subject: three generator renders (about 20-25 s each on one CPU core at the 2 mm size, paid once
per subject) plus three extra runs of every method (inference only for cohort models; a fit for
subject-specific ones). Subjects without generator parameters (BraTS, real scans) get NaN columns.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from nexus_monai.data.io import save_volume
from nexus_monai.data.synth.grid import SIZES
from nexus_monai.data.synth.lesions import lesion_classes_off
from nexus_monai.data.synth.physics import MODALITIES
from nexus_monai.data.synth.subject import simulate_subject
from nexus_monai.geometry import TargetGrid
from nexus_monai.keys import CONTRASTS, LESION_T1_ONLY, LESION_T2_ONLY, LESIONS
from nexus_monai.metrics.image_quality import intensity_scale
from nexus_monai.metrics.lesion_counterfactual import counterfactual_columns, counterfactual_imprint_row
from nexus_monai.metrics.subject_row import SCALE_PERCENTILE

__all__ = ["generator_arguments", "CounterfactualSubject", "CounterfactualImprint"]

_OFF = {"t2": LESION_T2_ONLY, "t1": LESION_T1_ONLY}  # lesions shown on c only -> the class switched off


def generator_arguments(subject: Mapping) -> dict | None:
    """``simulate_subject`` keyword arguments of a simulated datalist entry, or None when it has no
    generator parameters (``<ID>_params.json`` beside its T1w image, with the image's grid one of SIZES)."""
    t1 = Path(str(subject.get("t1", "")))
    params_path = t1.parent / f"{subject.get('subject', '')}_params.json"
    if not params_path.is_file():
        return None
    params = json.loads(params_path.read_text())
    import nibabel as nib

    shape = tuple(int(s) for s in nib.load(str(t1)).shape[:3])
    size = next((name for name, (s, _) in SIZES.items() if tuple(s) == shape), None)
    if size is None or "seed" not in params or "subject_index" not in params:
        return None
    family = params.get("family", "")
    return {"seed": int(params["seed"]), "index": int(params["subject_index"]), "size": size,
            "held_out": family == "held_out_warp", "test_anatomy": family == "test_anatomy"}


def _write_render(entry: Mapping, args: dict, off: set, folder: Path) -> dict:
    """The subject rendered with the lesion classes ``off`` switched off, written to ``folder``; the entry's
    image / clean-render / seg / lesion paths point there, every other key (drawn acquisition) is kept."""
    with lesion_classes_off(off):
        s = simulate_subject(**args)
    folder.mkdir(parents=True, exist_ok=True)
    out = dict(entry)
    volumes = {m: s.images[m] for m in MODALITIES}
    volumes.update({f"{m}_clean": s.clean[m] for m in MODALITIES if getattr(s, "clean", None)})
    volumes.update({"seg": s.seg, LESIONS: s.lesions})
    for key, vol in volumes.items():
        if key in entry:
            dtype = np.uint8 if key == "seg" else (np.int16 if key == LESIONS else np.float32)
            out[key] = str(save_volume(vol, folder / f"{key}.nii.gz", affine=s.affine, dtype=dtype))
    return out


class CounterfactualSubject:
    """One simulated subject prepared with and without each class of single-contrast lesions.

    ``subject``: the datalist entry; ``prepare``: the protocol's ``prepare_subject`` (entry -> data dict with
    ``t1``, ``t2``, ``t1_lr``, ``t2_lr``, ``lesions``). :attr:`available` is False (and :meth:`imprint` gives
    NaN columns) when the entry has no generator parameters.
    """

    def __init__(self, subject: Mapping, prepare: Callable[[dict], dict]):
        self.data: dict[str, dict] = {}
        args = generator_arguments(subject)
        self.available = args is not None
        if not self.available:
            return
        with tempfile.TemporaryDirectory(prefix="nexus_cf_") as tmp:
            for name, off in (("with", set()), ("t2", {_OFF["t2"]}), ("t1", {_OFF["t1"]})):
                self.data[name] = prepare(_write_render(subject, args, off, Path(tmp) / name))

    def imprint(self, method: Callable, options: Mapping | None = None) -> dict:
        """``imprint_cf_<o>`` columns of one method (``method(data, grid, **options) -> {c: (1, X, Y, Z)}``)."""
        nan = {k: math.nan for c in CONTRASTS for k in counterfactual_columns(c)}
        if not self.available:
            return nan
        with_data = self.data["with"]
        grid = TargetGrid.like(with_data["t1"])
        gt = {c: with_data[c][0].as_subclass(torch.Tensor).numpy() for c in CONTRASTS}
        mask = gt["t1"] > 0
        scales = {c: intensity_scale(gt[c], mask, SCALE_PERCENTILE) for c in CONTRASTS}

        def run(data):
            pred = method(data, grid, **dict(options or {}))
            return {c: pred[c].as_subclass(torch.Tensor).reshape(grid.shape).numpy() / scales[c] for c in CONTRASTS}

        out_with = run(with_data)
        lesions = with_data[LESIONS][0].as_subclass(torch.Tensor).numpy()
        row = {}
        for c in CONTRASTS:
            out_without = run(self.data[c])
            row.update(counterfactual_imprint_row({k: v / scales[k] for k, v in gt.items()}, out_with, out_without,
                                                  lesions, mask, c))
        return row


class CounterfactualImprint:
    """Evaluator handler (:class:`~nexus_monai.evaluation.evaluator.MethodEvaluator`): after the scores of each
    subject, the counterfactual imprint columns of every scored method are added to its row (NaN for subjects
    without generator parameters). Attach it after :class:`~nexus_monai.evaluation.handlers.SubjectScores`
    and before the table writer."""

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        out = engine.state.output
        if out.data is None or not out.ok:
            return
        subject = CounterfactualSubject(out.subject, lambda entry: engine.protocol.prepare_subject(entry))
        rows = {r["method"]: r for r in engine.state.rows
                if r.get("subject") == out.subject["subject"] and not r.get("error")}
        for m in out.ok:
            if m in rows:
                rows[m].update(subject.imprint(engine.methods[m], engine.method_options.get(m, {})))
