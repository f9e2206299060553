"""Discrete hidden Markov model in log space; Theorem 4 (App. C.2).

Model, 0-based time ``t = 0..T-1``, ``K`` states::

    p(x_0 = i) = pi_i,   p(x_t = j | x_{t-1} = i) = A_ij,
    log_lik[t, j] = log p(y_t | x_t = j).

Filter ``α_t = p(x_t | y_{0:t})``, smoother ``γ_t = p(x_t | y_{0:T-1})``.  The
filter is parametrised canonically by ``ell`` with ``α_t = softmax(ell)``
(the paper's ``log α_t``), so Theorem 1 gives ``∇_ell log p(y) = γ_t - α_t``.
Public functions are pure ``jax.numpy`` (``lax.scan`` over time) and jitted.

Zero probabilities (``-inf`` entries of ``log_pi``, ``log_A`` or ``log_lik``:
left-to-right chains, forbidden transitions, impossible emissions) are
supported: states that are unreachable, or incompatible with the observations,
get log probability exactly ``-inf`` (probability exactly 0) in the filter,
the smoother and the Eq. 15 recursion, and gradients of ``log p(y)`` with
respect to ``log_pi``, ``log_A`` and ``log_lik`` stay finite (they are the
smoothed marginals and expected transition counts, 0 for impossible events).
All log-sum-exps go through :func:`_logsumexp`, whose value *and* gradient are
defined when every term is ``-inf``.  Only an observation sequence of
probability 0 under the model (``p(y_{0:t}) = 0`` for some ``t``: every state
impossible) leaves the conditionals undefined; the result is NaN then.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def _logsumexp(x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
    """``log Σ exp(x)`` over ``axis``; ``-inf`` (not NaN) when every term is ``-inf``.

    Exact same value as ``jax.scipy.special.logsumexp`` otherwise.  The
    gradient is ``softmax(x)`` where the sum is positive and exactly 0 where it
    is empty (``jax.scipy``'s gives ``0 / 0 = NaN`` there, which is what made
    gradients through a left-to-right HMM NaN).  Double-``where``: the log is
    taken of a sum replaced by 1 where it is 0.
    """
    x_max = jnp.max(x, axis=axis, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(x_max), x_max, 0.0))
    total = jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True)
    positive = total > 0
    out = jnp.where(
        positive, jnp.log(jnp.where(positive, total, 1.0)) + shift, -jnp.inf
    )
    return out if keepdims else jnp.squeeze(out, axis=axis)


def _log_normalise(x: Array, log_z: Array) -> Array:
    """``x - log_z`` with ``-inf - (-inf) := -inf`` (NaN- and gradient-safe).

    Where ``log_z = -inf`` every term of ``x`` is ``-inf`` too (``log_z`` is
    their log-sum-exp), i.e. the event conditioned on has probability 0; the
    entries are then set to ``-inf`` (probability 0) instead of NaN.
    """
    finite = jnp.isfinite(log_z)
    return jnp.where(finite, x - jnp.where(finite, log_z, 0.0), -jnp.inf)


def _predict(log_alpha: Array, log_A: Array) -> Array:
    """``log Σ_i α(i) A_ij`` -> ``[K]``."""
    return _logsumexp(log_alpha[:, None] + log_A, axis=0)


def _update(log_pred: Array, log_lik_t: Array) -> tuple[Array, Array]:
    """Bayes update; returns (normalised log filter, log normaliser)."""
    unnorm = log_pred + log_lik_t
    log_c = _logsumexp(unnorm)
    # log_c = -inf only if p(y_t | y_{0:t-1}) = 0: the filter is undefined
    # (NaN), see the module docstring.
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

    Equals ``log α_{t-1}(i) + log A_ij - log Σ_k α_{t-1}(k) A_kj``.  A column
    ``j`` whose state cannot be reached at ``t`` (``Σ_k α_{t-1}(k) A_kj = 0``)
    is all ``-inf`` (the conditional is undefined there; its weight
    ``γ_t(j)`` or ``g_t(j)`` is 0, so any finite choice gives the same
    result, and ``-inf`` avoids ``-inf - (-inf) = NaN``).
    """
    joint = log_alpha_prev[:, None] + log_A
    return _log_normalise(joint, _logsumexp(joint, axis=0, keepdims=True))


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
        new = _logsumexp(kernel + log_gamma[None, :], axis=1)
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
    _, lc = jax.lax.scan(step, ell - _logsumexp(ell), (steps, log_lik))
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
        log_rho = log_alpha_prev + _logsumexp(log_A + log_lik_t[None, :], axis=1)
        rho = jnp.exp(log_rho - _logsumexp(log_rho))
        g_prev = kernel @ g - alpha_prev * jnp.sum(g) + rho - alpha_prev
        return g_prev, g_prev

    init = jnp.zeros_like(log_alpha[-1])
    inputs = (log_alpha[:-1], alpha[:-1], log_lik[1:])
    _, g = jax.lax.scan(step, init, inputs, reverse=True)
    return jnp.concatenate([g, init[None]])
