"""Convolution as im2col (shifted slices + one matmul), opt-in on the CPU backend.

../shared/TOOLCHAIN.md reported XLA's CPU ``conv_general_dilated`` weight
gradient at ~10x its forward and an im2col formulation 3-4x faster.  This
module implements that formulation -- pad, take one strided slice of the input
per kernel tap, stack them into patches ``[N, *out_spatial, taps * C_in]`` and
contract with the kernel reshaped to ``[taps * C_in, C_out]`` -- so the
forward, the input gradient and the weight gradient become matmuls plus data
movement.  It is the same sum of products as the convolution (only the
summation order differs), so it agrees with ``lax.conv_general_dilated`` to
rounding.  Re-measured for issue 22 (docs/benchmarks.md) it is *slower* on the
CI VM with jax 0.10.2, so it is not the default.

:func:`conv_general_dilated` chooses, at trace time:

* ``"lax"``: ``lax.conv_general_dilated`` (the default on GPUs/TPUs);
* ``"im2col"``: the patch matmul, where supported (1-D and 2-D spatial,
  any strides, padding ``SAME``/``VALID``/``SAME_LOWER``/explicit, kernel
  dilation, any ``dimension_numbers``, ``feature_group_count == 1``); other
  configurations (input dilation, 3-D, groups unless forced) use ``lax``;
* ``"auto"`` (default): ``"lax"`` on GPUs/TPUs; on the CPU backend
  ``"im2col"`` if :data:`AUTO_IM2COL_ON_CPU`, which is ``False``: measured on
  the 2-core CI VM with jax/jaxlib 0.10.2, XLA's CPU convolution beat the
  patch matmul for float32 -- the ResNet-20 BP train step took 2.5-2.9x
  longer with im2col, the deterministic one 1.6-2.0x; the lax weight gradient
  was 2.4-3.4x its forward, not 10x -- and building the patches (a
  strided-slice concatenation, 9x the input) alone cost more than the whole
  lax forward.  So ``auto`` means ``lax`` everywhere for now.

Override with the environment variable ``DUALFLOW_CONV_IMPL`` (read at trace
time) or :func:`set_conv_impl` / :func:`using_conv_impl` (take precedence over
the variable).  Functions already compiled keep the choice they were traced
with (``jax.clear_caches()`` or a fresh ``jax.jit`` retraces).
``"im2col_groups"`` also uses the patch matmul for ``feature_group_count > 1``
(a batched matmul over groups; measured no faster than lax for a depthwise
conv on CPU, hence not part of ``"im2col"``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = [
    "AUTO_IM2COL_ON_CPU",
    "CONV_IMPLS",
    "ENV_VAR",
    "conv_general_dilated",
    "conv_impl",
    "im2col_conv",
    "set_conv_impl",
    "using_conv_impl",
]

CONV_IMPLS = ("auto", "im2col", "lax", "im2col_groups")
ENV_VAR = "DUALFLOW_CONV_IMPL"
_IM2COL_MAX_SPATIAL = 2
#: whether ``"auto"`` uses im2col on the CPU backend (measured slower: no)
AUTO_IM2COL_ON_CPU = False
_setting: str | None = None


def _check_impl(impl: str, where: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"{where}: conv impl {impl!r} is not one of {CONV_IMPLS}.")
    return impl


def set_conv_impl(impl: str | None) -> None:
    """Set the conv implementation (one of :data:`CONV_IMPLS`; ``None``: back
    to ``$DUALFLOW_CONV_IMPL`` or ``"auto"``) for functions traced from now."""
    global _setting
    _setting = None if impl is None else _check_impl(impl, "set_conv_impl")


@contextlib.contextmanager
def using_conv_impl(impl: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_conv_impl` (restores the old setting)."""
    old = _setting
    set_conv_impl(impl)
    try:
        yield
    finally:
        set_conv_impl(old)


def conv_impl() -> str:
    """The requested implementation: the module setting, else the environment
    variable, else ``"auto"``."""
    if _setting is not None:
        return _setting
    return _check_impl(os.environ.get(ENV_VAR, "auto").strip().lower(), ENV_VAR)


def _im2col_applies(
    nsp: int, lhs_dilation: Sequence[int] | None, feature_group_count: int
) -> bool:
    """Whether the (resolved) setting sends this configuration to im2col."""
    impl = conv_impl()
    if impl == "auto":
        impl = (
            "im2col" if AUTO_IM2COL_ON_CPU and jax.default_backend() == "cpu" else "lax"
        )
    if impl == "lax":
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    if feature_group_count != 1 and impl != "im2col_groups":
        return False
    return 1 <= nsp <= _IM2COL_MAX_SPATIAL


def _dimension_numbers(x: Array, w: Array, dn: Any) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(x.shape, w.shape, dn)


def conv_general_dilated(
    x: Array,
    w: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: lax.Precision | None = None,
    preferred_element_type: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` (same arguments and result), computed by
    :func:`im2col_conv` where the current setting says so (module doc).
    ``preferred_element_type`` (e.g. float32 for bfloat16 operands) reaches the
    lax conv or the im2col ``dot_general`` alike."""
    kw = dict(
        window_strides=tuple(window_strides),
        padding=padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if _im2col_applies(x.ndim - 2, lhs_dilation, feature_group_count):
        out = im2col_conv(x, w, **kw)
        if out is not None:
            return out
    return lax.conv_general_dilated(x, w, lhs_dilation=lhs_dilation, **kw)


def _pads(
    in_sp: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(in_sp, window, strides, padding)]
    return [(int(lo), int(hi)) for lo, hi in padding]


def _patches(
    x: Array, ks: Sequence[int], strides: Sequence[int], dil: Sequence[int], pads
) -> Array | None:
    """``x [N, *sp, C]`` -> patches ``[N, *out_sp, taps, C]`` (taps row-major
    over the kernel window, matching a ``[*ks, I, O]`` kernel); ``None`` if
    the output would be empty."""
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    span = [(k - 1) * d + 1 for k, d in zip(ks, dil, strict=True)]
    out = [
        (n - s) // st + 1
        for n, s, st in zip(xp.shape[1:-1], span, strides, strict=True)
    ]
    if min(out) <= 0:
        return None
    taps = []
    for tap in itertools.product(*(range(k) for k in ks)):
        start = [t * d for t, d in zip(tap, dil, strict=True)]
        limit = [
            a + (o - 1) * st + 1 for a, o, st in zip(start, out, strides, strict=True)
        ]
        taps.append(
            lax.slice(
                xp,
                (0, *start, 0),
                (xp.shape[0], *limit, xp.shape[-1]),
                (1, *strides, 1),
            )
        )
    return jnp.stack(taps, axis=-2)


def im2col_conv(
    x: Array,
    w: Array,
    *,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: lax.Precision | None = None,
    preferred_element_type: Any = None,
) -> Array | None:
    """Convolution by patches + ``dot_general`` (no input dilation).

    ``x`` and ``w`` are laid out as ``dimension_numbers`` says (default
    ``NC*``/``OI*``, as in lax); internally ``x -> [N, *sp, C]`` and
    ``w -> [*window, C/G, O]``.  Returns the output in the requested layout,
    or ``None`` when the output is empty (callers fall back to lax).
    """
    dn = _dimension_numbers(x, w, dimension_numbers)
    xc = jnp.transpose(x, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    wc = jnp.transpose(w, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    nsp = x.ndim - 2
    ks = wc.shape[:nsp]
    dil = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    span = [(k - 1) * d + 1 for k, d in zip(ks, dil, strict=True)]
    pads = _pads(xc.shape[1:-1], span, window_strides, padding)
    pt = _patches(xc, ks, window_strides, dil, pads)
    if pt is None:
        return None
    out = _contract(pt, wc, feature_group_count, precision, preferred_element_type)
    perm = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    return jnp.transpose(out, tuple(np.argsort(perm)))


def _contract(
    pt: Array,
    wc: Array,
    groups: int,
    precision: lax.Precision | None,
    preferred_element_type: Any = None,
) -> Array:
    """patches ``[N, *o, T, C]`` x kernel ``[*window, C/G, O]`` -> ``[N, *o, O]``
    (accumulated in ``preferred_element_type`` when given)."""
    pet = dict(preferred_element_type=preferred_element_type)
    taps, cin, cout = math.prod(wc.shape[:-2]), wc.shape[-2], wc.shape[-1]
    lead = pt.shape[:-2]
    if groups == 1:
        lhs = pt.reshape(*lead, taps * cin)
        rhs = wc.reshape(taps * cin, cout)
        dims = (((lhs.ndim - 1,), (0,)), ((), ()))
        return lax.dot_general(lhs, rhs, dims, precision=precision, **pet)
    # groups: contract (tap, C/G) per group, batch over the group axis
    lhs = pt.reshape(*lead, taps, groups, cin)
    rhs = wc.reshape(taps, cin, groups, cout // groups)
    n = lhs.ndim
    dims = (((n - 3, n - 1), (0, 1)), ((n - 2,), (2,)))
    out = lax.dot_general(lhs, rhs, dims, precision=precision, **pet)  # [G,N,*o,O/G]
    out = jnp.moveaxis(out, 0, -2)
    return out.reshape(*lead, cout)
