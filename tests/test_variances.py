"""Positive variances (issue 18, item 1): by construction where dualflow owns the
parameters, refused at the moment ops otherwise, and debug checks that name
the bad tensor, eagerly and under jit, at zero cost when off."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dualflow
from dualflow import Gaussian, gaussian, moments
from dualflow import nn as dnn
from dualflow.moments import combine, linear


@pytest.fixture
def debug_checks():
    prev = dualflow.debug_checks_enabled()
    dualflow.set_debug_checks(True)
    yield
    dualflow.set_debug_checks(prev)


# --------------------------------------------------------------------------
# item 1: every variance dualflow trains is exp(logvar)
# --------------------------------------------------------------------------
def _affine(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def _models():
    """Every Bayesian layer family: ``(model, point input)``."""
    r = nnx.Rngs(0)
    fn_params = {"w": 0.3 * jnp.ones((3, 4)), "b": jnp.zeros(4)}
    return {
        "dense": (dnn.Dense(3, 4, rngs=r), jnp.ones((5, 3))),
        "conv": (dnn.Conv(2, 3, 3, rngs=r), jnp.ones((2, 5, 5, 2))),
        "indrnn": (dnn.IndRNN(3, 4, rngs=r), jnp.ones((2, 6, 3))),
        "simple_rnn": (dnn.SimpleRNN(3, 4, rngs=r), jnp.ones((2, 6, 3))),
        "function": (dualflow.from_function(_affine, fn_params), jnp.ones((5, 3))),
    }


def _bayes_layers(model):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, dnn.BayesianModule)]


def _all_variances(model):
    return [
        layer.moments_of(name)[1]
        for layer in _bayes_layers(model)
        for name in layer._bayesian_names
    ]


@pytest.mark.parametrize("kind", list(_models()))
def test_no_raw_variance_is_a_trainable_parameter(kind):
    model, _ = _models()[kind]
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    names = [re.findall(r"\['(\w+)'\]", jax.tree_util.keystr(p))[-1] for p, _ in flat]
    var_like = [n for n in names if "var" in n]
    assert var_like, names
    assert all(n.endswith("_logvar") for n in var_like), var_like
    for layer in _bayes_layers(model):
        for name in layer._bayesian_names:
            assert isinstance(getattr(layer, f"{name}_logvar"), nnx.Param)


@pytest.mark.parametrize("kind", list(_models()))
@pytest.mark.parametrize("lr", [1e-2, 1e2, 1e6])
def test_no_sgd_step_makes_a_layer_variance_negative(kind, lr):
    """One plain SGD step of any size on a bp loss (output mean^2 + var, plus
    KL): every weight variance is ``exp(logvar) >= 0`` afterwards (it may
    overflow to inf or underflow to 0 for absurd steps, never below 0/NaN)."""
    model, x = _models()[kind]
    method = dnn.Method("bp")

    def loss(m):
        out = dnn.apply(m, x, method)
        return jnp.mean(out.mean**2 + out.var) + dnn.kl_divergence(m)

    grads = nnx.grad(loss)(model)
    params = nnx.state(model, nnx.Param)
    new = jax.tree.map(lambda p, g: p - lr * g, params, nnx.state(grads, nnx.Param))
    nnx.update(model, new)
    for v in _all_variances(model):
        assert not bool(jnp.any(jnp.isnan(v)))
        assert bool(jnp.all(v >= 0))


@pytest.mark.parametrize("kind", list(_models()))
def test_any_real_logvar_is_a_valid_variance(kind):
    """Adversarial parameters: logvars anywhere in [-1e4, 1e4]."""
    model, _ = _models()[kind]
    key = jax.random.key(1)
    for layer in _bayes_layers(model):
        for name in layer._bayesian_names:
            p = getattr(layer, f"{name}_logvar")
            key, k = jax.random.split(key)
            p[...] = jax.random.uniform(k, p[...].shape, minval=-1e4, maxval=1e4)
    for v in _all_variances(model):
        assert bool(jnp.all(v >= 0)) and not bool(jnp.any(jnp.isnan(v)))


@pytest.mark.parametrize("kind", ["dense", "conv", "indrnn", "function"])
def test_underflowed_variance_keeps_kl_and_gradients_finite(kind):
    """Fault: logvar below float32 underflow (-120: var == 0).  Before: KL = inf
    and NaN gradients (log(exp(lv)) = -inf; d sqrt(v) at 0 = inf).  Now: KL
    uses logvar directly and sampling uses a safe sqrt, so both are finite."""
    model, x = _models()[kind]
    for layer in _bayes_layers(model):
        for name in layer._bayesian_names:
            p = getattr(layer, f"{name}_logvar")
            p[...] = jnp.full_like(p[...], -120.0)
    assert all(bool(jnp.all(v == 0)) for v in _all_variances(model))
    kl = dnn.kl_divergence(model)
    assert bool(jnp.isfinite(kl))
    g = nnx.grad(dnn.kl_divergence)(model)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    method = dnn.Method("reparam")

    def sample_loss(m):
        return jnp.mean(dnn.apply(m, x, method, jax.random.key(0), train=True) ** 2)

    g = nnx.grad(sample_loss)(model)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


# --------------------------------------------------------------------------
# item 3: debug checks on weight variances and point arrays
# --------------------------------------------------------------------------
X = jnp.ones((2, 3))
WM = jnp.ones((3, 4))
WV_BAD = jnp.full((3, 4), 0.1).at[1, 2].set(-0.5).at[2, 0].set(-0.25)
WV = jnp.full((3, 4), 0.1)


def test_negative_weight_variance_is_silent_when_checks_are_off():
    out = moments.dense(X, WM, WV_BAD)  # documented: device arrays unchecked
    assert float(out.var.min()) < 0


def test_debug_check_names_negative_weight_variance_eager(debug_checks):
    with pytest.raises(FloatingPointError) as e:
        moments.dense(X, WM, WV_BAD)
    msg = str(e.value)
    assert "dense w_var" in msg and "2 of 12 negative variances" in msg
    assert "first at index (1, 2): -0.5" in msg


def test_debug_check_under_jit_grad_vmap_and_scan(debug_checks):
    pat = r"dense w_var: 2 of 12 negative variances \(first at index \(1, 2\): -0\.5"
    with pytest.raises(Exception, match=pat):
        jax.jit(lambda w: moments.dense(X, WM, w).var)(WV_BAD).block_until_ready()
    with pytest.raises(Exception, match=pat):
        jax.jit(jax.grad(lambda w: moments.dense(X, WM, w).var.sum()))(
            WV_BAD
        ).block_until_ready()
    with pytest.raises(Exception, match="negative variances"):
        jax.jit(jax.vmap(lambda w: moments.dense(X, WM, w).var))(
            jnp.stack([WV, WV_BAD])
        ).block_until_ready()

    def body(c, w):
        return c + moments.dense(X, WM, w).var.sum(), None

    with pytest.raises(Exception, match="negative variances"):
        jax.jit(lambda ws: jax.lax.scan(body, 0.0, ws)[0])(
            jnp.stack([WV, WV_BAD])
        ).block_until_ready()
    # clean inputs pass through every transform
    ok = jax.jit(jax.grad(lambda w: moments.dense(X, WM, w).var.sum()))(WV)
    assert bool(jnp.all(jnp.isfinite(ok)))


def test_debug_check_covers_conv_bias_and_points(debug_checks):
    x = jnp.ones((1, 4, 4, 2))
    km, kv = jnp.ones((3, 3, 2, 2)), jnp.full((3, 3, 2, 2), 0.1)
    with pytest.raises(FloatingPointError, match=r"conv w_var: 1 of 36 non-finite"):
        moments.conv(x, km, kv.at[0, 1, 1, 0].set(jnp.nan))
    with pytest.raises(Exception, match=r"conv b_var: 1 of 2 negative"):
        jax.jit(lambda b: moments.conv(x, km, kv, jnp.zeros(2), b).var)(
            jnp.array([0.1, -1.0])
        ).block_until_ready()
    with pytest.raises(FloatingPointError, match=r"dense w_mean: 1 of 12 non-finite"):
        moments.dense(X, WM.at[0, 0].set(jnp.inf), WV)
    # point (plain array) inputs must be finite
    with pytest.raises(Exception, match=r"dense input: 1 of 6 non-finite values"):
        jax.jit(lambda x: moments.dense(x, WM, WV).mean)(
            X.at[1, 2].set(jnp.nan)
        ).block_until_ready()
    with pytest.raises(FloatingPointError, match="relu input: 1 of 3 non-finite"):
        moments.relu(jnp.array([0.0, jnp.nan, 1.0]))
    with pytest.raises(FloatingPointError, match="scale c"):
        combine.scale(Gaussian(jnp.ones(2), jnp.ones(2)), jnp.array([1.0, jnp.inf]))


def test_validate_names_the_pytree_leaf(debug_checks):
    params = {
        "dense": {"kernel_mean": jnp.zeros((3, 4)), "kernel_var": WV_BAD},
        "h": Gaussian(jnp.zeros(2), jnp.array([1.0, -2.0])),
    }
    with pytest.raises(FloatingPointError) as e:
        dualflow.validate(params["dense"], "params['dense']", variance=True)
    assert "params['dense']['kernel_var']: 2 of 12 negative variances" in str(e.value)
    assert "kernel_mean" not in str(e.value)
    with pytest.raises(FloatingPointError, match=r"params\['h'\]\.var: 1 of 2 neg"):
        dualflow.validate(params, "params")
    nan_params = {"w": jnp.zeros(3).at[2].set(jnp.nan), "lv": jnp.zeros(3)}
    with pytest.raises(Exception, match=r"params\['w'\]: 1 of 3 non-finite values"):
        jax.jit(lambda p: dualflow.validate(p, "params")["lv"])(
            nan_params
        ).block_until_ready()
    ok = {"w": jnp.full(3, -1.0), "lv": jnp.full(3, -5.0)}  # points may be < 0
    assert dualflow.validate(ok, "params") is ok


def _jaxprs():
    g = Gaussian(jnp.ones((2, 3)), jnp.ones((2, 3)))
    x4 = jnp.ones((1, 4, 4, 2))
    k = jnp.ones((3, 3, 2, 2))
    fns = {
        "dense": lambda w, v: moments.dense(X, w, v, jnp.zeros(4), jnp.ones(4)),
        "dense_gauss": lambda w, v: moments.relu(moments.dense(g, w, v)),
        "conv": lambda w, v: moments.conv(x4, k, k * 0.1 + w.sum() * v.sum()),
        "multiply": lambda w, v: combine.multiply(g, Gaussian(w[:2, :3], v[:2, :3])),
        "from_logvar": lambda w, v: Gaussian.from_logvar(w, v).sample(
            jax.random.key(0)
        ),
        "validate": lambda w, v: dualflow.validate({"w": w, "v": v}, variance=True),
    }
    return {
        name: str(
            jax.make_jaxpr(jax.value_and_grad(_scalar(f), argnums=(0, 1)))(WM, WV)
        )
        for name, f in fns.items()
    }


def _scalar(f):
    return lambda w, v: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(f(w, v)))


def test_debug_checks_off_add_nothing_to_the_jaxpr(monkeypatch):
    """With checks off, the traced program (forward + backward) is identical to
    one traced with every value check removed; with checks on it gains
    debug callbacks."""
    assert not dualflow.debug_checks_enabled()
    off = _jaxprs()
    for name, text in off.items():
        assert "debug_callback" not in text, name

    def no_check(*args, **kwargs):
        return None

    with monkeypatch.context() as m:
        for mod in (gaussian, linear, combine):
            m.setattr(mod, "_check_values", no_check)
        m.setattr(gaussian, "_checked", lambda g, where: g)
        stripped = _jaxprs()
    assert off == stripped
    dualflow.set_debug_checks(True)
    try:
        on = _jaxprs()
    finally:
        dualflow.set_debug_checks(False)
    for name, text in on.items():
        assert "debug_callback" in text, name


def test_debug_checks_raise_no_false_alarm_in_training(debug_checks):
    """A jitted bp training step (MLP, recurrent, wrapped function) and the
    Theorem-1 smoother (gradients as a Gaussian, negative 'var' field) run
    clean with checks on."""
    model = dnn.MLP((3, 8, 2), rngs=nnx.Rngs(0))
    x, y = jax.random.normal(jax.random.key(0), (6, 3)), jnp.arange(6) % 2
    method = dnn.Method("bp")

    @nnx.jit
    def step(m):
        return nnx.grad(lambda m: dnn.objective(m, x, y, method=method, n_data=6)[0])(m)

    leaves = jax.tree.leaves(step(model))
    assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    rnn = dnn.IndRNN(3, 4, rngs=nnx.Rngs(1))
    out = dnn.apply(rnn, jnp.ones((2, 5, 3)), method)
    assert bool(jnp.all(out.var >= 0))
    f = dualflow.from_function(_affine, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)})
    assert bool(jnp.all(dnn.apply(f, x, method).var >= 0))

    def neg_var(b):  # smoothing-style use: the gradient's "var" field is < 0
        out = moments.dense(b, WM, WV)
        return jnp.sum(out.mean) - jnp.sum(out.var)

    g = jax.jit(jax.grad(neg_var))(Gaussian(jnp.ones((2, 3)), jnp.ones((2, 3))))
    assert isinstance(g, Gaussian) and bool(jnp.all(g.var < 0))


# --------------------------------------------------------------------------
# item 4: host-resident beliefs with a negative variance are refused, always
# --------------------------------------------------------------------------
def test_host_negative_variance_is_refused_without_debug_checks():
    assert not dualflow.debug_checks_enabled()
    bad = Gaussian(np.zeros(3, np.float32), np.array([1.0, -1.0, 2.0], np.float32))
    with pytest.raises(ValueError, match=r"relu input.var: 1 of 3 negative"):
        moments.relu(bad)
    with pytest.raises(ValueError, match="Gaussian.sample"):
        bad.sample(jax.random.key(0))
    with pytest.raises(ValueError, match=r"dense w_var: 2 of 12 negative"):
        moments.dense(np.ones((2, 3)), np.ones((3, 4)), np.asarray(WV_BAD))
    # construction itself is not checked: Gaussian is also the gradient pytree
    grads = jax.device_get(
        jax.grad(lambda b: jnp.sum(b.mean - 3.0 * b.var))(
            Gaussian(jnp.zeros(3), jnp.ones(3))
        )
    )
    assert isinstance(grads, Gaussian) and float(grads.var[0]) == -3.0
    sm = dualflow.smoothed_moments(Gaussian(np.zeros(3), np.ones(3)), grads)
    assert bool(jnp.all(jnp.isfinite(sm.var)))


def test_sgd_on_logvar_keeps_the_readme_example_positive():
    """The README "pieces" network with raw variances vs log-variances, plain
    SGD lr 0.1, 300 steps: raw ends NaN (measured before the fix: -2.51 at lr
    0.01, NaN at 0.1); log-variances stay finite and positive."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x, y = jax.random.normal(k3, (8, 64)), jnp.arange(8) % 10
    w1, w2 = (
        0.1 * jax.random.normal(k1, (64, 32)),
        0.1 * jax.random.normal(k2, (32, 10)),
    )

    def run(raw: bool):
        lv = math.log(1e-3)
        params = {
            "w1": w1,
            "s1": jnp.full((64, 32), 1e-3 if raw else lv),
            "w2": w2,
            "s2": jnp.full((32, 10), 1e-3 if raw else lv),
        }

        def fwd(p):
            v1, v2 = (p["s1"], p["s2"]) if raw else (jnp.exp(p["s1"]), jnp.exp(p["s2"]))
            h = moments.relu(moments.dense(x, p["w1"], v1), mode="matched")
            return moments.dense(h, p["w2"], v2)

        def loss(p):
            return dualflow.objectives.categorical_nll(fwd(p), y).mean()

        tx = optax.sgd(0.1)

        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        s = tx.init(params)
        for _ in range(300):
            params, s = step(params, s)
        return loss(params), fwd(params).var

    loss_raw, var_raw = run(raw=True)
    assert not (bool(jnp.isfinite(loss_raw)) and bool(jnp.all(var_raw >= 0)))
    loss_lv, var_lv = run(raw=False)
    assert bool(jnp.isfinite(loss_lv)) and bool(jnp.all(var_lv > 0))
