"""MLP-Mixer (Tolstikhin et al. 2021): per-patch embedding, then blocks of
token-mixing and channel-mixing MLPs."""

from __future__ import annotations

from flax import nnx

from dualflow.models._common import _dtype, check_norm, conv, dense, norm_layer
from dualflow.nn import ops
from dualflow.nn.context import Context
from dualflow.nn.layers import Activation, Gain, GlobalAvgPool, Sequential

__all__ = ["MixerBlock", "MLPMixer", "mixer_s"]


def _seq(*layers):
    return Sequential(*[layer for layer in layers if layer is not None])


class MixerBlock(nnx.Module):
    """``x += TokenMLP(norm(x)^T)^T``; ``x += ChannelMLP(norm(x))`` on ``[N, T, D]``.

    Token mixing transposes to ``[N, D, T]`` and applies a dense MLP over
    tokens -- under ``bp`` the transpose is exact and the dense moment rule
    treats the ``T`` token entries of a channel as independent (the same
    mean-field assumption as everywhere; tokens are in fact correlated
    through shared weights).  Residual sums drop the branch/skip covariance.
    """

    def __init__(
        self,
        tokens,
        width,
        token_hidden,
        channel_hidden,
        *,
        norm=None,
        residual_init=0.0,
        rngs,
        **layer_kwargs,
    ):
        kw = dict(rngs=rngs, **layer_kwargs)
        dtype = _dtype(layer_kwargs)

        def gain():
            return Gain(residual_init, param_dtype=dtype) if norm is None else None

        self.norm1 = _seq(norm_layer(norm, width, rngs))
        self.token_mlp = _seq(
            dense(tokens, token_hidden, **kw),
            Activation("gelu"),
            dense(token_hidden, tokens, **kw),
            gain(),
        )
        self.norm2 = _seq(norm_layer(norm, width, rngs))
        self.channel_mlp = _seq(
            dense(width, channel_hidden, **kw),
            Activation("gelu"),
            dense(channel_hidden, width, **kw),
            gain(),
        )

    def __call__(self, x, ctx: Context):
        y = ops.transpose(ctx, self.norm1(x, ctx), (0, 2, 1))
        y = ops.transpose(ctx, self.token_mlp(y, ctx), (0, 2, 1))
        x = ops.add(ctx, x, y)
        return ops.add(ctx, x, self.channel_mlp(self.norm2(x, ctx), ctx))


class MLPMixer(nnx.Module):
    """MLP-Mixer ``[N, H, W, C] -> [N, num_classes]``.

    Args:
      image_size: input side ``H = W`` (must be divisible by ``patch``).
      patch: patch side (4 for 32x32 inputs gives 64 tokens; 8 for 64x64;
        16 at 224 is the paper's S/16).
      width, depth, token_hidden, channel_hidden: ``D``, blocks, ``D_S``,
        ``D_C`` (Mixer-S: 512, 8, 256, 2048).
      norm: ``"layer"`` (the published network) or ``None`` (NF: residual
        gains instead of LayerNorm).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        patch: int = 4,
        in_channels: int = 3,
        width: int = 512,
        depth: int = 8,
        token_hidden: int = 256,
        channel_hidden: int = 2048,
        norm=None,
        residual_init: float = 0.0,
        rngs: nnx.Rngs,
        **layer_kwargs,
    ):
        check_norm(norm, allowed=(None, "layer"), model="MLPMixer")
        if image_size % patch:
            raise ValueError(
                f"MLPMixer: image_size {image_size} is not divisible by patch {patch}."
            )
        tokens = (image_size // patch) ** 2
        self.stem = conv(
            in_channels,
            width,
            patch,
            stride=patch,
            padding="VALID",
            bias=True,
            first=True,
            norm=norm,
            rngs=rngs,
            **layer_kwargs,
        )
        self.blocks = Sequential(
            *[
                MixerBlock(
                    tokens,
                    width,
                    token_hidden,
                    channel_hidden,
                    norm=norm,
                    residual_init=residual_init,
                    rngs=rngs,
                    **layer_kwargs,
                )
                for _ in range(depth)
            ]
        )
        self.head = _seq(
            norm_layer(norm, width, rngs),
            GlobalAvgPool(),
            dense(width, num_classes, rngs=rngs, **layer_kwargs),
        )
        self.tokens, self.width = tokens, int(width)

    def __call__(self, x, ctx: Context):
        h = self.stem(x, ctx)
        h = h.reshape(h.shape[0], self.tokens, self.width)
        return self.head(self.blocks(h, ctx), ctx)


def mixer_s(**kwargs) -> MLPMixer:
    """Mixer-S (D=512, 8 blocks, D_S=256, D_C=2048); S/16 at 224x224 with
    1000 classes has 18.5M parameters."""
    defaults = dict(width=512, depth=8, token_hidden=256, channel_hidden=2048)
    return MLPMixer(**{**defaults, **kwargs})
