"""``dualflow.propagate`` of a model's deterministic forward == its hand-written bp.

For every family in :mod:`dualflow.models` (the tiny widths of
``dualflow.benchmarks.models.TINY``): the network of the weight means
(``Method("deterministic")``), transformed with its weights made Gaussian,
must give the same output means and variances as dualflow's own moment
forward (``Method("bp")``) of the same Bayesian model, and the same gradients
w.r.t. the weight means and log-variances, with the BP and the autodiff
backward -- in both activation modes, to float64 precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dualflow
from dualflow.benchmarks.models import TINY, TINY_INPUT_SHAPE, TINY_RESIDUAL
from dualflow.benchmarks.propagate import gaussian_tree
from dualflow.gaussian import Gaussian
from dualflow.nn.context import Context, Method

RTOL = 1e-10


def _build(family):
    kw = {"param_dtype": jnp.float64, "init_var": 0.05}
    if family in TINY_RESIDUAL:
        kw["residual_init"] = 0.5  # gains non-zero: the residual branch counts
    if family == "efficientnet":
        kw["dropout"] = 0.0  # dropout is an identity in the mean network
    return TINY[family](False, nnx.Rngs(0), **kw)


def _pair(model, mode, backward):
    """(hand-written bp loss fn, transformed loss fn) of the pure parameters."""
    graphdef, state = nnx.split(model)

    def merged(pure):
        st = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(st, pure)
        return nnx.merge(graphdef, st)

    def deterministic(pure, x):
        return merged(pure)(x, Context(Method("deterministic")))

    prop = dualflow.propagate(deterministic, mode=mode, backward=backward)

    def hand(pure, x):
        return merged(pure)(x, Context(Method("bp", mode=mode, backward=backward)))

    def transformed(pure, x):
        return prop(gaussian_tree(pure), x)

    return hand, transformed, nnx.to_pure_dict(state)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _outputs_and_grads(fn, pure, x, cm, cv):
    """``fn(pure, x)`` and the gradient of ``sum(cm mean) + sum(cv var)`` (one jit)."""

    @jax.jit
    def run(pure):
        out, vjp = jax.vjp(lambda p: fn(p, x), pure)
        (g,) = vjp(Gaussian(cm, cv))
        return out, g

    return run(pure)


def _check_family(family, mode, backward):
    model = _build(family)
    x = jax.random.normal(jax.random.key(1), (2, *TINY_INPUT_SHAPE), jnp.float64)
    hand, transformed, pure = _pair(model, mode, backward)
    shape = jax.eval_shape(hand, pure, x).shape
    k1, k2 = jax.random.split(jax.random.key(2))
    cm = jax.random.normal(k1, shape, jnp.float64)
    cv = jax.random.normal(k2, shape, jnp.float64)
    ref, g_ref = _outputs_and_grads(hand, pure, x, cm, cv)
    out, g_out = _outputs_and_grads(transformed, pure, x, cm, cv)
    assert isinstance(out, Gaussian) and out.shape == ref.shape
    assert np.all(ref.var > 0)
    assert _rel(out.mean, ref.mean) <= RTOL
    assert _rel(out.var, ref.var) <= RTOL
    flat_ref = jax.tree_util.tree_leaves_with_path(g_ref)
    flat_out = jax.tree.leaves(g_out)
    assert len(flat_ref) == len(flat_out) > 0
    for (path, a), b in zip(flat_ref, flat_out, strict=True):
        err = _rel(b, a) if np.any(a) else float(np.max(np.abs(b)))
        assert err <= RTOL, (backward, jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("mode", ["linearized", "matched"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_transformed_model_equals_hand_written_bp(family, mode, x64):
    """Outputs and BP-backward gradients of every family, both modes."""
    _check_family(family, mode, "bp")


_SLOW_MATCHED = pytest.mark.slow  # compile-heavy: run with --runslow


@pytest.mark.parametrize(
    "mode",
    ["linearized", pytest.param("matched", marks=_SLOW_MATCHED)],
)
@pytest.mark.parametrize("family", sorted(TINY))
def test_transformed_model_autodiff_backward_equals_hand_written(family, mode, x64):
    """The same with plain reverse mode through both forwards."""
    _check_family(family, mode, "autodiff")


def test_linearized_and_matched_differ_and_both_have_variance(x64):
    """The exactness above is not vacuous: the modes give different answers."""
    model = _build("mlp")
    x = jax.random.normal(jax.random.key(1), (2, *TINY_INPUT_SHAPE), jnp.float64)
    outs = []
    for mode in ("linearized", "matched"):
        _, transformed, pure = _pair(model, mode, "bp")
        outs.append(transformed(pure, x))
    assert np.all(outs[0].var > 0) and np.all(outs[1].var > 0)
    assert _rel(outs[0].mean, outs[1].mean) > 1e-6
