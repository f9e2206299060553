"""ELBO bookkeeping for mean-field Gaussian networks, whatever trained them.

Every variational method of :mod:`dualflow.nn` (``bp``, ``reparam``, ...)
fits the same family ``q(w) = prod N(mu, sigma^2)``, so one Monte Carlo
estimator of the evidence lower bound compares them on equal terms:

    ELBO(q) = sum_n E_q[log p(y_n | x_n, w)] - beta * KL(q || p)

(``beta = 1``: a lower bound on ``log p(D)``; ``beta < 1``: the tempered
objective of Bayes-by-backprop reports).  :func:`expected_log_likelihood`
draws weights from ``q`` (``Method("reparam")`` passes);
:func:`elbo_terms` assembles per-example and total ELBOs;
:func:`report_kl` and :func:`mean_approximate_evidence` reproduce the
conventions of the report "Bayesian neural networks and variational
inference" (Tables 1-2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dualflow import objectives
from dualflow.nn.context import Method
from dualflow.nn.layers import BayesianModule
from dualflow.nn.methods import Likelihood, apply

Array = jax.Array

__all__ = [
    "elbo_terms",
    "expected_log_likelihood",
    "log_likelihood",
    "mean_approximate_evidence",
    "report_kl",
    "sample_outputs",
]

_SAMPLE = Method("reparam")
_CATEGORICAL = Likelihood()


def _noise_var(model, likelihood: Likelihood) -> Array:
    if likelihood.noise_var is not None:
        return jnp.asarray(likelihood.noise_var)
    return jnp.exp(model.log_noise_var[...])


def sample_outputs(model, x: Array, key: Array, num_samples: int = 32) -> Array:
    """Network outputs ``[num_samples, N, ...]`` for weight draws ``w_s ~ q``.

    One ``Method("reparam")`` pass per draw (one weight sample per layer);
    draw ``s`` uses ``split(key, num_samples)[s]``.  Works for a model trained
    by any variational method: they all parameterise the same ``q``.
    """
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: apply(model, x, _SAMPLE, k))(keys)


def log_likelihood(
    outs: Array,
    y: Array,
    *,
    likelihood: Likelihood = _CATEGORICAL,
    noise_var: Array | float | None = None,
) -> Array:
    """``log p(y_n | outs_{s,n})`` ``[S, N]`` from sampled outputs ``[S, N, ...]``.

    ``"categorical"``: ``log softmax(outs)[y]`` (labels ``[N]``);
    ``"gaussian"``: ``log N(y; outs, noise_var)`` summed over output dims
    (``noise_var`` overrides ``likelihood.noise_var``).
    """
    if likelihood.kind == "categorical":
        logp = jax.nn.log_softmax(outs, axis=-1)
        return -jax.vmap(lambda lp: objectives.label_nll(lp, y))(logp)
    if likelihood.kind != "gaussian":
        raise NotImplementedError(f"log_likelihood: {likelihood.kind!r} head.")
    s = likelihood.noise_var if noise_var is None else noise_var
    if s is None:
        raise ValueError("log_likelihood: pass noise_var for a learned noise.")
    s = jnp.asarray(s, outs.dtype)
    y = jnp.asarray(y, outs.dtype).reshape(outs.shape[1:])
    lp = -0.5 * (math.log(2 * math.pi) + jnp.log(s) + (y - outs) ** 2 / s)
    return lp.reshape(outs.shape[0], outs.shape[1], -1).sum(-1)


def expected_log_likelihood(
    model,
    x: Array,
    y: Array,
    key: Array,
    *,
    likelihood: Likelihood = _CATEGORICAL,
    num_samples: int = 32,
) -> Array:
    """``log p(y_n | x_n, w_s)`` ``[num_samples, N]`` for draws ``w_s ~ q``.

    Args:
      model: an ``nnx`` model of Bayesian layers (trained by any method).
      x: inputs ``[N, ...]``.
      y: integer labels ``[N]`` (``"categorical"``) or targets ``[N, d]``
        (``"gaussian"``, noise ``likelihood.noise_var`` or the model's learned
        ``log_noise_var``).
      key: PRNG key (see :func:`sample_outputs`).

    Returns:
      ``[num_samples, N]``; its mean over axis 0 is an unbiased Monte Carlo
      estimate of ``E_q[log p(y_n | x_n, w)]`` with standard error
      ``std / sqrt(num_samples)``.
    """
    outs = sample_outputs(model, x, key, num_samples)
    noise = None
    if likelihood.kind == "gaussian":
        noise = _noise_var(model, likelihood)
    return log_likelihood(outs, y, likelihood=likelihood, noise_var=noise)


def elbo_terms(
    log_lik: Array, kl: Array, *, n_data: int, kl_weight: float = 1.0
) -> dict[str, Array]:
    """Per-example and total (tempered) ELBO from Monte Carlo log-likelihoods.

    Args:
      log_lik: ``[S, N]`` from :func:`expected_log_likelihood` (or ``[N]``).
      kl: scalar ``KL(q || p)`` in nats (:func:`dualflow.nn.kl_divergence`).
      n_data: ``|D|``, the size of the data set the bound refers to (the
        training set: the KL is paid once for the whole set).
      kl_weight: ``beta``.

    Returns:
      ``log_likelihood`` (mean per example), ``kl``, ``elbo`` =
      ``log_likelihood - beta KL / n_data`` (per example; minus the training
      objective of :func:`dualflow.nn.objective` up to the head's likelihood)
      and ``elbo_total = n_data * elbo``.  This is a lower bound on
      ``log p(D)`` (for ``beta = 1``) only when ``log_lik`` is measured on the
      training set ``D`` itself; on held-out data it is a held-out estimate.
    """
    ll = jnp.mean(log_lik)
    per_example = ll - kl_weight * kl / n_data
    return {
        "log_likelihood": ll,
        "kl": kl,
        "elbo": per_example,
        "elbo_total": n_data * per_example,
    }


def report_kl(model) -> Array:
    """The VI report's "KL divergence": ``sum_t KL_t(q || N(0, 1)) / shape_t[0]``.

    The report's code lineage sums, over parameter tensors ``t``, the KL to a
    standard normal divided by the tensor's leading dimension (fan-in for
    kernels ``[in, out]``, width for biases ``[out]``).  It is *not*
    ``KL(q || p)``; at the report's initialisation (``log sigma^2 = -7``,
    LeCun means) it gives 3109 for the 784-1024-10 MLP (Table 1: 3108.98)
    and ~76 for 1-10-10-1 (Table 2: 76.00).  The prior is N(0, 1) whatever
    the layers' own prior is.
    """
    total = jnp.zeros(())
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BayesianModule):
            for name in m._bayesian_names:
                mean, var = m.moments_of(name)
                kl = objectives.kl_mean_field(mean, var, 0.0, 1.0)
                total = total + kl / mean.shape[0]
    return total


def mean_approximate_evidence(elbo: Array, divisor: float = 10.0) -> Array:
    """The report's "mean approximate evidence": ``exp(ELBO / divisor)``.

    Tables 1 and 2 of the report satisfy ``evidence = exp(ELBO / 10)`` to all
    five printed digits (e.g. ``exp(-5.56209 / 10) = 0.57338``,
    ``exp(-0.04507 / 10) = 0.99550``), where ELBO is the report's per-example
    value ``mean log-lik - beta * report_kl``; the 10 is the number of MNIST
    classes in its code and is kept for the regression table too.  It is a
    monotone transform of the ELBO, not a probability of the data; the
    per-example geometric-mean evidence bound is ``exp(elbo_total / n_data)``
    with ``beta = 1`` (``<= p(D)^(1/n_data)``).
    """
    return jnp.exp(jnp.asarray(elbo) / divisor)
