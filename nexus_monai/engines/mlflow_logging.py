"""MLflow runs worth comparing: one tracking store, hyper-parameters as params, the model, panels and tables.

**One store for the whole project.** :func:`tracking_uri` is the URI every part uses (bundle
training and evaluation with ``--tracking mlflow``, ``nexus-sr evaluate``, the experiment runner):
an explicit URI if given, else ``MLFLOW_TRACKING_URI``, else the project's default store
``sqlite:///<cache>/mlflow/mlruns.db`` (``<cache>`` = ``NEXUS_MONAI_CACHE`` or
``~/.cache/nexus_monai``), with artifacts in ``<cache>/mlflow/mlruns``. So one
``mlflow ui --backend-store-uri <that URI>`` shows training runs, evaluations and experiments
together. :func:`ensure_experiment` creates an experiment with its artifact folder beside a
sqlite store (MLflow's own default would be ``./mlruns`` of whatever folder a run starts in).

**What a bundle run logs** (:class:`MLflowRunLogger`, listed in a bundle's ``train#handlers`` and
``validate#handlers``; it does nothing unless the run is tracked, i.e. ``--tracking mlflow``):

* params: the hyper-parameters of the executed config that MONAI's tracking writes
  (``save_execute_config``) -- every literal top-level value (learning rate, batch size, patch
  size, epochs, seeds, dataset, ...) and the arguments of its components (``network_def.*``
  switches and widths, ``loss.*`` weights, ``protocol.*``, ...), references resolved;
* tags: ``bundle``, ``protocol``, ``git_commit``, ``nexus_monai_version``;
* the trained model: ``model/model.pt`` with its sha256 as the tag ``model_sha256``;
* after each validation: the panel a report handler left in ``engine.state.validation_report``
  as an MLflow image (``log_image``, key ``validation_panel``, step = epoch) and its per-subject
  rows as an MLflow table (``log_table``, ``validation/epoch_NNNN.json``).

It finds the run the way MONAI's ``MLFlowHandler`` does (the newest unfinished run of
``run_name`` in the experiment), so both log into one run without looking into each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from PIL import Image

from nexus_monai import __version__
from nexus_monai.paths import REPO_ROOT

__all__ = ["default_store_dir", "tracking_uri", "artifact_location", "ensure_experiment", "git_commit", "sha256_file",
           "config_params", "MLflowRunLogger"]

STRUCTURE_KEYS = {"imports", "train", "validate", "initialize", "run", "training", "finalize", "evaluating",
                  "inference", "_meta_", "preprocessing", "postprocessing", "network", "save_execute_config",
                  "tracking_uri", "is_not_rank0", "trainer", "validator", "evaluator", "handlers"}
MAX_VALUE = 500


def default_store_dir() -> Path:
    """``<NEXUS_MONAI_CACHE or ~/.cache/nexus_monai>/mlflow``: the project's default MLflow store."""
    return Path(os.environ.get("NEXUS_MONAI_CACHE", Path.home() / ".cache" / "nexus_monai")) / "mlflow"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri``, else ``MLFLOW_TRACKING_URI``, else the default sqlite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlruns.db'}"


def artifact_location(uri: str) -> str | None:
    """``<folder of the sqlite file>/mlruns`` for a ``sqlite:///`` URI (where MONAI's MLFlowHandler puts
    them too); None (the server decides) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Create experiment ``name`` in the store (artifacts beside a sqlite file) unless it exists; returns ``name``."""
    from mlflow import MlflowClient  # lazy: optional, ~1.3 s to import; untracked runs never load it

    uri = tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(uri))
        except Exception:  # created by a concurrent process in between: fine if it exists now
            if client.get_experiment_by_name(name) is None:
                raise
    return name


def git_commit() -> str:
    """The commit of the source checkout the package runs from (``+dirty`` with local changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _literal(value) -> bool:
    if isinstance(value, (bool, int, float)) or value is None:
        return True
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    if isinstance(value, Mapping):
        return all(_literal(v) for k, v in value.items() if k != "_target_")
    return False


def config_params(config: Mapping) -> dict[str, str]:
    """Flat ``{name: value}`` hyper-parameters of a raw bundle config (MONAI syntax, unparsed).

    Literal top-level values and the literal arguments of top-level components (``network_def.mmf``,
    ``loss.w_kd``, ``protocol.contrasts.t1.factor`` ...) are kept; ``@id`` references to literals are
    replaced by their values; expressions (``$...``) and workflow structure (trainer, handlers,
    transforms) are left out. Values are JSON text, cut at 500 characters.
    """
    parser = ConfigParser(dict(config))
    try:
        parser.resolve_macro_and_relative_ids()  # same-file macros; a file macro that is missing here stays as text
    except Exception:
        parser = ConfigParser(dict(config))

    def resolve(value, depth=0):
        if isinstance(value, str) and value.startswith("@") and depth < 8:
            try:
                return resolve(parser.get(value[1:].replace("::", "#")), depth + 1)
            except (KeyError, TypeError, IndexError):
                return value
        if isinstance(value, list):
            return [resolve(v, depth + 1) for v in value]
        if isinstance(value, Mapping):
            return {k: resolve(v, depth + 1) for k, v in value.items()}
        return value

    out: dict[str, str] = {}

    def add(name, value, level):
        value = resolve(value)
        if isinstance(value, Mapping) and level < 3:
            for k, v in value.items():
                if not str(k).startswith("_") or k == "_target_":
                    add(f"{name}.{k}", v, level + 1)
        elif _literal(value):
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:MAX_VALUE]

    for key, value in parser.get().items():
        if key in STRUCTURE_KEYS or str(key).startswith("_"):
            continue
        add(str(key), value, 0)
    return out


class MLflowRunLogger:
    """Log params, tags, the model, validation images and tables into the MLflow run of a bundle.

    Args:
        executed_config: ``@save_execute_config``: the executed-config file MONAI's ``--tracking``
            writes (a path), or ``True``/``False``/None when the run is not tracked (then nothing is logged).
        tracking_uri: the run's store (``@tracking_uri``).
        experiment_name: experiment of the run (``@experiment_name``).
        run_name: name of the run (``@run_name``).
        tags: extra tags, e.g. ``{"bundle": "@_meta_#name", "protocol": "@protocol#name"}``.
        model_file: the trained model to log when the engine completes (trainer: ``$@ckpt_dir + '/model.pt'``).
        report: log ``engine.state.validation_report`` (panel and rows) after each epoch (evaluators).
    """

    def __init__(self, executed_config=None, tracking_uri: str | None = None, experiment_name: str = "nexus_monai",
                 run_name: str | None = None, tags: Mapping | None = None, model_file: str | None = None,
                 report: bool = False):
        self.executed_config = executed_config if isinstance(executed_config, (str, os.PathLike)) else None
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.model_file = model_file
        self.report = bool(report)
        self.client, self.run_id, self._logged_params = None, None, False

    @property
    def enabled(self) -> bool:
        return self.executed_config is not None and self.run_name is not None

    def attach(self, engine: Engine) -> None:
        if not self.enabled or idist.get_rank() > 0:  # DDP: rank 0 logs (MONAI's handlers do the same)
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _run(self) -> str | None:
        """The newest unfinished run named ``run_name`` (MONAI's MLFlowHandler opened it at STARTED)."""
        if self.run_id is None:
            from mlflow import MlflowClient  # lazy: optional, only for tracked runs

            self.client = self.client or MlflowClient(tracking_uri=tracking_uri(self.tracking_uri))
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                return None
            runs = self.client.search_runs([experiment.experiment_id],
                                           filter_string=f"attributes.run_name = '{self.run_name}'",
                                           order_by=["attributes.start_time DESC"])
            runs = [r for r in runs if r.info.status != "FINISHED"]
            self.run_id = runs[0].info.run_id if runs else None
        return self.run_id

    def _log_params_and_tags(self) -> None:
        if self._logged_params or self._run() is None:
            return
        from mlflow.entities import Param, RunTag  # lazy: optional, only for tracked runs

        path = Path(self.executed_config)
        params = config_params(json.loads(path.read_text())) if path.is_file() else {}
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        tags = {"git_commit": git_commit(), "nexus_monai_version": __version__, **self.tags}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._logged_params = True

    def _epoch_completed(self, engine: Engine) -> None:
        self._log_params_and_tags()
        if not self.report or self.run_id is None:
            return
        report = getattr(engine.state, "validation_report", None)
        if not report:
            return
        step = int(report.get("epoch", engine.state.epoch))
        panel = report.get("panel")
        if isinstance(panel, (str, os.PathLike)):
            with Image.open(panel) as image:
                panel = np.asarray(image.convert("RGB"))
        if panel is not None:
            self.client.log_image(self.run_id, np.asarray(panel), key="validation_panel", step=step)
        rows = report.get("rows")
        if rows:
            table = {k: [_cell(r.get(k)) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
            self.client.log_table(self.run_id, data=table, artifact_file=f"validation/epoch_{step:04d}.json")

    def _completed(self, engine: Engine) -> None:
        self._log_params_and_tags()
        if self.run_id is None or not self.model_file or not Path(self.model_file).is_file():
            return
        self.client.log_artifact(self.run_id, str(self.model_file), artifact_path="model")
        self.client.set_tag(self.run_id, "model_sha256", sha256_file(self.model_file))


def _cell(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
