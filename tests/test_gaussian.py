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
