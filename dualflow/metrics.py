"""Evaluation metrics for Bayesian neural networks: accuracy, calibration,
proper scoring rules, predictive uncertainty and out-of-distribution detection.

All functions are pure JAX, jit-safe and dtype-following (float32 in, float32
out; float64 in, float64 out when x64 is enabled).  Shape checks are *static*
(they run at trace time and raise ``ValueError``); values are never inspected,
so e.g. probabilities are assumed to lie in ``[0, 1]`` and sum to one, labels
in ``[0, K)`` and variances to be positive.  Arguments that change shapes
(``num_bins``, ``binning``) must be static under ``jax.jit``::

    jax.jit(ece, static_argnames=("num_bins", "binning"))

Shapes: ``N`` examples, ``K`` classes, ``S`` posterior samples, ``B`` bins.

Classification
  :func:`accuracy`, :func:`nll`, :func:`brier`, :func:`ece`,
  :func:`calibration_bins`.
Regression
  :func:`rmse`, :func:`gaussian_log_likelihood`,
  :func:`gaussian_mixture_log_likelihood` (all accept ``y_scale`` to report
  in the original units of targets that were standardised for training).
Uncertainty / OOD
  :func:`predictive_entropy`, :func:`expected_entropy`,
  :func:`mutual_information`, :func:`auroc`, :func:`ood_auroc`.
"""

from __future__ import annotations

import math
import operator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

Array = jax.Array

__all__ = [
    "BINNINGS",
    "CalibrationBins",
    "accuracy",
    "auroc",
    "brier",
    "calibration_bins",
    "ece",
    "expected_entropy",
    "gaussian_log_likelihood",
    "gaussian_mixture_log_likelihood",
    "mutual_information",
    "nll",
    "ood_auroc",
    "predictive_entropy",
    "rmse",
]

BINNINGS: tuple[str, ...] = ("equal_width", "equal_mass")
"""Accepted values of the ``binning`` argument of :func:`ece`."""

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# Static checks and helpers
# ---------------------------------------------------------------------------


def _float_dtype(*xs: Array) -> jnp.dtype:
    """Result dtype: the inputs' float dtype; JAX's default float for ints/bools."""
    dt = jnp.result_type(*xs)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def _check_probs_labels(probs: Array, labels: Array, name: str = "probs") -> None:
    """Static checks for classification inputs ``probs [N, K]``, ``labels [N]``."""
    if probs.ndim != 2:
        raise ValueError(
            f"{name} must have shape [N, K] (examples x classes), got shape "
            f"{probs.shape}; for a single example add a leading axis "
            f"({name}[None]), and for posterior samples [S, N, K] average over "
            "the sample axis first."
        )
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be integer class indices of shape [N], got shape "
            f"{labels.shape}; convert one-hot labels with labels.argmax(-1)."
        )
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"{name} has {probs.shape[0]} examples (shape {probs.shape}) but labels "
            f"has {labels.shape[0]} (shape {labels.shape}); pass one label per row."
        )
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one example and one class, got shape "
            f"{probs.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must have an integer dtype (class indices), got {labels.dtype}; "
            "cast with labels.astype(jnp.int32)."
        )


def _check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and "
            f"{b.shape}; reshape explicitly (e.g. squeeze a trailing [N, 1] axis) "
            "rather than relying on broadcasting."
        )
    if a.size == 0:
        raise ValueError(f"{name_a} must be non-empty, got shape {a.shape}.")


def _check_binning(num_bins: int, binning: str) -> int:
    """Validate the static binning arguments; returns ``num_bins`` as an int."""
    if binning not in BINNINGS:
        raise ValueError(
            f"unknown binning {binning!r}; use one of {BINNINGS} "
            "('equal_width': fixed bins [b/B, (b+1)/B); 'equal_mass': bins with "
            "equally many examples)."
        )
    try:
        if isinstance(num_bins, bool):
            raise TypeError
        b = operator.index(num_bins)
    except TypeError:
        raise ValueError(
            f"num_bins must be a static Python int, got {type(num_bins).__name__}; "
            "under jax.jit pass static_argnames=('num_bins', 'binning')."
        ) from None
    if b < 1:
        raise ValueError(f"num_bins must be >= 1, got {b}.")
    return b


def _xlogx(p: Array) -> Array:
    """``p * log(p)`` with the limit ``0 log 0 = 0`` (NaN-free value and gradient)."""
    positive = p > 0
    return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1)), 0)


@jax.jit
def _entropy(p: Array) -> Array:
    """Shannon entropy (nats) over the last axis."""
    return -jnp.sum(_xlogx(p), axis=-1)


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def accuracy(probs_or_logits: Array, labels: Array) -> Array:
    """Fraction of examples whose argmax class equals the label.

    Args:
      probs_or_logits: ``[N, K]`` probabilities, logits or any monotone scores.
      labels: ``[N]`` integer class indices.

    Returns:
      Scalar in ``[0, 1]``.  Ties in the argmax go to the lowest class index.
    """
    x = jnp.asarray(probs_or_logits)
    labels = jnp.asarray(labels)
    _check_probs_labels(x, labels, "probs_or_logits")
    return _accuracy(x, labels)


@jax.jit
def _accuracy(x: Array, labels: Array) -> Array:
    correct = jnp.argmax(x, axis=-1) == labels
    return jnp.mean(correct.astype(_float_dtype(x)))


def nll(probs: Array, labels: Array, eps: float = 1e-12) -> Array:
    """Mean negative log-probability of the true class, ``-mean log p[label]``.

    Args:
      probs: ``[N, K]`` predictive probabilities (for a BNN, the posterior
        predictive ``mean_s p_s``, not logits).
      labels: ``[N]`` integer class indices.
      eps: floor applied as ``log(max(p, eps))``, so a zero probability costs
        ``-log(eps)`` (~27.6 nats by default) instead of ``inf``; probabilities
        above ``eps`` are not changed.

    Returns:
      Scalar (nats).
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    _check_probs_labels(probs, labels)
    return _nll(probs, labels, eps)


@jax.jit
def _nll(probs: Array, labels: Array, eps: Array) -> Array:
    p_true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    return -jnp.mean(jnp.log(jnp.maximum(p_true, eps.astype(probs.dtype))))


def brier(probs: Array, labels: Array) -> Array:
    """Multi-class Brier score ``mean_n sum_k (p_nk - onehot_nk)^2``.

    Args:
      probs: ``[N, K]`` predictive probabilities.
      labels: ``[N]`` integer class indices.

    Returns:
      Scalar in ``[0, 2]`` (0: confident and right; 2: confident and wrong).
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    _check_probs_labels(probs, labels)
    return _brier(probs, labels)


@jax.jit
def _brier(probs: Array, labels: Array) -> Array:
    onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
    return jnp.mean(jnp.sum((probs - onehot) ** 2, axis=-1))


class CalibrationBins(NamedTuple):
    """Reliability-diagram data from :func:`calibration_bins` (all of shape ``[B]``).

    Attributes:
      count: int32 number of examples in each bin.
      confidence: mean confidence (max probability) in each bin; NaN if empty.
      accuracy: fraction of correct argmax predictions in each bin; NaN if empty.
    """

    count: Array
    confidence: Array
    accuracy: Array


def _exact_inner_edges(b: int, dtype: jnp.dtype) -> Array:
    """Interior equal-width edges ``fl(k/B)``, ``k = 1..B-1``, as a ``[B-1]`` constant.

    Built on the host: NumPy's float64 division is correctly rounded, and
    rounding that once more to a narrower binary format (float32, float16,
    bfloat16: at most 24 significand bits <= (53 - 2) / 2) equals rounding the
    exact quotient ``k/B`` directly (double rounding is innocuous for division
    at these widths), so every edge is *the* nearest float to ``k/B`` in
    ``dtype``.  Computing ``arange(1, B) / B`` inside ``jit`` instead lets XLA
    use ``k * fl(1/B)``, which is one ulp off for e.g. ``k/B`` = 0.3, 0.6, 0.7
    (float64, B = 10) or 0.8 (float32, B = 15), and moves confidences that sit
    exactly on an edge into the lower bin.
    """
    k = np.arange(1, b, dtype=np.int64)
    return jnp.asarray((k / b).astype(np.dtype(dtype)), dtype=dtype)


@partial(jax.jit, static_argnums=(2, 3))
def _bin_sums(
    probs: Array, labels: Array, b: int, binning: str
) -> tuple[Array, Array, Array]:
    """Per-bin ``(count, sum of confidence, number correct)``, each ``[B]``."""
    n = probs.shape[0]
    dtype = _float_dtype(probs)
    conf = jnp.max(probs, axis=-1).astype(dtype)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(dtype)
    if binning == "equal_width":
        # Interior edges fl(b/B), b = 1..B-1.  The bin index is the number of
        # interior edges <= conf, so bin b is [b/B, (b+1)/B) and conf == 1 (or a
        # rounding overshoot above 1) lands in the last bin.  "compare_all" is
        # O(N B) work, cheap for the usual B of 10-20 and fastest to compile.
        idx = jnp.searchsorted(
            _exact_inner_edges(b, dtype), conf, side="right", method="compare_all"
        )
        sorted_ids = False
    else:
        # Sort by confidence (stable: ties keep input order) and cut the sorted
        # sequence like np.array_split: with N = q B + r, the first r bins hold
        # q + 1 examples and the rest q (so when N < B the last B - N are empty).
        conf, correct = jax.lax.sort((conf, correct), num_keys=1, is_stable=True)
        sizes = [len(s) for s in np.array_split(np.arange(n), b)]
        idx = jnp.asarray(np.repeat(np.arange(b), sizes), dtype=jnp.int32)
        sorted_ids = True

    def seg(x: Array) -> Array:
        return jax.ops.segment_sum(
            x, idx, num_segments=b, indices_are_sorted=sorted_ids
        )

    count = seg(jnp.ones((n,), jnp.int32))
    return count, seg(conf), seg(correct)


def calibration_bins(
    probs: Array,
    labels: Array,
    num_bins: int = 15,
    binning: str = "equal_width",
) -> CalibrationBins:
    """Per-bin count, mean confidence and accuracy (reliability-diagram data).

    Confidence is ``max_k p_k`` and a prediction is correct when
    ``argmax_k p_k == label`` (ties to the lowest index).

    Args:
      probs: ``[N, K]`` predictive probabilities.
      labels: ``[N]`` integer class indices.
      num_bins: ``B``, a static Python int >= 1.
      binning: ``"equal_width"``: bin ``b`` is ``[b/B, (b+1)/B)`` (edges
        ``fl(b/B)``: the float of the input dtype nearest to ``b/B``), except
        that the last bin is closed, ``[(B-1)/B, 1]``; equal-width bin edges
        are thus ``np.arange(B + 1) / B`` rounded once to the dtype.  A
        confidence equal to an edge opens the upper bin exactly, e.g. ``0.7``
        (``fl(7/10)``) is in bin 7 of 10, eager or under ``jit`` (the edges are
        host constants: computing ``arange(B + 1) / B`` inside ``jit`` is one
        ulp off for some ``b``).  ``"equal_mass"`` (adaptive): examples are
        sorted by confidence (stable sort, so tied confidences keep input order
        and may be split between neighbouring bins) and cut into ``B``
        consecutive groups following ``np.array_split``: with ``N = q B + r``
        the first ``r`` bins (lowest confidence) get ``q + 1`` examples and the
        others ``q``; if ``N < B`` the last ``B - N`` bins are empty.

    Returns:
      :class:`CalibrationBins` with ``count`` (int32), ``confidence`` and
      ``accuracy`` of shape ``[B]``; the latter two are NaN for empty bins.
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    _check_probs_labels(probs, labels)
    b = _check_binning(num_bins, binning)
    return _calibration_bins(probs, labels, b, binning)


@partial(jax.jit, static_argnums=(2, 3))
def _calibration_bins(
    probs: Array, labels: Array, b: int, binning: str
) -> CalibrationBins:
    count, conf_sum, correct_sum = _bin_sums(probs, labels, b, binning)
    nonempty = count > 0
    denom = jnp.maximum(count, 1).astype(conf_sum.dtype)
    nan = jnp.asarray(jnp.nan, conf_sum.dtype)
    return CalibrationBins(
        count=count,
        confidence=jnp.where(nonempty, conf_sum / denom, nan),
        accuracy=jnp.where(nonempty, correct_sum / denom, nan),
    )


def ece(
    probs: Array,
    labels: Array,
    num_bins: int = 15,
    binning: str = "equal_width",
) -> Array:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    Computed as ``sum_b |sum_{i in b} (correct_i - conf_i)| / N``, so empty bins
    contribute exactly 0.  Binning conventions as in :func:`calibration_bins`.

    Args:
      probs: ``[N, K]`` predictive probabilities.
      labels: ``[N]`` integer class indices.
      num_bins: ``B``, a static Python int >= 1.
      binning: ``"equal_width"`` or ``"equal_mass"`` (static).

    Returns:
      Scalar in ``[0, 1]``.
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    _check_probs_labels(probs, labels)
    b = _check_binning(num_bins, binning)
    return _ece(probs, labels, b, binning)


@partial(jax.jit, static_argnums=(2, 3))
def _ece(probs: Array, labels: Array, b: int, binning: str) -> Array:
    _, conf_sum, correct_sum = _bin_sums(probs, labels, b, binning)
    return jnp.sum(jnp.abs(correct_sum - conf_sum)) / probs.shape[0]


# ---------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------


def rmse(mean: Array, y: Array, *, y_scale: float | Array = 1.0) -> Array:
    """Root-mean-square error ``y_scale * sqrt(mean((mean - y)^2))``.

    Args:
      mean: predictive mean, same shape as ``y`` (typically ``[N]``; for
        ``[N, D]`` the average runs over all ``N * D`` entries).
      y: targets.
      y_scale: standard deviation used to standardise the targets
        (``y_norm = (y - mu) / y_scale``); pass it with normalised ``mean``/``y``
        to get the RMSE in original units.  A scalar, or an array broadcasting
        against ``y`` (e.g. ``[D]`` per output).

    Returns:
      Scalar.
    """
    mean = jnp.asarray(mean)
    y = jnp.asarray(y)
    _check_same_shape(mean, y, "mean", "y")
    return _rmse(mean, y, y_scale)


@jax.jit
def _rmse(mean: Array, y: Array, y_scale: Array) -> Array:
    return jnp.sqrt(jnp.mean(((mean - y) * y_scale) ** 2))


def _gaussian_logpdf(y: Array, mean: Array, var: Array) -> Array:
    return -0.5 * (_LOG_2PI + jnp.log(var) + (y - mean) ** 2 / var)


def gaussian_log_likelihood(
    mean: Array, var: Array, y: Array, *, y_scale: float | Array = 1.0
) -> Array:
    """Mean Gaussian log predictive density ``mean_n log N(y_n; mean_n, var_n)``.

    This is the "test log-likelihood" of the UCI regression benchmarks.  ``var``
    is the variance of the *predictive* distribution of ``y``, i.e. it must
    already include the observation-noise variance (epistemic + aleatoric),
    not only the variance of the network output.

    Args:
      mean: predictive mean, same shape as ``y`` (typically ``[N]``; for
        ``[N, D]`` the average runs over all entries).
      var: predictive variance (> 0), same shape as ``mean`` or a scalar.
      y: targets.
      y_scale: if ``mean``, ``var``, ``y`` are in standardised units
        (``y_norm = (y - mu) / y_scale``), the log-likelihood in original units
        is ``LL_norm - log(y_scale)`` (change of variables); pass ``y_scale``
        to get it.  Scalar or broadcasting against ``y``.

    Returns:
      Scalar (nats per example; per entry for multi-output ``y``).
    """
    mean = jnp.asarray(mean)
    var = jnp.asarray(var)
    y = jnp.asarray(y)
    _check_same_shape(mean, y, "mean", "y")
    if var.shape not in (mean.shape, ()):
        raise ValueError(
            f"var must have the shape of mean {mean.shape} or be a scalar, got "
            f"{var.shape}."
        )
    return _gaussian_ll(mean, var, y, y_scale)


@jax.jit
def _gaussian_ll(mean: Array, var: Array, y: Array, y_scale: Array) -> Array:
    return jnp.mean(_gaussian_logpdf(y, mean, var) - jnp.log(y_scale))


def gaussian_mixture_log_likelihood(
    means: Array, vars: Array, y: Array, *, y_scale: float | Array = 1.0
) -> Array:
    """Mean log density of an equally weighted S-component Gaussian mixture.

    ``mean_n log( (1/S) sum_s N(y_n; means[s, n], vars[s, n]) )``, computed
    with ``logsumexp`` over ``s`` (the predictive of a sampled BNN posterior).

    Args:
      means: ``[S, N]`` (more generally ``[S, *y.shape]``) component means.
      vars: component predictive variances (> 0, including observation
        noise), shape of ``means`` or a scalar.
      y: ``[N]`` targets.
      y_scale: as in :func:`gaussian_log_likelihood`: subtracts
        ``log(y_scale)`` to report in original units.

    Returns:
      Scalar (nats per example).
    """
    means = jnp.asarray(means)
    vars = jnp.asarray(vars)
    y = jnp.asarray(y)
    if means.ndim != y.ndim + 1 or means.shape[1:] != y.shape:
        raise ValueError(
            f"means must have shape [S, *y.shape] = [S, {', '.join(map(str, y.shape))}]"
            f" (samples first), got {means.shape} with y of shape {y.shape}."
        )
    if means.shape[0] == 0 or y.size == 0:
        raise ValueError(
            f"need at least one component and one example, got means {means.shape}."
        )
    if vars.shape not in (means.shape, ()):
        raise ValueError(
            f"vars must have the shape of means {means.shape} or be a scalar, got "
            f"{vars.shape}."
        )
    return _mixture_ll(means, vars, y, y_scale)


@jax.jit
def _mixture_ll(means: Array, vars: Array, y: Array, y_scale: Array) -> Array:
    log_comp = _gaussian_logpdf(y[None], means, vars)
    ll = logsumexp(log_comp, axis=0) - math.log(means.shape[0]) - jnp.log(y_scale)
    return jnp.mean(ll)


# ---------------------------------------------------------------------------
# Predictive uncertainty and OOD detection
# ---------------------------------------------------------------------------


def _check_sample_probs(sample_probs: Array) -> None:
    if sample_probs.ndim != 3:
        raise ValueError(
            "sample_probs must have shape [S, N, K] (posterior samples x examples "
            f"x classes), got {sample_probs.shape}; for a single example use "
            "sample_probs[:, None]."
        )


def predictive_entropy(probs: Array) -> Array:
    """Entropy (nats) of the predictive distribution, per example.

    Args:
      probs: ``[N, K]`` predictive probabilities (for samples ``[S, N, K]``
        pass ``sample_probs.mean(0)``).  ``0 log 0`` is taken as 0 (value and
        gradient stay finite for one-hot rows).

    Returns:
      ``[N]`` entropies in ``[0, log K]``.
    """
    probs = jnp.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(
            f"probs must have shape [N, K], got {probs.shape}; for posterior "
            "samples [S, N, K] pass sample_probs.mean(0) (or use "
            "expected_entropy / mutual_information)."
        )
    return _entropy(probs)


def expected_entropy(sample_probs: Array) -> Array:
    """Mean entropy of the sampled predictives, ``E_s H[p_s]`` (aleatoric part).

    Args:
      sample_probs: ``[S, N, K]`` per-sample class probabilities.

    Returns:
      ``[N]`` (nats).
    """
    sample_probs = jnp.asarray(sample_probs)
    _check_sample_probs(sample_probs)
    return _expected_entropy(sample_probs)


@jax.jit
def _expected_entropy(sample_probs: Array) -> Array:
    return jnp.mean(_entropy(sample_probs), axis=0)


def mutual_information(sample_probs: Array) -> Array:
    """Epistemic uncertainty ``H[E_s p_s] - E_s H[p_s]`` per example (BALD).

    Mathematically ``>= 0`` (concavity of entropy); rounding can give tiny
    negative values, which are clipped to 0.

    Args:
      sample_probs: ``[S, N, K]`` per-sample class probabilities.

    Returns:
      ``[N]`` in ``[0, log min(S, K)]`` (nats).
    """
    sample_probs = jnp.asarray(sample_probs)
    _check_sample_probs(sample_probs)
    return _mutual_information(sample_probs)


@jax.jit
def _mutual_information(sample_probs: Array) -> Array:
    total = _entropy(jnp.mean(sample_probs, axis=0))
    return jnp.maximum(total - _expected_entropy(sample_probs), 0)


def auroc(scores_in: Array, scores_out: Array) -> Array:
    """Area under the ROC curve for detecting out-of-distribution inputs.

    Positives are ``scores_out`` (higher score = more OOD).  Equals the
    Mann–Whitney statistic ``P(s_out > s_in) + 1/2 P(s_out == s_in)`` over all
    pairs, so ties count 1/2 (identical to ``sklearn.metrics.roc_auc_score``).
    Rank-based: two sorts of the ``n + m`` pooled scores (no ``n x m`` pair
    matrix), ``O((n + m) log(n + m))`` time and ``O(n + m)`` memory.  NaN
    scores give undefined results.

    Args:
      scores_in: ``[n]`` scores of in-distribution (negative) examples.
      scores_out: ``[m]`` scores of out-of-distribution (positive) examples.

    Returns:
      Scalar in ``[0, 1]``; 0.5 is chance, 1 perfect separation.
    """
    scores_in = jnp.asarray(scores_in)
    scores_out = jnp.asarray(scores_out)
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if s.ndim != 1 or s.shape[0] == 0:
            raise ValueError(
                f"{name} must be a non-empty 1-D array of per-example scores, got "
                f"shape {s.shape}; flatten it or compute one score per example."
            )
    return _auroc(scores_in, scores_out)


@jax.jit
def _auroc(scores_in: Array, scores_out: Array) -> Array:
    n, m = scores_in.shape[0], scores_out.shape[0]
    dtype = _float_dtype(scores_in, scores_out)
    common = jnp.result_type(scores_in, scores_out)
    scores = jnp.concatenate([scores_in.astype(common), scores_out.astype(common)])
    is_out = jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.ones(m, jnp.int32)])
    pos = jnp.arange(n + m, dtype=jnp.int32)
    # Sort by (score, tie-break).  After the sort, the number of in-scores
    # preceding an out-score is its position minus the out-scores preceding it:
    # with ins first among ties that is #{in <= s_out}, with outs first it is
    # #{in < s_out}; their sum over outs is 2 U (ties counted 1/2).
    u2 = jnp.zeros((), dtype)
    for tie_break in (is_out, 1 - is_out):
        _, _, lab = jax.lax.sort((scores, tie_break, is_out), num_keys=2)
        ins_before = pos - (jnp.cumsum(lab) - lab)
        u2 = u2 + jnp.sum(jnp.where(lab == 1, ins_before, 0).astype(dtype))
    return u2 / (2.0 * n * m)


def ood_auroc(unc_in: Array, unc_out: Array) -> Array:
    """OOD-detection AUROC from uncertainty scores (alias of :func:`auroc`).

    Args:
      unc_in: ``[n]`` uncertainty of in-distribution test inputs, e.g.
        :func:`predictive_entropy` or :func:`mutual_information`.
      unc_out: ``[m]`` the same uncertainty on out-of-distribution inputs.

    Returns:
      Scalar AUROC; higher uncertainty is taken to indicate OOD.
    """
    return auroc(unc_in, unc_out)
