"""Errors raised on bad user input.

Every problem with a file a user handed us is reported as one :class:`NexusInputError` whose
message is a single line ``"<path>: <problem>"``; the CLI prints exactly that line and exits 2.
"""

from __future__ import annotations

import math
import os


class NexusInputError(ValueError):
    """A bad input file or argument. ``str(err)`` is one line naming the file and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.source is None else f"{self.source}: {self.problem}")


def find_input_error(err: BaseException) -> NexusInputError | None:
    """The :class:`NexusInputError` behind ``err`` (MONAI's ``Compose`` wraps transform errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, NexusInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 integer: bool = False) -> float:
    """``value`` if it is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); else a one-line
    :class:`NexusInputError` naming the parameter ``name`` (e.g. ``--noise``) and the allowed range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}]"
        kind = "an integer" if integer else "a finite number"
        raise NexusInputError(None, f"{name} must be {kind} in {left}, {right}, got {value!r}")
    return value
