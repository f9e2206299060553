"""The `Gaussian` pytree: element-wise (diagonal) Gaussian beliefs over tensors.

A `Gaussian` holds two arrays of identical shape and dtype, ``mean`` and
``var``.  It is the currency of every moment rule in :mod:`dualflow.moments`:
layers map a `Gaussian` over their input to a `Gaussian` over their output.

Conventions (Duality of information flow, Sec. 3.1):
  * moment parameters: ``(mean, var)`` = ``(x̂, P)``;
  * canonical (natural) parameters: ``eta = mean / var`` and
    ``lam = -1 / (2 var)``, so that ``log N(x) = eta*x + lam*x**2 - A(eta, lam)``.
"""

from __future__ import annotations

import dataclasses
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
    """Turn value checks (finite mean, finite non-negative variance) on or off.

    Shape/dtype checks are always on (they are free: shapes are static under
    ``jit``).  Value checks need the data, so under ``jit`` they run through a
    host callback; they are off by default.  The environment variable
    ``DUALFLOW_DEBUG_CHECKS=1`` turns them on at import time.
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
        return cls(eta * var, var)

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
        """Draw samples of shape ``sample_shape + self.shape``."""
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


def _host_value_check(mean: np.ndarray, var: np.ndarray, where: str) -> None:
    mean = np.asarray(mean)
    var = np.asarray(var)
    problems = []
    if not np.all(np.isfinite(mean)):
        problems.append(f"{np.size(mean) - np.isfinite(mean).sum()} non-finite means")
    if not np.all(np.isfinite(var)):
        problems.append(f"{np.size(var) - np.isfinite(var).sum()} non-finite variances")
    elif np.any(var < 0):
        problems.append(f"{(var < 0).sum()} negative variances (min {var.min():.3g})")
    if problems:
        raise FloatingPointError(
            f"dualflow debug check failed in {where}: "
            + ", ".join(problems)
            + ". Lower the learning rate or the initial weight variance, or use"
            " float64 to locate the first bad layer."
        )


def validate(x: Gaussian, where: str = "Gaussian") -> Gaussian:
    """Check a `Gaussian`: equal shapes and float dtypes always; values if enabled.

    Shape/dtype problems raise ``ValueError`` at trace time.  With debug checks
    on (:func:`set_debug_checks`), non-finite values or negative variances raise
    ``FloatingPointError`` (through a host callback under ``jit``).
    """
    m, v = x.mean, x.var
    if m.shape != v.shape:
        raise ValueError(
            f"{where}: mean shape {m.shape} != var shape {v.shape}; a Gaussian needs"
            " one variance per mean (use Gaussian.point(x) for a deterministic input)."
        )
    if m.dtype != v.dtype:
        raise ValueError(
            f"{where}: mean dtype {m.dtype} != var dtype {v.dtype}; cast both with"
            " .astype(...)."
        )
    if not jnp.issubdtype(m.dtype, jnp.floating):
        raise ValueError(f"{where}: expected floating dtype, got {m.dtype}.")
    if _DEBUG_CHECKS:
        if isinstance(m, jax.core.Tracer) or isinstance(v, jax.core.Tracer):
            jax.debug.callback(_host_value_check, m, v, where)
        else:
            _host_value_check(m, v, where)
    return x


def as_gaussian(x: Gaussian | ArrayLike, where: str = "input") -> Gaussian:
    """Accept a `Gaussian` or a plain array (treated as a point, var 0)."""
    if isinstance(x, Gaussian):
        return validate(x, where)
    if isinstance(x, tuple) and len(x) == 2:
        raise TypeError(
            f"{where}: got a tuple; pass dualflow.Gaussian(mean, var) explicitly."
        )
    return Gaussian.point(x)
