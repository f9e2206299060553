"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks in
BN-ReLU-conv order, width factor ``k``, optional dropout between the convs."""

from __future__ import annotations

from dualflow.models.resnet import PreActResNet

__all__ = ["wide_resnet", "wrn28_10"]


def wide_resnet(depth: int = 28, width: int = 10, **kwargs) -> PreActResNet:
    """WRN-``depth``-``width``: ``(depth - 4) / 6`` blocks per group, widths
    ``16k, 32k, 64k``, 1x1 projection shortcuts where shapes change.

    ``dropout`` (e.g. 0.3 on CIFAR as in the paper) sits between the convs.
    """
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}.")
    return PreActResNet(
        stage_widths=(16 * width, 32 * width, 64 * width),
        blocks_per_stage=(depth - 4) // 6,
        stem_width=16,
        shortcut="B",
        **kwargs,
    )


def wrn28_10(**kwargs) -> PreActResNet:
    """WRN-28-10 (36.5M parameters with BatchNorm)."""
    return wide_resnet(28, 10, **kwargs)
