"""The im2col convolution (dualflow/moments/_conv_cpu.py) against lax.

Forward values and gradients w.r.t. inputs and kernels agree with
``lax.conv_general_dilated`` (float64 to 1e-12, float32 to rounding) over
strides, padding, kernel dilation, groups, 1-D/2-D and layouts; ``moments.conv``
(BP and autodiff) and ``nn.Conv`` dispatch through the same switch.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from dualflow import Gaussian, moments
from dualflow import nn as dnn
from dualflow.moments import _conv_cpu as cc

PADDINGS = ("SAME", "VALID", "SAME_LOWER", "explicit", "negative")
CONFIGS = list(itertools.product((1, 2), (1, 2), PADDINGS, (1, 2), (1, 2)))


def _layout(nsp: int) -> tuple[str, str, str]:
    sp = "HW"[-nsp:]
    return f"N{sp}C", f"{sp}IO", f"N{sp}C"


def _case(nsp, stride, padding, dil, groups, dtype, seed=0):
    rng = np.random.default_rng(seed)
    cin, cout = 4, 6
    x = jnp.asarray(rng.normal(size=(2, *(7,) * nsp, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(*(3,) * nsp, cin // groups, cout)), dtype)
    pad = {"explicit": ((1, 2),) * nsp, "negative": ((-1, 2),) * nsp}.get(
        padding, padding
    )
    kw = dict(
        window_strides=(stride,) * nsp,
        padding=pad,
        rhs_dilation=(dil,) * nsp,
        dimension_numbers=_layout(nsp),
        feature_group_count=groups,
    )
    return x, w, kw


def _fwd_and_grads(conv, x, w, kw):
    out, vjp = jax.vjp(lambda a, b: conv(a, b, **kw), x, w)
    g = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return (out, *vjp(g))


def _im2col(x, w, **kw):
    out = cc.im2col_conv(x, w, **kw)
    assert out is not None
    return out


def _close(got, want, tol):
    for a, b in zip(got, want, strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1.0)
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0, atol=tol * scale
        )


@pytest.mark.parametrize("nsp, stride, padding, dil, groups", CONFIGS)
def test_im2col_matches_lax_float64(x64, nsp, stride, padding, dil, groups):
    x, w, kw = _case(nsp, stride, padding, dil, groups, jnp.float64)
    got = _fwd_and_grads(_im2col, x, w, kw)
    want = _fwd_and_grads(lax.conv_general_dilated, x, w, kw)
    _close(got, want, 1e-12)


@pytest.mark.parametrize("nsp, stride, padding", [(1, 2, "SAME"), (2, 1, "VALID")])
@pytest.mark.parametrize("groups", [1, 2])
def test_im2col_matches_lax_float32(nsp, stride, padding, groups):
    x, w, kw = _case(nsp, stride, padding, 1, groups, jnp.float32)
    kw["precision"] = lax.Precision.HIGHEST
    got = _fwd_and_grads(_im2col, x, w, kw)
    want = _fwd_and_grads(lax.conv_general_dilated, x, w, kw)
    _close(got, want, 1e-5)


def test_im2col_any_dimension_numbers(x64):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 7)))  # NCHW
    w = jnp.asarray(rng.normal(size=(5, 3, 3, 2)))  # OIHW
    for dn in [("NCHW", "OIHW", "NCHW"), ("NCHW", "OIHW", "NHWC")]:
        kw = dict(window_strides=(2, 1), padding="SAME", dimension_numbers=dn)
        got = _fwd_and_grads(_im2col, x, w, kw)
        _close(got, _fwd_and_grads(lax.conv_general_dilated, x, w, kw), 1e-12)


def _primitives(fn, *args) -> set[str]:
    """Primitives of a fresh trace (``make_jaxpr`` caches traces per function,
    and the conv choice is made at trace time)."""
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}


def test_dispatch_setting_env_and_fallbacks(monkeypatch):
    x, w, kw = _case(2, 1, "SAME", 1, 1, jnp.float32)

    def f(a, b, **extra):
        return cc.conv_general_dilated(a, b, **{**kw, **extra})

    assert cc.conv_impl() == "auto"
    assert "conv_general_dilated" in _primitives(f, x, w)  # auto: lax (measured)
    with cc.using_conv_impl("im2col"):
        assert "conv_general_dilated" not in _primitives(f, x, w)
        # no im2col for input dilation or (unless forced) groups
        assert "conv_general_dilated" in _primitives(
            lambda a, b: f(a, b, lhs_dilation=(2, 2), padding=((1, 1), (1, 1))), x, w
        )
        w2 = w[:, :, :2]
        assert "conv_general_dilated" in _primitives(
            lambda a, b: f(a, b, feature_group_count=2), x, w2
        )
        with cc.using_conv_impl("im2col_groups"):
            assert "conv_general_dilated" not in _primitives(
                lambda a, b: f(a, b, feature_group_count=2), x, w2
            )
    assert cc.conv_impl() == "auto"
    monkeypatch.setenv(cc.ENV_VAR, "im2col")
    assert "conv_general_dilated" not in _primitives(f, x, w)
    monkeypatch.setenv(cc.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DUALFLOW_CONV_IMPL"):
        f(x, w)
    with pytest.raises(ValueError, match="set_conv_impl"):
        cc.set_conv_impl("fastest")


def test_three_d_and_empty_outputs_fall_back_to_lax():
    x3 = jnp.ones((1, 4, 4, 4, 2))
    w3 = jnp.ones((2, 2, 2, 2, 3))
    dn3 = ("NDHWC", "DHWIO", "NDHWC")
    with cc.using_conv_impl("im2col"):
        out = cc.conv_general_dilated(x3, w3, (1, 1, 1), "VALID", dimension_numbers=dn3)
        assert out.shape == (1, 3, 3, 3, 3)
        x, w = jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1))
        dn = ("NHWC", "HWIO", "NHWC")
        out = cc.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)
        assert out.shape == (1, 0, 0, 1)


@pytest.mark.parametrize("backward", ["bp", "autodiff", "bp_fixed_noise"])
@pytest.mark.parametrize(
    "stride, padding, groups", [(1, "SAME", 1), (2, "VALID", 1), (1, "SAME", 2)]
)
def test_moments_conv_im2col_equals_lax(x64, backward, stride, padding, groups):
    """Mean, variance and all four gradients of ``moments.conv`` agree."""
    rng = np.random.default_rng(2)
    m = jnp.asarray(rng.normal(size=(2, 6, 6, 4)))
    P = jnp.asarray(rng.uniform(0.1, 1.0, size=m.shape))
    mu = jnp.asarray(rng.normal(size=(3, 3, 4 // groups, 6)))
    s2 = jnp.asarray(rng.uniform(0.01, 0.1, size=mu.shape))

    def loss(m, P, mu, s2):
        y = moments.conv(
            Gaussian(m, P), mu, s2, strides=stride, padding=padding,
            feature_group_count=groups, backward=backward,
        )  # fmt: skip
        return jnp.sum(jnp.sin(y.mean)) + jnp.sum(jnp.cos(y.var)), y

    def run(impl):
        with cc.using_conv_impl(impl):
            (_, y), g = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(
                m, P, mu, s2
            )
        return (y.mean, y.var, *g)

    _close(run("im2col_groups"), run("lax"), 1e-12)


def test_nn_conv_deterministic_and_sampling_paths_dispatch():
    layer = dnn.Conv(3, 4, 3, strides=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    for name in ("deterministic", "local_reparam"):
        method = dnn.Method(name)

        def f(x, method=method):
            return dnn.apply(layer, x, method, key=jax.random.key(1))

        with cc.using_conv_impl("im2col"):
            jaxpr = str(jax.make_jaxpr(lambda x: f(x))(x))
            y_im2col = f(x)
        assert "conv_general_dilated" not in jaxpr
        with cc.using_conv_impl("lax"):
            assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: f(x))(x))
            y_lax = f(x)
        np.testing.assert_allclose(y_im2col, y_lax, rtol=1e-5, atol=1e-5)
