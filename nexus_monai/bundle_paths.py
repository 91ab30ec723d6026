"""Where bundles and the package's data files are, whatever the working directory.

* :func:`metadata_schema_path`: the bundle metadata schema shipped in the package
  (``nexus_monai/bundle_schema/meta_schema.json``), for MONAI's ``verify_metadata --filepath``.
* :func:`package_file`: any data file shipped in the package (protocol YAMLs, the schema), via
  ``importlib.resources``, so a plain ``pip install .`` works without the repository.
* :func:`bundle_root`: the folder of the bundle whose config is being run. MONAI's
  ``python -m monai.bundle run`` does not tell a config where it lives (no ``__file__`` in
  configs), so bundle configs say ``bundle_root: "$nexus_monai.bundle_paths.bundle_root()"``: the
  parent of the ``configs/`` folder of the first config file of the running MONAI workflow
  (found on the call stack: the ``ConfigWorkflow`` that is parsing it), else of the
  ``--config_file`` on the command line. ``--bundle_root DIR`` overrides it, as for any bundle.
* :func:`default_bundle`: ``bundles/<name>`` of a source checkout, for CLI defaults.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from importlib import resources
from pathlib import Path

from nexus_monai.errors import NexusInputError

__all__ = ["package_file", "metadata_schema_path", "bundle_root", "bundle_root_of", "default_bundle"]


def package_file(*parts: str) -> Path:
    """Path of a data file shipped inside the installed ``nexus_monai`` package."""
    ref = resources.files("nexus_monai").joinpath(*parts)
    path = Path(str(ref))
    if not path.exists():
        raise FileNotFoundError(f"nexus_monai package data file missing: {'/'.join(parts)} (reinstall the package)")
    return path


def metadata_schema_path() -> Path:
    """The JSON schema every ``configs/metadata.json`` of this project follows (checked offline)."""
    return package_file("bundle_schema", "meta_schema.json")


def bundle_root_of(config_file: str | os.PathLike) -> str:
    """``<bundle>`` for ``<bundle>/configs/<file>`` (absolute); the file's folder if it is not in ``configs/``."""
    folder = Path(config_file).resolve().parent
    return str(folder.parent if folder.name == "configs" else folder)


def _first_config(value) -> str | None:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # fire passes "['a.yaml','b.yaml']" through as a string at times
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return None
            return _first_config(list(items))
        return text
    return None


def _config_from_stack() -> str | None:
    from monai.bundle import ConfigWorkflow  # MONAI is imported by every caller anyway

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigWorkflow):
                root = getattr(candidate, "config_root_path", None)
                if root is not None:
                    return str(Path(root) / "_")  # any file name inside configs/
            frame = frame.f_back
    finally:
        del frame
    return None


def _config_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            return _first_config(argv[i + 1])
        if arg.startswith("--config_file="):
            return _first_config(arg.split("=", 1)[1])
    return None


def bundle_root() -> str:
    """The running bundle's root folder (absolute): see the module docstring for how it is found.

    Raises ``RuntimeError`` with a one-line hint when neither a MONAI workflow nor ``--config_file``
    names the config (e.g. a config parsed by hand with ``ConfigParser``: set ``bundle_root`` then).
    """
    config = _config_from_stack() or _config_from_argv(sys.argv)
    if config is None:
        raise RuntimeError("cannot tell which bundle is running: pass --bundle_root DIR "
                           "(or set parser['bundle_root'] when parsing a bundle config yourself)")
    return bundle_root_of(config)


def default_bundle(name: str) -> Path:
    """``bundles/<name>`` next to the package in a source checkout (``NEXUS_MONAI_BUNDLES`` overrides the folder).

    Raises :class:`~nexus_monai.errors.NexusInputError` (one line, with a hint) when there is no
    such folder (e.g. a non-editable install): pass ``--bundle DIR``.
    """
    env = os.environ.get("NEXUS_MONAI_BUNDLES")
    base = Path(env) if env else Path(__file__).resolve().parents[1] / "bundles"
    path = base / name
    if not (path / "configs").is_dir():
        raise NexusInputError(path, f"bundle '{name}' not found here: pass --bundle /path/to/{name} "
                                    f"(or set NEXUS_MONAI_BUNDLES to the folder holding the bundles)")
    return path
