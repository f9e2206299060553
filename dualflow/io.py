"""Small file helpers: results are written atomically, never left partial, and
record the commit that produced them."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

__all__ = [
    "append_jsonl",
    "git_commit",
    "read_jsonl",
    "write_json_atomic",
    "write_text_atomic",
]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and ``os.replace``.

    A crash mid-write leaves the previous file (or none), never a partial one.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, indent: int = 2, ensure_ascii: bool = True
) -> None:
    """Write ``obj`` as JSON (plus a final newline) with :func:`write_text_atomic`."""
    write_text_atomic(
        path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    )


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line (a kill can cut only this line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (``[]`` if it does not exist); a line
    cut by a kill mid-append is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def git_commit(repo_dir: str | os.PathLike) -> str:
    """Short hash of ``repo_dir``'s HEAD, ``+dirty`` with uncommitted changes to
    tracked files, ``"unknown"`` outside a git checkout (recorded next to
    results: the code that produced them)."""

    def git(*args):
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            cwd=repo_dir,
            check=True,
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
