"""Small reference models built from :mod:`dualflow.nn.layers`."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from dualflow.nn.context import Context
from dualflow.nn.layers import Activation, BatchNorm, Dense, Sequential

__all__ = ["MLP"]


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
