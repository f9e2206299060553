"""Model families, each written once and runnable in every learning method.

``build_model(name, num_classes=..., input_shape=(H, W, C), norm=..., rngs=...)``
builds any entry of :data:`MODELS`; ``count_params`` gives the deterministic
parameter count (weight means plus normalisation scales/shifts) that
``scripts/train.py --describe`` prints.  ``norm="batch"`` (``"layer"`` for
the Mixer) is the published network; ``norm=None`` the normalisation-free
variant required by ``bp``.
"""

from dualflow.models.densenet import DenseNet, densenet_bc100
from dualflow.models.efficientnet import (
    EfficientNet,
    MBConv,
    SqueezeExcite,
    efficientnet_b0,
)
from dualflow.models.mixer import MixerBlock, MLPMixer, mixer_s
from dualflow.models.mlp import ImageMLP
from dualflow.models.registry import (
    MODELS,
    PUBLISHED_PARAMS,
    build_model,
    count_params,
    default_norm,
    describe,
)
from dualflow.models.resnet import (
    PreActBlock,
    PreActResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet56,
)
from dualflow.models.rnn import CELLS, SequenceNet
from dualflow.models.vgg import VGG, vgg16
from dualflow.models.wrn import wide_resnet, wrn28_10

__all__ = [
    "CELLS",
    "SequenceNet",
    "MODELS",
    "PUBLISHED_PARAMS",
    "VGG",
    "DenseNet",
    "EfficientNet",
    "ImageMLP",
    "MBConv",
    "MLPMixer",
    "MixerBlock",
    "PreActBlock",
    "PreActResNet",
    "SqueezeExcite",
    "build_model",
    "count_params",
    "default_norm",
    "densenet_bc100",
    "describe",
    "efficientnet_b0",
    "mixer_s",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg16",
    "wide_resnet",
    "wrn28_10",
]
