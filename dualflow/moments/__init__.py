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
    COMPUTE_PRECISIONS,
    JAX_PRECISIONS,
    PRECISIONS,
    bilinear_moments,
    canonical_precision,
    compute_dtype,
    conv,
    dense,
    precision_context,
    product_settings,
    set_compute_dtype,
    using_compute_dtype,
)
from dualflow.moments.pooling import avg_pool, global_avg_pool, max_pool
from dualflow.moments.recurrent import indrnn, kalman_update, simple_rnn

__all__ = [
    "ACTIVATIONS",
    "BACKWARDS",
    "COMPUTE_PRECISIONS",
    "JAX_PRECISIONS",
    "MODES",
    "PRECISIONS",
    "activation",
    "add",
    "avg_pool",
    "bernoulli_dropout",
    "bilinear_moments",
    "canonical_precision",
    "compute_dtype",
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
    "precision_context",
    "probit",
    "product_settings",
    "relu",
    "reshape",
    "resize",
    "scale",
    "set_compute_dtype",
    "sigmoid",
    "silu",
    "simple_rnn",
    "softplus",
    "tanh",
    "transpose",
    "using_compute_dtype",
]
