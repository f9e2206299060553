"""Run the notebooks headless and check what they keep in the repository.

The notebooks under ``notebooks/`` are meant for Colab (GPU/TPU runtimes) and
for a clone.  Every one opens with a markdown cell saying what it shows, the
runtime it wants and how long it takes, then :data:`INSTALL_CELL` (identical in
all of them), which installs dualflow where needed, reads the ``SMALL``
environment switch (``SMALL=1``: a seconds-long CPU run, used by CI) and prints
the devices JAX sees.

:func:`execute` runs one through ``nbclient`` and an IPython kernel (the
``dev`` extra installs both), as Jupyter would: working directory the
notebook's folder, rich outputs, inline figures.  :func:`problems` lists what
is wrong with a notebook's committed form (errors in outputs, absolute paths,
cells out of order or not run, a missing or edited install cell, a missing
runtime line).  ``scripts/run_notebook.py`` is the command-line front end.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

__all__ = [
    "INSTALL_CELL",
    "NOT_RUN_AT_FULL_SIZE",
    "NOTEBOOK_DIR",
    "NotebookError",
    "code_digest",
    "execute",
    "notebook_paths",
    "problems",
]

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

INSTALL_CELL = """\
# Setup: install dualflow if needed, read the SMALL switch, list the devices JAX sees.
# On Colab it installs from REPO_URL with the extra for the runtime's accelerator;
# inside a clone of the repository it makes an editable install of that clone.
REPO_URL = "https://github.com/dualflow/dualflow"  # change it to use a fork

import glob, importlib, importlib.util, os, pathlib, shutil, subprocess, sys

SMALL = os.environ.get("SMALL", "").lower() not in ("", "0", "false", "no", "off")
PIP = [sys.executable, "-m", "pip", "install", "-q"]


def _clone_root():
    for folder in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
        if (folder / "pyproject.toml").is_file() and (folder / "dualflow").is_dir():
            return folder
    return None


def _accelerator_extra():
    tpu = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    if tpu or importlib.util.find_spec("libtpu") is not None:
        return "[tpu]"
    return "[cuda]" if shutil.which("nvidia-smi") else ""


if importlib.util.find_spec("dualflow") is None:
    root, extra = _clone_root(), _accelerator_extra()
    if root is not None:  # a clone: editable install, importable at once
        subprocess.run([*PIP, "-e", f"{root}{extra}"], check=True)
        sys.path.insert(0, str(root))
    else:  # Colab, or any machine without a clone
        subprocess.run([*PIP, f"dualflow{extra} @ git+{REPO_URL}"], check=True)
    importlib.invalidate_caches()
    print(f"installed dualflow{extra} (if this kernel had imported jax, restart it)")

import jax

import dualflow

print(f"dualflow {dualflow.__version__}, JAX {jax.__version__}")
print("devices:", jax.devices())
print("SMALL run (seconds on a CPU)" if SMALL else "full-size run")
""".rstrip("\n")

# A notebook that cannot run at full size without an accelerator says so in its
# first cell with this phrase; only such a notebook may keep SMALL outputs.
NOT_RUN_AT_FULL_SIZE = "not been run at full size"

_ABS_PATH = re.compile(
    r"file://\S+"
    r"|(?<![\w.~:/-])/(?:home|work|tmp|root|Users|usr|opt|var|private|mnt|srv|content"
    r"|scratch|data|media|Volumes|nix|etc|run)/[^\s'\"()]*"
    r"|\b[A-Za-z]:[\\/][^\s'\"]+"
)


def _local_paths() -> list[str]:
    """This machine's own absolute folders (home, checkout, Python, temp)."""
    found = {str(pathlib.Path.home()), str(NOTEBOOK_DIR.parent), sys.prefix}
    found.add(tempfile.gettempdir())
    return sorted(p for p in found if len(p) > 4)  # not "/" or "/tmp" alone


class NotebookError(RuntimeError):
    """A cell raised: the message names the cell and shows the error."""


def notebook_paths(folder: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The ``*.ipynb`` files of ``folder`` (default ``notebooks/``), sorted."""
    return sorted(pathlib.Path(folder or NOTEBOOK_DIR).glob("*.ipynb"))


def execute(
    path: str | os.PathLike,
    *,
    small: bool,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run every cell of the notebook at ``path``; return the executed notebook.

    Args:
      path: the ``.ipynb`` file; it is read, never written here.
      small: set ``SMALL=1`` in the kernel's environment (else ``SMALL=0``).
      timeout: seconds allowed per cell (default 600 small, 7200 full size).
      env: extra environment variables for the kernel.

    Returns the ``nbformat`` notebook with outputs, execution counts from 1
    and ``metadata["dualflow"]`` = ``{"code_sha256", "small", "seconds",
    "executed"}`` (the digest of the code cells the outputs belong to).
    Raises :class:`NotebookError` naming the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import (
        CellExecutionError,
        CellTimeoutError,
        DeadKernelError,
    )

    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # outputs of an earlier run must not survive a failure
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    kernel_env = {
        **os.environ,
        **(env or {}),
        "SMALL": "1" if small else "0",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures inline
    }
    client = NotebookClient(
        nb,
        timeout=timeout or (600 if small else 7200),
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no transport warning
    )
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env)
    except CellExecutionError as err:
        raise NotebookError(f"{path.name}: {_first_line_of_error(err)}") from err
    except (CellTimeoutError, DeadKernelError) as err:
        raise NotebookError(f"{path.name}: {type(err).__name__}: {err}") from err
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(cell.outputs)
    nb.metadata["dualflow"] = {
        "code_sha256": code_digest(nb),
        "small": bool(small),
        "seconds": round(time.perf_counter() - start, 1),
        "executed": datetime.date.today().isoformat(),
    }
    return nb


def code_digest(nb: Any) -> str:
    """sha256 of the notebook's code cells (sources only, in order)."""
    code = [_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
    return hashlib.sha256("\n\x00".join(code).encode()).hexdigest()


def _merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks into one output, as Jupyter
    shows them."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and out.get("output_type") == "stream" == prev.get("output_type")
            and out.get("name") == prev.get("name")
        ):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(out)
    return merged


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line_of_error(err: Exception) -> str:
    """``a cell failed: <last traceback line>`` then the cell and traceback,
    without terminal colour codes."""
    text = _ANSI.sub("", str(err))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = next((ln for ln in reversed(lines) if not ln.startswith(" ")), "")
    return f"a cell failed: {tail}\n{text}"


def problems(nb: Any, *, require_full_size: bool = True) -> list[str]:
    """What is wrong with a notebook as committed; ``[]`` when nothing is.

    Checks: the first cell is markdown naming the ``Runtime:`` and ``Time:``;
    the first code cell is exactly :data:`INSTALL_CELL`; every code cell ran,
    with execution counts 1, 2, ... in order; no error output and no traceback
    on stderr; no absolute path in any output (common root folders,
    ``file://`` URIs, drive letters, this machine's home, checkout, Python and
    temp folders); the code cells unchanged since the run
    (``metadata.dualflow.code_sha256``); and (``require_full_size``) the
    outputs come from a full-size run unless the first cell says the notebook
    has :data:`NOT_RUN_AT_FULL_SIZE` here.
    """
    found: list[str] = []
    cells = nb["cells"]
    first = cells[0] if cells else None
    intro = _source(first) if first is not None else ""
    if first is None or first["cell_type"] != "markdown":
        found.append("the first cell is not a markdown cell saying what it shows")
    else:
        for word in ("Runtime:", "Time:"):
            if word not in intro:
                found.append(
                    f"the first cell does not give the {word[:-1].lower()}"
                    f" ('{word} ...')"
                )
    code = [c for c in cells if c["cell_type"] == "code"]
    if not code or _source(code[0]) != INSTALL_CELL:
        found.append(
            "the first code cell is not dualflow.notebooks.INSTALL_CELL (copy it"
            " from there unchanged)"
        )
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        found.append(f"execution counts are {counts}, not 1..{len(code)} in order")
    own_folders = _local_paths()
    for i, cell in enumerate(code, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"code cell {i} has an error output ({out.get('ename')})")
            text = _output_text(out)
            if out.get("name") == "stderr" and "Traceback" in text:
                found.append(f"code cell {i} printed a traceback on stderr")
            m = _ABS_PATH.search(text)
            local = [p for p in own_folders if p in text]
            if m or local:
                shown = m.group(0) if m else local[0]
                found.append(f"code cell {i} shows an absolute path: {shown!r}")
    meta = nb.get("metadata", {}).get("dualflow")
    if meta is not None and meta.get("code_sha256") not in (None, code_digest(nb)):
        found.append(
            "code cells changed after the outputs were made: rerun it with"
            " scripts/run_notebook.py"
        )
    if meta is not None and not meta.get("small") and NOT_RUN_AT_FULL_SIZE in intro:
        found.append(
            f"the first cell says it has {NOT_RUN_AT_FULL_SIZE!r}, but the outputs"
            " come from a full-size run: update the first cell"
        )
    if require_full_size:
        if meta is None:
            found.append("no metadata.dualflow: run it with scripts/run_notebook.py")
        elif meta.get("small") and NOT_RUN_AT_FULL_SIZE not in intro:
            found.append(
                "its outputs come from a SMALL run, but the first cell does not say"
                f" it has {NOT_RUN_AT_FULL_SIZE!r}"
            )
    return found


def _source(cell: Any) -> str:
    src = cell["source"]
    return (src if isinstance(src, str) else "".join(src)).rstrip("\n")


def _output_text(out: Any) -> str:
    parts = []
    if "text" in out:
        parts.append(
            out["text"] if isinstance(out["text"], str) else "".join(out["text"])
        )
    for key, value in out.get("data", {}).items():
        if key.startswith("text/"):
            parts.append(value if isinstance(value, str) else "".join(value))
    if out.get("output_type") == "error":
        parts.extend(out.get("traceback", []))
    return "\n".join(parts)
