"""The belief-propagation backward rule (custom_vjp) against autodiff.

(b) Gaussian-linear networks (identity activations, linear pooling, residual
    adds, concatenation): BP gradients equal autodiff gradients to float64
    precision, including the weight-noise dependence on the incoming mean.
Nonlinear networks: the two differ exactly where documented, and converge as
the weight variances go to 0 (Theorem 2(3)), where BP becomes plain backprop.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualflow import Gaussian, moments, objectives


def rel_err(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / den


def _conv_params(key, kernel, var=0.05):
    k1, k2, k3 = jax.random.split(key, 3)
    return dict(
        w_mean=0.4 * jax.random.normal(k1, kernel),
        w_var=var * jax.random.uniform(k2, kernel, minval=0.2, maxval=1.0),
        b_mean=0.1 * jax.random.normal(k3, kernel[-1:]),
        b_var=0.01 * jax.random.uniform(k3, kernel[-1:]),
    )


def _linear_net_params(key):
    ks = jax.random.split(key, 5)
    return {
        "c1": _conv_params(ks[0], (3, 3, 2, 4)),
        "c2": _conv_params(ks[1], (3, 3, 4, 4)),
        "c3": _conv_params(ks[2], (1, 1, 4, 2)),
        "d1": _conv_params(ks[3], (6 * 3 * 3, 5)),
        "d2": _conv_params(ks[4], (5, 2)),
    }


def _linear_net(params, x, backward):
    """conv -> avg_pool -> residual conv -> concat -> flatten -> dense x2."""
    h = moments.conv(x, **params["c1"], backward=backward)
    h = moments.identity(h, backward=backward)
    h = moments.avg_pool(h, 2, backward=backward)  # 6x6 -> 3x3
    r = moments.conv(h, **params["c2"], backward=backward)
    h = moments.add(h, moments.scale(r, 0.5))
    h = moments.concatenate([h, moments.conv(h, **params["c3"], backward=backward)])
    g = moments.global_avg_pool(h)  # exercise it too
    h = moments.flatten(h)
    h = moments.dense(h, **params["d1"], backward=backward)
    h = moments.add(
        h,
        moments.dense(
            g, params["d1"]["w_mean"][:6], params["d1"]["w_var"][:6], backward=backward
        ),
    )
    return moments.dense(h, **params["d2"], backward=backward)


def _loss(params, x, y, backward):
    out = _linear_net(params, x, backward)
    return objectives.gaussian_nll(out, y, 0.1).sum()


def test_bp_equals_autodiff_on_gaussian_linear_network(x64):
    key = jax.random.PRNGKey(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = _linear_net_params(kp)
    x = Gaussian(
        jax.random.normal(kx, (3, 6, 6, 2)),
        jax.random.uniform(kx, (3, 6, 6, 2), minval=0.01, maxval=0.3),
    )
    y = jax.random.normal(ky, (3, 2))
    assert x.dtype == jnp.float64
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=3)
    g_bp = grad(params, x, y, "bp")
    g_ad = grad(params, x, y, "autodiff")
    err = rel_err(g_bp, g_ad)
    assert err < 1e-8, err


def test_bp_dense_equals_finite_differences(x64):
    key = jax.random.PRNGKey(1)
    p = _conv_params(key, (4, 3), var=0.2)
    x = Gaussian(jax.random.normal(key, (2, 4)), 0.3 * jnp.ones((2, 4)))
    y = jnp.ones((2, 3))

    def f(wm, wv, xm, xv):
        out = moments.dense(Gaussian(xm, xv), wm, wv, p["b_mean"], p["b_var"])
        return objectives.gaussian_nll(out, y, 0.2).sum()

    args = (p["w_mean"], p["w_var"], x.mean, x.var)
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
    eps = 1e-6
    for i, g in enumerate(grads):
        flat = np.asarray(args[i]).ravel()
        for j in range(0, flat.size, 3):
            d = np.zeros_like(flat)
            d[j] = eps
            up = list(args)
            dn = list(args)
            up[i] = args[i] + d.reshape(args[i].shape)
            dn[i] = args[i] - d.reshape(args[i].shape)
            fd = (f(*up) - f(*dn)) / (2 * eps)
            np.testing.assert_allclose(
                np.asarray(g).ravel()[j], fd, rtol=1e-6, atol=1e-9
            )


def test_fixed_noise_variant_is_paper_rule_not_gradient(x64):
    """backward='bp_fixed_noise' = App. A literal rule: input sensitivities ignore
    the weight-noise term; weight gradients are unchanged."""
    key = jax.random.PRNGKey(2)
    p = _conv_params(key, (4, 3), var=0.2)
    x = Gaussian(jax.random.normal(key, (2, 4)), 0.3 * jnp.ones((2, 4)))

    def out(backward, wm, wv, xm, xv):
        return moments.dense(Gaussian(xm, xv), wm, wv, backward=backward)

    args = (p["w_mean"], p["w_var"], x.mean, x.var)
    gm = jax.random.normal(key, (2, 3))
    gv = jax.random.uniform(key, (2, 3))
    cot = Gaussian(gm, gv)
    _, vjp_exact = jax.vjp(lambda *a: out("bp", *a), *args)
    _, vjp_fixed = jax.vjp(lambda *a: out("bp_fixed_noise", *a), *args)
    ex = vjp_exact(cot)
    fx = vjp_fixed(cot)
    np.testing.assert_allclose(fx[0], ex[0], rtol=1e-12)  # w_mean grads equal
    np.testing.assert_allclose(fx[1], ex[1], rtol=1e-12)  # w_var grads equal
    mu, s2 = p["w_mean"], p["w_var"]
    np.testing.assert_allclose(fx[2], gm @ mu.T, rtol=1e-12)
    np.testing.assert_allclose(fx[3], gv @ (mu**2).T, rtol=1e-12)
    np.testing.assert_allclose(ex[2] - fx[2], 2 * x.mean * (gv @ s2.T), rtol=1e-10)
    np.testing.assert_allclose(ex[3] - fx[3], gv @ s2.T, rtol=1e-10)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "gelu", "relu"])
def test_linearized_bp_differs_only_by_jacobian_mean_dependence(name, x64):
    """Linearized: autodiff d/dm = f'(m) g_mean + 2 f'(m) f''(m) v g_var;
    BP drops the second term. The variance path is identical."""
    m = jnp.array([-1.2, -0.3, 0.4, 1.7])
    v = jnp.array([0.5, 0.1, 0.2, 1.0])
    gm = jnp.array([0.3, -1.0, 0.7, 0.2])
    gv = jnp.array([1.1, 0.4, -0.6, 0.9])
    act = getattr(moments, name)
    res = {}
    for bw in ("bp", "autodiff"):
        _, vjp = jax.vjp(lambda a, b, bw=bw: act(Gaussian(a, b), backward=bw), m, v)
        res[bw] = vjp(Gaussian(gm, gv))
    f = {
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": lambda t: t * jax.scipy.special.ndtr(t),
        "relu": jax.nn.relu,
    }[name]
    d1 = jax.vmap(jax.grad(f))(m)
    d2 = jax.vmap(jax.grad(jax.grad(f)))(m)
    np.testing.assert_allclose(res["bp"][0], d1 * gm, rtol=1e-12)
    np.testing.assert_allclose(res["bp"][1], d1**2 * gv, rtol=1e-12)
    np.testing.assert_allclose(
        res["autodiff"][0] - res["bp"][0], 2 * d1 * d2 * v * gv, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(res["autodiff"][1], res["bp"][1], rtol=1e-12)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "leaky_relu"])
def test_matched_bp_mean_path_is_exact(name, x64):
    """Matched: d E[f(a)]/dm = E[f'(a)] (Stein), so the mean->mean sensitivity of
    BP is exact; BP differs from autodiff only through the variance paths."""
    m = jnp.array([-1.2, -0.3, 0.4, 1.7])
    v = jnp.array([0.5, 0.1, 0.2, 1.0])
    act = getattr(moments, name)
    gm = jnp.array([0.3, -1.0, 0.7, 0.2])
    out = {}
    for bw in ("bp", "autodiff"):
        _, vjp = jax.vjp(
            lambda a, b, bw=bw: act(Gaussian(a, b), mode="matched", backward=bw), m, v
        )
        out[bw] = vjp(Gaussian(gm, jnp.zeros_like(gm)))
    np.testing.assert_allclose(out["bp"][0], out["autodiff"][0], rtol=1e-9)
    # ... while the variance path differs (BP uses J^2 for dVar/dv)
    _, vjp_bp = jax.vjp(lambda a, b: act(Gaussian(a, b), mode="matched"), m, v)
    _, vjp_ad = jax.vjp(
        lambda a, b: act(Gaussian(a, b), mode="matched", backward="autodiff"), m, v
    )
    cot = Gaussian(jnp.zeros_like(gm), jnp.ones_like(gm))
    assert float(jnp.max(jnp.abs(vjp_bp(cot)[1] - vjp_ad(cot)[1]))) > 1e-3


@pytest.mark.parametrize("name", ["tanh", "erf", "softplus"])
def test_matched_bp_variance_gradient_difference_is_the_curvature_term(name, x64):
    """What BP drops in matched mode, term by term, and its v -> 0 limit.

    autodiff: dJ/dv_in = dE/dv g_m + dVar/dv g_v;  BP: J^2 g_v.  As v -> 0,
    dE/dv -> f''(m)/2 (the second-order mean shift) and dVar/dv -> f'(m)^2, so
    the gradients w.r.t. input variances (hence w.r.t. weight variances) keep an
    O(1) difference f''(m)/2 g_m: Theorem 2(3)'s convergence to backprop holds
    for the mean gradients, not for the variance gradients of a matched layer.
    """
    act = getattr(moments, name)
    m = jnp.array([-1.3, -0.4, 0.2, 0.9, 2.1])
    gm = jnp.array([0.5, -1.0, 0.8, 0.3, -0.6])
    gv = jnp.array([0.2, 0.4, -0.7, 1.1, 0.9])
    f = {"tanh": jnp.tanh, "erf": jax.scipy.special.erf, "softplus": jax.nn.softplus}[
        name
    ]
    d2f = jax.vmap(jax.grad(jax.grad(f)))(m)
    for v_scale in (0.3, 1e-6):
        v = v_scale * jnp.array([1.0, 0.5, 2.0, 1.5, 0.7])

        def kernel(a, b):
            y = act(Gaussian(a, b), mode="matched", backward="autodiff")
            return y.mean, y.var

        (_, _), (dE_dv, dV_dv) = jax.jvp(
            kernel, (m, v), (jnp.zeros_like(m), 1.0 + 0 * v)
        )
        gain = jax.jvp(kernel, (m, v), (jnp.ones_like(m), 0 * v))[1][0]
        cot = Gaussian(gm, gv)
        g_bp = jax.vjp(lambda a, b: act(Gaussian(a, b), mode="matched"), m, v)[1](cot)
        g_ad = jax.vjp(
            lambda a, b: act(Gaussian(a, b), mode="matched", backward="autodiff"), m, v
        )[1](cot)
        # BP's variance sensitivity is exactly J^2 g_v, and the difference is
        # exactly the two terms it drops
        np.testing.assert_allclose(g_bp[1], gain**2 * gv, rtol=1e-12)
        np.testing.assert_allclose(
            g_ad[1] - g_bp[1],
            dE_dv * gm + (dV_dv - gain**2) * gv,
            rtol=1e-7,
            atol=1e-12,
        )
        if v_scale == 1e-6:  # the limit: f''(m)/2 g_m, not zero
            np.testing.assert_allclose(g_ad[1] - g_bp[1], 0.5 * d2f * gm, rtol=1e-4)
            assert float(jnp.max(jnp.abs(0.5 * d2f * gm))) > 0.1


def _mlp_params(key, sizes, var_scale):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params.append(
            dict(
                w_mean=jax.random.normal(k1, (a, b)) / math.sqrt(a),
                w_var=var_scale * jax.random.uniform(k2, (a, b), minval=0.5) / a,
                b_mean=jnp.zeros(b),
            )
        )
    return params


def _mlp_loss(params, x, labels, act, mode, backward):
    h = x
    for i, p in enumerate(params):
        h = moments.dense(h, **p, backward=backward)
        if i < len(params) - 1:
            h = moments.activation(act, h, mode=mode, backward=backward)
    return objectives.categorical_nll(h, labels, method="second_order").mean()


@pytest.mark.parametrize(
    "act,mode",
    [
        ("relu", "linearized"),
        ("tanh", "linearized"),
        ("relu", "matched"),
        ("tanh", "matched"),
    ],
)
def test_bp_converges_to_backprop_as_weight_variance_vanishes(act, mode, x64):
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (16, 6))
    labels = jax.random.randint(key, (16,), 0, 3)
    sizes = (6, 8, 8, 3)
    errs = []
    for scale in [1e-1, 1e-2, 1e-3, 1e-4]:
        params = _mlp_params(jax.random.PRNGKey(4), sizes, scale)
        g_bp = jax.grad(_mlp_loss)(params, x, labels, act, mode, "bp")
        g_ad = jax.grad(_mlp_loss)(params, x, labels, act, mode, "autodiff")
        errs.append(rel_err([p["w_mean"] for p in g_bp], [p["w_mean"] for p in g_ad]))
    if (act, mode) == ("relu", "linearized"):
        # f'' = 0 almost everywhere: the linearized ReLU rule *is* its gradient
        assert max(errs) < 1e-12, errs
    else:
        # BP differs at finite variance (it is a different rule) ...
        assert errs[0] > 1e-4, errs
        # ... and the difference vanishes with the weight variance: linearly for
        # smooth f; for matched ReLU units near the kink the moments carry
        # sqrt(v) terms, so the rate there lies between v^0.5 and v
        low = 2.5 if (act, mode) == ("relu", "matched") else 5.0
        for e0, e1 in zip(errs[:-1], errs[1:], strict=True):
            assert low < e0 / e1 < 20, errs

    # at zero variance BP is ordinary backprop of the mean network (Thm 2(3))
    params = _mlp_params(jax.random.PRNGKey(4), sizes, 0.0)
    g_bp = jax.grad(_mlp_loss)(params, x, labels, act, "linearized", "bp")

    def plain(ws):
        h = x
        f = {"relu": jax.nn.relu, "tanh": jnp.tanh}[act]
        for i, p in enumerate(ws):
            h = h @ p["w_mean"] + p["b_mean"]
            if i < len(ws) - 1:
                h = f(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.take_along_axis(logp, labels[:, None], -1).mean()

    g_plain = jax.grad(plain)(params)
    assert rel_err([p["w_mean"] for p in g_bp], [p["w_mean"] for p in g_plain]) < 1e-12
