"""Library plots draw on a bare ``matplotlib.figure.Figure``: they never switch
pyplot's backend, which would silence every later ``plt.show()`` in a notebook
(the trainer used to call ``matplotlib.use("Agg")``)."""

from __future__ import annotations

import matplotlib
import pytest

from dualflow.train.trainer import plot_curves


@pytest.fixture
def svg_backend():
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but Agg, so that a switch shows
    yield
    matplotlib.use(before)


def test_training_curves_leave_the_backend_alone(svg_backend, tmp_path):
    records = [
        {"kind": "train", "step": s, "loss": 1.0 / s, "nll": 0.5 / s} for s in (1, 2)
    ] + [
        {
            "kind": "eval",
            "step": 2,
            "nll": 0.4,
            "ece": 0.1,
            "brier": 0.2,
            "accuracy": 0.9,
        }
    ]
    path = tmp_path / "curves.png"
    plot_curves(records, path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
    assert not list(tmp_path.glob("*.tmp*"))
