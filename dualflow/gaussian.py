"""The `Gaussian` pytree: element-wise (diagonal) Gaussian beliefs over tensors.

A `Gaussian` holds two arrays of identical shape and dtype, ``mean`` and
``var``.  It is the currency of every moment rule in :mod:`dualflow.moments`:
layers map a `Gaussian` over their input to a `Gaussian` over their output.

Conventions (Duality of information flow, Sec. 3.1):
  * moment parameters: ``(mean, var)`` = ``(x̂, P)``;
  * canonical (natural) parameters: ``eta = mean / var`` and
    ``lam = -1 / (2 var)``, so that ``log N(x) = eta*x + lam*x**2 - A(eta, lam)``.

Variances must be ``>= 0``.  Where a variance is a trainable parameter, store
an unconstrained one and build the belief with `Gaussian.from_logvar`
(``var = exp(logvar)``) or `Gaussian.from_rho` (``std = softplus(rho)``): no
optimiser step can then make it negative.  Value checks (finite means,
finite non-negative variances, finite point inputs and weights) are the
debug checks of :func:`set_debug_checks` / :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Any

__all__ = [
    "Gaussian",
    "as_gaussian",
    "debug_checks_enabled",
    "set_debug_checks",
    "validate",
]

_DEBUG_CHECKS = os.environ.get("DUALFLOW_DEBUG_CHECKS", "0") not in ("", "0", "false")


def set_debug_checks(enabled: bool) -> None:
    """Turn value checks on or off (default off; ``DUALFLOW_DEBUG_CHECKS=1``
    turns them on at import time).

    With checks on, every moment op checks its inputs: Gaussian beliefs have
    finite means and finite non-negative variances, point (plain array) inputs
    are finite, and for :func:`dualflow.moments.dense` / ``conv`` /
    ``bilinear_moments`` the weight (and bias) means are finite and their
    variances finite and ``>= 0``; so do the constructors
    `Gaussian.from_logvar`, `Gaussian.from_rho`, `Gaussian.from_natural` and
    `Gaussian.sample`.  A failure raises ``FloatingPointError`` naming the
    tensor, the number of bad entries and the first bad index and value.
    Eagerly the check runs on the host; under ``jit``/``grad``/``vmap``/``scan``
    the counts are reduced on device and reported through
    ``jax.debug.callback`` (the error then arrives wrapped in JAX's runtime
    error when the computation runs).  The switch is read when a function is
    traced: re-``jit`` after changing it.  With checks off nothing is added to
    the traced program (zero cost).

    Always on, because free: shape/dtype checks (static under ``jit``) and the
    variance check of host-resident (NumPy / Python) beliefs and weight
    variances entering a moment op.
    """
    global _DEBUG_CHECKS
    _DEBUG_CHECKS = bool(enabled)


def debug_checks_enabled() -> bool:
    return _DEBUG_CHECKS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Element-wise Gaussian ``N(mean, var)`` over an array of any shape.

    Attributes:
      mean: array ``[...]``.
      var: array of the same shape and dtype, ``var >= 0`` (``0`` = a point).

    Entries are independent: there is no covariance between elements.  The
    moment rules state where that independence is an approximation.

    Construction does not check values: ``Gaussian(mean, var)`` is also the
    pytree JAX builds for tangents, cotangents and gradients of a belief
    (``jax.grad`` with respect to a `Gaussian` returns
    ``Gaussian(dJ/dmean, dJ/dvar)``, whose ``var`` field may be negative, and
    :func:`dualflow.smoothing.smoothed_moments` takes one), and checking a
    device array would force a host sync on every op.  Instead, a negative
    variance is refused where a belief is *used*: every moment op and
    `sample` raise ``ValueError`` for a host-resident (NumPy / Python) belief
    with a negative or NaN variance, always (free: no device work); device
    arrays (and anything under ``jit``) are checked when debug checks are on
    (:func:`set_debug_checks`), at zero cost otherwise.  For variances that
    are trained, use `from_logvar` or `from_rho`: positive by construction.
    """

    mean: Array
    var: Array

    # -- construction -----------------------------------------------------
    @classmethod
    def point(cls, x: ArrayLike) -> Gaussian:
        """A degenerate Gaussian (var 0) at ``x``."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        return cls(x, jnp.zeros_like(x))

    @classmethod
    def from_natural(cls, eta: ArrayLike, lam: ArrayLike) -> Gaussian:
        """From canonical parameters ``eta = m/v`` and ``lam = -1/(2v)`` (lam < 0)."""
        eta = jnp.asarray(eta)
        lam = jnp.asarray(lam)
        var = -0.5 / lam
        return _checked(cls(eta * var, var), "Gaussian.from_natural")

    @classmethod
    def from_logvar(cls, mean: ArrayLike, logvar: ArrayLike) -> Gaussian:
        """``N(mean, exp(logvar))``: no optimiser step can make the variance negative.

        Args:
          mean, logvar: arrays of one shape ``[...]``, any real ``logvar``.

        ``var = exp(logvar) >= 0`` for every finite ``logvar``; it is ``> 0``
        while ``logvar`` stays above the dtype's underflow (about -87 in
        float32) and finite below its overflow (about +88).  The gradient with
        respect to ``logvar`` is ``var * dJ/dvar``: steps are relative.
        """
        mean = _as_float(mean)
        logvar = jnp.asarray(logvar, mean.dtype)
        return _checked(cls(mean, jnp.exp(logvar)), "Gaussian.from_logvar")

    @classmethod
    def from_rho(cls, mean: ArrayLike, rho: ArrayLike) -> Gaussian:
        """``N(mean, softplus(rho)^2)``: standard deviation ``softplus(rho) >= 0``.

        Args:
          mean, rho: arrays of one shape ``[...]``, any real ``rho``.

        The Bayes-by-backprop parameterisation (Blundell et al. 2015) and the
        ``<name>_rho`` convention of :func:`dualflow.optim.natural_gradient`.
        Unlike `from_logvar` the std grows only linearly for large ``rho``
        (no overflow); it underflows to 0 below about ``rho = -87`` (float32).
        """
        mean = _as_float(mean)
        std = jax.nn.softplus(jnp.asarray(rho, mean.dtype))
        return _checked(cls(mean, std * std), "Gaussian.from_rho")

    # -- array-like properties -------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @property
    def dtype(self):
        return self.mean.dtype

    @property
    def ndim(self) -> int:
        return self.mean.ndim

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)

    def logvar(self) -> Array:
        """``log(var)``, the parameter of `from_logvar` (``-inf`` for a point)."""
        return jnp.log(self.var)

    def rho(self) -> Array:
        """``softplus^{-1}(std)``, the parameter of `from_rho` (``-inf`` for a point).

        Computed as ``s + log(-expm1(-s))`` (no overflow for large ``s``).
        """
        s = jnp.sqrt(self.var)
        return s + jnp.log(-jnp.expm1(-s))

    # -- conversions ------------------------------------------------------
    def to_natural(self) -> tuple[Array, Array]:
        """Canonical parameters ``(eta, lam) = (mean/var, -1/(2 var))``.

        Undefined (inf) where ``var == 0``: points have no canonical form.
        """
        return self.mean / self.var, -0.5 / self.var

    def second_moment(self) -> Array:
        """``E[x^2] = mean^2 + var`` (the other mean parameter)."""
        return self.mean**2 + self.var

    # -- distribution methods --------------------------------------------
    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Draw samples of shape ``sample_shape + self.shape``.

        Refuses a negative variance (it would give NaN): always for host
        (NumPy) variances, for device arrays with debug checks on.
        """
        _check_values([("var", self.var, "var")], "Gaussian.sample", host_always=True)
        eps = jax.random.normal(key, tuple(sample_shape) + self.shape, self.dtype)
        return self.mean + jnp.sqrt(self.var) * eps

    def log_prob(self, x: ArrayLike) -> Array:
        """Element-wise log density ``log N(x; mean, var)`` (shape of the broadcast)."""
        x = jnp.asarray(x)
        return -0.5 * (
            jnp.log(2 * math.pi * self.var) + (x - self.mean) ** 2 / self.var
        )

    def entropy(self) -> Array:
        return 0.5 * jnp.log(2 * math.pi * math.e * self.var)

    def kl(self, other: Gaussian) -> Array:
        """Element-wise ``KL(self || other)``."""
        return 0.5 * (
            jnp.log(other.var / self.var)
            + (self.var + (self.mean - other.mean) ** 2) / other.var
            - 1.0
        )

    # -- structural helpers ----------------------------------------------
    def astype(self, dtype) -> Gaussian:
        return Gaussian(self.mean.astype(dtype), self.var.astype(dtype))

    def reshape(self, *shape) -> Gaussian:
        return Gaussian(self.mean.reshape(*shape), self.var.reshape(*shape))

    def __getitem__(self, idx) -> Gaussian:
        return Gaussian(self.mean[idx], self.var[idx])

    def __repr__(self) -> str:  # short: arrays can be big
        m = self.mean
        shape = getattr(m, "shape", None)
        dtype = getattr(m, "dtype", None)
        return f"Gaussian(shape={shape}, dtype={dtype})"


_ROLE_WORDS = {"mean": "means", "var": "variances", "point": "values"}


def _masks(xp, a, role: str) -> list[tuple[str, Any]]:
    """``(label, bad mask)`` pairs for an array of the given role (numpy or jnp)."""
    if role == "var_sign":  # always-on host check: NaN or < 0 (inf is allowed)
        return [("NaN variances", xp.isnan(a)), ("negative variances", a < 0)]
    fin = xp.isfinite(a)
    out = [(f"non-finite {_ROLE_WORDS[role]}", ~fin)]
    if role == "var":
        out.append(("negative variances", fin & (a < 0)))
    return out


def _is_host(a: Any) -> bool:
    """Host-resident (NumPy / Python float): checking it costs no device work."""
    return isinstance(a, np.ndarray | np.generic | float)


def _dtype(a: Any) -> np.dtype:
    return a.dtype if hasattr(a, "dtype") else np.result_type(a)


def _checkable(a: Any) -> bool:
    """An array-like with a real floating dtype whose values can be checked."""
    if isinstance(a, jax.Array | np.ndarray | np.generic | float):
        return jnp.issubdtype(_dtype(a), jnp.floating)
    return False


def _fmt_index(flat: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return "()"
    return str(tuple(int(i) for i in np.unravel_index(int(flat), shape)))


def _problem(label: str, what: str, n: int, size: int, index: str, value) -> str:
    return f"{label}: {n} of {size} {what} (first at index {index}: {float(value):.4g})"


def _raise(where: str, problems: list[str]) -> None:
    raise FloatingPointError(
        f"dualflow debug check failed in {where}: "
        + "; ".join(problems)
        + ". Keep trained variances positive by construction (Gaussian.from_logvar"
        " / from_rho), lower the learning rate or the initial weight variance, or"
        " use float64 to locate the first bad layer."
    )


def _host_problems(items, where: str) -> list[str]:
    problems = []
    for label, a, role in items:
        a = np.asarray(a)
        if a.size == 0:
            continue
        for what, mask in _masks(np, a, role):
            n = int(np.count_nonzero(mask))
            if n:
                flat = int(np.argmax(mask.ravel()))
                idx = _fmt_index(flat, a.shape)
                problems.append(_problem(label, what, n, a.size, idx, a.ravel()[flat]))
    return problems


def _device_report(meta, counts, firsts, values) -> None:
    """Host side of a traced check: ``meta = (where, ((label, what, size, shape),))``
    (static), then one count, first flat index and value per entry."""
    where, entries = meta
    problems = []
    for (label, what, size, shape), n, flat, v in zip(
        entries, counts, firsts, values, strict=True
    ):
        n = int(np.asarray(n))
        if n:
            idx = _fmt_index(int(np.asarray(flat)), shape)
            problems.append(_problem(label, what, n, size, idx, np.asarray(v)))
    if problems:
        _raise(where, problems)


def _check_values(items, where: str, *, host_always: bool = False) -> None:
    """Check ``items = [(label, array, role)]``, role ``"mean"|"var"|"point"``
    (``"var_sign"``, internal: NaN or negative only).

    With debug checks on: concrete arrays on the host (``FloatingPointError``
    now), traced ones by device reductions + ``jax.debug.callback``.  With
    them off and ``host_always``: host-resident variances only (``ValueError``);
    nothing is traced.
    """
    if not _DEBUG_CHECKS:
        if host_always:  # cheap isinstance tests first: this runs on every op
            host = [
                (lab, a, "var_sign")
                for lab, a, r in items
                if r == "var" and _is_host(a) and _checkable(a)
            ]
            problems = _host_problems(host, where) if host else []
            if problems:
                raise ValueError(
                    f"{where}: " + "; ".join(problems) + ". A variance must be >= 0;"
                    " build trained variances with Gaussian.from_logvar / from_rho."
                )
        return
    items = [(lab, a, role) for lab, a, role in items if _checkable(a)]
    traced = [it for it in items if isinstance(it[1], jax.core.Tracer)]
    concrete = [it for it in items if not isinstance(it[1], jax.core.Tracer)]
    problems = _host_problems(concrete, where)
    if problems:
        _raise(where, problems)
    if not traced:
        return
    entries, counts, firsts, values = [], [], [], []
    for label, a, role in traced:
        if a.size == 0:
            continue
        for what, mask in _masks(jnp, a, role):
            flat_mask = mask.ravel()
            first = jnp.argmax(flat_mask)
            entries.append((label, what, int(a.size), tuple(a.shape)))
            counts.append(jnp.count_nonzero(flat_mask))
            firsts.append(first)
            values.append(a.ravel()[first])
    if entries:
        jax.debug.callback(
            functools.partial(_device_report, (where, tuple(entries))),
            counts,
            firsts,
            values,
        )


def _structure(x: Gaussian, where: str) -> None:
    m, v = x.mean, x.var
    if jnp.shape(m) != jnp.shape(v):
        raise ValueError(
            f"{where}: mean shape {jnp.shape(m)} != var shape {jnp.shape(v)}; a"
            " Gaussian needs one variance per mean (use Gaussian.point(x) for a"
            " deterministic input)."
        )
    mdt, vdt = _dtype(m), _dtype(v)
    if mdt != vdt:
        raise ValueError(
            f"{where}: mean dtype {mdt} != var dtype {vdt}; cast both with"
            " .astype(...)."
        )
    if not jnp.issubdtype(mdt, jnp.floating):
        raise ValueError(f"{where}: expected floating dtype, got {mdt}.")


def validate(x: Any, where: str = "Gaussian", *, variance: bool = False) -> Any:
    """Check a `Gaussian`, an array, or any pytree of them; returns ``x`` unchanged.

    Args:
      x: a `Gaussian`, an array, or a pytree (e.g. a parameter dict) whose
        leaves are Gaussians and/or arrays (other leaves are skipped).
      where: name of ``x`` in messages; each leaf is named ``where`` plus its
        pytree path, e.g. ``params['dense']['kernel_var']`` or
        ``params['h'].var``.
      variance: plain array leaves are variances (finite and ``>= 0``)
        instead of points (finite).

    Always: `Gaussian` leaves need equal mean/var shapes and one floating
    dtype (``ValueError`` at trace time), and host-resident (NumPy) variances
    must be ``>= 0`` (``ValueError``).  With debug checks on
    (:func:`set_debug_checks`): finite means, finite non-negative variances,
    finite point arrays, else ``FloatingPointError`` naming the leaf, the
    number of bad entries and the first bad index and value (through
    ``jax.debug.callback`` when traced).  With checks off, nothing is added to
    a traced program.
    """
    if isinstance(x, Gaussian):  # fast path: the moment ops' inputs
        _structure(x, where)
        items = [(f"{where}.mean", x.mean, "mean"), (f"{where}.var", x.var, "var")]
        _check_values(items, where, host_always=True)
        return x
    flat, _ = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda v: isinstance(v, Gaussian)
    )
    items = []
    for path, leaf in flat:
        name = where + jax.tree_util.keystr(path)
        if isinstance(leaf, Gaussian):
            _structure(leaf, name)
            items.append((f"{name}.mean", leaf.mean, "mean"))
            items.append((f"{name}.var", leaf.var, "var"))
        else:
            items.append((name, leaf, "var" if variance else "point"))
    _check_values(items, where, host_always=True)
    return x


def _checked(g: Gaussian, where: str) -> Gaussian:
    """Value-check a freshly built belief when debug checks are on."""
    if _DEBUG_CHECKS:
        validate(g, where)
    return g


def _as_float(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def as_gaussian(x: Gaussian | ArrayLike, where: str = "input") -> Gaussian:
    """Accept a `Gaussian` or a plain array (treated as a point, var 0)."""
    if isinstance(x, Gaussian):
        return validate(x, where)
    if isinstance(x, tuple) and len(x) == 2:
        raise TypeError(
            f"{where}: got a tuple; pass dualflow.Gaussian(mean, var) explicitly."
        )
    if _DEBUG_CHECKS:  # point inputs must be finite
        validate(x, where)
    return Gaussian.point(x)
