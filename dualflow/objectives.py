"""Output heads and objectives for Gaussian beliefs over network outputs.

* regression: predictive ``N(x̂_L, P_L + sigma_noise^2)`` (homoscedastic, fixed
  or learnable noise) or a heteroscedastic head with a log-noise output;
* classification: a Gaussian over logits turned into class probabilities by
  the probit (MacKay) approximation, or a second-order expansion of the
  expected log-softmax;
* the KL divergence of a mean-field Gaussian posterior from a Gaussian prior,
  and the negative ELBO of Eq. 2 (Duality of information flow) with a KL weight.

All per-example functions return arrays without reducing over the batch; the
caller chooses ``mean``/``sum``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualflow.gaussian import Gaussian, as_gaussian

Array = jax.Array

__all__ = [
    "categorical_nll",
    "expected_log_softmax",
    "gaussian_nll",
    "heteroscedastic_noise",
    "heteroscedastic_nll",
    "kl_divergence",
    "kl_mean_field",
    "neg_elbo",
    "noise_var_from_raw",
    "predictive_regression",
    "probit_softmax",
]

_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------
def noise_var_from_raw(raw: Array, min_var: float = 1e-6) -> Array:
    """Positive observation-noise variance from an unconstrained parameter."""
    return jax.nn.softplus(raw) + min_var


def predictive_regression(pred: Gaussian, noise_var: Array | float) -> Gaussian:
    """Predictive ``N(x̂_L, P_L + noise_var)`` (Bayesian model average, closed form)."""
    pred = as_gaussian(pred, "predictive_regression")
    return Gaussian(pred.mean, pred.var + jnp.asarray(noise_var, pred.dtype))


def gaussian_nll(pred: Gaussian, y: Array, noise_var: Array | float) -> Array:
    """``-log N(y; x̂_L, P_L + noise_var)`` element-wise (shape of ``y``).

    This is the exact negative log predictive density of the Gaussian belief
    over the output plus homoscedastic Gaussian noise (Eq. 4 with
    ``g(x, nu) = x + sigma nu``).
    """
    pred = as_gaussian(pred, "gaussian_nll prediction")
    y = jnp.asarray(y, pred.dtype)
    if y.shape != pred.shape:
        raise ValueError(f"gaussian_nll: y {y.shape} != prediction {pred.shape}.")
    s = pred.var + jnp.asarray(noise_var, pred.dtype)
    return 0.5 * (_LOG_2PI + jnp.log(s) + (y - pred.mean) ** 2 / s)


def heteroscedastic_noise(log_noise: Gaussian, min_var: float = 0.0) -> Array:
    """Noise variance ``min_var + E[exp(z)] = min_var + exp(m_z + P_z / 2)``
    for the belief ``z ~ N(m_z, P_z)`` over a log-variance output (log-normal
    mean).  ``min_var`` is a floor (deep ensembles use 1e-6): without it a
    network can drive the noise towards 0 on near-deterministic data."""
    log_noise = as_gaussian(log_noise, "heteroscedastic log_noise")
    return min_var + jnp.exp(log_noise.mean + 0.5 * log_noise.var)


def heteroscedastic_nll(
    pred: Gaussian, log_noise: Gaussian, y: Array, min_var: float = 0.0
) -> Array:
    """Gaussian NLL with per-example noise from a log-variance output.

    The noise variance is :func:`heteroscedastic_noise` of the belief over the
    log-variance output (with its floor ``min_var``); the uncertainty of ``z``
    beyond that is ignored.
    """
    return gaussian_nll(pred, y, heteroscedastic_noise(log_noise, min_var))


# --------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------
def probit_softmax(logits: Gaussian, axis: int = -1) -> Array:
    """Class probabilities ``softmax(m / sqrt(1 + pi P / 8))`` (MacKay 1992).

    Exact at ``P = 0``; for two classes it is the probit approximation of
    ``E[sigmoid(z)]``, with absolute error below ~0.02.
    """
    logits = as_gaussian(logits, "probit_softmax logits")
    kappa = jax.lax.rsqrt(1.0 + (math.pi / 8.0) * logits.var)
    return jax.nn.softmax(logits.mean * kappa, axis=axis)


def expected_log_softmax(logits: Gaussian, axis: int = -1) -> Array:
    """Second-order approximation of ``E[log softmax(z)]`` for ``z ~ N(m, diag P)``.

    ``log softmax(z)_y = z_y - LSE(z)`` and the Hessian of LSE is
    ``diag(p) - p p^T``, so with independent logits
    ``E[LSE(z)] ~= LSE(m) + 1/2 sum_k P_k p_k (1 - p_k)``.
    """
    logits = as_gaussian(logits, "expected_log_softmax logits")
    logp = jax.nn.log_softmax(logits.mean, axis=axis)
    p = jnp.exp(logp)
    corr = 0.5 * jnp.sum(logits.var * p * (1.0 - p), axis=axis, keepdims=True)
    return logp - corr


def categorical_nll(
    logits: Gaussian, labels: Array, *, method: str = "probit", axis: int = -1
) -> Array:
    """Negative log-likelihood of ``labels`` under a Gaussian over logits.

    Args:
      logits: `Gaussian` ``[..., K]``.
      labels: int array ``[...]``, or soft labels ``[..., K]`` (float rows
        summing to 1, e.g. from mixup/CutMix): the NLL is then the
        cross-entropy ``-sum_k t_k log p_k``, i.e. the label-weighted average of
        the per-class NLLs (every head is linear in the one-hot target).
      method: ``"probit"`` (``-log`` of :func:`probit_softmax`, the predictive
        probability), ``"second_order"`` (``-`` :func:`expected_log_softmax`,
        the expected log-likelihood of Eq. 2), or ``"mean"`` (ignore the variance).

    Raises:
      ValueError: concrete integer labels outside ``[0, K)`` (or non-integer
        float labels of the class-less shape).  Under ``jit`` labels are not
        inspected and an out-of-range label gives NaN for its example (see
        :func:`label_nll`).
    """
    logits = as_gaussian(logits, "categorical_nll logits")
    if axis not in (-1, logits.ndim - 1):
        raise ValueError("categorical_nll: classes must be on the last axis.")
    labels = jnp.asarray(labels)
    soft = labels.shape == logits.shape and jnp.issubdtype(labels.dtype, jnp.floating)
    if not soft and labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"categorical_nll: labels {labels.shape} must match logits"
            f" {logits.shape} without the class axis (integer labels) or with it"
            " (float soft labels)."
        )
    if method == "probit":
        kappa = jax.lax.rsqrt(1.0 + (math.pi / 8.0) * logits.var)
        logp = jax.nn.log_softmax(logits.mean * kappa, axis=-1)
    elif method == "second_order":
        logp = expected_log_softmax(logits)
    elif method == "mean":
        logp = jax.nn.log_softmax(logits.mean, axis=-1)
    else:
        raise ValueError(
            f"categorical_nll: method={method!r}; use 'probit', 'second_order' or"
            " 'mean'."
        )
    return _label_nll(logp, labels, "categorical_nll")


def _check_hard_labels(labels: Array, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` for concrete class indices outside ``[0, K)``.

    Traced labels (under ``jit``/``grad``/``vmap``) cannot be inspected and
    are left alone (see :func:`label_nll`).  Float labels must be
    integer-valued (they are cast to ``int32``, which would truncate).
    """
    if isinstance(labels, jax.core.Tracer) or labels.size == 0:
        return
    vals = np.asarray(labels)
    if np.issubdtype(vals.dtype, np.floating):
        bad = ~np.isfinite(vals) | (vals != np.round(vals))
        if bad.any():
            value = vals[bad].flat[0].item()
            raise ValueError(
                f"{where}: labels has the non-integer value {value!r}"
                f" at index {tuple(int(i) for i in np.argwhere(bad)[0])}; labels"
                f" must be class indices in [0, {num_classes}) (soft labels need"
                f" the logits' shape [..., {num_classes}])."
            )
    bad = (vals < 0) | (vals >= num_classes)
    if bad.any():
        raise ValueError(
            f"{where}: labels has the value {vals[bad].flat[0].item()!r} at index"
            f" {tuple(int(i) for i in np.argwhere(bad)[0])}, outside the valid"
            f" class range [0, {num_classes}) for {num_classes} classes"
            f" ({int(bad.sum())} out-of-range label(s) in all)."
        )


def label_nll(logp: Array, labels: Array) -> Array:
    """``-log p[label]`` for integer labels ``[...]`` or ``-sum_k t_k log p_k``
    for soft labels ``[..., K]``; ``logp`` is ``[..., K]``.

    Integer labels must lie in ``[0, K)``.  Concrete (eager) labels are
    checked: an out-of-range or non-integer label raises ``ValueError`` naming
    the value and the valid range.  Traced labels (inside ``jit``, ``grad``,
    ``vmap``...) cannot be checked without a host round trip, so there an
    out-of-range label (negative ones included: they do *not* wrap around as
    in NumPy indexing) gives ``NaN`` for its example, which makes the batch
    loss NaN instead of silently training on a wrong class.  ``checkify`` is
    not used: a check inside the loss would force every caller to wrap its
    whole training step with ``checkify.checkify``; validate labels once,
    eagerly, where the data set is built, or run one eager loss call.
    """
    return _label_nll(logp, labels, "label_nll")


def _label_nll(logp: Array, labels: Array, where: str) -> Array:
    """:func:`label_nll`; ``where`` names the public caller in errors."""
    labels = jnp.asarray(labels)
    if labels.shape == logp.shape and jnp.issubdtype(labels.dtype, jnp.floating):
        return -jnp.sum(labels * logp, axis=-1)
    num_classes = logp.shape[-1]
    _check_hard_labels(labels, num_classes, where)
    idx = labels.astype(jnp.int32)
    valid = (idx >= 0) & (idx < num_classes)
    picked = jnp.take_along_axis(
        logp, jnp.where(valid, idx, 0)[..., None], -1, mode="clip"
    )[..., 0]
    return jnp.where(valid, -picked, jnp.nan)


# --------------------------------------------------------------------------
# KL and ELBO
# --------------------------------------------------------------------------
def kl_mean_field(
    q_mean: Array,
    q_var: Array,
    prior_mean: Array | float = 0.0,
    prior_var: Array | float = 1.0,
    *,
    q_logvar: Array | None = None,
) -> Array:
    """``KL(N(q_mean, q_var) || N(prior_mean, prior_var))`` summed over entries.

    ``q_logvar``: ``log q_var`` when the caller holds it (log-variance
    parameters); used instead of ``log(q_var)``, which is ``-inf`` with a NaN
    gradient once ``exp(logvar)`` underflows to 0.
    """
    pv = jnp.asarray(prior_var, q_var.dtype)
    pm = jnp.asarray(prior_mean, q_mean.dtype)
    log_q = jnp.log(q_var) if q_logvar is None else q_logvar
    kl = 0.5 * (jnp.log(pv) - log_q + (q_var + (q_mean - pm) ** 2) / pv - 1)
    return jnp.sum(kl)


def kl_divergence(
    posterior: Any, prior_var: float = 1.0, prior_mean: float = 0.0
) -> Array:
    """Sum of :func:`kl_mean_field` over every `Gaussian` leaf of a pytree."""
    leaves = jax.tree_util.tree_leaves(
        posterior, is_leaf=lambda x: isinstance(x, Gaussian)
    )
    total = jnp.zeros(())
    for g in leaves:
        if not isinstance(g, Gaussian):
            raise TypeError(
                f"kl_divergence: expected a pytree of Gaussian leaves, found"
                f" {type(g).__name__}."
            )
        total = total + kl_mean_field(g.mean, g.var, prior_mean, prior_var)
    return total


def neg_elbo(nll_mean: Array, kl: Array, n_data: int, kl_weight: float = 1.0) -> Array:
    """Per-example negative ELBO (Eq. 2 divided by ``|D|``).

    ``nll_mean + kl_weight * KL(q || p) / n_data`` where ``nll_mean`` is the
    mini-batch mean of the expected negative log-likelihood.  ``kl_weight`` is
    the beta of the Bayes-by-backprop report (1 = the true ELBO).
    """
    if n_data <= 0:
        raise ValueError(f"neg_elbo: n_data must be positive, got {n_data}.")
    return nll_mean + kl_weight * kl / n_data
