"""Flax NNX layers over the pure moment rules, one definition for every method.

Each layer is called as ``layer(x, ctx)`` with a :class:`~dualflow.nn.Context`:

* ``bp``: ``x`` is a :class:`~dualflow.Gaussian` (an array is a point); the
  layer maps it with :mod:`dualflow.moments` (moment forward, BP backward).
* ``deterministic`` / ``ensemble`` members: the network of the weight means.
* ``reparam``: one weight sample per call (Blundell et al. 2015).
* ``local_reparam``: pre-activations sampled from their Gaussian moments, one
  draw per example (Kingma, Salimans & Welling 2015).
* ``flipout``: one shared weight perturbation decorrelated across examples by
  random sign flips of inputs and outputs (Wen et al. 2018).
* ``mc_dropout``: dropout on the inputs of weight layers at train and test time
  (Gal & Ghahramani 2016); weights are the means.

Weights are mean-field Gaussian: parameters ``<name>_mean`` and
``<name>_logvar`` (variance ``exp(logvar)``), the convention
:func:`dualflow.optim.natural_gradient` pairs leaves by.  No raw variance is a
trainable parameter, so no optimiser step can make a variance negative; if
``logvar`` drifts below float underflow (about -87 in float32) the variance is
exactly 0, and the KL (computed from ``logvar`` itself) and the sampling
gradients (``_safe_sqrt``) stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import ndtr

from dualflow import moments, objectives
from dualflow.gaussian import Gaussian
from dualflow.nn import ops
from dualflow.nn.context import Context

Array = jax.Array

__all__ = [
    "Activation",
    "AvgPool",
    "BatchNorm",
    "BayesianModule",
    "Conv",
    "Dense",
    "Dropout",
    "Flatten",
    "Gain",
    "GlobalAvgPool",
    "LayerNorm",
    "MaxPool",
    "Residual",
    "Sequential",
]

_PLAIN = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "gelu": lambda x: x * ndtr(x),  # exact GELU, as in dualflow.moments.gelu
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "erf": jax.scipy.special.erf,
    "probit": ndtr,
    "heaviside": lambda x: (x > 0).astype(x.dtype),
}


def _point(x, where: str, dtype=None) -> Array:
    """``x`` as a floating array (integer images would overflow ``x * x`` and
    break sign flips / dropout scaling)."""
    if isinstance(x, Gaussian):
        raise TypeError(
            f"{where}: got a Gaussian belief but the method is not 'bp'; pass arrays"
            " to sampling/deterministic methods."
        )
    x = jnp.asarray(x)
    if dtype is not None:
        return x.astype(jnp.result_type(x.dtype, dtype))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.result_type(float))
    return x


def _safe_sqrt(v: Array) -> Array:
    """``sqrt`` with a finite gradient at 0 (zero variance: no noise, grad 0)."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _rademacher(key: Array, shape, dtype) -> Array:
    return jax.random.rademacher(key, shape, dtype=dtype)


class BayesianModule(nnx.Module):
    """Base of layers with mean-field Gaussian weights and a Gaussian prior.

    Variances and the prior are expressed per weight tensor.  With
    ``var_scaling="fan_in"`` (default) ``init_var`` and ``prior_var`` are
    multiplied by ``1 / fan_in`` (the He/LeCun scale), so the same numbers work
    for every width; ``"none"`` uses them as given.  ``prior_var="empirical_bayes"``
    sets each tensor's prior variance to its closed-form optimum
    ``mean(mu^2 + sigma^2)`` (prior mean 0).
    """

    _bayesian_names: tuple[str, ...] = ()
    param_dtype: Any = jnp.float32

    def _init_weights(
        self,
        key,
        name,
        shape,
        fan_in,
        *,
        mean_std,
        init_var,
        prior_var,
        var_scaling,
        zero_mean=False,
    ):
        if var_scaling not in ("fan_in", "none"):
            raise ValueError(
                f"var_scaling must be 'fan_in' or 'none', got {var_scaling!r}."
            )
        scale = 1.0 / fan_in if var_scaling == "fan_in" else 1.0
        if not init_var > 0:
            raise ValueError(f"init_var must be > 0, got {init_var}.")
        dtype = self.param_dtype
        # explicit dtypes: weak-typed leaves would retrace jitted steps
        mean = (
            jnp.zeros(shape, dtype)
            if zero_mean
            else mean_std * jax.random.normal(key, shape, dtype)
        )
        setattr(self, f"{name}_mean", nnx.Param(mean))
        logvar = jnp.full(shape, math.log(init_var * scale), dtype)
        setattr(self, f"{name}_logvar", nnx.Param(logvar))
        if prior_var == "empirical_bayes":
            pv = "empirical_bayes"
        elif isinstance(prior_var, int | float) and prior_var > 0:
            pv = float(prior_var) * scale
        else:
            raise ValueError(
                f"prior_var must be > 0 or 'empirical_bayes', got {prior_var!r}."
            )
        # static attributes must be hashable (they are part of the graphdef)
        self._priors = (*getattr(self, "_priors", ()), (name, pv))
        self._bayesian_names = (*self._bayesian_names, name)

    def moments_of(self, name: str) -> tuple[Array, Array]:
        """``(mean, var)`` of weight tensor ``name``."""
        return getattr(self, f"{name}_mean")[...], jnp.exp(
            getattr(self, f"{name}_logvar")[...]
        )

    def kl(self) -> Array:
        """``KL(q || prior)`` summed over this layer's Bayesian tensors.

        The ``log q_var`` term is ``logvar`` itself (``q_logvar``), not
        ``log(exp(logvar))``, which is ``-inf`` with a NaN gradient once
        ``exp`` underflows.
        """
        total = jnp.zeros(())
        for name in self._bayesian_names:
            m = getattr(self, f"{name}_mean")[...]
            lv = getattr(self, f"{name}_logvar")[...]
            v = jnp.exp(lv)
            pv = dict(self._priors)[name]
            if pv == "empirical_bayes":
                pv = jax.lax.stop_gradient(jnp.mean(m * m + v))  # optimum: grad 0
            total = total + objectives.kl_mean_field(m, v, 0.0, pv, q_logvar=lv)
        return total


class _BayesianLinear(BayesianModule):
    """Shared forward of Dense and Conv: only the linear map ``_lin`` differs."""

    use_bias: bool
    dropout_inputs: bool

    def _lin(self, x: Array, w: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _moment_op(self, x, wm, wv, bm, bv, backward) -> Gaussian:  # pragma: no cover
        raise NotImplementedError

    def _in_sign_shape(self, x: Array) -> tuple[int, ...]:  # pragma: no cover
        raise NotImplementedError

    def _drop_shape(self, x: Array) -> tuple[int, ...]:
        """Shape of the ``mc_dropout`` input mask (broadcast against ``x``)."""
        return x.shape

    def _bias(self):
        if not self.use_bias:
            return None, None
        return self.moments_of("bias")

    def __call__(self, x, ctx: Context):
        wm, wv = self.moments_of("kernel")
        bm, bv = self._bias()
        name = ctx.name
        if name == "bp":
            return self._moment_op(x, wm, wv, bm, bv, ctx.method.backward)
        x = _point(x, type(self).__name__, wm.dtype)
        if name == "mc_dropout" and self.dropout_inputs:
            rate = ctx.method.dropout_rate
            keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, self._drop_shape(x))
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        if name in ("deterministic", "mc_dropout"):
            out = self._lin(x, wm)
            return out if bm is None else out + bm
        if name == "reparam":
            kw, kb = jax.random.split(ctx.next_key())
            w = wm + _safe_sqrt(wv) * jax.random.normal(kw, wm.shape, wm.dtype)
            out = self._lin(x, w)
            if bm is not None:
                eb = jax.random.normal(kb, bm.shape, bm.dtype)
                out = out + bm + _safe_sqrt(bv) * eb
            return out
        if name == "local_reparam":
            mean = self._lin(x, wm)
            var = self._lin(x * x, wv)
            if bm is not None:
                mean, var = mean + bm, var + bv
            eps = jax.random.normal(ctx.next_key(), mean.shape, mean.dtype)
            return mean + _safe_sqrt(var) * eps
        if name == "flipout":
            kw, ks, kr, kb = jax.random.split(ctx.next_key(), 4)
            dw = _safe_sqrt(wv) * jax.random.normal(kw, wm.shape, wm.dtype)
            s = _rademacher(ks, self._in_sign_shape(x), x.dtype)
            mean = self._lin(x, wm)
            pert = self._lin(x * s, dw)
            r = _rademacher(kr, self._out_sign_shape(pert), x.dtype)
            out = mean + pert * r
            if bm is not None:
                eb = jax.random.normal(kb, bm.shape, bm.dtype)
                out = out + bm + _safe_sqrt(bv) * eb
            return out
        raise ValueError(f"{type(self).__name__}: unknown method {name!r}.")


class Dense(_BayesianLinear):
    """Mean-field Gaussian dense layer ``[..., in] -> [..., out]``.

    Args:
      in_features, out_features: sizes.
      use_bias: add a (Bayesian) bias.
      init_var, prior_var, var_scaling: see :class:`BayesianModule`
        (defaults: ``init_var = 1e-3 / fan_in``, ``prior_var = 1 / fan_in``).
      mean_init: ``"he"`` (std ``sqrt(2 / fan_in)``, for ReLU-like nets) or
        ``"lecun"`` (std ``sqrt(1 / fan_in)``).
      dropout_inputs: whether ``mc_dropout`` drops this layer's inputs.
      param_dtype: dtype of the parameters (float32; float64 under x64).
      rngs: ``nnx.Rngs`` (``params`` stream).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        init_var: float = 1e-3,
        prior_var: float | str = 1.0,
        var_scaling: str = "fan_in",
        mean_init: str = "he",
        dropout_inputs: bool = True,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.param_dtype = param_dtype
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.use_bias, self.dropout_inputs = bool(use_bias), bool(dropout_inputs)
        std = _mean_std(mean_init, in_features)
        kw = dict(init_var=init_var, prior_var=prior_var, var_scaling=var_scaling)
        self._init_weights(
            rngs.params(),
            "kernel",
            (in_features, out_features),
            in_features,
            mean_std=std,
            **kw,
        )
        if use_bias:
            self._init_weights(
                None,
                "bias",
                (out_features,),
                in_features,
                mean_std=0.0,
                zero_mean=True,
                **kw,
            )

    def _lin(self, x, w):
        return x @ w

    def _moment_op(self, x, wm, wv, bm, bv, backward):
        return moments.dense(x, wm, wv, bm, bv, backward=backward)

    def _in_sign_shape(self, x):
        return x.shape  # one sign per element (per example and feature)

    def _out_sign_shape(self, y):
        return y.shape


class Conv(_BayesianLinear):
    """Mean-field Gaussian N-D convolution, channels last (``NHWC``, ``HWIO``).

    Args:
      in_features, out_features: channels.
      kernel_size: int or tuple (its length sets the number of spatial dims;
        an int means 2-D).
      strides, padding, feature_group_count: as in ``lax.conv_general_dilated``.
      Other arguments as :class:`Dense` (fan-in = prod(kernel) * in / groups).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        strides: int | Sequence[int] = 1,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        feature_group_count: int = 1,
        use_bias: bool = True,
        init_var: float = 1e-3,
        prior_var: float | str = 1.0,
        var_scaling: str = "fan_in",
        mean_init: str = "he",
        dropout_inputs: bool = True,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.param_dtype = param_dtype
        ks = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(
                f"Conv: channels ({in_features} -> {out_features}) must be divisible"
                f" by feature_group_count={feature_group_count}."
            )
        self.kernel_size = ks
        self.strides = (
            (strides,) * len(ks) if isinstance(strides, int) else tuple(strides)
        )
        self.padding = (
            padding if isinstance(padding, str) else tuple(map(tuple, padding))
        )
        self.feature_group_count = int(feature_group_count)
        self.use_bias, self.dropout_inputs = bool(use_bias), bool(dropout_inputs)
        cin = in_features // feature_group_count
        fan_in = math.prod(ks) * cin
        std = _mean_std(mean_init, fan_in)
        kw = dict(init_var=init_var, prior_var=prior_var, var_scaling=var_scaling)
        self._init_weights(
            rngs.params(),
            "kernel",
            (*ks, cin, out_features),
            fan_in,
            mean_std=std,
            **kw,
        )
        if use_bias:
            self._init_weights(
                None,
                "bias",
                (out_features,),
                fan_in,
                mean_std=0.0,
                zero_mean=True,
                **kw,
            )

    def _dn(self, ndim):
        sp = "".join("DHW"[-(ndim - 2) :]) if ndim - 2 <= 3 else None
        if sp is None:
            raise ValueError("Conv supports 1-3 spatial dimensions.")
        return (f"N{sp}C", f"{sp}IO", f"N{sp}C")

    def _lin(self, x, w):
        return moments._conv_cpu.conv_general_dilated(
            x,
            w,
            self.strides,
            self.padding,
            dimension_numbers=self._dn(x.ndim),
            feature_group_count=self.feature_group_count,
        )

    def _moment_op(self, x, wm, wv, bm, bv, backward):
        return moments.conv(
            x,
            wm,
            wv,
            bm,
            bv,
            strides=self.strides,
            padding=self.padding,
            feature_group_count=self.feature_group_count,
            backward=backward,
        )

    def _in_sign_shape(self, x):
        # one sign per example and input channel, shared over space (Wen et al.)
        return x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:]

    def _out_sign_shape(self, y):
        return y.shape[:1] + (1,) * (y.ndim - 2) + y.shape[-1:]


def _mean_std(mean_init: str, fan_in: int) -> float:
    if mean_init == "he":
        return math.sqrt(2.0 / fan_in)
    if mean_init == "lecun":
        return math.sqrt(1.0 / fan_in)
    raise ValueError(f"mean_init must be 'he' or 'lecun', got {mean_init!r}.")


class Activation(nnx.Module):
    """Element-wise activation; under ``bp`` uses ``ctx.method.mode``."""

    def __init__(self, name: str, **kwargs):
        if name not in _PLAIN:
            raise ValueError(
                f"unknown activation {name!r}; choose one of {sorted(_PLAIN)}."
            )
        self.name = name
        self.kwargs = tuple(sorted(kwargs.items()))  # hashable static attribute

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            return moments.activation(
                self.name,
                x,
                mode=ctx.method.mode,
                backward=ctx.method.backward,
                **dict(self.kwargs),
            )
        x = _point(x, f"Activation({self.name})")
        if self.name == "leaky_relu":
            slope = dict(self.kwargs).get("negative_slope", 0.01)
            return jax.nn.leaky_relu(x, slope)
        return _PLAIN[self.name](x)


def _pool_args(window, strides, padding):
    """Hashable (tuple) pooling arguments: they are static graphdef attributes."""

    def tup(a):
        return a if a is None or isinstance(a, int) else tuple(int(v) for v in a)

    pad = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    return tup(window), tup(strides), pad


class AvgPool(nnx.Module):
    """Average pooling (linear: exact for Gaussians)."""

    def __init__(self, window, strides=None, padding="VALID"):
        self.window, self.strides, self.padding = _pool_args(window, strides, padding)

    def __call__(self, x, ctx: Context):
        y = moments.avg_pool(x, self.window, self.strides, self.padding)
        return y if ctx.name == "bp" else y.mean


class MaxPool(nnx.Module):
    """Max pooling; under ``bp`` the smooth-max variance of :func:`moments.max_pool`."""

    def __init__(self, window, strides=None, padding="VALID"):
        self.window, self.strides, self.padding = _pool_args(window, strides, padding)

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            return moments.max_pool(
                x, self.window, self.strides, self.padding, backward=ctx.method.backward
            )
        x = _point(x, "MaxPool")
        nsp = x.ndim - 2
        w = (self.window,) * nsp if isinstance(self.window, int) else tuple(self.window)
        s = self.strides if self.strides is not None else w
        s = (s,) * nsp if isinstance(s, int) else tuple(s)
        pad = self.padding
        if not isinstance(pad, str):  # spatial pairs -> all axes
            pad = ((0, 0), *pad, (0, 0))
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, *w, 1), (1, *s, 1), pad
        )


class GlobalAvgPool(nnx.Module):
    """Mean over all spatial axes ``[N, *spatial, C] -> [N, C]``."""

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            return moments.global_avg_pool(x)
        x = _point(x, "GlobalAvgPool")
        return x.mean(axis=tuple(range(1, x.ndim - 1)))


class Flatten(nnx.Module):
    """``[N, ...] -> [N, prod(...)]``."""

    def __call__(self, x, ctx: Context):
        if isinstance(x, Gaussian):  # only under bp
            return moments.flatten(x)
        # a point stays an array under bp too, so that the next weight layer
        # skips its zero-variance product (dualflow.moments.bilinear_moments)
        return _point(x, "Flatten").reshape(x.shape[0], -1)


class Sequential(nnx.Module):
    """Layers applied in order, each called as ``layer(x, ctx)``."""

    def __init__(self, *layers):
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else list(layers)

    def __call__(self, x, ctx: Context):
        for layer in self.layers:
            x = layer(x, ctx)
        return x


class Residual(nnx.Module):
    """``block(x) + shortcut(x)`` (shortcut: identity unless given).

    Under ``bp`` the sum uses :func:`moments.add`, which treats the two
    branches as independent: the variance of the sum ignores their
    covariance (both depend on ``x``).  This is the paper's mean-field
    treatment of skip connections.
    """

    def __init__(self, block, shortcut=None):
        self.block = block
        self.shortcut = shortcut

    def __call__(self, x, ctx: Context):
        y = self.block(x, ctx)
        s = x if self.shortcut is None else self.shortcut(x, ctx)
        return ops.add(ctx, y, s)


class BatchNorm(nnx.Module):
    """Batch normalisation for the non-Bayesian baselines (e.g. "vanilla NN").

    It has no moment rule: under ``bp`` it raises (the paper's BP networks are
    normalisation-free); build such models with normalisation switched off.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, rngs: nnx.Rngs):
        self.bn = nnx.BatchNorm(num_features, momentum=momentum, rngs=rngs)

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            raise ValueError(
                "BatchNorm has no Gaussian moment rule: build the model without"
                " normalisation (norm=None) for method 'bp'."
            )
        return self.bn(_point(x, "BatchNorm"), use_running_average=not ctx.train)


class Dropout(nnx.Module):
    """Dropout with drop probability ``rate``; what it does depends on the method.

    * ``bp``: the Bernoulli mask is a node of the model and is marginalised
      in closed form (:func:`dualflow.moments.bernoulli_dropout`) at train and
      test time alike, so the forward stays deterministic.
    * ``mc_dropout``: nothing -- that method already drops the inputs of every
      weight layer (``Method.dropout_rate``, train and test time); a second
      mask here would compound the rates.
    * every other method: inverted dropout at train time only (needs a key);
      identity at evaluation.
    """

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)

    def __call__(self, x, ctx: Context):
        if self.rate == 0.0:
            return x
        if ctx.name == "bp":
            return moments.bernoulli_dropout(x, self.rate)
        x = _point(x, "Dropout")
        if not ctx.train or ctx.name == "mc_dropout":
            return x
        keep = jax.random.bernoulli(ctx.next_key(), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation over the last axis for the non-``bp`` methods
    (MLP-Mixer's "vanilla" variant).  Like :class:`BatchNorm` it has no
    moment rule: under ``bp`` it raises (build the model with ``norm=None``).
    """

    def __init__(self, num_features: int, *, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(num_features, rngs=rngs)

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            raise ValueError(
                "LayerNorm has no Gaussian moment rule: build the model without"
                " normalisation (norm=None) for method 'bp'."
            )
        return self.ln(_point(x, "LayerNorm"))


class Gain(nnx.Module):
    """A learned deterministic scalar ``alpha * x`` (point-estimated, no KL).

    Residual branches of normalisation-free (``NF``) networks end with it,
    initialised small (SkipInit, De & Smith 2020: ``alpha = 0`` makes every
    residual block the identity at initialisation so depth does not blow up
    the activations or their variances).  Under ``bp`` the variance scales by
    ``alpha^2``.
    """

    def __init__(self, init: float = 0.0, *, param_dtype: Any = jnp.float32):
        self.gain = nnx.Param(jnp.asarray(init, param_dtype))

    def __call__(self, x, ctx: Context):
        if ctx.name != "bp":
            x = _point(x, "Gain")
        return ops.scale(ctx, x, self.gain[...])
