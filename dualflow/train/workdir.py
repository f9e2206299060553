"""Workdir housekeeping: one run at a time, and nothing earlier is overwritten.

:class:`WorkdirLock` holds an exclusive ``flock`` on ``<workdir>/.lock`` while
a run uses the folder, so two invocations of the same command (a job
requeued while the old one still saves, a second terminal) cannot interleave
their logs or delete each other's temporary checkpoint folders.
:func:`archive_outputs` moves the outputs of an earlier attempt that left no
checkpoint (it diverged, or was killed before its first save) to
``<workdir>/previous/<id>/`` before a run starts again from step 0.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from dualflow.errors import DualflowError

__all__ = ["OUTPUTS", "WorkdirBusyError", "WorkdirLock", "archive_outputs"]

OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "timing.jsonl", "curves.png")


class WorkdirBusyError(DualflowError, RuntimeError):
    """Another process holds the workdir's lock."""


class WorkdirLock:
    """Exclusive, non-blocking lock on ``<workdir>/.lock`` (released on exit,
    also when the process is killed: the kernel drops ``flock`` locks)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = Path(workdir) / ".lock"
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # the file system has no locks (some network / FUSE mounts,
                # e.g. Google Drive on Colab): run unlocked, say so once
                os.close(fd)
                print(
                    f"dualflow: workdir {self.path.parent} does not support file"
                    f" locks ({os.strerror(err.errno or 0)}); running without one:"
                    " do not start a second run on this workdir at the same time",
                    file=sys.stderr,
                )
                return self
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by another run (pid {holder}).",
                hint="wait for it to finish, or pass a new --workdir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def archive_outputs(workdir: Path, tag: str) -> Path | None:
    """Move existing :data:`OUTPUTS` to ``previous/<tag>/``; return the folder
    (``None`` if there was nothing to move)."""
    workdir = Path(workdir)
    found = [workdir / name for name in OUTPUTS if (workdir / name).exists()]
    if not found:
        return None
    target = workdir / "previous" / tag
    target.mkdir(parents=True, exist_ok=True)
    for path in found:
        os.replace(path, target / path.name)
    return target
