"""Flax NNX layers and learning methods over the pure moment core.

One model definition, many learning methods (``Method(name=...)``): ``bp``
(moment forward + belief-propagation backward), ``reparam``,
``local_reparam``, ``flipout``, ``deterministic``, ``ensemble``, ``mc_dropout``.
"""

from dualflow.nn import ops
from dualflow.nn.context import METHODS, SAMPLING_METHODS, Context, Method
from dualflow.nn.layers import (
    Activation,
    AvgPool,
    BatchNorm,
    BayesianModule,
    Conv,
    Dense,
    Dropout,
    Flatten,
    Gain,
    GlobalAvgPool,
    LayerNorm,
    MaxPool,
    Residual,
    Sequential,
)
from dualflow.nn.methods import (
    Likelihood,
    Predictive,
    apply,
    kl_divergence,
    make_ensemble,
    objective,
    predict,
    predictive_log_likelihood,
)
from dualflow.nn.models import MLP, Regressor

__all__ = [
    "METHODS",
    "MLP",
    "Regressor",
    "SAMPLING_METHODS",
    "Activation",
    "AvgPool",
    "BatchNorm",
    "BayesianModule",
    "Context",
    "Conv",
    "Dense",
    "Dropout",
    "Flatten",
    "Gain",
    "GlobalAvgPool",
    "LayerNorm",
    "Likelihood",
    "MaxPool",
    "Method",
    "Predictive",
    "Residual",
    "Sequential",
    "apply",
    "kl_divergence",
    "make_ensemble",
    "ops",
    "objective",
    "predict",
    "predictive_log_likelihood",
]
