"""What a client asks of ``POST /infer/{model}``: the ``params`` JSON (as MONAI Label sends it) and the query.

Shared by the REST service and the MONAI Label app so both read a request the same way.

Accepted ``params`` keys (unknown keys are ignored and reported back, as MONAI Label clients send
extra ones such as ``device`` or ``result_extension``):

* ``spacing`` (alias ``target_spacing``): output voxel size in mm, one number (isotropic) or three;
  the output covers the T1w scan's field of view (as ``nexus-sr predict --spacing``).
* ``like``: output on the grid of another image, named by its upload field: ``"t1"``, ``"t2"`` or
  ``"like"`` (a reference NIfTI uploaded as field ``like``). Never a path: a client's string
  never reaches the filesystem.
* ``contrast`` / ``contrasts``: which outputs to return (``"t1"``, ``"t2"`` or both; default both).
* ``output``: ``image`` | ``zip`` | ``all`` | ``json`` (the query parameter ``?output=`` wins).
* ``modalities``: the contrasts of the ``file`` parts in upload order (default ``["t1", "t2"]``),
  for clients that, like MONAI Label's, upload every scan as ``file``.
* ``refine_seconds``: test-time refinement budget (``nexus-sr predict --refine``), a number of
  seconds in ``[0, MAX_REFINE_SECONDS]`` (default 0: none).
* ``guard``: the data-consistency guard (``true`` by default, as ``nexus-sr predict``); with
  ``output=all`` the residual maps come back as parts ``t1_consistency`` / ``t2_consistency``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["ServingError", "InferParams", "parse_params", "OUTPUT_KINDS", "LIKE_FIELD"]

OUTPUT_KINDS = ("image", "zip", "all", "json")
LIKE_FIELD = "like"
MAX_SPACING_MM = 1000.0  # as nexus-sr predict (nexus_monai.engines.predict.MAX_SPACING_MM)
_KNOWN = {"spacing", "target_spacing", "like", "contrast", "contrasts", "output", "modality", "modalities",
          "refine_seconds", "guard"}
MAX_REFINE_SECONDS = 600.0  # one request may hold a worker for at most this long refining


class ServingError(Exception):
    """A request the service refuses: HTTP ``status`` (4xx/5xx) and a one-line ``problem``.

    ``source`` names what was wrong (an upload field, ``params``, the model) and prefixes the
    message like :class:`~nexus_monai.errors.NexusInputError` prefixes the file.
    """

    def __init__(self, status: int, problem: str, source: str | None = None):
        self.status = int(status)
        self.source = source
        self.problem = " ".join(str(problem).split())
        super().__init__(self.problem if source is None else f"{source}: {self.problem}")


@dataclass(frozen=True)
class InferParams:
    """A parsed request. ``spacing_mm`` and ``like`` are exclusive; both ``None`` means the model default."""

    spacing_mm: tuple[float, float, float] | None = None
    like: str | None = None
    contrasts: tuple[str, ...] = ("t1", "t2")
    output: str = "image"
    modalities: tuple[str, ...] = ("t1", "t2")
    ignored: tuple[str, ...] = field(default_factory=tuple)
    refine_seconds: float = 0.0
    guard: bool = True


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _spacing(value: Any) -> tuple[float, float, float]:
    values = _as_list(value)
    try:
        if any(isinstance(v, bool) for v in values):  # JSON true is not 1 mm
            raise TypeError
        sp = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ServingError(400, f"spacing must be numbers in mm, got {value!r}", "params") from None
    if len(sp) == 1:
        sp = sp * 3
    if len(sp) != 3 or not all(math.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in sp):
        raise ServingError(400,
                           f"spacing must be one or three finite numbers in (0, {MAX_SPACING_MM:g}] mm, got {value!r}",
                           "params")
    return (sp[0], sp[1], sp[2])


def _names(value: Any, allowed: Sequence[str], key: str) -> tuple[str, ...]:
    names = [str(v).lower() for v in _as_list(value)]
    bad = [n for n in names if n not in allowed]
    if bad or not names or len(set(names)) != len(names):
        raise ServingError(400, f"{key} must be distinct values among {list(allowed)}, got {value!r}", "params")
    return tuple(names)


def parse_params(raw: str | Mapping | None, inputs: Sequence[str] = ("t1", "t2"), outputs: Sequence[str] = ("t1", "t2"),
                 query_output: str | None = None) -> InferParams:
    """Parse MONAI Label's ``params`` (a JSON object string or a mapping) into :class:`InferParams`.

    ``inputs`` / ``outputs``: the model's input fields and output contrasts. Raises
    :class:`ServingError` (400) for malformed JSON or values.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        p: Mapping = {}
    elif isinstance(raw, Mapping):
        p = raw
    else:
        try:
            p = json.loads(raw)
        except (ValueError, TypeError) as err:
            raise ServingError(400, f"not valid JSON ({type(err).__name__}: {err})", "params") from None
        if not isinstance(p, dict):
            raise ServingError(400, f"must be a JSON object, got {type(p).__name__}", "params")
    spacing = p.get("spacing", p.get("target_spacing"))
    like = p.get("like")
    if spacing is not None and like is not None:
        raise ServingError(400, "give either spacing or like, not both", "params")
    if like is not None:
        like = str(like)
        if like not in (*inputs, LIKE_FIELD):
            raise ServingError(400,
                               f"like names an upload field ({', '.join([*inputs, LIKE_FIELD])}), got {like!r}; paths "
                               f"are not accepted", "params")
    contrasts = _names(p.get("contrasts", p.get("contrast", list(outputs))), outputs, "contrast")
    output = str(query_output if query_output is not None else p.get("output", "image")).lower()
    if output not in OUTPUT_KINDS:
        raise ServingError(400, f"output must be one of {list(OUTPUT_KINDS)}, got {output!r}",
                           "params" if query_output is None else "output")
    modalities = _names(p.get("modalities", p.get("modality", list(inputs))), inputs, "modalities")
    return InferParams(spacing_mm=None if spacing is None else _spacing(spacing), like=like, contrasts=contrasts,
                       output=output, modalities=modalities, ignored=tuple(sorted(set(p) - _KNOWN)),
                       refine_seconds=_refine_seconds(p.get("refine_seconds", 0)), guard=_flag(p.get("guard", True),
                                                                                               "guard"))


def _refine_seconds(value: Any) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_REFINE_SECONDS):
        raise ServingError(400,
                           f"refine_seconds must be a number of seconds in [0, {MAX_REFINE_SECONDS:g}], got {value!r}",
                           "params")
    return seconds


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ServingError(400, f"{key} must be true or false, got {value!r}", "params")
