"""Gradient noise of a stochastic training objective: mini-batch vs weight sampling.

A sampling method's gradient ``g(B, eps)`` depends on the mini-batch ``B`` and
on the weight noise ``eps``.  The law of total variance splits the trace of its
covariance into two parts (the quantity plotted against batch size in Fig. 1a/c
of "Duality of information flow"):

    tr Cov[g] = E_B[ tr Cov_eps(g | B) ]      weight-sampling noise
              + tr Cov_B( E_eps[g | B] )      mini-batch noise

:func:`estimate_gradient_noise` draws ``R`` mini-batches and ``S >= 2`` noise
draws per batch.  With per-batch means ``m_r`` and unbiased within-batch
variances ``w_r`` (traces), the unbiased estimates are

    weight     = mean_r w_r
    minibatch  = Var_r(m_r) - weight / S        (Var_r: unbiased, over batches)
    total      = minibatch + weight             (one-draw estimator, S = 1)

and standard errors come from a bootstrap over batches (pairs ``(m_r, w_r)``
resampled together).  Deterministic forwards (``bp``, ``deterministic``) give
``w_r = 0`` exactly.  Mini-batches are drawn without replacement from ``n``
examples, so the mini-batch part of a mean of per-example gradients is
``(n - B) / (n - 1) / B`` times their population variance
(:func:`minibatch_variance_exact`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

__all__ = [
    "NoiseEstimate",
    "estimate_gradient_noise",
    "minibatch_variance_exact",
    "model_summary_fn",
    "noise_from_batch_summaries",
    "paired_difference_se",
]


class NoiseEstimate(NamedTuple):
    """Traces of gradient covariances (summed over all ``P`` coordinates).

    ``total`` is the variance of the one-draw estimator (one batch, one noise
    draw); ``*_se`` are bootstrap standard errors (resampling batches).
    """

    total: float
    total_se: float
    minibatch: float
    minibatch_se: float
    weight: float
    weight_se: float
    num_batches: int
    num_samples: int
    num_params: int
    total_boot: np.ndarray | None = None  # bootstrap replicates of ``total``


def noise_from_batch_summaries(
    batch_means: np.ndarray,
    within: np.ndarray,
    num_samples: int,
    *,
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> NoiseEstimate:
    """Split gradient noise given per-batch summaries.

    Args:
      batch_means: ``[R, P]`` mean gradient over the ``S`` noise draws of batch r.
      within: ``[R]`` unbiased within-batch variance trace of batch r
        (``sum_s ||g_rs - m_r||^2 / (S - 1)``).
      num_samples: ``S`` (>= 2).
    """
    m = np.asarray(batch_means)
    w = np.asarray(within, np.float64)
    if m.ndim != 2 or w.shape != (m.shape[0],):
        raise ValueError(
            f"batch_means must be [R, P] and within [R]; got {m.shape}, {w.shape}."
        )
    r = m.shape[0]
    if r < 2:
        raise ValueError(f"need at least 2 batches, got {r}.")
    if num_samples < 2:
        raise ValueError(
            f"num_samples must be >= 2 to separate the two noise sources,"
            f" got {num_samples}."
        )
    centred = (m - m.mean(axis=0, dtype=np.float64)).astype(np.float32)
    gram = (centred @ centred.T).astype(np.float64)  # [R, R]

    def split(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # k [..., R]: how often each batch is drawn (all ones: the sample
        # itself).  sum_i ||c_i - mean(c)||^2 = k.diag(G) - k'Gk / R.
        diag = k @ np.diag(gram)
        full = np.einsum("...r,rs,...s->...", k, gram, k)
        between = (diag - full / r) / (r - 1)
        weight = k @ w / r
        minibatch = between - weight / num_samples
        return minibatch + weight, minibatch, weight

    point = split(np.ones(r))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(r, np.full(r, 1.0 / r), size=num_bootstrap)
    boot = split(counts.astype(np.float64))
    se = [float(np.std(b, ddof=1)) for b in boot]
    return NoiseEstimate(
        total=float(point[0]),
        total_se=se[0],
        minibatch=float(point[1]),
        minibatch_se=se[1],
        weight=float(point[2]),
        weight_se=se[2],
        num_batches=r,
        num_samples=int(num_samples),
        num_params=int(m.shape[1]),
        total_boot=boot[0],
    )


def paired_difference_se(a: NoiseEstimate, b: NoiseEstimate) -> float:
    """Bootstrap standard error of ``a.total - b.total``.

    Valid when both estimates used the same mini-batches and the same bootstrap
    ``seed`` (so replicate i resamples the same batches in both): the two
    estimates are then positively correlated and this error is smaller than
    ``hypot(a.total_se, b.total_se)``.
    """
    if a.total_boot is None or b.total_boot is None:
        raise ValueError("paired_difference_se needs estimates with total_boot.")
    if a.total_boot.shape != b.total_boot.shape or a.num_batches != b.num_batches:
        raise ValueError("paired estimates must share batches and bootstrap draws.")
    return float(np.std(a.total_boot - b.total_boot, ddof=1))


def estimate_gradient_noise(
    summary_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    n_data: int,
    *,
    batch_size: int,
    num_batches: int,
    num_samples: int,
    key: jax.Array,
    seed: int = 0,
) -> NoiseEstimate:
    """Estimate the noise of a gradient estimator at fixed parameters.

    Args:
      summary_fn: ``summary_fn(idx [B] int32, keys [S]) -> (mean [P], within [])``:
        the gradients of the batch ``idx`` under ``S`` noise keys, reduced to
        their mean and unbiased within-batch variance trace (build it with
        ``jax.vmap`` over the keys and ``jax.jit`` it once per batch size).
      n_data: number of examples batches are drawn from (without replacement
        within a batch, independently across batches).
      key: base PRNG key; batch r uses ``fold_in(key, r)``.
    """
    if not 1 <= batch_size <= n_data:
        raise ValueError(f"batch_size must be in [1, {n_data}], got {batch_size}.")
    rng = np.random.default_rng(seed)
    means, within = [], []
    for r in range(num_batches):
        idx = rng.choice(n_data, size=batch_size, replace=False).astype(np.int32)
        keys = jax.random.split(jax.random.fold_in(key, r), num_samples)
        mean, w = summary_fn(idx, keys)
        means.append(np.asarray(mean, np.float32))
        within.append(float(w))
    return noise_from_batch_summaries(
        np.stack(means), np.asarray(within), num_samples, seed=seed
    )


def minibatch_variance_exact(per_example: np.ndarray, batch_size: int) -> float:
    """Exact ``tr Cov`` of the mean of ``batch_size`` rows drawn without
    replacement from ``per_example`` ``[n, P]`` (finite-population correction)."""
    g = np.asarray(per_example, np.float64)
    n = g.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}.")
    pop = ((g - g.mean(0)) ** 2).sum(1).mean()
    if n == 1:
        return 0.0
    return float(pop / batch_size * (n - batch_size) / (n - 1))


def model_summary_fn(
    model,
    x,
    y,
    *,
    method,
    likelihood=None,
    kl_weight: float = 1.0,
    n_data: int | None = None,
    leaf_suffix: str = "_mean",
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``summary_fn`` for :func:`estimate_gradient_noise` of a dualflow model.

    The gradient is that of the per-batch training objective of ``method``
    (:func:`dualflow.nn.objective`: mean NLL + ``kl_weight * KL / n_data`` for
    variational methods) with respect to the parameters whose name ends with
    ``leaf_suffix`` (default: the weight and bias means of Bayesian layers),
    flattened to ``[P]``.  ``x``, ``y`` stay on the device; batches are gathered
    inside the compiled function.
    """
    import jax.numpy as jnp
    from flax import nnx

    from dualflow.nn.methods import Likelihood

    likelihood = Likelihood() if likelihood is None else likelihood
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    static = (
        graphdef,
        method,
        likelihood,
        len(x) if n_data is None else int(n_data),
        float(kl_weight),
        leaf_suffix,
    )
    x, y = jnp.asarray(x), jnp.asarray(y)
    return lambda idx, keys: _summary(
        static, params, rest, x, y, jnp.asarray(idx), keys
    )


@functools.partial(jax.jit, static_argnums=0)
def _summary(static, params, rest, x, y, idx, keys):
    # one compilation per (model structure, method, shapes): shared by every
    # posterior of the same model
    from dualflow.train.fit import make_loss_fn

    graphdef, method, likelihood, n_data, kl_weight, suffix = static
    loss_fn = make_loss_fn(
        graphdef, method=method, likelihood=likelihood, n_data=n_data
    )

    def selected(tree) -> jax.Array:
        leaves = [
            leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if _path_name(path).endswith(suffix)
        ]
        if not leaves:
            raise ValueError(f"no parameter name ends with {suffix!r}.")
        return jax.numpy.concatenate([leaf.ravel() for leaf in leaves])

    def grad(k):
        g = jax.grad(lambda p: loss_fn(p, rest, x[idx], y[idx], k, kl_weight)[0])
        return selected(g(params))

    gs = jax.vmap(grad)(keys)  # [S, P]
    # centre on the first draw: identical draws (bp, deterministic) give a
    # within-batch variance of exactly 0 for any S
    d = gs - gs[0]
    dm = d.mean(0)
    within = ((d - dm) ** 2).sum() / (gs.shape[0] - 1)
    return gs[0] + dm, within


def _path_name(path) -> str:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    names = [n for n in names if n != "value"]
    return names[-1] if names else ""
