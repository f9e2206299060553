"""DenseNet-BC for 32x32 and 64x64 inputs (Huang et al., "Densely connected
convolutional networks", 2017; the duality paper's App. E.1.1)."""

from __future__ import annotations

from flax import nnx

from dualflow.models._common import check_norm, conv, dense, norm_act
from dualflow.nn import ops
from dualflow.nn.context import Context
from dualflow.nn.layers import AvgPool, Dropout, GlobalAvgPool, Sequential

__all__ = ["DenseNet", "densenet_bc100"]


class _DenseLayer(nnx.Module):
    """Bottleneck layer: ``[norm]-act-conv1x1(4k)-[norm]-act-conv3x3(k)``; its
    ``k`` new maps are concatenated to the input.

    Under ``bp`` the concatenation keeps old and new channels independent
    (the new ones are functions of the old: that covariance is dropped).
    """

    def __init__(self, cin, growth, *, norm, dropout, rngs, **layer_kwargs):
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        drop = [Dropout(dropout)] if dropout > 0 else []
        self.branch = Sequential(
            *norm_act(norm, cin, "relu", rngs),
            conv(cin, 4 * growth, 1, **kw),
            *drop,
            *norm_act(norm, 4 * growth, "relu", rngs),
            conv(4 * growth, growth, 3, **kw),
            *drop,
        )

    def __call__(self, x, ctx: Context):
        return ops.concatenate(ctx, [x, self.branch(x, ctx)], axis=-1)


class DenseNet(nnx.Module):
    """DenseNet-BC: stem 3x3 conv (``2k`` maps), three dense blocks of
    bottleneck layers separated by transitions (``[norm]-act-conv1x1`` to
    ``floor(compression * c)`` maps, then 2x2 average pooling), final
    ``[norm]-act``, global average pooling and a dense classifier.

    ``depth`` counts weight layers: ``(depth - 4) / 6`` bottleneck layers per
    block (16 for L=100).  ``dropout`` (0.2 in the paper without augmentation)
    follows every convolution except the stem and transitions' pooling.
    Input ``[N, H, W, in_channels]`` -> logits ``[N, num_classes]``.
    """

    def __init__(
        self,
        *,
        depth: int = 100,
        growth: int = 12,
        compression: float = 0.5,
        num_classes: int,
        in_channels: int = 3,
        norm=None,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, model="DenseNet")
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}.")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}.")
        n = (depth - 4) // 6
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        c = 2 * growth
        self.stem = conv(in_channels, c, 3, first=True, **kw)
        stages = []
        for b in range(3):
            for _ in range(n):
                stages.append(_DenseLayer(c, growth, dropout=dropout, **kw))
                c += growth
            if b < 2:
                out = int(compression * c)
                stages += [
                    *norm_act(norm, c, "relu", rngs),
                    conv(c, out, 1, **kw),
                    *([Dropout(dropout)] if dropout > 0 else []),
                    AvgPool(2),
                ]
                c = out
        self.features = Sequential(*stages)
        self.head = Sequential(
            *norm_act(norm, c, "relu", rngs),
            GlobalAvgPool(),
            dense(c, num_classes, rngs=rngs, **layer_kwargs),
        )

    def __call__(self, x, ctx: Context):
        return self.head(self.features(self.stem(x, ctx), ctx), ctx)


def densenet_bc100(**kwargs) -> DenseNet:
    """DenseNet-BC L=100, k=12 (0.77M parameters with BatchNorm, CIFAR-10)."""
    return DenseNet(depth=100, growth=12, compression=0.5, **kwargs)
