"""The skeleton of a validation report handler: rows and a panel collected per epoch.

Subclasses implement ``_iteration(engine)`` (append to ``self.rows``, set ``self.panel``) and
``_epoch(engine)`` (write files, leave ``engine.state.validation_report`` for
:class:`~nexus_monai.engines.mlflow_logging.MLflowRunLogger`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from ignite.engine import Engine, Events

__all__ = ["EpochReport"]


class EpochReport(ABC):
    """Reset at each epoch start, collect per iteration, report at each epoch end."""

    def __init__(self, output_dir: str | os.PathLike | None = None, prefix: str = "validation"):
        self.output_dir = Path(output_dir) if output_dir else None
        self.prefix = prefix
        self.rows: list[dict] = []
        self.panel = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.panel = [], None

    @abstractmethod
    def _iteration(self, engine: Engine) -> None:
        """Add this iteration's rows (and the panel)."""

    @abstractmethod
    def _epoch(self, engine: Engine) -> None:
        """Write the epoch's report."""
