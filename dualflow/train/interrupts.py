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
(``<signal>[x<count>]@<point>[:<step>]``; points ``step``, ``save``,
``save-write``, ``eval``, ``compile``; ``group`` in
``dualflow/benchmarks/uci_run.py``) sends the signal to this process at that
point, so a test can interrupt a subprocess at an exact moment
(``save-write``: while orbax is writing checkpoint ``step``'s files;
``compile``: 0.2 s into the first train step).  Unset, it costs one
dictionary look-up per call.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

__all__ = ["InterruptGuard", "inject"]

_SIGNALS = ("SIGINT", "SIGTERM")


class InterruptGuard:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`requested`; the
    same signal again exits the process with code 130 at once.

    "At once" holds even while the main thread is inside a long C call (an XLA
    compilation, a device wait, orbax I/O), where Python-level handlers cannot
    run: every delivery is also written to a wakeup socket
    (``signal.set_wakeup_fd``) that a daemon thread watches.  A different
    signal after the first (a wrapper forwarding SIGINT as SIGTERM) is not a
    second request.  Signals that were ignored (``SIG_IGN``, e.g. background
    jobs) stay ignored.  Outside the main thread the guard is inert and
    :attr:`requested` stays ``None``.
    """

    def __init__(self, second_message: str = "", first_notice: str = ""):
        self.requested: str | None = None
        self._old: dict = {}
        self._second = second_message or (
            "second interrupt: exiting now; the workdir keeps its last checkpoint"
        )
        self._notice = first_notice
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._old_wakeup = -1
        self._exiting = threading.Lock()

    def _hard_exit(self) -> None:
        # The handler (main thread) and the watcher thread may both get here;
        # the second one waits on the lock until the process is gone.
        self._exiting.acquire()
        os.write(2, (self._second + "\n").encode())  # no buffered, reentrant I/O
        os._exit(130)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            if self._notice:  # long units of work: say that the signal was heard
                os.write(2, f"{name}: {self._notice}\n".encode())
        elif name == self.requested:
            # at once when the main thread runs Python; the watcher thread
            # covers a main thread stuck in a long C call (an XLA compile)
            self._hard_exit()

    def _watch(self, reader: socket.socket) -> None:
        counts: dict[int, int] = {}
        wanted = {int(s) for s in self._old}
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            for b in data:
                if b == 0:  # the guard is closing
                    return
                if b in wanted:
                    counts[b] = counts.get(b, 0) + 1
                    if counts[b] >= 2:
                        self._hard_exit()
            if not data:
                return

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in _SIGNALS:
            sig = getattr(signal, name)
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            self._old[sig] = signal.signal(sig, self._handle)
        if self._old:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            try:
                self._old_wakeup = signal.set_wakeup_fd(
                    writer.fileno(), warn_on_full_buffer=False
                )
            except (ValueError, OSError):  # wakeup fd unavailable: handler only
                reader.close()
                writer.close()
            else:
                self._sockets = (reader, writer)
                threading.Thread(
                    target=self._watch, args=(reader,), daemon=True
                ).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._sockets is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            reader, writer = self._sockets
            self._sockets = None
            try:
                writer.send(b"\x00")
            except OSError:
                pass
            writer.close()
        for sig, old in self._old.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old.clear()


def _spec() -> tuple[str, str, int | None] | None:
    raw = os.environ.get("DUALFLOW_INJECT_FAULT", "")
    if not raw:
        return None
    sig, _, where = raw.partition("@")
    point, _, step = where.partition(":")
    return sig.strip().upper(), point.strip(), int(step) if step.strip() else None


def _send(sig_name: str) -> None:
    """``SIGINT``, ``SIGINTx2`` (the signal twice in a row) or
    ``SIGINT-GROUP`` (to the whole process group, input workers included, as a
    terminal's Ctrl-C does)."""
    sig_name, _, scope = sig_name.partition("-")
    name, _, times = sig_name.partition("X")
    for _ in range(int(times or 1)):
        if scope == "GROUP":
            os.killpg(os.getpgid(0), getattr(signal, name))
        else:
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
