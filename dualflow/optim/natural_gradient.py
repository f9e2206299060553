r"""Natural-gradient preconditioning for mean-field Gaussian weights (App. D).

A Bayesian weight tensor is stored as two sibling leaves of the parameter
pytree: ``<base>_mean`` and one of

* ``<base>_logvar`` -- variance ``v = exp(u)`` (the layers' default),
* ``<base>_rho``    -- standard deviation ``s = softplus(rho)``, ``v = s**2``,
* ``<base>_var``    -- the variance ``v`` itself (mainly for tests).

:func:`natural_gradient` is an :class:`optax.GradientTransformation` that maps
the gradient ``G = dJ/dparam`` of a loss ``J`` (negative ELBO, NLL, ...) to the
natural gradient ``F^{-1} G`` of the element-wise Gaussian family
``q(w) = N(m, v)``; put an optimiser after it (``optax.sgd``, momentum,
schedules), which applies ``-lr``.  Leaves that are not part of a pair are
handled according to ``unpaired`` (default: passed through unchanged).

Derivations (per scalar weight; ``g = -G = d log p / d param``)
----------------------------------------------------------------
**Fisher.**  ``log N(w; m, v) = -(w-m)^2/(2v) - log(v)/2 + c`` gives the scores
``d/dm = (w-m)/v`` and ``d/dv = ((w-m)^2 - v)/(2 v^2)``.  Under ``q``,
``E[(w-m)^2] = v`` and ``E[(w-m)^4] = 3 v^2``, so::

    F_mm = 1/v,   F_vv = (3v^2 - 2v^2 + v^2)/(4 v^4) = 1/(2 v^2),   F_mv = 0.

The factor 2 in ``F_vv^{-1} = 2 v^2`` comes from the Gaussian fourth moment:
``F_vv = Var[(w-m)^2] / (4 v^4)`` with ``Var[(w-m)^2] = 3v^2 - v^2 = 2 v^2``.
App. D writes the variance natural gradient as
``Sigma (grad_Sigma) Sigma`` ("pre- and post-multiply the variance gradient by
the variance", i.e. by ``v^2`` element-wise): that is the right shape but is
missing this factor 2 -- consistent with its statement of
``grad_Sigma log p`` which also misses the matching ``1/2`` (Eq. 7 of the main
text has it).  With the correct factors both natural gradients are the
"posterior minus prior" differences App. D describes (see below).

**Reparameterisations** (chain rule; ``F_xx = F_vv (dv/dx)^2`` and
``G_x = G_v dv/dx``, so ``F_xx^{-1} G_x = 2 v^2 G_v / (dv/dx)``: the update in
``x`` is the ``(m, v)`` update divided by ``dv/dx``, i.e. the same tangent step)::

    _var     v                 F = 1/(2 v^2)           update 2 v^2 G_v
    _logvar  v = exp(u)        F = 1/2                 update 2 G_u  (= 2 v G_v)
    _rho     v = softplus(r)^2 F = 2 sigmoid(r)^2/s^2  update (s/sigmoid(r))^2/2 G_r

(for ``_rho``: ``dv/dr = 2 s sigmoid(r)``; the ratio ``s / sigmoid(r)`` is
computed stably and tends to 1 as ``r -> -inf``).  Only ``_var`` is a linear
function of ``v``; for ``_logvar``/``_rho`` one optimiser step agrees with the
``_var`` step to first order in the learning rate.

**Damping** ``lambda`` is Tikhonov damping of the diagonal Fisher in each leaf's
own coordinates, ``(F + lambda)^{-1} G``: mean ``v / (1 + lambda v) G``
(as ``lambda -> inf`` this tends to plain SGD with the gradient scaled by
``1/lambda``; for large ``v`` it caps the step at ``G / lambda``), ``_var``
``2 v^2 / (1 + 2 lambda v^2) G``, ``_logvar`` ``2 / (1 + 2 lambda) G``,
``_rho`` ``r^2 / (2 + lambda r^2) G`` with ``r = s / sigmoid(rho)``.
``variance_damping`` overrides ``damping`` for variance leaves (their Fisher
lives on a different scale; ``1/v`` is large for small variances while the
``_logvar`` Fisher is ``1/2``).

**What one step at learning rate 1 does** (Gaussian-linear model, loss
``J = -log p(y|x)``; Theorem 1: ``g_m = (E_gamma[w] - m)/v`` and
``g_v = (E_gamma[(w-m)^2] - v)/(2 v^2)``, with ``gamma`` the exact posterior)::

    m + v g_m        = E_gamma[w]                       (posterior mean)
    v + 2 v^2 g_v    = E_gamma[(w - m)^2]
                     = posterior var + (posterior mean - m)^2.

So ``variance_update="app_d"`` (natural gradient in ``(m, v)``) moves the mean
exactly to the posterior mean but over-shoots the variance by the squared mean
shift ``(v g_m)^2``.  App. D states ``dSigma = (E w - mu)(E w - mu)^T - Sigma``,
which drops the posterior covariance; the correct expectation is
``E_gamma[(w-mu)(w-mu)^T] = Sigma_post + (E w - mu)(E w - mu)^T``.

**Fixed point** (``variance_update="fixed_point"``).  Step the *expectation*
parameters ``eta = (m, m^2 + v)`` along the gradient w.r.t. the *natural*
parameters ``theta = (m/v, -1/(2v))`` (which is the natural gradient in
``eta``).  With ``dm/dtheta_1 = v``, ``dm/dtheta_2 = 2 m v``, ``dv/dtheta_1 = 0``,
``dv/dtheta_2 = 2 v^2``::

    d log p/d theta_1 = v g_m,    d log p/d theta_2 = 2 m v g_m + 2 v^2 g_v.

A step of size ``a``, ``eta' = eta + a d log p/d theta``, gives ``dm = a v g_m``
and ``d(m^2 + v) = 2 m dm + dm^2 + dv``, hence::

    dm = a v g_m,     dv = a 2 v^2 g_v - (a v g_m)^2.

By Theorem 1(2) ``d log p/d theta = E_gamma[T(w)] - E_q[T(w)]`` with
``T(w) = (w, w^2)``, so at ``a = 1`` the step lands *exactly* on the posterior
mean and posterior (marginal) variance -- the fixed-point iteration of a
Gaussian graphical model.  The extra ``-(a v g_m)^2`` is second order in the
step, so it depends on the learning rate the optimiser after this transform
applies.  The transform returns ``u`` and the optimiser applies
``-lr * u``; in terms of the loss gradients ``G = -g``::

    u_m = v G_m,      u_v = 2 v^2 G_v + fixed_point_lr * (v G_m)^2,

so ``-lr * u_v = lr 2 v^2 g_v - lr * fixed_point_lr * (v g_m)^2``.  The step is
the exact expectation-parameter step iff ``fixed_point_lr`` equals the
learning rate of plain SGD after it (pass the same float, or the same
schedule: it is evaluated at this transform's own step count, which matches
optax's schedule count when both start together).  The default
``fixed_point_lr=1.0`` is the paper's learning-rate-1 fixed point.  With
momentum/Adam after it the correction is no longer exact (it is then a
second-order heuristic).  With damping, ``v G_m`` above is replaced by the
damped mean step.  For ``_logvar``/``_rho`` the ``(m, v)`` step is mapped
through ``dv/dx`` (first-order exact; only ``_var`` lands exactly at lr 1).

Signs: ``G`` is the loss gradient (what ``jax.grad`` of the loss returns);
every preconditioner above is positive, so the transform keeps descent
directions, and the only sign-sensitive piece is the fixed-point correction,
which always *reduces* the variance after ``-lr`` is applied.  (Theorem 1(2)
of the paper writes ``grad_theta J = mu_{l|L} - mu_l``; with ``J`` the loss as
in Theorem 1(1) that difference is ``grad_theta log p = -grad_theta J``.)

Other slips in App. D's second-order expansion (the results above do not
depend on them): ``5(w - mu)Sigma^T dSigma ...`` should read
``.5 (w - mu)^T Sigma^{-1} dSigma Sigma^{-1} (w - mu)``, ``-5 Sigma^{-1}``
should read ``-.5 Sigma^{-1}``, and the quadratic terms should carry
``-1/2 dmu^T Sigma^{-1} dmu`` and ``-1/4 Tr(Sigma^{-1} dSigma Sigma^{-1}
dSigma)`` (the Fisher blocks ``Sigma^{-1}`` and ``1/2 Sigma^{-1} (x)
Sigma^{-1}``), which is what its stated stationarity conditions actually use.

Usage::

    tx = optax.chain(
        natural_gradient(),
        optax.sgd(optax.cosine_decay_schedule(0.1, 1000), momentum=0.9,
                  nesterov=True),
    )
    # different learning rates for means / variances / other leaves:
    tx = optax.chain(
        natural_gradient(),
        optax.partition({"mean": optax.sgd(0.1), "variance": optax.sgd(0.01),
                         "other": optax.adam(1e-3)}, mean_variance_labels),
    )

``natural_gradient`` must see *both* leaves of a pair, so put it outside (before)
``optax.partition``/``optax.masked``, not inside one of their branches.

With ``flax.nnx``::

    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model, batch)
    opt.update(model, grads)

(``nnx.Optimizer`` passes the parameters to ``tx.update``; pass
``mean_variance_labels`` itself -- the function -- to ``optax.partition``, or
labels computed from ``nnx.as_pure(nnx.state(model, nnx.Param))``, since the
optimiser hands optax Variable-free trees.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "NaturalGradientState",
    "VARIANCE_SUFFIXES",
    "mean_variance_labels",
    "natural_gradient",
]

PyTree = Any

# Checked longest-first so that "_logvar" is not read as "_var".
VARIANCE_SUFFIXES: tuple[str, ...] = ("_logvar", "_rho", "_var")
_MEAN_SUFFIX = "_mean"
# Attribute keys that wrap a leaf's value (e.g. ``nnx.Variable`` in an
# ``nnx.State`` flattens to ``(..., DictKey('kernel_mean'), GetAttrKey('value'))``).
_WRAPPER_ATTRS = frozenset({"value", "raw_value"})


class NaturalGradientState(NamedTuple):
    """State of :func:`natural_gradient`: the number of updates applied."""

    count: jax.Array


# ----------------------------------------------------------------------------
# Pairing leaves by path
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LeafInfo:
    role: str  # "mean", "variance" or "other"
    kind: str | None = None  # "logvar" / "rho" / "var" for pairs
    partner: int | None = None  # flat index of the other leaf of the pair


def _key_name(k) -> str | None:
    """The attribute/dict name of a path key, or None for index-like keys."""
    if isinstance(k, jax.tree_util.DictKey):
        return k.key if isinstance(k.key, str) else None
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return None


def _split_path(path) -> tuple[tuple, str | None, tuple]:
    """Split a key path into (parent keys, leaf name, trailing wrapper keys).

    Trailing keys that only wrap the value (``GetAttrKey('value')`` of an
    ``nnx.Variable``, sequence/integer indices) are skipped; the last named key
    before them is the parameter's name.
    """
    i = len(path) - 1
    while i >= 0:
        k = path[i]
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name in _WRAPPER_ATTRS:
            i -= 1
            continue
        name = _key_name(k)
        if name is None:
            i -= 1
            continue
        return tuple(path[:i]), name, tuple(path[i + 1 :])
    return tuple(path), None, ()


def _parse_name(name: str | None) -> tuple[str, str | None, str | None]:
    """Return (role, base, kind) for a leaf name."""
    if name is None:
        return "other", None, None
    if name.endswith(_MEAN_SUFFIX) and len(name) > len(_MEAN_SUFFIX):
        return "mean", name[: -len(_MEAN_SUFFIX)], None
    for suffix in VARIANCE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return "variance", name[: -len(suffix)], suffix[1:]
    return "other", None, None


def _fmt(path) -> str:
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def _has_masked_nodes(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    return any(isinstance(x, optax.MaskedNode) for x in leaves)


def _analyse(tree) -> tuple[list[_LeafInfo], list, Any]:
    """Classify every leaf of ``tree`` and pair means with variances.

    Pure Python on static structure (paths, shapes): safe under ``jit``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [p for p, _ in flat]
    leaves = [x for _, x in flat]
    infos: list[_LeafInfo] = [_LeafInfo("other")] * len(flat)
    groups: dict[tuple, dict[str, list[int]]] = {}
    for idx, path in enumerate(paths):
        parent, name, trail = _split_path(path)
        role, base, kind = _parse_name(name)
        if role == "other":
            continue
        group = groups.setdefault((parent, base, trail), {})
        group.setdefault("mean" if role == "mean" else kind, []).append(idx)

    hint = ""
    if _has_masked_nodes(tree):
        hint = (
            " The tree contains optax.MaskedNode entries: natural_gradient needs"
            " both leaves of each pair, so apply it before/outside optax.partition"
            " / optax.masked / optax.multi_transform rather than inside a branch."
        )
    for (_, base, _), group in groups.items():
        means = group.get("mean", [])
        kinds = [k for k in ("logvar", "rho", "var") if k in group]
        if not means:
            # A lone variance-like leaf (e.g. a ``noise_logvar`` hyper-parameter)
            # has no weight mean to precondition: leave it to `unpaired`.
            continue
        mean_idx = means[0]
        if not kinds:
            raise ValueError(
                f"natural_gradient: parameter {_fmt(paths[mean_idx])} is a "
                f"Gaussian weight mean ('{base}_mean') but has no variance "
                f"partner. Add a sibling leaf '{base}_logvar' (variance = exp), "
                f"'{base}_rho' (std = softplus) or '{base}_var' (variance) with "
                "the same shape, or rename the leaf so it does not end in "
                "'_mean'." + hint
            )
        if len(kinds) > 1:
            found = ", ".join(f"'{base}_{k}'" for k in kinds)
            raise ValueError(
                f"natural_gradient: parameter {_fmt(paths[mean_idx])} has several "
                f"variance partners ({found}); keep exactly one of them."
            )
        kind = kinds[0]
        var_idx = group[kind][0]
        ms, vs = jnp.shape(leaves[mean_idx]), jnp.shape(leaves[var_idx])
        if ms != vs:
            raise ValueError(
                f"natural_gradient: shape mismatch between {_fmt(paths[mean_idx])} "
                f"{ms} and its variance partner {_fmt(paths[var_idx])} {vs}. "
                "Mean-field Gaussian weights need one variance entry per mean "
                "entry: give both leaves the same shape."
            )
        infos[mean_idx] = _LeafInfo("mean", kind, var_idx)
        infos[var_idx] = _LeafInfo("variance", kind, mean_idx)
    return infos, leaves, treedef


def mean_variance_labels(params: PyTree) -> PyTree:
    """Label each leaf of ``params`` ``"mean"``, ``"variance"`` or ``"other"``.

    Returns a pytree with the structure of ``params`` whose leaves are those
    strings, for ``optax.partition`` / ``optax.multi_transform`` (it can also be
    passed directly as the labels *function*).  Pairing follows
    :func:`natural_gradient`: a ``<base>_mean`` leaf and its sibling
    ``<base>_logvar`` / ``<base>_rho`` / ``<base>_var`` are ``"mean"`` and
    ``"variance"``; everything else (including a variance-like leaf without a
    ``_mean`` partner) is ``"other"``.  Raises ``ValueError`` for a ``_mean``
    leaf without a partner or with a partner of a different shape.

    Labels depend only on the tree's structure and leaf names, so the function
    gives the same answer on gradients as on parameters.  For ``nnx.State``
    the trailing ``.value`` key of each Variable is skipped when reading the
    name; note that the returned pytree mirrors the input, so with
    ``nnx.Optimizer`` pass this function itself to ``optax.partition`` (or call
    it on ``nnx.as_pure(state)``).
    """
    infos, _, treedef = _analyse(params)
    return jax.tree_util.tree_unflatten(treedef, [i.role for i in infos])


# ----------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------


def _variance(p: jax.Array, kind: str) -> jax.Array:
    if kind == "logvar":
        return jnp.exp(p)
    if kind == "rho":
        return jnp.square(jax.nn.softplus(p))
    return p


def _softplus_over_sigmoid(rho: jax.Array) -> jax.Array:
    """``softplus(rho) / sigmoid(rho)``, stable for very negative ``rho``.

    For ``x = exp(rho) -> 0``: ``log1p(x) (1 + 1/x) = 1 + x/2 + O(x^2)``.
    """
    safe = jnp.where(rho > -20.0, rho, 0.0)
    direct = jax.nn.softplus(safe) / jax.nn.sigmoid(safe)
    return jnp.where(rho > -20.0, direct, 1.0 + 0.5 * jnp.exp(rho))


def _variance_precond(p: jax.Array, kind: str, lam: float) -> jax.Array:
    """``(F_xx + lam)^{-1}`` for the variance coordinate ``x`` of kind ``kind``."""
    if kind == "var":
        v2 = jnp.square(p)
        return 2.0 * v2 / (1.0 + 2.0 * lam * v2)
    if kind == "logvar":
        return jnp.full_like(p, 2.0 / (1.0 + 2.0 * lam))
    # rho: F = 2 sigmoid^2 / s^2 = 2 / r^2 with r = s / sigmoid.
    r2 = jnp.square(_softplus_over_sigmoid(p))
    return r2 / (2.0 + lam * r2)


def _v_tangent_to_coord(p: jax.Array, kind: str, dv_over_v: jax.Array) -> jax.Array:
    """Map a variance step ``dv`` (given as ``dv / v``) to ``dx = dv / (dv/dx)``."""
    if kind == "var":
        return dv_over_v * p
    if kind == "logvar":
        return dv_over_v
    # rho: dv/drho = 2 s sigmoid  =>  dv / (dv/drho) = (dv/v) * s / (2 sigmoid).
    return dv_over_v * 0.5 * _softplus_over_sigmoid(p)


def natural_gradient(
    damping: float = 0.0,
    variance_update: Literal["app_d", "fixed_point"] = "app_d",
    *,
    variance_damping: float | None = None,
    fixed_point_lr: float | optax.Schedule = 1.0,
    unpaired: Literal["unchanged", "zero"] = "unchanged",
) -> optax.GradientTransformation:
    """Natural-gradient preconditioner for mean-field Gaussian weights.

    See the module docstring for the derivations.  For each pair
    ``(<base>_mean, <base>_{logvar,rho,var})`` with current variance ``v`` and
    loss gradients ``G``:

    * mean: ``v / (1 + damping v) * G_m`` (natural gradient ``v G_m`` when
      ``damping == 0``);
    * variance, ``"app_d"``: the natural gradient of the ``(m, v)`` Fisher
      ``diag(1/v, 1/(2 v^2))`` in the leaf's coordinates -- ``2 v^2 G_v``
      (``_var``), ``2 G_u`` (``_logvar``), ``(s/sigmoid(rho))^2 / 2 G_rho``
      (``_rho``), each damped as ``(F + variance_damping)^{-1} G``.  One SGD
      step at lr 1 on ``J = -log p(y|x)`` of a Gaussian-linear model moves the
      mean to the posterior mean and the variance (``_var``) to
      ``posterior var + (posterior mean - prior mean)^2``;
    * variance, ``"fixed_point"``: additionally ``+ fixed_point_lr * (mean
      step)^2`` (mapped to the leaf's coordinates), making the step an
      expectation-parameter step; with ``fixed_point_lr`` equal to the SGD
      learning rate it is exact, and at lr 1 lands on the exact posterior
      marginal (``_var``).

    Args:
      damping: Tikhonov damping ``lambda >= 0`` added to the diagonal Fisher.
      variance_update: ``"app_d"`` or ``"fixed_point"`` (see above).
      variance_damping: damping for variance leaves (default: ``damping``).
      fixed_point_lr: learning rate assumed by the ``"fixed_point"`` correction
        (float or ``optax`` schedule of this transform's step count); ignored
        for ``"app_d"``.
      unpaired: what to do with leaves that are not part of a pair:
        ``"unchanged"`` passes their gradient through (so the optimiser after
        this transform treats them as ordinary parameters), ``"zero"`` freezes
        them.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``
      (the variances are read from them).
    """
    if variance_update not in ("app_d", "fixed_point"):
        raise ValueError(
            f"natural_gradient: variance_update must be 'app_d' or 'fixed_point', "
            f"got {variance_update!r}."
        )
    if unpaired not in ("unchanged", "zero"):
        raise ValueError(
            f"natural_gradient: unpaired must be 'unchanged' or 'zero', got "
            f"{unpaired!r}."
        )
    lam_m = float(damping)
    lam_v = lam_m if variance_damping is None else float(variance_damping)
    if lam_m < 0 or lam_v < 0:
        raise ValueError(
            "natural_gradient: damping and variance_damping must be >= 0 "
            f"(got {lam_m}, {lam_v})."
        )

    def init_fn(params):
        # Validate the structure early so errors surface at ``opt.init``.
        _analyse(params)
        return NaturalGradientState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "natural_gradient: update() needs `params` (the variances are read "
                "from them): call tx.update(grads, opt_state, params)."
            )
        infos, p_leaves, p_def = _analyse(params)
        g_leaves, g_def = jax.tree_util.tree_flatten(updates)
        if g_def != p_def:
            raise ValueError(
                "natural_gradient: `updates` and `params` have different tree "
                f"structures:\n  updates: {g_def}\n  params:  {p_def}"
            )
        if variance_update == "fixed_point":
            a = (
                fixed_point_lr(state.count)
                if callable(fixed_point_lr)
                else (fixed_point_lr)
            )
        out = list(g_leaves)
        for i, info in enumerate(infos):
            if info.role == "other":
                if unpaired == "zero":
                    out[i] = jnp.zeros_like(g_leaves[i])
                continue
            if info.role != "mean":
                continue
            j, kind = info.partner, info.kind
            g_m, g_x = g_leaves[i], g_leaves[j]
            p_x = p_leaves[j]
            v = _variance(p_x, kind)
            # mean: (1/v + lam)^-1 G = v / (1 + lam v) G
            shrink = 1.0 / (1.0 + lam_m * v)  # = precond / v
            step_m = v * shrink * g_m
            step_x = _variance_precond(p_x, kind, lam_v) * g_x
            if variance_update == "fixed_point":
                # + a (step_m)^2 in v-space; (step_m)^2 / v = v (shrink G_m)^2.
                dv_over_v = a * v * jnp.square(shrink * g_m)
                step_x = step_x + _v_tangent_to_coord(p_x, kind, dv_over_v)
            out[i] = step_m.astype(g_m.dtype)
            out[j] = step_x.astype(g_x.dtype)
        new_updates = jax.tree_util.tree_unflatten(g_def, out)
        return new_updates, NaturalGradientState(
            count=optax.safe_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)
