"""What a trained network believes: HMC over its uncalibrated observation density.

``run_hmc`` (numpyro NUTS/HMC, vectorised chains, split R-hat and ESS),
``check_converged``, potentials for regression (``z = (x, y)``) and
classification (inputs of a class), and the App. E.2 sanity check
(:mod:`dualflow.hmc.sanity`: bp filter/smoothing densities vs an ensemble of
sampled networks).  :mod:`dualflow.hmc.figures` holds the studies behind the
duality paper's Figs. 2-3 (training, potentials, sampling with diagnostics,
plots), which ``scripts/visualize.py`` and ``notebooks/hmc_beliefs.ipynb`` call.
"""

from dualflow.hmc import figures
from dualflow.hmc.figures import SampledRun, sample_with_diagnostics
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
    "SampledRun",
    "check_converged",
    "class_log_prob_fn",
    "classification_potential",
    "figures",
    "gaussian_log_prior",
    "regression_potential",
    "run_hmc",
    "sample_with_diagnostics",
]
