"""Exact inference in a Gaussian linear chain (the paper's "Gaussian-linear BNN").

Model (Duality of information flow, Sec. 3.1 and App. A), full covariances,
layer widths ``n_0, ..., n_L`` may differ::

    x_0 ~ N(m0, P0)                                  (P0 = 0: observed input)
    x_l = F_l x_{l-1} + b_l + w_l,  w_l ~ N(0, Q_l),  l = 1..L
    y   = H x_L + c + v,            v   ~ N(0, R)

Filtering (forward) moments are those of ``p(x_l | x_0)``; smoothing (backward)
moments are those of ``p(x_l | x_0, y)``.  Theorem 1 (Eq. 7) states that the
gradient of ``J = -log p(y | x_0)`` w.r.t. the filtered moments is the
filter-to-smoother difference; this module is the exact reference against
which that statement (and the moment-propagation code) is tested.

All functions are pure ``jax.numpy``, ``jit``-able with the layer index static,
and use ``solve``/``slogdet`` (never Cholesky) so that autodiff w.r.t. a
covariance gives a gradient whose symmetric part is the true gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "ChainMoments",
    "ChainSmootherResult",
    "GaussianChain",
    "canonical_to_moments",
    "chain_filter",
    "chain_log_likelihood",
    "chain_smoother",
    "condition_gaussian",
    "gaussian_logpdf",
    "joint_gaussian",
    "joint_gaussian_smoother",
    "log_likelihood_from_layer",
    "log_likelihood_from_layer_canonical",
    "moments_to_canonical",
    "symmetrize",
]


class GaussianChain(NamedTuple):
    """Parameters of the chain; a pytree (lists of per-layer arrays).

    ``m0 [n_0]``, ``P0 [n_0, n_0]``; ``Fs[l-1] [n_l, n_{l-1}]``,
    ``bs[l-1] [n_l]``, ``Qs[l-1] [n_l, n_l]`` for ``l = 1..L``;
    ``H [m, n_L]``, ``c [m]``, ``R [m, m]``.
    """

    m0: Array
    P0: Array
    Fs: Sequence[Array]
    bs: Sequence[Array]
    Qs: Sequence[Array]
    H: Array
    c: Array
    R: Array

    @property
    def num_layers(self) -> int:
        return len(self.Fs)


class ChainMoments(NamedTuple):
    """Per-layer moments, ``means[l] [n_l]``, ``covs[l] [n_l, n_l]``, l = 0..L."""

    means: list[Array]
    covs: list[Array]


class ChainSmootherResult(NamedTuple):
    """Smoothed moments of ``p(x_l | x_0, y)`` (l = 0..L) and gains.

    ``gains[l] = G_l = P_l F_{l+1}^T P_{l+1}^{-1}`` ``[n_l, n_{l+1}]``,
    l = 0..L-1; ``filtered`` holds the forward moments they were built from.
    """

    means: list[Array]
    covs: list[Array]
    gains: list[Array]
    filtered: ChainMoments


# --------------------------------------------------------------------------
# Small Gaussian helpers
# --------------------------------------------------------------------------


def symmetrize(a: Array) -> Array:
    """``0.5 (A + A^T)`` over the last two axes."""
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def gaussian_logpdf(x: Array, mean: Array, cov: Array) -> Array:
    """``log N(x; mean, cov)`` for ``x, mean [n]``, ``cov [n, n]`` (solve/slogdet)."""
    d = x - mean
    _, logdet = jnp.linalg.slogdet(cov)
    maha = d @ jnp.linalg.solve(cov, d)
    return -0.5 * (d.shape[-1] * math.log(2.0 * math.pi) + logdet + maha)


def moments_to_canonical(mean: Array, cov: Array) -> tuple[Array, Array]:
    """``(eta, Lambda) = (P^{-1} m, -0.5 P^{-1})`` (Sec. 3.1 conventions)."""
    prec = jnp.linalg.inv(cov)
    return prec @ mean, -0.5 * prec


def canonical_to_moments(eta: Array, lam: Array) -> tuple[Array, Array]:
    """Inverse of :func:`moments_to_canonical`: ``P = (-2 Lambda)^{-1}``, ``m = P eta``.

    Uses ``inv`` (LU based, not Cholesky), so autodiff w.r.t. ``lam`` is exact.
    """
    cov = jnp.linalg.inv(-2.0 * lam)
    return cov @ eta, cov


def condition_gaussian(
    mean: Array, cov: Array, n_obs: int, value: Array
) -> tuple[Array, Array]:
    """Condition ``N(mean, cov)`` on its last ``n_obs`` components ``= value``.

    Returns the mean ``[n - n_obs]`` and covariance of the remaining block:
    ``m_a + C_ab C_bb^{-1} (value - m_b)``, ``C_aa - C_ab C_bb^{-1} C_ba``.
    """
    n = mean.shape[0] - n_obs
    m_a, m_b = mean[:n], mean[n:]
    c_aa, c_ab, c_bb = cov[:n, :n], cov[:n, n:], cov[n:, n:]
    w = jnp.linalg.solve(c_bb, c_ab.T).T  # C_ab C_bb^{-1}
    return m_a + w @ (value - m_b), symmetrize(c_aa - w @ c_ab.T)


# --------------------------------------------------------------------------
# Forward (filter), observation, backward (smoother)
# --------------------------------------------------------------------------


def _propagate(
    mean: Array, cov: Array, F: Array, b: Array, Q: Array
) -> tuple[Array, Array]:
    """One layer: ``x̂' = F x̂ + b``, ``P' = F P F^T + Q`` (App. A, ``dP_l``)."""
    return F @ mean + b, symmetrize(F @ cov @ F.T + Q)


def chain_filter(chain: GaussianChain) -> ChainMoments:
    """Filtered (prior) moments ``(x̂_l, P_l)`` of ``p(x_l | x_0)``, l = 0..L."""
    means, covs = [chain.m0], [chain.P0]
    for F, b, Q in zip(chain.Fs, chain.bs, chain.Qs, strict=True):
        m, P = _propagate(means[-1], covs[-1], F, b, Q)
        means.append(m)
        covs.append(P)
    return ChainMoments(means, covs)


def _observation_log_likelihood(
    mean_L: Array, cov_L: Array, chain: GaussianChain, y: Array
) -> Array:
    """``log N(y; H x̂_L + c, S_L)`` with ``S_L = H P_L H^T + R``."""
    S = chain.H @ cov_L @ chain.H.T + chain.R
    return gaussian_logpdf(y, chain.H @ mean_L + chain.c, S)


def chain_log_likelihood(chain: GaussianChain, y: Array) -> Array:
    """``log p(y | x_0)`` (scalar); ``J = -chain_log_likelihood`` in Theorem 1."""
    filt = chain_filter(chain)
    return _observation_log_likelihood(filt.means[-1], filt.covs[-1], chain, y)


def log_likelihood_from_layer(
    layer: int, mean: Array, cov: Array, chain: GaussianChain, y: Array
) -> Array:
    """``log p(y)`` when layer ``layer``'s filter is replaced by ``N(mean, cov)``.

    ``mean [n_l]``, ``cov [n_l, n_l]`` are propagated through layers
    ``layer+1..L`` and the observation.  Evaluated at the filtered moments it
    equals :func:`chain_log_likelihood`; its gradient is Theorem 1(3), Eq. 7:
    ``∇_x̂ = P^{-1}(x̂_{l|L} - x̂_l)``,
    ``∇_P = 0.5 P^{-1}(P_{l|L} - P_l + ΔΔ^T) P^{-1}`` (symmetrised autodiff).
    """
    for F, b, Q in zip(
        chain.Fs[layer:], chain.bs[layer:], chain.Qs[layer:], strict=True
    ):
        mean, cov = _propagate(mean, cov, F, b, Q)
    return _observation_log_likelihood(mean, cov, chain, y)


def log_likelihood_from_layer_canonical(
    layer: int, eta: Array, lam: Array, chain: GaussianChain, y: Array
) -> Array:
    """As :func:`log_likelihood_from_layer` in canonical parameters.

    ``eta = P^{-1} x̂ [n_l]``, ``lam = -0.5 P^{-1} [n_l, n_l]``.  Theorem 1(2):
    ``∇_eta log p = x̂_{l|L} - x̂_l``,
    ``∇_lam log p = P_{l|L} + x̂_{l|L}x̂_{l|L}^T - P_l - x̂_l x̂_l^T``.
    """
    mean, cov = canonical_to_moments(eta, lam)
    return log_likelihood_from_layer(layer, mean, cov, chain, y)


def chain_smoother(chain: GaussianChain, y: Array) -> ChainSmootherResult:
    """RTS-style smoother for ``p(x_l | x_0, y)``, l = 0..L.

    Layer L: Kalman update with ``S = H P_L H^T + R``, ``K = P_L H^T S^{-1}``,
    ``x̂_{L|L} = x̂_L + K (y - H x̂_L - c)``, ``P_{L|L} = P_L - K S K^T``.
    Then for l = L-1..0 with ``G_l = P_l F_{l+1}^T P_{l+1}^{-1}`` (Eq. 6;
    the paper prints ``P_{l+1|L}^{-1}`` and a minus in the covariance line,
    both typos, and ``K_L S_L K_L`` for ``K_L S_L K_L^T``)::

        x̂_{l|L} = x̂_l + G_l (x̂_{l+1|L} - x̂_{l+1})
        P_{l|L} = P_l + G_l (P_{l+1|L} - P_{l+1}) G_l^T
    """
    filt = chain_filter(chain)
    m_L, P_L = filt.means[-1], filt.covs[-1]
    S = chain.H @ P_L @ chain.H.T + chain.R
    K = jnp.linalg.solve(S, chain.H @ P_L).T
    innov = y - chain.H @ m_L - chain.c
    means = [m_L + K @ innov]
    covs = [symmetrize(P_L - K @ S @ K.T)]
    gains: list[Array] = []
    for layer in range(chain.num_layers - 1, -1, -1):
        F = chain.Fs[layer]
        m, P = filt.means[layer], filt.covs[layer]
        m_next, P_next = filt.means[layer + 1], filt.covs[layer + 1]
        G = jnp.linalg.solve(P_next, F @ P).T  # P_l F^T P_{l+1}^{-1}
        means.insert(0, m + G @ (means[0] - m_next))
        covs.insert(0, symmetrize(P + G @ (covs[0] - P_next) @ G.T))
        gains.insert(0, G)
    return ChainSmootherResult(means, covs, gains, filt)


# --------------------------------------------------------------------------
# Brute-force reference
# --------------------------------------------------------------------------


def joint_gaussian(chain: GaussianChain) -> tuple[Array, Array, list[int]]:
    """Joint mean and covariance of ``(x_0, x_1, ..., x_L, y)``, stacked.

    Built without any recursion on moments: every variable is an affine map
    ``A e + const`` of the independent noise ``e = (x_0 - m0, w_1..w_L, v)``
    with block-diagonal covariance ``diag(P0, Q_1..Q_L, R)``; the joint
    covariance is ``A diag(.) A^T``.  Returns ``(mean, cov, sizes)`` with
    ``sizes = [n_0, ..., n_L, m]``.
    """
    noise_covs = [chain.P0, *chain.Qs, chain.R]
    noise_sizes = [c.shape[0] for c in noise_covs]
    offsets = [sum(noise_sizes[:i]) for i in range(len(noise_sizes))]
    n_noise = sum(noise_sizes)

    def unit(k: int) -> Array:
        block = jnp.zeros((noise_sizes[k], n_noise))
        return block.at[:, offsets[k] : offsets[k] + noise_sizes[k]].set(
            jnp.eye(noise_sizes[k])
        )

    coeffs, consts = [unit(0)], [chain.m0]
    for layer, (F, b) in enumerate(zip(chain.Fs, chain.bs, strict=True)):
        coeffs.append(F @ coeffs[-1] + unit(layer + 1))
        consts.append(F @ consts[-1] + b)
    coeffs.append(chain.H @ coeffs[-1] + unit(len(noise_covs) - 1))
    consts.append(chain.H @ consts[-1] + chain.c)

    sigma = jax.scipy.linalg.block_diag(*noise_covs)
    A = jnp.concatenate(coeffs, axis=0)
    sizes = [a.shape[0] for a in coeffs]
    return jnp.concatenate(consts), A @ sigma @ A.T, sizes


def joint_gaussian_smoother(chain: GaussianChain, y: Array) -> ChainMoments:
    """Smoothed moments by exact conditioning of :func:`joint_gaussian` on y."""
    mean, cov, sizes = joint_gaussian(chain)
    m_post, c_post = condition_gaussian(mean, cov, sizes[-1], y)
    means, covs, start = [], [], 0
    for n in sizes[:-1]:
        means.append(m_post[start : start + n])
        covs.append(c_post[start : start + n, start : start + n])
        start += n
    return ChainMoments(means, covs)
