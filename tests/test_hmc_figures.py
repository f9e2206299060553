"""dualflow.hmc.figures: the pieces of Figs. 2-3 that scripts/visualize.py and
notebooks/hmc_beliefs.ipynb share (the script's end-to-end run on Boston is in
tests/test_hmc.py)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from flax import nnx

from dualflow import nn as dnn
from dualflow.hmc import (
    HMCResult,
    figures,
    gaussian_log_prior,
    regression_potential,
    sample_with_diagnostics,
)

RECORD_KEYS = {
    "figure",
    "max_rhat",
    "min_ess",
    "converged",
    "chains",
    "warmup",
    "draws_per_chain",
    "accept_prob",
    "divergences",
    "seconds",
}


def test_sample_with_diagnostics_prints_and_records(capsys):
    """A standard normal: converged, one printed line with R-hat and ESS, the
    record holds the budget and what extra_fn adds."""
    run = sample_with_diagnostics(
        "normal",
        lambda z: 0.5 * jnp.sum(z**2),
        np.zeros((4, 3)),
        num_warmup=200,
        num_samples=300,
        key=1,
        extra_fn=lambda res: {"mean": float(res.flat.mean())},
    )
    assert run.name == "normal" and run.converged
    assert run.result.samples.shape == (4, 300, 3)
    assert set(run.record) == RECORD_KEYS | {"mean"}
    assert run.record["chains"] == 4 and run.record["warmup"] == 200
    assert run.record["draws_per_chain"] == 300
    assert run.record["max_rhat"] == run.result.max_rhat < 1.1
    out = capsys.readouterr().out
    assert out.startswith("normal: split R-hat ") and "min ESS" in out


def test_unconverged_run_is_flagged_not_raised(capsys):
    """Two chains in modes 20 sd apart: converged False, no exception;
    verbose=False prints nothing."""

    def potential(z):
        return -jnp.logaddexp(
            -0.5 * jnp.sum((z - 10) ** 2), -0.5 * jnp.sum((z + 10) ** 2)
        )

    run = sample_with_diagnostics(
        "stuck",
        potential,
        np.array([[10.0], [-10.0]]),
        num_warmup=50,
        num_samples=50,
        verbose=False,
    )
    assert not run.converged and run.record["converged"] is False
    assert run.result.max_rhat > 1.1
    assert capsys.readouterr().out == ""


def _regressor(d=3, seed=0):
    return dnn.Regressor(d, (8,), rngs=nnx.Rngs(seed), noise_var=0.1)


def test_conditional_potential_is_the_sum_over_label_blocks():
    """U(x_1..x_K) = sum_k U_reg(x_k, y*_k), for one model and for a mixture."""
    d, y_star = 3, np.array([-1.0, 0.5], np.float32)
    log_prior = gaussian_log_prior(np.eye(d), 2.0)
    u = jnp.asarray(np.random.default_rng(0).standard_normal(2 * d), jnp.float32)
    for models, method in (
        ([_regressor(d)], dnn.Method("bp")),
        ([_regressor(d, 1), _regressor(d, 2)], dnn.Method("deterministic")),
    ):
        pot = figures.conditional_potential(models, method, log_prior, y_star)
        ref = regression_potential(
            models if len(models) > 1 else models[0], method, log_prior
        )
        expected = sum(
            float(ref(jnp.append(u[k * d : (k + 1) * d], y_star[k]))) for k in range(2)
        )
        np.testing.assert_allclose(float(pot(u)), expected, rtol=1e-5)


def test_conditional_init_starts_near_inputs_with_close_labels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 4)).astype(np.float32)
    y = np.linspace(-2, 2, 100).astype(np.float32)
    y_star = figures.label_targets(y, (10, 90))
    np.testing.assert_allclose(y_star, np.percentile(y, [10, 90]), rtol=1e-6)
    init = figures.conditional_init(x, y, y_star, 5, rng, nearest=3, jitter=0.0)
    assert init.shape == (5, 8)
    for k, t in enumerate(y_star):
        near = x[np.argsort(np.abs(y - t))[:3]]
        for row in init[:, 4 * k : 4 * k + 4]:
            assert np.any(np.all(np.isclose(near, row), axis=1))


def test_prediction_gap_is_the_rms_over_blocks_and_models(monkeypatch):
    """A stand-in that predicts 0 everywhere: the gaps are -y*_k for every
    draw and model, so the RMS is y_std * sqrt(mean(y*^2))."""
    monkeypatch.setattr(
        figures,
        "predict_means",
        lambda models, method, xs: [np.zeros(len(xs)) for _ in models],
    )
    y_star = np.array([0.0, 1.0], np.float32)
    samples = np.zeros((2, 5, 2 * 3), np.float32)
    res = HMCResult(samples, np.ones(6), np.ones(6), 0.8, 0, 0.0)
    gap = figures.prediction_gap([None, None], None, res, y_star, 2.0)
    assert gap == pytest.approx(2.0 * np.sqrt(0.5))


def test_mixture_pieces_shapes_and_prior_coordinates():
    rng = np.random.default_rng(0)
    x, y = figures.mixture_data(rng, n_per=50)
    assert x.shape == (150, 2) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [50, 50, 50]
    for k, m in enumerate(figures.MIXTURE_MEANS):
        np.testing.assert_allclose(x[y == k].mean(0), m, atol=0.3)
    center, scale = x.mean(0), 2.0 * x.std(0)
    init = figures.class_block_init(x, y, [0, 2], center, scale, 3, rng, jitter=0.0)
    assert init.shape == (3, 4)
    back = init.reshape(3, 2, 2) * scale + center
    assert all(
        np.any(np.all(np.isclose(x[y == k], back[c, i], atol=1e-5), axis=1))
        for c in range(3)
        for i, k in enumerate((0, 2))
    )
    model = dnn.MLP((2, 8, 3), rngs=nnx.Rngs(0))
    pot = figures.class_block_potential(model, dnn.Method("bp"), [0, 2], center, scale)
    assert np.isfinite(float(pot(jnp.asarray(init[0], jnp.float32))))


def test_boston_study_and_figure_on_synthetic_data():
    """boston_study end to end on a small synthetic regression split (tiny
    budget): two runs with records, both starting from the same points; the
    figure has the 2 x 2 panels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -0.5, 0.2]) + 0.1 * rng.standard_normal(64)).astype(
        np.float32
    )
    split = types.SimpleNamespace(x_train=x, y_train=y, y_mean=20.0, y_std=5.0)
    study = figures.boston_study(
        split, epochs=2, chains=2, num_warmup=20, num_samples=20, verbose=False
    )
    assert [r.name for r in study.runs] == ["boston_bp", "boston_two_networks"]
    for run in study.runs:
        assert run.result.samples.shape == (2, 20, 5 * 3)
        assert len(run.record["y_star"]) == 5
        assert run.record["rms_prediction_minus_label"] >= 0
    fig = figures.plot_boston(
        x, study.y_star, study.panels, y_mean=20.0, y_std=5.0, rng=study.rng
    )
    assert len(fig.axes) >= 4
    plt.close(fig)


def test_mixture_study_and_figure():
    study = figures.mixture_study(
        epochs=2, chains=2, num_warmup=20, num_samples=20, verbose=False
    )
    assert study.run.name == "mixture"
    assert study.samples.shape == (2 * 20, 3, 2)
    fig = figures.plot_mixture(
        study.x, study.y, study.model, study.method, study.samples
    )
    assert len(fig.axes) == 2
    plt.close(fig)


def test_conditional_potential_of_a_sampling_method_is_deterministic():
    """reparam needs a fixed key: then the potential is a function of u."""
    d, y_star = 3, np.array([0.0, 1.0], np.float32)
    pot = figures.conditional_potential(
        [_regressor(d)],
        dnn.Method("reparam"),
        gaussian_log_prior(np.eye(d)),
        y_star,
        key=jax.random.key(0),
        num_samples=4,
    )
    u = jnp.linspace(-1.0, 1.0, 2 * d)
    assert np.isfinite(float(pot(u))) and float(pot(u)) == float(pot(u))
