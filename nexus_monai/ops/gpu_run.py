"""Train a list of Nexus-INR configurations side by side under one wall-clock budget, score them, pack the results.

Made for a GPU server without internet (``scripts/gpu_run.sh`` installs the wheelhouse first), runnable
on any machine (the tests run it on the CPU with tiny networks)::

    python -m nexus_monai.ops.gpu_run run --plan scripts/gpu_plan.yaml --data DATASET.json --work WORK --out OUT
    python -m nexus_monai.ops.gpu_run pack --carry .gpu_carry      # here, with internet: what travels

``run``:

1. every run of the plan (a row, a seed, overlay files over ``bundles/nexus_inr/configs/train.yaml``
   and overrides) is one ``python -m monai.bundle run training`` process, all started at once; a
   :class:`~nexus_monai.engines.budget.WallClockBudget` handler merged into ``train#handlers`` ends
   each cleanly inside the budget, and ``model.pt`` is the best validation checkpoint (model
   selection by the validation split only);
2. each trained model is scored on ``validation``, ``test`` and ``test_anatomy`` (those the datalist
   has) with ``trilinear`` and back-projection ``ibp`` beside it, by the code of ``nexus-sr
   evaluate`` / ``nexus-sr experiment`` (:func:`nexus_monai.experiments.evaluate_run`), the models on
   ``--device`` (``NEXUS_EVAL_DEVICE``);
3. ``OUT`` receives at most ``--max-files`` files (default 8) of at most ``--max-file-mib`` MiB (15):
   ``results.tar.gz`` (``tables/summary.{csv,md}``, ``tables/gpu_runs.csv``, ``table2.{csv,md}`` when
   every run is a Table 2 row, per-run per-subject CSVs, overrides, training records, log tails),
   ``timings.json``, and the best-validation runs' weights as fp16 parts
   (``<run>.fp16.<i>of<n>.pt``, each self-describing; :func:`load_fp16_parts` restores the fp32 state
   dict) as long as files remain. Everything else stays in ``WORK``.

``pack`` assembles ``.gpu_carry/`` (git-ignored): ``wheels/`` (the torch-less minimal run-time
wheelhouse for CPython 3.12 manylinux x86-64, built by ``scripts/wheelhouse.py``) and ``data/`` (the
embedded 2 mm dataset's t1, t2, seg and lesion maps with a datalist of only those keys), and prints
the size breakdown with the code the device copy carries, against a limit (64 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import yaml

from nexus_monai.data.io import write_text_atomic
from nexus_monai.errors import NexusInputError
from nexus_monai.paths import REPO_BUNDLES, REPO_ROOT

__all__ = ["load_plan", "run_plan", "save_fp16_parts", "load_fp16_parts", "pack_carry", "main"]

CONFIGS = REPO_BUNDLES / "nexus_inr" / "configs"
SPLITS = ("validation", "test", "test_anatomy")
SUMMARY_METRICS = ("psnr_t1", "psnr_t2", "psnr_avg", "ssim_avg", "psnr_eroded_avg", "lesion_contrast_t2",
                   "lesion_kept_t2", "imprint_t1", "imprint_t1_gt", "lesion_contrast_t1", "imprint_t2", "imprint_t2_gt",
                   "seconds")
MIB = 1 << 20
PART_FORMAT = "nexus_monai.fp16_parts/1"


# --- the plan ---------------------------------------------------------------------------------------
def load_plan(path: str | os.PathLike, overrides: Mapping | None = None) -> dict:
    """Read and check a plan YAML: ``{form, budget_s, table?, splits?, methods?, baselines?, overrides?,
    runs: [{row, seed, configs, overrides?, methods?}]}``; ``configs`` are files under
    ``bundles/nexus_inr/configs`` merged in order over ``train.yaml``; ``methods`` (default ``[nexus_inr]``)
    score each trained model, ``baselines`` (default ``[trilinear, ibp]``) are scored once per split
    beside the trainings and joined to every run's rows; ``table`` names the ablation table written when
    every row is one of the paper's (default ``table2``); ``baselines_from``: the work folder of a plan run
    at the same time that scores the baselines (not scored again here); ``threads_per_run``: torch CPU
    threads of each process (default: the machine's cores / runs). A bad plan is a one-line :class:`NexusInputError` naming the file."""
    path = Path(path)
    try:
        plan = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise NexusInputError(path, f"cannot read the plan ({type(err).__name__})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list) or not plan["runs"]:
        raise NexusInputError(path, "a plan is a mapping with a non-empty list 'runs'")
    budget = plan.get("budget_s")
    if not isinstance(budget, (int, float)) or not budget > 0:
        raise NexusInputError(path, f"budget_s must be a number of seconds > 0, got {budget!r}")
    plan.setdefault("form", "gpu")
    plan["overrides"] = {**(plan.get("overrides") or {}), **(overrides or {})}
    names = set()
    for i, run in enumerate(plan["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("row"), str) or not isinstance(run.get("seed"), int):
            raise NexusInputError(path, f"runs[{i}] needs a string 'row' and an integer 'seed'")
        run["configs"] = [str(c) for c in run.get("configs") or []]
        for c in run["configs"]:
            if not (CONFIGS / c).is_file():
                raise NexusInputError(path, f"runs[{i}]: config {c!r} not found under {CONFIGS}")
        run["name"] = f"{plan['form']}_{run['row']}_seed{run['seed']}"
        if run["name"] in names:
            raise NexusInputError(path, f"runs[{i}]: {run['name']} is planned twice")
        names.add(run["name"])
    return plan


# --- fp16 weights in parts ----------------------------------------------------------------------------
def _state_dict(ckpt: str | os.PathLike) -> dict:
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    for key in ("model", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def save_fp16_parts(ckpt: str | os.PathLike, out_dir: str | os.PathLike, stem: str,
                    max_bytes: int = 15 * MIB) -> list[Path]:
    """Write a checkpoint's state dict as fp16 (floating tensors; others as they are) into files of at most
    ``max_bytes`` each: ``<stem>.fp16.<i>of<n>.pt``, each a dict ``{"format", "stem", "part", "parts",
    "keys" (every key, in order), "shapes", "dtypes" (the originals), "tensors" {key or key#chunk<j>:
    tensor}}``. A tensor larger than a part is cut along its flattened values into chunks."""
    state = _state_dict(ckpt)
    budget = max(int(max_bytes) - 64 * 1024, 4096)  # room for the pickle's own structure and the key lists
    items: list[tuple[str, torch.Tensor]] = []
    for key, t in state.items():
        t = t.detach().cpu()
        t = t.half() if t.is_floating_point() else t
        n = t.numel() * t.element_size()
        if n <= budget:
            items.append((key, t.contiguous()))
            continue
        flat, per = t.reshape(-1), max(1, budget // t.element_size())
        items += [(f"{key}#chunk{j}", flat[s:s + per].clone()) for j, s in enumerate(range(0, flat.numel(), per))]
    parts: list[dict] = [{}]
    used = 0
    for key, t in items:
        n = t.numel() * t.element_size() + 512
        if parts[-1] and used + n > budget:
            parts.append({})
            used = 0
        parts[-1][key] = t
        used += n
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": PART_FORMAT, "stem": stem, "parts": len(parts), "keys": list(state),
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "dtypes": {k: str(v.dtype) for k, v in state.items()}}
    files = []
    for i, tensors in enumerate(parts, 1):
        path = out_dir / f"{stem}.fp16.{i}of{len(parts)}.pt"
        buf = io.BytesIO()
        torch.save({**meta, "part": i, "tensors": tensors}, buf)
        if buf.tell() > max_bytes:
            raise RuntimeError(f"{path.name}: {buf.tell()} bytes > {max_bytes} (too many small tensors?)")
        write_text_atomic(path, buf.getvalue())
        files.append(path)
    return files


def load_fp16_parts(paths: Sequence[str | os.PathLike]) -> dict:
    """The state dict saved by :func:`save_fp16_parts` from all its part files, in the original dtypes (fp32)."""
    tensors, meta = {}, None
    for p in paths:
        part = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
            raise NexusInputError(p, "not an fp16 weights part of nexus_monai.ops.gpu_run")
        meta = meta or part
        tensors.update(part["tensors"])
    if meta is None or len(paths) != meta["parts"]:
        raise NexusInputError(paths[0] if paths else None, f"expected {meta and meta['parts']} parts, got {len(paths)}")
    state = {}
    for key in meta["keys"]:
        dtype = getattr(torch, meta["dtypes"][key].replace("torch.", ""))
        if key in tensors:
            t = tensors[key]
        else:
            chunks = sorted((k for k in tensors if k.startswith(f"{key}#chunk")),
                            key=lambda k: int(k.rsplit("#chunk", 1)[1]))
            t = torch.cat([tensors[k] for k in chunks]).reshape(meta["shapes"][key])
        state[key] = t.to(dtype)
    return state


# --- running ------------------------------------------------------------------------------------------
def _tail(path: Path, limit: int = 200_000) -> bytes:
    if not path.is_file():
        return b""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - limit))
        return fh.read()


def _train_cmd(run: dict, run_dir: Path, datalist: Path) -> list[str]:
    files = [CONFIGS / "train.yaml"] + [CONFIGS / c for c in run["configs"]] + [run_dir / "overrides.yaml",
                                                                              run_dir / "budget.yaml"]
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr([str(f) for f in files]),
            "--dataset_dir", str(datalist), "--ckpt_dir", str(run_dir / "models"), "--output_dir",
            str(run_dir / "eval")]


def _env(threads: int, device: str) -> dict:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), NEXUS_EVAL_DEVICE=device)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + rest)
    return env


def _wait_all(procs: dict, deadline: float) -> dict:
    """Wait for every process; kill those still running at ``deadline`` (perf_counter). Returns exit codes."""
    codes = {}
    while len(codes) < len(procs):
        for name, (proc, log) in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
                log.close()
        if time.perf_counter() > deadline:
            for name, (proc, log) in procs.items():
                if name not in codes:
                    proc.kill()
                    proc.wait()
                    codes[name] = "killed"
                    log.close()
        time.sleep(0.2)
    return codes


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _summary(frame, runs: Sequence[dict], timings: dict) -> tuple[str, str]:
    """``summary.csv`` and ``summary.md``: per run x split x method, mean ± std over subjects."""
    import pandas as pd

    rows = []
    for (name, split, method), g in frame.groupby(["run", "split", "method"], sort=False):
        row = {"run": name, "split": split, "method": method, "subjects": len(g)}
        for m in SUMMARY_METRICS:
            if m in g and pd.api.types.is_numeric_dtype(g[m]) and g[m].notna().any():
                row[m] = float(g[m].mean())
                row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else 0.0
        rows.append(row)
    table = pd.DataFrame(rows)
    md = ["# GPU run: Nexus-INR configurations trained side by side", "",
          f"Budget {timings['budget_s']} s wall clock for all trainings together; device `{timings['device']}` "
          f"({timings.get('device_name', '')}); torch {timings['torch']}. PSNR in dB inside the brain mask "
          "(GT and prediction divided by the GT's 99.5th percentile in the mask), mean ± std over subjects; "
          "ibp = trilinear + the consistency guard of `nexus-sr predict` (no network).", "",
          "## Training", "", "| run | configs | epochs | steps | train s | stopped by budget | exit |",
          "|---|---|---|---|---|---|---|"]
    for run in runs:
        t = timings["runs"][run["name"]]
        md.append(f"| {run['name']} | {' + '.join(['train.yaml'] + run['configs'])} | {t.get('epochs')} | "
                  f"{t.get('steps')} | {t.get('train_seconds')} | {t.get('stopped_by_budget')} | {t.get('exit')} |")
    for split in [s for s in SPLITS if len(table) and s in set(table["split"])]:
        part = table[table["split"] == split]
        cols = [m for m in SUMMARY_METRICS if m in part and part[m].notna().any()]
        md += ["", f"## Split `{split}`", "", "| run | method | n | " + " | ".join(cols) + " |",
               "|" + "---|" * (len(cols) + 3)]
        for _, r in part.iterrows():
            digits = {c: 4 if c.startswith(("ssim", "lesion")) else 2 for c in cols}
            cells = ["n/a" if not math.isfinite(r.get(c, math.nan)) else
                     f"{r[c]:.{digits[c]}f} ± {r[f'{c}_std']:.{digits[c]}f}" for c in cols]
            md.append(f"| {r['run']} | {r['method']} | {r['subjects']} | " + " | ".join(cells) + " |")
    return table.to_csv(index=False), "\n".join(md) + "\n"


def run_plan(plan: dict, datalist: str | os.PathLike, work: str | os.PathLike, out: str | os.PathLike,
             device: str = "auto", lpips: bool = False, max_files: int = 8, max_file_mib: float = 15.0,
             grace_s: float = 300.0) -> dict:
    """Train, evaluate, tabulate and pack (see the module docstring); returns the timings dict."""
    import pandas as pd

    from nexus_monai.experiments import Run, run_results
    from nexus_monai.experiments.tables import ROW_LABELS, write_tables

    t_start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    datalist = Path(datalist).resolve()
    keys = _read_json(datalist)
    if not keys:
        raise NexusInputError(datalist, "not a readable datalist JSON")
    splits = [s for s in plan.get("splits", SPLITS) if keys.get(s)]
    if "validation" not in [s for s in SPLITS if keys.get(s)]:
        raise NexusInputError(datalist, "the datalist has no validation subjects (model selection needs them)")
    work, out = Path(work).resolve(), Path(out).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs, budget = plan["runs"], float(plan["budget_s"])
    threads = int(plan.get("threads_per_run") or max(1, (os.cpu_count() or 1) // len(runs)))
    env = _env(threads, device)
    timings = {"device": device, "torch": torch.__version__, "budget_s": budget, "datalist": str(datalist),
               "splits": splits, "threads_per_run": threads, "form": plan["form"], "runs": {},
               "install_s": float(os.environ.get("NEXUS_INSTALL_SECONDS", "nan"))}
    if device.startswith("cuda") and torch.cuda.is_available():
        timings["device_name"] = torch.cuda.get_device_name(0)
    methods = [str(m) for m in plan.get("methods", ["nexus_inr"])]
    baselines = [str(m) for m in plan.get("baselines", ["trilinear", "ibp"])]
    # 0. the baselines (no network: the same for every run) scored once per split, beside the trainings
    # (``baselines_from``: another plan's work folder computes them; its rows are joined here once written)
    shared = plan.get("baselines_from")
    base_dir = Path(shared).resolve() / "baselines" if shared else work / "baselines"
    base_procs = {}
    for split in splits if baselines and not shared else []:
        spec = {"datalist": str(datalist), "splits": [split], "methods": baselines, "options": {},
                "lpips": bool(lpips), "segmenters": [], "out": str(base_dir)}
        base_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(base_dir / f"evaluate_{split}.json", json.dumps(spec, indent=1) + "\n")
        log = open(base_dir / f"evaluate_{split}.log", "ab")
        cmd = [sys.executable, "-m", "nexus_monai.experiments", "--evaluate-run", str(base_dir / f"evaluate_{split}.json")]
        base_procs[split] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    # 1. every training at once, each ended by its WallClockBudget handler (a hard kill only after grace_s)
    procs = {}
    for run in runs:
        run_dir = work / "runs" / run["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = {**plan["overrides"], **(run.get("overrides") or {}), "seed": run["seed"]}
        if device == "cpu":
            overrides["device"] = "$torch.device('cpu')"
        write_text_atomic(run_dir / "overrides.yaml", yaml.safe_dump(overrides, sort_keys=True))
        handler = {"_target_": "nexus_monai.engines.budget.WallClockBudget", "seconds": budget,
                   "validator": "@validate#evaluator", "ckpt_dir": "@ckpt_dir"}
        write_text_atomic(run_dir / "budget.yaml", yaml.safe_dump({"+train#handlers": [handler]}))
        log = open(run_dir / "train.log", "ab")
        procs[run["name"]] = (subprocess.Popen(_train_cmd(run, run_dir, datalist), cwd=REPO_ROOT, env=env,
                                               stdout=log, stderr=subprocess.STDOUT), log)
    print(f"gpu_run: {len(runs)} trainings started ({threads} threads each, device {device}, budget {budget:.0f} s)",
          flush=True)
    t_train = time.perf_counter()
    codes = _wait_all(procs, t_train + budget + grace_s)
    timings["train_wall_s"] = round(time.perf_counter() - t_train, 2)
    # 2. evaluation of every trained model, side by side (one process per run)
    procs, trained = {}, []
    for run in runs:
        run_dir = work / "runs" / run["name"]
        record, stop = _read_json(run_dir / "models" / "training_run.json"), _read_json(
            run_dir / "models" / "wall_clock_budget.json")
        timings["runs"][run["name"]] = {"exit": codes[run["name"]], "epochs": record.get("epochs"),
                                        "steps": record.get("steps"), "train_seconds": record.get("seconds"),
                                        "stopped_by_budget": stop.get("stopped"),
                                        "final_validation": stop.get("final_validation"),
                                        "validation_seconds": stop.get("validation_seconds")}
        if not (run_dir / "models" / "model.pt").is_file():
            print(f"gpu_run: {run['name']}: no model.pt (exit {codes[run['name']]}; see train.log)", flush=True)
            continue
        trained.append(run)
        run_methods = [str(m) for m in run.get("methods", methods)]
        model = {"bundle": str(CONFIGS.parent), "weights": str(run_dir / "models" / "model.pt"),
                 "overlays": [str(CONFIGS / c) for c in run["configs"]] + [str(run_dir / "overrides.yaml")]}
        spec = {"datalist": str(datalist), "splits": splits, "methods": run_methods,
                "options": {m: model for m in run_methods if m.startswith("nexus_inr")},
                "lpips": bool(lpips), "segmenters": [], "out": str(run_dir)}
        write_text_atomic(run_dir / "evaluate.json", json.dumps(spec, indent=1) + "\n")
        log = open(run_dir / "evaluate.log", "ab")
        cmd = [sys.executable, "-m", "nexus_monai.experiments", "--evaluate-run", str(run_dir / "evaluate.json")]
        procs[run["name"]] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    t_eval = time.perf_counter()
    eval_codes = _wait_all(procs, math.inf)
    base_codes = _wait_all(base_procs, math.inf)
    if shared:  # wait (bounded) for the other plan's baseline rows
        wait_until = time.perf_counter() + float(plan.get("baselines_wait_s", 600))
        while time.perf_counter() < wait_until and not all(
                (base_dir / s / "manifest.json").is_file() for s in splits):
            time.sleep(2.0)
    timings["baselines"] = {"methods": baselines, "exit": base_codes}
    timings["eval_wall_s"] = round(time.perf_counter() - t_eval, 2)
    # 3. tables
    frames = []
    for run in trained:
        run_dir = work / "runs" / run["name"]
        timings["runs"][run["name"]]["eval_exit"] = eval_codes[run["name"]]
        f = run_results(Run("gpu", plan["form"], run["row"], run["seed"]), run_dir)
        if baselines:  # the shared baseline rows, under this run's name (paired with its subjects in the tables)
            base = run_results(Run("gpu", plan["form"], run["row"], run["seed"]), base_dir)
            f = pd.concat([base, f], ignore_index=True) if len(f) else f
        if len(f):
            f.insert(0, "run", run["name"])
            frames.append(f)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    tables = work / "tables"
    tables.mkdir(exist_ok=True)
    if len(frame):
        for stem in ("psnr", "ssim", "psnr_eroded"):
            if f"{stem}_t1" in frame and f"{stem}_t2" in frame:
                frame[f"{stem}_avg"] = (frame[f"{stem}_t1"] + frame[f"{stem}_t2"]) / 2
        write_text_atomic(tables / "gpu_runs.csv", frame.to_csv(index=False))
        if all(r["row"] in ROW_LABELS for r in runs):
            write_tables(str(plan.get("table", "table2")), plan["form"], frame.drop(columns=["run"]), tables, n_planned=len(runs),
                         failures=[r["name"] for r in runs if r not in trained],
                         command="python -m nexus_monai.ops.gpu_run run (see summary.md for the budget)")
    # 4. fp16 weights of the best-validation runs, as many whole runs as the file count allows
    ranking = []
    for run in trained:
        val = frame[(frame["run"] == run["name"]) & (frame["split"] == "validation")
                    & (frame["method"] == "nexus_inr")] if len(frame) else frame
        score = float(val["psnr_avg"].mean()) if len(val) and "psnr_avg" in val else -math.inf
        ranking.append((score if math.isfinite(score) else -math.inf, run["name"]))
    ranking.sort(reverse=True)
    weights_dir = work / "weights"
    slots = int(max_files) - 2  # results.tar.gz and timings.json
    packed, left = [], []
    for _, name in ranking:
        files = save_fp16_parts(work / "runs" / name / "models" / "model.pt", weights_dir, name,
                                int(max_file_mib * MIB))
        if len(files) <= slots:
            for f in files:
                shutil.copy2(f, out / f.name)
            slots -= len(files)
            packed.append(name)
        else:
            left.append(name)
    timings["weights"] = {"packed_best_validation_first": packed, "left_in_work": left,
                          "ranking_validation_psnr_avg": [[n, s] for s, n in ranking]}
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    summary_csv, summary_md = _summary(frame, runs, timings) if len(frame) else ("", "# no results\n")
    write_text_atomic(tables / "summary.csv", summary_csv)
    write_text_atomic(tables / "summary.md", summary_md)
    write_text_atomic(tables / "timings.json", json.dumps(timings, indent=2) + "\n")
    # 5. one archive of tables, per-run records, per-subject rows and log tails
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(tables.iterdir()):
            tar.add(path, arcname=f"tables/{path.name}")
        for run in runs:
            run_dir = work / "runs" / run["name"]
            for rel in ("overrides.yaml", "budget.yaml", "models/training_run.json", "models/wall_clock_budget.json",
                        "results.csv", *[f"{s}/per_subject.csv" for s in splits], *[f"{s}/table1.md" for s in splits]):
                if (run_dir / rel).is_file():
                    tar.add(run_dir / rel, arcname=f"runs/{run['name']}/{rel}")
            for log in ("train.log", "evaluate.log"):
                data = _tail(run_dir / log)
                info = tarfile.TarInfo(f"runs/{run['name']}/{log}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if buf.tell() > max_file_mib * MIB:
        raise RuntimeError(f"results.tar.gz would be {buf.tell() / MIB:.1f} MiB > {max_file_mib} MiB")
    write_text_atomic(out / "results.tar.gz", buf.getvalue())
    write_text_atomic(out / "timings.json", json.dumps(timings, indent=2) + "\n")
    print(f"gpu_run: done in {timings['total_s']:.0f} s; {len(trained)} of {len(runs)} runs trained; "
          f"weights packed for {', '.join(packed) or 'none'}; files in {out}", flush=True)
    return timings


# --- pack (here, with internet) -----------------------------------------------------------------------
def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _carried_code_bytes() -> int:
    """Bytes of what a device copy of the working tree carries: tracked + untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO_ROOT, check=True,
                               capture_output=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return _tree_bytes(REPO_ROOT / "nexus_monai") + _tree_bytes(REPO_BUNDLES)
    return sum((REPO_ROOT / n.decode()).stat().st_size for n in names if n and (REPO_ROOT / n.decode()).is_file())


def copy_dataset_subset(datalist: str | os.PathLike, dest: str | os.PathLike,
                        keys: Sequence[str] = ("t1", "t2", "seg", "lesions")) -> Path:
    """Copy a datalist's files of ``keys`` (every split) under ``dest`` and write a ``dataset.json`` holding only
    those keys, paths relative to it. Returns the new datalist."""
    src = Path(datalist)
    content = json.loads(src.read_text())
    dest = Path(dest)
    for split, entries in content.items():
        if not (isinstance(entries, list) and entries and isinstance(entries[0], dict)):
            continue
        for entry in entries:
            for k in [k for k in entry if k in ("t1ce", "flair")]:
                entry.pop(k)
            for k in keys:
                if isinstance(entry.get(k), str):
                    file = Path(entry[k]) if Path(entry[k]).is_absolute() else src.parent / entry[k]
                    rel = Path(file.parent.name) / file.name
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, dest / rel)
                    entry[k] = str(rel)
    content["description"] = (content.get("description", "") + " Subset for an offline GPU run: keys "
                              + ", ".join(keys) + " only.").strip()
    write_text_atomic(dest / "dataset.json", json.dumps(content, indent=1) + "\n")
    if (src.parent / "README.txt").is_file():
        shutil.copy2(src.parent / "README.txt", dest / "README.txt")
    return dest / "dataset.json"


TARGET_HAS = "numpy,scipy,pandas,pyyaml,tqdm,pillow"
"""What the GPU server is assumed to have besides its CUDA torch (a PyTorch image ships them); the issue
that asked for this found monai, pytorch-ignite, nibabel, SimpleITK and fire missing there. ``install``
checks every import, so a wrong guess is a one-line error before any training (``--target-has ''``
carries them too: 68.8 MiB more for CPython 3.12)."""


def pack_carry(carry: str | os.PathLike = REPO_ROOT / ".gpu_carry", data: str = "embedded",
               wheelhouse_args: Sequence[str] = (), limit_mib: float = 64.0, build_wheels: bool = True,
               target_has: str = TARGET_HAS) -> dict:
    """Assemble ``carry`` (wheels + data) for the GPU machine; returns and prints the size breakdown in bytes."""
    from nexus_monai.data.brats import resolve_datalist

    carry = Path(carry)
    if build_wheels:
        cmd = [sys.executable, str(REPO_ROOT / "scripts" / "wheelhouse.py"), "build", "--out", str(carry / "wheels"),
               "--set", "run", "--python-version", "3.12", "--skip-torch", "--skip", target_has, *wheelhouse_args]
        if (carry / "wheels").exists():
            shutil.rmtree(carry / "wheels")
        subprocess.run(cmd, check=True)
    datalist = resolve_datalist(data, seed=0)
    name = Path(datalist).parent.name if str(data) == "embedded" else "dataset"
    if (carry / "data").exists():
        shutil.rmtree(carry / "data")
    copy_dataset_subset(datalist, carry / "data" / name)
    sizes = {"code (working tree a device copy carries)": _carried_code_bytes(),
             "wheels": _tree_bytes(carry / "wheels") if (carry / "wheels").exists() else 0,
             "data": _tree_bytes(carry / "data")}
    sizes["total"] = sum(sizes.values())
    for k, v in sizes.items():
        print(f"{k:45s} {v / MIB:8.2f} MiB")
    manifest = {"sizes_bytes": sizes, "limit_mib": limit_mib, "datalist": f"data/{name}/dataset.json",
                "sha256_datalist": hashlib.sha256((carry / "data" / name / "dataset.json").read_bytes()).hexdigest()}
    write_text_atomic(carry / "carry.json", json.dumps(manifest, indent=2) + "\n")
    if sizes["total"] > limit_mib * MIB:
        raise NexusInputError(carry, f"{sizes['total'] / MIB:.1f} MiB > the {limit_mib} MiB a device copy carries")
    return sizes


# --- command line -----------------------------------------------------------------------------------------
def _overrides(pairs: Sequence[str]) -> dict:
    out = {}
    for item in pairs or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise NexusInputError(None, f"--override must be KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nexus_monai.ops.gpu_run", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the plan's configurations side by side, evaluate, pack the results")
    r.add_argument("--plan", default=str(REPO_ROOT / "scripts" / "gpu_plan.yaml"))
    r.add_argument("--data", default="embedded", help="datalist JSON, a folder with dataset.json, or 'embedded'")
    r.add_argument("--work", required=True, help="working folder (runs, logs, all weights)")
    r.add_argument("--out", required=True, help="at most --max-files files come here")
    r.add_argument("--budget-s", type=float, default=None, help="override the plan's training budget (s)")
    r.add_argument("--device", default="auto", help="auto | cuda | cpu")
    r.add_argument("--lpips", action="store_true", help="score LPIPS too (needs the real AlexNet weights)")
    r.add_argument("--max-files", type=int, default=8)
    r.add_argument("--max-file-mib", type=float, default=15.0)
    r.add_argument("--grace-s", type=float, default=300.0, help="kill a training this long after the budget")
    r.add_argument("--override", action="append", default=[], help="KEY=VALUE for every run (YAML value)")
    k = sub.add_parser("pack", help="assemble the carry folder (wheels + data) for an offline GPU machine")
    k.add_argument("--carry", default=str(REPO_ROOT / ".gpu_carry"))
    k.add_argument("--data", default="embedded")
    k.add_argument("--limit-mib", type=float, default=64.0)
    k.add_argument("--no-wheels", action="store_true", help="keep the wheels already in CARRY/wheels")
    k.add_argument("--wheelhouse-arg", action="append", default=[], help="passed to scripts/wheelhouse.py build")
    k.add_argument("--target-has", default=TARGET_HAS, help="distributions the server has (not carried)")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            pack_carry(args.carry, args.data, args.wheelhouse_arg, args.limit_mib, not args.no_wheels, args.target_has)
            return 0
        if args.max_files < 3 or args.max_file_mib <= 0:
            raise NexusInputError(None, "--max-files must be >= 3 and --max-file-mib > 0")
        plan = load_plan(args.plan, _overrides(args.override))
        if args.budget_s is not None:
            plan["budget_s"] = float(args.budget_s)
        if str(args.data) == "embedded":
            from nexus_monai.data.brats import resolve_datalist

            data = resolve_datalist("embedded", seed=0)
        else:
            data = Path(args.data) / "dataset.json" if Path(args.data).is_dir() else Path(args.data)
            if not data.is_file():
                raise NexusInputError(args.data, "dataset not found")
        run_plan(plan, data, args.work, args.out, device=args.device, lpips=args.lpips, max_files=args.max_files,
                 max_file_mib=args.max_file_mib, grace_s=args.grace_s)
    except NexusInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
