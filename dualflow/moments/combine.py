"""Combining and reshaping Gaussian beliefs: residual add, concatenate, reshape.

These maps are linear, so their belief-propagation backward rule is the exact
transpose and coincides with autodiff; they need no custom VJP.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dualflow.gaussian import Gaussian, as_gaussian

Array = jax.Array

__all__ = ["add", "concatenate", "flatten", "reshape", "scale"]


def add(*xs: Gaussian | Array) -> Gaussian:
    """Sum of beliefs (residual connection): means add, variances add.

    Independence assumption: the summands are treated as independent.  In a
    residual block ``x + F(x)`` the branch is correlated with the skip path,
    so the true variance is ``P_x + P_F + 2 Cov(x, F(x))``; the covariance term
    is dropped (positive correlation => under-estimate).  Arrays are points.
    """
    if not xs:
        raise ValueError("add: needs at least one input.")
    gs = [as_gaussian(x, f"add input {i}") for i, x in enumerate(xs)]
    mean = gs[0].mean
    var = gs[0].var
    for g in gs[1:]:
        mean = mean + g.mean
        var = var + g.var
    return Gaussian(mean, var)


def scale(x: Gaussian | Array, c: float | Array) -> Gaussian:
    """``c * x`` for a deterministic ``c`` (broadcastable): var scales by ``c^2``."""
    x = as_gaussian(x, "scale input")
    c = jnp.asarray(c, x.dtype)
    return Gaussian(c * x.mean, c * c * x.var)


def concatenate(xs: Sequence[Gaussian | Array], axis: int = -1) -> Gaussian:
    """Concatenate beliefs along ``axis`` (DenseNet); entries stay independent."""
    gs = [as_gaussian(x, f"concatenate input {i}") for i, x in enumerate(xs)]
    if not gs:
        raise ValueError("concatenate: needs at least one input.")
    return Gaussian(
        jnp.concatenate([g.mean for g in gs], axis=axis),
        jnp.concatenate([g.var for g in gs], axis=axis),
    )


def reshape(x: Gaussian | Array, shape: Sequence[int]) -> Gaussian:
    x = as_gaussian(x, "reshape input")
    return x.reshape(tuple(shape))


def flatten(x: Gaussian | Array, start_axis: int = 1) -> Gaussian:
    """Flatten all axes from ``start_axis`` on (default keeps the batch axis)."""
    x = as_gaussian(x, "flatten input")
    return x.reshape(x.shape[:start_axis] + (-1,))
