"""Matmul precision of the moment products: JAX's default unless set.

The moment products used to be pinned to ``lax.Precision.HIGHEST``, which
forbids the TF32 / bf16 tensor-core paths on GPUs and TPUs.  Now ``dense`` and
``conv`` take ``precision=`` (``None``: follow ``jax.default_matmul_precision``)
and the trainer's ``config.precision`` sets that context for a whole run.  The
jaxprs show which precision every forward and BP-backward product carries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from dualflow import Gaussian, moments
from dualflow.errors import ConfigError


def _products(fn, *args) -> list:
    """The ``precision`` parameter of every dot/conv in ``fn``'s jaxpr (nested
    custom-VJP and pjit bodies included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                p = eqn.params["precision"]  # None, or one per operand
                found.append(p[0] if isinstance(p, tuple) and len(set(p)) == 1 else p)
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else [p]:
                    inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr or Jaxpr
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _bwd_products(layer, x, w_mean, w_var) -> list:
    """Precisions of the products inside the BP rule's backward pass."""

    def loss(m, P, mu, s2):
        out = layer(Gaussian(m, P), mu, s2)
        return jnp.sum(out.mean) + jnp.sum(out.var)

    args = (x.mean, x.var, w_mean, w_var)
    return _products(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)


KEY = jax.random.split(jax.random.key(0), 4)
X = Gaussian(jax.random.normal(KEY[0], (4, 6)), jax.random.uniform(KEY[1], (4, 6)))
W = jax.random.normal(KEY[2], (6, 3))
V = jax.random.uniform(KEY[3], (6, 3))
XC = Gaussian(jnp.ones((2, 5, 5, 3)), jnp.full((2, 5, 5, 3), 0.1))
WC, VC = jnp.ones((3, 3, 3, 4)), jnp.full((3, 3, 3, 4), 0.01)


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, None),
        ("highest", lax.Precision.HIGHEST),
        ("float32", lax.Precision.HIGHEST),
        ("tensorfloat32", lax.Precision.HIGH),
        ("bfloat16", lax.Precision.DEFAULT),
        ("DEFAULT", lax.Precision.DEFAULT),
        (lax.Precision.HIGH, lax.Precision.HIGH),
    ],
)
def test_canonical_precision(given, expected):
    assert moments.canonical_precision(given) is expected


def test_unknown_precision_names_the_layer_and_the_choices():
    with pytest.raises(ValueError, match=r"dense: precision 'fast' is not None"):
        moments.dense(X, W, V, precision="fast")
    with pytest.raises(ValueError, match=r"conv: precision 3"):
        moments.conv(XC, WC, VC, precision=3)


@pytest.mark.parametrize("backward", ["bp", "autodiff", "bp_fixed_noise"])
@pytest.mark.parametrize("precision", [None, "highest", "tensorfloat32"])
def test_dense_forward_and_backward_products_carry_the_precision(backward, precision):
    want = moments.canonical_precision(precision)

    def layer(x, m, v):
        return moments.dense(x, m, v, backward=backward, precision=precision)

    fwd = _products(lambda m, v: layer(X, m, v), W, V)
    bwd = _bwd_products(layer, X, W, V)
    assert len(fwd) == 3  # mean, and the two variance products
    assert len(bwd) > len(fwd)
    assert set(fwd) == set(bwd) == {want}


@pytest.mark.parametrize("precision", [None, "highest"])
def test_conv_products_carry_the_precision(precision):
    want = moments.canonical_precision(precision)

    def layer(x, m, v):
        return moments.conv(x, m, v, precision=precision)

    fwd = _products(lambda m, v: layer(XC, m, v), WC, VC)
    bwd = _bwd_products(layer, XC, WC, VC)
    assert len(fwd) == 2 and set(fwd) == set(bwd) == {want}  # mean, fused variance


def test_default_follows_jax_default_matmul_precision():
    """``precision=None`` leaves the choice to JAX's context: the product is
    lowered with the context's precision (visible in the StableHLO)."""
    f = jax.jit(lambda m, v: moments.dense(X, m, v).var)
    with jax.default_matmul_precision("highest"):
        hi = f.lower(W, V).as_text()
    default = f.lower(W, V).as_text()
    assert "HIGHEST" in hi
    assert "HIGHEST" not in default


def test_trainer_sets_the_precision_context_for_the_run(tmp_path):
    from test_train import tiny_config

    from dualflow.train import train_and_evaluate

    seen = []

    def on_step(step):
        seen.append(jax.config.jax_default_matmul_precision)

    cfg = tiny_config(precision="highest", train__num_steps=2, train__eval_every=2)
    train_and_evaluate(cfg, tmp_path / "run", on_step=on_step)
    assert seen == ["highest", "highest"]
    assert jax.config.jax_default_matmul_precision is None  # restored afterwards


def test_trainer_refuses_an_unknown_precision(tmp_path):
    from test_train import tiny_config

    from dualflow.train import train_and_evaluate

    with pytest.raises(ConfigError, match=r"config.precision='fastest' is not one of"):
        train_and_evaluate(tiny_config(precision="fastest"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_trainer_bf16_compute_sets_the_compute_dtype_not_jax_precision(
    tmp_path, monkeypatch
):
    """``config.precision="bf16_compute"`` cannot be expressed as a
    ``jax.default_matmul_precision``: the trainer enters the moment layers'
    compute-dtype context instead, for the run only, and the steps it traces
    use the bfloat16 products."""
    from test_train import tiny_config

    from dualflow.moments import linear
    from dualflow.train import train_and_evaluate

    traced = []
    reduced = linear._Matmul._reduced

    def spy(self, x, w):
        traced.append((str(x.dtype), str(w.dtype)))
        return reduced(self, x, w)

    monkeypatch.setattr(linear._Matmul, "_reduced", spy)
    seen = []

    def on_step(step):
        seen.append((moments.compute_dtype(), jax.config.jax_default_matmul_precision))

    cfg = tiny_config(precision="bf16_compute", train__num_steps=2, train__eval_every=2)
    train_and_evaluate(cfg, tmp_path / "run", on_step=on_step)
    assert seen == [("bfloat16", None)] * 2
    assert moments.compute_dtype() is None  # restored afterwards
    assert traced and set(traced) == {("float32", "float32")}  # cast inside


@pytest.mark.parametrize(
    "name, compute, jax_precision",
    [
        ("", None, None),
        ("highest", None, "highest"),
        ("bf16_compute", "bfloat16", None),
    ],
)
def test_precision_context(name, compute, jax_precision):
    with moments.precision_context(name):
        assert moments.compute_dtype() == compute
        assert jax.config.jax_default_matmul_precision == jax_precision
    assert moments.compute_dtype() is None
    assert jax.config.jax_default_matmul_precision is None


def test_precision_context_refuses_unknown_names():
    with pytest.raises(
        ValueError, match=r"precision 'fp8' is not one of .*bf16_compute"
    ):
        moments.precision_context("fp8")
