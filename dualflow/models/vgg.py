"""VGG16 for 32x32 inputs (Simonyan & Zisserman 2015, the CIFAR variant with
one dense classifier; used by the gradient-variance study)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from dualflow.models._common import check_norm, conv, dense, norm_act
from dualflow.nn.context import Context
from dualflow.nn.layers import Flatten, MaxPool, Sequential

__all__ = ["VGG", "VGG16_CONFIG", "vgg16"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
VGG16_CONFIG += (512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nnx.Module):
    """3x3 convs ``[norm]-relu`` with 2x2 max-pools (``"M"``), flatten,
    optional hidden dense layers, dense classifier.

    Under ``bp`` the max-pools use the smooth-max variance of
    :func:`dualflow.moments.max_pool` (the window entries are treated as
    independent).  ``input_size`` is the spatial side of the input (32 for
    CIFAR; the flattened size is ``512 * (input_size / 32)^2``).
    """

    def __init__(
        self,
        *,
        config: Sequence = VGG16_CONFIG,
        hidden: Sequence[int] = (),
        num_classes: int,
        in_channels: int = 3,
        input_size: int = 32,
        norm=None,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, model="VGG")
        kw = dict(norm=norm, rngs=rngs, **layer_kwargs)
        layers, c, side = [], in_channels, int(input_size)
        for i, v in enumerate(config):
            if v == "M":
                if side % 2:
                    raise ValueError(
                        f"VGG: input_size {input_size} is not divisible by the"
                        " 2^(number of max-pools) the config needs."
                    )
                layers.append(MaxPool(2))
                side //= 2
            else:
                layers += [conv(c, int(v), 3, first=(i == 0), **kw)]
                layers += norm_act(norm, int(v), "relu", rngs)
                c = int(v)
        layers.append(Flatten())
        d = c * side * side
        for h in hidden:
            layers += [dense(d, h, rngs=rngs, **layer_kwargs)]
            layers += norm_act(norm, h, "relu", rngs)
            d = h
        layers.append(dense(d, num_classes, rngs=rngs, **layer_kwargs))
        self.net = Sequential(*layers)

    def __call__(self, x, ctx: Context):
        return self.net(x, ctx)


def vgg16(**kwargs) -> VGG:
    """VGG16 (13 convs + classifier; 14.7M parameters with BatchNorm)."""
    return VGG(**{"config": VGG16_CONFIG, **kwargs})
