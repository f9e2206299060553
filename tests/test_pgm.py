"""Exact references of dualflow.pgm: Kalman/RTS (Theorem 3) and HMM (Theorem 4).

Every quantity is compared with brute force: the joint Gaussian of all states and
observations (conditioned with numpy) for the LGSSM, enumeration of all K^T state
paths for the HMM.  Gradients are checked three ways: autodiff, the backward
recursions of App. C (Eq. 9 / corrected Eq. 10, Eq. 15) and Theorem 1's closed
forms (smoother minus filter).

Largest relative errors observed (float64, max|a-b|/max|b|, all cases and t):
  Kalman  log p(z_{1:t}) vs joint 3.9e-16; filtered moments vs joint 1.8e-15,
          predicted 9.8e-16, S_t 2.8e-16; RTS vs joint conditioning: means
          1.6e-15, covs 1.9e-15; log p(z_{1:t}) + from_filter(t) 1.6e-16
  Thm 3   recursion vs autodiff: mean 3.9e-16, cov 6.3e-16; closed form
          P^{-1}(x̂_{t|T} - x̂_{t|t}) and its covariance analogue vs autodiff:
          1.0e-15, 6.0e-15; Eq. 9 as printed 4.5e-16; Eq. 10 corrected 1.0e-15
          (Eq. 10 as printed: 2.0, i.e. wrong)
  HMM     log p(y) 8.3e-16, α_t 2.5e-16, predictive 3.3e-16, γ_t 3.6e-16;
          autodiff ∇_ell vs γ_t - α_t 2.3e-14 (shifted ell 2.3e-14); value
          decomposition 1.2e-15; Eq. 15 recursion vs autodiff 3.1e-14; Eq. 15
          with enumerated kernels 2.7e-14
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from dualflow import pgm

GAUSS_RTOL = 1e-8
HMM_RTOL = 1e-10

# Largest error seen per check (filled by `_check`, read when updating the docstring).
MAX_ERRORS: dict[str, float] = {}


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _check(name: str, a, b, rtol: float) -> None:
    err = rel_err(a, b)
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), err)
    assert err < rtol, f"{name}: relative error {err:.3e}"


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


to_np = partial(jax.tree.map, np.asarray)


# ---------------------------------------------------------------------------
# Kalman filter / RTS smoother / Theorem 3
# ---------------------------------------------------------------------------


def _spd(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.normal(size=(n, n))
    return a @ a.T / n + 0.5 * np.eye(n)


def _np_condition(mean, cov, idx_a, idx_b, value):
    """Moments of block a given block b = value (plain numpy)."""
    c_ab = cov[np.ix_(idx_a, idx_b)]
    w = np.linalg.solve(cov[np.ix_(idx_b, idx_b)], c_ab.T).T
    m = mean[idx_a] + w @ (value - mean[idx_b])
    return m, cov[np.ix_(idx_a, idx_a)] - w @ c_ab.T


class KalmanCase(NamedTuple):
    model: pgm.LGSSM
    z: np.ndarray  # [T, m]
    filt: pgm.KalmanFilterResult
    sm: pgm.RTSSmootherResult
    rec: tuple[np.ndarray, np.ndarray]  # Theorem 3 recursion (a, B)
    auto: tuple[np.ndarray, np.ndarray]  # autodiff (∇_x̂, sym ∇_P), t = 0..T
    from_filter: np.ndarray  # log_likelihood_from_filter(t) at the filter, [T+1]
    joint: tuple[np.ndarray, np.ndarray]  # lgssm_joint_gaussian


# One compilation per shape, shared by all cases and times t (t is traced).
_KALMAN_VG = jax.jit(jax.value_and_grad(pgm.log_likelihood_from_filter, argnums=(1, 2)))

# (n, m, T, seed); one shape only (each new shape costs seconds of compilation).
KALMAN_CASES = [(3, 2, 6, 0), (3, 2, 6, 1)]


@pytest.fixture(scope="module", params=KALMAN_CASES, ids=lambda c: f"n{c[0]}m{c[1]}")
def kcase(request, x64) -> KalmanCase:
    n, m, T, seed = request.param
    rng = np.random.default_rng(seed)
    model = pgm.LGSSM(
        F=jnp.asarray(rng.normal(size=(n, n)) / np.sqrt(n)),
        Q=jnp.asarray(_spd(rng, n)),
        H=jnp.asarray(rng.normal(size=(m, n))),
        R=jnp.asarray(_spd(rng, m)),
        m0=jnp.asarray(rng.normal(size=n)),
        P0=jnp.asarray(_spd(rng, n)),
    )
    z = jnp.asarray(rng.normal(size=(T, m)))
    filt = pgm.kalman_filter(model, z)
    assert filt.filtered_covs.dtype == jnp.float64

    fm, fc = filt.filtered_means, filt.filtered_covs
    vgs = [_KALMAN_VG(t, fm[t], fc[t], model, z) for t in range(T + 1)]
    auto = (
        np.stack([np.asarray(g[0]) for _, g in vgs]),
        np.stack([_sym(np.asarray(g[1])) for _, g in vgs]),
    )
    values = np.array([v for v, _ in vgs])
    return KalmanCase(
        model=to_np(model),
        z=np.asarray(z),
        filt=to_np(filt),
        sm=to_np(pgm.rts_smoother(model, filt)),
        rec=to_np(pgm.kalman_gradient_recursion(model, filt)),
        auto=auto,
        from_filter=values,
        joint=to_np(pgm.lgssm_joint_gaussian(model, T)),
    )


def _state_idx(kc: KalmanCase, t: int) -> np.ndarray:
    n = kc.model.F.shape[0]
    return np.arange(n * t, n * (t + 1))


def _obs_idx(kc: KalmanCase, t_from: int, t_to: int) -> np.ndarray:
    """Indices of z_{t_from..t_to} (1-based times, inclusive) in the joint."""
    n, m = kc.model.F.shape[0], kc.model.H.shape[0]
    start = n * (kc.z.shape[0] + 1)
    return np.arange(start + m * (t_from - 1), start + m * t_to)


# observed max rel err: 3.9e-16
def test_kalman_log_likelihood_matches_joint(kcase):
    """log p(z_{1:t}) = Σ_{s<=t} log N(ε_s; 0, S_s) equals the joint marginal."""
    mean, cov = kcase.joint
    T = kcase.z.shape[0]
    cumulative = np.cumsum(kcase.filt.log_likelihoods)
    for t in range(1, T + 1):
        idx = _obs_idx(kcase, 1, t)
        ref = multivariate_normal(mean[idx], cov[np.ix_(idx, idx)]).logpdf(
            kcase.z[:t].reshape(-1)
        )
        _check("kalman_loglik", cumulative[t - 1], ref, GAUSS_RTOL)
    _check("kalman_loglik", kcase.filt.log_likelihood, ref, GAUSS_RTOL)


# observed max rel err: filtered 1.8e-15, predicted 9.8e-16, S_t 2.8e-16
def test_kalman_filter_matches_joint(kcase):
    """Filtered/predicted moments and S_t equal exact conditioning of the joint."""
    mean, cov = kcase.joint
    f, z = kcase.filt, kcase.z
    for t in range(1, z.shape[0] + 1):
        obs = _obs_idx(kcase, 1, t)
        m_f, P_f = _np_condition(mean, cov, _state_idx(kcase, t), obs, z[:t].ravel())
        _check("kalman_filtered", f.filtered_means[t], m_f, GAUSS_RTOL)
        _check("kalman_filtered", f.filtered_covs[t], P_f, GAUSS_RTOL)
        if t == 1:
            m_p, P_p = (
                mean[_state_idx(kcase, 1)],
                cov[np.ix_(*[_state_idx(kcase, 1)] * 2)],
            )
            S = cov[np.ix_(*[_obs_idx(kcase, 1, 1)] * 2)]
        else:
            prev = _obs_idx(kcase, 1, t - 1)
            m_p, P_p = _np_condition(
                mean, cov, _state_idx(kcase, t), prev, z[: t - 1].ravel()
            )
            _, S = _np_condition(
                mean, cov, _obs_idx(kcase, t, t), prev, z[: t - 1].ravel()
            )
        _check("kalman_predicted", f.predicted_means[t - 1], m_p, GAUSS_RTOL)
        _check("kalman_predicted", f.predicted_covs[t - 1], P_p, GAUSS_RTOL)
        _check("kalman_S", f.innovation_covs[t - 1], S, GAUSS_RTOL)


# observed max rel err: means 1.6e-15, covs 1.9e-15
def test_rts_matches_joint(kcase):
    """RTS smoother == conditioning every x_t on z_{1:T} in the joint."""
    mean, cov = kcase.joint
    T = kcase.z.shape[0]
    obs = _obs_idx(kcase, 1, T)
    for t in range(T + 1):
        m_s, P_s = _np_condition(mean, cov, _state_idx(kcase, t), obs, kcase.z.ravel())
        _check("rts_mean", kcase.sm.means[t], m_s, GAUSS_RTOL)
        _check("rts_cov", kcase.sm.covs[t], P_s, GAUSS_RTOL)


# observed max rel err: 1.6e-16
def test_log_likelihood_from_filter_decomposes(kcase):
    """log p(z_{1:t}) + log p(z_{t+1:T} | z_{1:t}) = log p(z_{1:T}) for all t."""
    head = np.concatenate([[0.0], np.cumsum(kcase.filt.log_likelihoods)])
    total = kcase.filt.log_likelihood
    for t in range(kcase.z.shape[0] + 1):
        _check(
            "kalman_decomposition", head[t] + kcase.from_filter[t], total, GAUSS_RTOL
        )


# observed max rel err: mean 3.9e-16, cov 6.3e-16
def test_theorem3_recursion_matches_autodiff(kcase):
    """Theorem 3 backward recursion == autodiff of log_likelihood_from_filter."""
    a, B = kcase.rec
    ga, gB = kcase.auto
    T = kcase.z.shape[0]
    for t in range(T):
        _check("thm3_rec_mean", a[t], ga[t], GAUSS_RTOL)
        _check("thm3_rec_cov", B[t], gB[t], GAUSS_RTOL)
    # Nothing is observed after T: both gradients vanish.
    assert np.all(a[T] == 0) and np.all(B[T] == 0)
    np.testing.assert_allclose(ga[T], 0.0, atol=1e-14)
    np.testing.assert_allclose(gB[T], 0.0, atol=1e-14)


# observed max rel err: mean 1.0e-15, cov 6.0e-15
def test_theorem3_closed_form(kcase):
    """Theorem 1 for the LGSSM: gradients are smoother-minus-filter differences.

    ∇_{x̂_{t|t}} log p = P_{t|t}^{-1} Δ_t,
    ∇_{P_{t|t}} log p = 0.5 P_{t|t}^{-1}(P_{t|T} - P_{t|t} + Δ_t Δ_t^T) P_{t|t}^{-1}.
    """
    ga, gB = kcase.auto
    f, sm = kcase.filt, kcase.sm
    for t in range(kcase.z.shape[0]):
        P_inv = np.linalg.inv(f.filtered_covs[t])
        delta = sm.means[t] - f.filtered_means[t]
        _check("thm3_closed_mean", P_inv @ delta, ga[t], GAUSS_RTOL)
        inner = sm.covs[t] - f.filtered_covs[t] + np.outer(delta, delta)
        _check("thm3_closed_cov", 0.5 * P_inv @ inner @ P_inv, gB[t], GAUSS_RTOL)


# observed max rel err: Eq. 9 4.5e-16, corrected Eq. 10 1.0e-15
# (printed Eq. 10: 2.0)
def test_theorem3_printed_equations(kcase):
    """Eq. 9 as printed holds; Eq. 10 holds only in its corrected form.

    With M = P_{t|t-1}^{-1} P_{t|t}, u = H^T S^{-1} ε, B = ∇_P (true gradient):
      -2 B_{t-1} = F^T M (-2 B_t) M^T F - F^T (M a_t u^T + u a_t^T M^T) F
                   + F^T H^T S^{-1} H F - F^T u u^T F.
    The printed Eq. 10 (first term without -2, second with +2 M a u^T) is O(1) off.
    """
    ga, gB = kcase.auto
    F, H = kcase.model.F, kcase.model.H
    f = kcase.filt
    printed_errors = []
    for t in range(1, kcase.z.shape[0] + 1):
        M = np.linalg.solve(f.predicted_covs[t - 1], f.filtered_covs[t])
        S_inv = np.linalg.inv(f.innovation_covs[t - 1])
        u = H.T @ S_inv @ f.innovations[t - 1]
        a, B = ga[t], gB[t]
        _check("eq9", F.T @ M @ a + F.T @ u, ga[t - 1], GAUSS_RTOL)
        obs_term = F.T @ H.T @ S_inv @ H @ F - F.T @ np.outer(u, u) @ F
        cross = F.T @ (np.outer(M @ a, u) + np.outer(u, M @ a)) @ F
        fixed = F.T @ M @ (-2 * B) @ M.T @ F - cross + obs_term
        _check("eq10_corrected", -0.5 * fixed, gB[t - 1], GAUSS_RTOL)
        printed = F.T @ M @ B @ M.T @ F + 2 * F.T @ np.outer(M @ a, u) @ F + obs_term
        printed_errors.append(rel_err(-0.5 * _sym(printed), gB[t - 1]))
    # The printed Eq. 10 is not the gradient (it is exact only at t = T, where
    # a_T = B_T = 0); record how far off it is.
    MAX_ERRORS["eq10_as_printed"] = max(
        MAX_ERRORS.get("eq10_as_printed", 0.0), max(printed_errors)
    )
    assert max(printed_errors) > 1e-3


# ---------------------------------------------------------------------------
# HMM / Theorem 4
# ---------------------------------------------------------------------------


class HMMCase(NamedTuple):
    log_pi: np.ndarray
    log_A: np.ndarray
    log_lik: np.ndarray
    fwd: pgm.HMMForwardResult
    log_gamma: np.ndarray
    rec: np.ndarray  # Eq. 15 recursion [T, K]
    auto: np.ndarray  # autodiff ∇_ell log p(y) at ell = log α_t, [T, K]
    auto_shifted: np.ndarray  # same at ell = log α_t + 3.7
    from_filter: np.ndarray  # log_likelihood_from_log_filter(t) [T]


_HMM_VG = jax.jit(jax.value_and_grad(pgm.log_likelihood_from_log_filter, argnums=1))

HMM_CASES = [(3, 5, 0), (3, 5, 1)]  # (K, T, seed)


@pytest.fixture(
    scope="module", params=HMM_CASES, ids=lambda c: f"K{c[0]}T{c[1]}s{c[2]}"
)
def hcase(request, x64) -> HMMCase:
    K, T, seed = request.param
    rng = np.random.default_rng(seed)
    log_pi = jnp.log(jnp.asarray(rng.dirichlet(np.ones(K))))
    log_A = jnp.log(jnp.asarray(rng.dirichlet(np.ones(K), size=K)))
    log_lik = jnp.asarray(rng.normal(size=(T, K)))
    fwd = pgm.hmm_forward(log_pi, log_A, log_lik)
    assert fwd.log_alpha.dtype == jnp.float64
    la = fwd.log_alpha
    vgs = [_HMM_VG(t, la[t], log_A, log_lik) for t in range(T)]
    return HMMCase(
        log_pi=np.asarray(log_pi),
        log_A=np.asarray(log_A),
        log_lik=np.asarray(log_lik),
        fwd=to_np(fwd),
        log_gamma=np.asarray(pgm.hmm_smoother(log_pi, log_A, log_lik)),
        rec=np.asarray(pgm.hmm_gradient_recursion(la, log_A, log_lik)),
        auto=np.stack([g for _, g in vgs]),
        auto_shifted=np.stack(
            [_HMM_VG(t, la[t] + 3.7, log_A, log_lik)[1] for t in range(T)]
        ),
        from_filter=np.array([v for v, _ in vgs]),
    )


def _path_weights(hc: HMMCase, t: int, last_lik: bool = True) -> np.ndarray:
    """p(x_0..x_t, y_0..y_t) by enumeration, shape [K]*(t+1).

    With ``last_lik=False`` the factor p(y_t | x_t) is left out.
    """
    K = hc.log_pi.shape[0]
    w = np.zeros([K] * (t + 1))
    for path in itertools.product(range(K), repeat=t + 1):
        log_w = hc.log_pi[path[0]] + sum(
            hc.log_A[path[s - 1], path[s]] for s in range(1, t + 1)
        )
        log_w += sum(hc.log_lik[s, path[s]] for s in range(t + (1 if last_lik else 0)))
        w[path] = np.exp(log_w)
    return w


def _marginal(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum out every axis not in ``axes``."""
    return w.sum(axis=tuple(i for i in range(w.ndim) if i not in axes))


def _brute_force(hc: HMMCase):
    """(log p(y), α [T, K], predictive [T, K], γ [T, K]) by enumeration."""
    T = hc.log_lik.shape[0]
    full = _path_weights(hc, T - 1)
    gamma = np.stack([_marginal(full, (t,)) for t in range(T)]) / full.sum()
    alpha, pred = [], []
    for t in range(T):
        a = _marginal(_path_weights(hc, t), (t,))
        p = _marginal(_path_weights(hc, t, last_lik=False), (t,))
        alpha.append(a / a.sum())
        pred.append(p / p.sum())
    return np.log(full.sum()), np.stack(alpha), np.stack(pred), gamma


# observed max rel err: log p(y) 8.3e-16, alpha 2.5e-16, predictive 3.3e-16
def test_hmm_forward_matches_enumeration(hcase):
    log_z, alpha, pred, _ = _brute_force(hcase)
    _check("hmm_loglik", hcase.fwd.log_likelihood, log_z, HMM_RTOL)
    _check("hmm_alpha", np.exp(hcase.fwd.log_alpha), alpha, HMM_RTOL)
    _check("hmm_predicted", np.exp(hcase.fwd.log_predicted), pred, HMM_RTOL)


# observed max rel err: 3.6e-16
def test_hmm_smoother_matches_enumeration(hcase):
    *_, gamma = _brute_force(hcase)
    _check("hmm_gamma", np.exp(hcase.log_gamma), gamma, HMM_RTOL)


# observed max rel err: gradient 2.3e-14 (shifted 2.3e-14), value 1.2e-15
def test_hmm_gradient_is_gamma_minus_alpha(hcase):
    """Theorem 1(2) for the HMM: ∇_ell log p(y) = γ_t - α_t at softmax(ell) = α_t."""
    log_z, alpha, _, gamma = _brute_force(hcase)
    T = alpha.shape[0]
    head = np.cumsum(hcase.fwd.log_norms)
    for t in range(T - 1):
        _check("hmm_grad", hcase.auto[t], gamma[t] - alpha[t], HMM_RTOL)
        _check("hmm_grad_shifted", hcase.auto_shifted[t], gamma[t] - alpha[t], HMM_RTOL)
        _check("hmm_decomposition", head[t] + hcase.from_filter[t], log_z, HMM_RTOL)
    np.testing.assert_allclose(hcase.auto[T - 1], 0.0, atol=1e-15)
    np.testing.assert_allclose(np.sum(hcase.auto, axis=1), 0.0, atol=1e-14)


# observed max rel err: recursion 3.1e-14, enumerated Eq. 15 2.7e-14
def test_hmm_eq15_recursion(hcase):
    """Eq. 15 reproduces the autodiff gradient, and holds with enumerated kernels.

    g_{t-1}(i) = Σ_j p(x_{t-1}=i | x_t=j, y_{<t}) g_t(j) + p(x_{t-1}=i | y_{<=t})
                 - α_{t-1}(i).
    """
    T = hcase.log_lik.shape[0]
    for t in range(T - 1):
        _check("eq15_recursion", hcase.rec[t], hcase.auto[t], HMM_RTOL)
    assert np.all(hcase.rec[T - 1] == 0)
    # Eq. 15 verbatim, every probability from enumeration, g_t = autodiff.
    _, alpha, _, _ = _brute_force(hcase)
    for t in range(1, T - 1):
        pair = _marginal(_path_weights(hcase, t, last_lik=False), (t - 1, t))
        kernel = pair / pair.sum(axis=0, keepdims=True)  # [x_{t-1}, x_t]
        rho = _marginal(_path_weights(hcase, t), (t - 1,))
        eq15 = kernel @ hcase.auto[t] + rho / rho.sum() - alpha[t - 1]
        _check("eq15_enumerated", eq15, hcase.auto[t - 1], HMM_RTOL)
