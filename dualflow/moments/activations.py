"""Element-wise activations mapping ``N(m, v)`` to a Gaussian, in two modes.

``mode="linearized"`` (Duality of information flow, Algorithm 1): first-order
Taylor expansion at the mean, ``mean = f(m)``, ``var = f'(m)^2 v``.  Exact only
for affine ``f``; it ignores curvature (e.g. ReLU's mean shift near 0).

``mode="matched"``: the exact Gaussian moments ``E[f(a)]``, ``Var[f(a)]`` for
``a ~ N(m, v)``.  Closed forms for relu, leaky_relu, erf, probit (Gaussian
CDF) and heaviside; for tanh, sigmoid, softplus, gelu and silu a 48-point
quadrature: Gauss-Hermite where the input is narrow relative to the nearest
complex singularity of ``f``, otherwise a sinh-mapped trapezoidal rule
(:func:`dualflow.moments._closed_forms.sinh_quadrature_moments`; measured
relative error <= 3e-7 in float64 for ``|m| <= 8``, ``std in [0.01, 30]``).
The output is then *projected* back onto a Gaussian (it is not Gaussian).

Backward rules (``backward=``):

* ``"bp"`` (default): belief-propagation rule of Algorithm 1 / Theorem 1(3).
  The activation is a Gaussian-linear transition ``x = c + J a + e`` with
  slope ``J`` (``f'(m)`` when linearized; the statistical-linearisation slope
  ``E[f'(a)] = Cov(f(a), a)/v`` when matched) and residual noise ``e`` held
  fixed.  Sensitivities propagate as
  ``dJ/dm_in = J * dJ/dm_out`` and ``dJ/dv_in = J^2 * dJ/dv_out``.
  Only ``J`` is saved for the backward pass.
  Where this differs from autodiff of the same forward:

  - linearized: autodiff adds ``2 f'(m) f''(m) v * dJ/dv_out`` to ``dJ/dm_in``
    (the dependence of the Jacobian on the mean); BP drops it.
  - matched: ``dJ/dm_in`` from the mean path is exact (Stein's lemma:
    ``d E[f(a)]/dm = E[f'(a)]``); BP drops ``dVar/dm * dJ/dv_out`` and
    ``dE/dv * dJ/dm_out`` and replaces ``dVar/dv`` by ``J^2``.

  The linearized differences, and matched ``dVar/dm`` and ``dVar/dv - J^2``,
  vanish as ``v -> 0`` (Theorem 2(3): BP degenerates into ordinary backprop
  of the mean network), and all are zero for the identity.  One term does
  not vanish: in matched mode ``dE/dv -> f''(m)/2`` (the second-order shift
  of the mean), so gradients w.r.t. *variances* (input variances, hence
  weight variances) differ from autodiff by ``f''(m)/2 * dJ/dm_out`` even as
  ``v -> 0``; gradients w.r.t. means converge
  (``tests/test_bp.py::test_matched_bp_variance_gradient_difference_is_the_curvature_term``).
  It is a ``jax.custom_vjp``, i.e. reverse mode only: ``jax.jvp`` or
  ``jax.jacfwd`` through it raise a ``TypeError`` that points to
  ``backward="autodiff"`` (``jax.linearize`` and forward-over-reverse
  ``jax.hessian`` do run).
* ``"autodiff"``: reverse mode through the forward formulas (forward mode
  works too).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf as _erf
from jax.scipy.special import ndtr

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.moments import _closed_forms as cf
from dualflow.moments._backward import check_backward

Array = jax.Array

MODES = ("linearized", "matched")

__all__ = [
    "ACTIVATIONS",
    "MODES",
    "activation",
    "erf",
    "gelu",
    "heaviside",
    "identity",
    "leaky_relu",
    "probit",
    "relu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
]

_SQRT_2PI_INV = 0.3989422804014327


def _phi(x):
    return _SQRT_2PI_INV * jnp.exp(-0.5 * x * x)


# f and f' of each activation (used by the linearized mode and by quadrature).
def _relu(x):
    return jnp.maximum(x, 0)


def _drelu(x):
    return (x > 0).astype(x.dtype)


# Saturating activations: JAX differentiates tanh as 1 - tanh(x)^2 and the
# logistic as sigma (1 - sigma), which cancel where f saturates (relative
# error ~eps e^{2|x|}: 2e-8 at |x| = 10, and exactly 0 instead of ~1e-17 at
# |x| = 20).  These custom_jvp versions keep the primal (jnp.tanh /
# jax.nn.sigmoid) and use sigma(x) sigma(-x) = e^{-|x|} / (1 + e^{-|x|})^2
# and 1 / cosh^2 = 4 sigma(2x) sigma(-2x): products of positive factors,
# full relative precision everywhere.  The rules call _sigmoid again, so
# derivatives of any order stay stable (autodiff of the matched quadrature,
# of the gain, and of the linearized variance).
@jax.custom_jvp
def _sigmoid(x: Array) -> Array:
    """Logistic ``1 / (1 + e^{-x})``, element-wise; ``sigma' = sigma(x) sigma(-x)``."""
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _sigmoid(x), _dsigmoid(x) * dx


def _dsigmoid(x: Array) -> Array:
    """``sigma'(x) = sigma(x) sigma(-x)``: no cancellation in ``1 - sigma(x)``."""
    return _sigmoid(x) * _sigmoid(-x)


@jax.custom_jvp
def _tanh(x: Array) -> Array:
    """``tanh``, element-wise; derivative ``1 / cosh^2`` in the stable form."""
    return jnp.tanh(x)


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _tanh(x), _dtanh(x) * dx


def _dtanh(x: Array) -> Array:
    """``1 / cosh^2(x) = 4 sigma(2x) sigma(-2x)``: finite, no cancellation."""
    return 4.0 * _sigmoid(2 * x) * _sigmoid(-2 * x)


def _softplus(x):
    return jax.nn.softplus(x)


def _gelu(x):  # exact GELU x * Phi(x)
    return x * ndtr(x)


def _dgelu(x):
    return ndtr(x) + x * _phi(x)


def _silu(x):
    return x * _sigmoid(x)


def _dsilu(x):
    return _sigmoid(x) * (1 + x * _sigmoid(-x))


def _derf(x):
    return 1.1283791670955126 * jnp.exp(-x * x)


def _heaviside(x):
    return (x > 0).astype(x.dtype)


def _zero(x):
    return jnp.zeros_like(x)


_FUNCS: dict[str, tuple[Callable, Callable]] = {
    "relu": (_relu, _drelu),
    "tanh": (_tanh, _dtanh),
    "sigmoid": (_sigmoid, _dsigmoid),
    "softplus": (_softplus, _sigmoid),
    "gelu": (_gelu, _dgelu),
    "silu": (_silu, _dsilu),
    "erf": (_erf, _derf),
    "probit": (ndtr, _phi),
    "heaviside": (_heaviside, _zero),
}
_CLOSED_FORM = {
    "relu": cf.relu_moments,
    "erf": cf.erf_moments,
    "probit": cf.probit_moments,
    "heaviside": cf.heaviside_moments,
}
ACTIVATIONS = ("identity", "leaky_relu", *_FUNCS)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """Hashable ``(m, v) -> (mean, var, gain)`` for one activation and mode."""

    name: str
    mode: str
    negative_slope: float = 0.01
    order: int = 48

    def __call__(self, m: Array, v: Array) -> tuple[Array, Array, Array]:
        """``(mean, var, gain)``, each of the shape and dtype of ``m``.

        Floats narrower than 32 bits (bfloat16, float16) are computed in
        float32 and rounded once at the end: ``jax.scipy.special.ndtr`` and
        friends reject bfloat16, and an 8-bit significand would not resolve
        the quadrature or the closed forms' cancellations anyway.
        """
        dtype = jnp.result_type(m, v)
        if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            out = self._moments(m.astype(jnp.float32), v.astype(jnp.float32))
            return tuple(o.astype(dtype) for o in out)
        return self._moments(m, v)

    def _moments(self, m: Array, v: Array) -> tuple[Array, Array, Array]:
        if self.name == "leaky_relu":
            a = self.negative_slope
            if self.mode == "matched":
                return cf.leaky_relu_moments(m, v, a)
            g = jnp.where(m > 0, 1.0, a).astype(m.dtype)
            return jnp.where(m > 0, m, a * m), g * g * v, g
        f, df = _FUNCS[self.name]
        if self.mode == "linearized":
            g = df(m)
            return f(m), g * g * v, g
        if self.name in _CLOSED_FORM:
            return _CLOSED_FORM[self.name](m, v)
        return cf.sinh_quadrature_moments(
            f, df, m, v, order=self.order, scale=cf.SINGULARITY_SCALE[self.name]
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _elementwise_bp(kernel: _Kernel, m: Array, v: Array):
    mean, var, _ = kernel(m, v)
    return mean, var


def _elementwise_bp_fwd(kernel, m, v):
    mean, var, gain = kernel(m, v)
    return (mean, var), gain  # the smoothing gain is all BP needs


def _elementwise_bp_bwd(kernel, gain, cot):
    g_mean, g_var = cot
    return gain * g_mean, gain * gain * g_var


_elementwise_bp.defvjp(_elementwise_bp_fwd, _elementwise_bp_bwd)


FORWARD_MODE_HINT = (
    'use backward="autodiff" for forward mode (jax.jvp, jax.jacfwd): it'
    " differentiates the same forward moments with ordinary JAX rules"
)


def is_forward_mode_error(err: BaseException) -> bool:
    """Whether ``err`` is JAX's refusal to apply forward mode to a ``custom_vjp``."""
    msg = str(err)
    return (
        isinstance(err, TypeError)
        and "custom_vjp" in msg
        and ("forward-mode" in msg or "jvp" in msg)
        and "backward=" not in msg  # not already explained by dualflow
    )


def forward_mode_error(where: str, backward: str, err: TypeError) -> TypeError:
    """A ``TypeError`` explaining why forward mode fails with the BP backward rule.

    The belief-propagation backward pass is a ``jax.custom_vjp`` (a reverse-mode
    rule only), and JAX cannot derive a JVP from a VJP.
    """
    return TypeError(
        f"{where}: forward-mode differentiation is not available with"
        f" backward={backward!r}: the belief-propagation backward rule is a"
        " jax.custom_vjp, which defines reverse mode only (jax.grad, jax.vjp,"
        f" jax.jacrev work); {FORWARD_MODE_HINT}.  (JAX: {err})"
    )


def _apply(kernel: _Kernel, x, backward: str) -> Gaussian:
    if kernel.mode not in MODES:
        raise ValueError(f"{kernel.name}: mode={kernel.mode!r} is not one of {MODES}.")
    check_backward(backward, kernel.name)
    x = as_gaussian(x, f"{kernel.name} input")
    if backward == "autodiff":
        mean, var, _ = kernel(x.mean, x.var)
    else:
        try:
            mean, var = _elementwise_bp(kernel, x.mean, x.var)
        except TypeError as e:
            if not is_forward_mode_error(e):
                raise
            raise forward_mode_error(kernel.name, backward, e) from e
    return Gaussian(mean, var)


def identity(x, *, mode: str = "linearized", backward: str = "bp") -> Gaussian:
    """Identity: returns the input belief unchanged (both modes agree)."""
    if mode not in MODES:
        raise ValueError(f"identity: mode={mode!r} is not one of {MODES}.")
    check_backward(backward, "identity")
    return as_gaussian(x, "identity input")


def _make(name: str, doc: str):
    def act(
        x, *, mode: str = "linearized", backward: str = "bp", quadrature_order: int = 48
    ) -> Gaussian:
        return _apply(_Kernel(name, mode, order=int(quadrature_order)), x, backward)

    act.__name__ = name
    act.__qualname__ = name
    act.__doc__ = (
        f"{doc}\n\n    Args:\n      x: `Gaussian` (or array = point) of any shape.\n"
        "      mode: 'linearized' (Algorithm 1) or 'matched' (exact moments).\n"
        "      backward: 'bp' (smoothing-gain rule; reverse mode only) or"
        " 'autodiff' (also supports jax.jvp / jax.jacfwd).\n"
        "      quadrature_order: nodes of the matched-mode quadrature (where"
        " no closed form exists).\n\n"
        "    Returns:\n      `Gaussian` of the same shape.\n    "
    )
    return act


relu = _make("relu", "ReLU; matched: closed form (m Phi(h) + s phi(h), h = m/s).")
tanh = _make("tanh", "tanh; matched: quadrature.")
sigmoid = _make("sigmoid", "Logistic sigmoid; matched: quadrature.")
softplus = _make("softplus", "softplus log(1+e^x); matched: quadrature.")
gelu = _make("gelu", "Exact GELU x Phi(x); matched: quadrature.")
silu = _make("silu", "SiLU / swish x sigmoid(x); matched: quadrature.")
erf = _make("erf", "erf; matched: closed form via Plackett's identity.")
probit = _make("probit", "Standard normal CDF Phi; matched: closed form (probit).")
heaviside = _make(
    "heaviside",
    "Step 1[x > 0]; matched: Bernoulli(Phi(h)) moments. Linearized: f' = 0, so the"
    " variance is 0 (the delta at 0 is dropped).",
)


def leaky_relu(
    x, *, negative_slope: float = 0.01, mode: str = "linearized", backward: str = "bp"
) -> Gaussian:
    """Leaky ReLU (slope ``negative_slope`` for x < 0); matched: closed form."""
    return _apply(_Kernel("leaky_relu", mode, float(negative_slope)), x, backward)


_PUBLIC = {
    "identity": identity,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "tanh": tanh,
    "sigmoid": sigmoid,
    "softplus": softplus,
    "gelu": gelu,
    "silu": silu,
    "swish": silu,
    "erf": erf,
    "probit": probit,
    "heaviside": heaviside,
}


def activation(
    name: str, x, *, mode: str = "linearized", backward: str = "bp", **kwargs
) -> Gaussian:
    """Apply the activation called ``name`` (see ``ACTIVATIONS``)."""
    try:
        fn = _PUBLIC[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_PUBLIC)}."
        ) from None
    return fn(x, mode=mode, backward=backward, **kwargs)
