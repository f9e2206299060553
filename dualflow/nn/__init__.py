"""Flax NNX layers and learning methods over the pure moment core.

One model definition, many learning methods (``Method(name=...)``): ``bp``
(moment forward + belief-propagation backward), ``reparam``,
``local_reparam``, ``flipout``, ``deterministic``, ``ensemble``, ``mc_dropout``.
"""

from dualflow.nn.context import METHODS, SAMPLING_METHODS, Context, Method
from dualflow.nn.layers import (
    Activation,
    AvgPool,
    BatchNorm,
    BayesianModule,
    Conv,
    Dense,
    Flatten,
    GlobalAvgPool,
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
    "Flatten",
    "GlobalAvgPool",
    "Likelihood",
    "MaxPool",
    "Method",
    "Predictive",
    "Residual",
    "Sequential",
    "apply",
    "kl_divergence",
    "make_ensemble",
    "objective",
    "predict",
    "predictive_log_likelihood",
]
