"""Uncalibrated log densities over observations that a trained network defines.

A network that models ``p(y | x)`` says nothing about ``x``; combined with a
weak prior on the inputs it defines a joint ``p(x, y) ∝ p(y | x, θ) p0(x)``
whose typical set shows what the network has learned (the duality paper's
App. E.2: "target uncalibrated probabilities").  These builders return
potentials ``U(z) = -log p(z)`` for :func:`dualflow.hmc.run_hmc`.

* Regression, ``z = (x, y)``: ``log p(y | x)`` is the model's predictive
  density -- closed form for ``bp`` (Gaussian with observation noise), a
  mixture over members or samples otherwise (:func:`dualflow.nn.predict`) --
  plus ``log N(x; 0, s^2 Σ)`` with ``Σ`` the training-input covariance.
  Because ``p(y | x)`` is normalised in ``y``, the ``x``-marginal of this joint
  is exactly the prior ``p0``: what the network believes shows in the
  conditionals.  ``scripts/visualize.py`` therefore samples
  ``p(x | y*) ∝ p(y* | x) p0(x)`` for fixed labels ``y*`` (evaluate this
  potential at ``z = (x, y*)``), the regression analogue of the class
  conditionals below.
* Classification, ``z = x`` for a fixed class ``k``: ``log p(y = k | x)`` (the
  BMA class probability) plus a Gaussian prior on ``x``, optionally in a
  linear latent space ``x = x0 + B u`` (e.g. principal components of images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from dualflow.nn.context import Method
from dualflow.nn.methods import Likelihood, predict, predictive_log_likelihood

__all__ = [
    "class_log_prob_fn",
    "classification_potential",
    "gaussian_log_prior",
    "regression_potential",
]

Array = jax.Array
_GAUSSIAN = Likelihood("gaussian")
_CATEGORICAL = Likelihood()


def gaussian_log_prior(cov: Array, scale: float = 2.0) -> Callable[[Array], Array]:
    """``log N(x; 0, scale^2 cov)`` up to a constant (``cov`` ``[d, d]``)."""
    chol = jnp.linalg.cholesky(scale**2 * jnp.asarray(cov))

    def logp(x):
        w = jax.scipy.linalg.solve_triangular(chol, x, lower=True)
        return -0.5 * jnp.sum(w**2)

    return logp


def regression_potential(
    model,
    method: Method,
    log_prior_x: Callable[[Array], Array],
    *,
    likelihood: Likelihood = _GAUSSIAN,
    key: Array | None = None,
    num_samples: int = 16,
) -> Callable[[Array], Array]:
    """``U(z) = -log p(y | x) - log p0(x)`` for ``z = concat(x [d], y [1])``.

    ``model`` may be a list of models (e.g. independently trained networks):
    ``p(y | x)`` is then the equal-weight mixture of their predictive
    densities.  Sampling methods need a fixed ``key`` (the same networks at
    every evaluation: HMC needs a deterministic potential).
    """
    models = list(model) if isinstance(model, list | tuple) else [model]

    def potential(z):
        x, y = z[:-1], z[-1:]
        lls = []
        for m in models:
            pred = predict(
                m,
                x[None],
                method=method,
                likelihood=likelihood,
                key=key,
                num_samples=num_samples,
                jit=False,
            )
            lls.append(predictive_log_likelihood(pred, y[None])[0])
        ll = jax.nn.logsumexp(jnp.stack(lls)) - jnp.log(len(lls))
        return -(ll + log_prior_x(x))

    return potential


def class_log_prob_fn(
    model,
    method: Method,
    *,
    likelihood: Likelihood = _CATEGORICAL,
    key: Array | None = None,
    num_samples: int = 16,
) -> Callable[[Array], Array]:
    """``x [*input_shape] -> log p(y | x) [K]`` (the BMA class probabilities)."""

    def log_probs(x):
        pred = predict(
            model,
            x[None],
            method=method,
            likelihood=likelihood,
            key=key,
            num_samples=num_samples,
            jit=False,
        )
        return jnp.log(jnp.maximum(pred.probs[0], 1e-30))

    return log_probs


def classification_potential(
    log_probs: Callable[[Array], Array],
    label: int | Sequence[int],
    *,
    origin: Array,
    basis: Array | None = None,
    prior_scale: float = 1.0,
) -> Callable[[Array], Array]:
    """``U(u) = -sum_l log p(y = label_l | x(u_l)) + |u|^2 / (2 prior_scale^2)``.

    ``x(u) = origin + basis @ u`` (``basis`` ``[D, k]``, e.g. principal
    directions scaled by their standard deviations; ``None``: ``x = origin +
    u``, then reshaped like ``origin``).  With several labels ``u`` is the
    concatenation of one block ``u_l`` per label (independent targets sampled
    by one chain, e.g. an input of every class at once); ``potential.to_x``
    maps one block to an input.
    """
    origin = jnp.asarray(origin)
    labels = jnp.atleast_1d(jnp.asarray(label, jnp.int32))

    def to_x(u):
        flat = u if basis is None else basis @ u
        return origin + flat.reshape(origin.shape)

    def potential(u):
        xs = jax.vmap(to_x)(u.reshape(labels.shape[0], -1))
        lp = jax.vmap(log_probs)(xs)[jnp.arange(labels.shape[0]), labels]
        return -jnp.sum(lp) + 0.5 * jnp.sum(u**2) / prior_scale**2

    potential.to_x = to_x  # type: ignore[attr-defined]
    return potential
