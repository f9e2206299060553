"""User-facing error types: a script reports each in one ``error:`` line.

Every error a user can fix (a bad config value, missing or malformed data, an
unreadable checkpoint, a diverged run) derives from :class:`DualflowError`;
``dualflow.cli.run`` turns them into one line on stderr and exit code 2.
:class:`Interrupted` (SIGINT/SIGTERM handled by the trainer) exits with 130.
Anything else is a bug in dualflow and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "DivergenceError",
    "DualflowError",
    "Interrupted",
]


class DualflowError(Exception):
    """Base of the errors a user can fix; the message says what to do."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(DualflowError, ValueError):
    """A config field has an invalid value; the message names the field."""


class DataNotFoundError(DualflowError, FileNotFoundError):
    """Data files are missing; the message says where to put them."""


class DataError(DualflowError, ValueError):
    """Data on disk is malformed: the message names the data set, the file and
    the first bad row or entry."""


class CheckpointError(DualflowError, RuntimeError):
    """No checkpoint in a workdir can be restored; the message says what to
    delete or move to start over."""


class DivergenceError(DualflowError, FloatingPointError):
    """Training produced a non-finite loss or metric."""


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after saving its state (exit 130).

    A ``KeyboardInterrupt`` so that ``except Exception`` never swallows it.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step
