"""Execute notebooks headless (nbclient + ipykernel) and keep their outputs.

    python scripts/run_notebook.py notebooks/quickstart.ipynb   # full size, rewrite
    python scripts/run_notebook.py --all --small                # SMALL=1 check of all

A full-size run rewrites the notebook with its outputs (atomically, and only if
every cell succeeded and the result passes ``dualflow.notebooks.problems``: no
error output, no absolute path, counts in order, the install cell unchanged).
``--small`` sets ``SMALL=1`` and leaves the file untouched unless ``--write``
is given (for a notebook that says it has not been run at full size here).
"""

from __future__ import annotations

import os
import pathlib
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402


def _check_readable(path: pathlib.Path) -> None:
    """A missing or malformed notebook is one error line."""
    import json

    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        cli.fail(f"notebook {path} does not exist")
    except (OSError, UnicodeDecodeError) as err:
        cli.fail(f"cannot read notebook {path}: {err}")
    except json.JSONDecodeError as err:
        cli.fail(f"{path} is not a notebook (invalid JSON: {err})")
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        cli.fail(f"{path} is not a notebook (no 'cells' list)")


def main(argv: list[str] | None = None) -> int:
    """Run the notebooks named on the command line (or ``--all``)."""
    ap = cli.argument_parser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", type=pathlib.Path, nargs="*")
    ap.add_argument("--all", action="store_true", help="every notebooks/*.ipynb")
    ap.add_argument("--small", action="store_true", help="SMALL=1 (seconds on CPU)")
    ap.add_argument("--write", action="store_true", help="with --small: keep outputs")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    args = ap.parse_args(argv)
    if args.write and not args.small:
        ap.error("--write only applies to --small (a full-size run always writes)")
    from dualflow import notebooks

    named = list(args.notebooks) + (notebooks.notebook_paths() if args.all else [])
    paths = list({p.resolve(): p for p in named}.values())  # each once
    if not paths:
        ap.error("name at least one notebook, or pass --all")
    for path in paths:
        _check_readable(path)
    for path in paths:
        _run_one(
            path,
            small=args.small,
            write=args.write or not args.small,
            timeout=args.timeout,
        )
    return 0


def _run_one(path: pathlib.Path, *, small: bool, write: bool, timeout) -> None:
    import nbformat

    from dualflow import notebooks
    from dualflow.io import write_text_atomic

    print(f"{path.name}: running ({'SMALL' if small else 'full size'}) ...", flush=True)
    try:
        nb = notebooks.execute(path, small=small, timeout=timeout)
    except notebooks.NotebookError as err:
        print(str(err), file=sys.stderr)
        cli.fail(
            f"{path.name}: a cell failed; the file is unchanged",
            "the cell and its traceback are printed above",
        )
    found = notebooks.problems(nb, require_full_size=write)
    if found:
        cli.fail(f"{path.name}: {'; '.join(found)}; the file is unchanged")
    if write:
        write_text_atomic(path, nbformat.writes(nb) + "\n")
    seconds = nb.metadata["dualflow"]["seconds"]
    print(f"{path.name}: ok in {seconds:.0f} s{' (outputs written)' if write else ''}")


if __name__ == "__main__":
    cli.run_plain(main)
