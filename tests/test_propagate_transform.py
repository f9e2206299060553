"""``dualflow.propagate`` as a JAX transform: composition, caching, errors, rules."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dualflow
from dualflow import moments
from dualflow.gaussian import Gaussian
from dualflow.propagation import (
    GaussianDependentControlFlowError,
    UnsupportedPrimitiveError,
    register_rule,
    unregister_rule,
)

HERE = os.path.basename(__file__)


def _g(key, shape, scale=1.0, var=0.05):
    k1, k2 = jax.random.split(key)
    return Gaussian(
        scale * jax.random.normal(k1, shape),
        var * jax.random.uniform(k2, shape, minval=0.5, maxval=1.5),
    )


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]


def _params(key):
    k = jax.random.split(key, 3)
    return {
        "w1": _g(k[0], (4, 8), 0.5),
        "b1": _g(k[1], (8,), 0.1),
        "w2": _g(k[2], (8, 3), 0.5),
    }


def _close(a, b, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# composition with jit, grad, vmap, scan
# --------------------------------------------------------------------------
def test_jit_equals_eager_and_matches_the_moment_ops():
    p = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    f = dualflow.propagate(_mlp)
    eager = f(p, x)
    jitted = jax.jit(f)(p, x)
    _close(eager.mean, jitted.mean)
    _close(eager.var, jitted.var)
    h = moments.dense(x, p["w1"].mean, p["w1"].var, p["b1"].mean, p["b1"].var)
    ref = moments.dense(moments.tanh(h), p["w2"].mean, p["w2"].var)
    _close(eager.mean, ref.mean)
    _close(eager.var, ref.var)


def test_vmap_over_inputs_equals_the_batched_call():
    p = _params(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (6, 5, 4))
    f = dualflow.propagate(_mlp)
    out = jax.vmap(f, in_axes=(None, 0))(p, xs)
    ref = f(p, xs.reshape(30, 4))
    _close(out.mean.reshape(30, 3), ref.mean)
    _close(out.var.reshape(30, 3), ref.var)


def test_grad_of_the_autodiff_backward_matches_finite_differences(x64):
    p = jax.tree.map(lambda a: a.astype(jnp.float64), _params(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    f = dualflow.propagate(_mlp, mode="matched", backward="autodiff")

    def loss(w1_mean):
        q = dict(p, w1=Gaussian(w1_mean, p["w1"].var))
        o = f(q, x)
        return jnp.sum(o.mean**2) + jnp.sum(o.var)

    g = jax.grad(loss)(p["w1"].mean)
    d = jax.random.normal(jax.random.key(3), g.shape, jnp.float64)
    eps = 1e-6
    fd = (loss(p["w1"].mean + eps * d) - loss(p["w1"].mean - eps * d)) / (2 * eps)
    assert abs(float(jnp.sum(g * d)) - float(fd)) <= 1e-7 * max(1.0, abs(float(fd)))


def test_bp_equals_autodiff_for_a_gaussian_linear_function(x64):
    def lin(params, x):
        h = x @ params["w1"] + params["b1"]
        return 0.5 * h[:, :3] - h[:, 3:6] @ jnp.ones((3, 3))

    p = jax.tree.map(lambda a: a.astype(jnp.float64), _params(jax.random.key(0)))
    x = _g(jax.random.key(1), (5, 4)).astype(jnp.float64)

    def loss(fn, p, x):
        o = fn(p, x)
        return jnp.sum(jnp.sin(o.mean)) + jnp.sum(o.var**2)

    gb = jax.grad(lambda p, x: loss(dualflow.propagate(lin), p, x), (0, 1))(p, x)
    ga = jax.grad(
        lambda p, x: loss(dualflow.propagate(lin, backward="autodiff"), p, x), (0, 1)
    )(p, x)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        _close(a, b, rtol=1e-12, atol=1e-14)


def test_propagated_function_inside_a_user_scan():
    p = _params(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (7, 5, 4))
    f = dualflow.propagate(_mlp)

    def body(acc, x):
        o = f(p, x)
        return acc + o.var.sum(), o.mean

    total, means = lax.scan(body, jnp.zeros(()), xs)
    ref = [f(p, x) for x in xs]
    _close(total, sum(float(r.var.sum()) for r in ref), rtol=1e-5)
    _close(means, jnp.stack([r.mean for r in ref]))


def test_sharded_batch_gives_the_unsharded_result(tmp_path):
    """jit over a 4-device data-parallel mesh (CPU devices, own process)."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import dualflow
        from dualflow import Gaussian
        assert jax.device_count() == 4
        k = jax.random.split(jax.random.key(0), 3)
        w = Gaussian(jax.random.normal(k[0], (6, 3)), jnp.full((6, 3), 0.1))
        x = jax.random.normal(k[1], (8, 6))
        f = jax.jit(dualflow.propagate(lambda w, x: jax.nn.relu(x @ w).sum(-1)))
        mesh = jax.make_mesh((4,), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        a, b = f(w, xs), f(w, x)
        assert len(a.mean.sharding.device_set) == 4, a.mean.sharding
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
        np.testing.assert_allclose(a.var, b.var, rtol=1e-6)
        print("ok")
        """
    )
    path = tmp_path / "shard.py"
    path.write_text(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------
# signature, caching, deterministic values
# --------------------------------------------------------------------------
def test_deterministic_outputs_are_plain_arrays_computed_exactly():
    w = _g(jax.random.key(0), (4, 3))
    x = jax.random.normal(jax.random.key(1), (5, 4))

    def fn(w, x, *, scale):
        return {"random": x @ w, "plain": jnp.sin(x) * scale}

    out = dualflow.propagate(fn)(w, x, scale=2.0)
    assert isinstance(out["random"], Gaussian)
    assert not isinstance(out["plain"], Gaussian)
    np.testing.assert_array_equal(out["plain"], jnp.sin(x) * 2.0)
    # no variance arrays for deterministic values: the plain branch has no
    # operation in the jaxpr beyond those of fn itself
    jaxpr = jax.make_jaxpr(lambda x: dualflow.propagate(fn)(w, x, scale=2.0))(x)
    assert sum(e.primitive.name == "sin" for e in jaxpr.jaxpr.eqns) == 1


def test_trace_is_cached_per_structure_and_static_args_are_static():
    calls = []

    def fn(w, x, train):
        calls.append(train)
        y = x @ w
        return y * 2.0 if train else y

    f = dualflow.propagate(fn)
    w = _g(jax.random.key(0), (4, 3))
    x = jnp.ones((5, 4))
    a = f(w, x, True)
    f(w, x + 1.0, True)
    assert len(calls) == 1  # same structure/shapes: traced once
    b = f(w, x, False)
    assert len(calls) == 2
    _close(a.mean, 2.0 * b.mean)
    _close(a.var, 4.0 * b.var)
    f(w, jnp.ones((6, 4)), True)  # new shape: traced again
    assert len(calls) == 3


def test_gaussian_inputs_with_fixed_weights_propagate_input_uncertainty(x64):
    """Error propagation: y = A x exactly; y = exp(x) log-normal (matched)."""
    a = jnp.asarray([[1.0, -2.0, 0.5], [0.3, 0.0, 4.0]])
    x = Gaussian(jnp.asarray([0.2, -1.0, 0.7]), jnp.asarray([0.04, 0.01, 0.09]))
    y = dualflow.propagate(lambda x: a @ x)(x)
    _close(y.mean, a @ x.mean, rtol=1e-14)
    _close(y.var, (a * a) @ x.var, rtol=1e-14)
    z = dualflow.propagate(jnp.exp, mode="matched")(x)
    _close(z.mean, jnp.exp(x.mean + x.var / 2), rtol=1e-14)
    _close(z.var, jnp.exp(2 * x.mean + x.var) * jnp.expm1(x.var), rtol=1e-12)
    lin = dualflow.propagate(jnp.exp)(x)  # linearized: f(m), f'(m)^2 v
    _close(lin.mean, jnp.exp(x.mean), rtol=1e-14)
    _close(lin.var, jnp.exp(2 * x.mean) * x.var, rtol=1e-14)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def test_unsupported_primitive_names_it_the_source_line_and_the_fix():
    def fn(x):
        return jnp.sort(x)  # the line the message must point to

    line = fn.__code__.co_firstlineno + 1
    with pytest.raises(UnsupportedPrimitiveError) as e:
        dualflow.propagate(fn)(_g(jax.random.key(0), (5,)))
    msg = str(e.value)
    assert "'sort'" in msg
    assert f"{HERE}:{line}" in msg
    assert "dualflow.register_rule('sort'" in msg
    assert isinstance(e.value, NotImplementedError)


def test_gaussian_dependent_cond_and_while_are_refused_with_a_message():
    x = _g(jax.random.key(0), (3,))

    def branchy(x):
        return lax.cond(x.sum() > 0, lambda v: v * 2.0, lambda v: v, x)

    with pytest.raises(GaussianDependentControlFlowError, match="lax.cond/switch"):
        dualflow.propagate(branchy)(x)

    def loop(x):
        return lax.while_loop(lambda v: v.sum() < 10.0, lambda v: v + 1.0, x)

    with pytest.raises(GaussianDependentControlFlowError, match="while loop"):
        dualflow.propagate(loop)(x)

    with pytest.raises(GaussianDependentControlFlowError, match="argmax"):
        dualflow.propagate(jnp.argmax)(x)

    def index(x):
        return jnp.arange(3)[(x[0] > 0).astype(jnp.int32)]

    with pytest.raises(GaussianDependentControlFlowError, match="depends on a Gaus"):
        dualflow.propagate(index)(x)


def test_deterministic_branch_and_loop_with_gaussian_carries_work():
    x = _g(jax.random.key(0), (3,))

    def fn(x, flag):
        y = lax.cond(flag > 0, lambda v: v * 2.0, lambda v: v - 1.0, x)
        return lax.fori_loop(0, 3, lambda i, v: 0.5 * v + 1.0, y)

    out = dualflow.propagate(fn)(x, 1)
    mean = x.mean * 2.0
    var = x.var * 4.0
    for _ in range(3):
        mean, var = 0.5 * mean + 1.0, 0.25 * var
    _close(out.mean, mean)
    _close(out.var, var)


def test_bad_gaussians_modes_and_functions_are_rejected():
    bad = Gaussian(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"mean shape \(3,\) but var shape \(4,\)"):
        dualflow.propagate(lambda x: x * 2)({"w": bad})
    with pytest.raises(ValueError, match=r"\['w'\]"):
        dualflow.propagate(lambda x: x["w"] * 2)({"w": bad})
    ints = Gaussian(jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="floating dtype"):
        dualflow.propagate(lambda x: x)(ints)
    with pytest.raises(ValueError, match="mode="):
        dualflow.propagate(jnp.sin, mode="exact")
    with pytest.raises(ValueError, match="backward="):
        dualflow.propagate(jnp.sin, backward="rts")
    with pytest.raises(TypeError, match="callable"):
        dualflow.propagate(3)
    w = _g(jax.random.key(0), (4, 3))
    with pytest.raises(TypeError, match="dot_general"):  # JAX's own shape error
        dualflow.propagate(lambda w, x: x @ w)(w, jnp.ones((5, 5)))


def test_max_of_two_independent_gaussians_has_no_rule():
    x, y = _g(jax.random.key(0), (3,)), _g(jax.random.key(1), (3,))
    with pytest.raises(UnsupportedPrimitiveError, match="'max'.*different Gaussian"):
        dualflow.propagate(jnp.maximum)(x, y)


# --------------------------------------------------------------------------
# register_rule
# --------------------------------------------------------------------------
def test_register_rule_adds_a_primitive_and_unregister_removes_it():
    def sort_rule(ctx, x, *, dimension, is_stable, num_keys):
        order = jnp.argsort(x.mean, axis=dimension, stable=is_stable)
        take = lambda a: jnp.take_along_axis(a, order, axis=dimension)  # noqa: E731
        return [Gaussian(take(x.mean), take(x.var))]

    x = Gaussian(jnp.asarray([3.0, 1.0, 2.0]), jnp.asarray([0.3, 0.1, 0.2]))
    register_rule(lax.sort_p, sort_rule)
    try:
        out = dualflow.propagate(lambda v: jnp.sort(v) * 2.0)(x)
        _close(out.mean, [2.0, 4.0, 6.0])
        _close(out.var, [0.4, 0.8, 1.2])
    finally:
        unregister_rule(lax.sort_p)
    with pytest.raises(UnsupportedPrimitiveError):
        dualflow.propagate(jnp.sort)(x)


def test_registered_rule_sees_the_mode_and_overrides_fusion():
    seen = []

    def sin_rule(ctx, x, **params):  # params: the equation's (accuracy=...)
        seen.append(ctx.mode)
        return Gaussian(jnp.sin(x.mean), x.var)

    register_rule("sin", sin_rule)
    try:
        x = Gaussian(jnp.asarray([0.5]), jnp.asarray([0.1]))
        out = dualflow.propagate(jnp.sin, mode="matched")(x)
        _close(out.var, [0.1])
        assert seen == ["matched"]
    finally:
        unregister_rule("sin")
    out = dualflow.propagate(jnp.sin, mode="matched")(x)  # built-in again
    _close(out.mean, jnp.sin(0.5) * jnp.exp(-0.05), rtol=1e-6)


# --------------------------------------------------------------------------
# dependence rules: regressions from the second reading
# --------------------------------------------------------------------------
def test_pooled_branch_meeting_another_branch_keeps_its_variance(x64):
    """A global-average-pool branch added to another branch of the same input is
    not a normaliser: the sum is of independent branches (variances add)."""
    k = jax.random.split(jax.random.key(0), 2)
    w1 = jax.random.normal(k[0], (4, 6), jnp.float64)
    w2 = 0.3 * jax.random.normal(k[1], (4, 3), jnp.float64)
    x = Gaussian(jnp.ones((2, 4)), jnp.full((2, 4), 0.05))

    def pooled(x):
        return jnp.mean(jax.nn.relu(x @ w1), -1, keepdims=True)

    out = dualflow.propagate(lambda x: pooled(x) + x @ w2)(x)
    pv = dualflow.propagate(pooled)(x).var
    sv = dualflow.propagate(lambda x: x @ w2)(x).var
    assert np.all(pv > 0)
    _close(out.var, pv + sv, rtol=1e-12)


def test_layernorm_statistics_are_held_but_a_sum_meeting_a_slice_is_not(x64):
    x = Gaussian(jnp.asarray([0.5, -0.3, 1.0, 0.2]), jnp.full(4, 0.01))

    def layernorm(x):
        mu = x.mean()
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean() + 1e-6)

    out = dualflow.propagate(layernorm)(x)
    mu = x.mean.mean()
    s = jnp.sqrt(((x.mean - mu) ** 2).mean() + 1e-6)
    _close(out.mean, (x.mean - mu) / s, rtol=1e-12)
    _close(out.var, x.var / s**2, rtol=1e-12)  # affine with held statistics
    f = dualflow.propagate(lambda x: jnp.sum(jnp.tanh(x)) + jnp.sin(x[0]))
    total = f(x).var
    parts = dualflow.propagate(lambda x: jnp.sum(jnp.tanh(x)))(x).var
    parts = parts + dualflow.propagate(lambda x: jnp.sin(x[0]))(x).var
    _close(total, parts, rtol=1e-12)


def test_functions_of_statistics_stay_finite_in_matched_mode(x64):
    x = _g(jax.random.key(2), (2, 5), var=0.2).astype(jnp.float64)
    for fn in (lambda v: jnp.std(v, -1), lambda v: jnp.linalg.norm(v, axis=-1)):
        out = dualflow.propagate(fn, mode="matched")(x)
        assert np.all(np.isfinite(out.mean)) and np.all(np.isfinite(out.var))
        assert np.all(out.var > 0)


def test_unhashable_static_arguments_are_traced_every_call():
    calls = []

    class Config:  # unhashable: __eq__ without __hash__
        def __init__(self, scale):
            self.scale = scale

        def __eq__(self, other):
            return self.scale == other.scale

    def fn(w, cfg):
        calls.append(cfg.scale)
        return w * cfg.scale

    f = dualflow.propagate(fn)
    w = _g(jax.random.key(0), (3,))
    _close(f(w, Config(2.0)).mean, 2.0 * w.mean)
    _close(f(w, Config(3.0)).mean, 3.0 * w.mean)
    assert calls == [2.0, 3.0]
