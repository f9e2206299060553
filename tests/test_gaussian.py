"""The Gaussian pytree: conversions, sampling, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualflow
from dualflow import Gaussian


def test_pytree_roundtrip_and_transforms():
    g = Gaussian(jnp.arange(3.0), jnp.ones(3))
    leaves, treedef = jax.tree_util.tree_flatten(g)
    assert len(leaves) == 2
    g2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(g2, Gaussian)
    doubled = jax.jit(lambda x: Gaussian(2 * x.mean, 4 * x.var))(g)
    np.testing.assert_allclose(doubled.var, 4.0)
    batched = jax.vmap(lambda x: Gaussian(x.mean + 1, x.var))(
        Gaussian(jnp.zeros((5, 3)), jnp.ones((5, 3)))
    )
    assert batched.shape == (5, 3)


def test_natural_parameter_roundtrip(x64):
    g = Gaussian(jnp.array([-2.0, 0.5, 3.0]), jnp.array([0.1, 1.0, 7.0]))
    eta, lam = g.to_natural()
    np.testing.assert_allclose(eta, g.mean / g.var)
    np.testing.assert_allclose(lam, -0.5 / g.var)
    back = Gaussian.from_natural(eta, lam)
    np.testing.assert_allclose(back.mean, g.mean, rtol=1e-14)
    np.testing.assert_allclose(back.var, g.var, rtol=1e-14)
    # canonical form reproduces the log density up to the log-partition A
    x = jnp.array([0.3, -1.0, 2.0])
    A = -(eta**2) / (4 * lam) - 0.5 * jnp.log(-2 * lam) + 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(eta * x + lam * x**2 - A, g.log_prob(x), rtol=1e-12)
    # mean parameters are the gradient of A (conjugate duality)
    dA = jax.grad(
        lambda e, l: jnp.sum(-(e**2) / (4 * l) - 0.5 * jnp.log(-2 * l)), argnums=(0, 1)
    )(eta, lam)
    np.testing.assert_allclose(dA[0], g.mean, rtol=1e-12)
    np.testing.assert_allclose(dA[1], g.second_moment(), rtol=1e-12)


def test_point_and_sampling():
    p = Gaussian.point(jnp.array([1, 2, 3]))
    assert p.dtype == jnp.float32 and jnp.all(p.var == 0)
    g = Gaussian(jnp.array([1.0, -2.0]), jnp.array([0.25, 4.0]))
    s = g.sample(jax.random.PRNGKey(0), (100_000,))
    assert s.shape == (100_000, 2)
    n = s.shape[0]
    np.testing.assert_array_less(jnp.abs(s.mean(0) - g.mean), 5 * jnp.sqrt(g.var / n))
    # sample variance: std error sqrt(2 var^2 / n) for a Gaussian
    np.testing.assert_array_less(
        jnp.abs(s.var(0) - g.var), 5 * jnp.sqrt(2 * g.var**2 / n)
    )


def test_kl_and_entropy_closed_forms(x64):
    q = Gaussian(jnp.array([0.3]), jnp.array([0.5]))
    p = Gaussian(jnp.array([-1.0]), jnp.array([2.0]))
    kl = q.kl(p)
    ref = 0.5 * (math.log(2.0 / 0.5) + (0.5 + 1.3**2) / 2.0 - 1)
    np.testing.assert_allclose(kl, ref, rtol=1e-12)
    np.testing.assert_allclose(q.entropy(), 0.5 * math.log(2 * math.pi * math.e * 0.5))


def test_validation_errors_and_debug_checks():
    with pytest.raises(ValueError, match="mean shape"):
        dualflow.validate(Gaussian(jnp.zeros(2), jnp.zeros(3)))
    with pytest.raises(ValueError, match="dtype"):
        dualflow.validate(Gaussian(jnp.zeros(2), jnp.zeros(2, jnp.int32)))
    bad = Gaussian(jnp.zeros(2), jnp.array([1.0, -1.0]))
    dualflow.validate(bad)  # off by default: no value checks
    dualflow.set_debug_checks(True)
    try:
        with pytest.raises(FloatingPointError, match="negative variances"):
            dualflow.validate(bad)
        with pytest.raises(Exception, match="non-finite means"):
            jax.jit(lambda m: dualflow.moments.relu(Gaussian(m, jnp.ones(2))).mean)(
                jnp.array([jnp.nan, 1.0])
            ).block_until_ready()
    finally:
        dualflow.set_debug_checks(False)


def test_from_logvar_and_from_rho_are_positive_by_construction(x64):
    mean = jnp.array([0.5, -1.0, 2.0])
    g = Gaussian.from_logvar(mean, jnp.log(jnp.array([0.1, 1.0, 7.0])))
    np.testing.assert_allclose(g.var, [0.1, 1.0, 7.0], rtol=1e-14)
    np.testing.assert_allclose(g.logvar(), jnp.log(g.var), rtol=1e-14)
    std = jnp.array([0.1, 1.0, 30.0])
    r = Gaussian.from_rho(mean, jnp.log(jnp.expm1(std)))  # softplus^{-1}(std)
    np.testing.assert_allclose(r.var, std**2, rtol=1e-12)
    np.testing.assert_allclose(r.rho(), jnp.log(jnp.expm1(std)), rtol=1e-12)
    assert Gaussian.from_rho(0.0, 1e3).var == 1e6  # no overflow for large rho
    # any real parameter is a valid variance; gradients are finite
    u = jnp.linspace(-1e3, 80.0, 101)
    for make in (Gaussian.from_logvar, Gaussian.from_rho):
        v = make(jnp.zeros_like(u), u).var
        assert bool(jnp.all(v >= 0)) and bool(jnp.all(jnp.isfinite(v)))
        gr = jax.grad(lambda p, make=make: make(0.0, p).var.sum())(u)
        assert bool(jnp.all(jnp.isfinite(gr)))
    # d var / d logvar = var: relative steps
    np.testing.assert_allclose(
        jax.grad(lambda lv: Gaussian.from_logvar(0.0, lv).var)(jnp.log(0.3)), 0.3
    )
    p = Gaussian.from_logvar(jnp.array([1, 2]), jnp.zeros(2))  # int means -> float
    assert jnp.issubdtype(p.dtype, jnp.floating) and p.var.dtype == p.dtype


def test_constructors_and_sample_run_debug_checks():
    dualflow.set_debug_checks(True)
    try:
        with pytest.raises(FloatingPointError, match=r"from_logvar.var: 1 of 2 non"):
            Gaussian.from_logvar(jnp.zeros(2), jnp.array([0.0, jnp.nan]))
        with pytest.raises(Exception, match=r"from_rho.var: 1 of 3 non-finite"):
            jax.jit(lambda r: Gaussian.from_rho(jnp.zeros(3), r).var)(
                jnp.array([0.0, 1.0, jnp.inf])
            ).block_until_ready()
        with pytest.raises(FloatingPointError, match="from_natural.var: 1 of 2 neg"):
            Gaussian.from_natural(jnp.zeros(2), jnp.array([-1.0, 1.0]))  # lam > 0
        with pytest.raises(Exception, match=r"Gaussian.sample.*first at index \(1,\)"):
            jax.jit(lambda v: Gaussian(jnp.zeros(2), v).sample(jax.random.key(0)))(
                jnp.array([1.0, -1.0])
            ).block_until_ready()
        assert Gaussian.from_logvar(jnp.zeros(2), jnp.zeros(2)).var.shape == (2,)
    finally:
        dualflow.set_debug_checks(False)


def test_construction_is_unchecked_but_use_of_a_host_negative_variance_fails():
    """Documented choice (Gaussian docstring): ``Gaussian(mean, var)`` never
    checks values -- it is also JAX's pytree for gradients of a belief -- but
    a host (NumPy) belief with a negative variance is refused where it is used
    (sample, every moment op), even with debug checks off."""
    assert not dualflow.debug_checks_enabled()
    g = Gaussian(jnp.zeros(2), -jnp.ones(2))  # device array: accepted, unchecked
    assert g.shape == (2,)
    h = Gaussian(np.zeros(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"negative variances \(first at index \(1,\)"):
        h.sample(jax.random.key(0))
    with pytest.raises(ValueError, match="tanh input"):
        dualflow.moments.tanh(h)
    # jitted code: traced values are never checked with debug checks off
    out = jax.jit(lambda m, v: dualflow.moments.tanh(Gaussian(m, v)).mean)(
        jnp.zeros(2), -jnp.ones(2)
    )
    assert out.shape == (2,)
