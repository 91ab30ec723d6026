"""The Nexus-INR paper's ablation tables as one command each (``nexus-sr experiment tableN``).

Zhang et al., "Nexus-INR: Diverse Knowledge-guided Arbitrary-Scale Multimodal Medical Image
Super-Resolution", 2025: Table 2 (components), Table 3 (encoders), Table 4 (decoders), Table 5
(segmentation on super-resolved inputs). Every row x seed is one bundle training
(``python -m monai.bundle run training`` on ``train.yaml`` + the form's overlay + the row's
``configs/experiments/<row>.yaml`` + the run's ``overrides.yaml`` holding ``seed``), then the
trained model (best validation PSNR) is scored on the test split (and ``test_anatomy`` when the
datalist has it) by :func:`~nexus_monai.evaluation.table1.evaluate_methods`, the code of
``nexus-sr evaluate``. Layout of ``out``::

    runs/<form>_<row>_seed<k>/  overrides.yaml, train.log, models/, <split>/per_subject.csv,
                                results.csv, done.json (written last, atomically: the run is finished)
    tableN.csv                  one line per row x seed x split x subject x method (+ trilinear, ibp)
    tableN.md                   mean ± std over seeds of per-seed subject means, the paper's value,
                                paired differences to the previous row with 95 % t-intervals
    (MLflow)                    the project's store (nexus_monai.engines.mlflow_logging.tracking_uri):
                                experiment "nexus_<tableN>", one named run per row x seed

Re-running the same command skips runs with ``done.json``; a killed training resumes from its
last checkpoint. Table 5 trains nothing: :mod:`nexus_monai.experiments.table5` scores frozen segmenters
(``seg_unet`` / ``seg_transunet``) on every method's output, resumable per subject x row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml
from monai.bundle import ConfigParser

from nexus_monai.data.brats import resolve_datalist
from nexus_monai.data.io import write_text_atomic
from nexus_monai.engines.mlflow_logging import tracking_uri
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.downstream import load_segmenters
from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
from nexus_monai.experiments.tables import write_tables
from nexus_monai.paths import REPO_BUNDLES, REPO_ROOT
from nexus_monai.transforms.protocols import load_protocol

__all__ = ["TABLES", "FORMS", "parse_seeds", "plan_runs", "run_experiment", "Run", "run_results", "evaluate_run"]

BUNDLE = REPO_BUNDLES / "nexus_inr"
CONFIGS = BUNDLE / "configs"
TABLES = {"table2": ("baseline", "mmf", "mmf_kdattn", "mmf_kdattn_sel"), "table3": ("rdn", "srresnet", "rescnn"),
          "table4": ("mlp", "siren")}
FORMS = {"default": (), "paper_cpu": ("paper_cpu.yaml",)}
_MLFLOW_LOCK = threading.Lock()


@dataclass
class Run:
    """One training + evaluation: ``row`` of ``table`` in ``form`` with ``seed`` (``seed=None``: no training)."""

    table: str
    form: str
    row: str
    seed: int | None
    overlays: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.form}_{self.row}" + ("" if self.seed is None else f"_seed{self.seed}")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else (empty, negative, repeated, non-integer) is a one-line error."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise NexusInputError(None, f"--seeds must be a comma-separated list of non-negative integers, got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise NexusInputError(None, f"--seeds lists a seed twice: {text!r}")
    return seeds


def plan_runs(table: str, form: str, seeds: Sequence[int]) -> list[Run]:
    """Every run of ``table`` (rows x seeds)."""
    if table not in TABLES:
        raise NexusInputError(None, f"unknown table {table!r}; choose one of {', '.join([*TABLES, 'table5'])}")
    if form not in FORMS:
        raise NexusInputError(None, f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    runs = [Run(table, form, row, s, [CONFIGS / o for o in FORMS[form]] + [CONFIGS / "experiments" / f"{row}.yaml"])
            for row in TABLES[table] for s in seeds]
    for run in runs:
        for path in run.overlays:
            if not path.is_file():
                raise NexusInputError(path, "experiment overlay missing")
    return runs


def _overrides(overrides: Sequence[str]) -> dict:
    """``KEY=VALUE`` pairs (VALUE parsed as YAML) -> dict; a malformed pair is a one-line error."""
    out = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise NexusInputError(None, f"--override must be KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _merged_config(files: Sequence[Path]) -> dict:
    """The training config of ``files`` (hyper-parameters for MLflow), references resolved where plain."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    keys = ("seed", "split_seed", "patch_size", "num_points", "batch_size", "learning_rate", "max_epochs",
            "val_interval",
            "flip_prob", "rot90_prob", "intensity_norm", "aux_warmup_epochs")
    params = {k: parser.get(k) for k in keys if parser.get(k) is not None}
    for section in ("network_def", "loss"):
        for k, v in (parser.get(section) or {}).items():
            if k != "_target_" and not (isinstance(v, str) and v[:1] in "@$%"):
                params[f"{section}.{k}"] = v
    return params


def _env(jobs: int) -> dict:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    if jobs > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _subprocess(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {' '.join(cmd[:6])} ... (see {log})")


def _train(run: Run, ctx: dict, run_dir: Path) -> None:
    if (run_dir / "trained.json").exists() or run.seed is None:
        return
    files = [CONFIGS / "train.yaml", *run.overlays, run_dir / "overrides.yaml"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr([str(f) for f in files]),
           "--dataset_dir", str(ctx["datalist"]), "--ckpt_dir", str(run_dir / "models"), "--output_dir",
           str(run_dir / "eval"),
           "--tracking", "mlflow", "--tracking_uri", ctx["tracking_uri"], "--experiment_name", ctx["experiment"],
           "--run_name", f"{run.table}_{run.name}"]
    t0 = time.time()
    _subprocess(cmd, run_dir / "train.log", ctx["env"])
    if not (run_dir / "models" / "model.pt").is_file():
        raise RuntimeError(f"training wrote no models/model.pt (no validation ran?) - see {run_dir / 'train.log'}")
    write_text_atomic(run_dir / "trained.json", json.dumps({"seconds": time.time() - t0}) + "\n")


def _evaluate(run: Run, ctx: dict, run_dir: Path) -> None:
    # beside every trained run: trilinear and back-projection (ibp: trilinear + predict's guard, no network)
    methods = ["trilinear", "ibp", "nexus_inr"]
    options = {"nexus_inr": {
        "bundle": str(BUNDLE), "weights": str(run_dir / "models" / "model.pt"),
        "overlays": [str(p) for p in run.overlays] + [str(run_dir / "overrides.yaml")]}}
    spec = {"datalist": str(ctx["datalist"]), "splits": ctx["splits"], "methods": methods, "options": options,
            "lpips": ctx["lpips"], "segmenters": [], "out": str(run_dir)}
    write_text_atomic(run_dir / "evaluate.json", json.dumps(spec, indent=1) + "\n")
    if ctx["jobs"] == 1:  # one run at a time: in this process (no interpreter start-up per run)
        evaluate_run(str(run_dir / "evaluate.json"))
        return
    _subprocess([sys.executable, "-m", "nexus_monai.experiments", "--evaluate-run", str(run_dir / "evaluate.json")],
                run_dir / "evaluate.log", ctx["env"])


def run_results(run: Run, run_dir: Path) -> pd.DataFrame:
    frames = []
    for split in sorted(p.parent.name for p in run_dir.glob("*/per_subject.csv")):
        for name, kind in (("per_subject.csv", "image"), ("table5_per_subject.csv", "segmentation")):
            path = run_dir / split / name
            if path.is_file():
                f = pd.read_csv(path)
                f.insert(0, "kind", kind)
                f.insert(0, "split", split)
                frames.append(f)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col, value in (("seed", -1 if run.seed is None else run.seed), ("row", run.row), ("form", run.form),
                       ("table", run.table)):
        out.insert(0, col, value)
    return out


def _prepare_store(ctx: dict) -> None:
    """Create the MLflow store and the table's experiment once, before trainings run in parallel:
    two processes opening a new sqlite store at once both run its schema migration, and one fails."""
    from mlflow.tracking import MlflowClient  # lazy: optional heavy dependency, only when runs go in parallel

    with _MLFLOW_LOCK:
        client = MlflowClient(tracking_uri=ctx["tracking_uri"])
        if client.get_experiment_by_name(ctx["experiment"]) is None:
            client.create_experiment(ctx["experiment"])


def _log_mlflow(run: Run, ctx: dict, params: dict, results: pd.DataFrame) -> None:
    """Tag the training's MLflow run (row, seed, form), add the parameters and the test means."""
    from mlflow.tracking import MlflowClient  # lazy: optional heavy dependency (~1.3 s), only when a run is logged

    with _MLFLOW_LOCK:
        client = MlflowClient(tracking_uri=ctx["tracking_uri"])
        exp = client.get_experiment_by_name(ctx["experiment"]) or client.get_experiment(
            client.create_experiment(ctx["experiment"])
        )
        name = f"{run.table}_{run.name}"
        found = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'",
                                   order_by=["attributes.start_time DESC"])
        run_id = found[0].info.run_id if found else client.create_run(exp.experiment_id, run_name=name).info.run_id
        for stale in found[1:]:  # earlier attempts of a killed run: partial curves only
            client.delete_run(stale.info.run_id)
        for k, v in {"row": run.row, "seed": "" if run.seed is None else run.seed, "form": run.form,
                     "table": run.table}.items():
            client.set_tag(run_id, k, str(v))
        existing = client.get_run(run_id).data.params
        for k, v in params.items():
            if k not in existing:
                client.log_param(run_id, k, str(v)[:500])
        image = results[(results["kind"] == "image") & (results["error"].fillna("") == "")] if len(results) else results
        for (split, method), part in (image.groupby(["split", "method"]) if len(image) else []):
            for col in part.columns:
                if pd.api.types.is_numeric_dtype(part[col]) and col not in ("seed",):
                    v = float(part[col].mean())
                    if math.isfinite(v):
                        client.log_metric(run_id, f"{split}/{method}/{col}", v)
        client.set_terminated(run_id, "FINISHED")


def _run_one(run: Run, ctx: dict, index: int, total: int) -> None:
    run_dir = ctx["out"] / "runs" / run.name
    label = f"[{index}/{total}] {run.table} {run.name}"
    if (run_dir / "done.json").exists():
        print(f"{label}: done earlier, skipped", flush=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(ctx["overrides"], seed=run.seed if run.seed is not None else 0)
    if ctx["max_epochs"]:
        overrides.update(max_epochs=ctx["max_epochs"], val_interval=ctx["max_epochs"], ckpt_interval=ctx["max_epochs"])
    write_text_atomic(run_dir / "overrides.yaml", yaml.safe_dump(overrides, sort_keys=True))
    t0 = time.time()
    print(f"{label}: training + evaluation ...", flush=True)
    params = (
        _merged_config([CONFIGS / "train.yaml", *run.overlays, run_dir / "overrides.yaml"])
        if run.seed is not None
        else {}
    )
    _train(run, ctx, run_dir)
    _evaluate(run, ctx, run_dir)
    results = run_results(run, run_dir)
    write_text_atomic(run_dir / "results.csv", results.to_csv(index=False))
    try:
        if run.seed is not None:
            _log_mlflow(run, ctx, {**params, "form": run.form, "overlays": ",".join(p.name for p in run.overlays)},
                        results)
    except Exception as err:  # noqa: BLE001 - the results are on disk; MLflow is a view of them
        print(f"{label}: warning: MLflow logging failed ({type(err).__name__}: {err})", flush=True)
    trained = json.loads((run_dir / "trained.json").read_text()) if (run_dir / "trained.json").exists() else {}
    write_text_atomic(run_dir / "done.json",
                      json.dumps({"seconds": time.time() - t0, "train_seconds": trained.get("seconds")}) + "\n")
    ours = (
        results[(results["kind"] == "image") & (results["method"] == "nexus_inr")] if "method" in results else results
    )
    summary = f"; test PSNR avg {((ours['psnr_t1'] + ours['psnr_t2']) / 2).mean():.2f} dB" if len(ours) else ""
    print(f"{label}: finished in {time.time() - t0:.0f} s{summary}", flush=True)


def run_experiment(table: str, form: str = "default", seeds: str = "0,1,2", out: str | os.PathLike = "results",
                   data: str = "embedded", max_epochs: int | None = None, jobs: int = 1, overrides: Sequence[str] = (),
                   lpips: bool = True, weights: Sequence[str] = (), methods: str | None = None) -> dict[str, Path]:
    """Plan, check, run (skipping finished runs) and tabulate one table; returns the written table files.

    ``table5``: :func:`nexus_monai.experiments.table5.run_table5` on ``data`` (``methods``: comma-separated rows
    of this run; ``weights``: ``ROW=PATH`` checkpoints or run folders); the training arguments do not apply."""
    if table == "table5":
        from nexus_monai.experiments.table5 import parse_weights, run_table5

        command = " ".join(["nexus-sr experiment table5", "--data", str(data), *[f"--weights {w}" for w in weights]]
                           + ([f"--methods {methods}"] if methods else []) + ["--out", str(out)])
        return run_table5(out, data=data, methods=methods.split(",") if methods else None,
                          weights=parse_weights(weights), command=command)
    runs = plan_runs(table, form, parse_seeds(seeds))
    extra = _overrides(overrides)
    if max_epochs is not None and int(max_epochs) < 1:
        raise NexusInputError(None, f"--max-epochs must be >= 1, got {max_epochs}")
    if int(jobs) < 1:
        raise NexusInputError(None, f"--jobs must be >= 1, got {jobs}")
    if str(data) != "embedded" and not Path(data).exists():
        raise NexusInputError(data, "dataset not found")
    datalist = resolve_datalist(data, seed=0)
    keys = json.loads(Path(datalist).read_text())
    splits = [s for s in ("test", "test_anatomy") if keys.get(s)]
    if "test" not in splits:
        raise NexusInputError(datalist, "the datalist has no test subjects")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ctx = {"out": root, "datalist": datalist, "splits": splits, "overrides": extra, "max_epochs": max_epochs,
           "lpips": bool(lpips), "env": _env(int(jobs)), "jobs": int(jobs), "experiment": f"nexus_{table}",
           "tracking_uri": tracking_uri()}  # the project's one MLflow store (MLFLOW_TRACKING_URI honoured)
    print(f"{table} ({form} form): {len(runs)} runs into {root}; splits {', '.join(splits)}; jobs {jobs}", flush=True)
    failures = []

    def work(item):
        i, run = item
        try:
            _run_one(run, ctx, i, len(runs))
        except Exception as err:  # noqa: BLE001 - the other runs go on; reported below
            failures.append(f"{run.name}: {err}")
            print(f"[{i}/{len(runs)}] {run.table} {run.name}: FAILED: {err}", flush=True)

    if int(jobs) > 1:
        _prepare_store(ctx)
    with ThreadPoolExecutor(max_workers=int(jobs)) as pool:
        list(pool.map(work, enumerate(runs, 1)))
    done = [
        r
        for r in runs
        if (root / "runs" / r.name / "results.csv").is_file() and (root / "runs" / r.name / "done.json").exists()
    ]
    frame = pd.concat([pd.read_csv(root / "runs" / r.name / "results.csv") for r in done],
                      ignore_index=True) if done else pd.DataFrame()
    written = write_tables(table, form, frame, root, n_planned=len(runs), failures=failures,
                           command=" ".join(["nexus-sr", "experiment", table, "--form", form, "--seeds", seeds]
                                            + ([f"--max-epochs {max_epochs}"] if max_epochs else [])))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(runs)} runs failed: " + "; ".join(failures))
    return written


def evaluate_run(spec_path: str) -> int:
    """Subprocess entry: score one trained run (``evaluate.json``) with ``nexus-sr evaluate``'s code."""
    spec = json.loads(Path(spec_path).read_text())
    segmenters = load_segmenters(spec["segmenters"]) if spec["segmenters"] else None
    for split in spec["splits"]:
        subjects = select_subjects(spec["datalist"], split)
        evaluate_methods(subjects, spec["methods"], load_protocol("nexus"), Path(spec["out"]) / split,
                         lpips=spec["lpips"],
                         progress=False, segmenters=segmenters, method_options=spec["options"], panel_subjects=1)
    return 0

