"""Recurrent layers and moment scans: mathematics checked against independent
references (Monte Carlo in numpy, closed forms, finite differences, a numpy
loop of the recurrence), every learning method on ``SequenceNet``, PCFF, the
IndRNN bound, error messages and ``hidden_state_posterior``.

The linear Kalman / RTS duality is in ``tests/test_recurrent_duality.py``.

Monte Carlo tolerances: ``Z`` standard errors from :func:`mc_stats` (fixed
seeds, so every run draws the same samples).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mc_stats import mc_stats

from dualflow import Gaussian, chain, moments
from dualflow import nn as dnn
from dualflow.models.rnn import SequenceNet

Z = 5.0  # standard errors allowed for a Monte Carlo comparison


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _cell(cell: str, d: int, h: int, **kw):
    cls = dnn.IndRNN if cell == "indrnn" else dnn.SimpleRNN
    return cls(d, h, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)


def _set_params(layer, seed, *, w_var, b_var, u_var, u_scale=0.6, b_mean=0.3):
    """Random means and the given variances for every weight of ``layer``;
    returns them as a dict of numpy arrays (``Wm, Wv, bm, bv, um, uv``)."""
    rng = np.random.default_rng(seed)
    d, h = layer.in_features, layer.hidden_features
    u_shape = layer.recurrent_mean[...].shape
    p = {
        "Wm": rng.normal(size=(d, h)) / np.sqrt(d),
        "Wv": np.full((d, h), w_var),
        "bm": b_mean + 0.2 * rng.normal(size=h),
        "bv": np.full(h, b_var),
        "um": u_scale * rng.uniform(-1.0, 1.0, size=u_shape),
        "uv": np.full(u_shape, u_var),
    }
    layer.input.kernel_mean[...] = jnp.asarray(p["Wm"])
    layer.input.kernel_logvar[...] = jnp.asarray(np.log(p["Wv"]))
    layer.input.bias_mean[...] = jnp.asarray(p["bm"])
    layer.input.bias_logvar[...] = jnp.asarray(np.log(p["bv"]))
    layer.recurrent_mean[...] = jnp.asarray(p["um"])
    layer.recurrent_logvar[...] = jnp.asarray(np.log(p["uv"]))
    return p


def _relu(x):
    return np.maximum(x, 0.0)


def _identity(x):
    return x


def _mc_mean_field(x, p, h0_mean, h0_var, *, cell, act, project, S, seed):
    """Monte Carlo of the mean-field recurrence: fresh ``W, b, u`` (or ``U``) at
    every step.  ``project=True`` also replaces each step's pre-activation
    samples by Gaussian samples with their sample mean and variance (per
    example and unit): assumed-density filtering, i.e. exactly the model the
    moment scan computes (Gaussian projection after every step, units
    independent).  Returns samples ``[S, N, T, H]``."""
    rng = np.random.default_rng(seed)
    n, t_len, d = x.shape
    h_dim = p["bm"].shape[0]
    h = h0_mean + np.sqrt(h0_var) * rng.standard_normal((S, n, h_dim))
    outs = []
    for t in range(t_len):
        w = p["Wm"] + np.sqrt(p["Wv"]) * rng.standard_normal((S, d, h_dim))
        b = p["bm"] + np.sqrt(p["bv"]) * rng.standard_normal((S, 1, h_dim))
        pre = np.matmul(x[None, :, t], w) + b
        if cell == "indrnn":
            u = p["um"] + np.sqrt(p["uv"]) * rng.standard_normal((S, 1, h_dim))
            pre = pre + u * h
        else:
            u = p["um"] + np.sqrt(p["uv"]) * rng.standard_normal((S, h_dim, h_dim))
            pre = pre + np.matmul(h, u)
        if project:
            pre = pre.mean(0) + pre.std(0) * rng.standard_normal(pre.shape)
        h = act(pre)
        outs.append(h)
    return np.stack(outs, 2)


def _assert_mc(samples, mean, var, z=Z, what=""):
    m, v, se_m, se_v = mc_stats(samples)
    mean, var = np.asarray(mean), np.asarray(var)
    assert np.all(np.abs(m - mean) <= z * se_m), (what, m, mean, se_m)
    assert np.all(np.abs(v - var) <= z * se_v), (what, v, var, se_v)


# --------------------------------------------------------------------------
# 1. the bp moment scan vs Monte Carlo
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cell, act, project",
    [("indrnn", "identity", False), ("indrnn", "relu", True), ("srn", "relu", True)],
)
def test_bp_scan_is_the_mean_field_monte_carlo(cell, act, project, x64):
    """``mode="matched"``: every step of the scan is exact for its inputs taken
    as independent (fresh ``W, b, u`` at every step) and Gaussian.

    * identity IndRNN: sums and products of independent variables have exact
      means and variances whatever their law, so the scan equals the
      fresh-weights Monte Carlo at every step with no projection at all
      (Gaussian ``h0`` and Gaussian ``u``: the ``P_u P_h`` term matters).
    * ReLU (closed-form matched moments): the reference also projects each
      step's pre-activation onto a Gaussian (assumed-density filtering);
      the SRN reference's projection draws units independently, the diagonal
      covariance the scan keeps.  Step 1 needs no projection (the
      pre-activation is exactly Gaussian), so it checks the plain Monte
      Carlo too (``h0`` is a point there).

    Tolerance: ``Z`` standard errors, x1.2 for the projected reference (its
    per-step moment estimates carry a little Monte Carlo error into later
    steps; measured max |z| < 4 over two seeds).  The plain fresh-weights
    Monte Carlo of the ReLU networks *does* deviate at steps >= 2 (the
    projection is the approximation, |z| > 2 Z here): the test can see it.
    """
    n, t_len, d, h = 2, 3, 2, 4
    layer = _cell(cell, d, h, activation=act)
    p = _set_params(
        layer, 1, w_var=0.3, b_var=0.2, u_var=0.3 if cell == "indrnn" else 0.1
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, t_len, d))
    h0m = rng.normal(size=(n, h))
    # a Gaussian h0 for the identity cell; a point for ReLU, so that step 1's
    # pre-activation is exactly Gaussian
    h0v = rng.uniform(0.2, 0.6, size=(n, h)) if act == "identity" else np.zeros((n, h))
    got = layer(x, dnn.Context(dnn.Method("bp", mode="matched")), h0=Gaussian(h0m, h0v))
    assert got.shape == (n, t_len, h)
    fn = _relu if act == "relu" else _identity
    s = _mc_mean_field(
        x, p, h0m, h0v, cell=cell, act=fn, project=project, S=100_000, seed=3
    )
    _assert_mc(s, got.mean, got.var, z=Z * (1.2 if project else 1.0), what=cell)
    # the variances are far from 0 and from the point network: a real check
    assert np.all(np.asarray(got.var) > 20 * mc_stats(s)[3])
    if project:
        plain = _mc_mean_field(
            x, p, h0m, h0v, cell=cell, act=fn, project=False, S=100_000, seed=4
        )
        _assert_mc(plain[:, :, :1], got.mean[:, :1], got.var[:, :1], what="step 1")
        m, v, se_m, se_v = mc_stats(plain[:, :, 1:])
        z_later = max(
            np.max(np.abs(m - got.mean[:, 1:]) / se_m),
            np.max(np.abs(v - got.var[:, 1:]) / se_v),
        )
        assert z_later > 2 * Z, z_later


def _gaussian_power_moments(m, v, t):
    """``E[u^t]`` and ``Var(u^t)`` for ``u ~ N(m, v)``, t = 1, 2, 3."""
    raw = {
        1: m,
        2: m**2 + v,
        3: m**3 + 3 * m * v,
        4: m**4 + 6 * m**2 * v + 3 * v**2,
        6: m**6 + 15 * m**4 * v + 45 * m**2 * v**2 + 15 * v**3,
    }
    return raw[t], raw[2 * t] - raw[t] ** 2


def test_bp_drops_the_correlation_of_weights_shared_across_steps(x64):
    """The documented approximation, made visible: identity IndRNN, zero
    inputs and bias, point ``h0``: the true model is ``h_t = u^t h0`` with ONE
    ``u``: mean ``h0 E[u^t]``, variance ``h0^2 Var(u^t)``; the scan treats the
    factors of every step as independent: mean ``h0 m^t``, variance
    ``h0^2 ((m^2 + v)^t - m^(2t))`` (exact, checked to 1e-12).  A Monte Carlo
    of the shared-weight model matches the shared formulas and differs from
    the scan by far more than its standard errors when ``Var(u)`` is large
    (the mean is off by ``h0 v`` at t = 2, the variance roughly doubles)."""
    t_len, h = 3, 3
    layer = _cell("indrnn", 2, h, activation="identity")
    um, uv = np.array([0.8, -0.5, 0.3]), np.array([0.5, 0.4, 0.6])
    layer.recurrent_mean[...] = jnp.asarray(um)
    layer.recurrent_logvar[...] = jnp.asarray(np.log(uv))
    layer.input.bias_logvar[...] = jnp.full((h,), -jnp.inf)  # point bias 0
    layer.input.bias_mean[...] = jnp.zeros(h)
    h0 = np.array([[1.5, -1.0, 2.0]])
    x = np.zeros((1, t_len, 2))
    got = layer(x, dnn.Context(dnn.Method("bp", mode="matched")), h0=h0)
    t = np.arange(1, t_len + 1)[:, None]
    fresh = h0**2 * ((um**2 + uv) ** t - um ** (2 * t))
    np.testing.assert_allclose(got.mean[0], h0 * um**t, rtol=1e-12)
    np.testing.assert_allclose(got.var[0], fresh, rtol=1e-12)
    sh = [_gaussian_power_moments(um, uv, k) for k in (1, 2, 3)]
    shared_mean = np.stack([h0[0] * e for e, _ in sh])
    shared = np.stack([h0[0] ** 2 * var for _, var in sh])
    rng = np.random.default_rng(0)
    u = um + np.sqrt(uv) * rng.standard_normal((200_000, 1, h))
    samples = h0[0] * u ** t[None]  # [S, T, H]: the same u at every step
    m, v, se_m, se_v = mc_stats(samples)
    assert np.all(np.abs(m - shared_mean) < Z * se_m)
    assert np.all(np.abs(v - shared) < Z * se_v)
    # t = 1 agrees; afterwards the scan is off by many standard errors
    np.testing.assert_allclose(fresh[0], shared[0], rtol=1e-12)
    assert np.all(np.abs(shared_mean[1] - got.mean[0, 1]) > 20 * se_m[1])
    assert np.all(shared[1:] - fresh[1:] > 20 * se_v[1:])


# --------------------------------------------------------------------------
# 2. sampling methods
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["indrnn", "srn"])
def test_local_reparam_draws_each_preactivation_from_its_bp_moments(cell, x64):
    """Identity activation, so the output is the pre-activation.  Given the
    sampled state ``h_{t-1}`` (and a point input), ``local_reparam`` draws
    ``a_t + u ⊙ h_{t-1}`` (SRN: ``a_t + h_{t-1} U``) from the Gaussian whose
    moments are the bp ops' (``moments.dense`` + ``moments.multiply`` /
    ``moments.dense`` at the point ``h_{t-1}``), independently per example and
    step.  Checked on 20000 identical sequences (one call): the standardised
    residuals are N(0, 1) at every step and unit, and ``z^2 - 1`` is
    uncorrelated with ``h_{t-1}^2`` (the conditional variance follows the
    state).  Marginally the draws are then the mean-field model: equal to the
    bp scan at every step for the IndRNN, and at steps 1-2 for the SRN
    (later, the units of ``h_{t-1}`` are correlated, which the SRN scan
    drops)."""
    n, t_len, d, h = 20_000, 3, 2, 3
    layer = _cell(cell, d, h, activation="identity")
    p = _set_params(
        layer, 5, w_var=0.4, b_var=0.1, u_var=0.3 if cell == "indrnn" else 0.1
    )
    rng = np.random.default_rng(6)
    x = np.broadcast_to(rng.normal(size=(1, t_len, d)), (n, t_len, d))
    h0 = np.broadcast_to(rng.normal(size=(1, h)), (n, h))
    out = np.asarray(
        layer(x, dnn.Context(dnn.Method("local_reparam"), jax.random.key(7)), h0=h0)
    )
    prev = np.concatenate([h0[:, None], out[:, :-1]], 1)  # h_{t-1}  [N, T, H]
    a = moments.dense(x, p["Wm"], p["Wv"], p["bm"], p["bv"])
    if cell == "indrnn":
        rec = moments.multiply(prev, Gaussian(p["um"], p["uv"]))
    else:
        rec = moments.dense(prev, p["um"], p["uv"])
    cond = moments.add(a, rec)
    zres = (out - np.asarray(cond.mean)) / np.sqrt(np.asarray(cond.var))
    _assert_mc(zres, np.zeros((t_len, h)), np.ones((t_len, h)), what="z")
    c = prev**2 - (prev**2).mean(0)
    zc = (zres**2 - 1.0) * c
    assert np.all(np.abs(zc.mean(0)) < Z * zc.std(0) / np.sqrt(n))
    assert np.all(np.std(c[:, 1:], 0) > 0.1)  # the state varies (after h0)
    bp = layer(x[:1], dnn.Context(dnn.Method("bp")), h0=h0[:1])
    steps = t_len if cell == "indrnn" else 2
    _assert_mc(out[:, :steps], bp.mean[0, :steps], bp.var[0, :steps], what="marginal")


@pytest.mark.parametrize("cell", ["indrnn", "srn"])
def test_sampling_methods_share_the_first_step_marginal(cell, x64):
    """Step 1 from a point ``h0 != 0`` (so the recurrent weights' noise
    enters): the pre-activation is exactly Gaussian, so the matched-ReLU bp
    moments are the exact law of ``h_1``, and ``reparam`` and ``flipout`` must
    both draw from it (per example, over 20000 keys; ``local_reparam``'s law
    is checked step by step above)."""
    n, d, h = 2, 2, 3
    layer = _cell(cell, d, h, activation="relu")
    _set_params(layer, 8, w_var=0.4, b_var=0.1, u_var=0.3 if cell == "indrnn" else 0.1)
    rng = np.random.default_rng(9)
    x, h0 = rng.normal(size=(n, 1, d)), rng.normal(size=(n, h))
    bp = layer(x, dnn.Context(dnn.Method("bp", mode="matched")), h0=h0)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def draws(keys):
        lay = nnx.merge(graphdef, state)
        out = {}
        for name in ("reparam", "flipout"):
            method = dnn.Method(name)
            out[name] = jax.vmap(lambda k, m=method: lay(x, dnn.Context(m, k), h0=h0))(
                keys
            )
        return out

    for name, s in draws(jax.random.split(jax.random.key(10), 20_000)).items():
        _assert_mc(s, bp.mean, bp.var, what=name)


@pytest.mark.parametrize("name", ["reparam", "flipout"])
def test_one_weight_sample_serves_every_step_of_a_sequence(name, x64):
    """``reparam`` draws ``W, u`` once per call, shared by all steps;
    ``flipout``'s per-example perturbation ``ΔW ∘ s r^T`` must likewise be one
    effective weight per *sequence* (the sequence is the example), else its
    per-sequence law is not the posterior's.  Identity IndRNN, no bias,
    ``h0 = 0``, ``x_1 = x_2 = x``, zero inputs afterwards::

        h_1 = x W,  h_2 = x W + u h_1 = (1 + u) h_1,  h_3 = u h_2,  h_4 = u h_3

    so along each sampled path ``h_2 / h_1 - 1 = h_3 / h_2 = h_4 / h_3`` (the
    same ``u`` at steps 2-4 and the same ``W`` at steps 1-2).  reparam also
    uses one sample for the whole batch; its ``u`` draws over keys have the
    posterior's mean and variance (4000 keys)."""
    n, t_len, d, h = 4, 4, 2, 3
    layer = _cell(
        "indrnn",
        d,
        h,
        activation="identity",
        use_bias=False,
        init_var=2.0,
        recurrent_init_var=0.3,
    )
    rng = np.random.default_rng(11)
    x = np.zeros((n, t_len, d))
    x[:, :2] = rng.normal(size=(n, 1, d))
    out = np.asarray(layer(x, dnn.Context(dnn.Method(name), jax.random.key(12))))
    r21, r32, r43 = (
        out[:, 1] / out[:, 0] - 1.0,
        out[:, 2] / out[:, 1],
        out[:, 3] / out[:, 2],
    )
    np.testing.assert_allclose(r43, r32, rtol=1e-10)  # one u for steps 2..4
    np.testing.assert_allclose(r21, r32, rtol=1e-10)  # one W for steps 1, 2
    if name == "reparam":
        np.testing.assert_allclose(r32, np.broadcast_to(r32[:1], r32.shape), rtol=1e-10)
        graphdef, state = nnx.split(layer)

        @jax.jit
        def ratio(keys):
            lay = nnx.merge(graphdef, state)
            o = jax.vmap(lambda k: lay(x[:1], dnn.Context(dnn.Method(name), k)))(keys)
            return o[:, 0, 3] / o[:, 0, 2]

        um, uv = layer.moments_of("recurrent")
        _assert_mc(ratio(jax.random.split(jax.random.key(13), 4000)), um, uv, what="u")


# --------------------------------------------------------------------------
# 3. belief propagation through time
# --------------------------------------------------------------------------
def _grad_setup(cell, act):
    n, t_len, d, h = 3, 4, 2, 3
    layer = _cell(cell, d, h, activation=act)
    _set_params(
        layer, 14, w_var=0.2, b_var=0.1, u_var=0.2 if cell == "indrnn" else 0.05
    )
    rng = np.random.default_rng(15)
    x = jnp.asarray(rng.normal(size=(n, t_len, d)))
    h0 = (
        jnp.asarray(rng.normal(size=(n, h))),
        jnp.asarray(rng.uniform(0.1, 0.5, (n, h))),
    )
    graphdef, state = nnx.split(layer)
    c = jnp.asarray(rng.normal(size=(n, t_len, h)))

    def out(params, mode, backward):
        st, h0m, h0v = params
        lay = nnx.merge(graphdef, st)
        ctx = dnn.Context(dnn.Method("bp", mode=mode, backward=backward))
        return lay(x, ctx, h0=Gaussian(h0m, h0v))

    def losses(params, mode, backward):
        o = out(params, mode, backward)
        mean_only = jnp.sum(c * o.mean + 0.5 * o.mean**2)
        full = mean_only + jnp.sum(jnp.sqrt(o.var + 1.0) - c * o.var)
        return mean_only, full

    return (state, *h0), losses


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize(
    "cell, act",
    [("indrnn", "relu"), ("srn", "relu"), ("indrnn", "tanh"), ("srn", "tanh")],
)
def test_bptt_bp_rule_vs_autodiff(cell, act, x64):
    """Gradients of scalar losses of the output moments w.r.t. every parameter
    (input ``W, b`` means and log-variances, ``u`` / ``U``, Gaussian ``h0``),
    through all steps, with the BP rule vs plain autodiff of the same forward.

    * ReLU, linearized: ``f'' = 0`` and the bilinear ops' BP rule is their
      exact adjoint, so BP through time *is* autodiff (1e-12).
    * tanh, linearized: BP drops ``2 f'(m) f''(m) v dJ/dv_out`` from
      ``dJ/dm_in``.  Means never depend on variances in linearized mode, so
      for a loss of the means only ``dJ/dv = 0`` everywhere and the two rules
      agree (1e-12); for a loss that also reads the variances the gradients
      w.r.t. mean parameters differ (> 1e-6), while those w.r.t. parameters
      that only enter variances (log-variances, ``Var h0``) agree: their
      sensitivities flow along variance paths only, whose Jacobian ``f'^2``
      is the same in both rules.
    """
    params, losses = _grad_setup(cell, act)
    which = (1,) if act == "relu" else (0, 1)  # full loss; tanh: mean-only too

    @functools.partial(jax.jit, static_argnums=(1,))
    def grads(params, backward):
        return [
            jax.grad(lambda p, i=i: losses(p, "linearized", backward)[i])(params)
            for i in which
        ]

    bp, ad = grads(params, "bp"), grads(params, "autodiff")
    for g in (*bp, *ad):
        assert np.all(np.isfinite(_flat(g))) and np.abs(_flat(g)).max() > 1e-2
    if act == "relu":
        np.testing.assert_allclose(_flat(bp[0]), _flat(ad[0]), rtol=1e-12, atol=1e-12)
        return
    np.testing.assert_allclose(_flat(bp[0]), _flat(ad[0]), rtol=1e-12, atol=1e-12)
    (st_bp, h0m_bp, h0v_bp), (st_ad, h0m_ad, h0v_ad) = bp[1], ad[1]
    variance_only = ("kernel_logvar", "bias_logvar", "recurrent_logvar")
    flat_ad = dict(nnx.to_flat_state(st_ad))
    for path, g in nnx.to_flat_state(st_bp):
        a, b = np.asarray(g[...]), np.asarray(flat_ad[path][...])
        if path[-1] in variance_only:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=str(path))
        else:
            assert np.abs(a - b).max() > 1e-6, path
    np.testing.assert_allclose(h0v_bp, h0v_ad, rtol=1e-12, atol=1e-12)
    assert np.abs(np.asarray(h0m_bp - h0m_ad)).max() > 1e-6


@pytest.mark.parametrize(
    "cell, act, mode", [("indrnn", "relu", "matched"), ("srn", "tanh", "linearized")]
)
def test_autodiff_bptt_equals_central_differences(cell, act, mode, x64):
    """``backward="autodiff"`` differentiates the forward: directional
    derivatives along random directions in all parameters match central
    differences (float64, step 1e-5, relative error 1e-6)."""
    params, losses = _grad_setup(cell, act)
    f = jax.jit(jax.value_and_grad(lambda p: losses(p, mode, "autodiff")[1]))
    g = _flat(f(params)[1])
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(16)
    eps = 1e-5
    for _ in range(3):
        dirs = [rng.normal(size=np.shape(a)) for a in leaves]
        moved = [
            jax.tree.unflatten(
                treedef,
                [a + sgn * eps * dd for a, dd in zip(leaves, dirs, strict=True)],
            )
            for sgn in (1.0, -1.0)
        ]
        fd = (float(f(moved[0])[0]) - float(f(moved[1])[0])) / (2 * eps)
        an = float(g @ np.concatenate([dd.ravel() for dd in dirs]))
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (fd, an)
        assert abs(an) > 1e-2


# --------------------------------------------------------------------------
# 4. every learning method on SequenceNet
# --------------------------------------------------------------------------
DETERMINISTIC = ("bp", "deterministic", "ensemble")


# the slowest-compiling (sampling) methods run one head by default and the
# other with --runslow; every method and both heads are covered by default
_SLOW_CASES = {
    ("reparam", "sequence"),
    ("local_reparam", "last"),
    ("flipout", "sequence"),
}


@pytest.mark.parametrize(
    "name, head",
    [
        pytest.param(m, hd, marks=[pytest.mark.slow] if (m, hd) in _SLOW_CASES else [])
        for m in dnn.METHODS
        for hd in ("last", "sequence")
    ],
)
def test_every_method_runs_objective_and_predict_under_jit(name, head):
    """Loss, gradients and predictions of a ``SequenceNet`` under every method
    (classification with ``head="last"``, regression with ``head="sequence"``),
    in one ``jax.jit``: finite values, the right shapes, no dependence on the
    key for the deterministic methods and a dependence for the sampling ones."""
    n, t_len, d, k = 4, 3, 3, 2
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.normal(size=(n, t_len, d)), jnp.float32)
    if head == "last":
        y, lik = jnp.arange(n) % k, dnn.Likelihood()
    else:
        y = jnp.asarray(rng.normal(size=(n, t_len, k)), jnp.float32)
        lik = dnn.Likelihood("gaussian", noise_var=0.5)
    cell = "indrnn" if head == "last" else "srn"
    method = dnn.Method(name, ensemble_size=2, dropout_rate=0.2)

    def factory(rngs):
        return SequenceNet(
            d, k, hidden=4, depth=1, cell=cell, head=head, init_var=0.1, rngs=rngs
        )

    model = (
        dnn.make_ensemble(factory, 2) if name == "ensemble" else factory(nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, key):
        def loss(st):
            return dnn.objective(
                nnx.merge(graphdef, st),
                x,
                y,
                key,
                method=method,
                likelihood=lik,
                n_data=100,
            )[0]

        value, grads = jax.value_and_grad(loss)(state)
        pred = dnn.predict(
            nnx.merge(graphdef, state),
            x,
            method=method,
            likelihood=lik,
            key=key,
            num_samples=3,
            jit=False,
        )
        return value, grads, pred

    (l1, g1, p1), (l2, g2, p2) = (
        run(state, jax.random.key(1)),
        run(state, jax.random.key(2)),
    )
    g1, g2 = _flat(g1), _flat(g2)
    assert np.isfinite(float(l1)) and np.all(np.isfinite(g1)) and np.abs(g1).max() > 0
    if head == "last":
        assert p1.probs.shape == (n, k)
        np.testing.assert_allclose(np.asarray(p1.probs).sum(-1), 1.0, rtol=1e-5)
        out1, out2 = p1.probs, p2.probs
    else:
        assert p1.mean.shape == p1.var.shape == (n, t_len, k)
        assert np.all(np.asarray(p1.var) > 0)
        out1, out2 = p1.mean, p2.mean
    assert np.all(np.isfinite(np.asarray(out1)))
    if name in DETERMINISTIC:
        assert float(l1) == float(l2)
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_array_equal(out1, out2)
    else:
        assert float(l1) != float(l2)
        assert np.abs(np.asarray(out1) - np.asarray(out2)).max() > 1e-6


def _numpy_forward(module, x, h0=None):
    """The network of the weight means, written out in numpy (float64);
    ``h0``: initial state of a single recurrent layer (default 0)."""
    if isinstance(module, SequenceNet):
        return _numpy_forward(module.net, x)
    if isinstance(module, dnn.Sequential):
        for layer in module.layers:
            x = _numpy_forward(layer, x)
        return x
    if isinstance(module, dnn.Residual):
        return _numpy_forward(module.block, x) + x
    if isinstance(module, dnn.Gain):
        return float(module.gain[...]) * x
    if isinstance(module, dnn.Dropout):
        return x  # evaluation
    if isinstance(module, dnn.LastStep):
        return x[:, -1]
    if isinstance(module, dnn.Dense):
        return x @ np.asarray(module.kernel_mean[...], np.float64) + np.asarray(
            module.bias_mean[...], np.float64
        )
    if isinstance(module, dnn.IndRNN | dnn.SimpleRNN):
        f = {"relu": _relu, "tanh": np.tanh, "identity": _identity}[module.activation]
        w = np.asarray(module.input.kernel_mean[...], np.float64)
        b = np.asarray(module.input.bias_mean[...], np.float64)
        u = np.asarray(module.recurrent_mean[...], np.float64)
        if module.recurrent_bound is not None:
            u = np.clip(u, -module.recurrent_bound, module.recurrent_bound)
        h = np.zeros((x.shape[0], module.hidden_features)) if h0 is None else h0
        out = []
        for t in range(x.shape[1]):
            rec = h * u if isinstance(module, dnn.IndRNN) else h @ u
            h = f(x[:, t] @ w + b + rec)
            out.append(h)
        return np.stack(out, 1)
    raise TypeError(type(module))


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            cell="indrnn",
            depth=3,
            residual=True,
            residual_gain=0.7,
            dropout=0.2,
            head="last",
            recurrent_init=(-0.9, 0.9),
        ),
        dict(cell="srn", depth=2, head="sequence", dropout=0.2, activation="tanh"),
    ],
    ids=["residual-indrnn-last", "srn-sequence"],
)
def test_deterministic_method_is_the_recurrence_of_the_means(kw):
    """``deterministic`` (float32) equals a numpy loop of
    ``h_t = f(W x_t + b + u ⊙ h_{t-1})`` / ``f(W x_t + b + h_{t-1} U)`` with the
    weight means, through residual blocks, (evaluation) dropout and the
    head, to 1e-6."""
    x = np.random.default_rng(18).normal(size=(5, 6, 3)).astype(np.float32)
    model = SequenceNet(3, 2, hidden=8, rngs=nnx.Rngs(1), **kw)
    graphdef, state = nnx.split(model)
    got = jax.jit(
        lambda st: dnn.apply(
            nnx.merge(graphdef, st), jnp.asarray(x), dnn.Method("deterministic")
        )
    )(state)
    want = _numpy_forward(model, x.astype(np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    assert np.abs(want).max() > 0.1


def _best_mask(target, cand):
    """Index of the candidate ``cand[..., m, :]`` (one per binary mask ``m``)
    closest to ``target [..., :]``, and the residual of that fit."""
    err = np.abs(cand - target[..., None, :]).max(-1)
    return err.argmin(-1), err.min(-1)


def test_mc_dropout_masks_are_per_sequence_for_both_weights(x64):
    """``mc_dropout`` (identity SRN, rate 0.5) drops the inputs of both weights
    with one mask per sequence (variational RNN dropout) and uses the weight
    means: with ``U = 0`` every step's input term is ``(x_t ⊙ m / (1 - p)) W +
    b`` for one binary mask ``m`` per sequence (the same at every step); with
    zero inputs every step is ``(h_{t-1} ⊙ z / (1 - p)) U + b`` for one ``z``
    per sequence.  Keys change the masks."""
    n, t_len, d, h, p = 6, 5, 3, 4, 0.5
    method = dnn.Method("mc_dropout", dropout_rate=p)
    rng = np.random.default_rng(24)
    h0, x = rng.normal(size=(n, h)), rng.normal(size=(n, t_len, d))

    def masks(k):
        return np.array(np.meshgrid(*[[0.0, 1.0]] * k)).reshape(k, -1).T / (1 - p)

    # (a) input mask: U = 0
    layer = _cell("srn", d, h, activation="identity")
    layer.recurrent_mean[...] = jnp.zeros((h, h))
    w, b = (
        np.asarray(layer.input.kernel_mean[...]),
        np.asarray(layer.input.bias_mean[...]),
    )
    seen = []
    for key in (1, 2):
        out = np.asarray(layer(x, dnn.Context(method, jax.random.key(key)), h0=h0))
        cand = np.einsum("ntd,md,dh->ntmh", x, masks(d), w) + b
        idx, err = _best_mask(out, cand)
        assert err.max() < 1e-10, err
        assert (idx == idx[:, :1]).all(), idx  # one mask per sequence
        seen.append(idx[:, 0])
    assert not np.array_equal(seen[0], seen[1])  # the key draws the masks
    # (b) recurrent mask: zero inputs, U = its orthogonal initial mean
    layer = _cell("srn", d, h, activation="identity", recurrent_gain=0.9)
    u, b = np.asarray(layer.recurrent_mean[...]), np.asarray(layer.input.bias_mean[...])
    zero = np.zeros_like(x)
    out = np.asarray(layer(zero, dnn.Context(method, jax.random.key(3)), h0=h0))
    prev = np.concatenate([h0[:, None], out[:, :-1]], 1)
    cand = np.einsum("nth,mh,hk->ntmk", prev, masks(h), u) + b
    idx, err = _best_mask(out, cand)
    assert err.max() < 1e-10, err
    assert (idx == idx[:, :1]).all(), idx
    assert len(set(idx[:, 0])) > 1  # masks differ across sequences


# --------------------------------------------------------------------------
# 5. PCFF
# --------------------------------------------------------------------------
def test_pcff_is_feed_forward_at_evaluation_and_node_sampling_at_training(x64):
    """Evaluation (``train=False``): PCFF layers are the plain recurrence
    (numpy loop of the means), even with a key.  Training with rate 1 and
    ReLU: every node is a sample of its rectified-Gaussian node distribution
    given its pre-activation, so
    over 20000 identical sequences the first step's mean and variance are
    ``chain.node_moments("relu", a)`` with ``a = W x + b + u h0`` (means), and
    the output differs from the deterministic forward.  Under bp: an error."""
    n, d, h = 20_000, 2, 3
    layer = _cell(
        "indrnn", d, h, activation="relu", pcff_rate=1.0, recurrent_init=(-0.9, 0.9)
    )
    rng = np.random.default_rng(19)
    x = np.broadcast_to(rng.normal(size=(1, 2, d)), (n, 2, d))
    h0 = np.broadcast_to(rng.normal(size=(1, h)), (n, h))
    det = dnn.Method("deterministic")
    want = _numpy_forward(layer, x[:3], h0[:3])
    got = layer(x[:3], dnn.Context(det, jax.random.key(20)), h0=h0[:3])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    sampled = layer(x, dnn.Context(det, jax.random.key(21), train=True), h0=h0)
    assert np.abs(np.asarray(sampled[:3]) - np.asarray(want)).max() > 1e-3
    a = (
        x[0, 0] @ np.asarray(layer.input.kernel_mean[...])
        + np.asarray(layer.input.bias_mean[...])
        + np.asarray(layer.recurrent_mean[...]) * h0[0]
    )
    node_m, node_v = chain.node_moments("relu", jnp.asarray(a))
    _assert_mc(np.asarray(sampled[:, 0]), node_m, node_v, what="pcff step 1")
    with pytest.raises(ValueError, match="pcff_rate > 0 has no Gaussian moment rule"):
        layer(x[:3], dnn.Context(dnn.Method("bp")))


# --------------------------------------------------------------------------
# 6. the IndRNN bound
# --------------------------------------------------------------------------
def test_recurrent_bound_clips_the_forward_and_constrain_projects(x64):
    """``|u| <= bound``: a layer whose ``u`` means lie beyond the bound computes
    exactly what the layer with the means at ``±bound`` computes (bp moments
    and the deterministic forward); :func:`constrain_recurrent` projects the
    parameters of every bounded IndRNN inside a model (unbounded ones are
    left alone); ``default_bound(T) = 2 ** (1 / T)``."""
    t_len = 5
    bound = dnn.default_bound(t_len)
    assert bound == 2.0 ** (1.0 / t_len)
    assert dnn.default_bound(1) == 2.0
    x = np.random.default_rng(22).normal(size=(2, t_len, 2))
    far = _cell("indrnn", 2, 4, recurrent_bound=bound, recurrent_init=(0.0, 1.0))
    at = _cell("indrnn", 2, 4, recurrent_bound=bound, recurrent_init=(0.0, 1.0))
    beyond = np.array([3.0, -3.0, 0.5, -0.2])
    far.recurrent_mean[...] = jnp.asarray(beyond)
    at.recurrent_mean[...] = jnp.asarray(np.clip(beyond, -bound, bound))
    bp = dnn.Method("bp")
    a, b = far(x, dnn.Context(bp)), at(x, dnn.Context(bp))
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)
    # the deterministic forward: the numpy recurrence with u clipped at the
    # bound, not the one with the stored |u| = 3 (which grows like 3^t)
    got = np.asarray(far(x, dnn.Context(dnn.Method("deterministic"))))
    clipped = _numpy_forward(at, x)
    np.testing.assert_allclose(got, clipped, rtol=1e-12, atol=1e-12)
    far.recurrent_bound = None
    assert np.abs(_numpy_forward(far, x) - clipped).max() > 1.0
    model = SequenceNet(
        2, 2, hidden=4, depth=2, recurrent_bound=bound, rngs=nnx.Rngs(0)
    )
    free = _cell("indrnn", 2, 4)
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, dnn.IndRNN)]
    assert len(layers) == 2
    for layer in (*layers, free):
        layer.recurrent_mean[...] = jnp.asarray(beyond, layer.recurrent_mean[...].dtype)
    dnn.constrain_recurrent(model)
    dnn.constrain_recurrent(free)
    for layer in layers:
        np.testing.assert_array_equal(
            layer.recurrent_mean[...], np.clip(beyond, -bound, bound).astype(np.float32)
        )
    np.testing.assert_array_equal(free.recurrent_mean[...], beyond)
    # initial means are clipped too
    init = _cell("indrnn", 2, 8, recurrent_init=(1.5, 3.0), recurrent_bound=bound)
    np.testing.assert_array_equal(init.recurrent_mean[...], np.full(8, bound))


@pytest.mark.parametrize("name", ["reparam", "flipout"])
def test_sampled_recurrent_weights_respect_the_bound(name, x64):
    """With ``u`` at the bound and a large variance, every sampled ``u`` a
    sequence uses (``reparam``: one for all, ``flipout``: one per sequence)
    stays in ``[-bound, bound]``: identity IndRNN, zero inputs after the
    first step, so ``h_{t+1} / h_t`` is the sampled ``u``."""
    bound, n, t_len = 0.5, 64, 3
    layer = _cell(
        "indrnn",
        1,
        8,
        activation="identity",
        use_bias=False,
        recurrent_bound=bound,
        recurrent_init_var=1.0,
    )
    layer.recurrent_mean[...] = jnp.full(8, bound)
    x = np.zeros((n, t_len, 1))
    x[:, 0] = 1.0
    ratios = []
    for key in range(4):
        out = np.asarray(layer(x, dnn.Context(dnn.Method(name), jax.random.key(key))))
        assert np.abs(out[:, 0]).min() > 0
        ratios.append(out[:, 2] / out[:, 1])
    r = np.concatenate(ratios)
    assert np.abs(r).max() <= bound + 1e-12
    assert (r < bound - 0.1).mean() > 0.3  # samples below the bound are kept


# --------------------------------------------------------------------------
# 7. clear errors
# --------------------------------------------------------------------------
def test_clear_errors():
    layer = dnn.IndRNN(2, 3, rngs=nnx.Rngs(0))
    det = dnn.Context(dnn.Method("deterministic"))
    for bad in (jnp.ones((4, 2)), jnp.ones((4, 3, 5)), jnp.ones((1, 4, 3, 2))):
        with pytest.raises(ValueError, match=r"expected input \[N, T, 2\]"):
            layer(bad, det)
    with pytest.raises(TypeError, match="got a Gaussian belief"):
        layer(Gaussian(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2))), det)
    with pytest.raises(ValueError, match="pass a PRNG key"):
        layer(jnp.ones((1, 3, 2)), dnn.Context(dnn.Method("reparam")))
    with pytest.raises(ValueError, match="node distribution.*'gelu'"):
        dnn.IndRNN(2, 3, activation="gelu", pcff_rate=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="node distribution.*'gelu'"):
        SequenceNet(
            2,
            2,
            hidden=3,
            cell="srn",
            activation="gelu",
            pcff_rate=0.1,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match=r"pcff_rate must be in \[0, 1\]"):
        dnn.SimpleRNN(2, 3, pcff_rate=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown activation"):
        dnn.SimpleRNN(2, 3, activation="swishy", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unroll must be an integer >= 1"):
        dnn.IndRNN(2, 3, unroll=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="recurrent_bound must be > 0"):
        dnn.IndRNN(2, 3, recurrent_bound=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        dnn.default_bound(0)
    pcff_net = SequenceNet(2, 2, hidden=3, depth=1, pcff_rate=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pcff_rate > 0 has no Gaussian moment rule"):
        dnn.apply(pcff_net, jnp.ones((1, 3, 2)), dnn.Method("bp"))
    with pytest.raises(ValueError, match="depth must be odd, got 2"):
        SequenceNet(2, 2, hidden=3, depth=2, residual=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head must be 'last' or 'sequence'"):
        SequenceNet(2, 2, hidden=3, head="mean", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cell must be one of"):
        SequenceNet(2, 2, hidden=3, cell="lstm", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        SequenceNet(2, 2, hidden=3, depth=0, rngs=nnx.Rngs(0))
    # the pure moment scans
    a = Gaussian(jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"u_mean/u_var must be \[H\]"):
        moments.indrnn(a, jnp.zeros((4, 4)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match=r"expected the input term \[N, T, H\]"):
        moments.indrnn(a.mean[0], jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"h0 must be \[N, H\]"):
        moments.indrnn(a, jnp.zeros(4), jnp.ones(4), h0=jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="observations need noise_var"):
        moments.indrnn(a, jnp.zeros(4), jnp.ones(4), observations=jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"U must be \[H, H\]"):
        moments.simple_rnn(a, jnp.zeros((4, 3)), jnp.ones((4, 3)))


# --------------------------------------------------------------------------
# 8. hidden-state posterior
# --------------------------------------------------------------------------
def test_hidden_state_posterior_of_a_nonlinear_sequence_net():
    """Non-bp methods raise; a model without recurrent layers raises; on a
    residual ReLU IndRNN stack with (marginalised) dropout and a label head,
    every recurrent layer ("rnn0", "rnn1", "rnn2" in call order) gets finite
    filtered and smoothed moments ``[N, T, H]`` with non-negative smoothed
    variances, and the smoothed means move away from the filtered ones."""
    n, t_len, d, h = 6, 4, 3, 5
    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.normal(size=(n, t_len, d)), jnp.float32)
    y = jnp.arange(n) % 3
    model = SequenceNet(
        d,
        3,
        hidden=h,
        depth=3,
        residual=True,
        residual_gain=0.5,
        dropout=0.2,
        init_var=0.1,
        rngs=nnx.Rngs(2),
    )
    for name in dnn.METHODS:
        if name != "bp":
            with pytest.raises(ValueError, match=r"needs Method\('bp'\)"):
                dnn.hidden_state_posterior(model, x, y, method=dnn.Method(name))
    with pytest.raises(ValueError, match="no recurrent layer"):
        dnn.hidden_state_posterior(
            dnn.Sequential(dnn.Dense(d, 3, rngs=nnx.Rngs(0))),
            x[:, 0],
            y,
            method=dnn.Method("bp"),
        )
    graphdef, state = nnx.split(model)
    res = jax.jit(
        lambda st: dnn.hidden_state_posterior(
            nnx.merge(graphdef, st), x, y, method=dnn.Method("bp")
        )
    )(state)
    assert sorted(res.filtered) == sorted(res.smoothed) == ["rnn0", "rnn1", "rnn2"]
    assert np.isfinite(float(res.loss))
    for name in res.filtered:
        f, s, g = res.filtered[name], res.smoothed[name], res.grads[name]
        for arr in (f.mean, f.var, s.mean, s.var, g.mean, g.var):
            assert arr.shape == (n, t_len, h)
            assert np.all(np.isfinite(np.asarray(arr)))
        assert np.all(np.asarray(s.var) >= 0.0), name
        assert np.abs(np.asarray(s.mean - f.mean)).max() > 1e-6, name


def test_review_findings_shapes_and_dtypes():
    """Second-reading findings: a recurrent weight of the wrong size, a bool
    unroll and return_sequences inside SequenceNet raise; the carry takes the
    input term's dtype on both the fused and the per-op path."""
    a = Gaussian(jnp.ones((2, 3, 4)), jnp.full((2, 3, 4), 0.1))
    with pytest.raises(ValueError, match="do not match the 4 hidden units"):
        moments.indrnn(a, jnp.array([0.5]), jnp.array([0.1]))
    with pytest.raises(ValueError, match="do not match the 4 hidden units"):
        moments.simple_rnn(a, jnp.ones((3, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="unroll must be an integer"):
        moments.indrnn(a, jnp.ones(4), jnp.ones(4), unroll=True)
    with pytest.raises(ValueError, match="return_sequences is set by the stack"):
        SequenceNet(3, 2, hidden=5, depth=1, return_sequences=False, rngs=nnx.Rngs(0))
    h0 = Gaussian(jnp.ones((2, 4), jnp.float16), jnp.ones((2, 4), jnp.float16))
    for kw in (dict(fuse=True), dict(fuse=False), dict(mode="matched")):
        out, _ = moments.indrnn(a, jnp.full(4, 0.5), jnp.full(4, 0.1), h0=h0, **kw)
        assert out.mean.dtype == a.dtype and out.var.dtype == a.dtype, kw
