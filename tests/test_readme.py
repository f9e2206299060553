"""The README's code runs as written and its first two lines are the commands."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert first_block == [
        'pip install -e ".[dev]" && python scripts/train.py',
        'pip install -e ".[dev]" && pytest -q',
    ]


def test_readme_python_snippet_runs():
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert snippets, "README has no python example"
    namespace: dict = {}
    exec(compile(snippets[0], str(README), "exec"), namespace)  # noqa: S102
    res, params = namespace["res"], namespace["params"]
    h = res.smoothed["h"]
    assert h.mean.shape == (8, 32) and bool(jnp.all(h.var >= 0))
    grads = namespace["grads"]
    assert set(grads) == set(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
