"""Moment rules of dualflow.moments against Monte Carlo and closed forms.

Monte Carlo tolerances are 5-sigma bounds derived from the sample size n:
for a mean, ``5 * sqrt(var / n)``; for a variance,
``5 * sqrt((mu4 - var^2) / n)`` with ``mu4`` the sample fourth central moment
(the standard error of the sample variance).  With the fixed seeds below a
correct rule fails with probability < 1e-5 per compared entry.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mc_stats import mc_stats

from dualflow import Gaussian, moments

N_MC = 200_000


def mc_check(samples, mean, var, what=""):
    """Assert rule moments agree with samples (axis 0) within 5-sigma bounds."""
    mc_mean, mc_var, se_mean, se_var = mc_stats(samples)
    tol_mean = 5 * se_mean + 1e-6
    tol_var = 5 * se_var + 1e-6
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    assert np.all(np.abs(mc_mean - mean) <= tol_mean), (
        what,
        np.max(np.abs(mc_mean - mean) / tol_mean),
    )
    assert np.all(np.abs(mc_var - var) <= tol_var), (
        what,
        np.max(np.abs(mc_var - var) / tol_var),
    )
    return float(np.max(np.abs(mc_mean - mean) / tol_mean)), float(
        np.max(np.abs(mc_var - var) / tol_var)
    )


def _draw(rng, mean, var, n):
    """n independent draws of N(mean, var) (numpy: no per-shape compilation)."""
    mean = np.asarray(mean, np.float64)
    return mean + np.sqrt(np.asarray(var, np.float64)) * rng.standard_normal(
        (n, *mean.shape)
    )


def _layer_params(key, d_in, d_out, scale=0.5, var_scale=0.1):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w_mean = scale * jax.random.normal(k1, (d_in, d_out))
    w_var = var_scale * jax.random.uniform(k2, (d_in, d_out), minval=0.2, maxval=1.0)
    b_mean = 0.1 * jax.random.normal(k3, (d_out,))
    b_var = 0.05 * jax.random.uniform(k4, (d_out,))
    return w_mean, w_var, b_mean, b_var


def test_dense_matches_monte_carlo():
    key = jax.random.PRNGKey(0)
    kx, kp, ks = jax.random.split(key, 3)
    d_in, d_out, batch = 5, 3, 2
    x = Gaussian(
        jax.random.normal(kx, (batch, d_in)),
        jax.random.uniform(kx, (batch, d_in), minval=0.05, maxval=0.5),
    )
    w_mean, w_var, b_mean, b_var = _layer_params(kp, d_in, d_out)
    y = moments.dense(x, w_mean, w_var, b_mean, b_var)
    rng = np.random.default_rng(0)
    W = _draw(rng, w_mean, w_var, N_MC)
    b = _draw(rng, b_mean, b_var, N_MC)
    xs = _draw(rng, x.mean, x.var, N_MC)
    a = np.einsum("nbi,nio->nbo", xs, W) + b[:, None, :]
    mc_check(a, y.mean, y.var, "dense")


@pytest.mark.parametrize(
    "shape,kernel,strides,padding,groups",
    [
        ((1, 9, 3), (3, 3, 2), 1, "SAME", 1),  # 1-D
        ((1, 5, 6, 2), (3, 3, 2, 3), (2, 1), "VALID", 1),  # 2-D strided
        ((1, 4, 4, 4), (3, 3, 2, 4), 1, ((1, 0), (0, 1)), 2),  # grouped, explicit pad
    ],
)
def test_conv_matches_monte_carlo(shape, kernel, strides, padding, groups):
    key = jax.random.PRNGKey(1)
    kx, kw, ks = jax.random.split(key, 3)
    x = Gaussian(
        jax.random.normal(kx, shape),
        jax.random.uniform(kx, shape, minval=0.05, maxval=0.5),
    )
    w_mean = 0.4 * jax.random.normal(kw, kernel)
    w_var = 0.05 * jax.random.uniform(kw, kernel, minval=0.2, maxval=1.0)
    kw_ = dict(strides=strides, padding=padding, feature_group_count=groups)
    y = moments.conv(x, w_mean, w_var, **kw_)

    n = 100_000
    rng = np.random.default_rng(1)
    Ws = jnp.asarray(_draw(rng, w_mean, w_var, n), jnp.float32)
    xs = jnp.asarray(_draw(rng, x.mean, x.var, n)[:, 0], jnp.float32)
    a = _conv_per_sample_kernels(xs, Ws, strides, padding, groups)
    mc_check(a, y.mean, y.var, f"conv {shape}")
    # A point input with point weights is the ordinary convolution.
    det = moments.conv(x.mean, w_mean, jnp.zeros_like(w_var), **kw_)
    np.testing.assert_allclose(det.mean, y.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(det.var, 0.0)


def _conv_per_sample_kernels(xs, Ws, strides, padding, groups):
    """Reference conv of sample i with kernel i: explicit patches + einsum."""
    nsp = xs.ndim - 2
    window = Ws.shape[1 : 1 + nsp]
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    sp = "DHW"[-nsp:]
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    # patches: [n, *out, C * prod(window)], C-major (channel, then window offsets)
    pt = jax.lax.conv_general_dilated_patches(
        xs, window, strides, padding, dimension_numbers=dn
    )
    c_in = xs.shape[-1]
    k = int(np.prod(window))
    pt = pt.reshape(*pt.shape[:-1], groups, c_in // groups, k)
    c_out = Ws.shape[-1]
    # kernel [n, *window, C/g, O] -> [n, g, C/g, k, O/g]
    w = Ws.reshape(Ws.shape[0], k, c_in // groups, groups, c_out // groups)
    w = jnp.moveaxis(w, 1, 3)  # [n, C/g, g, k, O/g]
    w = jnp.swapaxes(w, 1, 2)  # [n, g, C/g, k, O/g]
    out = jnp.einsum("n...gck,ngcko->n...go", pt, w)
    return out.reshape(*out.shape[:-2], c_out)


ACTS = list(moments.ACTIVATIONS)  # every activation the package offers


@pytest.mark.parametrize("name", ACTS)
def test_dense_then_activation_matched_matches_monte_carlo(name):
    """Point input + Gaussian weights => the pre-activation is exactly Gaussian,
    so matched moments of the layer+activation must agree with sampling weights."""
    key = jax.random.PRNGKey(2)
    kx, kp, ks = jax.random.split(key, 3)
    d_in, d_out = 4, 6
    x = jax.random.normal(kx, (2, d_in))
    w_mean, w_var, b_mean, b_var = _layer_params(kp, d_in, d_out, 0.8, 0.3)
    a = moments.dense(x, w_mean, w_var, b_mean, b_var)
    y = moments.activation(name, a, mode="matched")
    rng = np.random.default_rng(2)
    W = _draw(rng, w_mean, w_var, N_MC)
    b = _draw(rng, b_mean, b_var, N_MC)
    pre = jnp.asarray(
        np.einsum("bi,nio->nbo", np.asarray(x, np.float64), W) + b[:, None, :],
        jnp.float32,
    )
    f = {
        "relu": jax.nn.relu,
        "leaky_relu": lambda t: jnp.where(t > 0, t, 0.01 * t),
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": lambda t: t * jax.scipy.special.ndtr(t),
        "silu": jax.nn.silu,
        "erf": jax.scipy.special.erf,
        "probit": jax.scipy.special.ndtr,
        "heaviside": lambda t: (t > 0).astype(t.dtype),
        "identity": lambda t: t,
    }[name]
    mc_check(f(pre), y.mean, y.var, name)


@pytest.mark.parametrize("name", [a for a in ACTS if a != "heaviside"])
def test_linearized_agrees_with_matched_in_small_variance_limit(name):
    # away from stationary points of f (silu'(-1.28) = 0), where the relative
    # variance error of the linearization does not vanish
    m = jnp.array([-2.2, -0.4, 0.3, 0.9, 2.0])
    errs = []
    for v in [1e-2, 1e-3, 1e-4]:
        x = Gaussian(m, jnp.full_like(m, v))
        lin = moments.activation(name, x, mode="linearized")
        mat = moments.activation(name, x, mode="matched")
        e_mean = jnp.max(jnp.abs(lin.mean - mat.mean))
        e_var = jnp.max(jnp.abs(lin.var - mat.var) / jnp.maximum(mat.var, 1e-30))
        errs.append((float(e_mean), float(e_var)))
    # mean error O(v), relative variance error O(v): each decade shrinks it ~10x
    for (em0, ev0), (em1, ev1) in itertools.pairwise(errs):
        assert em1 <= em0 / 5 + 1e-6
        assert ev1 <= ev0 / 5 + 1e-4
    # at v = 1e-4 both errors are O(v) times curvature terms like (f''/f')^2
    assert errs[-1][0] < 1e-3 and errs[-1][1] < 1e-2, errs


def test_linearized_definition():
    x = Gaussian(jnp.array([-0.7, 0.2, 1.5]), jnp.array([0.3, 0.1, 2.0]))
    y = moments.tanh(x)
    d = 1.0 / np.cosh(np.asarray(x.mean, np.float64)) ** 2  # float64 reference
    np.testing.assert_allclose(y.mean, jnp.tanh(x.mean), rtol=1e-6)
    np.testing.assert_allclose(y.var, d**2 * x.var, rtol=1e-6)
    y = moments.relu(x)
    np.testing.assert_allclose(y.mean, [0.0, 0.2, 1.5], rtol=1e-6)
    np.testing.assert_allclose(y.var, [0.0, 0.1, 2.0], rtol=1e-6)


def test_avg_and_global_pool_match_monte_carlo():
    key = jax.random.PRNGKey(3)
    shape = (1, 4, 6, 2)
    x = Gaussian(
        jax.random.normal(key, shape), jax.random.uniform(key, shape, minval=0.1)
    )
    xs = _draw(np.random.default_rng(3), x.mean, x.var, N_MC)
    y = moments.avg_pool(x, (2, 3))
    pooled = xs.reshape(N_MC, 1, 2, 2, 2, 3, 2).mean(axis=(3, 5))
    mc_check(pooled, y.mean, y.var, "avg_pool")
    g = moments.global_avg_pool(x)
    mc_check(xs.mean(axis=(2, 3)), g.mean, g.var, "global_avg_pool")


def test_avg_pool_same_padding_counts():
    x = Gaussian(jnp.ones((1, 3, 3, 1)), jnp.ones((1, 3, 3, 1)))
    y = moments.avg_pool(x, 2, 1, "SAME", count_include_pad=False)
    np.testing.assert_allclose(y.mean, 1.0, rtol=1e-6)
    # corner window holds 1 real input => var 1/1; interior (2x2) => 4/16
    np.testing.assert_allclose(y.var[0, 0, 0, 0], 0.25, rtol=1e-6)
    np.testing.assert_allclose(y.var[0, 2, 2, 0], 1.0, rtol=1e-6)


def test_max_pool_limits():
    key = jax.random.PRNGKey(5)
    m = jax.random.normal(key, (2, 4, 4, 3))
    P = jax.random.uniform(key, (2, 4, 4, 3), minval=0.1, maxval=1.0)
    x = Gaussian(m, P)
    # mean is the max of the means
    y = moments.max_pool(x, 2)
    ref = jax.lax.reduce_window(
        m, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    np.testing.assert_allclose(y.mean, ref)
    # tau -> 0: variance of the arg-max input
    cold = moments.max_pool(x, 2, temperature=1e-6)
    patches = jnp.stack([P[:, i::2, j::2] for i in range(2) for j in range(2)], -1)
    mpatch = jnp.stack([m[:, i::2, j::2] for i in range(2) for j in range(2)], -1)
    arg = jnp.take_along_axis(patches, jnp.argmax(mpatch, -1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(cold.var, arg, rtol=1e-5)
    # tau -> inf: variance of the average
    hot = moments.max_pool(x, 2, temperature=1e8)
    np.testing.assert_allclose(hot.var, moments.avg_pool(x, 2).var, rtol=1e-5)
    # default tau lies between
    assert jnp.all(y.var <= jnp.max(patches, -1) + 1e-6)
    assert jnp.all(y.var >= hot.var - 1e-6)
    # deterministic input: the ordinary max pool, zero variance
    pt = moments.max_pool(m, 2, padding="SAME")
    assert jnp.all(pt.var == 0) and jnp.all(jnp.isfinite(pt.mean))


def test_combine_ops():
    a = Gaussian(jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3)))
    b = Gaussian(jnp.ones((2, 3)), 2 * jnp.ones((2, 3)))
    s = moments.add(a, b, jnp.ones((2, 3)))
    np.testing.assert_allclose(s.mean, a.mean + 2)
    np.testing.assert_allclose(s.var, 3.0)
    c = moments.concatenate([a, b], axis=-1)
    assert c.shape == (2, 6)
    np.testing.assert_allclose(c.var[:, 3:], 2.0)
    f = moments.flatten(Gaussian(jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4))))
    assert f.shape == (2, 12)
    sc = moments.scale(a, -2.0)
    np.testing.assert_allclose(sc.var, 4.0)


def test_bad_inputs_give_clear_errors():
    x = Gaussian(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="input feature size"):
        moments.dense(x, jnp.zeros((4, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="mean shape"):
        moments.relu(Gaussian(jnp.zeros(3), jnp.zeros(2)))
    with pytest.raises(ValueError, match="backward"):
        moments.relu(x, backward="magic")
    with pytest.raises(ValueError, match="mode"):
        moments.relu(x, mode="exactish")
    with pytest.raises(ValueError, match="unknown activation"):
        moments.activation("swishy", x)
    with pytest.raises(TypeError, match="Gaussian"):
        moments.relu((jnp.zeros(3), jnp.zeros(3)))
