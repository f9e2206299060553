"""Small reference models built from :mod:`dualflow.nn.layers`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from dualflow.nn.context import Context
from dualflow.nn.layers import Activation, BatchNorm, Dense, Sequential

__all__ = ["MLP", "Regressor"]


class MLP(nnx.Module):
    """Multi-layer perceptron ``[N, d_in] -> [N, d_out]`` with Bayesian layers.

    Args:
      sizes: ``(d_in, hidden..., d_out)``.
      activation: hidden activation name (see :class:`~dualflow.nn.Activation`).
      norm: ``None`` or ``"batch"`` (BatchNorm after each hidden dense layer;
        only for non-``bp`` methods, e.g. the "vanilla NN" baseline).
      dropout_first: whether ``mc_dropout`` also drops the raw inputs.
      **layer_kwargs: passed to every :class:`~dualflow.nn.Dense`
        (``init_var``, ``prior_var``, ``var_scaling``, ``mean_init``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        activation: str = "relu",
        norm: str | None = None,
        dropout_first: bool = False,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (d_in, d_out), got sizes={sizes}.")
        if norm not in (None, "batch"):
            raise ValueError(f"norm must be None or 'batch', got {norm!r}.")
        layers = []
        n = len(sizes) - 1
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == n - 1
            layers.append(
                Dense(
                    a,
                    b,
                    dropout_inputs=(i > 0 or dropout_first),
                    rngs=rngs,
                    **layer_kwargs,
                )
            )
            if not last:
                if norm == "batch":
                    layers.append(BatchNorm(b, rngs=rngs))
                layers.append(Activation(activation))
        self.net = Sequential(*layers)
        self.sizes = tuple(int(s) for s in sizes)

    def __call__(self, x, ctx: Context):
        return self.net(x, ctx)


class Regressor(nnx.Module):
    """An :class:`MLP` for regression with its observation noise.

    ``Regressor(d_in, hidden, d_out)`` maps ``[N, d_in]`` to ``[N, d_out]``
    (a Gaussian for ``bp``) and holds ``log_noise_var`` ``[d_out]`` (the learned
    homoscedastic noise read by ``Likelihood("gaussian")``).  With
    ``heteroscedastic=True`` the network has ``2 * d_out`` outputs (means, then
    log noise variances, whose bias starts at ``log(noise_var)``) for
    ``Likelihood("heteroscedastic")``.

    Args:
      noise_var: initial noise variance (in the units of the targets).
      **mlp_kwargs: passed to :class:`MLP` (``activation``, ``init_var``,
        ``prior_var``, ...).
    """

    def __init__(
        self,
        d_in: int,
        hidden: Sequence[int],
        d_out: int = 1,
        *,
        heteroscedastic: bool = False,
        noise_var: float = 0.1,
        rngs: nnx.Rngs,
        **mlp_kwargs,
    ):
        if not noise_var > 0:
            raise ValueError(f"noise_var must be > 0, got {noise_var}.")
        dtype = mlp_kwargs.get("param_dtype", jnp.float32)
        width = 2 * d_out if heteroscedastic else d_out
        self.net = MLP((d_in, *hidden, width), rngs=rngs, **mlp_kwargs)
        self.heteroscedastic = bool(heteroscedastic)
        if heteroscedastic:
            # the log-noise outputs start at log(noise_var) via their bias
            head = self.net.net.layers[-1]
            if head.use_bias:
                b = head.bias_mean[...]
                head.bias_mean[...] = b.at[d_out:].set(math.log(noise_var))
        else:
            self.log_noise_var = nnx.Param(
                jnp.full((d_out,), math.log(noise_var), dtype)
            )

    def __call__(self, x, ctx: Context):
        return self.net(x, ctx)
