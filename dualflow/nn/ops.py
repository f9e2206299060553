"""Method-agnostic tensor ops for model code: one call, every learning method.

Model definitions combine branches with these instead of ``+`` /
``jnp.concatenate``: under ``bp`` they map :class:`~dualflow.Gaussian` beliefs
with :mod:`dualflow.moments` (and state their independence assumptions
there); under every other method they are the plain array ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dualflow import moments
from dualflow.nn.context import Context

__all__ = ["add", "concatenate", "multiply", "resize", "scale", "transpose"]


def _bp(ctx: Context) -> bool:
    return ctx.name == "bp"


def add(ctx: Context, *xs):
    """Sum (residual connections). ``bp``: branches treated as independent."""
    if _bp(ctx):
        return moments.add(*xs)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def concatenate(ctx: Context, xs: Sequence, axis: int = -1):
    """Concatenate (DenseNet). ``bp``: new features independent of old ones."""
    if _bp(ctx):
        return moments.concatenate(xs, axis=axis)
    return jnp.concatenate(list(xs), axis=axis)


def multiply(ctx: Context, x, y):
    """Element-wise product (squeeze-excitation). ``bp``: factors independent."""
    if _bp(ctx):
        return moments.multiply(x, y, backward=ctx.method.backward)
    return x * y


def scale(ctx: Context, x, c):
    """``c * x`` for a deterministic ``c`` (e.g. a learned residual gain)."""
    if _bp(ctx):
        return moments.scale(x, c)
    return jnp.asarray(c, x.dtype) * x


def transpose(ctx: Context, x, axes: Sequence[int]):
    """Permute axes (exact under ``bp``)."""
    if _bp(ctx):
        return moments.transpose(x, axes)
    return jnp.transpose(x, tuple(axes))


def resize(ctx: Context, x, size: Sequence[int], method: str = "bilinear"):
    """Resize ``[N, H, W, C]`` spatially to ``size`` (linear interpolation)."""
    if _bp(ctx):
        return moments.resize(x, size, method)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    shape = (x.shape[0], *(int(s) for s in size), x.shape[-1])
    return jax.image.resize(x, shape, method=method)
