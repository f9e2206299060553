"""Combining and reshaping Gaussian beliefs: residual add, concatenate, reshape,
transpose, resize, element-wise product and marginalised dropout.

All maps except :func:`multiply` and :func:`bernoulli_dropout` are linear, so
their belief-propagation backward rule is the exact transpose and coincides
with autodiff; :func:`multiply` uses the bilinear BP rule of
:mod:`dualflow.moments.linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dualflow.gaussian import Gaussian, _check_values, as_gaussian
from dualflow.moments.linear import bilinear_moments

Array = jax.Array

__all__ = [
    "add",
    "bernoulli_dropout",
    "concatenate",
    "flatten",
    "multiply",
    "reshape",
    "resize",
    "scale",
    "transpose",
]


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
    _check_values([("scale c", c, "point")], "scale")  # debug checks only
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


def multiply(x: Gaussian | Array, y: Gaussian | Array, *, backward: str = "bp"):
    """Element-wise product of two *independent* beliefs (broadcasting).

    ``E[xy] = m_x m_y`` and ``Var[xy] = m_x^2 P_y + P_x m_y^2 + P_x P_y`` --
    exact for independent factors, which is the bilinear dense rule with the
    weight replaced by ``y`` (so the BP backward is the bilinear one).  Used
    by squeeze-excitation gates ``x * sigmoid(g(x))``, where the gate is
    computed from ``x``: there the covariance between the two factors is
    dropped (the same mean-field assumption as :func:`add`).
    """
    x = as_gaussian(x, "multiply input x")
    y = as_gaussian(y, "multiply input y")
    # y was checked as a belief by as_gaussian: no second weight check
    return bilinear_moments(
        jnp.multiply, x, y.mean, y.var, backward=backward, where=None
    )


def transpose(x: Gaussian | Array, axes: Sequence[int]) -> Gaussian:
    """Permute axes (MLP-Mixer token mixing): exact, entries stay independent."""
    x = as_gaussian(x, "transpose input")
    axes = tuple(axes)
    return Gaussian(jnp.transpose(x.mean, axes), jnp.transpose(x.var, axes))


def _resize_matrix(n_out: int, n_in: int, method: str, dtype) -> Array:
    """``[n_out, n_in]`` matrix of 1-D interpolation (resize of the identity)."""
    eye = jnp.eye(n_in, dtype=dtype)
    return jax.image.resize(eye, (n_out, n_in), method=method)


def resize(
    x: Gaussian | Array, size: Sequence[int], method: str = "bilinear"
) -> Gaussian:
    """Resize the spatial axes of ``[N, H, W, C]`` beliefs to ``size = (H', W')``.

    Interpolation is linear and separable, ``y = R_h x R_w^T`` per channel,
    so for independent pixels ``mean' = R_h m R_w^T`` and
    ``var' = (R_h o R_h) P (R_w o R_w)^T`` exactly (``o``: element-wise
    square).  Output pixels that share input pixels become correlated; that
    correlation is not represented.  ``method``: ``"bilinear"`` or
    ``"nearest"`` (see ``jax.image.resize``).
    """
    point = not isinstance(x, Gaussian)  # e.g. raw images: no variance to map
    x = as_gaussian(x, "resize input")
    if x.ndim != 4:
        raise ValueError(f"resize: expected [N, H, W, C], got shape {x.shape}.")
    h_out, w_out = (int(s) for s in size)
    rh = _resize_matrix(h_out, x.shape[1], method, x.dtype)
    rw = _resize_matrix(w_out, x.shape[2], method, x.dtype)
    mean = jnp.einsum("ph,nhwc,qw->npqc", rh, x.mean, rw)
    if point:
        return Gaussian(mean, jnp.zeros_like(mean))
    var = jnp.einsum("ph,nhwc,qw->npqc", rh * rh, x.var, rw * rw)
    return Gaussian(mean, var)


def bernoulli_dropout(x: Gaussian | Array, rate: float) -> Gaussian:
    """Inverted dropout with the Bernoulli mask marginalised out.

    ``y = x b / (1 - p)`` with ``b ~ Bernoulli(1 - p)`` independent of ``x``
    (the chain-graph paper's auxiliary Bernoulli node, Sec. 4.3):
    ``E[y] = m`` and ``Var[y] = (m^2 + P) / (1 - p) - m^2`` (exact; the output
    is not Gaussian, only its first two moments are kept).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    x = as_gaussian(x, "dropout input")
    if rate == 0.0:
        return x
    # (m^2 + P) / (1 - p) - m^2, written without the cancellation
    var = (rate * x.mean * x.mean + x.var) / (1.0 - rate)
    return Gaussian(x.mean, var)
