"""What a trained network believes: HMC over its uncalibrated observation density.

``run_hmc`` (numpyro NUTS/HMC, vectorised chains, split R-hat and ESS),
``check_converged``, potentials for regression (``z = (x, y)``) and
classification (inputs of a class), and the App. E.2 sanity check
(:mod:`dualflow.hmc.sanity`: bp filter/smoothing densities vs an ensemble of
sampled networks).  ``scripts/visualize.py`` draws the duality paper's Figs. 2-4.
"""

from dualflow.hmc.potentials import (
    class_log_prob_fn,
    classification_potential,
    gaussian_log_prior,
    regression_potential,
)
from dualflow.hmc.sampling import (
    HMCResult,
    NotConvergedError,
    check_converged,
    run_hmc,
)

__all__ = [
    "HMCResult",
    "NotConvergedError",
    "check_converged",
    "class_log_prob_fn",
    "classification_potential",
    "gaussian_log_prior",
    "regression_potential",
    "run_hmc",
]
