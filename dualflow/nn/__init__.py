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
from dualflow.nn.recurrent import (
    IndRNN,
    LastStep,
    SimpleRNN,
    constrain_recurrent,
    default_bound,
    hidden_state_posterior,
)

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
    "IndRNN",
    "LastStep",
    "GlobalAvgPool",
    "LayerNorm",
    "Likelihood",
    "MaxPool",
    "Method",
    "Predictive",
    "Residual",
    "Sequential",
    "SimpleRNN",
    "apply",
    "constrain_recurrent",
    "default_bound",
    "hidden_state_posterior",
    "kl_divergence",
    "make_ensemble",
    "ops",
    "objective",
    "predict",
    "predictive_log_likelihood",
]
