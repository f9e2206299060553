"""App. E.2 sanity check: bp beliefs vs an ensemble of sampled networks."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow.hmc import sanity
from dualflow.nn import Method, Regressor, apply


def _x(n, d, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


def tol(n):
    """5 sd of a Gaussian sample variance's relative error from ``n`` draws."""
    return 5 * math.sqrt(2 / n)


def _relu_model():
    return Regressor(3, (16, 16), 1, init_var=1e-2, noise_var=0.1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_functional_forward_matches_nn_apply(mode, activation):
    model = Regressor(
        3, (16, 16), 1, activation=activation, init_var=1e-2, rngs=nnx.Rngs(0)
    )
    x = _x(10, 3)
    ref = apply(model, x, Method("bp", mode=mode))
    names = []
    got = sanity.bp_forward(
        model, x, mode=mode, tap=lambda name, g: (names.append(name), g)[1]
    )
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-5, atol=1e-8)
    assert names == ["dense0", "act0", "dense1", "act1", "out"]


def test_linear_network_filter_is_exact_up_to_mc_error():
    # Point input, identity activation, two dense layers: every tapped unit is
    # a sum of independent products, so the diagonal bp moments are exact.
    kw = dict(activation="identity", init_var=0.3, noise_var=0.5)
    model = Regressor(3, (8,), 1, rngs=nnx.Rngs(1), **kw)
    x, y = _x(8, 3, seed=1), _x(8, 1, seed=2)
    S = 20000
    res = sanity.compare_with_sampled_networks(
        model, x, y, num_networks=S, key=jax.random.key(0)
    )
    json.dumps(res)  # plain numbers only
    assert res["num_networks"] == S and res["n"] == 8
    layers = {r["name"]: r for r in res["layers"]}
    assert list(layers) == ["dense0", "act0", "out"]
    for r in layers.values():
        assert r["filter_mean_z"] < 1.5, r
        assert abs(r["filter_var_ratio"] - 1) < tol(S), r
        assert all(np.isfinite(v) for k, v in r.items() if k != "name")
    assert 1 <= res["is_ess_min"] <= res["is_ess_median"] <= S


def test_linear_gaussian_smoothing_is_exact_conditioning():
    # One dense layer from a point input: the output is exactly Gaussian, so
    # its smoothed belief is Gaussian conditioning on y with the noise.
    noise_var = 0.2
    model = Regressor(4, (), 1, init_var=1.0, noise_var=noise_var, rngs=nnx.Rngs(2))
    x = _x(1, 4, seed=3)
    prior = apply(model, x, Method("bp"))
    m, P = float(prior.mean[0, 0]), float(prior.var[0, 0])
    y = jnp.full((1, 1), m + 1.0 * math.sqrt(P), jnp.float32)
    k = P / (P + noise_var)
    post_mean, post_var = m + k * (float(y[0, 0]) - m), (1 - k) * P

    bel = sanity.bp_beliefs(model, x, y)
    np.testing.assert_allclose(bel.smoothed["out"].mean[0, 0], post_mean, rtol=1e-5)
    np.testing.assert_allclose(bel.smoothed["out"].var[0, 0], post_var, rtol=1e-4)

    S = 20000
    res = sanity.compare_with_sampled_networks(
        model, x, y, num_networks=S, key=jax.random.key(1)
    )
    (r,) = res["layers"]
    assert r["name"] == "out"
    ess = res["is_ess_min"]
    assert ess > S / 10  # y one prior std from the mean: weights are benign
    # importance-sampling errors: mean ~ N(0, post_var / ESS); var ~ rel. sd
    # sqrt(2 / ESS) for a Gaussian target
    assert r["filter_mean_z"] < 4 and abs(r["filter_var_ratio"] - 1) < tol(S)
    assert r["smooth_mean_z"] < 4, r
    assert abs(r["smooth_var_ratio"] - 1) < tol(ess), r
    assert r["smooth_mean_rel"] < 4 / math.sqrt(ess)


def test_relu_network_runs_and_is_close():
    # An approximation check, not exactness: ReLU beliefs are linearised and
    # covariances between units dropped, so bp only approximates the ensemble.
    model = _relu_model()
    x, y = _x(16, 3, seed=4), _x(16, 1, seed=5)
    res = sanity.compare_with_sampled_networks(
        model, x, y, num_networks=2000, key=jax.random.key(2)
    )
    json.dumps(res)
    names = [r["name"] for r in res["layers"]]
    assert names == ["dense0", "act0", "dense1", "act1", "out"]
    for r in res["layers"]:
        assert all(np.isfinite(v) for k, v in r.items() if k != "name"), r
        assert 0.3 < r["filter_var_ratio"] < 3, r
        assert 0.3 < r["smooth_var_ratio"] < 3, r
        assert r["smooth_mean_rel"] < 1.0, r  # within a posterior sd
    assert np.isfinite(res["is_ess_median"]) and res["is_ess_min"] >= 1


def test_rejects_heteroscedastic_regressor():
    model = Regressor(2, (4,), 1, heteroscedastic=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="homoscedastic"):
        sanity.compare_with_sampled_networks(
            model, _x(2, 2), _x(2, 1), num_networks=10, key=jax.random.key(0)
        )
