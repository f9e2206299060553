"""Moment rules of non-element-wise primitives for :func:`dualflow.propagate`.

Each rule receives the interpreter, the equation and its operands (plain
arrays, or random values it materialises into :class:`~dualflow.Gaussian`
beliefs) and returns the outputs.  The independence assumption of each rule
is stated in its docstring; every rule on two random operands uses the same
assumption as the corresponding :mod:`dualflow.moments` op.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from dualflow.gaussian import Gaussian
from dualflow.moments import combine, linear
from dualflow.moments import pooling as _pool
from dualflow.propagation import elementwise as ew
from dualflow.propagation.interpreter import (
    GaussianDependentControlFlowError,
    UnsupportedPrimitiveError,
    builtin,
)
from dualflow.propagation.values import Lazy, is_random, lazy_of

Array = jax.Array

__all__ = ["independent_elementwise"]


def _bind(prim, params: dict, *args):
    bind_params = prim.get_bind_params(params)
    return prim.bind(*args, **bind_params)


# --------------------------------------------------------------------------
# element-wise ops on values of different Gaussians
# --------------------------------------------------------------------------
def independent_elementwise(interp, eqn, vals: list):
    """``add``/``sub``/``mul``/``div``/``select_n`` of *independent* beliefs.

    Operands derived from different Gaussian values are treated as
    independent (residual sums, gates): ``add``/``sub`` add variances (as
    :func:`dualflow.moments.add`); ``mul`` is the exact product of independent
    factors with the bilinear BP rule (:func:`dualflow.moments.multiply`);
    ``x / y`` is ``x * (1 / y)`` with ``1 / y`` matched as an element-wise
    function of ``y``; ``select_n`` with a deterministic predicate picks
    means and variances.
    """
    name = eqn.primitive.name
    aval = eqn.outvars[0].aval
    rand = [x for x in vals if is_random(x)]
    if name in ("add", "sub"):
        a, b = (_as_gaussian(interp, x) for x in vals)
        sign = 1.0 if name == "add" else -1.0
        mean = a.mean + sign * b.mean
        var = a.var + b.var
        return interp.new(_cast(Gaussian(mean, var), aval), rand)
    if name == "mul":
        a, b = (_as_gaussian(interp, x) for x in vals)
        out = combine.multiply(a, b, backward=interp.backward)
        return interp.new(_cast(out, aval), rand)
    if name == "div":
        num, den = vals
        den = den if isinstance(den, Lazy) else lazy_of(den)
        one = jnp.ones((), den.dtype)
        recip = ew.fuse(lax.div_p, {}, [one, den], den.shape, den.dtype)
        a = _as_gaussian(interp, num)
        b = interp.gaussian(recip)
        out = combine.multiply(a, b, backward=interp.backward)
        return interp.new(_cast(out, aval), rand)
    if name == "select_n":
        pred, *cases = vals
        if is_random(pred):
            raise GaussianDependentControlFlowError(
                f"dualflow.propagate: the predicate of select_n at {interp.where}"
                " depends on a Gaussian value while its cases come from different"
                " Gaussian values; only a select of one value's element-wise"
                " function (e.g. leaky_relu) or a deterministic predicate is"
                " supported."
            )
        gs = [_as_gaussian(interp, c) for c in cases]
        mean = lax.select_n(pred, *[g.mean for g in gs])
        var = lax.select_n(pred, *[g.var for g in gs])
        return interp.new(_cast(Gaussian(mean, var), aval), rand)
    raise UnsupportedPrimitiveError(
        f"dualflow.propagate: '{name}' at {interp.where} combines values of"
        " different Gaussian beliefs; only add, sub, mul, div and select_n have an"
        " independence rule (max/min/pow of two random values do not). Register"
        f" a rule with dualflow.register_rule('{name}', rule) or make one operand"
        " deterministic."
    )


def _as_gaussian(interp, x) -> Gaussian:
    if is_random(x):
        return interp.gaussian(x)
    x = jnp.asarray(x)
    return Gaussian(x, jnp.zeros_like(x))


def _cast(g: Gaussian, aval) -> Gaussian:
    shape = tuple(aval.shape)
    mean, var = g.mean, g.var
    if mean.shape != shape:
        mean, var = jnp.broadcast_to(mean, shape), jnp.broadcast_to(var, shape)
    return Gaussian(mean.astype(aval.dtype), var.astype(aval.dtype))


# --------------------------------------------------------------------------
# structural and linear maps: apply the primitive to means and to variances
# --------------------------------------------------------------------------
# primitive -> operand positions that carry data (the others are indices or
# shapes and must be deterministic).  The same map is applied to the means
# and to the variances; deterministic data operands get variance 0 there.
_DATA_ARGS: dict[str, tuple[int, ...] | str] = {
    "broadcast_in_dim": (0,),
    "reshape": (0,),
    "transpose": (0,),
    "squeeze": (0,),
    "expand_dims": (0,),
    "rev": (0,),
    "slice": (0,),
    "dynamic_slice": (0,),
    "dynamic_update_slice": (0, 1),
    "gather": (0,),
    "scatter-add": (0, 2),
    "scatter_add": (0, 2),
    "scatter": (0, 2),
    "concatenate": "all",
    "pad": (0, 1),
    "split": (0,),
    "reduce_sum": (0,),
    "cumsum": (0,),
    "reduce_window_sum": (0,),
    "copy": (0,),
    "copy_p": (0,),
    "optimization_barrier": "all",
    "sharding_constraint": (0,),
    "mesh_cast": (0,),
    "reshard": (0,),
    "device_put": "all",
}
# Sums whose variance is the sum of variances (independent summands); the
# others move or copy entries (exact).
_SUMS = frozenset({"reduce_sum", "cumsum", "reduce_window_sum", "scatter-add",
                   "scatter_add"})
# Reductions whose output is a statistic of its input (normaliser rule).
_STATS = frozenset({"reduce_sum"})
# Maps after which a value is still "the same value" for the normaliser rule
# (every entry kept, none mixed): not slices or gathers, which pick entries.
_SAME = frozenset(
    {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "copy",
     "copy_p", "rev"}
)


def _structural(interp, eqn, invals):
    """Copies, moves, sums: ``mean = op(m)``, ``var = op(P)``.

    Exact for copies and moves (entries stay independent; duplicated entries,
    e.g. a broadcast or a gather with repeated indices, are perfectly
    correlated copies whose correlation is not represented).  For sums
    (``reduce_sum``, ``cumsum``, ``reduce_window_sum``, ``scatter-add``) the
    summands are treated as independent, as in :func:`dualflow.moments.avg_pool`.
    """
    name = eqn.primitive.name
    spec = _DATA_ARGS[name]
    data = range(len(invals)) if spec == "all" else spec
    means, vars_ = list(invals), list(invals)
    rand = []
    for i, x in enumerate(invals):
        if i in data:
            if is_random(x):
                node = interp.node(x)
                means[i], vars_[i] = node.g.mean, node.g.var
                rand.append(node)
            else:
                means[i] = x
                vars_[i] = jnp.zeros(jnp.shape(x), jnp.result_type(x))
        elif is_random(x):
            raise GaussianDependentControlFlowError(
                f"dualflow.propagate: operand {i} of '{name}' at {interp.where} is"
                " an index or shape but depends on a Gaussian value; indices must be"
                " deterministic."
            )
    params = dict(eqn.params)
    mean = _bind(eqn.primitive, params, *means)
    var = _bind(eqn.primitive, params, *vars_)
    stat = name in _STATS
    if eqn.primitive.multiple_results:
        return [
            interp.new(Gaussian(m, v), rand, stat=stat)
            for m, v in zip(mean, var, strict=True)
        ]
    out = interp.new(Gaussian(mean, var), rand, stat=stat, same=name in _SAME)
    if len(rand) == 1 and name in ("reduce_sum", "broadcast_in_dim"):
        src = interp.node(rand[0])
        out.sum_of = src.id if name == "reduce_sum" else src.sum_of
    return out


def ratio_to_own_sum(x: Gaussian, total: Gaussian) -> Gaussian:
    """``y = x / S`` with ``S = sum_j x_j`` over some axes (softmax's normaliser).

    Linearised in all of ``x`` (entries independent): with ``p = m / S_m``,
    ``dy_i/dx_j = (delta_ij - p_i) / S_m``, so
    ``var_i = (P_i (1 - 2 p_i) + p_i^2 sum_j P_j) / S_m^2``.  ``total`` is the
    sum's belief, broadcastable to ``x`` (``mean = S_m``, ``var = sum P``).
    For ``x = exp(a - c)`` this is the linearised softmax of
    :func:`softmax_moments`.
    """
    s = total.mean
    p = x.mean / s
    var = (x.var * (1.0 - 2.0 * p) + p * p * total.var) / (s * s)
    return Gaussian(p, jnp.maximum(var, 0.0))


for _name in _DATA_ARGS:
    builtin(_name)(_structural)


# --------------------------------------------------------------------------
# weight layers: dot_general and conv_general_dilated (bilinear rule)
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _PrimOp:
    """Hashable ``prim.bind(x, w, **params)`` (a static argument of the BP rule)."""

    prim: Any
    params: tuple

    def __call__(self, x, w):
        return self.prim.bind(x, w, **dict(self.params))


@builtin("dot_general", "conv_general_dilated")
def _bilinear(interp, eqn, invals):
    """``dot_general`` / ``conv_general_dilated`` with Gaussian operands.

    Each output is ``sum_i x_i w_i``; with independent operands
    ``mean = op(m_x, m_w)`` and
    ``var = op(m_x^2 + P_x, P_w) + op(P_x, m_w^2)`` (exact for the stated
    independence; output covariances dropped) -- the rule of
    :func:`dualflow.moments.dense` / :func:`~dualflow.moments.conv` for every
    configuration lax accepts (batch/contracting dims, strides, padding,
    dilations, feature/batch groups).  One random operand: the map is linear
    in it (``var = op(P_x, w^2)`` or ``op(x^2, P_w)``), BP == autodiff.
    Both random: the bilinear BP ``custom_vjp`` of
    :func:`dualflow.moments.bilinear_moments`.  Operands derived from one
    input (attention's ``q k^T``) are treated as independent.
    """
    x, w = invals
    params = dict(eqn.params)
    aval = eqn.outvars[0].aval
    op = _PrimOp(eqn.primitive, tuple(sorted(params.items())))
    rand = [v for v in invals if is_random(v)]
    if is_random(x) and is_random(w):
        gx, gw = interp.gaussian(x), interp.gaussian(w)
        out = linear.bilinear_moments(op, gx, gw.mean, gw.var, backward=interp.backward)
    elif is_random(x):
        gx = interp.gaussian(x)
        w = jnp.asarray(w)
        out = Gaussian(op(gx.mean, w), op(gx.var, w * w))
    else:
        gw = interp.gaussian(w)
        x = jnp.asarray(x)
        out = Gaussian(op(x, gw.mean), op(x * x, gw.var))
    return interp.new(_cast(out, aval), rand, keep_stat=False)


# --------------------------------------------------------------------------
# max / min reductions and max pooling: smooth max (log-sum-exp)
# --------------------------------------------------------------------------
def _smooth_max_last(interp, mp: Array, vp: Array) -> Gaussian:
    if interp.backward == "autodiff":
        mean, var, _, _ = _pool._window_max(mp, vp, None)
    else:
        mean, var = _pool._window_max_bp(None, mp, vp)
    return Gaussian(mean, var)


@builtin("reduce_max", "reduce_min")
def _reduce_max(interp, eqn, invals):
    """``max`` over axes: ``mean = max(m)``; variance of the smooth maximum
    ``tau logsumexp(x / tau)`` linearised at the means, ``sum w_i^2 P_i`` with
    ``w = softmax(m / tau)``, ``tau`` the RMS std (the max-pooling rule of
    :func:`dualflow.moments.max_pool`; inputs independent).  ``min`` is
    ``-max(-x)``.  The output is a statistic of the input (normaliser rule).
    """
    (x,) = invals
    g = interp.gaussian(x)
    axes = tuple(eqn.params["axes"])
    sign = -1.0 if eqn.primitive.name == "reduce_min" else 1.0
    keep = [i for i in range(g.mean.ndim) if i not in axes]
    perm = (*keep, *axes)
    shape = tuple(g.mean.shape[i] for i in keep) + (-1,)
    mp = jnp.transpose(sign * g.mean, perm).reshape(shape)
    vp = jnp.transpose(g.var, perm).reshape(shape)
    out = _smooth_max_last(interp, mp, vp)
    return interp.new(
        Gaussian(sign * out.mean, out.var), [interp.node(x)], stat=True
    )


@builtin("reduce_window_max", "reduce_window_min")
def _reduce_window_max(interp, eqn, invals):
    """Max pooling (``flax`` ``max_pool``, ``lax.reduce_window`` with ``max``):
    the taps of each window are stacked and reduced with the smooth-max rule
    of :func:`dualflow.moments.max_pool` (inputs in a window independent)."""
    (x,) = invals
    p = eqn.params
    if any(d != 1 for d in p["base_dilation"]) or any(
        d != 1 for d in p["window_dilation"]
    ):
        raise UnsupportedPrimitiveError(
            f"dualflow.propagate: {eqn.primitive.name} with base or window dilation"
            f" at {interp.where} has no moment rule; use dilation 1."
        )
    g = interp.gaussian(x)
    sign = -1.0 if eqn.primitive.name == "reduce_window_min" else 1.0
    dims, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    pads = tuple(tuple(q) for q in p["padding"])
    mp = _taps(sign * g.mean, dims, strides, pads, -jnp.inf)
    vp = _taps(g.var, dims, strides, pads, 0.0)
    out = _smooth_max_last(interp, mp, vp)
    return interp.new(Gaussian(sign * out.mean, out.var), [x])


def _taps(a: Array, dims, strides, pads, pad_value) -> Array:
    """``[*out, k]``: the ``k = prod(dims)`` window taps on a new last axis."""
    a = jnp.pad(a, pads, constant_values=pad_value)
    out = [(a.shape[i] - dims[i]) // strides[i] + 1 for i in range(a.ndim)]
    taps = []
    for offs in itertools.product(*[range(d) for d in dims]):
        limit = [
            o + (n - 1) * s + 1 for o, n, s in zip(offs, out, strides, strict=True)
        ]
        taps.append(lax.slice(a, offs, limit, strides))
    return jnp.stack(taps, axis=-1)


@builtin("argmax", "argmin")
def _argmax(interp, eqn, invals):
    raise GaussianDependentControlFlowError(
        f"dualflow.propagate: {eqn.primitive.name} of a Gaussian value at"
        f" {interp.where} is an index that depends on a random value; take it of"
        " the output means outside the propagated function (e.g. out.mean)."
    )


# --------------------------------------------------------------------------
# softmax / log-softmax (jax.nn), linearised
# --------------------------------------------------------------------------
def softmax_moments(g: Gaussian, axes: tuple[int, ...], log: bool) -> Gaussian:
    """Linearised (log-)softmax over ``axes`` of independent Gaussian logits.

    With ``p = softmax(m)`` the Jacobian of ``log softmax`` is
    ``delta_ij - p_j``, so the first-order variance is
    ``var_i = P_i (1 - 2 p_i) + sum_j p_j^2 P_j``; for ``softmax`` it is
    ``p_i^2`` times that.  Means are those of the mean logits (the
    linearisation of Algorithm 1 applied to the vector function);
    correlations between outputs are dropped.
    """
    m, v = g.mean, g.var
    logp = jax.nn.log_softmax(m, axis=axes)
    p = jnp.exp(logp)
    s = jnp.sum(p * p * v, axis=axes, keepdims=True)
    lvar = jnp.maximum(v * (1.0 - 2.0 * p) + s, 0.0)
    if log:
        return Gaussian(logp, lvar)
    return Gaussian(p, p * p * lvar)


def softmax_axes(closed) -> tuple[int, ...] | None:
    """Reduction axes of a ``jax.nn.softmax``/``log_softmax`` body."""
    jaxpr = getattr(closed, "jaxpr", closed)
    for e in jaxpr.eqns:
        if e.primitive.name in ("reduce_max", "reduce_sum"):
            return tuple(e.params["axes"])
    return None
