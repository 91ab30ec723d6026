"""Downstream value of super-resolution (Zhang et al. 2025, §4.6, Table 5): frozen tumour segmenters on
every method's outputs, Dice and HD95 (mm) per BraTS region against the ground-truth labels.

A segmenter is a trained bundle (``bundles/seg_unet``, ``bundles/seg_transunet``): its
``configs/inference.yaml`` gives ``network``, ``prepare`` (the array part of its preprocessing)
and ``inferer``, its weights are ``models/model.pt``. Inputs on a grid other than the ground
truth's are resampled onto it (trilinear) with a warning, so every row is scored on the labels'
grid; the row is marked ``resampled``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, as_affine
from nexus_monai.metrics.segmentation import EMPTY_POLICY, REGIONS, brats_regions, dice_hd95
from nexus_monai.paths import REPO_BUNDLES

__all__ = ["FrozenSegmenter", "load_segmenters", "segmentation_rows", "table5_markdown", "summarise_table5",
           "t_interval", "paired_differences", "SEG_METRICS"]

SEG_METRICS = tuple(f"dice_{r}" for r in ("WT", "TC", "ET")) + ("dice_mean",) + tuple(
    f"hd95_{r}" for r in ("WT", "TC", "ET")) + ("hd95_mean",)
"""Per-subject columns of :func:`segmentation_rows` that Table 5 summarises (Dice 0-1, HD95 mm)."""

logger = logging.getLogger(__name__)


class FrozenSegmenter:
    """A trained segmentation bundle in eval mode: ``(t1, t2) -> regions (3, X, Y, Z) bool``."""

    def __init__(self, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 overrides: Mapping | None = None):
        bundle = Path(bundle_dir)
        if not bundle.is_dir() and (REPO_BUNDLES / str(bundle_dir)).is_dir():
            bundle = REPO_BUNDLES / str(bundle_dir)
        config = bundle / "configs" / "inference.yaml"
        weights = bundle / "models" / "model.pt"
        if not config.exists():
            raise NexusInputError(bundle, "not a segmentation bundle (no configs/inference.yaml)")
        if not weights.exists():
            raise NexusInputError(weights,
                                  f"no trained weights; train first: python -m monai.bundle run training --config_file "
                                  f"{bundle}/configs/train.yaml")
        self.name, self.weights = bundle.name, weights
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{device}')"
        for key, value in (overrides or {}).items():  # e.g. the network/roi overrides used in training
            parser[key] = value
        self.network = parser.get_parsed_content("network")
        state = torch.load(weights, map_location=device, weights_only=True)
        try:
            self.network.load_state_dict(
                state.get("model", state) if isinstance(state, dict) and "model" in state else state
            )
        except RuntimeError as err:  # another architecture / width than configs/inference.yaml (+ overrides)
            raise NexusInputError(weights, f"checkpoint does not match the bundle's network "
                                           f"({str(err).splitlines()[0][:160]})") from None
        self.network.eval()
        self.prepare = Compose(parser.get_parsed_content("prepare"))
        self.inferer = parser.get_parsed_content("inferer")
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, t1: MetaTensor, t2: MetaTensor) -> torch.Tensor:
        image = self.prepare({"t1": t1, "t2": t2})["image"]
        logits = self.inferer(image[None].to(self.device), self.network)
        return (torch.sigmoid(logits[0].as_subclass(torch.Tensor)) > 0.5).cpu()


def load_segmenters(names: Sequence[str]) -> dict[str, FrozenSegmenter]:
    """Segmenters by bundle name (``seg_unet``) or bundle folder path."""
    loaded = [FrozenSegmenter(n) for n in names]
    return {s.name: s for s in loaded}


def _on_grid(image: MetaTensor, grid: TargetGrid, what: str) -> tuple[MetaTensor, bool]:
    if tuple(image.shape[1:]) == grid.shape and torch.allclose(as_affine(image), grid.affine, atol=1e-4):
        return image, False
    logger.warning("%s is on grid %s, not the labels' grid %s: resampled (trilinear) before segmentation", what,
                   tuple(image.shape[1:]), grid.shape)
    return upsample(image, grid, "trilinear"), True


def segmentation_rows(
    subject: str,
    inputs: Mapping[str, Mapping[str, MetaTensor]],
    seg: MetaTensor,
    segmenters: Mapping[str, FrozenSegmenter],
    brain_mask: torch.Tensor | None = None,
) -> list[dict]:
    """Dice/HD95 rows of one subject: every input pair (``{name: {"t1", "t2"}}``) x segmenter.

    With ``brain_mask`` (``(1, X, Y, Z)`` on the labels' grid) every input is zeroed outside the
    brain first, as BraTS inputs are skull-stripped: interpolation leaves small non-zero values
    (and B-spline ringing) in the background, which would otherwise enter the segmenter's
    non-zero-voxel intensity normalisation and change its input statistics for reasons that have
    nothing to do with the anatomy inside the brain.
    """
    grid = TargetGrid.like(seg)
    gt = torch.as_tensor(brats_regions(seg)).bool()
    rows = []
    for input_name, pair in inputs.items():
        t1, r1 = _on_grid(pair["t1"], grid, f"{subject} {input_name} T1w")
        t2, r2 = _on_grid(pair["t2"], grid, f"{subject} {input_name} T2w")
        if brain_mask is not None:
            t1, t2 = t1 * brain_mask, t2 * brain_mask
        for seg_name, segmenter in segmenters.items():
            pred = segmenter(t1, t2)
            row = {"subject": subject, "input": input_name, "segmenter": seg_name, "resampled": bool(r1 or r2)}
            row.update(dice_hd95(pred, gt, grid.spacing.tolist()))
            rows.append(row)
    return rows


def summarise_table5(rows: pd.DataFrame, inputs: Sequence[str]) -> pd.DataFrame:
    """Mean ± std over subjects per (input, segmenter) of the mean and per-region Dice/HD95."""
    keys = ["dice_mean", "hd95_mean"] + [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]
    out = []
    for name in inputs:
        for seg_name in rows["segmenter"].unique():
            part = rows[(rows["input"] == name) & (rows["segmenter"] == seg_name)]
            if not len(part):
                continue
            row = {"input": name, "segmenter": seg_name, "n": len(part), "empty_cases": int(part["empty_cases"].sum())}
            for k in keys:
                row[f"{k}_mean"], row[f"{k}_std"] = float(part[k].mean()), float(part[k].std(ddof=0))
            out.append(row)
    return pd.DataFrame(out)


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of ``values`` (NaN dropped) with the two-sided Student t interval
    ``mean ± t((1 + confidence) / 2, n - 1) * sd / sqrt(n)`` (sample sd); ``n < 2``: NaN bounds."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan"), float("nan"), 1
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half, n


def paired_differences(rows: pd.DataFrame, reference: str, metrics: Sequence[str] = SEG_METRICS,
                       group: Sequence[str] = ("split", "segmenter")) -> pd.DataFrame:
    """Paired differences ``input - reference`` per subject, summarised with :func:`t_interval`.

    ``rows``: one line per ``(*group, subject, input)`` with the ``metrics`` columns (e.g. Dice
    0-1, HD95 mm). Pairs are the subjects scored on both inputs within the same ``group`` values;
    returns one line per ``(*group, input)`` (reference excluded) with ``n`` and, per metric,
    ``<metric>_diff``, ``<metric>_lo``, ``<metric>_hi`` (95 % interval).
    """
    group = [g for g in group if g in rows.columns]
    out = []
    for keys, part in (rows.groupby(group, sort=False) if group else [((), rows)]):
        keys = keys if isinstance(keys, tuple) else (keys,)
        ref = part[part["input"] == reference].set_index("subject")
        for name in dict.fromkeys(part["input"]):
            if name == reference:
                continue
            other = part[part["input"] == name].set_index("subject")
            common = other.index.intersection(ref.index)
            line = dict(zip(group, keys), input=name, n=len(common))
            for m in metrics:
                d = other.loc[common, m].astype(float) - ref.loc[common, m].astype(float)
                line[f"{m}_diff"], line[f"{m}_lo"], line[f"{m}_hi"], _ = t_interval(d.to_numpy())
            out.append(line)
    return pd.DataFrame(out)


def table5_markdown(table: pd.DataFrame, n_subjects: int) -> str:
    """Table 5: rows = inputs, columns = Dice ↑ / HD95 ↓ (mm) per segmenter (mean over TC/WT/ET)."""
    segs = list(dict.fromkeys(table["segmenter"]))
    head = ["Input"] + [f"{s} {m}" for s in segs for m in ("Dice ↑", "HD95 (mm) ↓")] + ["empty cases"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(table["input"]):
        cells, empty = [str(name)], 0
        for s in segs:
            r = table[(table["input"] == name) & (table["segmenter"] == s)]
            if not len(r):
                cells += ["n/a", "n/a"]
                continue
            r = r.iloc[0]
            empty += int(r["empty_cases"])
            cells += [f"{r['dice_mean_mean']:.4f} ± {r['dice_mean_std']:.4f}",
                      f"{r['hd95_mean_mean']:.2f} ± {r['hd95_mean_std']:.2f}"]
        lines.append("| " + " | ".join(cells + [str(empty)]) + " |")
    notes = [
        f"{n_subjects} subjects; Dice and HD95 are the mean over the BraTS regions {', '.join(REGIONS)} (per region in "
        f"table5.csv); mean ± std over subjects.",
        "Original LR: each LR scan put on the HR grid by nearest-neighbour interpolation; Original HR: the "
        "ground-truth scans. "
        "Every input is zeroed outside the subject's brain mask (ground-truth T1w > 0) before segmentation, as BraTS "
        "inputs are skull-stripped.",
        EMPTY_POLICY,
    ]
    return (
        "# Table 5 (tumour segmentation on super-resolved inputs)\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n\n".join(notes)
        + "\n"
    )

