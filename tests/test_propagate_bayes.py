"""Unit tests of dualflow.propagation.bayes: existing models made Bayesian."""

import copy as copy_module
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from mc_stats import mc_stats

import dualflow as df
from dualflow import objectives
from dualflow.gaussian import Gaussian
from dualflow.nn import Context, Method, kl_divergence, predict
from dualflow.optim import mean_variance_labels, natural_gradient
from dualflow.propagation.bayes import FixedState, default_is_random
from dualflow.train import fit

BP = Method("bp")
DET = Method("deterministic")


class LinenNet(nn.Module):
    """Conv -> LayerNorm -> dropout -> Dense (uses every kind of leaf)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def linen_model():
    x = jax.random.normal(jax.random.key(0), (5, 4, 4, 2))
    variables = LinenNet().init(jax.random.key(1), x)
    return LinenNet(), variables, x


def _linear(params, x):
    return x @ params["layer"]["w"] + params["layer"]["bias"]


def _linear_params():
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "layer": {
            "w": jax.random.normal(k1, (6, 2)) / math.sqrt(6),
            "bias": 0.1 * jax.random.normal(k2, (2,)),
        }
    }


# --------------------------------------------------------------------------
# which leaves are random, and their fan-in
# --------------------------------------------------------------------------
def test_default_predicate():
    assert default_is_random("a/kernel", jnp.zeros((3, 4)))
    assert default_is_random("a/bias", jnp.zeros((4,)))
    assert default_is_random("a/Conv_0/bias", jnp.zeros((4, 1, 1)))
    assert not default_is_random("a/scale", jnp.zeros((4,)))
    assert not default_is_random("a/bias_net/scale", jnp.zeros((4,)))  # name only
    assert not default_is_random("a/alpha", jnp.zeros(()))


def test_leaf_kinds_linen(linen_model):
    module, variables, _ = linen_model
    kinds = {p: k for p, (k, _) in df.from_linen(module, variables).paths().items()}
    assert kinds == {
        "params/Conv_0/kernel": "random",
        "params/Conv_0/bias": "random",
        "params/BatchNorm_0/scale": "point",
        "params/BatchNorm_0/bias": "random",
        "params/LayerNorm_0/scale": "point",
        "params/LayerNorm_0/bias": "random",
        "params/Dense_0/kernel": "random",
        "params/Dense_0/bias": "random",
        "batch_stats/BatchNorm_0/mean": "fixed",
        "batch_stats/BatchNorm_0/var": "fixed",
    }


def test_custom_predicate_and_fixed_state(linen_model):
    module, variables, _ = linen_model
    model = df.from_linen(
        module, variables, is_random=lambda path, leaf: "Dense_0" in path
    )
    kinds = {p: k for p, (k, _) in model.paths().items()}
    random = sorted(p for p, k in kinds.items() if k == "random")
    assert random == ["params/Dense_0/bias", "params/Dense_0/kernel"]
    assert kinds["params/Conv_0/kernel"] == "point"
    # non-"params" collections are fixed: not nnx.Param, so fit does not train them
    fixed = nnx.state(model, FixedState)
    assert len(jax.tree.leaves(fixed)) == 2
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 2 * 2 + 6


def _logvar(model, path):
    _, name = model.paths()[path]
    return float(getattr(model, f"{name}_logvar")[...].ravel()[0])


def test_fan_in_linen(linen_model):
    module, variables, _ = linen_model
    model = df.from_linen(module, variables, init_var=0.5)
    expect = {
        "params/Conv_0/kernel": 3 * 3 * 2,  # HWIO
        "params/Conv_0/bias": 3 * 3 * 2,  # its kernel's fan-in
        "params/Dense_0/kernel": 4 * 4 * 4,
        "params/Dense_0/bias": 4 * 4 * 4,
        "params/LayerNorm_0/bias": 1,  # no weight beside it
    }
    for path, fan_in in expect.items():
        assert _logvar(model, path) == pytest.approx(math.log(0.5 / fan_in), 1e-6)


def test_fan_in_equinox():
    key = jax.random.key(0)
    conv = eqx.nn.Conv2d(3, 5, 3, key=key)  # weight [out, in, k, k], bias [out, 1, 1]
    lin = eqx.nn.Linear(7, 4, key=key)  # weight [out, in]
    model = df.from_equinox((conv, lin), batch_axis=None, init_var=1.0)
    assert _logvar(model, "0/weight") == pytest.approx(-math.log(27), 1e-6)
    assert _logvar(model, "0/bias") == pytest.approx(-math.log(27), 1e-6)
    assert _logvar(model, "1/weight") == pytest.approx(-math.log(7), 1e-6)
    assert _logvar(model, "1/bias") == pytest.approx(-math.log(7), 1e-6)


def test_fan_in_function_rules():
    params = {
        "w1": jnp.zeros((5, 3)),
        "bias1": jnp.zeros((3,)),  # no weight named like it, but one matches size
        "net": {"a": jnp.zeros((2, 4)), "b": jnp.zeros((6, 4)), "bias": jnp.zeros(4)},
    }
    model = df.from_function(lambda p, x: x, params, init_var=1.0)
    assert _logvar(model, "w1") == pytest.approx(-math.log(5))
    assert _logvar(model, "bias1") == pytest.approx(-math.log(5))
    assert _logvar(model, "net/bias") == 0.0  # ambiguous (a or b): fan-in 1
    custom = df.from_function(
        lambda p, x: x, params, init_var=1.0, layout=lambda path, leaf: 10
    )
    assert _logvar(custom, "net/bias") == pytest.approx(-math.log(10))
    scaled = df.from_function(lambda p, x: x, params, init_var=0.3, var_scaling="none")
    assert _logvar(scaled, "w1") == pytest.approx(math.log(0.3))
    with pytest.raises(ValueError, match="layout"):
        df.from_function(lambda p, x: x, params, layout="io")


# --------------------------------------------------------------------------
# KL and the natural gradient
# --------------------------------------------------------------------------
def test_kl_matches_closed_form(linen_model):
    module, variables, _ = linen_model
    model = df.from_linen(module, variables, init_var=0.1, prior_var=2.0)
    want = 0.0
    for kind, name in model.paths().values():
        if kind != "random":
            continue
        m = getattr(model, f"{name}_mean")[...]
        v = jnp.exp(getattr(model, f"{name}_logvar")[...])
        fan_in = 0.1 / float(v.ravel()[0])  # init_var / fan_in
        want += objectives.kl_mean_field(m, v, 0.0, 2.0 / fan_in)
    np.testing.assert_allclose(model.kl(), want, rtol=1e-5)
    np.testing.assert_allclose(kl_divergence(model), want, rtol=1e-5)


def test_kl_empirical_bayes():
    params = _linear_params()
    model = df.from_function(_linear, params, prior_var="empirical_bayes")
    want = 0.0
    for name in model._bayesian_names:
        m, v = model.moments_of(name)
        want += objectives.kl_mean_field(m, v, 0.0, jnp.mean(m * m + v))
    np.testing.assert_allclose(model.kl(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="prior_var"):
        df.from_function(_linear, params, prior_var=-1.0)


def test_natural_gradient_pairs_leaves(linen_model):
    module, variables, x = linen_model
    model = df.from_linen(module, variables)
    params = nnx.state(model, nnx.Param)
    labels = mean_variance_labels(nnx.to_pure_dict(params))
    for kind, name in model.paths().values():
        if kind == "random":
            assert labels[f"{name}_mean"] == "mean"
            assert labels[f"{name}_logvar"] == "variance"
        elif kind == "point":
            assert labels[name] == "other"
    # one step: mean update = v * G, logvar update = 2 G
    tx = natural_gradient()
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    _, name = model.paths()["params/Dense_0/kernel"]
    v = jnp.exp(getattr(model, f"{name}_logvar")[...])
    np.testing.assert_allclose(upd[f"{name}_mean"][...], v, rtol=1e-6)
    np.testing.assert_allclose(upd[f"{name}_logvar"][...], 2.0, rtol=1e-6)


def test_names_never_confuse_natural_gradient():
    """Point leaves ending in _mean / clashing with methods are renamed."""
    params = {"running_mean": jnp.ones(3), "kl": jnp.ones(2), "0": jnp.ones((2, 2))}
    model = df.from_function(lambda p, x: x * p["running_mean"], params)
    names = {p: a for p, (_, a) in model.paths().items()}
    assert not names["running_mean"].endswith("_mean")
    assert names["kl"] != "kl" and callable(model.kl)
    assert names["0"].isidentifier()
    labels = mean_variance_labels(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert labels[names["running_mean"]] == "other"


# --------------------------------------------------------------------------
# forward passes
# --------------------------------------------------------------------------
def test_deterministic_equals_original(linen_model):
    module, variables, x = linen_model
    model = df.from_linen(module, variables)
    np.testing.assert_array_equal(
        model(x, Context(DET)), module.apply(variables, x, train=False)
    )
    mlp = eqx.nn.MLP(6, 2, 8, 2, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (4, 6))
    np.testing.assert_allclose(
        df.from_equinox(mlp)(xs, Context(DET)), jax.vmap(mlp)(xs), rtol=1e-6
    )
    lin = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(df.from_nnx(lin)(xs, Context(DET)), lin(xs))
    params = _linear_params()
    np.testing.assert_array_equal(
        df.from_function(_linear, params)(xs, Context(DET)), _linear(params, xs)
    )


@pytest.mark.parametrize("mode", ["linearized", "matched"])
def test_bp_equals_propagate(linen_model, mode):
    module, variables, x = linen_model
    model = df.from_linen(module, variables, init_var=0.01)
    out = model(x, Context(Method("bp", mode=mode)))
    gauss = jax.tree.map(lambda a: a, variables)
    for path, (kind, name) in model.paths().items():
        if kind == "random":
            keys = path.split("/")
            node = gauss
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = Gaussian(*model.moments_of(name))
    ref = df.propagate(module.apply, mode=mode)(gauss, x)
    assert isinstance(out, Gaussian)
    np.testing.assert_allclose(out.mean, ref.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.var, ref.var, rtol=1e-6, atol=1e-9)
    assert float(out.var.min()) > 0


def test_call_arguments_and_gaussian_inputs(linen_model):
    module, variables, x = linen_model
    model = df.from_linen(module, variables, call_kwargs={"train": False})
    det = model(x, Context(DET))
    np.testing.assert_array_equal(det, module.apply(variables, x))
    # a per-call keyword overrides call_kwargs (train=True needs a dropout rng)
    rngs = {"dropout": jax.random.key(0)}
    drop = model(x, Context(DET), train=True, rngs=rngs)
    np.testing.assert_array_equal(
        drop, module.apply(variables, x, train=True, rngs=rngs)
    )
    # a Gaussian input under bp; refused by the other methods
    gx = Gaussian(x, jnp.full_like(x, 0.01))
    out = model(gx, Context(BP))
    assert bool(jnp.all(out.var > model(x, Context(BP)).var))
    with pytest.raises(TypeError, match="Gaussian input"):
        model(gx, Context(DET))


def test_unsupported_methods_and_arguments_raise():
    with pytest.raises(TypeError, match="hashable"):
        df.from_function(_linear, _linear_params(), call_kwargs={"a": [1]})
    with pytest.raises(ValueError, match="var_scaling"):
        df.from_function(_linear, _linear_params(), var_scaling="fan_out")
    model = df.from_function(_linear, _linear_params())
    x = jnp.ones((2, 6))
    for name in ("local_reparam", "flipout", "mc_dropout"):
        with pytest.raises(ValueError, match="not supported"):
            model(x, Context(Method(name), jax.random.key(0)))


def test_nothing_random_gives_point_belief():
    params = _linear_params()
    model = df.from_function(_linear, params, is_random=lambda p, a: False)
    out = model(jnp.ones((2, 6)), Context(BP))
    assert isinstance(out, Gaussian) and float(jnp.abs(out.var).max()) == 0.0
    assert float(model.kl()) == 0.0


def test_reparam_sample_statistics():
    params = _linear_params()
    model = df.from_function(_linear, params, init_var=0.5)
    x = jax.random.normal(jax.random.key(5), (3, 6))

    def one(key):
        return model(x, Context(Method("reparam"), key))

    samples = jax.vmap(one)(jax.random.split(jax.random.key(6), 4000))
    mean, var, se_m, se_v = mc_stats(samples)
    (wm, wv), (bm, bv) = (
        model.moments_of(model.paths()[p][1]) for p in ("layer/w", "layer/bias")
    )
    want_m = x @ wm + bm
    want_v = (x * x) @ wv + bv
    assert np.all(np.abs(mean - want_m) < 5 * se_m)
    assert np.all(np.abs(var - want_v) < 5 * se_v)
    # one joint sample per call: the same key gives the same weights
    np.testing.assert_array_equal(one(jax.random.key(1)), one(jax.random.key(1)))


# --------------------------------------------------------------------------
# training machinery
# --------------------------------------------------------------------------
def test_jit_predict_and_fit_nnx():
    """fit / predict (jit, static graphdef) work on an nnx module wrapped."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            h = self.bn(self.l1(x), use_running_average=True)
            return self.l2(jax.nn.relu(h))

    model = df.from_nnx(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = jnp.arange(32) % 3
    hash(nnx.split(model)[0])  # the graphdef is hashable (a jit static)
    for copy in (nnx.clone(model), copy_module.deepcopy(model)):
        np.testing.assert_array_equal(copy(x, Context(DET)), model(x, Context(DET)))
    before = nnx.state(model, FixedState)
    tx = optax.chain(natural_gradient(), optax.sgd(1e-2))
    hist = fit(model, tx, x, y, method=BP, epochs=3, batch_size=16, progress=False)
    assert np.isfinite(hist[-1]["loss"])
    jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model, FixedState))
    p1 = predict(model, x, method=BP)
    p2 = predict(model, x, method=Method("reparam"), key=jax.random.key(0))
    np.testing.assert_allclose(p1.probs.sum(-1), 1.0, rtol=1e-5)
    assert p2.sample_probs.shape == (32, 32, 3)


def test_integer_and_none_leaves_are_kept():
    params = {"w": jnp.ones((2, 2)), "n": jnp.array(3), "skip": None}

    def fn(p, x):
        assert p["skip"] is None
        return x @ p["w"] * p["n"]

    model = df.from_function(fn, params)
    kinds = {p: k for p, (k, _) in model.paths().items()}
    assert kinds == {"w": "random", "n": "fixed"}
    out = model(jnp.ones((1, 2)), Context(BP))
    np.testing.assert_allclose(out.mean, 6.0)
