"""Every notebook runs headless, top to bottom, with ``SMALL=1`` (nbclient and
an IPython kernel, as Jupyter or Colab would run it).

A failing cell fails the test with that cell and its traceback.  The executed
notebook must also pass the committed-output checks that do not depend on the
run's size (no error output, no absolute path printed, counts in order, the
install cell unchanged).  All six take about 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import pytest

from dualflow import notebooks


@pytest.mark.parametrize("path", notebooks.notebook_paths(), ids=lambda p: p.name)
def test_notebook_runs_small(path):
    done = notebooks.execute(path, small=True)
    assert notebooks.problems(done, require_full_size=False) == []
    code = [c for c in done.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert "SMALL run" in "".join(o.get("text", "") for o in code[0].outputs)
