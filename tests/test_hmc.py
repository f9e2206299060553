"""HMC over a network's observation density: sampler, diagnostics, potentials,
and the visualisation script."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow import nn as dnn
from dualflow.hmc import (
    NotConvergedError,
    check_converged,
    class_log_prob_fn,
    classification_potential,
    gaussian_log_prior,
    regression_potential,
    run_hmc,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("DUALFLOW_DATA_DIR", str(REPO.parent / "shared" / "data"))
HAVE_BOSTON = (pathlib.Path(DATA_DIR) / "uci" / "boston" / "data.txt").is_file()


def test_nuts_recovers_a_correlated_gaussian():
    """Mean and covariance of N(mu, C) within 5 Monte Carlo standard errors,
    the errors computed from the sampler's own effective sample size."""
    mu = jnp.array([1.0, -2.0])
    cov = np.array([[1.0, 0.8], [0.8, 2.0]])
    prec = jnp.asarray(np.linalg.inv(cov))

    def potential(z):
        return 0.5 * (z - mu) @ prec @ (z - mu)

    res = run_hmc(potential, jnp.zeros((4, 2)), num_warmup=400, num_samples=800)
    assert res.max_rhat < 1.05 and res.divergences == 0
    ess = res.min_ess
    assert ess > 500
    z = res.flat
    se_mean = np.sqrt(np.diag(cov) / ess)
    np.testing.assert_array_less(np.abs(z.mean(0) - np.asarray(mu)), 5 * se_mean)
    emp = np.cov(z.T)
    # SE of a sample covariance entry: sqrt((C_ii C_jj + C_ij^2) / ESS)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / ess)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se_cov)


def test_chains_stuck_in_different_modes_are_detected():
    """Two modes 20 sd apart, one chain started in each: R-hat is large and
    check_converged refuses (unless forced)."""

    def potential(z):
        a = -0.5 * jnp.sum((z - 10.0) ** 2)
        b = -0.5 * jnp.sum((z + 10.0) ** 2)
        return -jnp.logaddexp(a, b)

    init = jnp.array([[10.0, 10.0], [-10.0, -10.0], [10.0, 9.0], [-10.0, -9.0]])
    res = run_hmc(potential, init, num_warmup=100, num_samples=100)
    assert res.max_rhat > 2.0
    with pytest.raises(NotConvergedError, match="R-hat"):
        check_converged(res, 1.1)
    assert check_converged(res, 1.1, force=True) is False


def test_run_hmc_input_errors():
    with pytest.raises(ValueError, match="chains"):
        run_hmc(lambda z: jnp.sum(z**2), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="kernel"):
        run_hmc(lambda z: jnp.sum(z**2), jnp.zeros((2, 2)), kernel="mala")


def test_regression_potential_is_the_closed_form_predictive():
    model = dnn.Regressor(3, (8,), rngs=nnx.Rngs(0), noise_var=0.3)
    method = dnn.Method("bp")
    cov = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.1], [0.0, 0.1, 1.0]])
    pot = regression_potential(model, method, gaussian_log_prior(cov, 2.0))
    z = jnp.array([0.3, -0.5, 1.0, 0.7])
    out = dnn.apply(model, z[None, :3], method)
    v = float(out.var[0, 0]) + 0.3
    m = float(out.mean[0, 0])
    ll = -0.5 * (math.log(2 * math.pi * v) + (0.7 - m) ** 2 / v)
    x = np.asarray(z[:3])
    prior = -0.5 * x @ np.linalg.inv(4.0 * cov) @ x
    np.testing.assert_allclose(float(pot(z)), -(ll + prior), rtol=1e-5)
    # two models: the equal-weight mixture of their predictive densities
    other = dnn.Regressor(3, (8,), rngs=nnx.Rngs(1), noise_var=0.3)
    pot2 = regression_potential([model, other], method, gaussian_log_prior(cov, 2.0))
    out2 = dnn.apply(other, z[None, :3], method)
    v2, m2 = float(out2.var[0, 0]) + 0.3, float(out2.mean[0, 0])
    ll2 = -0.5 * (math.log(2 * math.pi * v2) + (0.7 - m2) ** 2 / v2)
    mix = np.logaddexp(ll, ll2) - math.log(2)
    np.testing.assert_allclose(float(pot2(z)), -(mix + prior), rtol=1e-5)


def test_classification_potential_in_a_latent_basis():
    model = dnn.MLP((4, 8, 3), rngs=nnx.Rngs(0))
    method = dnn.Method("bp")
    log_probs = class_log_prob_fn(model, method)
    origin = jnp.array([0.1, 0.2, 0.3, 0.4])
    basis = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)), jnp.float32)
    pot = classification_potential(log_probs, 2, origin=origin, basis=basis)
    u = jnp.array([0.5, -1.0])
    x = origin + basis @ u
    probs = dnn.predict(model, x[None], method=method).probs[0]
    expected = -math.log(float(probs[2])) + 0.5 * float(u @ u)
    np.testing.assert_allclose(float(pot(u)), expected, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(log_probs(x))).sum(), 1.0, rtol=1e-5)


def _visualize(tmp_path, *args):
    env = {**os.environ, "DUALFLOW_DATA_DIR": DATA_DIR}
    cmd = [sys.executable, str(REPO / "scripts" / "visualize.py"), f"--out={tmp_path}"]
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.skipif(not HAVE_BOSTON, reason=f"Boston not found under {DATA_DIR}/uci")
def test_boston_quick_pipeline(tmp_path):
    """The Fig. 2 pipeline end to end in --quick mode: figure, R-hat/ESS
    records for both networks, the App. E.2 sanity check."""
    out = _visualize(tmp_path, "--figures=boston", "--quick")
    assert out.returncode == 0, out.stderr[-3000:]
    png = (tmp_path / "boston.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 50_000
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    recs = {r["figure"]: r for r in diag["records"]}
    assert set(recs) == {"boston_bp", "boston_two_networks"}
    for r in recs.values():
        assert r["converged"] and r["max_rhat"] <= 1.1 and r["min_ess"] > 20
        assert len(r["y_star"]) == 5
    sanity = json.loads((tmp_path / "sanity.json").read_text())
    for mode in ("linearized", "matched"):
        layers = sanity[mode]["layers"]
        assert [la["name"] for la in layers] == ["dense0", "act0", "out"]
        assert all(
            np.isfinite(v) for la in layers for k, v in la.items() if k != "name"
        )
        # the first layer's filter belief is exact (fixed inputs, independent
        # weights): its variance ratio to 2000 sampled networks is 1 +- 5 SE
        assert abs(layers[0]["filter_var_ratio"] - 1) < 5 * math.sqrt(2 / 2000)


def test_unconverged_figure_is_not_drawn(tmp_path):
    """An impossible R-hat threshold: the figure is refused with a clear
    message and exit code 1, the diagnostics are still written; --force draws."""
    args = ["--figures=mixture", "--quick", "--warmup=30", "--samples=30"]
    out = _visualize(tmp_path, *args, "--max_rhat=0.5")
    assert out.returncode == 1
    assert "not converged" in out.stderr and "--force" in out.stderr
    assert not (tmp_path / "mixture.png").exists()
    rec = json.loads((tmp_path / "diagnostics.json").read_text())["records"][0]
    assert rec["figure"] == "mixture" and rec["converged"] is False
    forced = _visualize(tmp_path, *args, "--max_rhat=0.5", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (tmp_path / "mixture.png").exists()


def test_input_prior_is_the_scaled_training_covariance():
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    lp = gaussian_log_prior(cov, 3.0)
    x = jnp.array([0.7, -1.2])
    expected = -0.5 * np.asarray(x) @ np.linalg.inv(9.0 * cov) @ np.asarray(x)
    np.testing.assert_allclose(float(lp(x)), expected, rtol=1e-5)
    assert jax.grad(lp)(x).shape == (2,)
