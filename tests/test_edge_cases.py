"""Numerical edge cases (issue 18, "nothing silent, nothing lost").

1. HMM with zero probabilities (left-to-right chains, forbidden transitions,
   impossible emissions): filter, smoother, Eq. 15 recursion and gradients
   against enumeration of all state paths; zeros exact, nothing NaN.
2. ECE equal-width bin edges: confidences exactly on an edge ``k/B`` are binned
   by the documented convention (edge ``fl(k/B)`` opens bin ``k``) in float32
   and float64, eager and jitted, against a ``fractions.Fraction`` reference.
3. tanh / sigmoid derivatives at saturation (``|m|`` up to 40): autodiff of
   the linearized and matched moments against float64 references built from
   ``sech^2(x) = 4 e^{-2|x|} / (1 + e^{-2|x|})^2``.
4. Out-of-range labels raise (eager) or give NaN (traced); bfloat16 activations
   compute in float32 and return bfloat16.
5. Forward mode through ``propagate(..., backward="bp")`` raises a TypeError
   naming ``backward="autodiff"``; ``backward="autodiff"`` supports ``jax.jvp``.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualflow
from dualflow import Gaussian, metrics, objectives, pgm
from dualflow.moments import _closed_forms as cf
from dualflow.moments import activations as acts

# ---------------------------------------------------------------------------
# 1. HMM with zero probabilities
# ---------------------------------------------------------------------------

HMM_ATOL = 1e-12  # probabilities / gradients are O(1): absolute tolerance


def _hmm_brute_force(log_pi: np.ndarray, log_A: np.ndarray, log_lik: np.ndarray):
    """Exact quantities by enumerating all ``K^T`` state paths (float64 numpy).

    Returns ``(log_z, alpha [T, K], gamma [T, K], xi_sum [K, K])`` with
    ``alpha_t = p(x_t | y_{0:t})``, ``gamma_t = p(x_t | y_{0:T-1})`` and
    ``xi_sum[i, j] = sum_t p(x_{t-1}=i, x_t=j | y)`` (expected transitions).
    Zero-probability events contribute exactly 0 (``exp(-inf) = 0``).
    """
    T, K = log_lik.shape
    pi, A, lik = np.exp(log_pi), np.exp(log_A), np.exp(log_lik)
    prefix = np.zeros((T, K))  # sum over paths of p(x_{0:t}, y_{0:t}) by x_t
    gamma = np.zeros((T, K))
    xi = np.zeros((K, K))
    z = 0.0
    for path in itertools.product(range(K), repeat=T):
        w = pi[path[0]] * lik[0, path[0]]
        prefix[0, path[0]] += w / K ** (T - 1)  # each prefix is seen K^(T-1) times
        for t in range(1, T):
            w *= A[path[t - 1], path[t]] * lik[t, path[t]]
            prefix[t, path[t]] += w / K ** (T - 1 - t)
        z += w
        for t in range(T):
            gamma[t, path[t]] += w
        for t in range(1, T):
            xi[path[t - 1], path[t]] += w
    alpha = prefix / prefix.sum(axis=1, keepdims=True)
    return np.log(z), alpha, gamma / z, xi / z


def _left_to_right(K: int, T: int, seed: int):
    """Left-to-right chain starting in state 0 (``pi = e_0``): from state ``i``
    only ``i`` (stay) or ``i + 1`` (advance), so state ``j`` is unreachable
    before ``t = j``."""
    rng = np.random.default_rng(seed)
    i, j = np.indices((K, K))
    A = rng.uniform(0.2, 1.0, size=(K, K)) * ((j == i) | (j == i + 1))
    A /= A.sum(axis=1, keepdims=True)
    pi = np.eye(K)[0]
    with np.errstate(divide="ignore"):
        return np.log(pi), np.log(A), rng.normal(size=(T, K))


def _with_zero_emissions(log_lik: np.ndarray, seed: int) -> np.ndarray:
    """Set ~1/3 of the emission probabilities to 0 (never a whole row)."""
    rng = np.random.default_rng(seed + 100)
    out = log_lik.copy()
    mask = rng.uniform(size=out.shape) < 0.35
    mask[:, 0] &= ~mask[:, 1:].all(axis=1)  # keep one finite entry per row
    mask[np.all(mask, axis=1), 0] = False
    out[mask] = -np.inf
    return out


def _dense(K: int, T: int, seed: int):
    rng = np.random.default_rng(seed)
    return (
        np.log(rng.dirichlet(np.ones(K))),
        np.log(rng.dirichlet(np.ones(K), size=K)),
        rng.normal(size=(T, K)),
    )


def _issue_case():
    with np.errstate(divide="ignore"):
        return (
            np.log([1.0, 0.0]),
            np.log([[1.0, 0.0], [0.5, 0.5]]),
            np.zeros((3, 2)),
        )


def _hmm_cases():
    cases = {"issue_left_to_right_K2T3": _issue_case()}
    for seed in (0, 1):
        cases[f"left_to_right_K4T5_s{seed}"] = _left_to_right(4, 5, seed)
        lp, la, ll = _dense(3, 5, seed)
        cases[f"dense_K3T5_s{seed}"] = (lp, la, ll)
        cases[f"zero_emission_K3T5_s{seed}"] = (lp, la, _with_zero_emissions(ll, seed))
    lp, la, ll = _left_to_right(4, 5, 7)
    cases["left_to_right_zero_emission_K4T5"] = (lp, la, _with_zero_emissions(ll, 7))
    # forbidden transition in a dense chain + a state with pi = 0
    lp, la, ll = _dense(3, 4, 3)
    la = la.copy()
    la[0, 2] = -np.inf
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([0.6, 0.4, 0.0]))  # state 2 only reachable from 1
    cases["forbidden_transition_K3T4"] = (lp, la, ll)
    return cases


HMM_CASES = _hmm_cases()


def _close_with_exact_zeros(name: str, got, ref) -> None:
    got = np.asarray(got)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values {got}"
    np.testing.assert_allclose(got, ref, rtol=0, atol=HMM_ATOL, err_msg=name)
    zero = ref == 0
    assert np.all(got[zero] == 0), f"{name}: zero-probability entries {got[zero]}"


@pytest.mark.parametrize("case", sorted(HMM_CASES))
def test_hmm_zero_probabilities_match_enumeration(case, x64):
    """Filter, smoother, Eq. 15 and every gradient of log p(y) vs enumeration.

    Observed max abs error over all cases (float64): 5.6e-16 (filter,
    smoother), 4.4e-16 (gradients), 8.9e-16 (Eq. 15 recursion).  Before the
    fix the four left-to-right cases gave NaN smoother rows, Eq. 15 rows and
    gradients.
    """
    log_pi, log_A, log_lik = HMM_CASES[case]
    log_z, alpha, gamma, xi = _hmm_brute_force(log_pi, log_A, log_lik)
    assert np.isfinite(log_z)
    lp, la, ll = (jnp.asarray(a) for a in (log_pi, log_A, log_lik))

    fwd = pgm.hmm_forward(lp, la, ll)
    np.testing.assert_allclose(fwd.log_likelihood, log_z, rtol=1e-13, atol=1e-13)
    _close_with_exact_zeros("alpha", np.exp(fwd.log_alpha), alpha)
    _close_with_exact_zeros("gamma", np.exp(pgm.hmm_smoother(lp, la, ll)), gamma)
    _close_with_exact_zeros(
        "eq15", pgm.hmm_gradient_recursion(fwd.log_alpha, la, ll), gamma - alpha
    )

    # gradients of log p(y) through the forward pass w.r.t. the log parameters
    grads = jax.grad(
        lambda a, b, c: pgm.hmm_forward(a, b, c).log_likelihood, argnums=(0, 1, 2)
    )(lp, la, ll)
    _close_with_exact_zeros("dlogZ/dlog_pi", grads[0], gamma[0])
    _close_with_exact_zeros("dlogZ/dlog_A", grads[1], xi)
    _close_with_exact_zeros("dlogZ/dlog_lik", grads[2], gamma)

    # Theorem 1(2): grad wrt the filter's log-parameters is gamma_t - alpha_t
    vg = jax.grad(pgm.log_likelihood_from_log_filter, argnums=1)
    T = log_lik.shape[0]
    for t in range(T):
        _close_with_exact_zeros(
            f"grad_ell[{t}]", vg(t, fwd.log_alpha[t], la, ll), gamma[t] - alpha[t]
        )


def test_hmm_issue_example_smoother_rows(x64):
    """The reported case: all three smoothed rows are [1, 0], nothing NaN."""
    lp, la, ll = (jnp.asarray(a) for a in _issue_case())
    gamma = np.exp(np.asarray(pgm.hmm_smoother(lp, la, ll)))
    assert np.array_equal(gamma, np.array([[1.0, 0.0]] * 3))


# ---------------------------------------------------------------------------
# 2. ECE bin edges
# ---------------------------------------------------------------------------


def _edge_bin(conf: float, num_bins: int, dtype) -> int:
    """Documented convention: bin index = #{k in 1..B-1 : fl_dtype(k/B) <= conf}.

    ``fl_dtype(k/B)`` is the float of ``dtype`` nearest to the rational ``k/B``
    (found exactly with Fractions among the neighbours of a float64 guess).
    """
    c = Fraction(float(conf))
    count = 0
    for k in range(1, num_bins):
        if Fraction(float(_nearest(Fraction(k, num_bins), dtype))) <= c:
            count += 1
    return count


def _nearest(x: Fraction, dtype) -> np.floating:
    """The float of ``dtype`` nearest to ``x`` (ties to even), by exact search."""
    guess = np.asarray(float(x)).astype(dtype)
    cands = [guess]
    for direction in (-np.inf, np.inf):
        cands.append(np.nextafter(guess, np.asarray(direction, dtype)))
    err = [abs(Fraction(float(c)) - x) for c in cands]
    best = min(err)
    winners = [c for c, e in zip(cands, err, strict=True) if e == best]
    if len(winners) > 1:  # exact tie: even significand
        winners = [c for c in winners if int(c.view(f"u{c.itemsize}")) % 2 == 0]
    return winners[0]


def _ece_reference(probs: np.ndarray, labels: np.ndarray, num_bins: int, dtype):
    """Exact ECE (as a Fraction) with the documented equal-width convention."""
    n = probs.shape[0]
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    sums = [Fraction(0)] * num_bins
    for c, ok in zip(conf, correct, strict=True):
        b = _edge_bin(c, num_bins, dtype)
        sums[b] += int(ok) - Fraction(float(c))
    return sum(abs(s) for s in sums) / n


def _hard_vote(members: int, n: int, num_classes: int, seed: int, dtype):
    """Hard-vote ensemble: probabilities k / members, correctly rounded.

    Labels are drawn so that groups of neighbouring confidence are alternately
    over- and under-confident (accuracy ``conf +- 0.25``): moving a group to
    the neighbouring bin then changes the ECE, not just the bin counts.
    """
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, num_classes, size=(n, members))
    counts = np.stack([(votes == k).sum(1) for k in range(num_classes)], 1)
    probs = (counts / members).astype(dtype)  # fl(k / members) in dtype
    top = counts.argmax(axis=1)
    k_top = counts.max(axis=1)
    p_correct = np.clip(k_top / members + np.where(k_top % 2 == 0, 0.25, -0.25), 0, 1)
    other = (top + rng.integers(1, num_classes, size=n)) % num_classes
    labels = np.where(rng.uniform(size=n) < p_correct, top, other)
    return probs, labels


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("members,num_bins", [(10, 10), (15, 15), (10, 5), (15, 10)])
def test_ece_confidences_on_bin_edges(dtype, members, num_bins):
    """Every confidence k/members (many exactly on an edge) binned as documented.

    Before the fix (edges built inside jit as arange(1, B) / B), 0.3, 0.6, 0.7
    (float64, B = 10) and 0.2, 0.4, 0.466.., 0.8, 0.866.., 0.933.. (float32,
    B = 15) fell
    one bin low (|ece - exact| up to 7e-2 in these cases).  Observed now
    |ece - exact| <= 1.6e-15 (float64), 9e-7 (float32); counts exact.
    """
    with jax.enable_x64(dtype == "float64"):
        probs, labels = _hard_vote(
            members, 600, 3, seed=members + num_bins, dtype=dtype
        )
        ref = float(_ece_reference(probs, labels, num_bins, np.dtype(dtype)))
        eps = float(np.finfo(dtype).eps)
        jit_ece = jax.jit(metrics.ece, static_argnames=("num_bins", "binning"))
        for fn in (metrics.ece, jit_ece):
            got = float(fn(probs, labels, num_bins=num_bins))
            assert abs(got - ref) <= 64 * eps, (got, ref)
        # per-bin counts: exactly the reference's assignment
        conf = probs.max(axis=1)
        ref_counts = np.bincount(
            [_edge_bin(c, num_bins, np.dtype(dtype)) for c in conf], minlength=num_bins
        )
        bins = metrics.calibration_bins(probs, labels, num_bins=num_bins)
        np.testing.assert_array_equal(np.asarray(bins.count), ref_counts)


def test_ece_edges_are_correctly_rounded():
    """The edge constants are the nearest floats to k/B (B <= 60; f16/f32/f64)."""
    for dtype in ("float16", "float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            for num_bins in range(2, 61):
                got = np.asarray(metrics._exact_inner_edges(num_bins, np.dtype(dtype)))
                assert got.dtype == np.dtype(dtype)
                want = [
                    _nearest(Fraction(k, num_bins), np.dtype(dtype))
                    for k in range(1, num_bins)
                ]
                np.testing.assert_array_equal(got, np.array(want, dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ece_every_edge_confidence_lands_in_upper_bin(dtype):
    """conf = fl(k/B) exactly opens bin k (eager and jitted)."""
    jit_bins = jax.jit(
        metrics.calibration_bins, static_argnames=("num_bins", "binning")
    )
    with jax.enable_x64(dtype == "float64"):
        for num_bins in (3, 6, 7, 10, 12, 15, 20, 30):
            k = np.arange(1, num_bins)
            conf = (k / num_bins).astype(dtype)
            probs = np.stack([conf, 1 - conf], 1).astype(dtype)
            probs = np.where(conf[:, None] >= 0.5, probs, probs[:, ::-1])
            labels = np.zeros(len(k), np.int32)
            conf_sorted = np.sort(probs.max(axis=1))
            expect = [_edge_bin(c, num_bins, np.dtype(dtype)) for c in conf_sorted]
            for fn in (metrics.calibration_bins, jit_bins):
                bins = fn(probs, labels, num_bins=num_bins)
                idx = np.repeat(np.arange(num_bins), np.asarray(bins.count))
                np.testing.assert_array_equal(idx, expect, err_msg=f"B={num_bins}")


def test_ece_issue_hard_vote_example(x64):
    """A 10-member hard-vote ensemble (confidences k/10), float64, B = 10.

    Bin k must hold exactly the examples with confidence k/10.
    """
    probs, labels = _hard_vote(10, 400, 4, seed=0, dtype="float64")
    conf = probs.max(axis=1)
    bins = metrics.calibration_bins(probs, labels, num_bins=10)
    counts = np.bincount(np.rint(conf * 10).astype(int), minlength=11)[:10]
    counts[9] += np.sum(conf == 1.0)
    np.testing.assert_array_equal(np.asarray(bins.count), counts)
    ref = float(_ece_reference(probs, labels, 10, np.dtype("float64")))
    np.testing.assert_allclose(
        float(metrics.ece(probs, labels, num_bins=10)), ref, rtol=0, atol=1e-15
    )


def test_ece_equal_mass_edges_unaffected(x64):
    """equal_mass ignores edges: tied k/10 confidences still split by count."""
    probs, labels = _hard_vote(10, 100, 3, seed=1, dtype="float64")
    bins = metrics.calibration_bins(probs, labels, num_bins=10, binning="equal_mass")
    assert np.all(np.asarray(bins.count) == 10)


# ---------------------------------------------------------------------------
# 3. tanh / sigmoid derivatives at saturation
# ---------------------------------------------------------------------------

SAT_M = (5.0, 10.0, 20.0, 40.0)
SAT_RTOL = 1e-10


def _sech2(x: np.ndarray) -> np.ndarray:
    e = np.exp(-2.0 * np.abs(x))
    return 4.0 * e / (1.0 + e) ** 2


def _dsigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return e / (1.0 + e) ** 2


def _d2sigmoid(x: np.ndarray) -> np.ndarray:
    # sigma'' = sigma' (1 - 2 sigma) = sigma' * tanh(-x / 2)
    return _dsigmoid(x) * np.tanh(-0.5 * x)


def _d2tanh(x: np.ndarray) -> np.ndarray:
    return -2.0 * _sech2(x) * np.tanh(x)


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref) / np.abs(ref)))


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_saturated_derivatives_linearized(name, x64):
    """d mean / d m and d var / d v of the linearized op vs sech^2 / sigma'.

    Before: jnp.tanh's autodiff 1 - tanh^2 gave relative error 2e-8 at
    |m| = 10 and 1 (exactly 0) at |m| = 20, 40.  Observed now <= 4e-16.
    """
    m = np.array([s * x for x in SAT_M for s in (1.0, -1.0)])
    d1, d2 = (_sech2, _d2tanh) if name == "tanh" else (_dsigmoid, _d2sigmoid)
    fn = getattr(acts, name)
    for backward in ("autodiff", "bp"):

        def mean_sum(mm, backward=backward):
            return jnp.sum(fn(Gaussian(mm, jnp.zeros_like(mm)), backward=backward).mean)

        assert _rel(jax.grad(mean_sum)(jnp.asarray(m)), d1(m)) <= SAT_RTOL
    # d var / d m (autodiff) = 2 f' f'' v
    v = 0.3

    def var_sum(mm):
        return jnp.sum(fn(Gaussian(mm, jnp.full_like(mm, v)), backward="autodiff").var)

    assert _rel(jax.grad(var_sum)(jnp.asarray(m)), 2 * d1(m) * d2(m) * v) <= SAT_RTOL
    # second derivative of the primitive itself
    f = acts._tanh if name == "tanh" else acts._sigmoid
    g2 = jax.vmap(jax.grad(jax.grad(f)))(jnp.asarray(m))
    assert _rel(g2, d2(m)) <= SAT_RTOL


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
@pytest.mark.parametrize("var", [0.01, 0.25, 0.5])
def test_saturated_derivatives_matched(name, var, x64):
    """Autodiff d mean / d v and d gain / d v of the matched quadrature.

    For ``s <= scale / 2`` the kernel is a fixed 48-point Gauss-Hermite rule,
    ``mean = sum_j w_j f(m + s z_j)``, so exactly
    ``d mean / d v = sum_j w_j f'(a_j) z_j / (2 s)`` and
    ``d gain / d v = sum_j w_j f''(a_j) z_j / (2 s)``; the reference evaluates
    these sums in float64 with the exp-form sech^2.  Before: relative error of
    d mean / d v 3e-8 (|m| = 10), 1 (|m| >= 20; autodiff gave 0 or garbage).
    Observed now <= 2e-14.
    """
    scale = cf.SINGULARITY_SCALE[name]
    s = np.sqrt(var)
    assert scale >= 2.0 * s  # Gauss-Hermite branch of sinh_quadrature_moments
    z, w = np.polynomial.hermite_e.hermegauss(48)
    w = w / w.sum()
    d1, d2 = (_sech2, _d2tanh) if name == "tanh" else (_dsigmoid, _d2sigmoid)
    fn = getattr(acts, name)
    m = np.array([sg * x for x in SAT_M for sg in (1.0, -1.0)])
    a = m[:, None] + s * z
    ref_mean_v = np.sum(w * d1(a) * z, axis=1) / (2 * s)
    ref_gain_v = np.sum(w * d2(a) * z, axis=1) / (2 * s)
    kern = acts._Kernel(name, "matched")

    def part(i):
        def f(vv):
            return jnp.sum(kern(jnp.asarray(m), vv)[i])

        return jax.grad(f)(jnp.full(m.shape, var))

    assert _rel(part(0), ref_mean_v) <= SAT_RTOL
    assert _rel(part(2), ref_gain_v) <= SAT_RTOL
    # through the public op (autodiff backward): the same numbers
    g = jax.grad(
        lambda vv: jnp.sum(
            fn(Gaussian(jnp.asarray(m), vv), mode="matched", backward="autodiff").mean
        )
    )(jnp.full(m.shape, var))
    assert _rel(g, ref_mean_v) <= SAT_RTOL


def test_saturated_derivatives_probit_erf(x64):
    """probit / erf closed forms: autodiff d mean / d v at |m| up to 40.

    ``mean = Phi(m / sqrt(1 + v))`` and ``erf(m / sqrt(1 + 2 v))``; JAX
    differentiates ``ndtr``/``erf`` through their Gaussian densities, which
    keep full relative precision in the tails (no change needed; observed
    <= 4e-16).
    """
    from scipy import stats

    m = np.array([sg * x for x in SAT_M for sg in (1.0, -1.0)])
    v = 0.25
    h = m / np.sqrt(1 + v)
    ref_probit = stats.norm.pdf(h) * (-0.5 * m) * (1 + v) ** -1.5
    r2 = 1 + 2 * v
    ref_erf = 2 / np.sqrt(np.pi) * np.exp(-(m * m) / r2) * (-m) * r2**-1.5
    for name, ref in (("probit", ref_probit), ("erf", ref_erf)):
        kern = acts._Kernel(name, "matched")
        got = jax.grad(lambda vv, kern=kern: jnp.sum(kern(jnp.asarray(m), vv)[0]))(
            jnp.full(m.shape, v)
        )
        finite = ref != 0  # erf's exp(-m^2 / 1.5) underflows at |m| = 40
        assert _rel(np.asarray(got)[finite], ref[finite]) <= SAT_RTOL
        assert np.all(np.asarray(got)[~finite] == 0)


def test_propagate_tanh_saturated_linearized_gain(x64):
    """propagate's linearized program derivative uses the stable tanh rule."""
    m = np.array([sg * x for x in SAT_M for sg in (1.0, -1.0)])
    pf = dualflow.propagate(jnp.tanh, mode="linearized")
    out = pf(Gaussian(jnp.asarray(m), jnp.ones_like(jnp.asarray(m))))
    assert _rel(out.var, _sech2(m) ** 2) <= SAT_RTOL
    ps = dualflow.propagate(jax.nn.sigmoid, mode="linearized")
    out = ps(Gaussian(jnp.asarray(m), jnp.ones_like(jnp.asarray(m))))
    assert _rel(out.var, _dsigmoid(m) ** 2) <= SAT_RTOL


# ---------------------------------------------------------------------------
# 4. labels out of range; bfloat16 activations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [4, -1, 7])
def test_categorical_nll_out_of_range_label_raises(bad):
    logits = Gaussian(jnp.zeros((3, 4)), jnp.ones((3, 4)))
    labels = jnp.array([0, bad, 2])
    for method in ("probit", "second_order", "mean"):
        with pytest.raises(
            ValueError, match=rf"^categorical_nll: labels.*{bad}.*\[0, 4\)"
        ):
            objectives.categorical_nll(logits, labels, method=method)
    with pytest.raises(ValueError, match=rf"^label_nll: labels.*{bad}.*\[0, 4\)"):
        objectives.label_nll(jnp.zeros((3, 4)), labels)


def test_categorical_nll_out_of_range_label_traced_is_nan():
    """Under jit the labels are not inspected: bad rows give NaN, good rows exact."""
    logits = Gaussian(jnp.zeros((4, 4)), jnp.ones((4, 4)))
    labels = jnp.array([0, 4, -1, 3])
    out = jax.jit(objectives.categorical_nll)(logits, labels)
    good = objectives.categorical_nll(logits, jnp.array([0, 0, 0, 3]))
    out, good = np.asarray(out), np.asarray(good)
    assert np.isnan(out[1]) and np.isnan(out[2])  # -1 no longer wraps to class 3
    np.testing.assert_array_equal(out[[0, 3]], good[[0, 3]])
    # gradients w.r.t. the logits stay finite (NaN only in the loss value)
    g = jax.grad(
        lambda mu: jnp.nansum(
            jax.jit(objectives.categorical_nll)(Gaussian(mu, logits.var), labels)
        )
    )(logits.mean)
    assert np.all(np.isfinite(np.asarray(g)))


def test_categorical_nll_non_integer_float_label_raises():
    logits = Gaussian(jnp.zeros((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="labels.*2.5"):
        objectives.categorical_nll(logits, jnp.array([0.0, 2.5]))
    # integer-valued float labels still work
    np.testing.assert_array_equal(
        objectives.categorical_nll(logits, jnp.array([0.0, 2.0])),
        objectives.categorical_nll(logits, jnp.array([0, 2])),
    )


BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7


@pytest.mark.parametrize("name", sorted(set(acts.ACTIVATIONS) - {"identity"}))
@pytest.mark.parametrize("mode", acts.MODES)
def test_activations_bfloat16(name, mode):
    """bfloat16 in -> bfloat16 out, equal to the float32 result rounded once.

    The kernels run in float32, so the only difference from float32 inputs is
    the final rounding: |bf16 - f32| <= eps_bf16 / 2 |f32| (+ tiny atol for
    values near 0).  Gradients (bp and autodiff) come back in bfloat16.
    """
    m = jnp.linspace(-4.0, 4.0, 17).astype(jnp.bfloat16)
    v = jnp.full((17,), 0.5, jnp.bfloat16)
    out = acts.activation(name, Gaussian(m, v), mode=mode)
    ref = acts.activation(
        name, Gaussian(m.astype(jnp.float32), v.astype(jnp.float32)), mode=mode
    )
    for got, want in ((out.mean, ref.mean), (out.var, ref.var)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want),
            rtol=BF16_EPS / 2,
            atol=float(jnp.finfo(jnp.bfloat16).tiny),
        )
    for backward in ("bp", "autodiff"):
        gm, gv = jax.grad(
            lambda a, b, backward=backward: jnp.sum(
                acts.activation(name, Gaussian(a, b), mode=mode, backward=backward).mean
            ).astype(jnp.float32),
            argnums=(0, 1),
        )(m, v)
        assert gm.dtype == jnp.bfloat16 and gv.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(gm, np.float32)))


# ---------------------------------------------------------------------------
# 5. forward mode through propagate / BP moment ops
# ---------------------------------------------------------------------------


def _mlp(x, w):
    return jnp.tanh(x @ w)


def _jvp_mean(pf, x, w: Gaussian):
    return jax.jvp(
        lambda mean: pf(x, Gaussian(mean, w.var)).mean,
        (w.mean,),
        (jnp.ones_like(w.mean),),
    )


@pytest.mark.parametrize("backward", ["bp", "bp_fixed_noise"])
def test_propagate_jvp_with_bp_raises_clear_type_error(backward):
    x = jnp.ones((2, 3))
    w = Gaussian(jnp.full((3, 4), 0.1), jnp.full((3, 4), 0.01))
    pf = dualflow.propagate(_mlp, backward=backward)
    with pytest.raises(TypeError, match='backward="autodiff"') as info:
        _jvp_mean(pf, x, w)
    assert "forward-mode" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)  # JAX's error chained
    with pytest.raises(TypeError, match='backward="autodiff"'):
        jax.jacfwd(lambda mean: pf(x, Gaussian(mean, w.var)).mean)(w.mean)


def test_propagate_jvp_with_autodiff_works():
    x = jnp.ones((2, 3))
    w = Gaussian(jnp.full((3, 4), 0.1), jnp.full((3, 4), 0.01))
    pa = dualflow.propagate(_mlp, backward="autodiff")
    _, tangent = _jvp_mean(pa, x, w)
    # forward mode equals reverse mode of the same forward
    jac_rev = jax.jacrev(lambda mean: pa(x, Gaussian(mean, w.var)).mean)(w.mean)
    np.testing.assert_allclose(
        tangent, jnp.einsum("ijkl,kl->ij", jac_rev, jnp.ones_like(w.mean)), rtol=1e-6
    )


def test_activation_jvp_with_bp_raises_clear_type_error():
    g = Gaussian(jnp.linspace(-1.0, 1.0, 5), jnp.full((5,), 0.2))
    with pytest.raises(TypeError, match='backward="autodiff"'):
        jax.jvp(lambda m: acts.tanh(Gaussian(m, g.var)).mean, (g.mean,), (g.mean,))
    out = jax.jvp(
        lambda m: acts.tanh(Gaussian(m, g.var), backward="autodiff").mean,
        (g.mean,),
        (jnp.ones_like(g.mean),),
    )[1]
    np.testing.assert_allclose(
        out, 4 * jax.nn.sigmoid(2 * g.mean) * jax.nn.sigmoid(-2 * g.mean), rtol=1e-6
    )
