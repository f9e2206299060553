"""Per-rule tests of ``dualflow.propagate`` on small functions of Gaussians.

Monte Carlo (MC) comparisons draw ``n`` samples in one numpy call (float64,
fixed seeds; numpy because the test XLA runs unoptimised) and use 5-sigma
bounds derived from the sample size: ``|est - mc| <= 5 se`` entry-wise with
``se(mean) = sqrt(var / n)`` and ``se(var) = sqrt((mu4 - var^2) / n)``
(:func:`mc_stats.mc_stats`).  A correct rule then fails with probability
~6e-7 per compared entry.  Rules that are exact (closed forms; bilinear,
linear and structural maps of independent operands) get no other allowance.
Approximate rules get an explicit allowance added to the 5-sigma bound, stated
and justified where it is used:

* quadratures (tanh, logistic, identified activations, generic fused
  programs): ``1e-6 (|mean| + sd)`` / ``1e-6 var`` (documented error of the
  48-point sinh rule <= 3e-7), negligible against MC noise; they are also
  checked against adaptive quadrature at 1e-6 (ELU: see ``REF_RTOL``);
* smooth max (``reduce_max``, max pooling): a rigorous bound on
  ``|E max - max m|`` and ``|Var max - P_top|`` from the relu moments of the
  gaps (``_max_allowance``);
* linearised (log-)softmax: the exact second-order mean term plus
  ``(sum_j v_j)^2`` (higher orders);
* normaliser rule (LayerNorm, RMSNorm, BatchNorm in training): ``q / D``
  terms, ``q`` the second moment of the normalised output (``_norm_allow``).

Each MC comparison prints one line (``pytest -s``) with the largest errors
and their ratio to the tolerance.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from mc_stats import mc_stats
from scipy import integrate, special

import dualflow
from dualflow import Gaussian

pytestmark = pytest.mark.usefixtures("x64")

Z = 5.0  # sigmas
N_EW = 200_000  # samples (element-wise rules: 5 inputs each)
N_MC = 100_000  # samples elsewhere


def _normal(seed: int, mean, var, n=N_MC) -> np.ndarray:
    """``n`` independent draws of ``N(mean, var)``: ``[n, *shape]`` float64,
    one numpy call (numpy: no compilation; XLA runs unoptimised in tests)."""
    mean = np.asarray(mean, np.float64)
    eps = np.random.default_rng(seed).standard_normal((n, *mean.shape))
    return mean + np.sqrt(np.asarray(var, np.float64)) * eps


def mc_check(samples, out: Gaussian, what: str, *, mean_allow=0.0, var_allow=0.0):
    """``|out - MC| <= 5 se + allowance`` for mean and variance (entry-wise).

    ``mean_allow`` / ``var_allow`` (scalars or arrays broadcasting with the
    output) are the stated approximation allowances of the rule under test.
    """
    mc_mean, mc_var, se_m, se_v = mc_stats(samples)
    mean = np.asarray(out.mean, np.float64)
    var = np.asarray(out.var, np.float64)
    assert mean.shape == mc_mean.shape, (what, mean.shape, mc_mean.shape)
    err_m = np.abs(mean - mc_mean)
    err_v = np.abs(var - mc_var)
    tol_m = Z * se_m + mean_allow + 1e-12
    tol_v = Z * se_v + var_allow + 1e-12
    r_m, r_v = float(np.max(err_m / tol_m)), float(np.max(err_v / tol_v))
    print(
        f"[mc] {what}: max|dmean| {err_m.max():.2e} (ratio {r_m:.2f}),"
        f" max|dvar| {err_v.max():.2e} (ratio {r_v:.2f})"
    )
    assert r_m <= 1.0, (what, "mean", r_m, mean, mc_mean, tol_m)
    assert r_v <= 1.0, (what, "var", r_v, var, mc_var, tol_v)


def _g(mean, var) -> Gaussian:
    return Gaussian(jnp.asarray(mean, jnp.float64), jnp.asarray(var, jnp.float64))


def _rand_gaussian(seed: int, shape, scale=1.0, vlo=0.05, vhi=0.5) -> Gaussian:
    rng = np.random.default_rng(seed)
    return _g(scale * rng.standard_normal(shape), rng.uniform(vlo, vhi, shape))


def _matched(fn):
    return dualflow.propagate(fn, mode="matched")


def _assert_same(out: Gaussian, mean, var, rtol=1e-14):
    """Exact rules: the moments are the op applied to means and variances."""
    assert isinstance(out, Gaussian)
    assert out.mean.shape == np.shape(mean) and out.mean.dtype == np.asarray(mean).dtype
    np.testing.assert_allclose(out.mean, mean, rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(out.var, var, rtol=rtol, atol=1e-15)


# ==========================================================================
# 1. element-wise rules, mode="matched", against Monte Carlo
# ==========================================================================
M5 = (-2.0, -0.6, 0.0, 0.5, 1.7)
V5 = (0.5, 1.2, 0.8, 0.05, 2.0)
V5_SMALL = (0.3, 0.6, 0.2, 0.05, 0.5)  # log-normal / cubic: keep mu4 estimable


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


def _x_plus_relu(x):
    return x + jax.nn.relu(x)


def _h_sigmoid_h(h):  # silu written by hand (identified as silu)
    return h * jax.nn.sigmoid(h)


def _x_sigmoid_1702(x):  # not one of dualflow's activations: generic quadrature
    return x * jax.nn.sigmoid(1.702 * x)


def _h_tanh_h(h):  # generic quadrature
    return h * jnp.tanh(h)


def _affine_relu_mix(x):  # P + R a + Q relu(p + q a), no coefficient 0 or 1
    return 1.5 * jnp.maximum(2.0 * x - 1.0, 0.5) - 0.7 * x + 0.2


# name -> (function, variances, kind, kink of f for the adaptive reference);
# kind "exact" (closed form), "quad" (quadrature), "quad_c1" (generic
# quadrature of a C^1 function whose f'' jumps: ELU, see REF_RTOL)
EW_CASES = {
    "exp": (jnp.exp, V5_SMALL, "exact", None),
    "integer_pow2": (lambda x: x**2, V5, "exact", None),
    "integer_pow3": (lambda x: lax.integer_pow(x, 3), V5_SMALL, "exact", None),
    "square": (jnp.square, V5, "exact", None),
    "sin": (jnp.sin, V5, "exact", None),
    "cos": (jnp.cos, V5, "exact", None),
    "abs": (jnp.abs, V5, "exact", 0.0),
    "max_const": (lambda x: jnp.maximum(x, 0.3), V5, "exact", 0.3),
    "min_const": (lambda x: jnp.minimum(x, -0.2), V5, "exact", -0.2),
    "affine_relu_mix": (_affine_relu_mix, V5, "exact", 0.75),
    "erf": (jax.scipy.special.erf, V5, "exact", None),
    "relu": (jax.nn.relu, V5, "exact", 0.0),
    "leaky_relu": (jax.nn.leaky_relu, V5, "exact", 0.0),
    "x_plus_relu": (_x_plus_relu, V5, "exact", 0.0),
    "tanh": (jnp.tanh, V5, "quad", None),
    "logistic": (lax.logistic, V5, "quad", None),
    "sigmoid": (jax.nn.sigmoid, V5, "quad", None),
    "gelu_tanh": (_gelu_tanh, V5, "quad", None),
    "gelu_erf": (_gelu_erf, V5, "quad", None),
    "silu": (jax.nn.silu, V5, "quad", None),
    "softplus": (jax.nn.softplus, V5, "quad", None),
    "elu": (jax.nn.elu, V5, "quad_c1", 0.0),
    "h_sigmoid_h": (_h_sigmoid_h, V5, "quad", None),
    "x_sigmoid_1702": (_x_sigmoid_1702, V5, "quad", None),
    "h_tanh_h": (_h_tanh_h, V5, "quad", None),
}
# Relative allowance of each kind (against MC and adaptive quadrature).
# ELU has no closed form: the generic 48-point sinh rule converges only
# algebraically for a C^1 function with a jump in f'' (measured against
# adaptive quadrature: mean 1.3e-6, variance 1.1e-3 relative; 200 points:
# 3.5e-5).  Everything else is a closed form or a documented <= 3e-7 rule.
REF_RTOL = {"exact": 1e-9, "quad": 1e-6, "quad_c1": (2e-6, 2e-3)}


def _rel_allow(kind):
    r = REF_RTOL[kind]
    return r if isinstance(r, tuple) else (r, r)


@pytest.mark.parametrize("name", list(EW_CASES))
def test_elementwise_matched_vs_monte_carlo(name):
    fn, var, kind, _ = EW_CASES[name]
    x = _g(M5, var)
    out = _matched(fn)(x)
    xs = _normal(list(EW_CASES).index(name), x.mean, x.var, N_EW)
    rm, rv = (0.0, 0.0) if kind == "exact" else _rel_allow(kind)
    scale = np.abs(np.asarray(out.mean)) + np.sqrt(np.asarray(out.var))
    mc_check(
        fn(xs),
        out,
        f"matched {name}",
        mean_allow=rm * scale,
        var_allow=rv * np.asarray(out.var),
    )


def _ref_moments(fn, m, v, kinks):
    """(E f, Var f) of ``f(a)``, ``a ~ N(m, v)``: adaptive quadrature in
    ``z = (a - m) / s``, split at the kinks, two-pass variance (float64)."""
    s = math.sqrt(v)
    kinks = () if kinks is None else np.atleast_1d(kinks)
    zs = sorted([-30.0, 30.0, *(float(np.clip((k - m) / s, -30, 30)) for k in kinks)])

    def expect(g):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            return sum(
                integrate.quad(
                    lambda z: g(m + s * z) * math.exp(-0.5 * z * z),
                    lo,
                    hi,
                    epsrel=1e-13,
                    epsabs=0.0,
                    limit=400,
                )[0]
                for lo, hi in itertools.pairwise(zs)
            ) / math.sqrt(2 * math.pi)

    mean = expect(fn)
    return mean, expect(lambda a: (fn(a) - mean) ** 2)


_SIG = special.expit
NP_FNS = {  # scalar float64 versions of the functions, for scipy.integrate
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "abs": abs,
    "integer_pow3": lambda t: t**3,
    "max_const": lambda t: max(t, 0.3),
    "min_const": lambda t: min(t, -0.2),
    "affine_relu_mix": lambda t: 1.5 * max(2 * t - 1, 0.5) - 0.7 * t + 0.2,
    "erf": math.erf,
    "leaky_relu": lambda t: t if t > 0 else 0.01 * t,
    "x_plus_relu": lambda t: t + max(t, 0.0),
    "tanh": math.tanh,
    "logistic": _SIG,
    "gelu_tanh": lambda t: (
        0.5 * t * (1 + math.tanh(0.7978845608028654 * (t + 0.044715 * t**3)))
    ),
    "gelu_erf": lambda t: t * special.ndtr(t),
    "softplus": lambda t: np.logaddexp(t, 0.0),
    "elu": lambda t: t if t > 0 else math.expm1(t),
    "h_sigmoid_h": lambda t: t * _SIG(t),
    "x_sigmoid_1702": lambda t: t * _SIG(1.702 * t),
    "h_tanh_h": lambda t: t * math.tanh(t),
}


@pytest.mark.parametrize("name", list(NP_FNS))
def test_elementwise_matched_vs_adaptive_quadrature(name):
    """Sharper than MC: closed forms to 1e-9, quadratures to 1e-6."""
    fn, var, kind, kink = EW_CASES[name]
    out = _matched(fn)(_g(M5, var))
    ref = np.array(
        [_ref_moments(NP_FNS[name], m, v, kink) for m, v in zip(M5, var, strict=True)]
    )
    err_m = np.abs(np.asarray(out.mean) - ref[:, 0]) / (
        np.abs(ref[:, 0]) + np.sqrt(ref[:, 1])
    )
    err_v = np.abs(np.asarray(out.var) - ref[:, 1]) / ref[:, 1]
    print(f"[ref] {name}: rel err mean {err_m.max():.1e} var {err_v.max():.1e}")
    rm, rv = _rel_allow(kind)
    assert err_m.max() <= rm and err_v.max() <= rv, (err_m, err_v)


KINKED = {  # name: (function, scalar float64 version, kinks)
    "relu6": (jax.nn.relu6, lambda t: min(max(t, 0.0), 6.0), (0.0, 6.0)),
    "hard_tanh": (jax.nn.hard_tanh, lambda t: min(max(t, -1.0), 1.0), (-1.0, 1.0)),
    "clip": (
        lambda x: jnp.clip(x, -0.5, 2.0),
        lambda t: min(max(t, -0.5), 2.0),
        (-0.5, 2.0),
    ),
    "tanh_of_relu": (
        lambda x: jnp.tanh(jax.nn.relu(x)),
        lambda t: math.tanh(max(t, 0.0)),
        (0.0,),
    ),
}


KINKED_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="not covered: tanh(relu(x)) is a smooth function of a kink, not"
    " piecewise linear; it falls to the generic 48-point sinh quadrature, whose"
    " gain sum w f'(a) has an O(h) error at the jump of f' (nodes do not"
    " straddle the kink), inherited by the Stein variance split: 13% variance"
    " error.  Piecewise-linear programs (relu6, clip, hard_tanh's jnp.where"
    " chain) have the exact rule of dualflow/propagation/piecewise.py.",
)


@pytest.mark.parametrize(
    "name",
    [
        "relu6",
        "clip",
        "hard_tanh",
        pytest.param("tanh_of_relu", marks=KINKED_XFAIL),
    ],
)
def test_kinked_programs_vs_adaptive_quadrature(name):
    """Target 1e-3 (smooth programs reach 1e-6, ELU's f'' jump 1e-3)."""
    fn, np_fn, kinks = KINKED[name]
    out = _matched(fn)(_g(M5, V5))
    ref = np.array(
        [_ref_moments(np_fn, m, v, kinks) for m, v in zip(M5, V5, strict=True)]
    )
    err_v = np.abs(np.asarray(out.var) - ref[:, 1]) / ref[:, 1]
    print(f"[kinked] {name}: var rel err {err_v.max():.1e}")
    assert err_v.max() <= 1e-3, err_v


def _independent_product(a: Gaussian, b: Gaussian) -> Gaussian:
    return Gaussian(
        a.mean * b.mean, a.var * b.var + a.var * b.mean**2 + b.var * a.mean**2
    )


def test_fused_subgraphs_are_not_independent_products():
    """``h * sigmoid(h)`` and ``x + relu(x)`` are matched as one function of
    their input (tests above).  Treating the parts as independent (the
    product / sum rule for different Gaussian values) is far outside the MC
    tolerance, so those MC tests do discriminate fusion from independence."""
    x = _g(M5, V5)
    xs = _normal(101, x.mean, x.var, N_EW)
    sig = _matched(jax.nn.sigmoid)(x)
    relu = _matched(jax.nn.relu)(x)
    wrong = {
        "h_sigmoid_h": (_h_sigmoid_h(xs), _independent_product(x, sig)),
        "x_plus_relu": (
            _x_plus_relu(xs),
            Gaussian(x.mean + relu.mean, x.var + relu.var),
        ),
    }
    for name, (samples, w) in wrong.items():
        mc_mean, mc_var, se_m, se_v = mc_stats(samples)
        r_m = np.abs(np.asarray(w.mean) - mc_mean) / (Z * se_m)
        r_v = np.abs(np.asarray(w.var) - mc_var) / (Z * se_v)
        print(
            f"[indep] {name}: ratio to 5 se: mean {r_m.max():.1f} var {r_v.max():.1f}"
        )
        assert max(r_m.max(), r_v.max()) > 3.0, name
        fused = _matched(EW_CASES[name][0])(x)
        assert not np.allclose(fused.var, w.var, rtol=1e-2), name


def test_independent_gaussian_product_exact():
    x = _g([0.5, -1.0, 2.0, 0.0], [0.3, 1.0, 0.2, 0.7])
    y = _g([1.5, 0.2, -0.4, 0.0], [0.6, 0.1, 0.9, 0.4])
    out = _matched(lambda a, b: a * b)(x, y)
    mc_check(
        _normal(102, x.mean, x.var) * _normal(103, y.mean, y.var),
        out,
        "gaussian * gaussian",
    )
    ref = _independent_product(x, y)
    np.testing.assert_allclose(out.mean, ref.mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(out.var, ref.var, rtol=1e-14)


# ==========================================================================
# weight layers: dot_general and conv_general_dilated (bilinear rule)
# ==========================================================================
DOT_CASES = {
    # name: (einsum spec, lhs shape, rhs shape, which operands are Gaussian)
    "dense_x": ("bi,io->bo", (3, 5), (5, 4), "x"),
    "dense_w": ("bi,io->bo", (3, 5), (5, 4), "w"),
    "dense_both": ("bi,io->bo", (3, 5), (5, 4), "xw"),
    "batch_dims_both": ("bij,bjk->bik", (2, 3, 4), (2, 4, 2), "xw"),
    "batch_dims_w": ("bij,bjk->bik", (2, 3, 4), (2, 4, 2), "w"),
    "two_contracting_both": ("bij,ijk->bk", (2, 3, 2), (3, 2, 3), "xw"),
}


@pytest.mark.parametrize("name", list(DOT_CASES))
def test_dot_general_vs_monte_carlo(name):
    """Exact for independent operands (sums of independent products)."""
    spec, sx, sw, rand = DOT_CASES[name]
    seed = 200 + 10 * list(DOT_CASES).index(name)
    x = _rand_gaussian(seed, sx)
    w = _rand_gaussian(seed + 1, sw, scale=0.7)
    xa = x if "x" in rand else x.mean
    wa = w if "w" in rand else w.mean
    out = _matched(lambda a, b: jnp.einsum(spec, a, b))(xa, wa)
    xs = _normal(seed + 2, x.mean, x.var) if "x" in rand else np.asarray(x.mean)[None]
    ws = _normal(seed + 3, w.mean, w.var) if "w" in rand else np.asarray(w.mean)[None]
    lhs, rhs = spec.split("->")
    a, b = lhs.split(",")
    mc_check(
        np.einsum(f"n{a},n{b}->n{rhs}", xs, ws, optimize=True),
        out,
        f"dot_general {name}",
    )


CONV = dict(
    window_strides=(2, 1),
    padding=((1, 0), (0, 1)),
    lhs_dilation=(1, 2),
    rhs_dilation=(2, 1),
    feature_group_count=2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
)


def _conv(x, w):
    return lax.conv_general_dilated(x, w, **CONV)


CONV_X_SHAPE, CONV_W_SHAPE = (1, 4, 3, 4), (2, 2, 2, 4)


@functools.cache
def _conv_tensor() -> np.ndarray:
    """``T[o, j, k] = d^2 conv_o / dx_j dw_k`` (conv is bilinear)."""
    x0, w0 = jnp.zeros(CONV_X_SHAPE), jnp.zeros(CONV_W_SHAPE)
    jw = jax.jacfwd(lambda x: jax.jacfwd(_conv, argnums=1)(x, w0))(x0)
    t = jnp.reshape(jw, (-1, w0.size, x0.size))
    return np.asarray(jnp.swapaxes(t, 1, 2))


def test_conv_reference_is_bilinear_form():
    """The MC reference below (sparse bilinear form) reproduces lax's conv."""
    x = _rand_gaussian(300, CONV_X_SHAPE).mean
    w = _rand_gaussian(301, CONV_W_SHAPE).mean
    t = _conv_tensor()
    assert set(np.unique(t)) <= {0.0, 1.0}
    y = np.einsum("ojk,j,k->o", t, np.ravel(x), np.ravel(w))
    np.testing.assert_allclose(y, np.ravel(_conv(x, w)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("rand", ["x", "w", "xw"])
def test_conv_general_dilated_vs_monte_carlo(rand):
    """Strides, explicit padding, lhs and rhs dilation, feature groups: exact
    for independent input and kernel entries; MC samples both independently
    and evaluates the conv as its (0/1) bilinear form ``sum T x_j w_k``."""
    x = _rand_gaussian(310, CONV_X_SHAPE)
    w = _rand_gaussian(311, CONV_W_SHAPE, scale=0.6, vlo=0.02, vhi=0.2)
    xa = x if "x" in rand else x.mean
    wa = w if "w" in rand else w.mean
    out = _matched(_conv)(xa, wa)
    t = _conv_tensor()
    o, j, k = np.nonzero(t)  # each output's (input, kernel) pairs, o sorted
    n = N_MC
    xs = _normal(312, x.mean, x.var, n) if "x" in rand else np.asarray(x.mean)[None]
    ws = _normal(313, w.mean, w.var, n) if "w" in rand else np.asarray(w.mean)[None]
    prods = xs.reshape(len(xs), -1)[:, j] * ws.reshape(len(ws), -1)[:, k]
    starts = np.searchsorted(o, np.arange(t.shape[0]))
    ys = np.add.reduceat(prods, starts, axis=1)
    mc_check(ys.reshape(-1, *out.mean.shape), out, f"conv ({rand} random)")


# ==========================================================================
# sums and average pooling (exact for independent entries)
# ==========================================================================
SUM_CASES = {
    "reduce_sum_axis1": lambda x: jnp.sum(x, axis=1),
    "reduce_sum_all": jnp.sum,
    "mean_axis0": lambda x: jnp.mean(x, axis=0),
    "cumsum": lambda x: jnp.cumsum(x, axis=1),
    "cumsum_reverse": lambda x: lax.cumsum(x, axis=0, reverse=True),
    "avg_pool_same": lambda x: nn.avg_pool(x[..., None], (2, 2), (1, 2), "SAME"),
    "avg_pool_valid": lambda x: nn.avg_pool(x[..., None], (2, 3), (1, 1)),
}


def _linear_moments(fn, x: Gaussian):
    """Moments of a linear map of independent entries: ``A m`` and ``A^2 P``."""
    a = jax.jacfwd(fn)(x.mean)
    a = np.reshape(np.asarray(a), (-1, x.mean.size))
    mean = a @ np.ravel(x.mean)
    var = (a * a) @ np.ravel(x.var)
    return mean, var


@pytest.mark.parametrize("name", list(SUM_CASES))
def test_sums_and_avg_pool_exact(name):
    """Exact: equal (1e-13) to ``A m`` and ``(A o A) P`` of the map's matrix,
    and (a check of that reference) within MC error of sampling."""
    fn = SUM_CASES[name]
    x = _rand_gaussian(400, (2, 4, 5))
    out = _matched(fn)(x)
    mean, var = _linear_moments(fn, x)
    np.testing.assert_allclose(np.ravel(out.mean), mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.ravel(out.var), var, rtol=1e-13, atol=1e-14)
    if name in ("cumsum", "avg_pool_same"):
        xs = _normal(401, x.mean, x.var)
        a = np.reshape(np.asarray(jax.jacfwd(fn)(x.mean)), (-1, x.mean.size))
        ys = xs.reshape(len(xs), -1) @ a.T
        mc_check(ys.reshape(-1, *out.mean.shape), out, name)


# ==========================================================================
# max: reduce_max and max pooling (smooth-max rule)
# ==========================================================================
def _relu_m1_m2(mu, var):
    """``E relu(d)``, ``E relu(d)^2`` for ``d ~ N(mu, var)``."""
    s = np.sqrt(var)
    h = mu / s
    cdf, pdf = special.ndtr(h), np.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return mu * cdf + s * pdf, (mu * mu + var) * cdf + mu * s * pdf


def _max_allowance(mp, vp, rule_var):
    """Bounds for the max of independent ``N(mp, vp)`` on the last axis.

    With ``t`` the arg-max of the means and ``S = sum_{j != t} relu(X_j -
    X_t)``: ``X_t <= max <= X_t + S``, so ``0 <= E max - m_t <= E S`` and
    ``|Var max - P_t| <= E S^2 + 2 sqrt(P_t E S^2)`` with
    ``E S^2 <= (k - 1) sum E relu^2``.  The rule's mean is ``m_t``; its
    variance ``sum w^2 P`` differs from ``P_t`` by ``|rule_var - P_t|``.
    """
    t = np.argmax(mp, axis=-1)[..., None]
    m_t = np.take_along_axis(mp, t, -1)
    v_t = np.take_along_axis(vp, t, -1)
    e1, e2 = _relu_m1_m2(mp - m_t, vp + v_t)
    top = np.arange(mp.shape[-1]) == t
    e1, e2 = np.where(top, 0.0, e1), np.where(top, 0.0, e2)
    es, es2 = e1.sum(-1), (mp.shape[-1] - 1) * e2.sum(-1)
    v_t = v_t[..., 0]
    return es, es2 + 2 * np.sqrt(v_t * es2) + np.abs(rule_var - v_t)


# well-separated means: the gap to the top mean is >= 3.3 standard deviations
# of the difference, where the bound of _max_allowance is below the MC
# tolerance.  The rule is exact only in the limit of separated maxima: for
# two equal means N(0, 1) it gives mean 0 and var 1 against E max =
# 1/sqrt(pi) = 0.56 and Var max = 1 - 1/pi = 0.68.
MAX_M = np.array([[0.0, 3.0, -2.0, 6.0], [1.0, 3.2, -0.5, -3.0], [4.5, -1.0, 2.0, 0.0]])
MAX_V = np.array([[0.3, 0.2, 0.4, 0.25], [0.1, 0.15, 0.3, 0.2], [0.25, 0.2, 0.2, 0.1]])


def test_reduce_max_vs_monte_carlo_separated():
    x = _g(MAX_M, MAX_V)
    out = _matched(lambda a: jnp.max(a, axis=1))(x)
    np.testing.assert_allclose(out.mean, MAX_M.max(1), rtol=1e-15)
    ma, va = _max_allowance(MAX_M, MAX_V, np.asarray(out.var))
    print(f"[max] allowance mean {ma.max():.1e} var {va.max():.1e}")
    mc_check(
        _normal(500, MAX_M, MAX_V).max(-1),
        out,
        "reduce_max",
        mean_allow=ma,
        var_allow=va,
    )
    # min is -max(-x)
    out_min = _matched(lambda a: jnp.min(a, axis=1))(_g(-MAX_M, MAX_V))
    np.testing.assert_allclose(out_min.mean, -out.mean, rtol=1e-15)
    np.testing.assert_allclose(out_min.var, out.var, rtol=1e-15)


def test_max_pool_vs_monte_carlo_separated():
    """``flax.linen.max_pool`` (``reduce_window_max``), windows of 2 x 2,
    stride 2: each window holds one row block of ``MAX_M`` (separated)."""
    m = MAX_M.reshape(3, 2, 2).transpose(1, 0, 2).reshape(2, 6)  # [H, W]
    v = MAX_V.reshape(3, 2, 2).transpose(1, 0, 2).reshape(2, 6)

    def pool(a):
        return nn.max_pool(a[None, ..., None], (2, 2), (2, 2))[0, 0, :, 0]

    out = _matched(pool)(_g(m, v))
    np.testing.assert_allclose(out.mean, MAX_M.max(1), rtol=1e-15)
    ma, va = _max_allowance(MAX_M, MAX_V, np.asarray(out.var))
    xs = _normal(501, m, v)
    taps = xs.reshape(-1, 2, 3, 2).transpose(0, 2, 1, 3).reshape(-1, 3, 4)
    mc_check(taps.max(-1), out, "max_pool", mean_allow=ma, var_allow=va)


# ==========================================================================
# (log-)softmax: linearised vector rule
# ==========================================================================
SM_M = np.array([[0.5, -1.0, 1.5, 0.0], [2.0, 2.1, -0.5, 1.0]])
SM_V = 1e-3 * np.array([[1.0, 0.5, 2.0, 1.5], [0.8, 1.2, 0.3, 1.0]])


def _softmax_allowance(f, m, v):
    """First order misses ``0.5 sum_j f_i,jj v_j`` in the mean (computed
    here exactly) and O(v^2) terms: all derivatives of (log-)softmax are
    bounded by 1, so we allow ``(sum_j v_j)^2`` for the rest of the mean and
    for the variance (whose first-order error is O(v^2))."""
    hess = jax.vmap(jax.hessian(f))(jnp.asarray(m))  # [b, i, j, j]
    second = 0.5 * np.einsum("bijj,bj->bi", np.asarray(hess), v)
    rest = v.sum(-1, keepdims=True) ** 2
    return np.abs(second) + rest, rest


@pytest.mark.parametrize(
    "name,mode",
    [
        ("log_softmax", "linearized"),
        ("log_softmax", "matched"),
        ("softmax", "linearized"),
        ("softmax", "matched"),
    ],
)
def test_softmax_linearised_vs_monte_carlo_small_variance(name, mode):
    f = getattr(jax.nn, name)
    x = _g(SM_M, SM_V)
    out = dualflow.propagate(lambda a: f(a, axis=-1), mode=mode)(x)
    ma, va = _softmax_allowance(lambda a: f(a, axis=-1), SM_M, SM_V)
    print(f"[softmax] allowance mean {ma.max():.1e} var {va.max():.1e}")
    mc_check(
        f(_normal(600, SM_M, SM_V), axis=-1),
        out,
        f"{name} ({mode})",
        mean_allow=ma,
        var_allow=va,
    )
    # and it is the documented rule: log_softmax (a named jit) in both modes;
    # the inlined softmax x / sum(x) with x = exp(a - c) in linearized mode
    # (matched mode feeds the ratio rule the exact log-normal moments of x)
    if name == "log_softmax" or mode == "linearized":
        ref = dualflow.propagation.softmax_moments(
            x, (1,), log=name == "log_softmax"
        )
        np.testing.assert_allclose(out.mean, ref.mean, rtol=1e-13)
        np.testing.assert_allclose(out.var, ref.var, rtol=1e-13)


# ==========================================================================
# normalisers: LayerNorm / RMSNorm / BatchNorm (train) hold their statistics
# ==========================================================================
def _perturbed_params(mod, x, seed):
    params = mod.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) + 0.3 * rng.standard_normal(np.shape(a)),
        params,
    )


def _np_norm(xs, kind, p, eps, axis):
    """numpy reference of flax's LayerNorm / RMSNorm / BatchNorm (train)."""
    mu = xs.mean(axis, keepdims=True) if kind != "rms" else 0.0
    var = ((xs - mu) ** 2).mean(axis, keepdims=True)
    y = (xs - mu) / np.sqrt(var + eps) * np.asarray(p["scale"])
    return y + np.asarray(p["bias"]) if "bias" in p else y


def _norm_allow(out: Gaussian, beta, d: int, k_mean=1.0, k_var=2.0):
    """Allowance of the normaliser rule: ``k_mean sqrt(q) / D`` (mean) and
    ``k_var q / D`` (variance) with ``q = var + (mean - beta)^2``.

    Holding the statistics at their means drops their fluctuations, of
    relative size O(1/D) for D summed entries: the delta-method corrections
    (``-2 P_i / D + mean(P) / D`` from the mean, ``(x_i - mu)^2 Var(s^2) /
    (4 s^4)`` and ``Cov(x_i, s^2)`` from the scale) are O(1/D) times the
    second moment ``q`` of the normalised, scaled output.  Measured constants
    on this test's inputs at D = 64 (1e6 samples): mean 0.25-0.43, variance
    0.53-1.35 (LayerNorm / RMSNorm / BatchNorm: 0.38 / 0.25 / 0.43 and
    1.13 / 0.53 / 1.35; largest relative variance error 11-15%, at outputs
    with |mean| >> sd; mean errors <= 2.6% of the sd), so we allow 1 and 2.
    In mode="linearized" the held statistics are those of the mean network
    (no P in s^2): variance errors ~50% at these inputs (not tested).
    """
    q = np.asarray(out.var) + (np.asarray(out.mean) - beta) ** 2
    return k_mean * np.sqrt(q) / d, k_var * q / d


@pytest.mark.parametrize("kind", ["layer", "rms", "batch_train"])
def test_normalisers_vs_monte_carlo_wide(kind):
    d = 64
    shape = (1, d) if kind != "batch_train" else (d, 2)
    x = _rand_gaussian(700, shape, vlo=0.1, vhi=0.5)
    mod, axis = {
        "layer": (nn.LayerNorm(), -1),
        "rms": (nn.RMSNorm(), -1),
        "batch_train": (nn.BatchNorm(use_running_average=False), 0),
    }[kind]
    params = _perturbed_params(mod, x.mean, 701)
    if kind == "batch_train":

        def apply(a):
            return mod.apply(params, a, mutable=["batch_stats"])

        out, upd = jax.jit(_matched(apply))(x)
        # the running mean is an affine function of the batch mean: Gaussian
        assert isinstance(upd["batch_stats"]["mean"], Gaussian)
    else:

        def apply(a):
            return mod.apply(params, a)

        out = jax.jit(_matched(apply))(x)
    p = params["params"]
    eps = mod.epsilon
    np.testing.assert_allclose(
        _np_norm(np.asarray(x.mean), kind, p, eps, axis),
        (apply(x.mean)[0] if kind == "batch_train" else apply(x.mean)),
        rtol=1e-12,
        atol=1e-12,
    )
    ys = _np_norm(
        _normal(702, x.mean, x.var), kind, p, eps, axis + 1 if axis >= 0 else axis
    )
    beta = np.asarray(p.get("bias", 0.0))
    ma, va = _norm_allow(out, beta, d)
    print(f"[norm] allowance mean {ma.max():.1e} var {va.max():.1e}")
    mc_check(ys, out, f"{kind} norm (D={d})", mean_allow=ma, var_allow=va)


def test_batchnorm_inference_exact():
    """Running statistics: an affine map, exact."""
    x = _rand_gaussian(710, (5, 3))
    mod = nn.BatchNorm(use_running_average=True)
    params = _perturbed_params(mod, x.mean, 711)
    params = {
        "params": params["params"],
        "batch_stats": {
            "mean": params["batch_stats"]["mean"],
            "var": jnp.asarray([0.5, 1.3, 2.0]),
        },
    }
    out = _matched(lambda a: mod.apply(params, a))(x)
    s = np.asarray(params["params"]["scale"]) / np.sqrt(
        np.asarray(params["batch_stats"]["var"]) + mod.epsilon
    )
    _assert_same(out, mod.apply(params, x.mean), s * s * np.asarray(x.var), rtol=1e-13)
    mc_check(mod.apply(params, _normal(712, x.mean, x.var)), out, "batchnorm inference")


# ==========================================================================
# 2. mode="linearized": mean = f(m), var = f'(m)^2 v (closed-form check)
# ==========================================================================
LIN_FNS = {
    "tanh": jnp.tanh,
    "sin_exp": lambda x: jnp.sin(jnp.exp(0.5 * x)) + 0.3 * x,
    "x_plus_relu": _x_plus_relu,
    "h_sigmoid_h": _h_sigmoid_h,
    "gelu_tanh": _gelu_tanh,
    "elu": jax.nn.elu,
    "cube_over_cosh": lambda x: x**3 / jnp.cosh(x),
}


@pytest.mark.parametrize("name", list(LIN_FNS))
def test_linearized_is_first_order(name):
    f = LIN_FNS[name]
    m = jnp.array([-1.3, -0.4, 0.2, 0.9, 2.1])  # no kinks (relu'(0) aside)
    v = jnp.array([0.3, 1.0, 0.05, 2.0, 0.7])
    out = dualflow.propagate(f, mode="linearized")(Gaussian(m, v))
    d = jax.vmap(jax.grad(f))(m)
    _assert_same(out, f(m), d * d * v, rtol=1e-13)


# ==========================================================================
# 3. backward: BP == autodiff where the map is Gaussian-linear
# ==========================================================================
def _bn_inference(x, scale, bias, rmean, rvar):
    mod = nn.BatchNorm(use_running_average=True)
    p = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {"mean": rmean, "var": rvar},
    }
    return mod.apply(p, x)


_IDX = np.array([3, 0, 0, 7, 11])


def _structural_chain(x, c):
    y = jnp.concatenate([x.T.reshape(-1), c], 0)  # transpose, reshape, concat
    y = jnp.pad(y, (2, 1))[::-1]  # pad, rev
    y = y[_IDX] + lax.dynamic_slice(y, (4,), (5,))  # gather, dynamic_slice
    return jnp.where(jnp.arange(5) % 2 == 0, y, 2.0 * y).at[_IDX[:3] % 5].add(c[:3])


BP_CASES = {
    # name: (function, builder of its arguments; Gaussians from r.g)
    "dense_x": (
        lambda x, w, b: x @ w + b,
        lambda r: (r.g((3, 4)), r.a((4, 2)), r.a((2,))),
    ),
    "dense_w": (
        lambda x, w, b: jnp.tanh(x) @ w + b,
        lambda r: (r.a((3, 4)), r.g((4, 2)), r.a((2,))),
    ),
    "conv_x": (
        _conv,
        lambda r: (r.g((1, 4, 3, 4)), r.a((2, 2, 2, 4))),
    ),
    "conv_w": (
        _conv,
        lambda r: (r.a((1, 4, 3, 4)), r.g((2, 2, 2, 4))),
    ),
    "structural": (_structural_chain, lambda r: (r.g((3, 4)), r.a((3,)))),
    "sums": (
        lambda x: (
            jnp.cumsum(x, 0).sum(1) + jnp.mean(x) - lax.cumsum(x, 1, reverse=True)[:, 0]
        ),
        lambda r: (r.g((3, 4)),),
    ),
    "avg_pool": (
        lambda x: nn.avg_pool(x, (2, 2), (1, 1), "SAME"),
        lambda r: (r.g((1, 4, 3, 2)),),
    ),
    "affine_chain": (
        lambda x, c: (2.0 * x - 3.0 + x / 4.0) * c - jnp.negative(x) + c,
        lambda r: (r.g((3, 4)), r.a((4,))),
    ),
    "bn_inference": (
        _bn_inference,
        lambda r: (r.g((5, 3)), r.a((3,)), r.a((3,)), r.a((3,)), r.pos((3,))),
    ),
}


class _Args:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def a(self, shape):
        return jnp.asarray(self.rng.standard_normal(shape))

    def pos(self, shape):
        return jnp.asarray(self.rng.uniform(0.5, 1.5, shape))

    def g(self, shape, scale=1.0, vscale=1.0):
        return Gaussian(scale * self.a(shape), vscale * self.pos(shape))


def _loss_fn(fn, backward, mode, cot_seed=0):
    prop = dualflow.propagate(fn, mode=mode, backward=backward)

    def loss(*args):
        out = prop(*args)
        outs = [
            o for o in jax.tree.leaves(out, is_leaf=lambda t: isinstance(t, Gaussian))
        ]
        rng = np.random.default_rng(cot_seed)
        total = 0.0
        for o in outs:
            total += jnp.sum(o.mean * rng.standard_normal(o.mean.shape))
            total += jnp.sum(o.var * rng.standard_normal(o.var.shape))
        return total

    return loss


@pytest.mark.parametrize("name", list(BP_CASES))
def test_bp_equals_autodiff_for_gaussian_linear_maps(name):
    fn, build = BP_CASES[name]
    args = build(_Args(800))
    argnums = tuple(range(len(args)))
    # the modes differ only in element-wise programs: both for affine ones
    modes = ("linearized", "matched") if name == "affine_chain" else ("matched",)
    for mode in modes:
        # (jit: compiling the gradient is cheaper than running it op by op)
        g_bp = jax.jit(jax.grad(_loss_fn(fn, "bp", mode), argnums))(*args)
        g_ad = jax.jit(jax.grad(_loss_fn(fn, "autodiff", mode), argnums))(*args)
        for a, b in zip(jax.tree.leaves(g_bp), jax.tree.leaves(g_ad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g_bp))


def test_autodiff_backward_matches_finite_differences():
    """A nonlinear network, matched mode, ``backward="autodiff"``: the
    directional derivative against central differences.  Rules used: dense
    with both operands random, relu template (closed form), smooth generic
    quadrature (tanh + exp + sigmoid of one value; its nodes are held fixed
    under differentiation, so agreement is to the rule's accuracy), product
    of independent Gaussians, erf (closed form).  Avoided: kinked generic
    programs (test_kinked_programs_vs_adaptive_quadrature) and oscillating
    ones at large variance (``sin(u) + tanh(u)`` at ``v = 80``: 48 nodes
    for ~26 periods; derivatives off by up to 25%)."""

    def net(x, w1, w2, y):
        a = x @ w1
        h = jax.nn.relu(a) + 0.3 * a
        u = h @ w2
        s = 0.5 * jnp.tanh(u) + 0.1 * jnp.exp(0.2 * u) + jax.nn.sigmoid(2.0 * u)
        return s * y + jax.scipy.special.erf(y)

    r = _Args(801)
    args = (r.g((2, 3)), r.g((3, 4), 0.5, 0.1), 0.5 * r.a((4, 2)), r.g((2, 2)))
    loss = jax.jit(_loss_fn(net, "autodiff", "matched"))
    grads = jax.jit(jax.grad(_loss_fn(net, "autodiff", "matched"), (0, 1, 2, 3)))(*args)
    rng = np.random.default_rng(802)
    dirs = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(np.shape(a))), args)
    h = 1e-5

    def shifted(sign):  # variances stay positive: all >= 0.05, |h d| < 1e-4
        return jax.tree.map(lambda a, d: a + sign * h * d, args, dirs)

    fd = (loss(*shifted(1.0)) - loss(*shifted(-1.0))) / (2 * h)
    ad = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(dirs), strict=True)
    )
    print(f"[fd] autodiff {float(ad):.10f} central differences {float(fd):.10f}")
    np.testing.assert_allclose(ad, fd, rtol=1e-7)


# ==========================================================================
# 4. structural ops: the op applied to means and to variances
# ==========================================================================
STRUCT_C = np.random.default_rng(901).standard_normal((3, 4))
STRUCT_CASES = {
    # name: (fn(x, c) with x Gaussian [3, 4], c plain [3, 4]; var_fn(v, c0))
    "broadcast_in_dim": lambda x, c: jnp.broadcast_to(x[:, None, :], (3, 2, 4)),
    "reshape": lambda x, c: x.reshape(2, 6),
    "transpose": lambda x, c: x.T,
    "squeeze": lambda x, c: lax.squeeze(x[None], (0,)),
    "expand_dims": lambda x, c: jnp.expand_dims(x, 1),
    "concatenate": lambda x, c: jnp.concatenate([x, c], axis=1),
    "slice": lambda x, c: x[1:, ::2],
    "dynamic_slice": lambda x, c: lax.dynamic_slice(x, (1, 1), (2, 2)),
    "gather": lambda x, c: x[jnp.array([2, 0, 2]), 1:],
    "gather_2d": lambda x, c: x[jnp.array([0, 2, 1]), jnp.array([3, 3, 0])],
    "scatter_add_plain": lambda x, c: x.at[jnp.array([0, 2, 0])].add(c[:3]),
    "pad": lambda x, c: lax.pad(x, 0.5, ((1, 2, 1), (-1, 0, 0))),
    "rev": lambda x, c: jnp.flip(x, (0, 1)),
    "select_n_plain": lambda x, c: jnp.where(STRUCT_C > 0, x, c),
    "select_n_three": lambda x, c: lax.select_n(
        jnp.asarray(np.arange(12).reshape(3, 4) % 3, jnp.int32), x, c, 2 * x
    ),
    "convert_element_type": lambda x, c: x.astype(jnp.float32),
    "stop_gradient": lambda x, c: lax.stop_gradient(x),
    "stop_gradient_fused": lambda x, c: 2.0 * lax.stop_gradient(x) + x,
}
# expected variance where the value is not fn(v, 0)
STRUCT_VAR = {
    "select_n_three": lambda v: lax.select_n(
        jnp.asarray(np.arange(12).reshape(3, 4) % 3, jnp.int32), v, 0 * v, 4 * v
    ),
    "stop_gradient_fused": lambda v: 9.0 * v,
    "pad": lambda v: lax.pad(v, 0.0, ((1, 2, 1), (-1, 0, 0))),
    "select_n_plain": lambda v: jnp.where(STRUCT_C > 0, v, 0.0),
}


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("name", list(STRUCT_CASES))
def test_structural_ops_exact(name, mode):
    fn = STRUCT_CASES[name]
    x = _rand_gaussian(900, (3, 4))
    c = jnp.asarray(STRUCT_C)
    out = dualflow.propagate(fn, mode=mode)(x, c)
    if name in STRUCT_VAR:
        var = STRUCT_VAR[name](x.var)
    else:
        var = fn(x.var, jnp.zeros_like(c))
    _assert_same(out, fn(x.mean, c), var)


TWO_GAUSSIAN_CASES = {
    "concatenate": lambda x, y: jnp.concatenate([x, y[:, :2]], axis=1),
    "scatter_add": lambda x, y: x.at[jnp.array([1, 1, 0])].add(y),
    "select_n": lambda x, y: jnp.where(jnp.arange(4) % 3 == 0, x, y),
    "dynamic_update_slice": lambda x, y: lax.dynamic_update_slice(x, y[:2, :2], (1, 2)),
    "pad_gaussian_value": lambda x, y: lax.pad(x, y[0, 0], ((1, 0, 0), (0, 1, 1))),
}


@pytest.mark.parametrize("name", list(TWO_GAUSSIAN_CASES))
def test_structural_ops_two_gaussians_exact(name):
    """Both data operands Gaussian (independent): the op on means and vars;
    scatter-add with repeated indices adds variances (independent summands)."""
    fn = TWO_GAUSSIAN_CASES[name]
    x = _rand_gaussian(910, (3, 4))
    y = _rand_gaussian(911, (3, 4))
    out = _matched(fn)(x, y)
    _assert_same(out, fn(x.mean, y.mean), fn(x.var, y.var))


def test_scatter_add_repeated_indices_vs_monte_carlo():
    x = _rand_gaussian(920, (3, 4))
    y = _rand_gaussian(921, (3, 4))
    fn = TWO_GAUSSIAN_CASES["scatter_add"]
    out = _matched(fn)(x, y)
    xs, ys = _normal(922, x.mean, x.var), _normal(923, y.mean, y.var)
    mc_check(jax.vmap(fn)(xs, ys), out, "scatter-add (repeated indices)")


def test_dynamic_slice_traced_index():
    """A deterministic traced index (an argument) is fine."""
    x = _rand_gaussian(930, (6,))
    fn = dualflow.propagate(lambda a, i: lax.dynamic_slice(a, (i,), (3,)))
    out = fn(x, jnp.asarray(2))
    _assert_same(out, x.mean[2:5], x.var[2:5])


# ==========================================================================
# 5. loops: a linear Gaussian recurrence gives the Kalman variance recursion
# ==========================================================================
A_REC = 0.8
T_REC = 6


def _recursion(h0: Gaussian, xs: Gaussian):
    """``h_t = a h_{t-1} + x_t``: ``m_t = a m_{t-1} + m_x``,
    ``P_t = a^2 P_{t-1} + P_x`` (independent innovations)."""
    m, p = np.asarray(h0.mean), np.asarray(h0.var)
    ms, ps = [], []
    for t in range(xs.mean.shape[0]):
        m = A_REC * m + np.asarray(xs.mean[t])
        p = A_REC**2 * p + np.asarray(xs.var[t])
        ms.append(m)
        ps.append(p)
    return np.stack(ms), np.stack(ps)


def _scan_fn(h0, xs):
    def step(h, x):
        h = A_REC * h + x
        return h, h

    return lax.scan(step, h0, xs)


def _fori_fn(h0, xs):
    return lax.fori_loop(0, T_REC, lambda t, h: A_REC * h + xs[t], h0)


def _while_fn(h0, xs):
    def body(c):
        t, h = c
        return t + 1, A_REC * h + xs[t]

    return lax.while_loop(lambda c: c[0] < T_REC, body, (0, h0))[1]


@pytest.mark.parametrize("h0_random", [True, False])
@pytest.mark.parametrize("loop", ["scan", "fori_loop", "while_loop"])
def test_linear_recurrence_loops_exact(loop, h0_random):
    xs = _rand_gaussian(1000, (T_REC, 3))
    h0 = _rand_gaussian(1001, (3,)) if h0_random else _g(np.ones(3), np.zeros(3))
    m, p = _recursion(h0, xs)
    h0_arg = h0 if h0_random else h0.mean
    for mode in ("linearized", "matched"):
        if loop == "scan":
            last, hs = dualflow.propagate(_scan_fn, mode=mode)(h0_arg, xs)
            _assert_same(hs, m, p, rtol=1e-13)
        else:
            fn = _fori_fn if loop == "fori_loop" else _while_fn
            last = dualflow.propagate(fn, mode=mode)(h0_arg, xs)
        _assert_same(last, m[-1], p[-1], rtol=1e-13)


def test_scan_recurrence_vs_monte_carlo():
    xs = _rand_gaussian(1010, (T_REC, 3))
    h0 = _rand_gaussian(1011, (3,))
    _, hs = _matched(_scan_fn)(h0, xs)
    s_h0, s_xs = _normal(1012, h0.mean, h0.var), _normal(1013, xs.mean, xs.var)
    hs_mc = []
    h = s_h0
    for t in range(T_REC):
        h = A_REC * h + s_xs[:, t]
        hs_mc.append(h)
    mc_check(np.stack(hs_mc, 1), hs, "scan recurrence")


@pytest.mark.parametrize(
    "name,fn,np_fn,kinks",
    [
        ("relu6", jax.nn.relu6, lambda t: min(max(t, 0.0), 6.0), (0.0, 6.0)),
        (
            "x+relu(x)-2relu(x-1)",
            lambda x: x + jax.nn.relu(x) - 2.0 * jax.nn.relu(x - 1.0),
            lambda t: t + max(t, 0.0) - 2.0 * max(t - 1.0, 0.0),
            (0.0, 1.0),
        ),
        (
            "min(relu(2x-1),4)",
            lambda x: jnp.minimum(jax.nn.relu(2.0 * x - 1.0), 4.0),
            lambda t: min(max(2.0 * t - 1.0, 0.0), 4.0),
            (0.5, 2.5),
        ),
        (
            "max(-relu(x),-2) (decreasing)",
            lambda x: jnp.maximum(-jax.nn.relu(x), -2.0),
            lambda t: max(-max(t, 0.0), -2.0),
            (0.0, 2.0),
        ),
    ],
)
def test_piecewise_linear_programs_are_exact(name, fn, np_fn, kinks, x64):
    """Sums of relus of one value and max/min chains of them (relu6, clip):
    the closed form of dualflow/propagation/piecewise.py equals adaptive
    quadrature split at the kinks."""
    out = _matched(fn)(_g(M5, V5))
    ref = np.array(
        [_ref_moments(np_fn, m, v, kinks) for m, v in zip(M5, V5, strict=True)]
    )
    np.testing.assert_allclose(out.mean, ref[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.var, ref[:, 1], rtol=1e-9, atol=1e-12)
