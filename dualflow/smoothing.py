"""The duality made visible: smoothed (posterior) moments from loss gradients.

Theorem 1(3) of "Duality of information flow" states that, for a Gaussian
filtered belief ``alpha(x_l) = N(x̂_l, P_l)`` and loss ``J = -log p(y | x_0)``,

    dJ/dx̂_l = -P_l^{-1} (x̂_{l|L} - x̂_l)
    dJ/dP_l = -1/2 P_l^{-1} (P_{l|L} - P_l + Δ Δ^T) P_l^{-1},  Δ = x̂_{l|L} - x̂_l

so the backward pass *is* the smoother: given the filtered moments and the
gradients, the smoothed moments follow.  For the element-wise beliefs of
:mod:`dualflow.moments` this reads (all element-wise)

    x̂_{l|L} = x̂_l - P_l g_m,       P_{l|L} = P_l - 2 P_l^2 g_P - P_l^2 g_m^2

with ``g_m = dJ/dx̂_l`` and ``g_P = dJ/dP_l``.  In canonical coordinates
(``eta = x̂/P``, ``lam = -1/(2P)``) the gradients are the differences of mean
parameters, smoothed minus filtered (Theorem 1(2)):

    dJ/deta = -(x̂_{l|L} - x̂_l) = P g_m
    dJ/dlam = -(E_smooth[x^2] - E_filter[x^2]) = 2 P^2 g_P + 2 x̂ P g_m.

These identities are exact for Gaussian-linear networks; for nonlinear ones
they define the posterior *implied* by the backward rule in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dualflow.gaussian import Gaussian, as_gaussian

Array = jax.Array

__all__ = [
    "DualityResult",
    "canonical_gradients",
    "perturb",
    "posterior_moments",
    "smoothed_moments",
]


def smoothed_moments(filtered: Gaussian, grad: Gaussian) -> Gaussian:
    """Smoothed belief implied by the loss gradient (Theorem 1(3), diagonal).

    Args:
      filtered: filtered (forward) belief ``N(x̂_l, P_l)``.
      grad: ``Gaussian(dJ/dx̂_l, dJ/dP_l)`` for ``J = -log p(y | x_0)`` (a
        negative log-likelihood; for a sum over a batch, each example's entry
        carries its own gradient).

    Returns:
      `Gaussian` ``N(x̂_{l|L}, P_{l|L})``.
    """
    m, P = filtered.mean, filtered.var
    gm, gP = grad.mean, grad.var
    return Gaussian(m - P * gm, P - 2.0 * P * P * gP - (P * gm) ** 2)


def canonical_gradients(filtered: Gaussian, grad: Gaussian) -> tuple[Array, Array]:
    """``(dJ/deta, dJ/dlam)`` from moment gradients (chain rule; Theorem 1(2))."""
    m, P = filtered.mean, filtered.var
    gm, gP = grad.mean, grad.var
    return P * gm, 2.0 * P * P * gP + 2.0 * m * P * gm


def perturb(x: Gaussian, delta: Gaussian) -> Gaussian:
    """``x + delta`` in moment coordinates; with ``delta = 0`` its gradient is dJ/dx."""
    return Gaussian(x.mean + delta.mean, x.var + delta.var)


class DualityResult(NamedTuple):
    """Output of :func:`posterior_moments` (dicts keyed by tap name)."""

    loss: Array
    filtered: dict[str, Gaussian]
    smoothed: dict[str, Gaussian]
    grads: dict[str, Gaussian]


Tap = Callable[[str, Gaussian], Gaussian]


def posterior_moments(fn: Callable[..., Array], *args: Any) -> DualityResult:
    """Run ``fn`` forward and backward; return filtered and smoothed beliefs.

    ``fn(*args, tap)`` computes a scalar negative log-likelihood and calls
    ``x = tap("name", x)`` on every belief it wants to expose.  Each tap adds a
    zero perturbation whose gradient is ``(dJ/dx̂, dJ/dP)``; the smoothed
    moments follow from :func:`smoothed_moments`.  Whatever backward rule the
    ops inside ``fn`` use (``bp`` or ``autodiff``) is the one that is read.

    Example::

        def nll(params, x, y, tap):
            h = tap("h1", moments.relu(moments.dense(x, *params[0])))
            out = tap("out", moments.dense(h, *params[1]))
            return objectives.gaussian_nll(out, y, noise_var=0.1).sum()

        res = posterior_moments(nll, params, x, y)
        res.smoothed["h1"].mean  # x̂_{1|L}
    """
    shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def record(name: str, g: Gaussian) -> Gaussian:
        g = as_gaussian(g, f"tap {name!r}")
        if name in shapes:
            raise ValueError(f"posterior_moments: tap name {name!r} used twice.")
        shapes[name] = jax.ShapeDtypeStruct(g.shape, g.dtype)
        return g

    jax.eval_shape(lambda: fn(*args, record))
    deltas = {
        k: Gaussian(jnp.zeros(s.shape, s.dtype), jnp.zeros(s.shape, s.dtype))
        for k, s in shapes.items()
    }

    def loss_of(deltas):
        filtered: dict[str, Gaussian] = {}

        def tap(name: str, g: Gaussian) -> Gaussian:
            g = as_gaussian(g, f"tap {name!r}")
            filtered[name] = g
            return perturb(g, deltas[name])

        loss = fn(*args, tap)
        if jnp.ndim(loss) != 0:
            raise ValueError(
                f"posterior_moments: fn must return a scalar loss, got shape"
                f" {jnp.shape(loss)}."
            )
        return loss, filtered

    (loss, filtered), grads = jax.value_and_grad(loss_of, has_aux=True)(deltas)
    smoothed = {k: smoothed_moments(filtered[k], grads[k]) for k in filtered}
    return DualityResult(loss, filtered, smoothed, grads)
