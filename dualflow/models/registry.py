"""Model registry: build any family by name, count and describe parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from dualflow.models.densenet import densenet_bc100
from dualflow.models.efficientnet import efficientnet_b0
from dualflow.models.mixer import mixer_s
from dualflow.models.mlp import ImageMLP
from dualflow.models.resnet import resnet18, resnet20, resnet32, resnet56
from dualflow.models.vgg import vgg16
from dualflow.models.wrn import wide_resnet, wrn28_10

__all__ = [
    "MODELS",
    "PUBLISHED_PARAMS",
    "build_model",
    "count_params",
    "default_norm",
    "describe",
]

_VARIANCE_SUFFIXES = ("_logvar", "_rho", "_var")


def _conv_family(fn):
    def build(*, input_shape, **kw):
        return fn(in_channels=int(input_shape[-1]), **kw)

    return build


def _vgg(*, input_shape, **kw):
    return vgg16(in_channels=int(input_shape[-1]), input_size=int(input_shape[0]), **kw)


def _mlp(*, input_shape, **kw):
    return ImageMLP(input_shape=tuple(input_shape), **kw)


def _mixer(*, input_shape, patch: int | None = None, **kw):
    size = int(input_shape[0])
    if input_shape[0] != input_shape[1]:
        raise ValueError(f"mixer_s: needs square inputs, got {tuple(input_shape)}.")
    if patch is None:  # 4 up to 32x32 (64 tokens at 32), 8 up to 64, then 16
        patch = 4 if size <= 32 else 8 if size <= 64 else 16
    return mixer_s(image_size=size, patch=patch, in_channels=int(input_shape[-1]), **kw)


#: name -> builder(num_classes=, input_shape=, norm=, rngs=, **model_kwargs)
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": _mlp,
    "vgg16": _vgg,
    "resnet20": _conv_family(resnet20),
    "resnet32": _conv_family(resnet32),
    "resnet56": _conv_family(resnet56),
    "resnet18": _conv_family(resnet18),
    "wrn28_10": _conv_family(wrn28_10),
    "wrn": _conv_family(wide_resnet),  # model.kwargs.depth (6n+4), .width
    "densenet_bc100": _conv_family(densenet_bc100),
    "efficientnet_b0": _conv_family(efficientnet_b0),
    "mixer_s": _mixer,
}

_PUBLISHED_NORM = {"mixer_s": "layer", "mlp": None}

#: Published parameter counts of the deterministic networks (with their
#: normalisation) and the setting they were counted in.
PUBLISHED_PARAMS: dict[str, dict[str, Any]] = {
    "resnet20": dict(
        count=270_000, source="He et al. 2016, Table 6 (0.27M)", num_classes=10
    ),
    "resnet32": dict(
        count=460_000, source="He et al. 2016, Table 6 (0.46M)", num_classes=10
    ),
    "resnet56": dict(
        count=850_000, source="He et al. 2016, Table 6 (0.85M)", num_classes=10
    ),
    "resnet18": dict(
        count=11_173_962,
        source="post-activation ResNet-18 for CIFAR-10 as in common"
        " implementations (11.17M); ours is pre-activation with a final BN",
        num_classes=10,
    ),
    "wrn28_10": dict(
        count=36_479_194,
        source="Zagoruyko & Komodakis 2016 (36.5M); exact count of the"
        " imgclsmob CIFAR-10 model",
        num_classes=10,
    ),
    "densenet_bc100": dict(
        count=769_162,
        source="Huang et al. 2017, Table 2 prints 0.8M (rounded); exact"
        " CIFAR-10 count of the imgclsmob model",
        num_classes=10,
    ),
    "efficientnet_b0": dict(
        count=5_288_548,
        source="Keras EfficientNetB0 trainable parameters at 224x224, 1000"
        " classes (4.0M + 1.28M head; Tan & Le 2019: 5.3M)",
        num_classes=1000,
        input_shape=(224, 224, 3),
    ),
    "mixer_s": dict(
        count=18_500_000,
        source="Mixer-S/16 at 224x224, 1000 classes (timm: 18.5M; Tolstikhin"
        " et al. 2021 round to 18M)",
        num_classes=1000,
        input_shape=(224, 224, 3),
        patch=16,
    ),
}


def default_norm(name: str) -> str | None:
    """Normalisation of the published network (``None`` for the MLP)."""
    return _PUBLISHED_NORM.get(name, "batch")


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    norm: str | None = None,
    rngs: nnx.Rngs,
    **model_kwargs,
) -> nnx.Module:
    """Build model ``name`` for inputs ``[N, *input_shape]`` (channels last).

    ``model_kwargs`` are the family's options (``dropout``, ``residual_init``,
    ``resize_to``, ``patch``, ``widths``...) and Bayesian layer options
    (``init_var``, ``prior_var``, ``var_scaling``, ``param_dtype``).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if len(input_shape) != 3 and name != "mlp":
        raise ValueError(
            f"model {name!r} needs input_shape (H, W, C), got {tuple(input_shape)}."
        )
    return MODELS[name](
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in input_shape),
        norm=norm,
        rngs=rngs,
        **model_kwargs,
    )


def _leaf_name(path) -> str:
    last = path[-1]
    if getattr(last, "name", None) == "value" and len(path) > 1:
        last = path[-2]
    return str(getattr(last, "key", getattr(last, "name", last)))


def count_params(model: nnx.Module) -> dict[str, int]:
    """Parameter counts of ``model`` (works on abstract models from
    ``nnx.eval_shape``).

    Returns ``deterministic`` (every ``nnx.Param`` except weight variances:
    weight means, normalisation scales/shifts, gains -- the number a
    non-Bayesian network of the same graph has), ``variances`` and
    ``total``.  Running statistics are not parameters.
    """
    det = var = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        size = int(getattr(leaf, "size", 1))
        if _leaf_name(path).endswith(_VARIANCE_SUFFIXES):
            var += size
        else:
            det += size
    return {"deterministic": det, "variances": var, "total": det + var}


def describe(model: nnx.Module) -> str:
    """Per-child parameter table plus the ``params: N`` line (deterministic)."""
    lines = []
    for name, child in vars(model).items():
        if isinstance(child, nnx.Module):
            c = count_params(child)
            lines.append(f"  {name:<12s} {c['deterministic']:>12,d}")
    c = count_params(model)
    lines.append(f"variational parameters (means + variances): {c['total']:,d}")
    lines.append(f"params: {c['deterministic']}")
    return "\n".join(lines)
