"""Pooling moment rules (channels-last: ``[N, *spatial, C]``).

Independence assumption: the inputs inside one pooling window are treated as
independent.  Neighbouring activations of a real network are positively
correlated, so the averaged variance ``sum P / k^2`` under-estimates the true
variance of an average (it is exact for independent inputs).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.moments._backward import check_backward

Array = jax.Array

__all__ = ["avg_pool", "global_avg_pool", "max_pool"]


def _spatial_args(x: Gaussian, window, strides, where: str):
    nsp = x.ndim - 2
    if nsp < 1:
        raise ValueError(f"{where}: expected [N, *spatial, C], got shape {x.shape}.")
    window = (window,) * nsp if isinstance(window, int) else tuple(window)
    if strides is None:
        strides = window
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    if len(window) != nsp or len(strides) != nsp:
        raise ValueError(
            f"{where}: window {window} / strides {strides} need {nsp} entries for"
            f" input {x.shape}."
        )
    return nsp, window, strides


def _pads(shape_sp, window, strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(shape_sp, window, strides, padding))
    return tuple(tuple(int(a) for a in p) for p in padding)


def avg_pool(
    x: Gaussian | Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    *,
    count_include_pad: bool = True,
    backward: str = "bp",
) -> Gaussian:
    """Average pooling: ``mean = avg(m)``, ``var = sum(P) / k^2`` per window.

    Linear, so the BP rule is the exact transpose and equals autodiff;
    ``backward`` is accepted for a uniform interface.  With
    ``count_include_pad=False`` and padding, ``k`` is the number of real inputs.
    """
    check_backward(backward, "avg_pool")
    x = as_gaussian(x, "avg_pool input")
    nsp, window, strides = _spatial_args(x, window, strides, "avg_pool")
    pads = _pads(x.shape[1:-1], window, strides, padding)
    dims = (1, *window, 1)
    strd = (1, *strides, 1)
    full_pads = ((0, 0), *pads, (0, 0))

    def wsum(a):
        return lax.reduce_window(
            a, np.zeros((), a.dtype), lax.add, dims, strd, full_pads
        )

    if count_include_pad:
        k = 1
        for w in window:
            k *= w
        count = jnp.asarray(k, x.dtype)
    else:
        ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
        count = wsum(ones)
    return Gaussian(wsum(x.mean) / count, wsum(x.var) / (count * count))


def global_avg_pool(
    x: Gaussian | Array, *, keepdims: bool = False, backward: str = "bp"
) -> Gaussian:
    """Mean over all spatial axes of ``[N, *spatial, C]``: var = sum(P) / n^2."""
    check_backward(backward, "global_avg_pool")
    x = as_gaussian(x, "global_avg_pool input")
    if x.ndim < 3:
        raise ValueError(f"global_avg_pool: expected [N, *spatial, C], got {x.shape}.")
    axes = tuple(range(1, x.ndim - 1))
    n = 1
    for a in axes:
        n *= x.shape[a]
    mean = jnp.mean(x.mean, axis=axes, keepdims=keepdims)
    var = jnp.sum(x.var, axis=axes, keepdims=keepdims) / (n * n)
    return Gaussian(mean, var)


# --------------------------------------------------------------------------
# max pooling
# --------------------------------------------------------------------------
def _patches(a: Array, window, strides, pads, pad_value) -> Array:
    """Stack the k = prod(window) window taps on a new last axis: [N, *out, C, k]."""
    a = jnp.pad(a, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
    nsp = len(window)
    sp = a.shape[1:-1]
    out = [(sp[i] - window[i]) // strides[i] + 1 for i in range(nsp)]
    taps = []
    for offs in itertools.product(*[range(w) for w in window]):
        idx = [slice(None)]
        for i in range(nsp):
            start = offs[i]
            idx.append(slice(start, start + (out[i] - 1) * strides[i] + 1, strides[i]))
        idx.append(slice(None))
        taps.append(a[tuple(idx)])
    return jnp.stack(taps, axis=-1)


def _window_max(mp: Array, Pp: Array, temperature):
    """Per-window moments on ``[..., k]`` taps; returns mean, var, one-hot, w^2."""
    mean = jnp.max(mp, axis=-1)
    tiny = jnp.finfo(mp.dtype).tiny
    if temperature is None:
        # clip before the sqrt so that autodiff never sees d sqrt(0) = inf
        tau = jnp.sqrt(jnp.maximum(jnp.mean(Pp, axis=-1, keepdims=True), tiny))
    else:
        tau = jnp.asarray(temperature, mp.dtype)
    # Finite pads (-inf for the mean) must not produce NaN in the softmax.
    z = jnp.where(jnp.isfinite(mp), mp, jnp.finfo(mp.dtype).min) / tau
    w = jax.nn.softmax(z, axis=-1)
    w2 = w * w
    var = jnp.sum(w2 * Pp, axis=-1)
    onehot = jax.nn.one_hot(jnp.argmax(mp, axis=-1), mp.shape[-1], dtype=mp.dtype)
    return mean, var, onehot, w2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _window_max_bp(temperature, mp, Pp):
    mean, var, _, _ = _window_max(mp, Pp, temperature)
    return mean, var


def _window_max_bp_fwd(temperature, mp, Pp):
    mean, var, onehot, w2 = _window_max(mp, Pp, temperature)
    return (mean, var), (onehot, w2)


def _window_max_bp_bwd(temperature, res, cot):
    onehot, w2 = res
    g_mean, g_var = cot
    return onehot * g_mean[..., None], w2 * g_var[..., None]


_window_max_bp.defvjp(_window_max_bp_fwd, _window_max_bp_bwd)


def max_pool(
    x: Gaussian | Array,
    window: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    *,
    temperature: float | None = None,
    backward: str = "bp",
) -> Gaussian:
    """Max pooling with a smooth (log-sum-exp) max for the variance.

    ``mean = max_i m_i`` (the network's max of the means, Algorithm 1).  The
    variance is that of the first-order expansion of the smooth maximum
    ``tau * logsumexp(x / tau)`` at the means, whose gradient is
    ``w = softmax(m / tau)``: ``var = sum_i w_i^2 P_i`` (Duality of
    information flow, Sec. 3.3 "smooth max (log-sum-exp) within max-pooling").
    ``tau`` defaults to the RMS input std in the window, so near-ties within
    the uncertainty share the variance; ``tau -> 0`` gives the variance of the
    arg-max input, ``tau -> inf`` that of the average.  Inputs in a window are
    treated as independent.

    Backward ``"bp"``: the mean sensitivity goes to the arg-max (ties: first),
    the variance sensitivity is spread with ``w^2``; the dependence of ``w``
    on the means is dropped.  ``"autodiff"`` differentiates everything.
    """
    check_backward(backward, "max_pool")
    x = as_gaussian(x, "max_pool input")
    nsp, window, strides = _spatial_args(x, window, strides, "max_pool")
    pads = _pads(x.shape[1:-1], window, strides, padding)
    mp = _patches(x.mean, window, strides, pads, -jnp.inf)
    Pp = _patches(x.var, window, strides, pads, 0.0)
    if temperature is not None and temperature <= 0:
        raise ValueError(f"max_pool: temperature must be > 0, got {temperature}.")
    if backward == "autodiff":
        mean, var, _, _ = _window_max(mp, Pp, temperature)
    else:
        mean, var = _window_max_bp(temperature, mp, Pp)
    return Gaussian(mean, var)
