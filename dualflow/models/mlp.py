"""Dense networks on flattened inputs (the paper's MNIST/UCI networks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from dualflow.models._common import check_norm
from dualflow.nn.context import Context
from dualflow.nn.layers import Flatten
from dualflow.nn.models import MLP

__all__ = ["ImageMLP"]


class ImageMLP(nnx.Module):
    """``[N, *input_shape] -> flatten -> MLP(widths) -> [N, num_classes]``.

    Under ``bp`` with a deterministic input the hidden units of the first
    layer are exactly independent; deeper layers drop the covariance that
    shared inputs induce (the mean-field approximation).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (1024, 1024),
        activation: str = "relu",
        norm=None,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, model="ImageMLP")
        self.flatten = Flatten()
        d_in = math.prod(int(s) for s in input_shape)
        self.mlp = MLP(
            (d_in, *widths, num_classes),
            activation=activation,
            norm=norm,
            rngs=rngs,
            **layer_kwargs,
        )

    def __call__(self, x, ctx: Context):
        return self.mlp(self.flatten(x, ctx), ctx)
