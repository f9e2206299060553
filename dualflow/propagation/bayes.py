"""Make an existing model Bayesian in a few lines.

:class:`BayesianFunction` wraps a function ``fn(params, *args)`` and its
(deterministic) parameter pytree into a :class:`~dualflow.nn.BayesianModule`
called as ``model(x, ctx)``, so :func:`dualflow.train.fit`,
:func:`dualflow.nn.objective`, :func:`dualflow.nn.predict`,
:func:`dualflow.nn.kl_divergence` and :func:`dualflow.optim.natural_gradient`
work on it unchanged::

    model = dualflow.from_linen(cnn, variables)          # flax.linen
    model = dualflow.from_nnx(nnx_module)                # flax.nnx
    model = dualflow.from_equinox(eqx_module)            # equinox
    model = dualflow.from_function(fn, params)           # plain jax.numpy
    fit(model, tx, x, y, method=Method("bp"), epochs=10, batch_size=64)

Parameter leaves are of three kinds:

* **random** (``is_random(path, leaf)``; default: arrays with ``ndim >= 2``
  and leaves whose path contains ``"bias"``): a mean-field Gaussian with
  parameters ``<name>_mean`` (initialised from the given value) and
  ``<name>_logvar`` (``log(init_var / fan_in)``) and a Gaussian prior
  ``N(0, prior_var / fan_in)`` (or ``"empirical_bayes"``), exactly as the
  layers of :mod:`dualflow.nn`;
* **point**: other trainable floating leaves (e.g. a LayerNorm scale), plain
  ``nnx.Param`` s, trained without a KL term;
* **fixed**: non-trainable leaves (``trainable(path, leaf)`` false: integer
  arrays, linen collections other than ``"params"``, nnx non-``Param``
  state such as ``BatchStat``), held in :class:`FixedState` and never updated.

Paths are ``"/"``-joined key names, e.g. ``"params/Conv_0/kernel"`` (linen),
``"params/linear/kernel"`` (nnx), ``"layers/0/weight"`` (equinox).

Fan-in (scales ``init_var`` and ``prior_var`` when ``var_scaling="fan_in"``):

* a weight with ``ndim >= 2``: ``layout="in_out"`` (linen / nnx / Haiku /
  ``x @ w``: Dense ``[in, out]``, Conv ``HWIO``) uses ``prod(shape[:-1])``;
  ``layout="out_in"`` (Equinox / PyTorch: Linear ``[out, in]``, Conv
  ``[out, in, *k]``) uses ``prod(shape[1:])``;
* a bias (a leaf whose name contains ``"bias"``) uses the fan-in of its
  layer's weight: the sibling leaf (same parent path) with ``ndim >= 2`` whose
  output size equals the bias size, preferring the names ``kernel``,
  ``weight``, ``w`` when several match; 1 when none is found;
* any other leaf: 1.
A callable ``fan_in(path, leaf) -> int`` replaces these rules.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dualflow.gaussian import Gaussian
from dualflow.nn.context import Context
from dualflow.nn.layers import BayesianModule, _safe_sqrt
from dualflow.propagation.interpreter import propagate

Array = jax.Array
PyTree = Any

__all__ = [
    "BayesianFunction",
    "FixedState",
    "default_is_random",
    "from_equinox",
    "from_function",
    "from_linen",
    "from_nnx",
]

_WRAPPERS = frozenset({"value", "raw_value"})  # nnx.Variable value keys
_NG_SUFFIXES = ("_mean", "_logvar", "_rho", "_var")  # natural_gradient pairing
_WEIGHT_NAMES = ("kernel", "weight", "w")


class FixedState(nnx.Variable):
    """A non-trainable leaf of a wrapped model (e.g. batch statistics)."""


class _Static:
    """Identity-hashed holder of a static object (functions, treedefs).

    nnx graphdefs and ``jax.jit`` static arguments must be hashable; foreign
    modules and treedefs need not be, so they are compared by identity.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"_Static({type(self.value).__name__})"

    def __copy__(self) -> _Static:  # immutable: copies share the object
        return self

    def __deepcopy__(self, memo) -> _Static:
        return self


# --------------------------------------------------------------------------
# paths, predicates, fan-in
# --------------------------------------------------------------------------
def _key_str(k) -> str | None:
    """Name of one path key (``None`` for nnx ``.value`` wrappers)."""
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in _WRAPPERS else k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _path_parts(path) -> tuple[str, ...]:
    return tuple(s for s in map(_key_str, path) if s is not None)


def default_is_random(path: str, leaf: Array) -> bool:
    """Weights (``ndim >= 2``) and biases (``"bias"`` in the path) are random."""
    return jnp.ndim(leaf) >= 2 or "bias" in path.rsplit("/", 1)[-1]


def _default_trainable(path: str, leaf: Array) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _weight_fan_in(shape: tuple[int, ...], layout: str) -> int:
    return math.prod(shape[:-1] if layout == "in_out" else shape[1:])


def _out_size(shape: tuple[int, ...], layout: str) -> int:
    return shape[-1] if layout == "in_out" else shape[0]


def _bias_fan_in(parts, leaf, entries, layout: str) -> int:
    """Fan-in of the weight next to bias ``parts`` (see module doc); 1 if none."""
    size = int(jnp.size(leaf))
    cands = [
        (p[-1], shape)
        for p, shape in entries
        if p[:-1] == parts[:-1]
        and len(shape) >= 2
        and "bias" not in p[-1]
        and _out_size(shape, layout) == size
    ]
    if len(cands) > 1:
        cands = [c for c in cands if c[0] in _WEIGHT_NAMES]
    if len(cands) != 1:
        return 1
    return max(1, _weight_fan_in(cands[0][1], layout))


def _fan_in(parts, leaf, entries, layout: str) -> int:
    shape = tuple(jnp.shape(leaf))
    if "bias" in parts[-1]:
        return _bias_fan_in(parts, leaf, entries, layout)
    if len(shape) >= 2:
        return max(1, _weight_fan_in(shape, layout))
    return 1


def _attr_name(parts: tuple[str, ...], taken: set[str], random: bool) -> str:
    """A unique identifier for a leaf (its ``_mean``/``_logvar`` base if random)."""
    name = re.sub(r"\W", "_", "__".join(parts)) or "leaf"
    if name[0].isdigit() or name.startswith("_"):
        name = "p" + name
    if not random and name.endswith(_NG_SUFFIXES):
        name += "_"  # natural_gradient would read it as a Gaussian pair member
    base, i = name, 1
    while _clashes(name, taken, random):
        name, i = f"{base}_{i}", i + 1
    return name


def _clashes(name: str, taken: set[str], random: bool) -> bool:
    names = (f"{name}_mean", f"{name}_logvar") if random else (name,)
    return any(n in taken or hasattr(BayesianFunction, n) for n in names)


@functools.lru_cache(maxsize=256)
def _propagated(fn: _Static, mode: str, backward: str):
    """One :func:`propagate` per (function, mode, backward): traces are cached."""
    return propagate(fn.value, mode=mode, backward=backward)


# --------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------
class BayesianFunction(BayesianModule):
    """``fn(params, *args)`` with mean-field Gaussian parameters, as an nnx module.

    Called as ``model(x, ctx, *args, **kwargs)`` (``fn(params, x, *args,
    **call_kwargs, **kwargs)``):

    * ``bp``: :func:`dualflow.propagate` of ``fn`` with the random leaves as
      :class:`~dualflow.Gaussian` beliefs (``ctx.method.mode`` /
      ``ctx.method.backward``); ``x`` may be an array or a ``Gaussian``.
      Returns a ``Gaussian`` (a point ``Gaussian`` if nothing is random).
      Approximations: those of ``propagate`` (diagonal Gaussians, independent
      operands of different beliefs; see ``docs/propagate.md``).
    * ``deterministic`` (and ``ensemble`` members of it): ``fn`` at the means.
    * ``reparam``: one joint weight sample per call (key ``ctx.next_key()``).
    * any other method raises ``ValueError`` (``local_reparam``, ``flipout``
      and ``mc_dropout`` need per-layer access a traced function lacks).

    Args:
      fn: ``fn(params, x, *args, **kwargs)``; its identity is the cache key of
        the traced jaxpr (reuse one function object).
      params: pytree of arrays (its structure is kept; ``None`` leaves too).
      is_random: ``is_random(path, leaf) -> bool`` picks the Gaussian leaves
        among the trainable ones (default :func:`default_is_random`).
      trainable: ``trainable(path, leaf) -> bool``; the others are fixed
        (default: floating leaves).
      layout: ``"in_out"`` or ``"out_in"`` weight layout, or a callable
        ``fan_in(path, leaf) -> int`` (module doc).
      init_var, prior_var, var_scaling: as :class:`~dualflow.nn.Dense`
        (variances ``init_var / fan_in`` and ``prior_var / fan_in``).
      call_kwargs: keyword arguments passed to every call of ``fn`` (hashable
        values, e.g. ``train=False``).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        params: PyTree,
        *,
        is_random: Callable[[str, Array], bool] | None = None,
        trainable: Callable[[str, Array], bool] | None = None,
        layout: str | Callable[[str, Array], int] = "in_out",
        init_var: float = 1e-3,
        prior_var: float | str = 1.0,
        var_scaling: str = "fan_in",
        call_kwargs: dict[str, Any] | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"BayesianFunction: fn must be callable, got {fn!r}.")
        if not callable(layout) and layout not in ("in_out", "out_in"):
            raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}.")
        if var_scaling not in ("fan_in", "none"):
            raise ValueError(
                f"var_scaling must be 'fan_in' or 'none', got {var_scaling!r}."
            )
        if not init_var > 0:
            raise ValueError(f"init_var must be > 0, got {init_var}.")
        if prior_var != "empirical_bayes" and not (
            isinstance(prior_var, int | float) and prior_var > 0
        ):
            raise ValueError(
                f"prior_var must be > 0 or 'empirical_bayes', got {prior_var!r}."
            )
        self._fn = _Static(fn)
        self.call_kwargs = tuple(sorted((call_kwargs or {}).items()))
        try:
            hash(self.call_kwargs)
        except TypeError:
            raise TypeError(
                "BayesianFunction: call_kwargs values must be hashable (they are"
                " static); pass arrays per call instead."
            ) from None
        is_random = default_is_random if is_random is None else is_random
        trainable = _default_trainable if trainable is None else trainable
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        self._treedef = _Static(treedef)
        entries = [(_path_parts(p), tuple(jnp.shape(v))) for p, v in flat]
        kinds, taken = [], set()
        for (parts, _), (_, leaf) in zip(entries, flat, strict=True):
            leaf, path = jnp.asarray(leaf), "/".join(parts)
            if not trainable(path, leaf):
                kind = "fixed"
            elif is_random(path, leaf):
                kind = "random"
            else:
                kind = "point"
            name = _attr_name(parts, taken, kind == "random")
            if kind == "random":
                if callable(layout):
                    fan_in = int(layout(path, leaf))
                else:
                    fan_in = _fan_in(parts, leaf, entries, layout)
                scale = 1.0 / fan_in if var_scaling == "fan_in" else 1.0
                self._add_gaussian(path, name, leaf, init_var, prior_var, scale)
                taken.update((f"{name}_mean", f"{name}_logvar"))
            else:
                var_type = FixedState if kind == "fixed" else nnx.Param
                setattr(self, name, var_type(leaf))
                taken.add(name)
            kinds.append((kind, name))
        self._leaves = tuple(kinds)  # (kind, attribute name) in treedef order

    def _add_gaussian(self, path, name, mean, init_var, prior_var, scale) -> None:
        """``<name>_mean = mean``, ``<name>_logvar = log(init_var * scale)``,
        prior variance ``prior_var * scale`` (or empirical Bayes)."""
        if not jnp.issubdtype(mean.dtype, jnp.floating):
            raise TypeError(f"BayesianFunction: random leaf {path!r} is not floating.")
        setattr(self, f"{name}_mean", nnx.Param(mean))
        logvar = jnp.full(mean.shape, math.log(init_var * scale), mean.dtype)
        setattr(self, f"{name}_logvar", nnx.Param(logvar))
        pv = prior_var if prior_var == "empirical_bayes" else float(prior_var) * scale
        self._priors = (*getattr(self, "_priors", ()), (name, pv))
        self._bayesian_names = (*self._bayesian_names, name)

    # -- parameters ------------------------------------------------------------
    @property
    def fn(self) -> Callable[..., Any]:
        """The wrapped function."""
        return self._fn.value

    def paths(self) -> dict[str, tuple[str, str]]:
        """Leaf path -> ``(kind, attribute)``; kind ``random``/``point``/``fixed``."""
        parts = [
            "/".join(_path_parts(p))
            for p, _ in jax.tree_util.tree_flatten_with_path(
                self._treedef.value.unflatten([0] * len(self._leaves))
            )[0]
        ]
        return dict(zip(parts, self._leaves, strict=True))

    def params(self, kind: str = "mean", key: Array | None = None) -> PyTree:
        """The parameter pytree of ``fn``: random leaves as their means
        (``"mean"``), ``Gaussian`` beliefs (``"gaussian"``) or one joint sample
        (``"sample"``, needs ``key``)."""
        if kind == "sample" and key is None:
            raise ValueError("params(kind='sample') needs a PRNG key.")
        leaves = []
        for i, (k, name) in enumerate(self._leaves):
            if k != "random":
                leaves.append(getattr(self, name)[...])
                continue
            m, v = self.moments_of(name)
            if kind == "gaussian":
                leaves.append(Gaussian(m, v))
            elif kind == "sample":
                eps = jax.random.normal(jax.random.fold_in(key, i), m.shape, m.dtype)
                leaves.append(m + _safe_sqrt(v) * eps)  # finite grad at v = 0
            elif kind == "mean":
                leaves.append(m)
            else:
                raise ValueError(f"params: unknown kind {kind!r}.")
        return self._treedef.value.unflatten(leaves)

    # -- forward -----------------------------------------------------------------
    def __call__(self, x, ctx: Context, *args, **kwargs):
        kwargs = {**dict(self.call_kwargs), **kwargs}
        name = ctx.name
        if name == "bp":
            f = _propagated(self._fn, ctx.method.mode, ctx.method.backward)
            out = f(self.params("gaussian"), x, *args, **kwargs)
            if isinstance(out, jax.Array):  # nothing random: a point belief
                out = Gaussian.point(out)
            return out
        if isinstance(x, Gaussian):
            raise TypeError(
                f"BayesianFunction: got a Gaussian input under method {name!r};"
                " only 'bp' propagates Gaussian inputs."
            )
        if name == "deterministic":
            return self.fn(self.params("mean"), x, *args, **kwargs)
        if name == "reparam":
            return self.fn(self.params("sample", ctx.next_key()), x, *args, **kwargs)
        raise ValueError(
            f"BayesianFunction: method {name!r} is not supported for a wrapped"
            " function (it needs per-layer access); use 'bp', 'reparam' or"
            " 'deterministic'."
        )


# --------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------
def from_function(fn: Callable[..., Any], params: PyTree, **kw) -> BayesianFunction:
    """``fn(params, x, ...)`` with Gaussian parameters (:class:`BayesianFunction`)."""
    return BayesianFunction(fn, params, **kw)


def from_linen(module, variables: PyTree, **kw) -> BayesianFunction:
    """A ``flax.linen`` module with its ``variables`` (from ``module.init``).

    Calls ``module.apply(variables, x, *args, **kwargs)``.  Only the
    ``"params"`` collection is trained; others (``batch_stats``, ...) are
    fixed.  Pass e.g. ``call_kwargs={"train": False}`` for such flags.
    Layout ``"in_out"`` (Dense ``[in, out]``, Conv ``HWIO``).
    """

    def apply(variables, *args, **kwargs):
        return module.apply(variables, *args, **kwargs)

    def trainable(path: str, leaf) -> bool:
        return path.split("/", 1)[0] == "params" and _default_trainable(path, leaf)

    kw.setdefault("trainable", trainable)
    return BayesianFunction(apply, dict(variables), **kw)


def from_nnx(module: nnx.Module, **kw) -> BayesianFunction:
    """A ``flax.nnx`` module called as ``module(x, *args, **kwargs)``.

    Its ``nnx.Param`` state is trained (paths ``"params/..."``); the rest
    (``BatchStat``, RNG state, ...) is fixed (paths ``"rest/..."``; state the
    call mutates is not written back).  Layout ``"in_out"``.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(state, *args, **kwargs):
        m = nnx.merge(graphdef, state["params"], state["rest"], copy=True)
        return m(*args, **kwargs)

    def trainable(path: str, leaf) -> bool:
        return path.split("/", 1)[0] == "params" and _default_trainable(path, leaf)

    kw.setdefault("trainable", trainable)
    return BayesianFunction(apply, {"params": params, "rest": rest}, **kw)


def from_equinox(module, *, batch_axis: int | None = 0, **kw) -> BayesianFunction:
    """An Equinox module (``eqx.partition(module, eqx.is_array)``).

    Equinox layers act on one example, so by default the call is
    ``jax.vmap``-ed over axis ``batch_axis`` of ``x`` (``None``: called as is).
    Layout ``"out_in"`` (Linear ``[out, in]``, Conv ``[out, in, *k]``).
    """
    import equinox as eqx

    params, static = eqx.partition(module, eqx.is_array)

    def apply(params, x, *args, **kwargs):
        m = eqx.combine(params, static)
        if batch_axis is None:
            return m(x, *args, **kwargs)
        return jax.vmap(lambda xi: m(xi, *args, **kwargs), batch_axis)(x)

    kw.setdefault("layout", "out_in")
    return BayesianFunction(apply, params, **kw)
