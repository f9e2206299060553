"""Speed and wall time of a run that may span several invocations (resumes).

Each invocation appends one line per timed window to ``<workdir>/timing.jsonl``
(``{"invocation", "step", "steps", "seconds", "first", "wall"}``): ``steps``
updates took ``seconds`` of training time (evaluation and saving excluded);
``first`` marks the invocation's first window, which includes XLA
compilation; ``wall`` is the invocation's wall time so far.  A line is written
before the window's results are used, so a killed invocation keeps the time it
spent.  :func:`summarize` turns the file into the summary's timing fields:
seconds per step = median over non-first windows of all invocations (all
windows if there are no others), wall seconds = sum over invocations.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from dualflow.io import append_jsonl, read_jsonl

__all__ = ["TimingLog", "summarize"]


class TimingLog:
    """Appends this invocation's windows to ``path`` (only on the main process)."""

    def __init__(self, path: Path, invocation: str, t_start: float, enabled: bool):
        self.path = Path(path)
        self.invocation = invocation
        self.t_start = t_start
        self.enabled = enabled
        self._first = True

    def window(self, step: int, steps: int, seconds: float, now: float) -> None:
        if not self.enabled or steps <= 0:
            return
        rec = {
            "invocation": self.invocation,
            "step": int(step),
            "steps": int(steps),
            "seconds": float(seconds),
            "first": self._first,
            "wall": float(now - self.t_start),
        }
        self._first = False
        append_jsonl(self.path, rec)

    def finish(self, step: int, now: float) -> None:
        """Record the invocation's final wall time (no training window)."""
        if self.enabled:
            rec = {"invocation": self.invocation, "step": int(step), "steps": 0}
            append_jsonl(self.path, {**rec, "wall": float(now - self.t_start)})


def summarize(path: Path) -> dict:
    """``seconds_per_step`` (None if nothing was trained), ``train_seconds``,
    ``steps_run`` (updates executed, including ones redone after a kill),
    ``wall_seconds`` (summed over invocations) and ``invocations``."""
    recs = read_jsonl(path)
    windows = [r for r in recs if r.get("steps", 0) > 0]
    steady = [r for r in windows if not r.get("first")] or windows
    per_step = [r["seconds"] / r["steps"] for r in steady]
    walls: dict[str, float] = {}
    for r in recs:
        walls[r["invocation"]] = max(
            walls.get(r["invocation"], 0.0), r.get("wall", 0.0)
        )
    return {
        "seconds_per_step": statistics.median(per_step) if per_step else None,
        "train_seconds": sum(r["seconds"] for r in windows),
        "steps_run": sum(r["steps"] for r in windows),
        "wall_seconds": sum(walls.values()),
        "invocations": len(walls),
    }
