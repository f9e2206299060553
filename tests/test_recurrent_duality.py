"""Duality for sequences: a linear Gaussian IndRNN is a Kalman filter, and the
gradient w.r.t. its filtered states is the RTS smoother (Theorem 3 of
"Duality of information flow", App. C.1).  References: ``dualflow.pgm``
(Kalman filter, RTS smoother, Theorem 3 recursion) and brute-force joint
Gaussian conditioning; float64, 1e-8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow import Gaussian, moments, pgm
from dualflow.nn import Context, Likelihood, Method, hidden_state_posterior
from dualflow.nn.layers import Dense, Sequential
from dualflow.nn.recurrent import IndRNN, LastStep
from dualflow.smoothing import smoothed_moments

TOL = 1e-8


def _lgssm(seed: int, n: int = 3, T: int = 7):
    """Diagonal LGSSM (F = diag(u), Q, H = I, R diagonal) and observations."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1.2, 1.2, n)
    q = rng.uniform(0.05, 0.5, n)
    r = rng.uniform(0.1, 1.0, n)
    m0 = rng.normal(size=n)
    p0 = rng.uniform(0.2, 2.0, n)
    z = rng.normal(size=(T, n)) * 1.5
    model = pgm.LGSSM(
        F=jnp.diag(u),
        Q=jnp.diag(q),
        H=jnp.eye(n),
        R=jnp.diag(r),
        m0=jnp.asarray(m0),
        P0=jnp.diag(p0),
    )
    return model, (u, q, r, m0, p0, z)


def _scan_loglik(params, z, backward, delta=None, cell="indrnn"):
    """Sum of the scan's predictive log-likelihoods and its filtered states."""
    u, q, r, m0, p0 = params
    T, n = z.shape
    a = Gaussian(jnp.zeros((1, T, n)), jnp.broadcast_to(q, (1, T, n)))
    h0 = Gaussian(m0[None], p0[None])
    kw = dict(
        h0=h0,
        activation="identity",
        backward=backward,
        observations=z[None],
        noise_var=r,
        state_delta=delta,
    )
    if cell == "indrnn":
        states, ll = moments.indrnn(a, u, jnp.zeros_like(u), **kw)
    else:  # an SRN whose U is diagonal is the same model
        states, ll = moments.simple_rnn(a, jnp.diag(u), jnp.zeros((n, n)), **kw)
    return ll.sum(), states


@pytest.mark.parametrize("cell", ["indrnn", "srn"])
@pytest.mark.parametrize("backward", ["bp", "autodiff"])
def test_linear_indrnn_forward_is_the_kalman_filter(cell, backward, x64):
    model, (u, q, r, m0, p0, z) = _lgssm(0)
    filt = pgm.kalman_filter(model, jnp.asarray(z))
    params = tuple(jnp.asarray(v) for v in (u, q, r, m0, p0))
    ll, states = _scan_loglik(params, jnp.asarray(z), backward, cell=cell)
    covs = np.asarray(filt.filtered_covs[1:])
    # diagonal dynamics and observations: the Kalman covariance stays diagonal
    off = covs - np.einsum("tii->ti", covs)[:, :, None] * np.eye(covs.shape[-1])
    assert np.abs(off).max() < 1e-14
    np.testing.assert_allclose(
        states.mean[0], filt.filtered_means[1:], rtol=0, atol=TOL
    )
    np.testing.assert_allclose(
        states.var[0], np.einsum("tii->ti", covs), rtol=0, atol=TOL
    )
    np.testing.assert_allclose(ll, filt.log_likelihood, rtol=TOL, atol=0)


@pytest.mark.parametrize("cell", ["indrnn", "srn"])
@pytest.mark.parametrize("backward", ["bp", "autodiff"])
@pytest.mark.parametrize("seed", [0, 1])
def test_state_gradients_are_theorem3_and_give_rts_moments(cell, backward, seed, x64):
    model, (u, q, r, m0, p0, z) = _lgssm(seed)
    z = jnp.asarray(z)
    T, n = z.shape
    filt = pgm.kalman_filter(model, z)
    smooth = pgm.rts_smoother(model, filt)
    a_ref, B_ref = pgm.kalman_gradient_recursion(model, filt)
    u, q, r, m0, p0 = (jnp.asarray(v) for v in (u, q, r, m0, p0))

    def loss(delta, m0, p0):
        ll, states = _scan_loglik((u, q, r, m0, p0), z, backward, delta, cell)
        return ll, states

    zero = Gaussian(jnp.zeros((1, T, n)), jnp.zeros((1, T, n)))
    (ll, states), (g_delta, g_m0, g_p0) = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True
    )(zero, m0, p0)
    # Theorem 3: d log p / d x̂_{t|t} and d log p / d P_{t|t} (diagonal), t = 1..T
    np.testing.assert_allclose(g_delta.mean[0], a_ref[1:], rtol=0, atol=TOL)
    np.testing.assert_allclose(
        g_delta.var[0], np.einsum("tii->ti", B_ref[1:]), rtol=0, atol=TOL
    )
    # ... and at t = 0 (the prior N(m0, P0) is the filter at time 0)
    np.testing.assert_allclose(g_m0, a_ref[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(g_p0, np.diag(B_ref[0]), rtol=0, atol=TOL)
    # Theorem 1 turns them into the RTS-smoothed moments (J = -log p)
    neg = Gaussian(-g_delta.mean[0], -g_delta.var[0])
    sm = smoothed_moments(Gaussian(states.mean[0], states.var[0]), neg)
    np.testing.assert_allclose(sm.mean, smooth.means[1:], rtol=0, atol=TOL)
    np.testing.assert_allclose(
        sm.var, np.einsum("tii->ti", smooth.covs[1:]), rtol=0, atol=TOL
    )
    sm0 = smoothed_moments(Gaussian(m0, p0), Gaussian(-g_m0, -g_p0))
    np.testing.assert_allclose(sm0.mean, smooth.means[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(sm0.var, np.diag(smooth.covs[0]), rtol=0, atol=TOL)


def test_kalman_update_is_exact_gaussian_conditioning(x64):
    rng = np.random.default_rng(3)
    m, P, R, z = (
        rng.normal(size=4),
        rng.uniform(0.1, 2, 4),
        rng.uniform(0.1, 1, 4),
        rng.normal(size=4),
    )
    post, ll = moments.kalman_update(Gaussian(jnp.asarray(m), jnp.asarray(P)), z, R)
    for i in range(4):  # joint of (h, z) = (h, h + v), conditioned on z
        cov = np.array([[P[i], P[i]], [P[i], P[i] + R[i]]])
        pm, pc = pgm.condition_gaussian(
            jnp.array([m[i], m[i]]), jnp.asarray(cov), 1, z[i : i + 1]
        )
        np.testing.assert_allclose(post.mean[i], pm[0], rtol=1e-12)
        np.testing.assert_allclose(post.var[i], pc[0, 0], rtol=1e-12)
        np.testing.assert_allclose(
            ll[i],
            pgm.gaussian_logpdf(z[i : i + 1], m[i : i + 1], cov[1:, 1:]),
            rtol=1e-12,
        )


def _point_logvar(layer_param):
    layer_param[...] = jnp.full(layer_param[...].shape, -jnp.inf)


def _linear_network(seed, n_in=2, hidden=3, T=5):
    """IndRNN (identity, point weights, Gaussian bias = process noise) -> last
    step -> dense head with point weights."""
    rngs = nnx.Rngs(seed)
    kw = dict(param_dtype=jnp.float64)
    rnn = IndRNN(
        n_in, hidden, activation="identity", recurrent_init=(-0.9, 0.9), rngs=rngs, **kw
    )
    head = Dense(hidden, 1, mean_init="lecun", rngs=rngs, **kw)
    _point_logvar(rnn.input.kernel_logvar)
    _point_logvar(rnn.recurrent_logvar)
    _point_logvar(head.kernel_logvar)
    _point_logvar(head.bias_logvar)
    rng = np.random.default_rng(seed)
    rnn.input.bias_logvar[...] = jnp.asarray(np.log(rng.uniform(0.1, 0.6, hidden)))
    rnn.input.bias_mean[...] = jnp.asarray(rng.normal(size=hidden))
    return Sequential(rnn, LastStep(), head), rnn, head


def test_hidden_state_posterior_is_exact_conditioning_for_a_linear_network(x64):
    """p(h_t | y) of every unit and step vs the brute-force joint Gaussian."""
    T, hidden, noise = 5, 3, 0.3
    net, rnn, head = _linear_network(0, T=T, hidden=hidden)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, T, 2)))
    y = jnp.asarray(rng.normal(size=(2, 1)))
    method = Method("bp")
    res = hidden_state_posterior(
        net, x, y, method=method, likelihood=Likelihood("gaussian", noise_var=noise)
    )
    filt, sm = res.filtered["rnn0"], res.smoothed["rnn0"]
    # brute force: h_t = sum_{s<=t} u^{t-s} (c_s + e_s), e_s ~ N(0, q) independent
    u = np.asarray(rnn.recurrent_mean[...])
    q = np.exp(np.asarray(rnn.input.bias_logvar[...]))
    w = np.asarray(head.kernel_mean[...])[:, 0]
    c = np.asarray(x @ rnn.input.kernel_mean[...] + rnn.input.bias_mean[...])
    for ex in range(2):
        # noise vector e = (e_1..e_T per unit [T*H], v); states [T*H], then y
        nz = T * hidden + 1
        A = np.zeros((T * hidden + 1, nz))
        mean = np.zeros(T * hidden + 1)
        for t in range(T):
            for i in range(hidden):
                for s in range(t + 1):
                    A[t * hidden + i, s * hidden + i] = u[i] ** (t - s)
                    mean[t * hidden + i] += u[i] ** (t - s) * c[ex, s, i]
        A[-1, : T * hidden] = 0.0
        for i in range(hidden):
            A[-1] += w[i] * A[(T - 1) * hidden + i]
        mean[-1] = w @ mean[(T - 1) * hidden : T * hidden] + float(
            head.bias_mean[...][0]
        )
        A[-1, -1] = 1.0
        sig = np.diag(np.concatenate([np.tile(q, T), [noise]]))
        cov = A @ sig @ A.T
        # the filter: prior marginals
        np.testing.assert_allclose(filt.mean[ex].reshape(-1), mean[:-1], atol=TOL)
        np.testing.assert_allclose(
            filt.var[ex].reshape(-1), np.diag(cov)[:-1], atol=TOL
        )
        pm, pc = pgm.condition_gaussian(jnp.asarray(mean), jnp.asarray(cov), 1, y[ex])
        np.testing.assert_allclose(sm.mean[ex].reshape(-1), pm, rtol=0, atol=TOL)
        np.testing.assert_allclose(
            sm.var[ex].reshape(-1), np.diag(pc), rtol=0, atol=TOL
        )


def test_layer_bp_scan_equals_the_pure_moment_scan(x64):
    net, rnn, _ = _linear_network(1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 2)))
    got = rnn(x, Context(Method("bp")))
    a = moments.dense(x, *rnn.input.moments_of("kernel"), *rnn.input.moments_of("bias"))
    want, _ = moments.indrnn(a, *rnn.moments_of("recurrent"), activation="identity")
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-14)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-14)


# --------------------------------------------------------------------------
# Two front-ends, one set of moment rules: dualflow.propagate of a plain-JAX
# IndRNN written with lax.scan equals the hand-written IndRNN layer.
# --------------------------------------------------------------------------
def _plain_indrnn(p, x):
    a = x @ p["w"] + p["b"]

    def step(h, a_t):
        h = jax.nn.relu(a_t + p["u"] * h)
        return h, h

    h0 = jnp.zeros((x.shape[0], p["u"].shape[0]), x.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(a, 0, 1))
    return jnp.swapaxes(hs, 0, 1)


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("backward", ["bp", "autodiff"])
def test_propagate_of_a_plain_indrnn_equals_the_layer(mode, backward, x64):
    import dualflow

    layer = IndRNN(3, 4, init_var=0.05, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 3)))
    moments_of = {
        "w": ("kernel", layer.input),
        "b": ("bias", layer.input),
        "u": ("recurrent", layer),
    }
    raw = {k: mod.moments_of(n) for k, (n, mod) in moments_of.items()}
    bayes = dualflow.propagate(_plain_indrnn, mode=mode, backward=backward)
    method = Method("bp", mode=mode, backward=backward)

    def loss_transformed(raw):
        out = bayes({k: Gaussian(*v) for k, v in raw.items()}, x)
        return jnp.sum(out.mean**2) + jnp.sum(jnp.sqrt(out.var + 1.0)), out

    def loss_layer(raw):
        a = moments.dense(x, *raw["w"], *raw["b"], backward=backward)
        out, _ = moments.indrnn(a, *raw["u"], mode=mode, backward=backward)
        return jnp.sum(out.mean**2) + jnp.sum(jnp.sqrt(out.var + 1.0)), out

    (_, got), g_got = jax.value_and_grad(loss_transformed, has_aux=True)(raw)
    (_, want), g_want = jax.value_and_grad(loss_layer, has_aux=True)(raw)
    ref = layer(x, Context(method))
    np.testing.assert_allclose(want.mean, ref.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
