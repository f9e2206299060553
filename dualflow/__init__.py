"""dualflow: Bayesian neural networks by deterministic message passing in JAX.

Forward = filtering (Gaussian moments through each layer), backward =
smoothing (the belief-propagation rule as ``jax.custom_vjp``).  Reference:
"Duality of information flow: insights in graphical models and neural networks".

Public layout:
  dualflow.Gaussian       element-wise Gaussian pytree
  dualflow.moments        pure moment rules (dense, conv, activations, pooling...)
  dualflow.smoothing      smoothed moments implied by gradients (Theorem 1)
  dualflow.objectives     regression/classification heads, KL, negative ELBO
  dualflow.pgm            exact references: Gaussian chain, Kalman/RTS, HMM
  dualflow.nn             Flax NNX layers; one model for every learning method
  dualflow.models         MLP, VGG16, ResNets, WRN, DenseNet-BC, EfficientNet, Mixer
  dualflow.optim          natural_gradient() optax transform (App. D)
  dualflow.metrics        accuracy, NLL, Brier, ECE, RMSE, LL, entropy, MI, AUROC
  dualflow.train          fit(): a small jitted training loop
  dualflow.vi             Monte Carlo ELBO terms of any variational method
  dualflow.propagation    propagate(fn): any JAX function -> its moment-propagating
                          version (jaxpr transform); register_rule
  dualflow.errors         user-facing errors (ConfigError, DataError, CheckpointError,
                          DivergenceError, Interrupted); dualflow.cli prints them
                          as one ``error:`` line (exit 2) in scripts
"""

from dualflow import (
    chain,
    errors,
    metrics,
    models,
    moments,
    nn,
    objectives,
    optim,
    pgm,
    propagation,
    smoothing,
    train,
    vi,
)
from dualflow.gaussian import (
    Gaussian,
    as_gaussian,
    debug_checks_enabled,
    set_debug_checks,
    validate,
)
from dualflow.propagation import (
    BayesianFunction,
    GaussianDependentControlFlowError,
    UnsupportedPrimitiveError,
    from_equinox,
    from_function,
    from_linen,
    from_nnx,
    propagate,
    register_rule,
)
from dualflow.smoothing import posterior_moments, smoothed_moments

__version__ = "0.1.0.dev0"

__all__ = [
    "BayesianFunction",
    "Gaussian",
    "GaussianDependentControlFlowError",
    "UnsupportedPrimitiveError",
    "__version__",
    "as_gaussian",
    "chain",
    "debug_checks_enabled",
    "errors",
    "from_equinox",
    "from_function",
    "from_linen",
    "from_nnx",
    "metrics",
    "models",
    "moments",
    "nn",
    "objectives",
    "optim",
    "pgm",
    "posterior_moments",
    "propagation",
    "propagate",
    "register_rule",
    "set_debug_checks",
    "smoothed_moments",
    "smoothing",
    "train",
    "validate",
    "vi",
]
