"""Sanity check of bp beliefs against an ensemble of sampled networks.

Appendix E.2 of "Duality of information flow" validates the method by
simulating belief propagation "using an ensemble of non-Bayesian neural
networks in a shared computational graph": the filter and smoothing densities
of the trained Bayesian network are compared with those of many plain
networks whose weights are drawn from the variational posterior ``q``.  This
module implements that comparison for a :class:`~dualflow.nn.Regressor`.

Two estimates of the same quantities are set side by side, per tapped
activation (every dense output ``dense{i}``, every activation output
``act{i}`` and the network output ``out``):

* **bp** (what the method computes): the Regressor's forward written
  functionally from its layers' weight moments with exactly the moment ops
  the layers use under ``Method("bp", mode=...)``; filtered beliefs are the
  forward moments, smoothed beliefs (posterior given ``y``) follow from the
  backward pass by Theorem 1 (:func:`dualflow.smoothing.posterior_moments`).
  Approximations: beliefs are diagonal Gaussians (units treated as
  independent, so covariances induced by shared inputs are dropped), the
  activations are linearised (``"linearized"``, Algorithm 1) or
  moment-matched (``"matched"``), and the smoother is the posterior implied
  by the backward rule -- exact only for Gaussian-linear graphs.
* **MC** (the reference): ``S`` weight sets drawn from ``q`` (independent
  Gaussian per weight and bias entry), each run as a deterministic network.
  Filtered moments are the ensemble mean/variance (exact as ``S -> inf``).
  Smoothed moments condition each example on its own target by
  self-normalised importance sampling with weights
  ``w_s(n) ∝ N(y_n; f_s(x_n), noise_var)`` (the same likelihood as the bp
  loss), consistent as ``S -> inf`` but with an effective sample size
  ``ESS_n = 1 / sum_s w_s(n)^2`` that can be much smaller than ``S``.

Discrepancies are reported in Monte Carlo standard-error units
(``sqrt(var / S)`` for the filter, ``sqrt(var / ESS_n)`` for the smoother, the
usual delta-method approximation of the importance-sampling error), as
variance ratios ``bp / MC``, and, for the smoother, in posterior standard
deviations.  Entries whose MC variance is zero (e.g. ReLU units that are
inactive in every sampled network) are left out of the medians.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualflow import moments, objectives
from dualflow.gaussian import Gaussian
from dualflow.nn.context import Context, Method
from dualflow.nn.layers import Activation, Dense
from dualflow.nn.models import Regressor
from dualflow.smoothing import DualityResult, posterior_moments

Array = jax.Array

__all__ = [
    "LayerComparison",
    "bp_beliefs",
    "bp_forward",
    "compare_with_sampled_networks",
    "layer_specs",
    "sampled_forward",
]


class LayerComparison(NamedTuple):
    """Discrepancies of one tapped activation (medians over units and examples).

    Attributes:
      name: tap name (``"dense0"``, ``"act0"``, ..., ``"out"``).
      filter_mean_z: ``|bp mean - MC mean| / sqrt(MC var / S)``.
      filter_var_ratio: ``bp var / MC var``.
      smooth_mean_z: ``|bp smoothed mean - MC smoothed mean| /
        sqrt(MC smoothed var / ESS_n)`` (importance-weighted MC).
      smooth_var_ratio: ``bp smoothed var / MC smoothed var``.
      smooth_mean_rel: ``|bp smoothed mean - MC smoothed mean| /
        sqrt(MC smoothed var)`` (in posterior standard deviations; does not
        shrink with ``S``, a robust effect size).
    """

    name: str
    filter_mean_z: float
    filter_var_ratio: float
    smooth_mean_z: float
    smooth_var_ratio: float
    smooth_mean_rel: float


# ---------------------------------------------------------------------------
# the network as data
# ---------------------------------------------------------------------------
class _DenseSpec(NamedTuple):
    name: str
    w_mean: Array
    w_var: Array
    b_mean: Array | None
    b_var: Array | None


class _ActSpec(NamedTuple):
    name: str
    layer: Activation


def layer_specs(model: Regressor) -> list[_DenseSpec | _ActSpec]:
    """The Regressor's layers as tap-named weight moments / activations.

    Hidden dense layers are named ``dense{i}``, the activation after them
    ``act{i}`` and the last dense layer ``out``.  Only :class:`Dense` and
    :class:`Activation` layers are supported (the plain MLP of a Regressor).
    """
    if getattr(model, "heteroscedastic", False) or not hasattr(model, "log_noise_var"):
        raise ValueError(
            "compare_with_sampled_networks: needs a homoscedastic Regressor"
            " (with log_noise_var)."
        )
    layers = list(model.net.net.layers)
    n_dense = sum(isinstance(layer, Dense) for layer in layers)
    specs: list[_DenseSpec | _ActSpec] = []
    i_dense = i_act = 0
    for layer in layers:
        if isinstance(layer, Dense):
            i_dense += 1
            name = "out" if i_dense == n_dense else f"dense{i_dense - 1}"
            wm, wv = layer.moments_of("kernel")
            bm, bv = layer.moments_of("bias") if layer.use_bias else (None, None)
            specs.append(_DenseSpec(name, wm, wv, bm, bv))
        elif isinstance(layer, Activation):
            specs.append(_ActSpec(f"act{i_act}", layer))
            i_act += 1
        else:
            raise TypeError(
                f"compare_with_sampled_networks: unsupported layer"
                f" {type(layer).__name__} (only Dense and Activation)."
            )
    if not specs or specs[-1].name != "out":
        raise ValueError("the network must end with a Dense layer.")
    return specs


def _noise_var(model: Regressor) -> Array:
    return jnp.exp(model.log_noise_var[...])


# ---------------------------------------------------------------------------
# bp side
# ---------------------------------------------------------------------------
def bp_forward(
    model: Regressor,
    x: Array,
    *,
    mode: str = "linearized",
    backward: str = "bp",
    tap: Callable[[str, Gaussian], Gaussian] | None = None,
) -> Gaussian:
    """The Regressor's ``bp`` forward, written out from its layers' moments.

    The same ops a :class:`Dense` / :class:`Activation` layer runs under
    ``Method("bp", mode=mode, backward=backward)``; ``tap(name, belief)`` is
    applied to every dense and activation output (see :func:`layer_specs`).
    """
    tap = tap if tap is not None else (lambda _, g: g)
    h: Any = x
    for spec in layer_specs(model):
        if isinstance(spec, _DenseSpec):
            h = moments.dense(
                h, spec.w_mean, spec.w_var, spec.b_mean, spec.b_var, backward=backward
            )
        else:
            h = moments.activation(
                spec.layer.name,
                h,
                mode=mode,
                backward=backward,
                **dict(spec.layer.kwargs),
            )
        h = tap(spec.name, h)
    return h


def bp_beliefs(
    model: Regressor,
    x: Array,
    y: Array,
    *,
    mode: str = "linearized",
    backward: str = "bp",
) -> DualityResult:
    """Filtered and smoothed bp beliefs of every tap for ``J = sum_n NLL_n``.

    The loss is ``gaussian_nll(out, y, exp(log_noise_var)).sum()``; since it
    is a sum over examples, each example's smoothed belief is conditioned on
    its own target only.
    """
    noise_var = _noise_var(model)

    def nll(x, y, tap):
        out = bp_forward(model, x, mode=mode, backward=backward, tap=tap)
        return objectives.gaussian_nll(out, y.reshape(out.shape), noise_var).sum()

    return posterior_moments(nll, x, y)


# ---------------------------------------------------------------------------
# MC side
# ---------------------------------------------------------------------------
def _sample_weights(specs, key: Array) -> list[tuple[Array, Array | None] | None]:
    """One weight set from ``q`` (``None`` for activation layers)."""
    weights: list[tuple[Array, Array | None] | None] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, _DenseSpec):
            weights.append(None)
            continue
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        w = spec.w_mean + jnp.sqrt(spec.w_var) * jax.random.normal(
            kw, spec.w_mean.shape, spec.w_mean.dtype
        )
        b = None
        if spec.b_mean is not None:
            b = spec.b_mean + jnp.sqrt(spec.b_var) * jax.random.normal(
                kb, spec.b_mean.shape, spec.b_mean.dtype
            )
        weights.append((w, b))
    return weights


def sampled_forward(
    model: Regressor, x: Array, key: Array
) -> tuple[Array, dict[str, Array]]:
    """One plain network with weights drawn from ``q`` (seeded by ``key``).

    Returns the output ``[N, d_out]`` and every tapped activation
    ``{name: [N, width]}``.  Activations are the layers' own point rules.
    """
    specs = layer_specs(model)
    weights = _sample_weights(specs, key)
    ctx = Context(Method("deterministic"))
    dtype = jnp.result_type(jnp.asarray(x).dtype, specs[-1].w_mean.dtype)
    h = jnp.asarray(x).astype(dtype)
    taps: dict[str, Array] = {}
    for spec, wb in zip(specs, weights, strict=True):
        if isinstance(spec, _DenseSpec):
            w, b = wb
            h = h @ w
            if b is not None:
                h = h + b
        else:
            h = spec.layer(h, ctx)
        taps[spec.name] = h
    return h, taps


def _log_lik(out: Array, y: Array, noise_var: Array) -> Array:
    """``log N(y_n; f(x_n), noise_var)`` summed over outputs: ``[N]``."""
    y = y.reshape(out.shape).astype(out.dtype)
    r2 = (y - out) ** 2 / noise_var
    return -0.5 * jnp.sum(r2 + jnp.log(2.0 * math.pi * noise_var), axis=-1)


def _mc_moments(model, x, y, keys, valid, centre_f, centre_s):
    """Filtered and importance-weighted moments over the sampled networks.

    Two passes over chunks of networks (memory ``O(chunk * N * width)``):
    the first computes the log-likelihoods ``[S, N]``, the second
    accumulates weighted first and second moments about the bp means (shifts
    that keep the float32 accumulation well conditioned).
    """
    noise_var = _noise_var(model)
    run = jax.vmap(lambda k: sampled_forward(model, x, k))

    def loglik_chunk(_, k):
        out, _taps = run(k)
        return None, jax.vmap(lambda o: _log_lik(o, y, noise_var))(out)

    _, logw = jax.lax.scan(loglik_chunk, None, keys)  # [C, B, N]
    logw = logw.reshape(-1, logw.shape[-1])
    logw = jnp.where(valid.reshape(-1)[:, None], logw, -jnp.inf)
    w_is = jax.nn.softmax(logw, axis=0)  # [S_pad, N], per-example
    ess = 1.0 / jnp.sum(w_is**2, axis=0)
    num = valid.sum()
    w_f = valid.astype(w_is.dtype) / num  # [C, B]
    w_is = w_is.reshape(*keys.shape[:2], -1)  # [C, B, N]

    zeros = {k: jnp.zeros_like(v) for k, v in centre_f.items()}
    init = (zeros, zeros, zeros, zeros)

    def acc_chunk(carry, inp):
        s1f, s2f, s1s, s2s = carry
        k, wf, ws = inp
        _, taps = run(k)
        s1f, s2f, s1s, s2s = dict(s1f), dict(s2f), dict(s1s), dict(s2s)
        for name, h in taps.items():  # h: [B, N, width]
            df = h - centre_f[name]
            ds = h - centre_s[name]
            s1f[name] = s1f[name] + jnp.einsum("b,bnk->nk", wf, df)
            s2f[name] = s2f[name] + jnp.einsum("b,bnk->nk", wf, df * df)
            s1s[name] = s1s[name] + jnp.einsum("bn,bnk->nk", ws, ds)
            s2s[name] = s2s[name] + jnp.einsum("bn,bnk->nk", ws, ds * ds)
        return (s1f, s2f, s1s, s2s), None

    (s1f, s2f, s1s, s2s), _ = jax.lax.scan(acc_chunk, init, (keys, w_f, w_is))
    bessel = num / jnp.maximum(num - 1, 1)
    filt = {
        k: Gaussian(centre_f[k] + s1f[k], bessel * (s2f[k] - s1f[k] ** 2))
        for k in centre_f
    }
    smooth = {k: Gaussian(centre_s[k] + s1s[k], s2s[k] - s1s[k] ** 2) for k in centre_s}
    return filt, smooth, ess


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------
def _median(a: np.ndarray, mask: np.ndarray) -> float:
    a = np.asarray(a, np.float64)[mask]
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def _compare(name, bp_f, bp_s, mc_f, mc_s, num, ess) -> LayerComparison:
    f_mean, f_var = np.asarray(mc_f.mean, np.float64), np.asarray(mc_f.var, np.float64)
    s_mean, s_var = np.asarray(mc_s.mean, np.float64), np.asarray(mc_s.var, np.float64)
    b_fm, b_fv = np.asarray(bp_f.mean, np.float64), np.asarray(bp_f.var, np.float64)
    b_sm, b_sv = np.asarray(bp_s.mean, np.float64), np.asarray(bp_s.var, np.float64)
    ess = np.asarray(ess, np.float64).reshape(-1, *([1] * (f_mean.ndim - 1)))
    # entries without MC spread (e.g. ReLU units off in every network) carry
    # no information on the variance and would divide by zero
    tiny = 1e-12 * max(float(np.max(np.abs(f_mean), initial=0.0)), 1.0) ** 2
    ok_f = f_var > tiny
    ok_s = s_var > tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        fz = np.abs(b_fm - f_mean) / np.sqrt(f_var / num)
        fr = b_fv / f_var
        sd = np.abs(b_sm - s_mean)
        sz = sd / np.sqrt(s_var / ess)
        sr = b_sv / s_var
        srel = sd / np.sqrt(s_var)
    return LayerComparison(
        name=name,
        filter_mean_z=_median(fz, ok_f),
        filter_var_ratio=_median(fr, ok_f),
        smooth_mean_z=_median(sz, ok_s),
        smooth_var_ratio=_median(sr, ok_s),
        smooth_mean_rel=_median(srel, ok_s),
    )


def compare_with_sampled_networks(
    model: Regressor,
    x: Array,
    y: Array,
    *,
    num_networks: int = 4000,
    key: Array,
    mode: str = "linearized",
    backward: str = "bp",
    chunk_size: int = 500,
) -> dict:
    """Compare bp filter/smoothing beliefs with an ensemble of sampled networks.

    The sanity check of App. E.2 of "Duality of information flow" (see the
    module docstring for what each side approximates).

    Args:
      model: a homoscedastic :class:`~dualflow.nn.Regressor` (Dense and
        Activation layers; its noise variance ``exp(log_noise_var)`` is the
        likelihood of both sides).
      x: inputs ``[N, d]``.
      y: targets ``[N, d_out]`` (``[N, 1]`` for one output).
      num_networks: ``S``, weight sets drawn from ``q``.
      key: PRNG key of the weight draws.
      mode: bp activation moments, ``"linearized"`` or ``"matched"``.
      backward: bp backward rule (``"bp"`` default; it defines the smoother).
      chunk_size: networks run at once (memory ``chunk * N * width``).

    Returns:
      ``{"layers": [LayerComparison._asdict(), ...] (forward order),
      "is_ess_median", "is_ess_min" (importance-sampling effective sample
      size per example), "num_networks", "n"}`` with plain Python numbers.
    """
    if num_networks < 2:
        raise ValueError(f"num_networks must be >= 2, got {num_networks}.")
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, d], got shape {x.shape}.")
    n = x.shape[0]
    y = jnp.asarray(y).reshape(n, -1)
    specs = layer_specs(model)

    res = bp_beliefs(model, x, y, mode=mode, backward=backward)

    chunk = int(max(1, min(chunk_size, num_networks)))
    num_chunks = -(-num_networks // chunk)
    keys = jax.random.split(key, (num_chunks, chunk))
    valid = (jnp.arange(num_chunks * chunk) < num_networks).reshape(num_chunks, chunk)
    centre_f = {k: jax.lax.stop_gradient(g.mean) for k, g in res.filtered.items()}
    centre_s = {k: jax.lax.stop_gradient(g.mean) for k, g in res.smoothed.items()}
    mc_f, mc_s, ess = _mc_moments(model, x, y, keys, valid, centre_f, centre_s)

    layers = [
        _compare(
            spec.name,
            res.filtered[spec.name],
            res.smoothed[spec.name],
            mc_f[spec.name],
            mc_s[spec.name],
            num_networks,
            ess,
        )._asdict()
        for spec in specs
    ]
    ess = np.asarray(ess, np.float64)
    return {
        "layers": layers,
        "is_ess_median": float(np.median(ess)),
        "is_ess_min": float(np.min(ess)),
        "num_networks": int(num_networks),
        "n": int(n),
    }
