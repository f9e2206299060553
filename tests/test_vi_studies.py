"""dualflow.vi (ELBO terms of the VI report) and the quick modes of
scripts/mnist_vi.py and scripts/sine_vi.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow import nn as dnn
from dualflow import objectives, vi

REPO = Path(__file__).resolve().parents[1]


def _dense(seed=0, d_in=3, init_var=0.05):
    return dnn.MLP(
        (d_in, 1),
        init_var=init_var,
        prior_var=1.0,
        var_scaling="none",
        mean_init="lecun",
        rngs=nnx.Rngs(seed),
    )


def test_expected_log_likelihood_matches_closed_form_linear_gaussian():
    """One Bayesian dense layer ``f = x.w + b``: under q, ``f ~ N(m_f, v_f)``
    with ``m_f = x.mu + mu_b`` and ``v_f = x^2.sigma^2 + sigma_b^2``, so
    ``E_q log N(y; f, s) = -log(2 pi s)/2 - ((y - m_f)^2 + v_f) / (2 s)``
    and ``Var_q = (4 d^2 v_f + 2 v_f^2) / (4 s^2)`` with ``d = y - m_f``.
    The Monte Carlo mean of S draws must lie within 5 standard errors."""
    model = _dense()
    x = jax.random.normal(jax.random.key(1), (6, 3))
    y = jax.random.normal(jax.random.key(2), (6, 1))
    s, S = 0.3, 4000
    lik = dnn.Likelihood("gaussian", noise_var=s)
    ll = vi.expected_log_likelihood(
        model, x, y, jax.random.key(3), likelihood=lik, num_samples=S
    )
    assert ll.shape == (S, 6)
    layer = model.net.layers[0]
    wm, wv = layer.moments_of("kernel")
    bm, bv = layer.moments_of("bias")
    mf = x @ wm + bm
    vf = (x * x) @ wv + bv
    d = y - mf
    exact = (-0.5 * math.log(2 * math.pi * s) - (d**2 + vf) / (2 * s))[:, 0]
    se = jnp.sqrt((4 * d**2 * vf + 2 * vf**2) / (4 * s**2) / S)[:, 0]
    np.testing.assert_array_less(np.abs(ll.mean(0) - exact), 5 * se)


def test_categorical_log_likelihood_of_point_weights():
    """With (numerically) zero variance every draw is the mean network."""
    model = dnn.MLP((4, 5, 3), init_var=1e-30, var_scaling="none", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (7, 4))
    y = jnp.arange(7) % 3
    ll = vi.expected_log_likelihood(model, x, y, jax.random.key(1), num_samples=3)
    logits = dnn.apply(model, x, dnn.Method("deterministic"))
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
    np.testing.assert_allclose(ll, jnp.broadcast_to(want, (3, 7)), atol=1e-5)


def test_elbo_terms_and_report_conventions():
    ll = jnp.array([[-1.0, -2.0], [-3.0, -2.0]])
    t = vi.elbo_terms(ll, jnp.float32(50.0), n_data=10, kl_weight=0.1)
    assert float(t["log_likelihood"]) == pytest.approx(-2.0)
    assert float(t["elbo"]) == pytest.approx(-2.0 - 0.1 * 50 / 10)
    assert float(t["elbo_total"]) == pytest.approx(10 * (-2.5))
    # report, Table 1 (iteration 0 / 1000 test) and Table 2 (iteration 50000)
    for elbo, ev in ((-5.56209, 0.57338), (-2.91372, 0.74724), (-0.04507, 0.99550)):
        assert float(vi.mean_approximate_evidence(elbo)) == pytest.approx(ev, abs=6e-6)


def test_report_kl_is_kl_per_leading_dimension():
    model = dnn.MLP(
        (5, 4, 2),
        init_var=0.02,
        prior_var=3.0,  # report_kl always uses N(0, 1)
        var_scaling="none",
        rngs=nnx.Rngs(0),
    )
    want = 0.0
    for layer in (model.net.layers[0], model.net.layers[2]):
        for name in ("kernel", "bias"):
            m, v = layer.moments_of(name)
            want += float(objectives.kl_mean_field(m, v, 0.0, 1.0)) / m.shape[0]
    assert float(vi.report_kl(model)) == pytest.approx(want, rel=1e-6)


def _run(script: str, out: Path) -> dict:
    """Run a study's ``--quick`` mode in a subprocess; its results.json."""
    cmd = [sys.executable, str(REPO / "scripts" / script), "--quick"]
    cmd.append(f"--out_dir={out}")
    if script == "mnist_vi.py":
        cmd.append("--noprogress")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    return json.loads((out / "results.json").read_text())


def test_mnist_vi_quick(tmp_path):
    res = _run("mnist_vi.py", tmp_path)
    for k in (
        "dataset",
        "dataset_note",
        "batch_size",
        "adam_lr",
        "ng_lr",
        "seeds",
        "command",
        "wall_seconds",
        "git_commit",
    ):
        assert k in res
    recs = [r for r in res["records"] if r["split"] == "test"]
    assert {r["method"] for r in recs} == {"reparam", "bp", "bp_ng"}
    for r in recs:
        for k in (
            "method",
            "iteration",
            "test_accuracy",
            "test_nll",
            "ece",
            "elbo",
            "elbo_total",
            "log_likelihood",
            "kl",
            "mean_evidence",
            "seconds_per_iteration",
        ):
            assert k in r
        assert math.isfinite(r["test_nll"]) and r["test_nll"] > 0
        assert 0 <= r["ece"] <= 1 and r["kl"] > 0
        assert 0 < r["mean_evidence"] < 1  # exp of a negative ELBO
    last = [r for r in recs if r["iteration"] == res["iterations"]]
    # 12 steps of batch 128 on digits: far above chance (0.1) for every method
    assert all(r["test_accuracy"] > 0.3 for r in last)
    assert (tmp_path / "results.md").is_file()
    assert (tmp_path / "curves.png").is_file()


def test_sine_vi_quick(tmp_path):
    res = _run("sine_vi.py", tmp_path)
    recs = res["records"]
    assert {(r["method"], r["beta"]) for r in recs} == {
        (m, b) for m in ("reparam", "bp") for b in (1.0, 1e-4)
    }
    for r in recs:
        for k in ("test_rmse", "test_nll", "mean_predictive_std", "kl", "elbo"):
            assert math.isfinite(r[k])
        # the predictive includes the observation noise (std 0.1)
        assert r["mean_predictive_std"] >= 0.1 * (1 - 1e-5)
    assert (tmp_path / "predictive.png").is_file()
