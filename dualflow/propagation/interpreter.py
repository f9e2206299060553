"""`propagate`: trace a JAX function to a jaxpr and evaluate it on Gaussian beliefs.

``dualflow.propagate(fn)`` returns a function with ``fn``'s signature in which
any argument leaf may be a :class:`~dualflow.Gaussian`.  The jaxpr of ``fn``
(traced with the means in place of the Gaussians; cached per argument
structure, shapes and dtypes) is evaluated equation by equation:

* equations whose inputs do not depend on a Gaussian are bound exactly as
  ``fn`` binds them (no zero-variance arrays are carried);
* element-wise equations on values of one Gaussian are fused into one scalar
  function and moment-matched as a whole (:mod:`.elementwise`);
* every other equation with a Gaussian input goes through its moment rule
  (:mod:`.rules`, :mod:`.control`, or one added with :func:`register_rule`).

Everything is built from :mod:`dualflow.moments`, whose ``jax.custom_vjp``
rules give the belief-propagation backward pass (``backward="bp"``);
``backward="autodiff"`` differentiates the same forward in plain reverse mode.
The result composes with ``jit``, ``grad``, ``vmap``, ``lax.scan`` and sharding
because it is an ordinary JAX function of the means and variances.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualflow.gaussian import Gaussian
from dualflow.moments import BACKWARDS, MODES
from dualflow.moments import activations as acts
from dualflow.propagation import elementwise as ew
from dualflow.propagation.values import (
    Lazy,
    Node,
    NonFloatRandomError,
    is_float_dtype,
    is_random,
    lazy_of,
)

Array = jax.Array

__all__ = [
    "GaussianDependentControlFlowError",
    "RuleContext",
    "UnsupportedPrimitiveError",
    "propagate",
    "register_rule",
    "registered_rules",
]


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive without a moment rule was applied to a Gaussian value."""


class GaussianDependentControlFlowError(ValueError):
    """A branch, loop condition or index depends on a Gaussian value."""


@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a registered rule is told besides its operands and parameters.

    Attributes:
      mode: ``"linearized"`` or ``"matched"`` (activation moments).
      backward: ``"bp"``, ``"autodiff"`` or ``"bp_fixed_noise"``.
      where: the user's source line of the equation (for messages).
    """

    mode: str
    backward: str
    where: str = ""


# --------------------------------------------------------------------------
# the interpreter's state for one call
# --------------------------------------------------------------------------
class Interpreter:
    """Evaluates jaxprs on plain / `Node` / `Lazy` values (one per call)."""

    def __init__(self, mode: str, backward: str):
        self.mode = mode
        self.backward = backward
        self.where = ""
        # plain arrays known to be a broadcast/cast of a concrete scalar
        # (jnp.where's constants): id -> (array kept alive, scalar value)
        self.scalars: dict[int, tuple] = {}

    # -- conversions ---------------------------------------------------------
    def node(self, x) -> Node:
        """Materialise a random value (``Lazy`` -> ``Node``)."""
        if isinstance(x, Node):
            return x
        try:
            return ew.materialize(x, self.mode, self.backward)
        except NonFloatRandomError as e:
            raise GaussianDependentControlFlowError(
                f"dualflow.propagate: {e} and is used as a {np.dtype(x.dtype).name}"
                f" value (a predicate, index or integer) at {self.where}. Control"
                " flow, indices and integer values must not depend on a Gaussian:"
                " compute them from deterministic inputs."
            ) from None

    def gaussian(self, x) -> Gaussian:
        return self.node(x).g

    def new(
        self,
        g: Gaussian,
        parents: Sequence = (),
        *,
        stat: bool = False,
        keep_stat: bool = True,
        same: bool = False,
    ) -> Node:
        """A node derived from ``parents`` (random interpreter values).

        ``stat=True``: the node is a reduction statistic of its parents.
        ``keep_stat``: whether statistics stay statistics through this map
        (structural and linear maps: yes; weight layers: no).
        ``same=True``: the node is the same value as its one parent (a reshape
        or broadcast), for the normaliser rule.
        """
        ps = [p.src if isinstance(p, Lazy) else p for p in parents if is_random(p)]
        stat_of: frozenset = frozenset()
        if keep_stat:
            stat_of = stat_of.union(*(p.stat_of for p in ps))
        if stat:
            stat_of = stat_of.union(*(p.same_value for p in ps))
        same_of = ps[0] if same and len(ps) == 1 else None
        return Node.new(g, ps, stat_of, same_of=same_of)

    def rule_context(self) -> RuleContext:
        return RuleContext(self.mode, self.backward, self.where)

    # -- evaluation ----------------------------------------------------------
    def eval_jaxpr(self, jaxpr, consts: Sequence, args: Sequence) -> list:
        env: dict = {}
        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            invals = [_read(env, v) for v in eqn.invars]
            if any(is_random(x) for x in invals):
                outs = self.apply_rule(eqn, invals)
            elif _foldable(eqn, invals):
                # small constants (a literal broadcast or cast by jnp.where /
                # jnp.clip) stay concrete under an outer jit, so the rules that
                # need concrete coefficients (piecewise-linear, identification)
                # see them
                with jax.ensure_compile_time_eval():
                    outs = _bind_all(eqn, invals)
                self._note_scalar(eqn, invals, outs)
            else:
                outs = _bind_all(eqn, invals)
                self._note_scalar(eqn, invals, outs)
            for var, val in zip(eqn.outvars, outs, strict=True):
                if not _is_dropvar(var):
                    env[var] = val
        return [_read(env, v) for v in jaxpr.outvars]

    def eval_closed(self, closed, args: Sequence) -> list:
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = getattr(closed, "consts", ())
        return self.eval_jaxpr(jaxpr, consts, args)

    def apply_rule(self, eqn, invals: list) -> list:
        name = eqn.primitive.name
        outer = self.where
        # equations inside library calls (jnp.sort's jit) carry no user frame:
        # keep the line of the enclosing call
        self.where = _source_line(eqn) or outer or "<unknown source>"
        try:
            if name in ew.ELEMENTWISE:
                out = [self.elementwise(eqn, invals)]
            elif name in _USER_RULES:
                out = self._user_rule(name, eqn, invals)
            elif name in _RULES:
                out = _RULES[name](self, eqn, invals)
                if not eqn.primitive.multiple_results and not isinstance(out, list):
                    out = [out]
            else:
                raise UnsupportedPrimitiveError(
                    f"dualflow.propagate: no moment rule for primitive '{name}' applied"
                    f" to a Gaussian value (at {self.where}). Add one with"
                    f" dualflow.register_rule('{name}', rule), where"
                    " rule(ctx, *args, **params) maps Gaussian/array operands to the"
                    " outputs (docs/propagate.md, 'Adding a rule'), or keep this"
                    " computation on deterministic values."
                )
        finally:
            self.where = outer
        return out

    def _user_rule(self, name: str, eqn, invals: list) -> list:
        args = [self.gaussian(x) if is_random(x) else x for x in invals]
        out = _USER_RULES[name](self.rule_context(), *args, **eqn.params)
        outs = list(out) if eqn.primitive.multiple_results else [out]
        parents = [x for x in invals if is_random(x)]
        return [
            self.new(o, parents) if isinstance(o, Gaussian) else o for o in outs
        ]

    # -- element-wise equations -------------------------------------------
    def elementwise(self, eqn, invals: list):
        aval = eqn.outvars[0].aval
        ratio = self._ratio_to_own_sum(eqn, invals)
        if ratio is not None:
            return ratio
        vals = [lazy_of(x) if isinstance(x, Node) else x for x in invals]
        rand = [i for i, x in enumerate(vals) if isinstance(x, Lazy)]
        if len({id(vals[i].src) for i in rand}) > 1:
            # A reduction statistic meeting the value it summarises (or an
            # element-wise function / reshape of it) is a normaliser: held at
            # its mean (see docs).
            held = [
                i
                for i in rand
                if vals[i].stat_of
                & frozenset().union(*(vals[k].same_value for k in rand if k != i))
            ]
            for i in held:
                # The statistic (the Lazy's source) is held at its mean and the
                # element-wise program applied to it.  (Taking the matched mean
                # of the program, E[g(stat)], integrated rsqrt over the
                # Gaussian belief of a positive statistic: NaN for RMSNorm.)
                lz = vals[i]
                vals[i] = ew.run_program(lz.prog, lz.src.g.mean, lz.consts)
            rand = [i for i, x in enumerate(vals) if isinstance(x, Lazy)]
        if not rand:
            return _bind(eqn, vals)
        if len({id(vals[i].src) for i in rand}) == 1:
            vals = [v if isinstance(v, Lazy) else self._as_scalar(v) for v in vals]
            return ew.fuse(eqn.primitive, eqn.params, vals, aval.shape, aval.dtype)
        return self._independent(eqn, vals)

    def _note_scalar(self, eqn, invals, outs) -> None:
        """Remember a broadcast/cast of a concrete scalar (kept as the scalar
        when it enters an element-wise program)."""
        if eqn.primitive.name not in ("broadcast_in_dim", "convert_element_type"):
            return
        x = invals[0]
        known = self.scalars.get(id(x))
        if known is not None and known[0] is x:
            value = known[1]
        elif np.ndim(x) == 0 and not isinstance(x, jax.core.Tracer):
            value = x
        else:
            return
        out = outs[0]
        self.scalars[id(out)] = (out, np.asarray(value, out.dtype))

    def _as_scalar(self, x):
        known = self.scalars.get(id(x))
        return x if known is None or known[0] is not x else known[1]

    def _ratio_to_own_sum(self, eqn, invals: list):
        """``x / broadcast(reduce_sum(x))`` (an inlined ``jax.nn.softmax``):
        the linearised ratio rule of :func:`rules.ratio_to_own_sum`, or ``None``."""
        if eqn.primitive.name != "div" or not all(is_random(v) for v in invals):
            return None
        num, den = invals
        if not isinstance(den, Node) or den.sum_of is None:
            return None
        x = num if isinstance(num, Node) else num.cache.get("node")
        if x is None or x.id != den.sum_of:
            return None
        from dualflow.propagation.rules import ratio_to_own_sum

        return self.new(ratio_to_own_sum(x.g, den.g), [x, den])

    def _independent(self, eqn, vals: list):
        """Element-wise op on values of *different* Gaussians (independent)."""
        from dualflow.propagation.rules import independent_elementwise

        return independent_elementwise(self, eqn, vals)


_FOLD_MAX_SIZE = 1024


def _foldable(eqn, invals) -> bool:
    """Whether a deterministic equation can be evaluated at trace time: every
    input concrete, small outputs, no effects, no sub-jaxpr (no compile)."""
    if eqn.effects or any(isinstance(x, jax.core.Tracer) for x in invals):
        return False
    if any(hasattr(v, "jaxpr") or hasattr(v, "eqns") for v in eqn.params.values()):
        return False
    for v in eqn.outvars:
        aval = v.aval
        if not hasattr(aval, "shape") or int(np.prod(aval.shape)) > _FOLD_MAX_SIZE:
            return False
    return True


def _bind_all(eqn, invals) -> list:
    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _read(env, v):
    if type(v).__name__ == "Literal":
        return v.val
    return env[v]


def _is_dropvar(v) -> bool:
    return type(v).__name__ == "DropVar"


def _bind(eqn, vals):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    return eqn.primitive.bind(*vals, **bind_params)


def _source_line(eqn) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - best effort for messages
        return ""


# --------------------------------------------------------------------------
# rule registry
# --------------------------------------------------------------------------
_RULES: dict[str, Callable] = {}
_USER_RULES: dict[str, Callable] = {}
_BUILTIN_ELEMENTWISE = ew.ELEMENTWISE


def builtin(*names: str):
    """Register an internal rule ``rule(interp, eqn, invals) -> out``."""

    def deco(fn):
        for n in names:
            _RULES[n] = fn
        return fn

    return deco


def _prim_name(primitive) -> str:
    if isinstance(primitive, str):
        return primitive
    name = getattr(primitive, "name", None)
    if not isinstance(name, str):
        raise TypeError(
            f"register_rule: expected a jax Primitive or its name, got {primitive!r}."
        )
    return name


def register_rule(primitive, rule: Callable | None = None):
    """Register (or replace) the moment rule of a primitive.

    ``rule(ctx, *args, **params)`` receives a :class:`RuleContext`, the
    operands (:class:`~dualflow.Gaussian` for random ones, arrays otherwise)
    and the equation's parameters, and returns the output (a ``Gaussian`` or
    an array; a sequence for primitives with several results).  A user rule
    takes precedence over the built-in one, including for element-wise
    primitives (it then sees each equation separately, without fusion).

    Use as ``register_rule(lax.cumprod_p, rule)`` or as a decorator
    ``@register_rule("cumprod")``.  Returns ``rule``.
    """
    name = _prim_name(primitive)
    if rule is None:
        return functools.partial(register_rule, name)
    if not callable(rule):
        raise TypeError(f"register_rule: rule for {name!r} must be callable.")
    _USER_RULES[name] = rule
    ew_set = set(ew.ELEMENTWISE)
    if name in ew_set:  # user rules win over fusion
        ew.ELEMENTWISE = frozenset(ew_set - {name})
    return rule


def unregister_rule(primitive) -> None:
    """Remove a rule added with :func:`register_rule` (built-ins stay)."""
    name = _prim_name(primitive)
    _USER_RULES.pop(name, None)
    if name in _BUILTIN_ELEMENTWISE:
        ew.ELEMENTWISE = ew.ELEMENTWISE | {name}


def registered_rules() -> dict[str, str]:
    """Primitive name -> ``"builtin"`` / ``"elementwise"`` / ``"user"``."""
    out = {n: "elementwise" for n in ew.ELEMENTWISE}
    out.update({n: "builtin" for n in _RULES})
    out.update({n: "user" for n in _USER_RULES})
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------
def _is_gaussian(x) -> bool:
    return isinstance(x, Gaussian)


def _is_dynamic(x) -> bool:
    if isinstance(x, bool | np.bool_):
        return False
    return isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex)


def _leaf_spec(x):
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)
    )


class _Uncacheable:
    """Marks a static leaf that cannot be hashed: the call is traced afresh."""


def _static_key(x):
    try:
        hash(x)
        return ("s", x)
    except TypeError:
        return ("s_unhashable", _Uncacheable())


def _check_gaussian(g: Gaussian, path) -> None:
    where = jax.tree_util.keystr(path) or "argument"
    m, v = jnp.shape(g.mean), jnp.shape(g.var)
    if m != v:
        raise ValueError(
            f"dualflow.propagate: Gaussian at {where} has mean shape {m} but var"
            f" shape {v}; give one variance per mean (broadcast the variance)."
        )
    dm, dv = jnp.result_type(g.mean), jnp.result_type(g.var)
    if dm != dv or not is_float_dtype(dm):
        raise ValueError(
            f"dualflow.propagate: Gaussian at {where} has mean dtype {dm} and var"
            f" dtype {dv}; both must be the same floating dtype."
        )


class Propagated:
    """The function returned by :func:`propagate` (see its docstring)."""

    def __init__(self, fn: Callable, mode: str, backward: str, cache_size: int):
        self.fn = fn
        self.mode = mode
        self.backward = backward
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        functools.update_wrapper(self, fn)

    def trace(self, *args, **kwargs):
        """``(closed_jaxpr, out_tree, flat input values)`` for these arguments."""
        leaves_p, treedef = jax.tree_util.tree_flatten_with_path(
            (args, kwargs), is_leaf=_is_gaussian
        )
        leaves = [leaf for _, leaf in leaves_p]
        kinds = []
        specs = []
        for path, leaf in leaves_p:
            if _is_gaussian(leaf):
                _check_gaussian(leaf, path)
                mean = jnp.asarray(leaf.mean)
                kinds.append(("g", mean.shape, mean.dtype))
                specs.append(jax.ShapeDtypeStruct(mean.shape, mean.dtype))
            elif _is_dynamic(leaf):
                spec = _leaf_spec(leaf)
                kinds.append(("a", spec.shape, spec.dtype, spec.weak_type))
                specs.append(spec)
            else:
                kinds.append(_static_key(leaf))
        key = (treedef, tuple(kinds))
        cacheable = not any(k[0] == "s_unhashable" for k in kinds)
        hit = self._cache.get(key) if cacheable else None
        if hit is None:
            hit = self._make_jaxpr(treedef, leaves, kinds, specs)
        if cacheable:
            self._cache[key] = hit
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        closed, out_tree = hit
        dyn = [
            leaf
            for leaf, k in zip(leaves, kinds, strict=True)
            if k[0] in ("g", "a")
        ]
        return closed, out_tree, dyn

    def _make_jaxpr(self, treedef, leaves, kinds, specs):
        dyn_pos = [i for i, k in enumerate(kinds) if k[0] in ("g", "a")]

        def flat_fn(*dyn):
            full = list(leaves)
            for i, d in zip(dyn_pos, dyn, strict=True):
                full[i] = d
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            return self.fn(*a, **kw)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        return closed, jax.tree_util.tree_structure(out_shape)

    def __call__(self, *args, **kwargs):
        closed, out_tree, dyn = self.trace(*args, **kwargs)
        interp = Interpreter(self.mode, self.backward)
        invals = [
            Node.new(Gaussian(jnp.asarray(x.mean), jnp.asarray(x.var)))
            if _is_gaussian(x)
            else x
            for x in dyn
        ]
        try:
            outs = interp.eval_closed(closed, invals)
            outs = [interp.gaussian(o) if is_random(o) else o for o in outs]
        except TypeError as e:
            # jax.jvp / jacfwd over the custom_vjp (BP) rules: JAX's message
            # names neither the cause nor the fix.
            if self.backward == "autodiff" or not acts.is_forward_mode_error(e):
                raise
            raise acts.forward_mode_error("dualflow.propagate", self.backward, e) from e
        return jax.tree_util.tree_unflatten(out_tree, outs)


def propagate(
    fn: Callable,
    *,
    mode: str = "linearized",
    backward: str = "bp",
    cache_size: int = 64,
) -> Callable[..., Any]:
    """Turn a JAX function into its Gaussian moment-propagating version.

    Args:
      fn: any function of arrays traceable by ``jax.make_jaxpr`` (plain
        ``jax.numpy``, ``flax.linen`` ``apply``, an NNX module call, an
        Equinox module...).
      mode: ``"linearized"`` (first-order, Algorithm 1 of the duality paper)
        or ``"matched"`` (exact moments of element-wise nonlinearities where
        available, quadrature otherwise).
      backward: ``"bp"`` (belief-propagation / smoothing-gain ``custom_vjp``
        rules of :mod:`dualflow.moments`), ``"autodiff"`` (reverse mode
        through the same forward) or ``"bp_fixed_noise"`` (paper App. A rule
        for weight layers).  The two BP rules are ``jax.custom_vjp``
        (reverse-mode rules): ``jax.jvp`` and ``jax.jacfwd`` through the
        result raise a ``TypeError`` naming ``backward="autodiff"``, which
        supports forward mode (JAX's original error is chained as
        ``__cause__``).  When a ``jax.jit`` sits between the forward-mode
        transform and this function, JAX raises its own ``custom_vjp``
        message after tracing, where it cannot be rewritten.
        ``jax.linearize`` and ``jax.hessian`` (forward-over-reverse) run.
      cache_size: traced jaxprs kept (one per argument structure/shape/dtype).

    Returns:
      A function with ``fn``'s signature.  Any argument leaf may be a
      :class:`~dualflow.Gaussian` (random weights, random inputs, or both);
      outputs that depend on one come back as ``Gaussian(mean, var)``, the
      others as arrays, computed exactly as ``fn`` computes them.  Python
      ``bool``, ``str``, ``None`` and other non-array leaves are static (part
      of the cache key); numbers and arrays are traced, as under ``jax.jit``.

    Approximations (stated per rule in ``docs/propagate.md``): outputs are
    element-wise (diagonal) Gaussians; operands of different Gaussian values
    are treated as independent (the same assumption as the hand-written
    :mod:`dualflow.moments` ops); element-wise functions of one value are
    matched as a whole; reduction statistics that normalise the value they
    summarise are held at their means.
    """
    if mode not in MODES:
        raise ValueError(f"propagate: mode={mode!r} is not one of {MODES}.")
    if backward not in BACKWARDS:
        raise ValueError(f"propagate: backward={backward!r} is not one of {BACKWARDS}.")
    if not callable(fn):
        raise TypeError(f"propagate: expected a callable, got {type(fn).__name__}.")
    return Propagated(fn, mode, backward, int(cache_size))

