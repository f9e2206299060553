"""Continuous piecewise-linear functions of one Gaussian: exact moments.

``f(a) = P + R a + sum_k w_k relu(a - c_k)`` covers every continuous
piecewise-linear function (``relu6 = relu(a) - relu(a - 6)``,
``clip(a, lo, hi) = lo + relu(a - lo) - relu(a - hi)``, ``max``/``min`` of
such functions with constants, sums of them).  For ``a ~ N(m, v)`` its
moments are exact (truncated-normal partial moments):

* ``mean = P + R m + sum_k w_k E[relu(a - c_k)]``;
* ``gain = E[f'(a)] = R + sum_k w_k Phi((m - c_k) / s)``;
* ``var = R^2 v + 2 R v sum_k w_k Phi_k + sum_jk w_j w_k Cov(r_j, r_k)`` with
  ``Cov(a, r_k) = v Phi_k`` (Stein's lemma) and, for ``c = max(c_j, c_k)``,
  ``z = (c - m)/s``: ``E[r_j r_k] = T2 + (2m - c_j - c_k) T1 + (m - c_j)(m - c_k) T0``,
  ``T0 = Phi(-z)``, ``T1 = s phi(z)``, ``T2 = s^2 (Phi(-z) + z phi(z))``.

Coefficients ``w_k``, ``c_k``, ``P``, ``R`` are concrete scalars here (the
symbolic analysis only builds this form from concrete constants).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from dualflow.moments import _closed_forms as cf

__all__ = ["PiecewiseLinear", "pl_max_const", "pl_moments", "pl_select", "relu_term"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class PiecewiseLinear:
    """``P + R a + sum_k w_k relu(a - c_k)`` with concrete float coefficients."""

    def __init__(self, P: float, R: float, terms: tuple[tuple[float, float], ...]):
        self.P, self.R, self.terms = float(P), float(R), tuple(terms)

    def __add__(self, other: PiecewiseLinear) -> PiecewiseLinear:
        return PiecewiseLinear(
            self.P + other.P, self.R + other.R, self.terms + other.terms
        )

    def scaled(self, c: float) -> PiecewiseLinear:
        c = float(c)
        return PiecewiseLinear(
            c * self.P, c * self.R, tuple((c * w, k) for w, k in self.terms)
        )

    def __call__(self, a: float) -> float:
        return self.P + self.R * a + sum(w * max(a - k, 0.0) for w, k in self.terms)

    def kinks(self) -> list[float]:
        return sorted({k for w, k in self.terms if w != 0.0})

    def slope_right_of(self, a: float) -> float:
        return self.R + sum(w for w, k in self.terms if k <= a)


def relu_term(P, R, Q, p, q) -> PiecewiseLinear | None:
    """``P + R a + Q relu(p + q a)`` as a :class:`PiecewiseLinear` (or None)."""
    try:
        P, R, Q, p, q = (float(np.asarray(t)) for t in (P, R, Q, p, q))
    except (TypeError, jax.errors.ConcretizationTypeError, ValueError):
        return None
    if q == 0.0:
        return PiecewiseLinear(P + Q * max(p, 0.0), R, ())
    c = -p / q
    if q > 0:  # Q q relu(a - c)
        return PiecewiseLinear(P, R, ((Q * q, c),))
    # relu(q (a - c)) = |q| relu(c - a) = |q| (relu(a - c) - (a - c))
    aq = -q
    return PiecewiseLinear(P + Q * aq * c, R - Q * aq, ((Q * aq, c),))


def pl_max_const(x: PiecewiseLinear, c: float, is_max: bool) -> PiecewiseLinear | None:
    """``max(x, c)`` (``min`` if not ``is_max``) for monotone ``x``, else None."""
    c = float(c)
    ks = x.kinks()
    slopes = [x.R] + [x.slope_right_of(k) for k in ks]
    if all(s >= 0 for s in slopes):
        mx = _max_increasing(x, c, ks, slopes)
        if is_max:
            return mx
        # min(x, c) = x + c - max(x, c)
        return x + PiecewiseLinear(c, 0.0, ()) + mx.scaled(-1.0)
    if all(s <= 0 for s in slopes):  # via y = -x, non-decreasing
        out = pl_max_const(x.scaled(-1.0), -c, not is_max)
        return None if out is None else out.scaled(-1.0)
    return None


def pl_select(left: PiecewiseLinear, right: PiecewiseLinear, t: float):
    """``left(a)`` for ``a < t``, ``right(a)`` for ``a > t`` (``jnp.where`` of a
    comparison with a threshold): piecewise linear when continuous at ``t``,
    else ``None``.  With ``D = right - left`` (``D(t) = 0``):
    ``f = left + D'(t+) relu(a - t) + sum_{c_k > t} w_k^D relu(a - c_k)``."""
    d = right + left.scaled(-1.0)
    scale = 1.0 + abs(left(t)) + abs(right(t))
    if abs(d(t)) > 1e-9 * scale:
        return None
    terms = ((d.slope_right_of(t), t),) + tuple(
        (w, k) for w, k in d.terms if k > t and w != 0.0
    )
    return left + PiecewiseLinear(0.0, 0.0, terms)


def _max_increasing(x, c, ks, slopes) -> PiecewiseLinear | None:
    """``c + relu(x - c)`` for non-decreasing ``x``: kink where ``x = c``."""
    # left of every kink x is P + R a; find the crossing a* of x = c
    pts = [-math.inf, *ks, math.inf]
    for i, s in enumerate(slopes):
        lo, hi = pts[i], pts[i + 1]
        if s == 0.0:
            val = x(hi if math.isfinite(hi) else (lo if math.isfinite(lo) else 0.0))
            if val >= c and i == 0:
                return x  # x >= c everywhere: max(x, c) = x
            continue
        ref = lo if math.isfinite(lo) else (hi if math.isfinite(hi) else 0.0)
        a_star = ref + (c - x(ref)) / s
        if lo <= a_star <= hi:
            # relu(x - c) = s relu(a - a*) + sum_{c_k > a*} w_k relu(a - c_k)
            terms = ((s, a_star),) + tuple(
                (w, k) for w, k in x.terms if k > a_star and w != 0.0
            )
            return PiecewiseLinear(c, 0.0, terms)
    return PiecewiseLinear(c, 0.0, ())  # x < c everywhere: the constant c


def pl_moments(f: PiecewiseLinear, m, v):
    """``(mean, var, gain)`` of ``f(a)``, ``a ~ N(m, v)`` (module doc); exact."""
    pos = v > 0
    v1 = jnp.where(pos, v, jnp.ones_like(v))
    s = jnp.sqrt(v1)
    mean = f.P + f.R * m
    gain = f.R * jnp.ones_like(m)
    var = f.R * f.R * v1
    e, phis = [], []
    for w, c in f.terms:
        ek, vk, gk = cf.relu_moments(m - c, v1)
        e.append(ek)
        phis.append(gk)
        mean = mean + w * ek
        gain = gain + w * gk
        var = var + 2.0 * f.R * w * v1 * gk + w * w * vk
    n = len(f.terms)
    for j in range(n):
        for k in range(j + 1, n):
            (wj, cj), (wk, ck) = f.terms[j], f.terms[k]
            cmax = max(cj, ck)
            z = (cmax - m) / s
            t0 = ndtr(-z)
            phi = _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
            t1 = s * phi
            t2 = v1 * (t0 + z * phi)
            ejk = t2 + (2.0 * m - cj - ck) * t1 + (m - cj) * (m - ck) * t0
            var = var + 2.0 * wj * wk * (ejk - e[j] * e[k])
    # a point (v == 0): f(m), 0, f'(m)
    point_mean = f.P + f.R * m + sum(w * jnp.maximum(m - c, 0.0) for w, c in f.terms)
    point_gain = f.R + sum(w * (m > c).astype(m.dtype) for w, c in f.terms)
    return (
        jnp.where(pos, mean, point_mean),
        jnp.where(pos, jnp.maximum(var, 0.0), 0.0),
        jnp.where(pos, gain, point_gain),
    )
