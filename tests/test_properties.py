"""Property tests (hypothesis): shapes, dtypes, positivity, jit/vmap/grad.

Values are drawn by hypothesis; shapes come from a small fixed set so that
XLA compiles each function a bounded number of times (compilation, not the
arithmetic, is what costs time here).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualflow import Gaussian, moments

ACTS = list(moments.ACTIVATIONS)  # every activation the package offers
N = 8  # length of the drawn activation inputs

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)

floats = st.floats(-30.0, 30.0, allow_nan=False, width=32)
log_vars = st.floats(-20.0, 4.0, allow_nan=False, width=32)


@st.composite
def beliefs(draw):
    """Means in [-30, 30]; variances 0 or exp([-20, 4]) (float32-representable)."""
    m = draw(st.lists(floats, min_size=N, max_size=N))
    lv = draw(st.lists(log_vars, min_size=N, max_size=N))
    zero = draw(st.lists(st.booleans(), min_size=N, max_size=N))
    v = [0.0 if z else float(np.exp(x)) for z, x in zip(zero, lv, strict=True)]
    return np.array(m), np.array(v)


@functools.cache
def _act_fns(name, mode, dtype):
    """Jitted forward, vmapped forward and BP/autodiff gradients (compiled once)."""
    del dtype  # part of the cache key only: x64 changes the traced dtypes

    def f(m, v, backward="bp"):
        y = moments.activation(name, Gaussian(m, v), mode=mode, backward=backward)
        return y.mean, y.var

    def loss(m, v, backward):
        mean, var = f(m, v, backward)
        return jnp.sum(mean + var)

    grads = {
        bw: jax.jit(jax.grad(functools.partial(loss, backward=bw), (0, 1)))
        for bw in ("bp", "autodiff")
    }
    return jax.jit(f), jax.jit(jax.vmap(f)), grads


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("name", ACTS)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=beliefs(), dtype=st.sampled_from(["float32", "float64"]))
def test_activation_properties(name, mode, dtype, data):
    with jax.enable_x64(dtype == "float64"):
        m, v = (jnp.asarray(a, dtype) for a in data)
        f, fv, grads = _act_fns(name, mode, dtype)
        mean, var = f(m, v)
        assert mean.shape == m.shape and mean.dtype == m.dtype and var.dtype == m.dtype
        assert bool(jnp.all(jnp.isfinite(mean))) and bool(jnp.all(jnp.isfinite(var)))
        assert bool(jnp.all(var >= 0))
        # vmap over elements equals the batched call
        mv, vv = fv(m[:, None], v[:, None])
        np.testing.assert_allclose(mv[:, 0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vv[:, 0], var, rtol=1e-5, atol=1e-6)
        # variance 0 maps to variance 0 (a point stays a point)
        assert bool(jnp.all(jnp.where(v == 0, var, 0) == 0)), (name, mode, var)
        for bw, g in grads.items():
            gm, gv = g(m, v)
            assert bool(jnp.all(jnp.isfinite(gm))) and bool(
                jnp.all(jnp.isfinite(gv))
            ), (name, mode, bw, gm, gv)


def test_activation_eager_equals_jit():
    """Eager (op-by-op) evaluation agrees with the jitted one for every kernel."""
    m = jnp.array([-3.0, -0.2, 0.0, 0.7, 4.0])
    v = jnp.array([0.0, 1e-6, 0.5, 2.0, 9.0])
    for name in ACTS:
        for mode in ("linearized", "matched"):
            y = moments.activation(name, Gaussian(m, v), mode=mode)
            mean, var = _act_fns(name, mode, "float32")[0](m, v)
            np.testing.assert_allclose(y.mean, mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(y.var, var, rtol=1e-5, atol=1e-6)


@functools.cache
def _dense_fns(dtype):
    del dtype

    def f(xm, xv, wm, wv, backward="bp"):
        y = moments.dense(Gaussian(xm, xv), wm, wv, backward=backward)
        return y.mean, y.var

    grads = {
        bw: jax.jit(
            jax.grad(
                lambda xm, xv, wm, wv, bw=bw: jnp.sum(f(xm, xv, wm, wv, bw)[1]),
                (0, 1, 2, 3),
            )
        )
        for bw in ("bp", "autodiff", "bp_fixed_noise")
    }
    vm = jax.jit(jax.vmap(f, in_axes=(0, 0, None, None)))
    return jax.jit(f), vm, grads


@SETTINGS
@given(
    shape=st.sampled_from([(1, 1, 1), (3, 5, 4), (2, 7, 1)]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "float64"]),
    log_scale=st.floats(-6.0, 3.0),
)
def test_dense_properties(shape, seed, dtype, log_scale):
    batch, d_in, d_out = shape
    with jax.enable_x64(dtype == "float64"):
        k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
        scale = float(np.exp(log_scale))
        xm = jax.random.normal(k1, (batch, d_in), dtype)
        xv = scale * jax.random.uniform(k2, (batch, d_in), dtype)
        wm = jax.random.normal(k3, (d_in, d_out), dtype)
        wv = scale * jax.random.uniform(k4, (d_in, d_out), dtype)
        f, fv, grads = _dense_fns(dtype)
        mean, var = f(xm, xv, wm, wv)
        assert mean.shape == (batch, d_out) and mean.dtype == jnp.dtype(dtype)
        assert bool(jnp.all(var >= 0))
        mv, vv = fv(xm, xv, wm, wv)
        np.testing.assert_allclose(mv, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vv, var, rtol=1e-5, atol=1e-5 * scale)
        # weight noise only adds variance
        _, var0 = f(xm, xv, wm, 0 * wv)
        assert bool(jnp.all(var >= var0 * (1 - 1e-5)))
        for bw, g in grads.items():
            for gi, a in zip(g(xm, xv, wm, wv), (xm, xv, wm, wv), strict=True):
                assert gi.shape == a.shape and bool(jnp.all(jnp.isfinite(gi))), bw


@functools.cache
def _pool_fns(kind, window, padding):
    fn = {"avg": moments.avg_pool, "max": moments.max_pool}[kind]

    def f(m, v):
        y = fn(Gaussian(m, v), window, padding=padding)
        return y.mean, y.var

    return jax.jit(f), jax.jit(jax.grad(lambda m, v: jnp.sum(f(m, v)[1]), (0, 1)))


@SETTINGS
@given(
    hw=st.sampled_from([3, 4]),
    window=st.integers(1, 2),
    padding=st.sampled_from(["SAME", "VALID"]),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["avg", "max"]),
)
def test_pool_properties(hw, window, padding, seed, kind):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    m = 3 * jax.random.normal(k1, (2, hw, hw, 2))
    v = jax.random.uniform(k2, (2, hw, hw, 2))
    f, g = _pool_fns(kind, window, padding)
    mean, var = f(m, v)
    out = -(-hw // window) if padding == "SAME" else (hw - window) // window + 1
    assert mean.shape == (2, out, out, 2)
    assert bool(jnp.all(var >= 0)) and bool(jnp.all(jnp.isfinite(mean)))
    # pooling never leaves the range of the inputs' means (and of the zero
    # padding, which average pooling counts) nor exceeds the largest variance
    lo, hi = jnp.minimum(m.min(), 0.0), jnp.maximum(m.max(), 0.0)
    assert bool(jnp.all(mean <= hi + 1e-6)) and bool(jnp.all(mean >= lo - 1e-6))
    assert bool(jnp.all(var <= v.max() * (1 + 1e-5)))
    gm, gv = g(m, v)
    assert bool(jnp.all(jnp.isfinite(gm))) and bool(jnp.all(jnp.isfinite(gv)))
