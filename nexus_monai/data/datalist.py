"""Datalists shared by every dataset source: seeded splits, JSON read/write and the cache folder.

A MONAI decathlon-style datalist is a JSON object whose list-valued keys are splits
(``training``, ``validation``, ``test`` and, for the embedded dataset, ``test_anatomy``); each
entry is a dict of file paths (``PATH_KEYS``, relative to the JSON's folder or absolute) and
plain values. Both the BraTS discovery (:mod:`nexus_monai.data.brats`) and the embedded
generator (:mod:`nexus_monai.data.synth`) build on this module, so neither imports the other's
helpers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nexus_monai.data.io import write_text_atomic
from nexus_monai.errors import NexusInputError
from nexus_monai.keys import LESIONS

__all__ = [
    "DEFAULT_PROPORTIONS",
    "PATH_KEYS",
    "split_counts",
    "make_datalist",
    "write_datalist",
    "load_datalist",
    "default_cache_dir",
]

DEFAULT_PROPORTIONS = (48, 10, 15)  # the paper's train / validation / test subjects (of 73)
PATH_KEYS = ("t1", "t1ce", "t2", "flair", "seg", LESIONS, "t1_clean", "t1ce_clean", "t2_clean", "flair_clean")
"""Entry keys holding file paths (made absolute by :func:`load_datalist`)."""


def default_cache_dir() -> Path:
    """Where generated data and datalists are cached (``NEXUS_MONAI_CACHE`` overrides)."""
    return Path(os.environ.get("NEXUS_MONAI_CACHE", Path.home() / ".cache" / "nexus_monai"))


def split_counts(n: int, proportions: Sequence[float] = DEFAULT_PROPORTIONS) -> tuple[int, int, int]:
    """``(train, validation, test)`` sizes for ``n`` subjects in the given proportions.

    Validation and test get at least one subject each when ``n >= 3``; training gets the rest.
    """
    if n < 1:
        raise ValueError("need at least one subject")
    p = np.asarray(proportions, dtype=float)
    if p.shape != (3,) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"proportions must be three non-negative numbers, got {proportions}")
    p = p / p.sum()
    val, test = int(np.floor(n * p[1] + 0.5)), int(np.floor(n * p[2] + 0.5))  # rounded half up
    if n >= 3:
        val, test = max(val, 1 if p[1] > 0 else 0), max(test, 1 if p[2] > 0 else 0)
    val, test = min(val, n), min(test, max(n - val, 0))
    return n - val - test, val, test


def make_datalist(subjects: Sequence[dict], seed: int = 0, proportions: Sequence[float] = DEFAULT_PROPORTIONS,
                  base_dir: str | os.PathLike | None = None, **info) -> dict:
    """A MONAI decathlon-style datalist with a seeded ``training``/``validation``/``test`` split.

    Paths are written relative to ``base_dir`` (the folder the JSON will live in) when given.
    """
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_train, n_val, _ = split_counts(len(subjects), proportions)
    chosen = [dict(subjects[i]) for i in order]
    if base_dir is not None:
        for s in chosen:
            for k in PATH_KEYS:
                if k in s:
                    s[k] = os.path.relpath(s[k], base_dir)
    splits = {"training": chosen[:n_train], "validation": chosen[n_train : n_train + n_val],
              "test": chosen[n_train + n_val :]}
    for part in splits.values():
        part.sort(key=lambda s: s["subject"])
    return {**info, "split_seed": seed, "proportions": list(proportions), **splits}


def write_datalist(path: str | os.PathLike, datalist: dict) -> Path:
    """Write the datalist JSON atomically."""
    return write_text_atomic(path, json.dumps(datalist, indent=2) + "\n")


def load_datalist(path: str | os.PathLike, split: str = "training") -> list[dict]:
    """Entries of one split with path keys made absolute (relative to the JSON's folder)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise NexusInputError(path, "datalist not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NexusInputError(path, f"not valid JSON ({err})") from err
    if split not in content:
        raise NexusInputError(
            path, f"no {split!r} split (has: {', '.join(k for k, v in content.items() if isinstance(v, list))})"
        )
    out = []
    for entry in content[split]:
        e = dict(entry)
        for k in PATH_KEYS:
            if isinstance(e.get(k), str) and not os.path.isabs(e[k]):
                e[k] = str(path.parent / e[k])
        out.append(e)
    return out
