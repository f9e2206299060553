"""Where data lives: config field first, then ``DUALFLOW_DATA_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DataNotFoundError", "resolve_data_dir"]

ENV_VAR = "DUALFLOW_DATA_DIR"


from dualflow.errors import DataNotFoundError  # noqa: E402  (re-exported here)


def resolve_data_dir(
    configured: str | os.PathLike | None = None, required: bool = False
) -> Path | None:
    """The data directory: ``configured`` if given, else ``$DUALFLOW_DATA_DIR``.

    Returns ``None`` when neither is set and ``required`` is False.
    """
    raw = str(configured) if configured else os.environ.get(ENV_VAR, "")
    if not raw:
        if required:
            raise DataNotFoundError(
                f"No data directory configured: set the config field data_dir or the"
                f" environment variable {ENV_VAR} to the folder holding the data sets."
            )
        return None
    path = Path(raw).expanduser()
    if required and not path.is_dir():
        raise DataNotFoundError(
            f"Data directory {path} does not exist (from"
            f" {'config data_dir' if configured else ENV_VAR})."
        )
    return path
