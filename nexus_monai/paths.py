"""Where the package and the folders of its source checkout are, whatever the working directory.

One place for the ``Path(__file__).parents[...]`` arithmetic that modules in different packages
needed: the package folder (``nexus_monai/``) and the repository root above it. The repository's
``bundles/`` and ``transforms/`` (protocol YAMLs) exist only in a source checkout or an editable
install; code that must also work from a wheel asks :mod:`nexus_monai.bundle_paths` for package data
instead, and treats a missing repository folder as "not available".
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PACKAGE_DIR", "REPO_ROOT", "REPO_BUNDLES", "REPO_TRANSFORMS", "repo_path", "in_repo"]

PACKAGE_DIR = Path(__file__).resolve().parent
"""The installed ``nexus_monai`` package folder."""

REPO_ROOT = PACKAGE_DIR.parent
"""The repository root of a source checkout (the folder holding ``nexus_monai/``, ``bundles/``, ``tests/``)."""

REPO_BUNDLES = REPO_ROOT / "bundles"
"""The checkout's MONAI bundles (``bundles/<name>/configs/...``)."""

REPO_TRANSFORMS = REPO_ROOT / "transforms"
"""The checkout's acquisition-protocol YAMLs."""


def repo_path(*parts: str | os.PathLike) -> Path:
    """``REPO_ROOT / parts`` (it may not exist outside a source checkout)."""
    return REPO_ROOT.joinpath(*parts)


def in_repo(path: str | os.PathLike) -> Path:
    """``path`` as given when it is absolute or exists from the working directory; else the same relative
    path under the repository root when that exists (``bundles/nexus_inr`` from any folder); else as given."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    candidate = REPO_ROOT / given
    return candidate if candidate.exists() else given
