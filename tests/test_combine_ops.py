"""New moment ops used by the model zoo: product, resize, dropout, transpose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mc_stats import mc_stats

from dualflow import Gaussian, moments, nn

S = 200_000
Z = 5.0  # bound on |estimate - exact| in standard errors (max over a few cells)


def _belief(key, shape, scale=1.0):
    k1, k2 = jax.random.split(key)
    m = scale * jax.random.normal(k1, shape)
    v = scale * jax.random.uniform(k2, shape, minval=0.1, maxval=1.0)
    return Gaussian(m, v)


def _check_mc(out, samples):
    mean, var, se_m, se_v = mc_stats(samples)
    assert np.all(np.abs(np.asarray(out.mean) - mean) <= Z * se_m + 1e-6)
    assert np.all(np.abs(np.asarray(out.var) - var) <= Z * se_v + 1e-6)


def test_multiply_of_independent_gaussians_matches_monte_carlo():
    x = _belief(jax.random.key(0), (2, 3, 1, 4))
    g = _belief(jax.random.key(1), (2, 1, 1, 4))  # broadcast like an SE gate
    out = moments.multiply(x, g)
    kx, kg = jax.random.split(jax.random.key(2))
    sx = x.sample(kx, (S,))
    sg = g.sample(kg, (S,))
    _check_mc(out, sx * sg)


@pytest.mark.parametrize("gshape", [(2, 3, 3, 4), (2, 1, 1, 4)])
def test_multiply_closed_form_and_backward_rules_agree(x64, gshape):
    x = _belief(jax.random.key(3), (2, 3, 3, 4))
    g = _belief(jax.random.key(4), gshape)  # full and SE-gate broadcast
    out = moments.multiply(x, g)
    var = x.mean**2 * g.var + x.var * g.mean**2 + x.var * g.var
    np.testing.assert_allclose(out.mean, x.mean * g.mean, rtol=1e-12)
    np.testing.assert_allclose(out.var, var, rtol=1e-12)

    def loss(xm, xv, gm, gv, backward):
        o = moments.multiply(Gaussian(xm, xv), Gaussian(gm, gv), backward=backward)
        return jnp.sum(jnp.sin(o.mean) + o.var**2)

    args = (x.mean, x.var, g.mean, g.var)
    bp = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, "bp")
    ad = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, "autodiff")
    for a, b in zip(bp, ad, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize("size", [(12, 12), (5, 7)])
def test_resize_of_points_equals_jax_image_resize(size):
    x = jax.random.normal(jax.random.key(5), (2, 8, 6, 3))
    out = moments.resize(x, size)
    ref = jax.image.resize(x, (2, *size, 3), "bilinear")
    np.testing.assert_allclose(out.mean, ref, atol=1e-5)
    np.testing.assert_array_equal(out.var, 0.0)


def test_resize_variance_matches_monte_carlo():
    x = _belief(jax.random.key(6), (1, 4, 3, 2))
    out = moments.resize(x, (7, 5))
    s = x.sample(jax.random.key(7), (S // 4,))
    ref = jax.vmap(lambda a: jax.image.resize(a, (1, 7, 5, 2), "bilinear"))(s)
    _check_mc(out, ref)


def test_bernoulli_dropout_matches_monte_carlo_and_layer():
    x = _belief(jax.random.key(8), (3, 5))
    rate = 0.3
    out = moments.bernoulli_dropout(x, rate)
    kx, kb = jax.random.split(jax.random.key(9))
    sx = x.sample(kx, (S,))
    keep = jax.random.bernoulli(kb, 1 - rate, sx.shape)
    _check_mc(out, jnp.where(keep, sx / (1 - rate), 0.0))
    # the layer: bp marginalises; other methods drop at train time only;
    # mc_dropout leaves it to the weight layers' own input dropout
    layer = nn.Dropout(rate)
    got = layer(x, nn.Context(nn.Method("bp")))
    np.testing.assert_allclose(got.var, out.var)
    pt = x.mean
    det = nn.Method("deterministic")
    same = layer(pt, nn.Context(det, jax.random.key(0)))
    np.testing.assert_array_equal(same, pt)
    dropped = layer(pt, nn.Context(det, jax.random.key(0), train=True))
    assert np.any(np.asarray(dropped) == 0.0)
    kept = np.asarray(dropped) != 0.0
    np.testing.assert_allclose(np.asarray(dropped)[kept], pt[kept] / (1 - rate))
    mc = nn.Context(nn.Method("mc_dropout"), jax.random.key(0), train=True)
    np.testing.assert_array_equal(layer(pt, mc), pt)
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(1.0)


def test_transpose_is_exact():
    x = _belief(jax.random.key(10), (2, 3, 4))
    t = moments.transpose(x, (0, 2, 1))
    np.testing.assert_array_equal(t.mean, jnp.swapaxes(x.mean, 1, 2))
    np.testing.assert_array_equal(t.var, jnp.swapaxes(x.var, 1, 2))


def test_gain_scales_variance_by_square():
    g = nn.Gain(0.5)
    x = _belief(jax.random.key(11), (2, 3))
    y = g(x, nn.Context(nn.Method("bp")))
    np.testing.assert_allclose(y.var, 0.25 * x.var, rtol=1e-6)
    assert isinstance(nnx.state(g, nnx.Param)["gain"], nnx.Variable)
