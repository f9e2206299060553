"""``dualflow.propagate``: any JAX function becomes a moment-propagating one.

``propagate(fn)`` traces ``fn`` to a jaxpr and evaluates it on
:class:`~dualflow.Gaussian` beliefs with one moment rule per primitive
(built on :mod:`dualflow.moments`, whose ``custom_vjp`` rules give the
belief-propagation backward pass).  ``register_rule`` adds a rule for a
primitive that has none.  Every rule and its assumption: ``docs/propagate.md``.
"""

from dualflow.propagation import control as _control  # noqa: F401  (registers rules)
from dualflow.propagation import rules as _rules  # noqa: F401  (registers rules)
from dualflow.propagation.bayes import (
    BayesianFunction,
    from_equinox,
    from_function,
    from_linen,
    from_nnx,
)
from dualflow.propagation.elementwise import ELEMENTWISE
from dualflow.propagation.interpreter import (
    GaussianDependentControlFlowError,
    Propagated,
    RuleContext,
    UnsupportedPrimitiveError,
    propagate,
    register_rule,
    registered_rules,
    unregister_rule,
)
from dualflow.propagation.rules import softmax_moments

__all__ = [
    "BayesianFunction",
    "ELEMENTWISE",
    "GaussianDependentControlFlowError",
    "Propagated",
    "RuleContext",
    "UnsupportedPrimitiveError",
    "from_equinox",
    "from_function",
    "from_linen",
    "from_nnx",
    "propagate",
    "register_rule",
    "registered_rules",
    "softmax_moments",
    "unregister_rule",
]
