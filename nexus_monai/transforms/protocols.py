"""Acquisition protocols as data: the YAMLs of the top-level ``transforms/`` (``nexus_monai/protocols/`` in a wheel).

``load_protocol("nexus")`` reads ``transforms/brats_t1axial_t2coronal.yaml``;
``load_protocol("ssmcsr")`` reads ``transforms/ssmcsr_x4.yaml`` on top of the file it
``extends``. A path to any YAML with the same keys works too. Parsing is MONAI's
``ConfigParser``, exactly as a bundle including the same files would do.

Subject preparation is the protocol's job: :meth:`Protocol.prepare_subject` (also
:func:`prepare_subject`) loads a datalist entry's HR scans, puts them on the protocol frame and
simulates the LR scans, the same way for ``nexus-sr evaluate``, the SSMCSR datalist runner and tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from monai.bundle import ConfigParser
from monai.transforms import Compose

from nexus_monai.data.brats import brats_loader
from nexus_monai.errors import NexusInputError
from nexus_monai.keys import LESIONS
from nexus_monai.paths import REPO_TRANSFORMS

__all__ = ["PROTOCOLS", "GRID_FILE", "GridEntry", "protocols_dir", "Protocol", "load_protocol", "prepare_subject",
           "protocol_grid"]

PROTOCOLS = {"nexus": "brats_t1axial_t2coronal.yaml", "ssmcsr": "ssmcsr_x4.yaml",
             "t1x2_t2z4": "grid_t1x2_t2z4.yaml", "t1z2_t2y6": "grid_t1z2_t2y6.yaml",
             "t1iso_t2z5": "grid_t1iso_t2z5.yaml", "t1y4_t2z2": "grid_t1y4_t2z2.yaml", "t2z2p5": "grid_t2z2p5.yaml"}
GRID_FILE = "protocol_grid.yaml"
"""The protocol grid (issue 27): entries ``{protocol, world[, name]}`` (see :func:`protocol_grid`)."""
WORLDS = ("small", "full")


def protocols_dir() -> Path:
    """Where the protocol YAMLs are: ``NEXUS_MONAI_TRANSFORMS`` if set, else the package data of an
    installed wheel (``nexus_monai/protocols/``, via ``importlib.resources``), else the source
    checkout's top-level ``transforms/`` (see ``setup.py``: the wheel ships that folder)."""
    env = os.environ.get("NEXUS_MONAI_TRANSFORMS")
    if env:
        return Path(env)
    shipped = Path(str(resources.files("nexus_monai").joinpath("protocols")))
    if (shipped / PROTOCOLS["nexus"]).is_file():
        return shipped
    return REPO_TRANSFORMS


@dataclass
class Protocol:
    """A parsed protocol: its ``protocol`` dict and the transforms built from the YAML."""

    name: str
    files: list[Path]
    config: dict
    parser: ConfigParser

    def contrast(self, key: str) -> dict:
        return dict(self.config["contrasts"][key])

    def simulation(self) -> Compose:
        """HR subject dict (t1, t2[, seg]) -> framed HR plus simulated ``t1_lr`` / ``t2_lr``."""
        frame = self.parser.get_parsed_content("frame", instantiate=True)
        return Compose([frame, *self.parser.get_parsed_content("acquisition", instantiate=True)])

    def prepare_subject(self, subject: dict) -> dict:
        """Load HR t1/t2 (+seg, +lesions), put them on the protocol frame and simulate ``t1_lr`` / ``t2_lr``.

        ``seg`` and the lesion instance map go through the same frame transform as the images (zero
        padding / cropping, no interpolation, so labels stay exact). A subject with noise-free renders
        (datalist keys ``t1_clean`` / ``t2_clean``, the embedded dataset since generator 3.0.0) has its
        LR scans simulated from them (with the entry's drawn acquisition, see the protocol YAML) and is
        scored against them: ``t1`` / ``t2`` become the noise-free renders and the noisy HR scans move to
        ``t1_noisy`` / ``t2_noisy`` (the previous ground truth, kept for the noisy-GT figures).
        """
        clean = [f"{c}_clean" for c in ("t1", "t2") if subject.get(f"{c}_clean")]
        keys = [k for k in ("t1", "t2", "seg") if k in subject] + ([LESIONS] if subject.get(LESIONS) else []) + clean
        data = self.simulation()(brats_loader(keys)(dict(subject)))
        for key in clean:
            contrast = key[: -len("_clean")]
            data[f"{contrast}_noisy"], data[contrast] = data[contrast], data.pop(key)
        if LESIONS in data and data[LESIONS].shape != data["t1"].shape:
            raise NexusInputError(subject[LESIONS],
                                  f"protocol {self.name!r}: its frame transform does not list {LESIONS!r}")
        return data


def _chain(path: Path, seen: tuple = ()) -> list[Path]:
    if not path.exists():
        raise NexusInputError(path, "protocol file not found")
    if path in seen:
        raise NexusInputError(path, "protocol 'extends' loop")
    raw = ConfigParser.load_config_file(str(path))
    base = raw.get("extends")
    return (_chain(path.parent / base, seen + (path,)) if base else []) + [path]


def load_protocol(name_or_path: str | os.PathLike) -> Protocol:
    """Parse a protocol by name (``nexus``, ``ssmcsr``) or YAML path."""
    key = str(name_or_path)
    path = protocols_dir() / PROTOCOLS[key] if key in PROTOCOLS else Path(key)
    if key not in PROTOCOLS and not path.exists():
        raise NexusInputError(path, f"unknown protocol (use one of {sorted(PROTOCOLS)} or a YAML path)")
    files = _chain(path)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    config = parser.get_parsed_content("protocol")
    return Protocol(name=str(config.get("name", path.stem)), files=files, config=config, parser=parser)


def prepare_subject(subject: dict, protocol: Protocol) -> dict:
    """``protocol.prepare_subject(subject)``: framed HR scans plus the simulated ``t1_lr`` / ``t2_lr``."""
    return protocol.prepare_subject(subject)


@dataclass(frozen=True)
class GridEntry:
    """One protocol of the grid: its table ``name``, the ``protocol`` (name or YAML path) and the
    embedded ``world`` it is scored on (``small`` = 2 mm, ``full`` = 1 mm)."""

    name: str
    protocol: str
    world: str = "small"


def protocol_grid(spec: str | Sequence[str] = "grid") -> list[GridEntry]:
    """The grid entries of ``spec``: ``"grid"`` (every entry of ``transforms/protocol_grid.yaml``), or a
    comma-separated list / sequence of entry names, protocol names or YAML paths (a name of the grid
    file keeps its world; any other protocol is scored on the ``small`` world). Unknown names raise a
    one-line :class:`NexusInputError` before any work."""
    path = protocols_dir() / GRID_FILE
    raw = ConfigParser.load_config_file(str(path)).get("grid") or []
    known = []
    for item in raw:
        name, world = str(item.get("name", item["protocol"])), str(item.get("world", "small"))
        entry = GridEntry(name, str(item["protocol"]), world)
        if entry.world not in WORLDS:
            raise NexusInputError(path, f"entry {entry.name!r}: world must be one of {WORLDS}, got {entry.world!r}")
        known.append(entry)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not names:
        raise NexusInputError(None, "empty protocol list")
    out = []
    for name in names:
        if name == "grid":
            out += known
            continue
        match = [e for e in known if e.name == name]
        if match:
            out += match
        elif name in PROTOCOLS or Path(name).is_file():
            out.append(GridEntry(load_protocol(name).name if name not in PROTOCOLS else name, name))
        else:
            raise NexusInputError(name, f"unknown protocol (use grid, one of {sorted(PROTOCOLS)}, "
                                        f"{sorted(e.name for e in known)} or a YAML path)")
    if len({e.name for e in out}) != len(out):
        raise NexusInputError(None, f"a protocol is listed twice in {spec!r}")
    return out
