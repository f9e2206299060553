"""Execute a notebook's code cells in-process and store their outputs in it.

    python scripts/run_notebook.py notebooks/duality_tour.ipynb

No Jupyter needed: cells run in one namespace with matplotlib's Agg backend;
printed text becomes a stream output and every open figure a PNG output.  The
file is rewritten atomically, and only if every cell succeeded.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pathlib
import sys
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402


def execute(nb: dict, *, capture_figures: bool = True) -> dict:
    """Run ``nb``'s code cells in order; return a copy with outputs filled in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__main__"}
    out = json.loads(json.dumps(nb))
    count = 0
    for cell in out["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        src = "".join(cell["source"])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                exec(compile(src, f"<cell {count}>", "exec"), namespace)  # noqa: S102
            except Exception as e:  # report which cell failed, then re-raise
                tb = traceback.format_exc()
                raise RuntimeError(f"cell {count} failed:\n{src}\n\n{tb}") from e
        outputs = []
        if buf.getvalue():
            outputs.append(
                {
                    "name": "stdout",
                    "output_type": "stream",
                    "text": buf.getvalue().splitlines(keepends=True),
                }
            )
        for num in plt.get_fignums():
            fig = plt.figure(num)
            if capture_figures:
                png = io.BytesIO()
                fig.savefig(png, format="png", dpi=80, bbox_inches="tight")
                outputs.append(
                    {
                        "data": {
                            "image/png": base64.b64encode(png.getvalue()).decode(),
                            "text/plain": ["<Figure>"],
                        },
                        "metadata": {},
                        "output_type": "display_data",
                    }
                )
            plt.close(fig)
        cell["outputs"] = outputs
        cell["execution_count"] = count
    return out


def _read_notebook(path: pathlib.Path) -> dict:
    """The notebook's JSON; a missing or malformed file is one error line."""
    try:
        nb = json.loads(path.read_text())
    except FileNotFoundError:
        cli.fail(f"notebook {path} does not exist")
    except (OSError, UnicodeDecodeError) as err:
        cli.fail(f"cannot read notebook {path}: {err}")
    except json.JSONDecodeError as err:
        cli.fail(f"{path} is not a notebook (invalid JSON: {err})")
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        cli.fail(f"{path} is not a notebook (no 'cells' list)")
    return nb


def main(argv: list[str] | None = None) -> int:
    """Execute the notebook named on the command line and rewrite it."""
    ap = cli.argument_parser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=pathlib.Path)
    args = ap.parse_args(argv)
    nb = _read_notebook(args.notebook)
    done = execute(nb)
    from dualflow.io import write_json_atomic

    write_json_atomic(args.notebook, done, indent=1, ensure_ascii=False)
    print(f"executed {args.notebook}")
    return 0


if __name__ == "__main__":
    cli.run_plain(main)
