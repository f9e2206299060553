"""Building blocks shared by the model families.

Conventions (every family):

* inputs are channels-last images ``[N, H, W, C]`` (or a
  :class:`~dualflow.Gaussian` of that shape under ``bp``); outputs are logits
  ``[N, num_classes]``;
* ``norm="batch"`` builds the published network (BatchNorm, for the
  ``vanilla`` / ``reparam`` rows of the paper's Table 1); ``norm=None`` builds
  the normalisation-free (``NF``) variant that ``bp`` needs: convolutions get a
  bias and residual branches end in a :class:`~dualflow.nn.Gain` initialised at
  ``residual_init`` (SkipInit);
* ``**layer_kwargs`` go to every Bayesian layer (``init_var``, ``prior_var``,
  ``var_scaling``, ``param_dtype``);
* the stem never drops its inputs under ``mc_dropout`` (raw pixels).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.nn.context import Context
from dualflow.nn.layers import Activation, BatchNorm, Conv, Dense, LayerNorm

__all__ = ["check_norm", "conv", "dense", "norm_layer", "pad_channels", "subsample"]


def check_norm(norm, allowed=(None, "batch"), model: str = "model") -> None:
    if norm not in allowed:
        raise ValueError(
            f"{model}: norm must be one of {allowed}, got {norm!r} (None builds the"
            " normalisation-free variant that method 'bp' needs)."
        )


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    norm,
    rngs: nnx.Rngs,
    groups: int = 1,
    bias: bool | None = None,
    first: bool = False,
    padding="SAME",
    **layer_kwargs,
) -> Conv:
    """A Bayesian conv; biased only without normalisation (BN has the shift)."""
    return Conv(
        cin,
        cout,
        kernel,
        strides=stride,
        padding=padding,
        feature_group_count=groups,
        use_bias=(norm is None) if bias is None else bias,
        dropout_inputs=not first,
        rngs=rngs,
        **layer_kwargs,
    )


def dense(
    cin: int, cout: int, *, rngs: nnx.Rngs, first: bool = False, **layer_kwargs
) -> Dense:
    return Dense(cin, cout, dropout_inputs=not first, rngs=rngs, **layer_kwargs)


def norm_layer(norm, channels: int, rngs: nnx.Rngs):
    """``BatchNorm`` / ``LayerNorm`` for ``norm="batch"`` / ``"layer"``, else None."""
    if norm == "batch":
        return BatchNorm(channels, rngs=rngs)
    if norm == "layer":
        return LayerNorm(channels, rngs=rngs)
    return None


def norm_act(norm, channels: int, act: str, rngs: nnx.Rngs) -> list:
    """``[norm?, activation]`` as a list of layers."""
    n = norm_layer(norm, channels, rngs)
    return ([] if n is None else [n]) + [Activation(act)]


def subsample(x, stride: int, ctx: Context):
    """``x[:, ::s, ::s, :]`` (option-A shortcut); exact for Gaussians."""
    if stride == 1:
        return x
    if ctx.name == "bp":
        x = as_gaussian(x, "shortcut input")
        return Gaussian(x.mean[:, ::stride, ::stride], x.var[:, ::stride, ::stride])
    return x[:, ::stride, ::stride]


def pad_channels(x, cout: int, ctx: Context):
    """Zero-pad channels symmetrically up to ``cout`` (option-A shortcut)."""
    cin = x.shape[-1]
    if cin == cout:
        return x
    lo = (cout - cin) // 2
    pads = ((0, 0),) * (x.ndim - 1) + ((lo, cout - cin - lo),)
    if ctx.name == "bp":
        x = as_gaussian(x, "shortcut input")
        return Gaussian(jnp.pad(x.mean, pads), jnp.pad(x.var, pads))
    return jnp.pad(x, pads)


def _dtype(layer_kwargs) -> object:
    """The parameter dtype the Bayesian layers use (float32 unless given)."""
    return layer_kwargs.get("param_dtype", jnp.float32)
