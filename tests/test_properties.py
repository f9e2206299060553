"""Property tests (hypothesis): shapes, dtypes, positivity, jit/vmap/grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualflow import Gaussian, moments

ACTS = ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "silu", "erf",
        "probit", "heaviside", "identity"]

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)

floats = st.floats(-30.0, 30.0, allow_nan=False, width=32)
log_vars = st.floats(-20.0, 4.0, allow_nan=False, width=32)


@st.composite
def beliefs(draw, max_len=6):
    n = draw(st.integers(1, max_len))
    m = draw(st.lists(floats, min_size=n, max_size=n))
    lv = draw(st.lists(log_vars, min_size=n, max_size=n))
    zero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    v = [0.0 if z else float(np.exp(x)) for z, x in zip(zero, lv, strict=True)]
    return np.array(m), np.array(v)


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("name", ACTS)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=beliefs(), dtype=st.sampled_from(["float32", "float64"]))
def test_activation_properties(name, mode, dtype, data):
    with jax.enable_x64(dtype == "float64"):
        m, v = (jnp.asarray(a, dtype) for a in data)
        x = Gaussian(m, v)
        f = lambda x: moments.activation(name, x, mode=mode)  # noqa: E731
        y = f(x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.var.dtype == x.dtype
        assert bool(jnp.all(jnp.isfinite(y.mean))) and bool(jnp.all(jnp.isfinite(y.var)))
        assert bool(jnp.all(y.var >= 0))
        yj = jax.jit(f)(x)
        np.testing.assert_allclose(yj.mean, y.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(yj.var, y.var, rtol=1e-5, atol=1e-6)
        yv = jax.vmap(f)(Gaussian(m[:, None], v[:, None]))
        np.testing.assert_allclose(yv.mean[:, 0], y.mean, rtol=1e-5, atol=1e-6)
        for bw in ("bp", "autodiff"):
            g = jax.grad(lambda a, b, bw=bw: jnp.sum(
                moments.activation(name, Gaussian(a, b), mode=mode, backward=bw).mean
                + moments.activation(name, Gaussian(a, b), mode=mode,
                                     backward=bw).var))(m, v)
            assert bool(jnp.all(jnp.isfinite(g))), (name, mode, bw, g)


@SETTINGS
@given(
    batch=st.integers(1, 3), d_in=st.integers(1, 5), d_out=st.integers(1, 4),
    seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "float64"]),
)
def test_dense_properties(batch, d_in, d_out, seed, dtype):
    with jax.enable_x64(dtype == "float64"):
        key = jax.random.PRNGKey(seed)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x = Gaussian(jax.random.normal(k1, (batch, d_in), dtype),
                     jax.random.uniform(k2, (batch, d_in), dtype))
        wm = jax.random.normal(k3, (d_in, d_out), dtype)
        wv = jax.random.uniform(k4, (d_in, d_out), dtype)
        y = moments.dense(x, wm, wv)
        assert y.shape == (batch, d_out) and y.dtype == jnp.dtype(dtype)
        assert bool(jnp.all(y.var >= 0))
        # vmap over the batch equals the batched call
        yv = jax.vmap(lambda a: moments.dense(a, wm, wv))(x)
        np.testing.assert_allclose(yv.mean, y.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(yv.var, y.var, rtol=1e-5, atol=1e-6)
        # the variance is at least the weight-noise-free part
        assert bool(jnp.all(y.var + 1e-5 >= moments.dense(x, wm, 0 * wv).var))
        for bw in ("bp", "autodiff", "bp_fixed_noise"):
            g = jax.grad(lambda w, bw=bw: jnp.sum(
                moments.dense(x, w, wv, backward=bw).var))(wm)
            assert g.shape == wm.shape and bool(jnp.all(jnp.isfinite(g)))


@SETTINGS
@given(
    hw=st.integers(2, 6), c=st.integers(1, 3), window=st.integers(1, 2),
    padding=st.sampled_from(["SAME", "VALID"]), seed=st.integers(0, 2**16),
)
def test_pool_properties(hw, c, window, padding, seed):
    key = jax.random.PRNGKey(seed)
    x = Gaussian(jax.random.normal(key, (2, hw, hw, c)),
                 jax.random.uniform(key, (2, hw, hw, c)))
    for fn in (moments.avg_pool, moments.max_pool):
        y = fn(x, window, padding=padding)
        y2 = jax.jit(lambda x, fn=fn: fn(x, window, padding=padding))(x)
        np.testing.assert_allclose(y.var, y2.var, rtol=1e-5, atol=1e-6)
        assert bool(jnp.all(y.var >= 0)) and bool(jnp.all(jnp.isfinite(y.mean)))
        g = jax.grad(lambda a, fn=fn: jnp.sum(fn(Gaussian(a, x.var), window,
                                                 padding=padding).var))(x.mean)
        assert bool(jnp.all(jnp.isfinite(g)))
