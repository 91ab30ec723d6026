"""Table 5 of Zhang et al. ("Nexus-INR: Diverse Knowledge-guided Arbitrary-Scale Multimodal Medical
Image Super-Resolution", 2025, §4.6): tumour segmentation on super-resolved inputs
(``nexus-sr experiment table5``).

Protocol (ours; the paper does not say how its segmenters were trained): ONE segmenter per
architecture (``bundles/seg_unet``, ``bundles/seg_transunet``, trained on original HR T1w + T2w,
e.g. with ``configs/table5.yaml``) is frozen and applied unchanged to every input of a subject:
the original HR scans, the LR scans (nearest neighbour onto the HR grid) and each method's output
on the HR grid. Only the input changes between rows, so a row's Dice / HD95 measures how much of
the tumour's appearance the method restored, the usual task-based evaluation of super-resolution.
Every input is zeroed outside the brain (ground-truth T1w > 0) first, as BraTS inputs are
skull-stripped (:func:`~nexus_monai.evaluation.downstream.segmentation_rows`).

Rows: :data:`ROWS`. A row whose method cannot run (untrained bundle, no checkpoint given, not
requested with ``methods``) is reported as ``not run: <why>``, never dropped. Layout of ``out``::

    outputs/<split>/<subject>/<row>_{t1,t2}.nii.gz, <row>.json   method outputs (json written last)
    rows/<split>/<subject>/<row>__<segmenter>.json                one scored (row, segmenter)
    table5.csv          every scored split x subject x row x segmenter
    table5_summary.csv  mean ± std and the paired difference to trilinear (95 % t-interval) per row
    table5.md           the table, the protocol, the budget

Each output / row file carries a key (method, options, checkpoint and segmenter weights hashes,
protocol, ``NEXUS_*_OPTIONS``): re-running the same command skips every finished row whose key is
unchanged (a retrained segmenter re-scores the cached outputs; a new checkpoint recomputes its
method). Failed rows are reported with their error and retried on the next run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.data.brats import resolve_datalist
from nexus_monai.data.io import load_volume, save_volume, write_text_atomic
from nexus_monai.engines.bundle_model import bundle_folder
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.downstream import FrozenSegmenter, SEG_METRICS, paired_differences, segmentation_rows
from nexus_monai.evaluation.methods import METHODS, check_methods, get_method
from nexus_monai.evaluation.table1 import check_subject_files, select_subjects
from nexus_monai.geometry import TargetGrid, as_affine
from nexus_monai.keys import CONTRASTS
from nexus_monai.metrics.segmentation import EMPTY_POLICY
from nexus_monai.paths import REPO_BUNDLES
from nexus_monai.transforms.protocols import load_protocol, prepare_subject

__all__ = ["ROWS", "SEGMENTERS", "REFERENCE", "resolve_rows", "run_table5", "write_table5"]

LR, HR = "Original LR", "Original HR"
REFERENCE = "trilinear"
# Every method of Table 1, the back-projection floor, Nexus-INR in both forms (default: shipped weights).
METHOD_ROWS = ("trilinear", "cubic", "ibp", "lrtv", "smore", "saint", "i3net", "arssr", "ssmcsr_split_head",
               "ssmcsr_vanilla", "ssmcsr_single", "cycleinr", "nexus_inr", "nexus_inr_guarded", "nexus_inr_paper_cpu")
ROWS = (LR, *METHOD_ROWS, HR)
SEGMENTERS = ("seg_unet", "seg_transunet")
_ALIAS = {"nexus_inr_paper_cpu": "nexus_inr"}  # row -> registered method
_PAPER_CPU = REPO_BUNDLES / "nexus_inr" / "configs" / "paper_cpu.yaml"
# The paper's Table 5 (BraTS2020; Dice %, HD95 mm): U-Net Dice, HD95, TransUNet Dice, HD95.
PAPER = {LR: (78.80, 8.65, 79.40, 8.33), "trilinear": (82.65, 7.24, 83.11, 7.05), "smore": (85.72, 6.58, 86.09, 6.31),
         "arssr": (87.02, 5.90, 87.41, 5.64), "ssmcsr_split_head": (87.18, 5.84, 87.52, 5.61),
         "cycleinr": (87.24, 5.79, 87.63, 5.55), "nexus_inr": (88.92, 5.03, 88.97, 4.82),
         HR: (90.12, 4.32, 91.05, 3.97)}


def _sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _weights_option(row: str, path: str) -> dict:
    """``--weights ROW=PATH`` -> method options. PATH: a checkpoint, or a ``nexus-sr experiment`` run folder
    (its ``evaluate.json`` names the checkpoint and the overlays it was trained with)."""
    p = Path(path)
    if p.is_dir():
        spec = p / "evaluate.json"
        if spec.is_file():
            options = json.loads(spec.read_text()).get("options", {}).get(_ALIAS.get(row, row))
            if options:
                return dict(options)
        if (p / "models" / "model.pt").is_file():
            p = p / "models" / "model.pt"
        else:
            raise NexusInputError(path, f"--weights {row}: folder holds neither evaluate.json nor models/model.pt")
    if not p.is_file():
        raise NexusInputError(path, f"--weights {row}: checkpoint not found")
    options = {"weights": str(p.resolve())}
    if row == "nexus_inr_paper_cpu":
        options["overlays"] = [str(_PAPER_CPU)]
    return options


def resolve_rows(weights: Mapping[str, str] | None = None) -> dict:
    """``{row: (method, options)}`` for method rows that can run, ``{row: "not run: <why>"}`` for the others.

    ``weights``: ``{row: checkpoint or nexus-sr experiment run folder}`` (cohort rows; required for
    ``nexus_inr_paper_cpu``). Cohort checkpoints are loaded and checked here (:func:`check_methods`).
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(METHOD_ROWS))
    if unknown:
        raise NexusInputError(None, f"--weights for unknown Table 5 row(s) {', '.join(unknown)}; rows: "
                                    f"{', '.join(METHOD_ROWS)}")
    out: dict = {}
    for row in METHOD_ROWS:
        method = _ALIAS.get(row, row)
        if method not in METHODS:
            out[row] = f"not run: method {method!r} is not registered in this version"
        elif row == "nexus_inr_paper_cpu" and row not in weights:
            out[row] = ("not run: no paper_cpu model given (train one with `nexus-sr experiment table2 --form "
                        "paper_cpu`, then --weights nexus_inr_paper_cpu=<its runs/paper_cpu_... folder>)")
        else:
            options = _weights_option(row, weights[row]) if row in weights else {}
            try:
                check_methods([method], {method: options} if options else None)
            except NexusInputError as err:
                out[row] = f"not run: {err}"
                continue
            out[row] = (method, options)
    return out


def _wanted(methods: Sequence[str] | None) -> set[str]:
    wanted = set(METHOD_ROWS) if methods is None else {m.strip() for m in methods if m.strip()}
    bad = sorted(wanted - set(METHOD_ROWS))
    if bad:
        raise NexusInputError(None, f"unknown Table 5 method(s) {', '.join(bad)}; rows: {', '.join(METHOD_ROWS)}")
    return wanted | {REFERENCE}


def _checkpoint(method: str, options: Mapping) -> Path | None:
    bundle = getattr(METHODS[method], "bundle", None)
    if bundle is None:
        return None
    return Path(options["weights"]) if options.get("weights") else bundle_folder(options.get("bundle", bundle)) / \
        "models" / "model.pt"


def _method_key(method: str, options: Mapping, protocol: str) -> str:
    ckpt = _checkpoint(method, options)
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NEXUS_") and k.endswith("_OPTIONS")}
    blob = {"method": method, "options": dict(options), "protocol": protocol, "env": env,
            "checkpoint": _sha(ckpt) if ckpt is not None and ckpt.is_file() else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _on_grid(pred: Mapping, grid: TargetGrid, row: str) -> dict:
    for c in CONTRASTS:
        if tuple(pred[c].shape[-3:]) != grid.shape or not torch.allclose(as_affine(pred[c]), grid.affine, atol=1e-4):
            raise RuntimeError(f"{row} returned {c} on a grid other than the requested one")
    return {c: pred[c] for c in CONTRASTS}


def _output(row: str, spec, data: dict, grid: TargetGrid, folder: Path, key: str) -> tuple[dict, float]:
    """The row's ``{t1, t2}`` on ``grid``: the inputs themselves, the cached output, or the method run now."""
    if row == HR:
        return {c: data[c] for c in CONTRASTS}, 0.0
    if row == LR:
        return {c: upsample(data[f"{c}_lr"], grid, "nearest") for c in CONTRASTS}, 0.0
    meta = _read_json(folder / f"{_safe(row)}.json")
    if meta and meta.get("key") == key:
        return {c: load_volume(folder / f"{_safe(row)}_{c}.nii.gz") for c in CONTRASTS}, float(meta["seconds"])
    method, options = spec
    t0 = time.perf_counter()
    pred = _on_grid(get_method(method)(data, grid, **options), grid, row)
    seconds = time.perf_counter() - t0
    for c in CONTRASTS:
        save_volume(pred[c], folder / f"{_safe(row)}_{c}.nii.gz")
    write_text_atomic(folder / f"{_safe(row)}.json", json.dumps({"key": key, "seconds": seconds}) + "\n")
    return pred, seconds


def run_table5(out: str | os.PathLike, data: str = "embedded", methods: Sequence[str] | None = None,
               weights: Mapping[str, str] | None = None, segmenters: Sequence[str] = SEGMENTERS,
               splits: Sequence[str] = ("test", "test_anatomy"), protocol: str = "nexus",
               max_subjects: int | None = None,
               segmenter_overrides: Mapping[str, Mapping] | None = None, command: str = "",
               progress: bool = True, mlflow: bool = True) -> dict[str, Path]:
    """Score the rows of :data:`ROWS` with every trained segmenter on ``splits``; resumable; returns the files.

    ``methods``: the method rows computed in this run (default all; trilinear, the reference, always);
    rows finished by earlier runs of the same ``out`` stay in the table. ``weights``: see
    :func:`resolve_rows`. ``segmenter_overrides``: per segmenter, inference-config overrides (tiny
    test networks). Checked before any work (one-line :class:`NexusInputError`): names, checkpoints,
    segmenters (at least one trained), subject files. The tables are rewritten after every subject;
    with ``mlflow`` the finished table is logged to the project's store (experiment ``nexus_table5``).
    """
    wanted = _wanted(methods)
    specs = resolve_rows(weights)
    loaded, seg_status = {}, {}
    for name in segmenters:
        try:
            overrides = (segmenter_overrides or {}).get(Path(name).name)
            segmenter = FrozenSegmenter(name, overrides=overrides)
            loaded[segmenter.name] = segmenter
        except NexusInputError as err:
            seg_status[name] = f"not run: {err}"
    if not loaded:
        raise NexusInputError(None, "Table 5 needs a trained segmenter; " + "; ".join(seg_status.values()))
    if str(data) != "embedded" and not Path(data).exists():
        raise NexusInputError(data, "dataset not found")
    datalist = resolve_datalist(data, seed=0)
    proto = load_protocol(protocol)
    present = json.loads(Path(datalist).read_text())
    use = [s for s in splits if present.get(s)]
    if not use:
        raise NexusInputError(datalist, f"none of the splits {', '.join(splits)} has subjects")
    subjects = {s: select_subjects(datalist, s, max_subjects=max_subjects) for s in use}
    for split_subjects in subjects.values():
        check_subject_files(split_subjects, ("t1", "t2", "seg"))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    available = [r for r in METHOD_ROWS if not isinstance(specs[r], str)]
    rows_run = [LR] + [r for r in available if r in wanted] + [HR]
    method_keys = {LR: "input", HR: "input", **{r: _method_key(*specs[r], proto.name) for r in available}}
    context = {"command": command, "data": str(datalist), "protocol": proto.name, "splits": use,
               "n_subjects": {s: len(v) for s, v in subjects.items()},
               "segmenters": {n: {"weights": str(s.weights), "key": _sha(s.weights)} for n, s in loaded.items()},
               "segmenter_status": seg_status, "method_keys": method_keys,
               "rows": {r: (s if isinstance(s, str) else {"method": s[0], **s[1]}) for r, s in specs.items()},
               "requested": sorted(wanted)}
    seg_keys = {n: s["key"] for n, s in context["segmenters"].items()}
    total, index = sum(len(v) for v in subjects.values()), 0
    for split, split_subjects in subjects.items():
        for subject in split_subjects:
            index += 1
            sid = subject["subject"]
            folder_rows, folder_out = root / "rows" / split / _safe(sid), root / "outputs" / split / _safe(sid)
            todo: dict[str, list[str]] = {}
            for row in rows_run:
                for seg_name in loaded:
                    prev = _read_json(folder_rows / f"{_safe(row)}__{seg_name}.json")
                    if not (prev and not prev.get("error") and prev.get("segmenter_key") == seg_keys[seg_name]
                            and prev.get("method_key") == method_keys[row]):
                        todo.setdefault(row, []).append(seg_name)
            if not todo:
                if progress:
                    print(f"[{index}/{total}] {split} {sid}: done earlier, skipped", flush=True)
                continue
            t0 = time.time()
            sample = prepare_subject(subject, proto)
            grid = TargetGrid.like(sample["t1"])
            brain = (sample["t1"].as_subclass(torch.Tensor) > 0).float()
            for row, seg_names in todo.items():
                base = {"split": split, "subject": sid, "input": row, "method_key": method_keys[row]}
                try:
                    pair, seconds = _output(row, specs.get(row), sample, grid, folder_out, method_keys[row])
                except Exception as err:  # noqa: BLE001 - reported in the table, retried on the next run
                    problem = f"{type(err).__name__}: {' '.join(str(err).split())}"
                    for seg_name in seg_names:
                        write_text_atomic(folder_rows / f"{_safe(row)}__{seg_name}.json",
                                          json.dumps({**base, "segmenter": seg_name, "error": problem}) + "\n")
                    continue
                for seg_name in seg_names:
                    line = segmentation_rows(sid, {row: pair}, sample["seg"], {seg_name: loaded[seg_name]},
                                             brain_mask=brain)[0]
                    line.update(base, segmenter_key=seg_keys[seg_name], method_seconds=seconds, error="")
                    write_text_atomic(folder_rows / f"{_safe(row)}__{seg_name}.json", json.dumps(line) + "\n")
            write_table5(root, context, specs)
            if progress:
                print(f"[{index}/{total}] {split} {sid}: {len(todo)} rows in {time.time() - t0:.0f} s", flush=True)
    written = write_table5(root, context, specs)
    if mlflow:
        try:
            _log_mlflow(root, context)
        except Exception as err:  # noqa: BLE001 - the tables are on disk; MLflow is a view of them
            print(f"warning: MLflow logging of Table 5 failed ({type(err).__name__}: {err})", flush=True)
    return written


def _log_mlflow(root: Path, context: Mapping) -> str:
    """One MLflow run ``table5`` (reused by later runs of the same store): every summary number as
    ``<split>/<segmenter>/<input>/<column>``, the table files as artifacts. Returns the run id."""
    from mlflow.tracking import MlflowClient  # lazy: heavy optional dependency

    from nexus_monai.engines.mlflow_logging import ensure_experiment, tracking_uri

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name(ensure_experiment("nexus_table5", uri)).experiment_id
    found = client.search_runs([exp_id], "tags.mlflow.runName = 'table5'", order_by=["attributes.start_time DESC"])
    run_id = found[0].info.run_id if found else client.create_run(exp_id, run_name="table5").info.run_id
    summary = pd.read_csv(root / "table5_summary.csv")
    for _, r in summary.iterrows():
        for col, v in r.items():
            if col not in ("split", "segmenter", "input") and isinstance(v, (int, float)) and np.isfinite(v):
                client.log_metric(run_id, f"{r['split']}/{r['segmenter']}/{r['input']}/{col}", float(v))
    for name in ("table5.md", "table5.csv", "table5_summary.csv", "table5_run.json"):
        client.log_artifact(run_id, str(root / name))
    client.set_tag(run_id, "command", str(context["command"])[:4000])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _collect(root: Path, context: Mapping) -> pd.DataFrame:
    """The row files of this configuration: a segmenter of this run with its current weights, a method with its
    current key (checkpoint, options, protocol); files of other configurations stay on disk, unused."""
    seg_keys = {n: s["key"] for n, s in context["segmenters"].items()}
    lines = []
    for path in sorted((root / "rows").glob("*/*/*.json")):
        line = _read_json(path) or {}
        if (line.get("split") in context["splits"] and line.get("segmenter") in seg_keys
                and line.get("method_key") == context["method_keys"].get(line.get("input"))
                and (line.get("error") or line.get("segmenter_key") == seg_keys[line["segmenter"]])):
            lines.append(line)
    frame = pd.DataFrame(lines)
    if len(frame):
        frame["error"] = frame["error"].fillna("")
    return frame


def _ci(mean: float, lo: float, hi: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" if np.isfinite(lo) else f"{mean:+.{digits}f}"


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (split, segmenter, input): n, mean and population std over subjects of :data:`SEG_METRICS`, and the
    paired difference to trilinear with its 95 % t-interval (``<metric>_diff``, ``_lo``, ``_hi``; ``n`` pairs)."""
    ok = frame[frame["error"] == ""] if len(frame) else frame
    if not len(ok):
        return pd.DataFrame(columns=["split", "segmenter", "input"])
    g = ok.groupby(["split", "segmenter", "input"], sort=False)[list(SEG_METRICS)]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_std")).join(g.size().rename("subjects"))
    out = out.reset_index()
    diffs = paired_differences(ok, REFERENCE, SEG_METRICS)
    return out.merge(diffs, on=["split", "segmenter", "input"], how="left") if len(diffs) else out


def _status(row: str, spec, context: Mapping, ok: int, failed: pd.DataFrame, n: int) -> str:
    if not ok and not len(failed):
        if isinstance(spec, str):
            return spec
        if row not in context["requested"] and row not in (LR, HR):
            return "not run: not requested in this run (--methods); the same command with it fills it in"
        return "not run yet"
    status = [f"{ok} of {n} subjects"] if ok < n else []
    if len(failed):
        status.append(f"failed on {len(failed)}: {str(failed['error'].iloc[0])[:160]}")
    return "; ".join(status)


def write_table5(root: Path, context: Mapping, specs: Mapping) -> dict[str, Path]:
    """``table5.csv`` (per subject), ``table5_summary.csv`` and ``table5.md`` from the row files under ``root``."""
    frame = _collect(root, context)
    csv = write_text_atomic(root / "table5.csv", frame.to_csv(index=False))
    summary = _summary(frame)
    write_text_atomic(root / "table5_summary.csv", summary.to_csv(index=False))
    n_subjects = context["n_subjects"]
    lines = ["# Table 5: tumour segmentation on super-resolved inputs", "",
             f"Command: `{context['command']}`; written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
             f"Data: `{context['data']}`; protocol `{context['protocol']}`; splits "
             + ", ".join(f"`{s}` ({n} subjects)" for s, n in n_subjects.items()) + "."]
    lines += [f"Segmenter `{name}`: {status}" for name, status in context["segmenter_status"].items()]
    heads = ["Dice WT", "Dice TC", "Dice ET", "Dice mean", "HD95 WT", "HD95 TC", "HD95 ET", "HD95 mean"]
    digits = {m: 3 if m.startswith("dice") else 2 for m in SEG_METRICS}
    for split in context["splits"]:
        for seg_name in context["segmenters"]:
            col = 2 if "transunet" in seg_name else 0  # the paper's U-Net / TransUNet columns
            part = frame[(frame["split"] == split) & (frame["segmenter"] == seg_name)] if len(frame) else frame
            lines += ["", f"## `{split}`, segmenter `{seg_name}` (Dice 0-1 ↑, HD95 mm ↓; mean ± std over "
                      "subjects)",
                      "", "| Input | n | " + " | ".join(heads) + " | paper Dice % / HD95 | status |",
                      "|" + "---|" * (len(heads) + 4)]
            diff_lines = ["", f"Paired difference to trilinear (`{split}`, `{seg_name}`; mean [95 % t-interval] over "
                          "subjects; Dice > 0 and HD95 < 0 are better than trilinear):", "",
                          "| Input | n pairs | " + " | ".join(f"Δ {h}" for h in heads) + " |",
                          "|" + "---|" * (len(heads) + 2)]
            for row in ROWS:
                got = part[part["input"] == row] if len(part) else part
                failed = got[got["error"] != ""] if len(got) else got
                hit = summary[(summary["split"] == split) & (summary["segmenter"] == seg_name)
                              & (summary["input"] == row)] if len(summary) else summary
                s = hit.iloc[0] if len(hit) else None
                ok = int(s["subjects"]) if s is not None else 0
                paper = PAPER.get(row)
                cells = [f"{s[f'{m}_mean']:.{digits[m]}f} ± {s[f'{m}_std']:.{digits[m]}f}" if s is not None else "–"
                         for m in SEG_METRICS]
                lines.append(f"| {row} | {ok} | " + " | ".join(cells) + " | "
                             + ("" if paper is None else f"{paper[col]:.2f} / {paper[col + 1]:.2f}") + " | "
                             + _status(row, specs.get(row), context, ok, failed, n_subjects[split]) + " |")
                if row != REFERENCE and s is not None and "n" in s and np.isfinite(s["n"]) and s["n"] > 0:
                    diff_lines.append(f"| {row} | {int(s['n'])} | " + " | ".join(
                        _ci(s[f"{m}_diff"], s[f"{m}_lo"], s[f"{m}_hi"], digits[m]) for m in SEG_METRICS) + " |")
            lines += diff_lines
    lines += ["", "## Protocol", "",
              "One segmenter per architecture, trained on ORIGINAL HR T1w + T2w of subjects that are not scored here "
              "(see each bundle's configs/table5.yaml), frozen and applied unchanged to every input of a subject: the "
              "HR scans, the LR scans put on the HR grid by nearest-neighbour interpolation (Original LR) and each "
              "method's output on the HR grid. Only the input changes between rows, so the difference of a row to "
              "trilinear is what the method restored for the task; no segmenter is tuned to any method (which would "
              "mix the segmenter's adaptation into the comparison). Every input is zeroed outside the subject's brain "
              "mask (ground-truth T1w > 0) first, as BraTS inputs are skull-stripped.",
              "", "Statistics: mean ± population std over subjects; the paired difference pairs the row and trilinear "
              "on the same subject, 95 % Student t interval mean ± t(0.975, n − 1) · sd / √n. Dice and HD95 per "
              "BraTS "
              "region (WT = 1|2|4, TC = 1|4, ET = 4) with MONAI's DiceMetric and HausdorffDistanceMetric "
              "(95th percentile, voxel spacing passed, mm); 'mean' = the mean over the three regions.",
              "", EMPTY_POLICY,
              "", "Paper: Zhang et al. 2025, Table 5 (BraTS2020, real tumours, Dice in %, 1 mm data); ours: simulated "
              "2 mm subjects, Dice as a fraction: compare orderings, not absolute values.",
              "", "Method options of the rows that run: " + "; ".join(
                  f"`{r}`: `{json.dumps(s)}`" for r, s in context["rows"].items() if not isinstance(s, str)) + "."]
    md = write_text_atomic(root / "table5.md", "\n".join(lines) + "\n")
    write_text_atomic(root / "table5_run.json", json.dumps(context, indent=1, default=str) + "\n")
    return {"csv": Path(csv), "md": Path(md)}


def parse_weights(pairs: Sequence[str]) -> dict[str, str]:
    """``["ROW=PATH", ...]`` -> ``{row: path}`` (one-line error for a malformed pair)."""
    out = {}
    for pair in pairs or ():
        row, sep, path = str(pair).partition("=")
        if not sep or not row.strip() or not path.strip():
            raise NexusInputError(None, f"--weights takes ROW=PATH, got {pair!r}")
        out[row.strip()] = path.strip()
    return out
