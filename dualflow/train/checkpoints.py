"""Checkpoints that are verified before they are trusted.

Orbax writes each checkpoint to a temporary folder and renames it when done,
so a save killed half-way never looks complete.  That does not protect against
what happens to the files afterwards (a disk that fills up, a copy cut short,
a sync tool that truncates): :class:`CheckpointStore` therefore writes a
manifest (size and BLAKE2b digest of every file) into each finished checkpoint
and, on resume, checks the newest checkpoint against it before restoring.  A
checkpoint that fails the check, or that orbax cannot restore, is reported in
one line, moved aside (never deleted) and the next older one is tried.  When
none is readable, :class:`~dualflow.errors.CheckpointError` says what to move
away; nothing is restarted silently over an existing run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dualflow.errors import CheckpointError

__all__ = ["MANIFEST", "CheckpointStore", "verify_checkpoint"]

MANIFEST = "dualflow_manifest.json"
_CHUNK = 1 << 22


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Record ``{relative path: [size, digest]}`` of a finished checkpoint."""
    entries = {
        str(p.relative_to(step_dir)): [p.stat().st_size, _digest(p)]
        for p in _files(step_dir)
    }
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": entries}))
    os.replace(tmp, step_dir / MANIFEST)


def verify_checkpoint(step_dir: Path) -> str | None:
    """``None`` if every file in the manifest is intact, else the first problem
    (which file, and how it differs).  A checkpoint without a manifest (older
    runs, or a process killed between orbax's rename and the manifest write)
    passes; orbax's own restore is then the only check."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest {MANIFEST} is unreadable ({type(err).__name__})"
    for rel, (size, digest) in sorted(files.items()):
        f = step_dir / rel
        if not f.is_file():
            return f"file {rel} is missing"
        actual = f.stat().st_size
        if actual != size:
            what = "truncated" if actual < size else "longer than written"
            return f"file {rel} is {what}: {actual} of {size} bytes"
        if _digest(f) != digest:
            return f"file {rel} has changed since it was written (digest mismatch)"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:200]}"


def _is_resource_error(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)


def _agree_main(value: bool) -> bool:
    """Process 0's ``value``, on every process."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _agree_all(value: bool) -> bool:
    """True on every process iff ``value`` is true on every process."""
    if jax.process_count() == 1:
        return value
    return bool(np.all(multihost_utils.process_allgather(np.int32(value))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class CheckpointStore:
    """Orbax ``CheckpointManager`` of one pytree item (``state``) plus manifests.

    ``directory``: ``<workdir>/checkpoints``; unreadable checkpoints are moved
    to ``<workdir>/checkpoints_unreadable/<step>``.  ``is_main``: only process
    0 writes manifests, verifies them and moves folders; the other processes
    follow its decisions.
    """

    def __init__(self, directory: Path, keep: int, is_main: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory)
        self.quarantine = self.directory.parent / "checkpoints_unreadable"
        self.keep = int(keep)
        self.is_main = is_main
        self._manager = self._make_manager()

    def _make_manager(self):
        options = self._ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, enable_async_checkpointing=False
        )
        return self._ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, before_manifest: Callable | None = None):
        """Save ``state`` as checkpoint ``step`` (blocking), then its manifest."""
        if self._manager.latest_step() == step:
            return
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        if before_manifest is not None:
            before_manifest()
        if self.is_main:
            write_manifest(self.directory / str(step))

    def _verify(self, step: int, manifests_in_use: bool) -> str | None:
        step_dir = self.directory / str(step)
        if manifests_in_use and not (step_dir / MANIFEST).exists():
            return (
                f"it has no {MANIFEST}: its save was cut short before it was verified"
            )
        return verify_checkpoint(step_dir)

    def _try_restore(
        self, step: int, abstract: Any, manifests_in_use: bool
    ) -> tuple[Any, str | None]:
        problem = self._verify(step, manifests_in_use) if self.is_main else None
        if not _agree_main(problem is None):  # process 0 decides for all
            return None, problem or "process 0 found it unreadable"
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract))
        try:
            state, problem = self._manager.restore(step, args=args)["state"], None
        except Exception as err:  # orbax/tensorstore raise many types
            if _is_resource_error(err):
                raise  # out of memory is not a damaged checkpoint
            state, problem = None, _first_line(err)
        if not _agree_all(problem is None):
            return None, problem or "another process could not restore it"
        return state, None

    def _move_aside(self, step: int) -> Path:
        target = self.quarantine / str(step)
        k = 1
        while target.exists():
            target = self.quarantine / f"{step}.{k}"
            k += 1
        if self.is_main:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        return target

    def restore_newest(
        self, abstract: Any, report: Callable[[str], None] = print
    ) -> tuple[Any, int] | None:
        """Restore the newest readable checkpoint: ``(state, step)``, or ``None``
        if there is no checkpoint at all.

        Newer unreadable checkpoints are reported (one line each, naming the
        step and the file) and moved aside once an older one restores.  Once
        any checkpoint has a manifest, one without it is treated as a save
        cut short (a kill between orbax's rename and the manifest write).
        With several processes, process 0 verifies and all agree on the step.
        Raises :class:`CheckpointError` when checkpoints exist but none
        restores.
        """
        steps = sorted(self.steps(), reverse=True)
        if not steps:
            return None
        manifests_in_use = any(
            (self.directory / str(s) / MANIFEST).exists() for s in steps
        )
        bad: list[tuple[int, str]] = []
        for step in steps:
            state, problem = self._try_restore(step, abstract, manifests_in_use)
            if problem is None:
                for b, why in bad:
                    where = self._move_aside(b)
                    report(
                        f"dualflow: checkpoint step {b} is unreadable ({why});"
                        f" moved to {where}; resuming from step {step}"
                    )
                if bad:  # the manager cached the moved steps
                    _barrier("dualflow_checkpoint_fallback")
                    self._manager.close()
                    self._manager = self._make_manager()
                return state, step
            bad.append((step, problem))
        listed = "; ".join(f"step {s}: {why}" for s, why in bad)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({listed}).",
            hint=(
                f"move {self.directory.parent} away to start this run over, or pass"
                " a new --workdir; nothing was changed"
            ),
        )

    def close(self) -> None:
        self._manager.close()
