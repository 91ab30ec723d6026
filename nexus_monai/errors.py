"""Errors raised on bad user input.

Every problem with a file a user handed us is reported as one :class:`NexusInputError` whose
message is a single line ``"<path>: <problem>"``; the CLI prints exactly that line and exits 2.
"""

from __future__ import annotations

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
