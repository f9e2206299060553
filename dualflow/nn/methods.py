"""Objectives and predictions of one model under every learning method.

``objective`` is the per-mini-batch negative ELBO (Eq. 2 of the duality paper)
for variational methods -- ``mean NLL + kl_weight * KL / n_data`` -- and the
mean NLL for the others (use the optimiser's weight decay as their
regulariser).  ``predict`` returns the Bayesian model average: in closed form
from the output moments for ``bp``, by averaging ``num_samples`` stochastic
passes for sampling methods, and over members for ``ensemble``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dualflow import objectives
from dualflow.gaussian import Gaussian
from dualflow.nn.context import Context, Method
from dualflow.nn.layers import BayesianModule

Array = jax.Array

__all__ = [
    "Likelihood",
    "Predictive",
    "apply",
    "kl_divergence",
    "make_ensemble",
    "objective",
    "predict",
]


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """Observation model of the network output.

    Attributes:
      kind: ``"categorical"`` (integer labels, logits ``[N, K]``),
        ``"gaussian"`` (targets ``[N, d]``, homoscedastic noise) or
        ``"heteroscedastic"`` (targets ``[N, d]``; the network outputs
        ``[N, 2d]``: means, then log noise variances).
      head: for ``bp`` classification, how a Gaussian over logits becomes a
        likelihood: ``"probit"`` (MacKay/probit predictive), ``"second_order"``
        (expected log-softmax) or ``"mean"``.
      noise_var: Gaussian observation noise variance.  ``None``: learned; the
        model must then have an ``nnx.Param`` attribute ``log_noise_var``.
      min_noise_var: ``"heteroscedastic"`` only: a floor added to the
        per-example noise variance, ``min_noise_var + exp(z)``, in training and
        prediction (0: none).
    """

    kind: str = "categorical"
    head: str = "probit"
    noise_var: float | None = None
    min_noise_var: float = 0.0

    def __post_init__(self):
        if self.kind not in ("categorical", "gaussian", "heteroscedastic"):
            raise ValueError(
                "likelihood kind must be 'categorical', 'gaussian' or"
                f" 'heteroscedastic', got {self.kind!r}."
            )
        if not (
            isinstance(self.min_noise_var, int | float) and self.min_noise_var >= 0
        ):
            raise ValueError(
                f"min_noise_var must be a number >= 0, got {self.min_noise_var!r}."
            )
        if self.min_noise_var and self.kind != "heteroscedastic":
            raise ValueError(
                "min_noise_var applies to the 'heteroscedastic' likelihood only;"
                f" got kind {self.kind!r} (set noise_var for fixed noise)."
            )

    @property
    def is_regression(self) -> bool:
        return self.kind != "categorical"


def apply(model, x, method: Method, key: Array | None = None, *, train: bool = False):
    """One forward pass: a `Gaussian` for ``bp``, an array otherwise."""
    return model(x, Context(method, key, train=train))


def kl_divergence(model) -> Array:
    """Sum of ``KL(q || prior)`` over every Bayesian layer of ``model``."""
    total = jnp.zeros(())
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BayesianModule):
            total = total + m.kl()
    return total


def _noise_var(model, lik: Likelihood) -> Array:
    if lik.noise_var is not None:
        return jnp.asarray(lik.noise_var)
    if not hasattr(model, "log_noise_var"):
        raise ValueError(
            "Likelihood(noise_var=None) learns the noise: give the model an"
            " nnx.Param attribute `log_noise_var`, or pass a fixed noise_var."
        )
    return jnp.exp(model.log_noise_var[...])


def _nll(model, out, y, method: Method, lik: Likelihood) -> Array:
    """Per-example negative log-likelihood ``[N]``."""
    bp = method.layer_method == "bp"
    if lik.kind == "categorical":
        if bp:
            return objectives.categorical_nll(out, y, method=lik.head)
        return objectives.label_nll(jax.nn.log_softmax(out, axis=-1), y)
    pred = out if bp else Gaussian(out, jnp.zeros_like(out))
    if lik.kind == "heteroscedastic":
        mean, log_noise = _split_heteroscedastic(pred)
        nll = objectives.heteroscedastic_nll(
            mean, log_noise, y.reshape(mean.shape), lik.min_noise_var
        )
    else:
        y = y.reshape(pred.shape)
        nll = objectives.gaussian_nll(pred, y, _noise_var(model, lik))
    return nll.reshape(nll.shape[0], -1).sum(-1)


def _split_heteroscedastic(out: Gaussian) -> tuple[Gaussian, Gaussian]:
    """``[N, 2d]`` output -> (mean belief ``[N, d]``, log-noise belief ``[N, d]``)."""
    d2 = out.shape[-1]
    if d2 % 2:
        raise ValueError(
            "heteroscedastic likelihood: the network output must have 2*d units"
            f" (means, then log noise variances); got {d2}."
        )
    d = d2 // 2
    return (
        Gaussian(out.mean[..., :d], out.var[..., :d]),
        Gaussian(out.mean[..., d:], out.var[..., d:]),
    )


def _member_objective(
    model,
    x,
    y,
    key,
    method: Method,
    lik: Likelihood,
    n_data: int,
    kl_weight: float,
    train: bool,
):
    k = method.num_samples if method.is_sampling else 1
    nll = 0.0
    for i in range(k):
        kk = None if key is None else jax.random.fold_in(key, i)
        out = apply(model, x, method, kk, train=train)
        nll = nll + _nll(model, out, y, method, lik).mean() / k
    kl = kl_divergence(model) if method.is_variational else jnp.zeros(())
    loss = nll + kl_weight * kl / n_data
    return loss, {"nll": nll, "kl": kl}


def objective(
    model,
    x,
    y,
    key: Array | None = None,
    *,
    method: Method,
    likelihood: Likelihood = Likelihood(),
    n_data: int,
    kl_weight: float = 1.0,
    train: bool = True,
):
    """Training loss of one mini-batch and a dict of its parts.

    Args:
      model: an ``nnx.Module`` called as ``model(x, ctx)``; for ``ensemble`` a
        stacked model from :func:`make_ensemble`.
      x, y: inputs and targets (labels ``[N]``, soft labels ``[N, K]`` from
        mixup/CutMix, or regression targets).
      key: PRNG key (needed by sampling methods and ``mc_dropout``).
      n_data: training-set size (scales the KL per example).
      kl_weight: ``beta`` of the tempered ELBO.

    Returns:
      ``(loss, {"nll": ..., "kl": ...})``; for ensembles the loss is the sum of
      the members' losses (each member gets its own full gradient) and the
      parts are member means.
    """
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}.")
    if method.name != "ensemble":
        return _member_objective(
            model, x, y, key, method, likelihood, n_data, kl_weight, train
        )
    graphdef, state = nnx.split(model)
    size = _ensemble_size(state, method)
    keys = (
        jnp.zeros((size, 2), jnp.uint32) if key is None else jax.random.split(key, size)
    )

    def one(st, k):
        m = nnx.merge(graphdef, st)
        loss, parts = _member_objective(
            m,
            x,
            y,
            None if key is None else k,
            method,
            likelihood,
            n_data,
            kl_weight,
            train,
        )
        return loss, parts, nnx.state(m)

    losses, parts, new_state = jax.vmap(one)(state, keys)
    nnx.update(model, new_state)
    return losses.sum(), jax.tree.map(jnp.mean, parts)


def _ensemble_size(state, method: Method | None = None) -> int:
    leaves = jax.tree_util.tree_leaves(state)
    if not leaves:
        raise ValueError("ensemble model has no state.")
    sizes = {int(a.shape[0]) if a.ndim else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "method 'ensemble' needs a stacked model from make_ensemble(factory,"
            f" size); this model's leaves have leading sizes {sorted(map(str, sizes))}."
        )
    size = sizes.pop()
    if method is not None and size != method.ensemble_size:
        raise ValueError(
            f"the ensemble model has {size} members but Method.ensemble_size is"
            f" {method.ensemble_size}; make them agree."
        )
    return size


def make_ensemble(factory: Callable[[nnx.Rngs], Any], size: int, seed: int | Array = 0):
    """``size`` independently initialised members stacked on a leading axis.

    ``factory(rngs)`` builds one member; the result is one module whose
    parameters carry a leading ``[size]`` axis (vectorised with ``nnx.vmap``).
    ``seed`` is an integer or a PRNG key (e.g. traced, inside ``jax.vmap``).
    """
    if size < 1:
        raise ValueError(f"ensemble size must be >= 1, got {size}.")

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return factory(nnx.Rngs(params=key))

    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    return create(jax.random.split(key, size))


class Predictive(NamedTuple):
    """Bayesian model average of a model's predictions.

    Classification: ``probs [N, K]`` (BMA) and, where samples exist,
    ``sample_probs [S, N, K]`` (for mutual information).  Regression: ``mean``
    and ``var`` ``[N, d]`` of the predictive (observation noise included) and
    per-sample ``sample_mean``/``sample_var`` ``[S, N, d]`` for mixture
    log-likelihoods (for ``bp``: ``S = 1``, the Gaussian itself).
    """

    probs: Array | None = None
    sample_probs: Array | None = None
    mean: Array | None = None
    var: Array | None = None
    sample_mean: Array | None = None
    sample_var: Array | None = None


def predict(
    model,
    x,
    *,
    method: Method,
    likelihood: Likelihood = Likelihood(),
    key: Array | None = None,
    num_samples: int = 32,
    jit: bool = True,
) -> Predictive:
    """Predictive distribution (see :class:`Predictive`).

    ``bp``: closed form from the output Gaussian (probit approximation for
    ``head="probit"``); with a ``key``, ``num_samples`` logit draws from that
    Gaussian also give ``sample_probs``.  Sampling methods: ``num_samples``
    stochastic passes.  ``deterministic``: one pass.  ``ensemble``: one pass
    per member (members that sample use ``num_samples`` each).

    ``jit=True`` compiles the whole prediction once per (model structure,
    method, shapes); pass ``jit=False`` inside your own transformations.
    """
    if jit:
        graphdef, state = nnx.split(model)
        return _predict_jit(graphdef, state, x, key, method, likelihood, num_samples)
    return _predict(model, x, method, likelihood, key, num_samples)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _predict_jit(graphdef, state, x, key, method, likelihood, num_samples):
    model = nnx.merge(graphdef, state)
    return _predict(model, x, method, likelihood, key, num_samples)


def _predict(model, x, method, likelihood, key, num_samples) -> Predictive:
    if method.name == "ensemble":
        graphdef, state = nnx.split(model)
        size = _ensemble_size(state, method)
        keys = (
            jnp.zeros((size, 2), jnp.uint32)
            if key is None
            else jax.random.split(key, size)
        )
        member = dataclasses.replace(method, name=method.member)

        def one(st, k):
            m = nnx.merge(graphdef, st)
            return _predict(
                m, x, member, likelihood, None if key is None else k, num_samples
            )

        p = jax.vmap(one)(state, keys)
        if likelihood.kind == "categorical":
            sp = p.sample_probs if p.sample_probs is not None else p.probs[:, None]
            sp = sp.reshape(-1, *sp.shape[2:])
            return Predictive(probs=sp.mean(0), sample_probs=sp)
        sm = p.sample_mean.reshape(-1, *p.sample_mean.shape[2:])
        sv = p.sample_var.reshape(-1, *p.sample_var.shape[2:])
        return _mixture(sm, sv)

    lm = method.layer_method
    if lm == "bp":
        out = apply(model, x, method)
        if likelihood.kind == "categorical":
            if likelihood.head == "probit":
                probs = objectives.probit_softmax(out)
            else:
                probs = jax.nn.softmax(out.mean, axis=-1)
            sp = None
            if key is not None:
                sp = jax.nn.softmax(out.sample(key, (num_samples,)), axis=-1)
            return Predictive(probs=probs, sample_probs=sp)
        if likelihood.kind == "heteroscedastic":
            out, log_noise = _split_heteroscedastic(out)
            noise = objectives.heteroscedastic_noise(
                log_noise, likelihood.min_noise_var
            )
        else:
            noise = _noise_var(model, likelihood)
        var = out.var + noise
        return Predictive(
            mean=out.mean, var=var, sample_mean=out.mean[None], sample_var=var[None]
        )

    if method.is_sampling:
        if key is None:
            raise ValueError(f"predict: method {lm!r} samples; pass a PRNG key.")
        keys = jax.random.split(key, num_samples)
        outs = jax.vmap(lambda k: apply(model, x, method, k))(keys)
    else:
        outs = apply(model, x, method)[None]
    if likelihood.kind == "categorical":
        sp = jax.nn.softmax(outs, axis=-1)
        return Predictive(probs=sp.mean(0), sample_probs=sp)
    if likelihood.kind == "heteroscedastic":
        d = outs.shape[-1] // 2
        noise = likelihood.min_noise_var + jnp.exp(outs[..., d:])
        return _mixture(outs[..., :d], noise)
    noise = _noise_var(model, likelihood)
    return _mixture(outs, jnp.broadcast_to(noise, outs.shape))


def _mixture(sm: Array, sv: Array) -> Predictive:
    mean = sm.mean(0)
    var = sv.mean(0) + ((sm - mean) ** 2).mean(0)  # no E[x^2] - E[x]^2 cancellation
    return Predictive(
        mean=mean, var=jnp.maximum(var, 0.0), sample_mean=sm, sample_var=sv
    )


def predictive_log_likelihood(pred: Predictive, y: Array) -> Array:
    """Per-example log predictive density of regression targets ``[N]``:
    ``log mean_s N(y; m_s, v_s)`` summed over output dims."""
    y = y.reshape(pred.sample_mean.shape[1:])
    lp = -0.5 * (
        jnp.log(2 * math.pi * pred.sample_var)
        + (y - pred.sample_mean) ** 2 / pred.sample_var
    )
    lp = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
    return jax.nn.logsumexp(lp, axis=0) - math.log(lp.shape[0])
