"""The duality made visible: smoothed moments read off the BP backward pass equal
exact Gaussian smoothing (RTS) where the moment network is exactly Gaussian-linear.

A dense network with diagonal weight means, zero weight variance and noisy
biases is the Gaussian chain x_l = D_l x_{l-1} + b_l, b_l ~ N(β_l, Q_l) with
diagonal D_l and Q_l: all covariances stay diagonal, so dualflow's element-wise
moments are exact and Theorem 1(3) must reproduce the RTS smoother exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualflow import Gaussian, moments, objectives, pgm, smoothing


def _setup(key, dims=(3, 3, 3, 3), noise=0.3):
    ks = jax.random.split(key, 4 * len(dims) + 3)
    d = dims[0]
    layers = []
    for i in range(len(dims) - 1):
        diag = jax.random.uniform(ks[4 * i], (d,), minval=-1.5, maxval=1.5)
        layers.append(
            dict(
                w_mean=jnp.diag(diag),
                w_var=jnp.zeros((d, d)),
                b_mean=0.3 * jax.random.normal(ks[4 * i + 1], (d,)),
                b_var=jax.random.uniform(ks[4 * i + 2], (d,), minval=0.1, maxval=0.8),
            )
        )
    x0 = Gaussian(
        jax.random.normal(ks[-3], (d,)),
        jax.random.uniform(ks[-2], (d,), minval=0.05, maxval=0.5),
    )
    y = jax.random.normal(ks[-1], (d,))
    chain = pgm.GaussianChain(
        m0=x0.mean,
        P0=jnp.diag(x0.var),
        Fs=[p["w_mean"].T for p in layers],
        bs=[p["b_mean"] for p in layers],
        Qs=[jnp.diag(p["b_var"]) for p in layers],
        H=jnp.eye(d),
        c=jnp.zeros(d),
        R=noise * jnp.eye(d),
    )
    return layers, x0, y, chain, noise


def _nll(layers, x0, y, noise, backward, tap):
    h = tap("x0", x0)
    for i, p in enumerate(layers):
        h = moments.dense(h, **p, backward=backward)
        h = tap(f"x{i + 1}", moments.identity(h, backward=backward))
    return objectives.gaussian_nll(h, y, noise).sum()


@pytest.mark.parametrize("backward", ["bp", "autodiff"])
def test_smoothed_moments_equal_rts(backward, x64):
    layers, x0, y, chain, noise = _setup(jax.random.PRNGKey(0))
    res = smoothing.posterior_moments(_nll, layers, x0, y, noise, backward)
    # the loss is exactly -log p(y | x0)
    np.testing.assert_allclose(
        res.loss, -pgm.chain_log_likelihood(chain, y), rtol=1e-12
    )
    ref = pgm.chain_smoother(chain, y)
    worst = 0.0
    for l in range(len(layers) + 1):
        f = res.filtered[f"x{l}"]
        s = res.smoothed[f"x{l}"]
        np.testing.assert_allclose(f.mean, ref.filtered.means[l], rtol=1e-12)
        np.testing.assert_allclose(f.var, jnp.diag(ref.filtered.covs[l]), rtol=1e-12)
        for got, want in [(s.mean, ref.means[l]), (s.var, jnp.diag(ref.covs[l]))]:
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            worst = max(worst, err)
        # Theorem 1(2): canonical gradients = -(smoothed - filtered mean params)
        d_eta, d_lam = smoothing.canonical_gradients(f, res.grads[f"x{l}"])
        np.testing.assert_allclose(d_eta, -(s.mean - f.mean), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            d_lam, -(s.var + s.mean**2 - f.var - f.mean**2), rtol=1e-9, atol=1e-12
        )
    assert worst < 1e-10, worst


def test_smoothed_moments_shrink_towards_observation(x64):
    """Smoothing never increases the variance and moves the last layer's mean
    towards the observation (a Kalman update)."""
    layers, x0, y, chain, noise = _setup(jax.random.PRNGKey(1))
    res = smoothing.posterior_moments(_nll, layers, x0, y, noise, "bp")
    for name, f in res.filtered.items():
        assert bool(jnp.all(res.smoothed[name].var <= f.var + 1e-15)), name
    last = f"x{len(layers)}"
    f, s = res.filtered[last], res.smoothed[last]
    assert bool(jnp.all(jnp.abs(y - s.mean) <= jnp.abs(y - f.mean) + 1e-15))


def test_posterior_moments_errors():
    def twice(x, tap):
        tap("a", x)
        tap("a", x)
        return jnp.sum(x.mean)

    with pytest.raises(ValueError, match="used twice"):
        smoothing.posterior_moments(twice, Gaussian(jnp.zeros(2), jnp.ones(2)))

    def vector(x, tap):
        return tap("a", x).mean

    with pytest.raises(ValueError, match="scalar"):
        smoothing.posterior_moments(vector, Gaussian(jnp.zeros(2), jnp.ones(2)))
