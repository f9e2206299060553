"""One variance product over a doubled contraction axis, and no variance
product for point inputs (issue 22 item 5).

``Var = op(m^2, s2) + op(P, mu^2 + s2)`` is computed as
``op([m^2, P], [s2; mu^2 + s2])`` for dense and ungrouped conv, and as
``op(m^2, s2)`` when the input is a plain array.  Values and gradients must
equal the two-product formulas (float64, 1e-12) for every backward rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualflow import Gaussian, moments
from dualflow.moments import linear

BACKWARDS = ("bp", "autodiff", "bp_fixed_noise")
# (conv fused, dense fused, point skip) as imported, before any fixture
DEFAULTS = (
    linear._FUSE_CONV_VARIANCE,
    linear._FUSE_DENSE_VARIANCE,
    linear._SKIP_POINT_VARIANCE,
)


def _dense_case(rng):
    m = rng.normal(size=(5, 7))
    P = rng.uniform(0.1, 1.0, size=m.shape)
    mu = rng.normal(size=(7, 3))
    s2 = rng.uniform(0.01, 0.2, size=mu.shape)
    return m, P, mu, s2


def _conv_case(rng, groups=1):
    m = rng.normal(size=(2, 6, 6, 4))
    P = rng.uniform(0.1, 1.0, size=m.shape)
    mu = rng.normal(size=(3, 3, 4 // groups, 6))
    s2 = rng.uniform(0.01, 0.2, size=mu.shape)
    return m, P, mu, s2


LAYERS = {
    "dense": (_dense_case, lambda x, mu, s2, bw: moments.dense(x, mu, s2, backward=bw)),
    "conv": (
        _conv_case,
        lambda x, mu, s2, bw: moments.conv(x, mu, s2, strides=2, backward=bw),
    ),
    "conv_groups": (
        lambda rng: _conv_case(rng, groups=2),
        lambda x, mu, s2, bw: moments.conv(
            x, mu, s2, feature_group_count=2, backward=bw
        ),
    ),
}


def _value_and_grads(layer, backward, point, m, P, mu, s2):
    """Output moments and the gradients of a nonlinear scalar loss of them
    w.r.t. ``m``, ``mu``, ``s2`` (and ``P`` unless the input is a point)."""

    def loss(m, P, mu, s2):
        x = m if point else Gaussian(m, P)
        y = layer(x, mu, s2, backward)
        return jnp.sum(jnp.sin(y.mean)) + jnp.sum(jnp.sqrt(y.var + 1.0)), y

    (_, y), g = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(m, P, mu, s2)
    return [y.mean, y.var, *g]


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    """Fusion on for both ops (dense is off by default: slower on CPU)."""
    monkeypatch.setattr(linear, "_FUSE_DENSE_VARIANCE", True)
    monkeypatch.setattr(linear, "_FUSE_CONV_VARIANCE", True)


def _unfused(monkeypatch):
    monkeypatch.setattr(linear, "_FUSE_DENSE_VARIANCE", False)
    monkeypatch.setattr(linear, "_FUSE_CONV_VARIANCE", False)
    monkeypatch.setattr(linear, "_SKIP_POINT_VARIANCE", False)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("point", [False, True], ids=["gaussian", "point"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fused_equals_two_products(x64, monkeypatch, name, point, backward):
    make, layer = LAYERS[name]
    args = [jnp.asarray(a) for a in make(np.random.default_rng(0))]
    if point:
        args[1] = jnp.zeros_like(args[1])
    got = _value_and_grads(layer, backward, point, *args)
    _unfused(monkeypatch)
    want = _value_and_grads(layer, backward, point, *args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_dense_matches_the_closed_form(x64):
    m, P, mu, s2 = _dense_case(np.random.default_rng(1))
    y = moments.dense(Gaussian(jnp.asarray(m), jnp.asarray(P)), mu, s2)
    np.testing.assert_allclose(y.mean, m @ mu, rtol=1e-12)
    np.testing.assert_allclose(y.var, (m * m) @ s2 + P @ (mu * mu + s2), rtol=1e-12)
    yp = moments.dense(jnp.asarray(m), mu, s2)
    np.testing.assert_allclose(yp.var, (m * m) @ s2, rtol=1e-12)


@pytest.mark.parametrize("point", [False, True])
def test_point_input_bp_equals_autodiff(x64, point):
    """The point-input BP rule is still the exact adjoint (w.r.t. ``m`` too)."""
    args = [jnp.asarray(a) for a in _dense_case(np.random.default_rng(2))]
    layer = LAYERS["dense"][1]
    bp = _value_and_grads(layer, "bp", point, *args)
    ad = _value_and_grads(layer, "autodiff", point, *args)
    for a, b in zip(bp, ad, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_defaults():
    """Measured choices (docs/benchmarks.md): conv fused, dense not, point
    inputs skip the variance product."""
    assert DEFAULTS == (True, False, True)


def _n_products(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    text = str(jaxpr)
    return text.count("dot_general[") + text.count("conv_general_dilated[")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_product_counts(name):
    """Forward: 2 products (mean, fused variance); 3 for grouped convs (no
    fusion); a point input has 2 (mean, ``op(m^2, s2)``)."""
    make, layer = LAYERS[name]
    m, P, mu, s2 = (jnp.asarray(a, jnp.float32) for a in make(np.random.default_rng(3)))
    gauss = _n_products(lambda m, P: layer(Gaussian(m, P), mu, s2, "bp"), m, P)
    point = _n_products(lambda m: layer(m, mu, s2, "bp"), m)
    assert gauss == (3 if name == "conv_groups" else 2)
    assert point == 2

    def loss(m, mu, s2):
        y = layer(m, mu, s2, "bp")
        return jnp.sum(y.mean) + jnp.sum(y.var)

    # point input, BP: forward 2; backward per product one (dead, removed by
    # XLA) primal inside jax.vjp + two adjoints: 2 + 2 * 3, no P products
    assert _n_products(jax.grad(loss, (0, 1, 2)), m, mu, s2) == 2 + 2 * 3
