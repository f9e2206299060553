"""Pre-activation ResNets for 32x32 inputs: ResNet-20/32/56 (option-A
shortcuts) and ResNet-18 (projection shortcuts).

He et al., "Deep residual learning" (2016) for the CIFAR ``6n+2`` layout and
"Identity mappings in deep residual networks" (2016) for the pre-activation
order.  The block is written as the chain-graph paper's *refinement module*
(Deriving neural network design..., Sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from dualflow.models._common import (
    _dtype,
    check_norm,
    conv,
    dense,
    norm_act,
    pad_channels,
    subsample,
)
from dualflow.nn import ops
from dualflow.nn.context import Context
from dualflow.nn.layers import Dropout, Gain, GlobalAvgPool, Sequential

__all__ = [
    "PreActBlock",
    "PreActResNet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
]


class PreActBlock(nnx.Module):
    """Pre-activation residual block ``[N, H, W, cin] -> [N, H/s, W/s, cout]``.

    As a refinement module (chain-graph paper, Sec. 4.1, Fig. 2): the block's
    input ``h`` is the pre-activation of the base submodule's output node
    ``X``; the side chain applies the refining submodule
    ``X~ -> Z -> X`` -- activation, linear map, activation, linear map -- and
    its result refines ``h`` additively::

        h_out = shortcut(h) + g * conv2(act(norm(conv1(act(norm(h))))))

    which is exactly the pre-activation block of He et al. (2016).  ``g`` is a
    learned :class:`~dualflow.nn.Gain` (init ``residual_init``) in the
    normalisation-free variant and absent with BatchNorm.

    Shortcuts: identity when shapes agree; otherwise ``"A"`` (subsample and
    zero-pad channels: parameter-free, applied to ``h`` itself -- the
    refinement-module reading; He et al.'s pre-activation code feeds a
    downsampling shortcut the activated input instead) or ``"B"`` (1x1
    strided conv of the activated input, as in the pre-activation paper).
    ``dropout`` > 0 puts dropout between the two convolutions (WRN).
    Under ``bp`` the shortcut and the branch are added as independent
    beliefs (their covariance through ``h`` is dropped).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        stride: int = 1,
        shortcut: str = "A",
        norm=None,
        activation: str = "relu",
        dropout: float = 0.0,
        residual_init: float = 0.0,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}.")
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        self.pre = Sequential(*norm_act(norm, cin, activation, rngs))
        self.conv1 = conv(cin, cout, 3, stride=stride, **kw)
        mid = norm_act(norm, cout, activation, rngs)
        if dropout > 0:
            mid.append(Dropout(dropout))
        self.mid = Sequential(*mid)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.gain = (
            None
            if norm is not None
            else Gain(residual_init, param_dtype=_dtype(layer_kwargs))
        )
        self.stride, self.cout, self.shortcut = int(stride), int(cout), shortcut
        needs = stride != 1 or cin != cout
        self.proj = (
            conv(cin, cout, 1, stride=stride, bias=False, **kw)
            if needs and shortcut == "B"
            else None
        )

    def __call__(self, h, ctx: Context):
        a = self.pre(h, ctx)
        y = self.conv2(self.mid(self.conv1(a, ctx), ctx), ctx)
        if self.gain is not None:
            y = self.gain(y, ctx)
        if self.proj is not None:
            s = self.proj(a, ctx)
        else:
            s = pad_channels(subsample(h, self.stride, ctx), self.cout, ctx)
        return ops.add(ctx, y, s)


class PreActResNet(nnx.Module):
    """Stem conv -> stages of :class:`PreActBlock` -> norm/act -> GAP -> dense.

    Args:
      stage_widths, blocks_per_stage: e.g. ``(16, 32, 64)`` and ``n`` for the
        CIFAR ``6n+2`` networks; stages after the first downsample by 2.
      stem_width: channels of the 3x3 stem convolution.
      shortcut: ``"A"`` or ``"B"`` (see :class:`PreActBlock`).
      in_channels, num_classes: input channels and classes.
      norm: ``"batch"`` or ``None`` (NF).
    """

    def __init__(
        self,
        *,
        stage_widths: Sequence[int],
        blocks_per_stage: int | Sequence[int],
        stem_width: int,
        num_classes: int,
        in_channels: int = 3,
        shortcut: str = "A",
        norm=None,
        activation: str = "relu",
        dropout: float = 0.0,
        residual_init: float = 0.0,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, model="PreActResNet")
        n_stages = len(stage_widths)
        if isinstance(blocks_per_stage, int):
            blocks_per_stage = (blocks_per_stage,) * n_stages
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        self.stem = conv(in_channels, stem_width, 3, first=True, **kw)
        blocks, c = [], stem_width
        for i, (w, n) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    PreActBlock(
                        c,
                        w,
                        stride=stride,
                        shortcut=shortcut,
                        activation=activation,
                        dropout=dropout,
                        residual_init=residual_init,
                        **kw,
                    )
                )
                c = w
        self.blocks = Sequential(*blocks)
        self.head = Sequential(
            *norm_act(norm, c, activation, rngs),
            GlobalAvgPool(),
            dense(c, num_classes, rngs=rngs, **layer_kwargs),
        )

    def __call__(self, x, ctx: Context):
        return self.head(self.blocks(self.stem(x, ctx), ctx), ctx)


def _cifar_resnet(depth: int, **kwargs) -> PreActResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}.")
    return PreActResNet(
        stage_widths=(16, 32, 64),
        blocks_per_stage=(depth - 2) // 6,
        stem_width=16,
        shortcut="A",
        **kwargs,
    )


def resnet20(**kwargs) -> PreActResNet:
    """ResNet-20 (n=3, 0.27M parameters with BatchNorm)."""
    return _cifar_resnet(20, **kwargs)


def resnet32(**kwargs) -> PreActResNet:
    """ResNet-32 (n=5, 0.46M)."""
    return _cifar_resnet(32, **kwargs)


def resnet56(**kwargs) -> PreActResNet:
    """ResNet-56 (n=9, 0.85M)."""
    return _cifar_resnet(56, **kwargs)


def resnet18(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-18 for 32x32 inputs (3x3 stem, no max-pool;
    widths 64-512, projection shortcuts; 11.2M with BatchNorm)."""
    return PreActResNet(
        stage_widths=(64, 128, 256, 512),
        blocks_per_stage=2,
        stem_width=64,
        shortcut="B",
        **kwargs,
    )
