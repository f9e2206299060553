"""Pure moment rules: map `Gaussian` beliefs through layers.

Every op is a pure function of (input belief, weight moments), jit/vmap/grad
safe, works in float32 and float64, and takes ``backward="bp"`` (the
belief-propagation rule, default) or ``backward="autodiff"``.  Activations
take ``mode="linearized"`` (Algorithm 1) or ``mode="matched"``.
"""

from dualflow.moments._backward import BACKWARDS
from dualflow.moments.activations import (
    ACTIVATIONS,
    MODES,
    activation,
    erf,
    gelu,
    heaviside,
    identity,
    leaky_relu,
    probit,
    relu,
    sigmoid,
    silu,
    softplus,
    tanh,
)
from dualflow.moments.combine import (
    add,
    bernoulli_dropout,
    concatenate,
    flatten,
    multiply,
    reshape,
    resize,
    scale,
    transpose,
)
from dualflow.moments.linear import (
    PRECISIONS,
    bilinear_moments,
    canonical_precision,
    conv,
    dense,
)
from dualflow.moments.pooling import avg_pool, global_avg_pool, max_pool
from dualflow.moments.recurrent import indrnn, kalman_update, simple_rnn

__all__ = [
    "ACTIVATIONS",
    "BACKWARDS",
    "MODES",
    "PRECISIONS",
    "activation",
    "add",
    "avg_pool",
    "bernoulli_dropout",
    "bilinear_moments",
    "canonical_precision",
    "concatenate",
    "conv",
    "dense",
    "erf",
    "flatten",
    "gelu",
    "global_avg_pool",
    "heaviside",
    "identity",
    "indrnn",
    "kalman_update",
    "leaky_relu",
    "max_pool",
    "multiply",
    "probit",
    "relu",
    "reshape",
    "resize",
    "scale",
    "sigmoid",
    "silu",
    "simple_rnn",
    "softplus",
    "tanh",
    "transpose",
]
