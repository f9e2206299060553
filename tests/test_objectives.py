"""Heads and objectives against closed forms, quadrature and Monte Carlo."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualflow import Gaussian, objectives


def test_gaussian_nll_is_predictive_density(x64):
    pred = Gaussian(jnp.array([0.5, -1.0]), jnp.array([0.2, 0.0]))
    y = jnp.array([1.0, -0.5])
    nll = objectives.gaussian_nll(pred, y, 0.3)
    s = pred.var + 0.3
    ref = 0.5 * jnp.log(2 * math.pi * s) + (y - pred.mean) ** 2 / (2 * s)
    np.testing.assert_allclose(nll, ref, rtol=1e-14)
    # = -log of the marginal of y = x + noise, x ~ N(m, P): check by quadrature
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    x = pred.mean[0] + np.sqrt(pred.var[0]) * z
    dens = np.sum(w * np.exp(-((y[0] - x) ** 2) / 0.6) / np.sqrt(2 * np.pi * 0.3))
    np.testing.assert_allclose(nll[0], -np.log(dens), rtol=1e-10)


def test_heteroscedastic_nll_uses_lognormal_mean():
    pred = Gaussian(jnp.zeros(2), jnp.zeros(2))
    log_noise = Gaussian(jnp.log(jnp.array([0.5, 2.0])), jnp.array([0.0, 0.2]))
    nll = objectives.heteroscedastic_nll(pred, log_noise, jnp.ones(2))
    noise = jnp.array([0.5, 2.0 * math.exp(0.1)])
    ref = objectives.gaussian_nll(pred, jnp.ones(2), noise)
    np.testing.assert_allclose(nll, ref, rtol=1e-6)


def test_probit_softmax_binary_matches_quadrature(x64):
    """Two classes: softmax over (z, 0) is sigmoid(z); the probit approximation of
    E[sigmoid(z)] is within 0.02 of the exact value, and exact at P = 0."""
    z, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    worst = 0.0
    for m in [-3.0, -1.0, 0.0, 0.5, 2.0]:
        for P in [0.0, 0.5, 2.0, 10.0]:
            logits = Gaussian(jnp.array([m, 0.0]), jnp.array([P, 0.0]))
            p = objectives.probit_softmax(logits)
            exact = np.sum(w / (1 + np.exp(-(m + np.sqrt(P) * z))))
            worst = max(worst, abs(float(p[0]) - exact))
            if P == 0.0:
                np.testing.assert_allclose(p[0], exact, rtol=1e-10)
    assert worst < 0.02, worst


def test_expected_log_softmax_second_order_matches_mc(x64):
    """E[log softmax(z)] vs Monte Carlo: the second-order error is O(P^2)."""
    key = jax.random.PRNGKey(0)
    m = jnp.array([1.0, -0.5, 0.3, 0.0])
    errs = []
    for P in [0.2, 0.05]:
        logits = Gaussian(m, P * jnp.array([1.0, 0.5, 2.0, 1.5]))
        approx = objectives.expected_log_softmax(logits)
        zs = logits.sample(key, (400_000,))
        lsm = jax.nn.log_softmax(zs)
        mc = lsm.mean(0)
        se = lsm.std(0) / math.sqrt(zs.shape[0])
        err = float(jnp.max(jnp.abs(approx - mc)))
        errs.append(err)
        assert err < 5 * float(jnp.max(se)) + 2 * P**2, (P, err)
    assert errs[1] < errs[0]


def test_categorical_nll_methods():
    logits = Gaussian(jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 0.0, 0.0]]))
    labels = jnp.array([0])
    ref = -jax.nn.log_softmax(logits.mean)[0, 0]
    for method in ["probit", "second_order", "mean"]:
        np.testing.assert_allclose(
            objectives.categorical_nll(logits, labels, method=method), [ref], rtol=1e-6
        )
    noisy = Gaussian(logits.mean, jnp.ones((1, 3)))
    # variance pulls the probit prediction towards uniform: NLL of the top class up
    assert objectives.categorical_nll(noisy, labels)[0] > ref
    with pytest.raises(ValueError, match="method"):
        objectives.categorical_nll(logits, labels, method="exact")
    with pytest.raises(ValueError, match="labels"):
        objectives.categorical_nll(logits, jnp.array([0, 1]))


def test_kl_and_neg_elbo(x64):
    qm = jnp.array([0.1, -0.3, 0.5])
    qv = jnp.array([0.2, 0.5, 1.5])
    kl = objectives.kl_mean_field(qm, qv, 0.0, 2.0)
    ref = sum(Gaussian(qm, qv).kl(Gaussian(jnp.zeros(3), 2 * jnp.ones(3))))
    np.testing.assert_allclose(kl, ref, rtol=1e-12)
    tree = {"a": Gaussian(qm, qv), "b": [Gaussian(qm[:2], qv[:2])]}
    tot = objectives.kl_divergence(tree, prior_var=2.0)
    np.testing.assert_allclose(
        tot, kl + objectives.kl_mean_field(qm[:2], qv[:2], 0.0, 2.0), rtol=1e-12
    )
    # KL vs Monte Carlo of log q - log p
    g = Gaussian(qm, qv)
    s = g.sample(jax.random.PRNGKey(1), (200_000,))
    lr = g.log_prob(s).sum(-1) - Gaussian(jnp.zeros(3), 2 * jnp.ones(3)).log_prob(
        s
    ).sum(-1)
    assert abs(float(lr.mean()) - float(kl)) < 5 * float(lr.std()) / math.sqrt(2e5)
    np.testing.assert_allclose(objectives.neg_elbo(1.5, 10.0, 100, 0.5), 1.55)
    with pytest.raises(ValueError):
        objectives.neg_elbo(1.0, 1.0, 0)
