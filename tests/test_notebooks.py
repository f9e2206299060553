"""Every notebook under notebooks/ runs top to bottom (outputs not compared)."""

import importlib.util
import json
import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _runner():
    spec = importlib.util.spec_from_file_location(
        "run_notebook", ROOT / "scripts" / "run_notebook.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = json.loads(path.read_text())
    x64 = jax.config.jax_enable_x64  # notebooks may switch x64 on; restore it
    try:
        done = _runner().execute(nb, capture_figures=False)
    finally:
        jax.config.update("jax_enable_x64", x64)
    n_code = sum(c["cell_type"] == "code" for c in nb["cells"])
    assert sum(c.get("execution_count") is not None for c in done["cells"]) == n_code
