"""Metrics: hand-computed values, numpy/scipy/sklearn references, jit, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from dualflow import metrics

# ---------------------------------------------------------------------------
# Hand-computed classification example (N = 7, K = 3)
#
#   i  probs             label  conf  argmax  correct
#   0  [.9, .05, .05]    0      .9    0       1
#   1  [.1, .8,  .1 ]    0      .8    1       0
#   2  [.6, .3,  .1 ]    0      .6    0       1
#   3  [.5, .5,  0  ]    1      .5    0 (tie) 0
#   4  [1,  0,   0  ]    0      1.0   0       1
#   5  [.2, .4,  .4 ]    2      .4    1 (tie) 0
#   6  [.3, .4,  .3 ]    1      .4    1       1
# ---------------------------------------------------------------------------

P_HAND = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.1, 0.8, 0.1],
        [0.6, 0.3, 0.1],
        [0.5, 0.5, 0.0],
        [1.0, 0.0, 0.0],
        [0.2, 0.4, 0.4],
        [0.3, 0.4, 0.3],
    ]
)
Y_HAND = np.array([0, 0, 0, 1, 0, 2, 1])


def test_accuracy_hand():
    # Logits: row 0 right, row 1 wrong, row 2 a tie -> class 0 (lowest) = right.
    logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    assert float(metrics.accuracy(logits, jnp.array([0, 0, 0]))) == pytest.approx(2 / 3)
    # Hand table: correct = 1,0,1,0,1,0,1 -> 4/7.
    assert float(metrics.accuracy(P_HAND, Y_HAND)) == pytest.approx(4 / 7)


def test_nll_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    # -(log .5 + log .8) / 2
    expected = -(math.log(0.5) + math.log(0.8)) / 2
    assert float(metrics.nll(p, np.array([0, 1]))) == pytest.approx(expected, 1e-6)
    # A zero true-class probability costs -log(eps), not inf.
    p0 = np.array([[0.0, 1.0], [0.5, 0.5]])
    got = metrics.nll(p0, np.array([0, 0]), eps=1e-12)
    assert float(got) == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2, 1e-6)


def test_brier_hand():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    # (.5-1)^2 + .25^2 + .25^2 = .375 ; .1^2 + (.8-1)^2 + .1^2 = .06 ; mean .2175
    assert float(metrics.brier(p, np.array([0, 1]))) == pytest.approx(0.2175, 1e-6)
    # Extremes: confident and right -> 0, confident and wrong -> 2.
    onehot = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(metrics.brier(onehot, np.array([0, 1]))) == 0.0
    assert float(metrics.brier(onehot, np.array([1, 2]))) == pytest.approx(2.0)


def test_ece_equal_width_hand():
    # B = 4: edges 0, .25, .5, .75, 1 (exact in binary).  conf .5 sits on an
    # edge and goes UP to [.5, .75); conf 1.0 goes to the closed last bin.
    #   bin 0 [0, .25):   empty
    #   bin 1 [.25, .5):  i5, i6   conf .4, .4      correct 0, 1
    #   bin 2 [.5, .75):  i2, i3   conf .6, .5      correct 1, 0
    #   bin 3 [.75, 1]:   i0,i1,i4 conf .9, .8, 1.0 correct 1, 0, 1
    # |sum correct - sum conf| per bin: |1-.8| = .2, |1-1.1| = .1, |2-2.7| = .7
    # ECE = (.2 + .1 + .7) / 7 = 1/7.
    got = metrics.ece(P_HAND, Y_HAND, num_bins=4, binning="equal_width")
    assert float(got) == pytest.approx(1 / 7, abs=1e-6)

    bins = metrics.calibration_bins(P_HAND, Y_HAND, num_bins=4)
    np.testing.assert_array_equal(bins.count, [0, 2, 2, 3])
    np.testing.assert_allclose(bins.confidence, [np.nan, 0.4, 0.55, 0.9], rtol=1e-6)
    np.testing.assert_allclose(bins.accuracy, [np.nan, 0.5, 0.5, 2 / 3], rtol=1e-6)
    assert bins.count.dtype == jnp.int32


def test_ece_equal_mass_hand():
    # B = 3, N = 7 -> np.array_split sizes 3, 2, 2 (remainder to the first bins).
    # Stable ascending sort by conf (ties keep input order):
    #   i5 .4 (0), i6 .4 (1), i3 .5 (0) | i2 .6 (1), i1 .8 (0) | i0 .9 (1), i4 1 (1)
    # bin 0: conf sum 1.3, correct 1 -> .3
    # bin 1: conf sum 1.4, correct 1 -> .4
    # bin 2: conf sum 1.9, correct 2 -> .1
    # ECE = (.3 + .4 + .1) / 7 = .8/7.
    got = metrics.ece(P_HAND, Y_HAND, num_bins=3, binning="equal_mass")
    assert float(got) == pytest.approx(0.8 / 7, abs=1e-6)

    bins = metrics.calibration_bins(P_HAND, Y_HAND, num_bins=3, binning="equal_mass")
    np.testing.assert_array_equal(bins.count, [3, 2, 2])
    np.testing.assert_allclose(bins.confidence, [1.3 / 3, 0.7, 0.95], rtol=1e-6)
    np.testing.assert_allclose(bins.accuracy, [1 / 3, 0.5, 1.0], rtol=1e-6)


def test_ece_equal_mass_fewer_examples_than_bins():
    # N = 7 < B = 10: bins 0..6 hold one example each, bins 7..9 are empty.
    # Singleton bins: ECE = mean |correct - conf|
    #   = (.1 + .8 + .4 + .5 + 0 + .4 + .6) / 7 = 2.8 / 7.
    bins = metrics.calibration_bins(P_HAND, Y_HAND, num_bins=10, binning="equal_mass")
    np.testing.assert_array_equal(bins.count, [1] * 7 + [0] * 3)
    assert np.all(np.isnan(np.asarray(bins.confidence[7:])))
    got = metrics.ece(P_HAND, Y_HAND, num_bins=10, binning="equal_mass")
    assert float(got) == pytest.approx(2.8 / 7, abs=1e-6)


def test_perfectly_calibrated_and_single_bin():
    # One bin: ECE = |accuracy - mean confidence| = |4/7 - 4.6/7| = .6/7.
    for binning in metrics.BINNINGS:
        got = metrics.ece(P_HAND, Y_HAND, num_bins=1, binning=binning)
        assert float(got) == pytest.approx(0.6 / 7, abs=1e-6)
    # One-hot, always right: conf 1, acc 1 in every bin -> 0.
    onehot = np.eye(3)[Y_HAND]
    assert float(metrics.ece(onehot, Y_HAND)) == 0.0


# ---------------------------------------------------------------------------
# Random data vs numpy references (float64 via the x64 fixture)
# ---------------------------------------------------------------------------

N_RAND, K_RAND, B_RAND = 503, 4, 15


def _random_probs(seed, n=N_RAND, k=K_RAND):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.7), size=n)
    p[:7] = np.eye(k)[rng.integers(0, k, 7)]  # conf exactly 1
    p[7:9] = [[0.5, 0.5, 0, 0], [0.5, 0.25, 0.25, 0]]  # conf exactly .5
    labels = rng.integers(0, k, n)
    # Make the model better than chance so bins have mixed accuracy.
    good = rng.random(n) < 0.6
    labels = np.where(good, p.argmax(1), labels)
    return p, labels


def _tied_scores(seed):
    """Integer-valued OOD scores (heavy ties), unequal sizes, shifted out-set."""
    rng = np.random.default_rng(seed)
    s_in = rng.integers(0, 12, 301).astype(float)
    s_out = (rng.integers(0, 12, 157) + rng.integers(0, 4, 157)).astype(float)
    return s_in, s_out


def _sample_probs(seed=4):
    """[S, N, K] = [6, 50, 4] per-sample class probabilities."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(K_RAND), size=(6, 50))


def _ece_width_ref(p, y, b):
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    edges = np.arange(b + 1) / b
    total, counts, confs, accs = 0.0, [], [], []
    for i in range(b):
        lo, hi = edges[i], edges[i + 1]
        m = (conf >= lo) & ((conf < hi) if i < b - 1 else (conf <= hi))
        counts.append(m.sum())
        if m.any():
            confs.append(conf[m].mean())
            accs.append(correct[m].mean())
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
        else:
            confs.append(np.nan)
            accs.append(np.nan)
    return total, np.array(counts), np.array(confs), np.array(accs)


def _ece_mass_ref(p, y, b):
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for idx in np.array_split(order, b):
        if len(idx):
            total += len(idx) / len(y) * abs(correct[idx].mean() - conf[idx].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_equal_width_vs_numpy(x64, seed):
    p, y = _random_probs(seed)
    ref, counts, confs, accs = _ece_width_ref(p, y, B_RAND)
    got = metrics.ece(p, y, num_bins=B_RAND)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    bins = metrics.calibration_bins(p, y, num_bins=B_RAND)
    np.testing.assert_array_equal(bins.count, counts)
    np.testing.assert_allclose(bins.confidence, confs, rtol=1e-12)
    np.testing.assert_allclose(bins.accuracy, accs, rtol=1e-12)


@pytest.mark.parametrize("num_bins", [15, 7])
def test_ece_equal_mass_vs_numpy(x64, num_bins):
    # 503 = 33 * 15 + 8 and 71 * 7 + 6: non-trivial remainders.
    p, y = _random_probs(2)
    ref = _ece_mass_ref(p, y, num_bins)
    got = metrics.ece(p, y, num_bins=num_bins, binning="equal_mass")
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    bins = metrics.calibration_bins(p, y, num_bins=num_bins, binning="equal_mass")
    np.testing.assert_array_equal(
        bins.count, [len(a) for a in np.array_split(np.arange(len(y)), num_bins)]
    )


def test_float32_preserved_and_close_to_float64_reference():
    p, y = _random_probs(0)
    p32 = p.astype(np.float32)
    ref, *_ = _ece_width_ref(p32.astype(np.float64), y, B_RAND)
    for fn in (metrics.accuracy, metrics.nll, metrics.brier, metrics.ece):
        assert fn(p32, y).dtype == jnp.float32
    np.testing.assert_allclose(metrics.ece(p32, y, num_bins=B_RAND), ref, rtol=1e-5)


def test_nll_brier_accuracy_vs_numpy(x64):
    p, y = _random_probs(3)
    n = len(y)
    np.testing.assert_allclose(
        metrics.nll(p, y), -np.mean(np.log(np.maximum(p[np.arange(n), y], 1e-12)))
    )
    np.testing.assert_allclose(
        metrics.brier(p, y), np.mean(np.sum((p - np.eye(K_RAND)[y]) ** 2, 1))
    )
    np.testing.assert_allclose(metrics.accuracy(p, y), np.mean(p.argmax(1) == y))


# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


def test_auroc_hand():
    # in {0, 1}, out {1, 2}: pairs (out, in) = (1,0) 1, (1,1) 1/2, (2,0) 1,
    # (2,1) 1 -> 3.5 / 4.
    assert float(metrics.auroc(jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]))) == (0.875)
    assert float(metrics.auroc(jnp.array([0.0, 1.0]), jnp.array([2.0, 3.0]))) == 1.0
    assert float(metrics.auroc(jnp.array([2.0, 3.0]), jnp.array([0.0, 1.0]))) == 0.0
    assert float(metrics.auroc(jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0]))) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_vs_sklearn_with_ties(x64, seed):
    s_in, s_out = _tied_scores(seed)
    ref = roc_auc_score(
        np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]
    )
    np.testing.assert_allclose(metrics.auroc(s_in, s_out), ref, rtol=1e-12)
    np.testing.assert_allclose(metrics.ood_auroc(s_in, s_out), ref, rtol=1e-12)
    # Integer dtype inputs work too (float result).
    got = metrics.auroc(s_in.astype(np.int32), s_out.astype(np.int32))
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_auroc_continuous_float32_vs_sklearn():
    rng = np.random.default_rng(7)
    s_in = rng.normal(size=301).astype(np.float32)
    s_out = (rng.normal(size=157) + 0.8).astype(np.float32)
    ref = roc_auc_score(np.r_[np.zeros(301), np.ones(157)], np.r_[s_in, s_out])
    got = metrics.auroc(s_in, s_out)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# Entropy and mutual information
# ---------------------------------------------------------------------------


def test_entropy_closed_forms():
    k = 5
    uniform = jnp.full((3, k), 1.0 / k)
    np.testing.assert_allclose(metrics.predictive_entropy(uniform), [math.log(k)] * 3)
    onehot = jnp.eye(k)[:3]
    h = metrics.predictive_entropy(onehot)
    np.testing.assert_array_equal(h, np.zeros(3))  # 0 log 0 = 0, no NaN
    g = jax.grad(lambda p: metrics.predictive_entropy(p).sum())(onehot)
    assert np.all(np.isfinite(np.asarray(g)))
    # Binary entropy of (1/4, 3/4).
    p = jnp.array([[0.25, 0.75]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(metrics.predictive_entropy(p), [expected], rtol=1e-6)


def test_mutual_information_closed_forms():
    # Identical samples: MI = 0 exactly (clip), expected entropy = entropy.
    p = jnp.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    same = jnp.stack([p, p, p])
    mi = metrics.mutual_information(same)
    assert np.all(np.asarray(mi) >= 0)
    np.testing.assert_allclose(mi, 0.0, atol=1e-7)
    np.testing.assert_allclose(
        metrics.expected_entropy(same), metrics.predictive_entropy(p), rtol=1e-6
    )
    # Two opposite one-hot samples: mean is uniform over 2 classes, each sample
    # has zero entropy -> MI = log 2.
    opposite = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(metrics.mutual_information(opposite), [math.log(2)])
    np.testing.assert_allclose(metrics.expected_entropy(opposite), [0.0])
    # Samples (1/2, 1/2) and (1, 0): E_s H = log(2)/2, H[mean (3/4, 1/4)].
    mixed = jnp.array([[[0.5, 0.5]], [[1.0, 0.0]]])
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose(metrics.expected_entropy(mixed), [math.log(2) / 2])
    np.testing.assert_allclose(
        metrics.mutual_information(mixed), [h_mean - math.log(2) / 2], rtol=1e-6
    )


def test_mutual_information_vs_numpy(x64):
    sp = _sample_probs()
    ent = lambda q: -np.sum(q * np.log(q), -1)
    ref = ent(sp.mean(0)) - ent(sp).mean(0)
    np.testing.assert_allclose(metrics.mutual_information(sp), ref, rtol=1e-10)
    assert np.all(np.asarray(metrics.mutual_information(sp)) >= 0)


# ---------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------


def _regression_data(seed=0, n=200, s=8):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    mean = y + 0.3 * rng.normal(size=n)
    var = rng.uniform(0.05, 1.5, size=n)
    means = mean[None] + 0.5 * rng.normal(size=(s, n))
    vars_ = rng.uniform(0.05, 1.5, size=(s, n))
    return mean, var, y, means, vars_


def test_gaussian_ll_and_rmse_vs_scipy_with_y_scale(x64):
    mean, var, y, _, _ = _regression_data()
    np.testing.assert_allclose(
        metrics.gaussian_log_likelihood(mean, var, y),
        norm.logpdf(y, mean, np.sqrt(var)).mean(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        metrics.rmse(mean, y), np.sqrt(np.mean((mean - y) ** 2)), rtol=1e-12
    )
    # Undo a standardisation y_norm = (y_orig - mu) / sd: the metrics computed
    # on normalised data with y_scale=sd equal those computed in original units.
    mu, sd = 3.0, 2.5
    y_o, mean_o, var_o = mu + sd * y, mu + sd * mean, sd**2 * var
    np.testing.assert_allclose(
        metrics.gaussian_log_likelihood(mean, var, y, y_scale=sd),
        norm.logpdf(y_o, mean_o, np.sqrt(var_o)).mean(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        metrics.rmse(mean, y, y_scale=sd),
        np.sqrt(np.mean((mean_o - y_o) ** 2)),
        rtol=1e-12,
    )
    # Scalar (homoscedastic) variance.
    np.testing.assert_allclose(
        metrics.gaussian_log_likelihood(mean, 0.5, y),
        norm.logpdf(y, mean, np.sqrt(0.5)).mean(),
        rtol=1e-12,
    )


def test_mixture_ll_vs_numpy_with_y_scale(x64):
    mean, var, y, means, vars_ = _regression_data()
    ref = np.mean(np.log(np.mean(norm.pdf(y, means, np.sqrt(vars_)), axis=0)))
    np.testing.assert_allclose(
        metrics.gaussian_mixture_log_likelihood(means, vars_, y), ref, rtol=1e-12
    )
    mu, sd = -1.0, 0.4
    ref_o = np.mean(
        np.log(np.mean(norm.pdf(mu + sd * y, mu + sd * means, sd * np.sqrt(vars_)), 0))
    )
    np.testing.assert_allclose(
        metrics.gaussian_mixture_log_likelihood(means, vars_, y, y_scale=sd),
        ref_o,
        rtol=1e-12,
    )
    # One component reduces to the Gaussian log-likelihood.
    np.testing.assert_allclose(
        metrics.gaussian_mixture_log_likelihood(mean[None], var[None], y),
        metrics.gaussian_log_likelihood(mean, var, y),
        rtol=1e-12,
    )


def test_mixture_ll_far_tail_is_finite():
    # Density underflows in float32 (z = 100): logsumexp keeps it finite.
    y = jnp.zeros(2)
    means = jnp.full((3, 2), 100.0)
    got = metrics.gaussian_mixture_log_likelihood(means, jnp.ones((3, 2)), y)
    expected = -0.5 * (math.log(2 * math.pi) + 100.0**2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# jit and errors
# ---------------------------------------------------------------------------


def _all_metrics(p, y, sp, s_in, s_out, mean, var, yr, means, vars_):
    """Every public metric on fixed shapes (one outer jit compile for all)."""
    return dict(
        accuracy=metrics.accuracy(p, y),
        nll=metrics.nll(p, y),
        brier=metrics.brier(p, y),
        ece_width=metrics.ece(p, y, num_bins=B_RAND),
        ece_mass=metrics.ece(p, y, num_bins=B_RAND, binning="equal_mass"),
        bins=metrics.calibration_bins(p, y, B_RAND, "equal_mass"),
        entropy=metrics.predictive_entropy(p),
        mi=metrics.mutual_information(sp),
        expected_entropy=metrics.expected_entropy(sp),
        auroc=metrics.auroc(s_in, s_out),
        rmse=metrics.rmse(mean, yr, y_scale=2.0),
        ll=metrics.gaussian_log_likelihood(mean, var, yr, y_scale=2.0),
        mixture_ll=metrics.gaussian_mixture_log_likelihood(means, vars_, yr),
    )


def test_jit_matches_eager(x64):
    # Same shapes/dtypes as the reference tests above, so the eager calls reuse
    # their compiled kernels and only the outer jit is compiled here.
    p, y = _random_probs(0)
    reg = _regression_data()
    args = (p, y, _sample_probs(), *_tied_scores(0), *reg)
    eager = _all_metrics(*args)
    jitted = jax.jit(_all_metrics)(*args)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(eager), jax.tree.leaves(jitted), strict=True
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # Static arguments by name also work, and y_scale may be traced.
    f = jax.jit(metrics.ece, static_argnames=("num_bins", "binning"))
    assert float(f(p, y, num_bins=B_RAND)) == float(eager["ece_width"])
    g = jax.jit(lambda m, v, t, s: metrics.gaussian_log_likelihood(m, v, t, y_scale=s))
    assert float(g(*reg[:3], 2.0)) == float(eager["ll"])


def test_errors():
    p, y = jnp.asarray(P_HAND), jnp.asarray(Y_HAND)
    with pytest.raises(ValueError, match="unknown binning 'quantile'.*equal_mass"):
        metrics.ece(p, y, binning="quantile")
    with pytest.raises(ValueError, match="unknown binning"):
        metrics.calibration_bins(p, y, binning="equal-width")
    with pytest.raises(ValueError, match="num_bins must be >= 1"):
        metrics.ece(p, y, num_bins=0)
    with pytest.raises(ValueError, match="static Python int"):
        jax.jit(metrics.ece)(p, y, 15)
    with pytest.raises(ValueError, match="7 examples .* labels has 6"):
        metrics.nll(p, y[:6])
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        metrics.brier(p[0], y[:1])
    with pytest.raises(ValueError, match="argmax"):
        metrics.accuracy(p, jax.nn.one_hot(y, 3).astype(jnp.int32))
    with pytest.raises(ValueError, match="integer dtype"):
        metrics.accuracy(p, y.astype(jnp.float32))
    # Shape checks fire at trace time under jit too.
    with pytest.raises(ValueError, match="7 examples"):
        jax.jit(metrics.brier)(p, y[:6])
    with pytest.raises(ValueError, match="same shape"):
        metrics.rmse(jnp.zeros((4, 1)), jnp.zeros(4))
    with pytest.raises(ValueError, match="var must have the shape"):
        metrics.gaussian_log_likelihood(jnp.zeros(4), jnp.ones(3), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\[S, 4\]"):
        metrics.gaussian_mixture_log_likelihood(
            jnp.zeros((4, 2)), jnp.ones((4, 2)), jnp.zeros(4)
        )
    with pytest.raises(ValueError, match=r"\[S, N, K\]"):
        metrics.mutual_information(p)
    with pytest.raises(ValueError, match="expected_entropy"):
        metrics.predictive_entropy(jnp.stack([p, p]))
    with pytest.raises(ValueError, match="scores_out must be a non-empty 1-D"):
        metrics.auroc(jnp.zeros(3), jnp.zeros((3, 1)))
