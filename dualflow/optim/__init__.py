"""Optimisers for mean-field Gaussian (Bayesian) weights.

``natural_gradient`` is an ``optax`` gradient transformation that preconditions
loss gradients with the Fisher of the element-wise Gaussian weight family
(App. D of "Duality of information flow"); chain it with any ``optax``
optimiser.  ``mean_variance_labels`` labels the leaves of a parameter pytree
``"mean"`` / ``"variance"`` / ``"other"`` for ``optax.partition``.

Parameter convention: a Bayesian weight is two sibling leaves ``<base>_mean``
and ``<base>_logvar`` (variance ``exp``), ``<base>_rho`` (std ``softplus``) or
``<base>_var`` (variance).
"""

from dualflow.optim.natural_gradient import (
    VARIANCE_SUFFIXES,
    NaturalGradientState,
    mean_variance_labels,
    natural_gradient,
)

__all__ = [
    "VARIANCE_SUFFIXES",
    "NaturalGradientState",
    "mean_variance_labels",
    "natural_gradient",
]
