"""Recurrent-network studies (issue 20): data builders and a quick end-to-end run
of :mod:`dualflow.benchmarks.sequence` (``scripts/sequence.py --quick``)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from dualflow.benchmarks import sequence as seq
from dualflow.errors import DataError


def test_adding_problem_markers_and_target():
    """Exactly two markers, one per half; target = sum of the marked values."""
    for t in (2, 7, 100):
        x, y = seq.adding_problem(64, t, np.random.default_rng(t))
        assert x.shape == (64, t, 2) and y.shape == (64, 1)
        assert x.dtype == np.float32 and y.dtype == np.float32
        v, m = x[..., 0], x[..., 1]
        assert np.all((v >= 0) & (v <= 1))
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert np.all(m.sum(1) == 2)
        half = t // 2
        assert np.all(m[:, :half].sum(1) == 1) and np.all(m[:, half:].sum(1) == 1)
        np.testing.assert_allclose(y[:, 0], (v * m).sum(1), rtol=1e-6)


def test_adding_problem_baseline_mse():
    _, y = seq.adding_problem(20000, 50, np.random.default_rng(0))
    assert abs(float(np.mean((y - 1.0) ** 2)) - 1 / 6) < 0.01


def test_adding_problem_rejects_short():
    with pytest.raises(ValueError, match="seq_len"):
        seq.adding_problem(4, 1, np.random.default_rng(0))


def test_mnist_rows_sequential_and_permuted():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    rows = seq.mnist_rows(images)
    assert rows.shape == (5, 28, 28) and rows.dtype == np.float32
    np.testing.assert_allclose(
        rows, images[..., 0] / 255.0, rtol=1e-6
    )  # row t = image row t
    perm = seq.pixel_permutation(784, seed=3)
    np.testing.assert_array_equal(perm, seq.pixel_permutation(784, seed=3))  # fixed
    p = seq.mnist_rows(images, perm)
    assert p.shape == (5, 28, 28)
    flat = images.reshape(5, -1) / 255.0
    np.testing.assert_allclose(p.reshape(5, -1), flat[:, perm], rtol=1e-6)
    for i in range(5):  # a permuted sequence is a permutation of the pixels
        np.testing.assert_allclose(np.sort(p[i].ravel()), np.sort(flat[i]), rtol=1e-6)
    assert not np.allclose(p, rows)
    with pytest.raises(ValueError, match="permut"):
        seq.mnist_rows(images, np.zeros(784, int))


def _finite(r, fields):
    for f in fields:
        assert isinstance(r[f], float) and math.isfinite(r[f]), (f, r[f])


def test_quick_studies_end_to_end(tmp_path):
    """Both quick studies through the library (~30 s on 2 cores): adding with
    every method; sequential MNIST with every regulariser, then permuted MNIST
    with ``bp`` in a second call that must skip the finished record, then a
    ``rerun`` of one adding record that must replace only it."""
    adding, mnist = seq.quick_configs()
    mnist = dataclasses.replace(mnist, tasks=("sequential_mnist",))
    logs: list[str] = []
    seq.run_study(tmp_path, adding=adding, mnist=mnist, command="test", log=logs.append)
    mnist2 = dataclasses.replace(mnist, tasks=seq.MNIST_TASKS, methods=("bp",))
    doc = seq.run_study(
        tmp_path, adding=None, mnist=mnist2, command="test", log=logs.append
    )
    assert any("skip sequential_mnist bp" in s for s in logs)
    assert doc["commands"] == ["test", "test"]
    before = {seq.record_key(r): r["seconds"] for r in doc["records"]}
    det = dataclasses.replace(adding, methods=("deterministic",))
    doc = seq.run_study(
        tmp_path, adding=det, mnist=None, command="test", rerun=True, log=logs.append
    )
    after = {seq.record_key(r): r["seconds"] for r in doc["records"]}
    assert after.keys() == before.keys()  # rerun replaces, keeps the others
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {("adding", "deterministic", 10, 0)}

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["complete"] and on_disk["records"] == doc["records"]
    assert on_disk["adding"]["seq_lens"] == [10] and on_disk["mnist"]["depth"] == 2
    assert (tmp_path / "results.md").exists()
    assert (tmp_path / "adding_mse.png").stat().st_size > 0
    assert (tmp_path / "mnist.png").stat().st_size > 0
    recs = doc["records"]
    assert len({seq.record_key(r) for r in recs}) == len(recs) == 3 + 4 + 1

    add = [r for r in recs if r["task"] == "adding"]
    assert sorted(r["method"] for r in add) == sorted(seq.ADDING_METHODS)
    for r in add:
        assert {
            "task",
            "method",
            "seq_len",
            "seed",
            "test_mse",
            "test_nll",
            "seconds",
        } <= set(r)
        assert r["seq_len"] == 10 and r["steps"] == 100
        _finite(r, ["test_mse", "test_nll", "seconds"])
        c = r["curve"]
        assert c["step"][0] == 0 and c["step"][-1] == 100
        assert all(math.isfinite(v) for v in c["test_mse"])
        assert c["test_mse"][-1] < c["test_mse"][0]  # learned something
        assert r["test_mse"] < 0.3  # near the predict-the-mean baseline or better

    mn = [r for r in recs if r["task"] != "adding"]
    assert {(r["task"], r["method"]) for r in mn} == {
        *(("sequential_mnist", m) for m in seq.MNIST_METHODS),
        ("permuted_mnist", "bp"),
    }
    for r in mn:
        assert r["seq_len"] == 28 and r["seed"] == 0
        _finite(r, ["test_accuracy", "test_nll", "test_ece", "seconds"])
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_ece"] <= 1.0
        assert r["n_test"] == 1000 and r["n_train"] + r["n_val"] == 4000
    md = (tmp_path / "results.md").read_text()
    assert "Adding problem" in md and "permuted_mnist" in md

    # records computed on other data are never reused: refused, file unchanged
    assert all(len(r["data_fingerprint"]) == 16 for r in mn)
    tampered = next(r for r in on_disk["records"] if r["task"] == "sequential_mnist")
    tampered["data_fingerprint"] = "0" * 16
    path = tmp_path / "results.json"
    path.write_text(json.dumps(on_disk))
    before = path.read_bytes()
    with pytest.raises(DataError, match="computed on other mnist_5k data"):
        seq.run_study(tmp_path, adding=None, mnist=mnist2, command="t", log=logs.append)
    assert path.read_bytes() == before


def test_script_rejects_bad_flags_with_one_error_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "sequence.py"
    for flag, msg in (
        ("--studies=bogus", "error: --studies: unknown 'bogus'; choose from adding"),
        ("--adding_steps=5", "error: --adding_steps: T:steps pairs"),
        ("--mnist_seeds=a", "error: --mnist_seeds: 'a' is not an integer"),
    ):
        proc = subprocess.run(
            [sys.executable, str(script), flag, f"--out_dir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (flag, proc.stderr[-500:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(msg), lines
    assert not list(tmp_path.iterdir())  # nothing written
