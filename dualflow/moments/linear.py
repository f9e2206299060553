"""Moment rules for layers with mean-field Gaussian weights: dense and convolution.

For one output unit ``a = sum_i W_i x_i`` with independent ``W_i ~ N(mu_i, s2_i)``
and ``x_i ~ N(m_i, P_i)`` (independent of the weights and of each other):

    E[a]   = sum_i m_i mu_i
    Var[a] = sum_i (m_i^2 + P_i) s2_i + P_i mu_i^2

which is exact for the stated independence (Duality of information flow,
Algorithm 1 and Sec. 3.3: the variance is propagated "twice", once through
``mu^2`` and once through ``sigma^2``).  What is *not* represented is the
covariance between output units that share inputs: outputs are returned as
independent (diagonal) Gaussians.

Backward rules (``backward=``):

* ``"bp"`` (default): a `jax.custom_vjp` that keeps only ``(m, P)`` of the
  input (plus the weights) and applies the adjoint of the Gaussian-linear
  transition, including the dependence of the weight noise ``s2 * m^2`` on
  the incoming mean.  For these layers the map is exactly bilinear, so this
  equals reverse-mode autodiff (tested to float64 precision).
* ``"bp_fixed_noise"``: the literal App. A rule of the paper, which treats the
  process noise ``Q = s2 (m^2 + P)`` as a constant when propagating the input
  sensitivities: ``dJ/dm_in = mu^T dJ/dm_out`` and ``dJ/dP_in = (mu^2)^T dJ/dP_out``.
  Weight gradients are unchanged.  It is *not* the gradient of the forward;
  offered to reproduce the paper and to compare.
* ``"autodiff"``: plain reverse mode through the forward formulas.

Products: the two variance products are computed as one over a doubled
contraction axis, ``op([m^2, P], [s2; mu^2 + s2])`` (concatenated input
channels), for ungrouped convs, in the forward and in the BP backward; dense
keeps two products (on CPU the concatenated ``[2 d_in, d_out]`` weight operand
measured slower).  A plain-array input is a point known statically: its
variance is the single product ``op(x^2, s2)``.  Convolutions go through
:mod:`dualflow.moments._conv_cpu` (``lax.conv_general_dilated`` unless
``DUALFLOW_CONV_IMPL=im2col``).  Results equal the two-product formulas up to
summation order (tests/test_fused_variance.py).

Precision: ``precision=`` of :func:`dense` / :func:`conv` is a JAX
``lax.Precision`` name, or ``"bf16_compute"``: the operands of the mean and
variance products are cast to bfloat16 and the products accumulate in
float32 (``preferred_element_type``), on any backend; the BP backward (and
the derivative of the reduced product under autodiff) uses float32 operands.
``precision=None`` follows ``jax.default_matmul_precision`` and the compute
dtype of :func:`set_compute_dtype` (read at trace time); the trainer's
``config.precision`` enters :func:`precision_context`.  The float32 error of
each setting is measured in :mod:`dualflow.benchmarks.precision`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from dualflow.gaussian import Gaussian, _check_values, as_gaussian
from dualflow.moments._backward import check_backward
from dualflow.moments._conv_cpu import conv_general_dilated

Array = jax.Array

__all__ = [
    "COMPUTE_PRECISIONS",
    "JAX_PRECISIONS",
    "PRECISIONS",
    "bilinear_moments",
    "canonical_precision",
    "compute_dtype",
    "conv",
    "dense",
    "precision_context",
    "product_settings",
    "set_compute_dtype",
    "using_compute_dtype",
]


# --------------------------------------------------------------------------
# bilinear core shared by dense and conv
# --------------------------------------------------------------------------
# Switches read at trace time (benchmarks toggle them): the two variance
# products as one over a doubled contraction axis -- on for conv (ResNet-20
# BP step ~9 % faster on CPU), off for dense, where concatenating the
# [2 d_in, d_out] weight operand cost more than it saved (MLP BP step ~8 %
# slower; docs/benchmarks.md, issue 22) -- and no variance product for
# statically known point inputs.
_FUSE_CONV_VARIANCE = True
_FUSE_DENSE_VARIANCE = False
_SKIP_POINT_VARIANCE = True


def _concat_axes(op, x: Array, w: Array) -> tuple[int, int] | None:
    """The axes of ``x`` and ``w`` that ``op`` contracts (where concatenating
    both along them sums two products), or ``None`` when ``op`` does not fuse
    (no ``contraction_axes`` method, or it returns ``None``)."""
    axes = getattr(op, "contraction_axes", None)
    return axes(x, w) if axes is not None else None


def _variance_operands(op, m: Array, P: Array, mu: Array, s2: Array):
    """``[(lhs, rhs), ...]`` whose products sum to ``op(m^2, s2) + op(P, mu^2 + s2)``:
    one concatenated pair when ``op`` allows, else the two pairs."""
    pairs = [(m * m, s2), (P, mu * mu + s2)]
    ax = _concat_axes(op, m, mu)
    if ax is None:
        return pairs, None
    lhs = jnp.concatenate([pairs[0][0], pairs[1][0]], ax[0])
    rhs = jnp.concatenate([pairs[0][1], pairs[1][1]], ax[1])
    return [(lhs, rhs)], ax


def _forward(op, m: Array, P: Array | None, mu: Array, s2: Array):
    """``(op(m, mu), op(m^2, s2) + op(P, mu^2 + s2))``; ``P is None``: a point
    input, whose variance is ``op(m^2, s2)`` alone."""
    if P is None:
        return op(m, mu), op(m * m, s2)
    pairs, _ = _variance_operands(op, m, P, mu, s2)
    var = op(*pairs[0])
    for lhs, rhs in pairs[1:]:
        var = var + op(lhs, rhs)
    return op(m, mu), var


def _variance_vjp(op, m: Array, P: Array | None, mu: Array, s2: Array, g: Array):
    """Cotangents of the variance w.r.t. its product operands:
    ``(d m^2, d P, d s2 [through m^2], d (mu^2 + s2))``; the P terms are
    ``None`` for a point input."""
    if P is None:
        d_mm, d_s2 = jax.vjp(op, m * m, s2)[1](g)
        return d_mm, None, d_s2, None
    pairs, ax = _variance_operands(op, m, P, mu, s2)
    if ax is None:
        (d_mm, d_s2), (d_P, d_mu2s2) = (jax.vjp(op, *pr)[1](g) for pr in pairs)
        return d_mm, d_P, d_s2, d_mu2s2
    d_lhs, d_rhs = jax.vjp(op, *pairs[0])[1](g)
    d_mm, d_P = jnp.split(d_lhs, [m.shape[ax[0]]], ax[0])
    d_s2, d_mu2s2 = jnp.split(d_rhs, [mu.shape[ax[1]]], ax[1])
    return d_mm, d_P, d_s2, d_mu2s2


def _float32_op(op):
    """``op`` with full-width operands (``op.full_width()`` where defined): the
    BP backward's products never use a reduced compute dtype."""
    full = getattr(op, "full_width", None)
    return full() if full is not None else op


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bilinear_bp(op, fixed_noise: bool, m, P, mu, s2):
    return _forward(op, m, P, mu, s2)


def _bilinear_bp_fwd(op, fixed_noise, m, P, mu, s2):
    # Residuals: the filtered input moments and the weight moments only.
    return _forward(op, m, P, mu, s2), (m, P, mu, s2)


def _bilinear_bp_bwd(op, fixed_noise, res, cot):
    op = _float32_op(op)  # gradients in the operands' own dtype (float32)
    m, P, mu, s2 = res
    g_mean, g_var = cot
    # op is bilinear, so each vjp is a pair of transposed linear maps.
    _, vjp_mean = jax.vjp(op, m, mu)
    lhs_mean, rhs_mean = vjp_mean(g_mean)  # mu^T g_mean, m^T g_mean
    # cotangents of the variance w.r.t. m^2, P, s2 and mu^2 + s2
    lhs_mvar, lhs_pvar, rhs_mvar, rhs_pvar = _variance_vjp(op, m, P, mu, s2, g_var)
    g_mu, g_s2, g_P = rhs_mean, rhs_mvar, None
    if P is not None:
        g_mu = g_mu + 2.0 * mu * rhs_pvar
        g_s2 = g_s2 + rhs_pvar
        g_P = lhs_pvar
    if fixed_noise:
        # Paper App. A: process noise s2*(m^2+P) held fixed w.r.t. the input.
        if P is not None:
            _, vjp_mu2 = jax.vjp(lambda a: op(a, mu * mu), P)
            (g_P,) = vjp_mu2(g_var)
        return lhs_mean, g_P, g_mu, g_s2
    return lhs_mean + 2.0 * m * lhs_mvar, g_P, g_mu, g_s2


_bilinear_bp.defvjp(_bilinear_bp_fwd, _bilinear_bp_bwd)


def check_weights(
    where: str,
    w_mean: Any,
    w_var: Any,
    b_mean: Any = None,
    b_var: Any = None,
) -> None:
    """Value checks of weight (and bias) moments: variances finite and ``>= 0``,
    means finite.

    Host-resident (NumPy) variances are always checked (``ValueError``, no
    device work); everything else only with debug checks on
    (``FloatingPointError``; under ``jit`` through ``jax.debug.callback``).
    With debug checks off nothing is added to a traced program.
    """
    items = [(f"{where} w_mean", w_mean, "mean"), (f"{where} w_var", w_var, "var")]
    if b_mean is not None:
        items.append((f"{where} b_mean", b_mean, "mean"))
    if b_var is not None:
        items.append((f"{where} b_var", b_var, "var"))
    _check_values(items, where, host_always=True)


def bilinear_moments(
    op,
    x: Gaussian | Array,
    w_mean: Array,
    w_var: Array,
    *,
    backward: str = "bp",
    where: str | None = "bilinear_moments",
) -> Gaussian:
    """Moments of ``op(x, W)`` for any op bilinear in ``(x, W)`` (matmul, conv, einsum).

    ``op`` must be a hashable callable (a module-level function or a frozen
    dataclass) because it is a static argument of the custom VJP.  ``w_var``
    must be ``>= 0`` (see :func:`check_weights`, run under the name ``where``;
    ``None`` skips it when the caller has checked).  A plain array ``x`` is a
    point (variance 0, known statically): its output variance is the single
    product ``op(x^2, w_var)``.  An ``op`` with a method
    ``contraction_axes(x, w) -> (x_axis, w_axis) | None`` has its two variance
    products computed as one over the concatenated contraction axis.
    """
    check_backward(backward, "bilinear_moments")
    if where is not None:
        check_weights(where, w_mean, w_var)
    if isinstance(x, Gaussian):
        m, P = x.mean, x.var
    else:
        m = as_gaussian(x, "bilinear_moments input").mean
        P = None if _SKIP_POINT_VARIANCE else jnp.zeros_like(m)
    mu = jnp.asarray(w_mean, m.dtype)
    s2 = jnp.asarray(w_var, m.dtype)
    if backward == "autodiff":
        mean, var = _forward(op, m, P, mu, s2)
    else:
        mean, var = _bilinear_bp(op, backward == "bp_fixed_noise", m, P, mu, s2)
    return Gaussian(mean, var)


def _add_bias(y: Gaussian, b_mean, b_var) -> Gaussian:
    mean, var = y.mean, y.var
    if b_mean is not None:
        mean = mean + jnp.asarray(b_mean, mean.dtype)
    if b_var is not None:
        var = var + jnp.asarray(b_var, var.dtype)
    return Gaussian(mean, var)


# --------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------
#: JAX's names for ``lax.Precision`` (``jax.default_matmul_precision`` takes them)
JAX_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
#: dualflow's reduced compute dtypes: operands cast, float32 accumulation
COMPUTE_PRECISIONS: dict[str, str] = {"bf16_compute": "bfloat16"}
#: every accepted precision name (``config.precision`` included)
PRECISIONS = (*JAX_PRECISIONS, *COMPUTE_PRECISIONS)

# Compute dtype of the moment products of layers called with precision=None,
# read at trace time (like the conv implementation in _conv_cpu): None keeps
# the operands' dtype.  Set through using_compute_dtype / precision_context.
_compute_setting: str | None = None


def _check_compute_dtype(dtype: Any, where: str) -> str | None:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name
    if name != "bfloat16":
        raise ValueError(
            f"{where}: compute dtype must be bfloat16 or None, got {name}."
        )
    return name


def set_compute_dtype(dtype: Any) -> None:
    """Cast the operands of the moment products of layers traced from now (with
    ``precision=None``) to ``dtype`` (``"bfloat16"``; ``None``: off), with the
    products accumulated in the operands' original dtype.  Functions already
    compiled keep the setting they were traced with."""
    global _compute_setting
    _compute_setting = _check_compute_dtype(dtype, "set_compute_dtype")


def compute_dtype() -> str | None:
    """The current compute dtype of :func:`set_compute_dtype` (``None``: off)."""
    return _compute_setting


@contextlib.contextmanager
def using_compute_dtype(dtype: Any) -> Iterator[None]:
    """Context manager form of :func:`set_compute_dtype` (restores the old one)."""
    old = _compute_setting
    set_compute_dtype(dtype)
    try:
        yield
    finally:
        set_compute_dtype(old)


def precision_context(precision: str | None) -> contextlib.AbstractContextManager:
    """The context a run with ``config.precision = precision`` traces under.

    ``""``/``None``: nothing (JAX's default); a JAX name:
    ``jax.default_matmul_precision(precision)``; ``"bf16_compute"``:
    :func:`using_compute_dtype` ``("bfloat16")`` -- bfloat16 operands and
    float32 accumulation in the moment products of dense and conv layers
    (other products, e.g. a deterministic network's, are unaffected).
    """
    if not precision:
        return contextlib.nullcontext()
    if isinstance(precision, str) and precision.lower() in COMPUTE_PRECISIONS:
        return using_compute_dtype(COMPUTE_PRECISIONS[precision.lower()])
    if isinstance(precision, str) and precision.lower() in JAX_PRECISIONS:
        return jax.default_matmul_precision(precision.lower())
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")


def canonical_precision(
    precision: str | lax.Precision | None, where: str = "precision"
) -> lax.Precision | None:
    """``None`` (JAX's default) or a ``lax.Precision`` for the moment products.

    ``None`` follows ``jax.default_matmul_precision`` (on GPUs and TPUs that
    allows the fast TF32 / bf16 tensor-core paths for float32 operands; CPUs
    compute float32 products exactly either way).  Strings are JAX's names:
    ``"highest"``/``"float32"``, ``"high"``/``"tensorfloat32"``,
    ``"default"``/``"bfloat16"``.  float64 products are exact at any setting.
    ``"bf16_compute"`` is no ``lax.Precision``: see :func:`product_settings`.
    """
    if precision is None or isinstance(precision, lax.Precision):
        return precision
    if isinstance(precision, str) and precision.lower() in JAX_PRECISIONS:
        return lax.Precision(precision.lower())
    raise ValueError(
        f"{where}: precision {precision!r} is not None, a jax.lax.Precision or one"
        f" of {', '.join(JAX_PRECISIONS)}"
        + (
            " (bf16_compute sets a compute dtype; see product_settings)."
            if isinstance(precision, str) and precision.lower() in COMPUTE_PRECISIONS
            else "."
        )
    )


def product_settings(
    precision: str | lax.Precision | None, where: str = "precision"
) -> tuple[lax.Precision | None, str | None]:
    """``(lax precision, compute dtype)`` of the moment products of a layer.

    ``"bf16_compute"``: ``(None, "bfloat16")`` -- operands cast to bfloat16,
    products accumulated (``preferred_element_type``) in the operands' dtype;
    ``None``: JAX's default precision and the compute dtype of
    :func:`set_compute_dtype`; anything else: :func:`canonical_precision`,
    full-width operands.
    """
    if isinstance(precision, str) and precision.lower() in COMPUTE_PRECISIONS:
        return None, COMPUTE_PRECISIONS[precision.lower()]
    if precision is None:
        return None, _compute_setting
    if isinstance(precision, str) and precision.lower() not in JAX_PRECISIONS:
        raise ValueError(
            f"{where}: precision {precision!r} is not None, a jax.lax.Precision or"
            f" one of {', '.join(PRECISIONS)}."
        )
    return canonical_precision(precision, where), None


def _cast_operands(x: Array, w: Array, dtype: str) -> tuple[Array, Array, Any]:
    """``(x, w)`` cast to ``dtype`` and the dtype to accumulate in (theirs)."""
    acc = jnp.result_type(x, w)
    return x.astype(dtype), w.astype(dtype), acc


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _reduced_product(op, x: Array, w: Array) -> Array:
    """``op(x, w)`` with operands cast to ``op.compute_dtype`` (``op._reduced``);
    its derivative is that of the full-width product (``op.full_width()``):
    gradients are computed from, and in, the operands' own dtype."""
    return op._reduced(x, w)


@_reduced_product.defjvp
def _reduced_product_jvp(op, primals, tangents):
    x, w = primals
    dx, dw = tangents
    full = op.full_width()
    return _reduced_product(op, x, w), full(dx, w) + full(x, dw)


@dataclasses.dataclass(frozen=True)
class _Matmul:
    """Hashable ``jnp.matmul`` at a fixed precision (a static BP-rule argument);
    ``compute_dtype="bfloat16"``: operands cast, accumulation in their dtype."""

    precision: lax.Precision | None = None
    compute_dtype: str | None = None

    def __call__(self, x, w):
        if self.compute_dtype is not None:
            return _reduced_product(self, x, w)
        return jnp.matmul(x, w, precision=self.precision)

    def _reduced(self, x, w):
        x, w, acc = _cast_operands(x, w, self.compute_dtype)
        return jnp.matmul(x, w, precision=self.precision, preferred_element_type=acc)

    def full_width(self) -> _Matmul:
        """This op without the compute dtype."""
        return dataclasses.replace(self, compute_dtype=None)

    def contraction_axes(self, x: Array, w: Array) -> tuple[int, int] | None:
        """``x [..., K] @ w [..., K, N]`` contracts ``x``'s last and ``w``'s
        second-to-last axis (``None``: fusion off, see ``_FUSE_DENSE_VARIANCE``)."""
        if not _FUSE_DENSE_VARIANCE or w.ndim < 2:
            return None
        return x.ndim - 1, w.ndim - 2


_matmul = _Matmul()  # JAX's default precision


def dense(
    x: Gaussian | Array,
    w_mean: Array,
    w_var: Array,
    b_mean: Array | None = None,
    b_var: Array | None = None,
    *,
    backward: str = "bp",
    precision: str | lax.Precision | None = None,
) -> Gaussian:
    """Dense layer with mean-field Gaussian weights.

    Args:
      x: input `Gaussian` (or array, treated as a point) of shape ``[..., d_in]``.
      w_mean, w_var: weight means and variances ``[d_in, d_out]`` (``w_var >= 0``;
        keep a trained variance positive by construction, e.g. ``exp(logvar)``).
      b_mean, b_var: optional bias moments ``[d_out]``.
      backward: ``"bp"``, ``"bp_fixed_noise"`` or ``"autodiff"`` (module doc).
      precision: of the products (see :func:`canonical_precision`);
        ``None`` follows ``jax.default_matmul_precision`` and the compute dtype
        of :func:`set_compute_dtype`; ``"bf16_compute"``: bfloat16 operands,
        float32 accumulation, float32 gradients (:func:`product_settings`).

    Returns:
      `Gaussian` ``[..., d_out]`` with ``mean = x̂ mu + b`` and
      ``var = (x̂^2 + P) s2 + P mu^2 + s2_b``; exact for independent inputs and
      weights, output covariances dropped.
    """
    point = not isinstance(x, Gaussian)  # a statically known point: var 0
    x = as_gaussian(x, "dense input")
    w_mean = jnp.asarray(w_mean)
    if w_mean.ndim != 2 or jnp.shape(w_var) != w_mean.shape:
        raise ValueError(
            f"dense: w_mean {w_mean.shape} and w_var {jnp.shape(w_var)} must both be"
            " [d_in, d_out]."
        )
    if x.shape[-1:] != w_mean.shape[:1]:
        raise ValueError(
            f"dense: input feature size {x.shape[-1:]} does not match w_mean"
            f" {w_mean.shape} (expected [..., {w_mean.shape[0]}])."
        )
    check_weights("dense", w_mean, w_var, b_mean, b_var)
    prec, cdt = product_settings(precision, "dense")
    op = _Matmul(prec, cdt)
    xin = x.mean if point else x
    y = bilinear_moments(op, xin, w_mean, w_var, backward=backward, where=None)
    return _add_bias(y, b_mean, b_var)


# --------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ConvOp:
    """Hashable ``lax.conv_general_dilated`` with fixed static settings."""

    window_strides: tuple[int, ...]
    padding: Any  # str or tuple of (lo, hi) pairs
    lhs_dilation: tuple[int, ...] | None
    rhs_dilation: tuple[int, ...] | None
    dimension_numbers: Any
    feature_group_count: int
    precision: lax.Precision | None = None
    compute_dtype: str | None = None

    def __call__(self, x, w):
        if self.compute_dtype is not None:
            return _reduced_product(self, x, w)
        return self._conv(x, w, None)

    def _conv(self, x, w, preferred_element_type):
        return conv_general_dilated(
            x,
            w,
            window_strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dimension_numbers,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
            preferred_element_type=preferred_element_type,
        )

    def _reduced(self, x, w):
        x, w, acc = _cast_operands(x, w, self.compute_dtype)
        return self._conv(x, w, acc)

    def full_width(self) -> _ConvOp:
        """This op without the compute dtype."""
        return dataclasses.replace(self, compute_dtype=None)

    def contraction_axes(self, x: Array, w: Array) -> tuple[int, int] | None:
        """The input-feature axes of ``x`` and ``w`` (ungrouped convs only;
        ``None``: no fusion, see ``_FUSE_CONV_VARIANCE``)."""
        if self.feature_group_count != 1 or not _FUSE_CONV_VARIANCE:
            return None
        dn = lax.conv_dimension_numbers(x.shape, w.shape, self.dimension_numbers)
        return dn.lhs_spec[1], dn.rhs_spec[1]


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"conv: {name} must have {n} entries, got {v}.")
    return v


def conv(
    x: Gaussian | Array,
    w_mean: Array,
    w_var: Array,
    b_mean: Array | None = None,
    b_var: Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    input_dilation: int | Sequence[int] | None = None,
    kernel_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    dimension_numbers: Any = None,
    backward: str = "bp",
    precision: str | lax.Precision | None = None,
) -> Gaussian:
    """N-D convolution with mean-field Gaussian kernels (channels-last by default).

    Args:
      x: `Gaussian` (or array) ``[N, *spatial, C_in]`` (``NHWC``-style) unless
        ``dimension_numbers`` says otherwise.
      w_mean, w_var: kernel moments ``[*window, C_in / groups, C_out]`` (``HWIO``).
      b_mean, b_var: optional ``[C_out]``.
      strides, padding, input_dilation, kernel_dilation, feature_group_count,
      dimension_numbers: as in ``lax.conv_general_dilated``.
      backward: see module doc.
      precision: of the products, as in :func:`dense`.

    Returns:
      `Gaussian` output; same rule as :func:`dense` applied per receptive field
      (each output pixel is independent given the stated assumptions; zero
      padding is a point at 0).
    """
    point = not isinstance(x, Gaussian)  # a statically known point: var 0
    x = as_gaussian(x, "conv input")
    w_mean = jnp.asarray(w_mean)
    if jnp.shape(w_var) != w_mean.shape:
        raise ValueError(f"conv: w_var {jnp.shape(w_var)} != w_mean {w_mean.shape}.")
    nsp = x.ndim - 2
    if nsp < 1 or w_mean.ndim != x.ndim:
        raise ValueError(
            f"conv: input {x.shape} and kernel {w_mean.shape} need the same rank >= 3"
            " ([N, *spatial, C] and [*window, C_in/groups, C_out])."
        )
    if dimension_numbers is None:
        sp = "DHW"[-nsp:] if nsp <= 3 else None
        if sp is None:
            raise ValueError(
                "conv: pass dimension_numbers for more than 3 spatial dims."
            )
        dimension_numbers = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
        if x.shape[-1] != w_mean.shape[-2] * feature_group_count:
            raise ValueError(
                f"conv: input channels {x.shape[-1]} != kernel in-channels"
                f" {w_mean.shape[-2]} x feature_group_count {feature_group_count}."
            )
    if not isinstance(padding, str):
        padding = tuple(tuple(int(a) for a in p) for p in padding)
    prec, cdt = product_settings(precision, "conv")
    op = _ConvOp(
        window_strides=_tuple(strides, nsp, "strides"),
        padding=padding,
        lhs_dilation=None
        if input_dilation is None
        else _tuple(input_dilation, nsp, "input_dilation"),
        rhs_dilation=None
        if kernel_dilation is None
        else _tuple(kernel_dilation, nsp, "kernel_dilation"),
        dimension_numbers=dimension_numbers,
        feature_group_count=int(feature_group_count),
        precision=prec,
        compute_dtype=cdt,
    )
    check_weights("conv", w_mean, w_var, b_mean, b_var)
    xin = x.mean if point else x
    y = bilinear_moments(op, xin, w_mean, w_var, backward=backward, where=None)
    return _add_bias(y, b_mean, b_var)
