"""Discrete hidden Markov model in log space; Theorem 4 (App. C.2).

Model, 0-based time ``t = 0..T-1``, ``K`` states::

    p(x_0 = i) = pi_i,   p(x_t = j | x_{t-1} = i) = A_ij,
    log_lik[t, j] = log p(y_t | x_t = j).

Filter ``α_t = p(x_t | y_{0:t})``, smoother ``γ_t = p(x_t | y_{0:T-1})``.  The
filter is parametrised canonically by ``ell`` with ``α_t = softmax(ell)``
(the paper's ``log α_t``), so Theorem 1 gives ``∇_ell log p(y) = γ_t - α_t``.
Public functions are pure ``jax.numpy`` (``lax.scan`` over time) and jitted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

Array = jax.Array

__all__ = [
    "HMMForwardResult",
    "filter_gradient_recursion",
    "hmm_forward",
    "hmm_smoother",
    "log_likelihood_from_log_filter",
]


class HMMForwardResult(NamedTuple):
    """``log_alpha [T, K]``: log p(x_t | y_{0:t}) (normalised);
    ``log_predicted [T, K]``: log p(x_t | y_{0:t-1}) (``log pi`` at t = 0);
    ``log_norms [T]``: log p(y_t | y_{0:t-1}); ``log_likelihood``: log p(y)."""

    log_alpha: Array
    log_predicted: Array
    log_norms: Array
    log_likelihood: Array


def _predict(log_alpha: Array, log_A: Array) -> Array:
    """``log Σ_i α(i) A_ij`` -> ``[K]``."""
    return logsumexp(log_alpha[:, None] + log_A, axis=0)


def _update(log_pred: Array, log_lik_t: Array) -> tuple[Array, Array]:
    """Bayes update; returns (normalised log filter, log normaliser)."""
    unnorm = log_pred + log_lik_t
    log_c = logsumexp(unnorm)
    return unnorm - log_c, log_c


@jax.jit
def hmm_forward(log_pi: Array, log_A: Array, log_lik: Array) -> HMMForwardResult:
    """Normalised forward pass. ``log_pi [K]``, ``log_A [K, K]``, ``log_lik [T, K]``."""
    log_alpha0, log_c0 = _update(log_pi, log_lik[0])

    def step(log_alpha, log_lik_t):
        log_pred = _predict(log_alpha, log_A)
        new, log_c = _update(log_pred, log_lik_t)
        return new, (new, log_pred, log_c)

    _, (la, lp, lc) = jax.lax.scan(step, log_alpha0, log_lik[1:])
    log_alpha = jnp.concatenate([log_alpha0[None], la])
    log_norms = jnp.concatenate([log_c0[None], lc])
    return HMMForwardResult(
        log_alpha=log_alpha,
        log_predicted=jnp.concatenate([log_pi[None], lp]),
        log_norms=log_norms,
        log_likelihood=jnp.sum(log_norms),
    )


def _log_backward_kernel(log_alpha_prev: Array, log_A: Array) -> Array:
    """``log p(x_{t-1} = i | x_t = j, y_{0:t-1})`` as ``[K_i, K_j]``.

    Equals ``log α_{t-1}(i) + log A_ij - log Σ_k α_{t-1}(k) A_kj``.
    """
    joint = log_alpha_prev[:, None] + log_A
    return joint - logsumexp(joint, axis=0, keepdims=True)


@jax.jit
def hmm_smoother(log_pi: Array, log_A: Array, log_lik: Array) -> Array:
    """Smoothed ``log γ_t = log p(x_t | y_{0:T-1})`` ``[T, K]``.

    Backward belief propagation in the α-γ form (App. A, part 2):
    ``γ_{t-1}(i) = Σ_j p(x_{t-1} = i | x_t = j, y_{0:t-1}) γ_t(j)``, started
    from ``γ_{T-1} = α_{T-1}``.
    """
    log_alpha = hmm_forward(log_pi, log_A, log_lik).log_alpha

    def step(log_gamma, log_alpha_prev):
        kernel = _log_backward_kernel(log_alpha_prev, log_A)
        new = logsumexp(kernel + log_gamma[None, :], axis=1)
        return new, new

    _, lg = jax.lax.scan(step, log_alpha[-1], log_alpha[:-1], reverse=True)
    return jnp.concatenate([lg, log_alpha[-1:]])


@jax.jit
def log_likelihood_from_log_filter(
    t: int | Array, ell: Array, log_A: Array, log_lik: Array
) -> Array:
    """``log p(y_{t+1:T-1} | y_{0:t})`` with the filter at ``t`` = ``softmax(ell)``.

    ``t`` in ``0..T-1`` (may be traced: earlier steps are masked), ``ell [K]``
    (any shift; unnormalised is fine).  Its gradient at ``ell = log α_t`` is
    ``γ_t - α_t`` (Theorem 1(2), App. C.2).
    """

    def step(la, inp):
        s, log_lik_s = inp
        new, log_c = _update(_predict(la, log_A), log_lik_s)
        active = s > t
        return jnp.where(active, new, la), jnp.where(active, log_c, 0.0)

    steps = jnp.arange(log_lik.shape[0])
    _, lc = jax.lax.scan(step, ell - logsumexp(ell), (steps, log_lik))
    return jnp.sum(lc)


@jax.jit
def filter_gradient_recursion(log_alpha: Array, log_A: Array, log_lik: Array) -> Array:
    """Theorem 4 / Eq. 15: ``g_t = ∇_{log α_t} log p(y_{0:T-1})``, ``[T, K]``.

    ``g_{T-1} = 0`` and, with ``R_t(i|j) = p(x_{t-1}=i | x_t=j, y_{0:t-1})`` and
    ``ρ_t(i) = p(x_{t-1}=i | y_{0:t}) ∝ α_{t-1}(i) Σ_j A_ij p(y_t | x_t=j)``::

        g_{t-1}(i) = Σ_j R_t(i|j) g_t(j) - α_{t-1}(i) Σ_j g_t(j)
                     + ρ_t(i) - α_{t-1}(i)

    The first two terms come from ``ℓ_t = log p(y_{t+1:T-1} | y_{0:t})`` via
    ``d log α_t(j) =
    Σ_i R_t(i|j) (d ell(i) - α_{t-1}·d ell)``, the last two from
    ``log p(y_t | y_{0:t-1})``.  As ``Σ_j g_t(j) = 0`` for the true gradient,
    this is the paper's Eq. 15 verbatim.
    """
    alpha = jnp.exp(log_alpha)

    def step(g, inp):
        log_alpha_prev, alpha_prev, log_lik_t = inp
        kernel = jnp.exp(_log_backward_kernel(log_alpha_prev, log_A))
        log_rho = log_alpha_prev + logsumexp(log_A + log_lik_t[None, :], axis=1)
        rho = jnp.exp(log_rho - logsumexp(log_rho))
        g_prev = kernel @ g - alpha_prev * jnp.sum(g) + rho - alpha_prev
        return g_prev, g_prev

    init = jnp.zeros_like(log_alpha[-1])
    inputs = (log_alpha[:-1], alpha[:-1], log_lik[1:])
    _, g = jax.lax.scan(step, init, inputs, reverse=True)
    return jnp.concatenate([g, init[None]])
