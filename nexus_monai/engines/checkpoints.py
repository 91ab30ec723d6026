"""Checkpoints that survive a kill at any moment, and resume from the newest one that loads.

MONAI's ``CheckpointSaver`` writes through ignite's ``Checkpoint`` with a non-atomic disk saver,
and ignite deletes the previous file BEFORE writing the next one: a kill while a checkpoint is
being written leaves only a truncated file. :class:`AtomicDiskSaver` (a drop-in ignite save
handler) writes to a temporary sibling, fsyncs it, renames it into place, and deletes the file
ignite asked to drop only after the new one is complete. :class:`AtomicCheckpointSaver` is
MONAI's ``CheckpointSaver`` (same arguments, same file names and contents) on that saver; bundle
configs use it for ``model.pt``. :func:`load_newest` picks the newest checkpoint that loads.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

from nexus_monai.data.io import fsync_path

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver", "read_checkpoint", "load_newest"]

_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


class AtomicDiskSaver(DiskSaver):
    """ignite save handler: temp file + fsync + rename; removals deferred until the next save is complete.

    Args:
        dirname: folder of the checkpoints (created; stale ``.<name>.XXXX.tmp`` files of killed
            runs are removed).
        filename: a fixed file name for every save (``model.pt``), as MONAI's saver allows.
        save_on_rank: the DDP rank that writes.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0):
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self.filename = filename
        self._pending: list[str] = []
        if idist.get_rank() == save_on_rank:
            for p in self.dirname.iterdir():
                if p.is_file() and _TMP.match(p.name) and (filename is None or p.name.startswith(f".{filename}.")):
                    p.unlink(missing_ok=True)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        if idist.get_rank() == self.save_on_rank:
            path = self.dirname / filename
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=self.dirname)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(checkpoint, f, **self.kwargs)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
                fsync_path(self.dirname)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            for old in self._pending:  # only now that the new file is complete
                if old != filename:
                    (self.dirname / old).unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        """ignite calls this BEFORE saving the replacement: remember it, delete after the save."""
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments and files) writing through :class:`AtomicDiskSaver`."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs):
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, filename=getattr(ckpt.save_handler, "filename", None))

    def saved_files(self) -> list[str]:
        """The file names this saver keeps (ignite's rotation list of the interval checkpoints)."""
        return [item.filename for item in (self._interval_checkpoint._saved if self._interval_checkpoint else [])]


def read_checkpoint(path: str | os.PathLike, keys: Sequence[str] = (), map_location="cpu") -> dict:
    """``torch.load`` a checkpoint holding ``keys``; raises ``ValueError`` saying why it is unusable."""
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, empty file, I/O error
        raise ValueError(f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    missing = [k for k in keys if not (isinstance(state, dict) and k in state)]
    if missing:
        raise ValueError(f"does not hold {missing}")
    return state


def load_newest(paths: Sequence[Path], objects: Mapping, engine=None, map_location="cpu",
                logger: logging.Logger | None = None) -> Path | None:
    """Load ``objects`` from the first of ``paths`` (newest first) that reads; log one line saying which
    one and why newer ones were skipped. Returns the path loaded (None: none could be read).

    ``engine``'s ``max_epochs`` is kept (as MONAI's ``CheckpointLoader`` does); a checkpoint past it
    raises ``ValueError``.
    """
    logger = logger or logging.getLogger(__name__)
    skipped = []
    for path in paths:
        try:
            state = read_checkpoint(path, list(objects), map_location)
        except ValueError as why:
            skipped.append(f"{path.name}: {why}")
            continue
        prior_max = engine.state.max_epochs if engine is not None else None
        Checkpoint.load_objects(to_load=objects, checkpoint=state)
        if engine is not None:
            if prior_max is not None and engine.state.epoch > prior_max:
                raise ValueError(f"{path}: checkpoint epoch {engine.state.epoch} is past max_epochs {prior_max}")
            engine.state.max_epochs = prior_max
        where = f" at epoch {engine.state.epoch}, iteration {engine.state.iteration}" if engine is not None else ""
        note = f"; skipped newer {'; '.join(skipped)}" if skipped else ""
        logger.info(f"resumed from {path}{where}{note}")
        return path
    if skipped:
        logger.warning(f"no checkpoint could be loaded, starting afresh; skipped {'; '.join(skipped)}")
    return None
