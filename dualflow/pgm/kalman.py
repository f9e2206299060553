"""Kalman filter, RTS smoother and Theorem 3 for a time-invariant LGSSM.

Model (Duality of information flow, App. C.1), ``t = 1..T``::

    x_0 ~ N(m0, P0)
    x_t = F x_{t-1} + w_t,   w_t ~ N(0, Q)
    z_t = H x_t + v_t,       v_t ~ N(0, R)

Array layout: ``z [T, m]`` with ``z[t-1] = z_t``.  Filtered arrays have a
leading axis of length ``T+1`` indexed by ``t = 0..T`` (index 0 is the prior
``x_{0|0} = (m0, P0)``); predicted/innovation arrays have length ``T`` with
index ``t-1`` holding time ``t``.

Public functions are pure ``jax.numpy`` (``lax.scan`` over time) and jitted
(the time index of :func:`log_likelihood_from_filter` may be traced); they
avoid Cholesky so that autodiff w.r.t. a covariance has the true gradient as
its symmetric part.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dualflow.pgm.gaussian_chain import gaussian_logpdf, symmetrize

Array = jax.Array

__all__ = [
    "LGSSM",
    "KalmanFilterResult",
    "RTSSmootherResult",
    "filter_gradient_recursion",
    "kalman_filter",
    "lgssm_joint_gaussian",
    "log_likelihood_from_filter",
    "rts_smoother",
]


class LGSSM(NamedTuple):
    """Time-invariant LGSSM parameters.

    ``F [n, n]``, ``Q [n, n]``, ``H [m, n]``, ``R [m, m]``, ``m0 [n]``,
    ``P0 [n, n]``.
    """

    F: Array
    Q: Array
    H: Array
    R: Array
    m0: Array
    P0: Array


class KalmanFilterResult(NamedTuple):
    """Output of :func:`kalman_filter` (see module docstring for indexing).

    ``filtered_means [T+1, n]``, ``filtered_covs [T+1, n, n]``: x̂_{t|t}, P_{t|t};
    ``predicted_means [T, n]``, ``predicted_covs [T, n, n]``: x̂_{t|t-1}, P_{t|t-1};
    ``innovations [T, m]``: ε_t = z_t - H x̂_{t|t-1};
    ``innovation_covs [T, m, m]``: S_t = H P_{t|t-1} H^T + R;
    ``log_likelihoods [T]``: log p(z_t | z_{1:t-1}) = log N(ε_t; 0, S_t);
    ``log_likelihood``: log p(z_{1:T}).
    """

    filtered_means: Array
    filtered_covs: Array
    predicted_means: Array
    predicted_covs: Array
    innovations: Array
    innovation_covs: Array
    log_likelihoods: Array
    log_likelihood: Array


class RTSSmootherResult(NamedTuple):
    """``means [T+1, n]``, ``covs [T+1, n, n]``: x̂_{t|T}, P_{t|T} (t = 0..T);
    ``gains [T, n, n]``: ``G_t = P_{t|t} F^T P_{t+1|t}^{-1}`` (t = 0..T-1)."""

    means: Array
    covs: Array
    gains: Array


def _kalman_step(
    model: LGSSM, mean: Array, cov: Array, z: Array
) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
    """Predict + update for one observation (App. C.1, prediction/update)."""
    pred_mean = model.F @ mean
    pred_cov = symmetrize(model.F @ cov @ model.F.T + model.Q)
    S = symmetrize(model.H @ pred_cov @ model.H.T + model.R)
    innov = z - model.H @ pred_mean
    K = jnp.linalg.solve(S, model.H @ pred_cov).T  # P_{t|t-1} H^T S^{-1}
    new_mean = pred_mean + K @ innov
    new_cov = symmetrize(pred_cov - K @ S @ K.T)
    loglik = gaussian_logpdf(innov, jnp.zeros_like(innov), S)
    return (new_mean, new_cov), (
        new_mean,
        new_cov,
        pred_mean,
        pred_cov,
        innov,
        S,
        loglik,
    )


@jax.jit
def kalman_filter(model: LGSSM, z: Array) -> KalmanFilterResult:
    """Kalman filter over ``z [T, m]``; returns :class:`KalmanFilterResult`."""

    def step(carry, z_t):
        return _kalman_step(model, carry[0], carry[1], z_t)

    _, (fm, fc, pm, pc, innov, S, ll) = jax.lax.scan(step, (model.m0, model.P0), z)
    return KalmanFilterResult(
        filtered_means=jnp.concatenate([model.m0[None], fm]),
        filtered_covs=jnp.concatenate([model.P0[None], fc]),
        predicted_means=pm,
        predicted_covs=pc,
        innovations=innov,
        innovation_covs=S,
        log_likelihoods=ll,
        log_likelihood=jnp.sum(ll),
    )


@jax.jit
def log_likelihood_from_filter(
    t: int | Array, mean: Array, cov: Array, model: LGSSM, z: Array
) -> Array:
    """``log p(z_{t+1:T} | z_{1:t})`` with the filter at ``t`` set to ``N(mean, cov)``.

    ``t`` in ``0..T`` (may be traced: steps ``s <= t`` are masked, so one
    compilation serves every ``t``); ``mean [n]``, ``cov [n, n]``.
    Differentiable; at the true filtered moments
    ``log p(z_{1:t}) + this = log p(z_{1:T})`` and its gradient is Theorem 3's
    ``∇_{x̂_{t|t}}, ∇_{P_{t|t}} log p(z_{1:T})``.
    """

    def step(carry, inp):
        s, z_s = inp  # z_s = z_{s+1}
        (m, P), out = _kalman_step(model, carry[0], carry[1], z_s)
        active = s >= t
        new = (jnp.where(active, m, carry[0]), jnp.where(active, P, carry[1]))
        return new, jnp.where(active, out[-1], 0.0)

    steps = jnp.arange(z.shape[0])
    _, ll = jax.lax.scan(step, (mean, cov), (steps, z))
    return jnp.sum(ll)


@jax.jit
def rts_smoother(model: LGSSM, filt: KalmanFilterResult) -> RTSSmootherResult:
    """Rauch-Tung-Striebel smoother (App. C.1).

    For t = T-1..0, started from the filter at T::

        G_t = P_{t|t} F^T P_{t+1|t}^{-1}
        x̂_{t|T} = x̂_{t|t} + G_t (x̂_{t+1|T} - x̂_{t+1|t})
        P_{t|T} = P_{t|t} + G_t (P_{t+1|T} - P_{t+1|t}) G_t^T
    """

    def step(carry, inp):
        ms_next, Ps_next = carry
        m, P, pm_next, pP_next = inp
        G = jnp.linalg.solve(pP_next, model.F @ P).T
        ms = m + G @ (ms_next - pm_next)
        Ps = symmetrize(P + G @ (Ps_next - pP_next) @ G.T)
        return (ms, Ps), (ms, Ps, G)

    inputs = (
        filt.filtered_means[:-1],
        filt.filtered_covs[:-1],
        filt.predicted_means,
        filt.predicted_covs,
    )
    init = (filt.filtered_means[-1], filt.filtered_covs[-1])
    _, (ms, Ps, G) = jax.lax.scan(step, init, inputs, reverse=True)
    return RTSSmootherResult(
        means=jnp.concatenate([ms, init[0][None]]),
        covs=jnp.concatenate([Ps, init[1][None]]),
        gains=G,
    )


@jax.jit
def filter_gradient_recursion(
    model: LGSSM, filt: KalmanFilterResult
) -> tuple[Array, Array]:
    """Theorem 3: ``a_t = ∇_{x̂_{t|t}}``, ``B_t = ∇_{P_{t|t}}`` of ``log p(z_{1:T})``.

    Returns ``(a [T+1, n], B [T+1, n, n])`` for t = 0..T, ``B_t`` symmetric,
    without autodiff and without inverting any ``P``.

    Derivation.  Let ``ℓ_t(x̂_{t|t}, P_{t|t}) = log p(z_{t+1:T} | z_{1:t})``, so
    ``a_T = 0, B_T = 0`` and ``ℓ_{t-1} = log N(z_t; H x̂_{t|t-1}, S_t) + ℓ_t``.
    With ``M_t = I - K_t H = P_{t|t} P_{t|t-1}^{-1}``, ``ε = ε_t``,
    ``u = H^T S_t^{-1} ε``: ``dx̂_{t|t} = M dx̂_{t|t-1} + M dP_{t|t-1} u``
    (since ``dK = M dP_{t|t-1} H^T S^{-1}``) and ``dP_{t|t} = M dP_{t|t-1} M^T``
    (Eqs. 11-12 simplified).  Gradients w.r.t. the predicted moments::

        ā = M^T a_t + u                                            (Eq. 9)
        B̄ = M^T B_t M + 0.5 (M^T a_t u^T + u a_t^T M)
            - 0.5 H^T (S^{-1} - S^{-1} ε ε^T S^{-1}) H

    and ``a_{t-1} = F^T ā``, ``B_{t-1} = F^T B̄ F``.  Written as Eq. 10 this is
    ``-2 B_{t-1} = F^T M^T (-2 B_t) M F - F^T (M^T a_t u^T + u a_t^T M) F
    + F^T H^T S^{-1} H F - F^T u u^T F``; the paper prints the first term
    without the factor -2 and the second with the opposite sign.
    """
    n = model.F.shape[0]
    eye = jnp.eye(n)

    def step(carry, inp):
        a, B = carry
        pP, S, innov = inp
        S_inv_H = jnp.linalg.solve(S, model.H)  # S^{-1} H
        K = (S_inv_H @ pP).T  # P_{t|t-1} H^T S^{-1}
        M = eye - K @ model.H
        u = S_inv_H.T @ innov  # H^T S^{-1} ε
        Ma = M.T @ a
        a_bar = Ma + u
        B_bar = (
            M.T @ B @ M
            + 0.5 * (jnp.outer(Ma, u) + jnp.outer(u, Ma))
            - 0.5 * (model.H.T @ S_inv_H - jnp.outer(u, u))
        )
        a_prev = model.F.T @ a_bar
        B_prev = symmetrize(model.F.T @ B_bar @ model.F)
        return (a_prev, B_prev), (a_prev, B_prev)

    init = (
        jnp.zeros(n, filt.filtered_means.dtype),
        jnp.zeros((n, n), filt.filtered_covs.dtype),
    )
    inputs = (filt.predicted_covs, filt.innovation_covs, filt.innovations)
    _, (a, B) = jax.lax.scan(step, init, inputs, reverse=True)
    return (
        jnp.concatenate([a, init[0][None]]),
        jnp.concatenate([B, init[1][None]]),
    )


@partial(jax.jit, static_argnames="num_steps")
def lgssm_joint_gaussian(model: LGSSM, num_steps: int) -> tuple[Array, Array]:
    """Brute-force joint mean/covariance of ``(x_0, ..., x_T, z_1, ..., z_T)``.

    Every variable is an affine map of the independent noise
    ``e = (x_0 - m0, w_1..w_T, v_1..v_T)``; the covariance is ``A Σ_e A^T``.
    Layout: states ``[(T+1) n]`` first (time-major), then observations ``[T m]``.
    """
    n, m, T = model.F.shape[0], model.H.shape[0], num_steps
    n_noise = n * (T + 1) + m * T
    x_coeff = [jnp.eye(n, n_noise)]
    x_const = [model.m0]
    for t in range(1, T + 1):
        w = jnp.zeros((n, n_noise)).at[:, n * t : n * (t + 1)].set(jnp.eye(n))
        x_coeff.append(model.F @ x_coeff[-1] + w)
        x_const.append(model.F @ x_const[-1])
    z_coeff, z_const = [], []
    for t in range(1, T + 1):
        start = n * (T + 1) + m * (t - 1)
        v = jnp.zeros((m, n_noise)).at[:, start : start + m].set(jnp.eye(m))
        z_coeff.append(model.H @ x_coeff[t] + v)
        z_const.append(model.H @ x_const[t])
    sigma = jax.scipy.linalg.block_diag(model.P0, *([model.Q] * T), *([model.R] * T))
    A = jnp.concatenate(x_coeff + z_coeff, axis=0)
    return jnp.concatenate(x_const + z_const), A @ sigma @ A.T
