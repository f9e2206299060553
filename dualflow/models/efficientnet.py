"""EfficientNet-B0 (Tan & Le 2019), following the Keras reference the
duality paper used (App. E.1.3): MBConv blocks with squeeze-excitation and
swish.  CIFAR inputs are resized to 224x224 as in the paper, or kept at their
native size (``resize_to=None``)."""

from __future__ import annotations

from flax import nnx

from dualflow.models._common import (
    _dtype,
    check_norm,
    conv,
    dense,
    norm_act,
    norm_layer,
)
from dualflow.nn import ops
from dualflow.nn.context import Context
from dualflow.nn.layers import Activation, Dropout, Gain, GlobalAvgPool, Sequential

__all__ = ["B0_BLOCKS", "EfficientNet", "MBConv", "SqueezeExcite", "efficientnet_b0"]

# (kernel, repeats, in, out, expand ratio, stride) of the seven B0 stages
B0_BLOCKS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


class SqueezeExcite(nnx.Module):
    """``x * gate(x)``, ``gate = sigmoid(W2 swish(W1 mean_hw(x)))`` ``[N, 1, 1, C]``.

    Under ``bp``: the spatial mean is exact, the two dense maps use the
    moment rule, swish/sigmoid the configured activation moments, and the
    product :func:`dualflow.moments.multiply` treats ``x`` and the gate as
    independent (the gate is a function of ``x``; that covariance is
    dropped).  ``gate_scale=2`` (used without normalisation, as in NFNets,
    Brock et al. 2021) keeps the signal scale: ``2 sigmoid(0) = 1``.
    """

    def __init__(self, channels, reduced, *, gate_scale=1.0, rngs, **layer_kwargs):
        self.squeeze = Sequential(
            GlobalAvgPool(),
            dense(channels, reduced, rngs=rngs, **layer_kwargs),
            Activation("silu"),
            dense(reduced, channels, rngs=rngs, **layer_kwargs),
            Activation("sigmoid"),
        )
        self.gate_scale = float(gate_scale)

    def __call__(self, x, ctx: Context):
        g = self.squeeze(x, ctx)
        g = g.reshape(g.shape[0], 1, 1, g.shape[-1])
        if self.gate_scale != 1.0:
            g = ops.scale(ctx, g, self.gate_scale)
        return ops.multiply(ctx, x, g)


class MBConv(nnx.Module):
    """Mobile inverted bottleneck: ``[expand 1x1]-depthwise kxk-SE-project 1x1``
    (each conv followed by ``[norm]``, swish except after the projection);
    identity residual when ``stride == 1`` and ``cin == cout`` (with a
    :class:`~dualflow.nn.Gain` in the normalisation-free variant)."""

    def __init__(
        self,
        cin,
        cout,
        *,
        kernel,
        stride,
        expand,
        se_ratio=0.25,
        norm=None,
        residual_init=0.0,
        rngs,
        **layer_kwargs,
    ):
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        mid = cin * expand
        layers = []
        if expand != 1:
            layers += [conv(cin, mid, 1, **kw), *norm_act(norm, mid, "silu", rngs)]
        layers += [
            conv(mid, mid, kernel, stride=stride, groups=mid, **kw),
            *norm_act(norm, mid, "silu", rngs),
            SqueezeExcite(
                mid,
                max(1, int(cin * se_ratio)),
                gate_scale=1.0 if norm is not None else 2.0,
                rngs=rngs,
                **layer_kwargs,
            ),
            conv(mid, cout, 1, **kw),
        ]
        n = norm_layer(norm, cout, rngs)
        if n is not None:
            layers.append(n)
        self.residual = stride == 1 and cin == cout
        if self.residual and norm is None:
            layers.append(Gain(residual_init, param_dtype=_dtype(layer_kwargs)))
        self.branch = Sequential(*layers)

    def __call__(self, x, ctx: Context):
        y = self.branch(x, ctx)
        return ops.add(ctx, x, y) if self.residual else y


class EfficientNet(nnx.Module):
    """EfficientNet-B0 ``[N, H, W, 3] -> [N, num_classes]``.

    stem 3x3/2 conv (32) -> the seven MBConv stages of :data:`B0_BLOCKS` ->
    1x1 conv (1280) -> global average pool -> dropout -> dense.

    Args:
      resize_to: resize inputs to ``resize_to x resize_to`` first (224 as in
        the paper: bilinear, a linear map, exact for Gaussians up to the
        correlations it creates); ``None`` keeps the native size.
      dropout: before the classifier (0.2 in the reference).
      norm: ``"batch"`` or ``None`` (NF: biased convs, SE gate ``2 sigmoid``,
        residual gains).

    Not implemented: stochastic depth ("drop connect") of the reference.
    Paddings are ``SAME`` (Keras pads stride-2 convs asymmetrically; the
    parameter count is unaffected).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        resize_to: int | None = None,
        dropout: float = 0.2,
        blocks=B0_BLOCKS,
        head_width: int = 1280,
        norm=None,
        residual_init: float = 0.0,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, model="EfficientNet")
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        self.resize_to = None if resize_to is None else int(resize_to)
        c0 = blocks[0][2]
        self.stem = Sequential(
            conv(in_channels, c0, 3, stride=2, first=True, **kw),
            *norm_act(norm, c0, "silu", rngs),
        )
        layers = []
        for kernel, repeats, cin, cout, expand, stride in blocks:
            for r in range(repeats):
                layers.append(
                    MBConv(
                        cin if r == 0 else cout,
                        cout,
                        kernel=kernel,
                        stride=stride if r == 0 else 1,
                        expand=expand,
                        residual_init=residual_init,
                        **kw,
                    )
                )
        self.blocks = Sequential(*layers)
        c = blocks[-1][3]
        self.head = Sequential(
            conv(c, head_width, 1, **kw),
            *norm_act(norm, head_width, "silu", rngs),
            GlobalAvgPool(),
            *([Dropout(dropout)] if dropout > 0 else []),
            dense(head_width, num_classes, rngs=rngs, **layer_kwargs),
        )

    def __call__(self, x, ctx: Context):
        if self.resize_to is not None:
            x = ops.resize(ctx, x, (self.resize_to, self.resize_to))
        return self.head(self.blocks(self.stem(x, ctx), ctx), ctx)


def efficientnet_b0(**kwargs) -> EfficientNet:
    """EfficientNet-B0 (4.0M parameters + the classifier, with BatchNorm)."""
    return EfficientNet(blocks=B0_BLOCKS, **kwargs)
