"""dualflow.chain: node distributions and PCFF of the chain-graph paper.

Monte Carlo checks use 5 standard errors estimated from the samples
(:func:`mc_stats`); closed forms are checked against quadrature in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mc_stats import mc_stats
from scipy.integrate import quad
from scipy.stats import norm

import dualflow.nn as dnn
from dualflow import chain
from dualflow.chain import (
    NODES,
    RELU_MAX_ERROR,
    SOFTPLUS_STD,
    PCFFActivation,
    node_mean,
    node_moments,
    node_sample,
    pcff,
    rectified_gaussian_moments,
)

A = np.array([-3.0, -1.5, -0.75, -0.2, 0.0, 0.1, 0.5, 1.0, 2.5])
S = 100_000  # Monte Carlo draws per pre-activation
Z = 5.0  # standard errors allowed
SUPPORT = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}


def _draws(fn, a, n=S, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.vmap(lambda k: fn(jnp.asarray(a), k))(keys))


def test_exports():
    assert chain.pcff is pcff
    import dualflow

    assert dualflow.chain is chain


@pytest.mark.parametrize("alpha,beta", [(-1.0, 1.0), (0.0, 1.0), (-2.0, 3.0)])
def test_binary_mean_is_eq6(alpha, beta, x64):
    # P(X=beta | a) = sigmoid((beta - alpha) a) (Eq. 3); its mean is Eq. 6
    a = jnp.asarray(A)
    p = jax.nn.sigmoid((beta - alpha) * a)
    mean = beta * p + alpha * (1 - p)
    h = (beta - alpha) / 2
    np.testing.assert_allclose(
        mean, h * jnp.tanh(h * a) + (alpha + beta) / 2, atol=1e-14
    )


def test_binary_activation_is_exact_mean(x64):
    a = jnp.asarray(A)
    for name, act in (("tanh", jnp.tanh), ("sigmoid", jax.nn.sigmoid)):
        m, v = node_moments(name, a)
        np.testing.assert_array_equal(node_mean(name, a), act(a))
        np.testing.assert_allclose(m, act(a), atol=1e-15)
        lo, hi = SUPPORT[name]
        np.testing.assert_allclose(v, (hi - m) * (m - lo), atol=1e-15)


@pytest.mark.parametrize("name", NODES)
def test_samples_match_moments(name, x64):
    x = _draws(lambda a, k: node_sample(name, a, k), A)
    mean, var, se_m, se_v = mc_stats(x)
    m, v = (np.asarray(t) for t in node_moments(name, jnp.asarray(A)))
    assert np.all(np.abs(mean - m) <= Z * se_m + 1e-12), (mean, m, se_m)
    assert np.all(np.abs(var - v) <= Z * se_v + 1e-12), (var, v, se_v)
    if name in SUPPORT:
        assert set(np.unique(x)) <= set(SUPPORT[name])
    else:
        assert x.min() >= 0.0


@pytest.mark.parametrize("mu,s", [(0.7, 0.3), (-0.4, 1.2), (2.0, -0.9), (-3.0, 0.5)])
def test_rectified_moments_vs_quadrature(mu, s, x64):
    # integrate over y >= 0 only (max(0, y) is smooth there: no kink error)
    w = lambda y: norm.pdf(y, mu, abs(s))  # noqa: E731
    m1 = quad(lambda y: y * w(y), 0.0, np.inf, epsabs=1e-14, epsrel=1e-13)[0]
    m2 = quad(lambda y: y * y * w(y), 0.0, np.inf, epsabs=1e-14, epsrel=1e-13)[0]
    m, v = rectified_gaussian_moments(jnp.asarray(mu), jnp.asarray(s))
    np.testing.assert_allclose(m, m1, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(v, m2 - m1 * m1, rtol=1e-10, atol=1e-14)


def test_rectified_zero_std_is_point_mass(x64):
    mu = jnp.array([-1.0, 0.0, 2.0])
    m, v = rectified_gaussian_moments(mu, jnp.zeros(3))
    np.testing.assert_array_equal(m, jax.nn.relu(mu))
    np.testing.assert_array_equal(v, 0.0)
    g = jax.grad(lambda u: rectified_gaussian_moments(u, 0.0 * u)[0].sum())(mu)
    assert np.all(np.isfinite(g))


def test_relu_node_approximates_relu(x64):
    # Eq. 11: the mean exceeds relu(a) by an even, non-negative error that
    # vanishes at 0 and infinity and peaks at RELU_MAX_ERROR (|a| ~ 0.7475)
    a = jnp.linspace(-8.0, 8.0, 320_001)
    err = np.asarray(node_moments("relu", a)[0] - node_mean("relu", a))
    assert err.min() >= -1e-15
    np.testing.assert_allclose(err, err[::-1], atol=1e-12)
    assert abs(err.max() - RELU_MAX_ERROR) < 1e-8
    assert abs(abs(float(a[err.argmax()])) - 0.7475) < 1e-3
    assert err[len(err) // 2] == 0.0 and err[0] < 1e-12
    # the paper's comparison: sigmoid-modulated std (Nair & Hinton) is worse
    sig = rectified_gaussian_moments(a, jax.nn.sigmoid(a))[0] - jax.nn.relu(a)
    np.testing.assert_allclose(jnp.max(sig), norm.pdf(0) / 2, rtol=1e-9)


def test_softplus_std_is_minimax(x64):
    # §3: c = 1.776091849725427 minimises max_a |E[max(0, N(a, c^2))] - softplus|
    a = jnp.linspace(-12.0, 12.0, 240_001)

    def max_err(c):
        m = rectified_gaussian_moments(a, jnp.full_like(a, c))[0]
        return float(jnp.max(jnp.abs(m - jax.nn.softplus(a))))

    e = max_err(SOFTPLUS_STD)
    assert abs(e - 0.0154110) < 1e-6
    assert e < max_err(SOFTPLUS_STD - 1e-3) and e < max_err(SOFTPLUS_STD + 1e-3)
    err = node_moments("softplus", a)[0] - node_mean("softplus", a)
    np.testing.assert_allclose(jnp.max(jnp.abs(err)), e, rtol=1e-12)


@pytest.mark.parametrize("name", NODES)
def test_pcff_extremes(name):
    a = jnp.asarray(A, jnp.float32)
    key = jax.random.key(3)
    np.testing.assert_array_equal(pcff(name, a, key, 0.0), node_mean(name, a))
    np.testing.assert_array_equal(pcff(name, a, key, 1.0), node_sample(name, a, key))


@pytest.mark.parametrize("rate", [0.4, 0.75])
def test_pcff_uncollapses_a_rate_fraction(rate):
    # binary samples never equal tanh(a) (|tanh a| < 1): count the sampled nodes
    a = jnp.zeros((400, 500), jnp.float32) + 0.3
    x = pcff("tanh", a, jax.random.key(1), rate)
    frac = float(jnp.mean(x != jnp.tanh(a)))
    se = np.sqrt(rate * (1 - rate) / a.size)
    assert abs(frac - rate) <= Z * se


@pytest.mark.parametrize("name", NODES)
def test_pcff_expectation(name, x64):
    rate = 0.4
    x = _draws(lambda a, k: pcff(name, a, k, rate), A, seed=7)
    mean, _, se_m, _ = mc_stats(x)
    a = jnp.asarray(A)
    expect = (1 - rate) * node_mean(name, a) + rate * node_moments(name, a)[0]
    assert np.all(np.abs(mean - expect) <= Z * se_m + 1e-12), (mean, expect, se_m)
    if name in SUPPORT:  # unbiased w.r.t. feed-forward for binary nodes
        np.testing.assert_allclose(expect, node_mean(name, a), atol=1e-15)


@pytest.mark.parametrize("name", ["relu", "softplus"])
def test_reparameterised_gradient_finite_differences(name, x64):
    a = jnp.asarray(A)
    key = jax.random.key(11)
    g = jax.grad(lambda u: node_sample(name, u, key).sum())(a)
    h = 1e-6
    fd = (node_sample(name, a + h, key) - node_sample(name, a - h, key)) / (2 * h)
    # same eps on both sides; skip units whose Y is within reach of the kink
    eps = jax.random.normal(key, a.shape, a.dtype)
    y = a + chain.node_std(name, a) * eps
    ok = np.abs(np.asarray(y)) > 1e-3
    assert ok.sum() >= 5
    np.testing.assert_allclose(np.asarray(g)[ok], np.asarray(fd)[ok], rtol=1e-7)
    assert np.any(np.asarray(g)[ok] != 0)


def test_reparameterised_gradient_is_unbiased(x64):
    # pathwise: E[d sample / da] = d E[sample] / da (a != 0: |tanh| has a kink)
    a = jnp.asarray(A[A != 0])
    keys = jax.random.split(jax.random.key(5), S)
    grads = jax.vmap(jax.grad(lambda u, k: node_sample("relu", u, k).sum()), (None, 0))(
        a, keys
    )
    mean, _, se_m, _ = mc_stats(grads)
    exact = jax.grad(lambda u: node_moments("relu", u)[0].sum())(a)
    assert np.all(np.abs(mean - exact) <= Z * se_m + 1e-12), (mean, exact, se_m)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_binary_sample_gradients(name):
    a = jnp.linspace(-2.0, 2.0, 1000)
    key = jax.random.key(2)
    dmean = jax.vmap(jax.grad(lambda u: node_mean(name, u)))(a)
    # paper: discrete samples carry no gradient; only collapsed nodes do
    x = pcff(name, a, key, 0.5)
    g = jax.grad(lambda u: pcff(name, u, key, 0.5).sum())(a)
    sampled = np.asarray(x != node_mean(name, a))
    assert 300 < sampled.sum() < 700
    np.testing.assert_array_equal(np.asarray(g)[sampled], 0.0)
    np.testing.assert_allclose(g[~sampled], dmean[~sampled], rtol=1e-6)
    # straight-through: same values, gradient of the mean everywhere
    st = lambda u: pcff(name, u, key, 0.5, binary_grad="straight_through")  # noqa: E731
    np.testing.assert_array_equal(st(a), x)
    np.testing.assert_allclose(jax.grad(lambda u: st(u).sum())(a), dmean, rtol=1e-6)


def test_invalid_arguments():
    a = jnp.zeros(3)
    with pytest.raises(ValueError, match="rate"):
        pcff("tanh", a, jax.random.key(0), 1.5)
    with pytest.raises(ValueError, match="node"):
        node_mean("gelu", a)
    with pytest.raises(ValueError, match="binary_grad"):
        node_sample("tanh", a, jax.random.key(0), binary_grad="reinforce")
    with pytest.raises(ValueError, match="node"):
        PCFFActivation("elu", 0.5)


def _nets(name, rate):
    def build(act):
        r = nnx.Rngs(0)
        return dnn.Sequential(
            dnn.Dense(6, 16, rngs=r), act, dnn.Dense(16, 16, rngs=r), act,
            dnn.Dense(16, 3, rngs=r),
        )  # fmt: skip

    return build(PCFFActivation(name, rate)), build(dnn.Activation(name))


@pytest.mark.parametrize("name,rate", [("tanh", 0.4), ("relu", 1.0)])
def test_layer_in_sequential(name, rate):
    net, plain = _nets(name, rate)
    x = jax.random.normal(jax.random.key(0), (8, 6))
    det = dnn.Method("deterministic")
    ref = plain(x, dnn.Context(det))
    # evaluation: plain feed-forward, no key needed
    np.testing.assert_array_equal(net(x, dnn.Context(det)), ref)
    # training: random, a pure function of the key
    k = jax.random.key(4)
    y1 = net(x, dnn.Context(det, k, train=True))
    y2 = net(x, dnn.Context(det, k, train=True))
    y3 = net(x, dnn.Context(det, jax.random.key(5), train=True))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, ref) and not np.allclose(y1, y3)
    with pytest.raises(ValueError, match="key"):
        net(x, dnn.Context(det, train=True))
    with pytest.raises(ValueError, match="moment rule"):
        net(x, dnn.Context(dnn.Method("bp")))
    # gradients reach the first layer's weights through the PCFF layers
    g = nnx.grad(lambda m: m(x, dnn.Context(det, k, train=True)).sum())(net)
    assert float(jnp.abs(g.layers[0].kernel_mean[...]).sum()) > 0


def test_layer_rate_zero_is_plain():
    net, plain = _nets("tanh", 0.0)
    x = jax.random.normal(jax.random.key(0), (8, 6))
    det = dnn.Method("deterministic")
    # rate 0 at train time: plain feed-forward and no key drawn
    np.testing.assert_array_equal(
        net(x, dnn.Context(det, train=True)), plain(x, dnn.Context(det))
    )


def test_integer_input_gives_float_moments():
    """Integer pre-activations must not truncate the softplus node's std."""
    from dualflow.chain import node_moments

    for name in ("softplus", "relu", "tanh"):
        mi, vi = node_moments(name, jnp.array([0, 1]))
        mf, vf = node_moments(name, jnp.array([0.0, 1.0]))
        np.testing.assert_allclose(mi, mf, rtol=1e-6)
        np.testing.assert_allclose(vi, vf, rtol=1e-6)
