"""Graceful SIGINT/SIGTERM for long jobs, and the fault-injection test hook.

:class:`InterruptGuard` replaces the default handlers while a run trains: the
first SIGINT (Ctrl-C) or SIGTERM (preemption of a cloud VM, Colab's stop
button) only sets a flag, so nothing is cut in the middle of an XLA
compilation, a device step, an evaluation or a checkpoint save.  The training
loop polls :attr:`InterruptGuard.requested` after each step; it then saves a
checkpoint and raises :class:`~dualflow.errors.Interrupted` (exit code 130
from the scripts).  A second signal exits at once (``os._exit(130)``): every
file dualflow writes is written atomically (temporary file + rename, orbax's
temporary checkpoint folder), so the workdir is never left corrupt, only
behind by the steps since its last checkpoint.

:func:`inject` is a test hook: ``DUALFLOW_INJECT_FAULT="SIGINT@step:7"``
(``<signal>[x<count>]@<point>[:<step>]``; points ``step``, ``save``, ``save-write``,
``eval``, ``compile``; ``group`` in ``scripts/uci.py``) sends the signal to this process at that point, so a
test can interrupt a subprocess at an exact moment (``save-write``: while
orbax is writing checkpoint ``step``'s files; ``compile``: 0.2 s into the
first train step).  Unset, it costs one dictionary look-up per call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["InterruptGuard", "inject"]

_SIGNALS = ("SIGINT", "SIGTERM")


class InterruptGuard:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`requested`, the
    second exits the process with code 130 at once.

    Outside the main thread (signal handlers cannot be installed there) it is
    inert and :attr:`requested` stays ``None``.
    """

    def __init__(self, second_message: str = "", first_notice: str = ""):
        self.requested: str | None = None
        self._old: dict = {}
        self._second = second_message or (
            "second interrupt: exiting now; the workdir keeps its last checkpoint"
        )
        self._notice = first_notice

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            sys.stderr.write(self._second + "\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = signal.Signals(signum).name
        if self._notice:  # long units of work: say that the signal was heard
            sys.stderr.write(f"{self.requested}: {self._notice}\n")
            sys.stderr.flush()

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for name in _SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _spec() -> tuple[str, str, int | None] | None:
    raw = os.environ.get("DUALFLOW_INJECT_FAULT", "")
    if not raw:
        return None
    sig, _, where = raw.partition("@")
    point, _, step = where.partition(":")
    return sig.strip().upper(), point.strip(), int(step) if step.strip() else None


def _send(sig_name: str) -> None:
    """``SIGINT`` or ``SIGINTx2`` (the signal twice in a row)."""
    name, _, times = sig_name.partition("X")
    for _ in range(int(times or 1)):
        os.kill(os.getpid(), getattr(signal, name))


def _when_tmp_appears(directory: Path, sig_name: str, timeout: float = 60.0) -> None:
    """Send the signal as soon as orbax's temporary checkpoint folder exists."""
    end = time.time() + timeout
    while time.time() < end:
        if directory.exists() and any("tmp" in p.name for p in directory.iterdir()):
            _send(sig_name)
            return
        time.sleep(0.0005)


def inject(point: str, step: int | None = None, directory: Path | None = None) -> None:
    """Send the signal named by ``$DUALFLOW_INJECT_FAULT`` if it targets
    ``point`` (and ``step``); a no-op when the variable is unset."""
    spec = _spec()
    if spec is None:
        return
    sig_name, want_point, want_step = spec
    if want_point != point or (want_step is not None and want_step != step):
        return
    if point == "compile":  # land inside the compilation that follows
        threading.Timer(0.2, _send, args=(sig_name,)).start()
    elif point == "save-write":  # land while orbax writes the files
        threading.Thread(
            target=_when_tmp_appears, args=(directory, sig_name), daemon=True
        ).start()
    else:
        _send(sig_name)
