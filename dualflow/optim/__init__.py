"""Optimisers for mean-field Gaussian (Bayesian) weights.

``natural_gradient`` is an ``optax`` gradient transformation that preconditions
loss gradients with the Fisher of the element-wise Gaussian weight family
(App. D of "Duality of information flow"); chain it with any ``optax``
optimiser.  ``variational_online_newton`` is a complete optimiser for the
same pairs whose step does not grow with the data-set size: the IVON update
(Shen et al. 2024) with the curvature read off BP's variance gradient (see
:mod:`dualflow.optim.von`).  ``mean_variance_labels`` labels the leaves of
a parameter pytree ``"mean"`` / ``"variance"`` / ``"other"`` for
``optax.partition``.

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
from dualflow.optim.von import VONState, variational_online_newton

__all__ = [
    "VARIANCE_SUFFIXES",
    "NaturalGradientState",
    "mean_variance_labels",
    "natural_gradient",
    "VONState",
    "variational_online_newton",
]
