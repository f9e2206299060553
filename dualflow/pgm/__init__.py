"""Exact reference inference for the duality theorems (Duality of information flow).

* :mod:`~dualflow.pgm.gaussian_chain` - Gaussian linear chain ("Gaussian-linear
  BNN"), filter/RTS smoother and Theorem 1 checks.
* :mod:`~dualflow.pgm.kalman` - LGSSM Kalman filter, RTS smoother, Theorem 3.
* :mod:`~dualflow.pgm.hmm` - discrete HMM in log space, Theorem 4.

``kalman.filter_gradient_recursion`` and ``hmm.filter_gradient_recursion`` are
exported as :func:`kalman_gradient_recursion` and :func:`hmm_gradient_recursion`.
"""

from dualflow.pgm import gaussian_chain, hmm, kalman
from dualflow.pgm.gaussian_chain import (
    ChainMoments,
    ChainSmootherResult,
    GaussianChain,
    canonical_to_moments,
    chain_filter,
    chain_log_likelihood,
    chain_smoother,
    condition_gaussian,
    gaussian_logpdf,
    joint_gaussian,
    joint_gaussian_smoother,
    log_likelihood_from_layer,
    log_likelihood_from_layer_canonical,
    moments_to_canonical,
    symmetrize,
)
from dualflow.pgm.hmm import (
    HMMForwardResult,
    hmm_forward,
    hmm_smoother,
    log_likelihood_from_log_filter,
)
from dualflow.pgm.hmm import filter_gradient_recursion as hmm_gradient_recursion
from dualflow.pgm.kalman import (
    LGSSM,
    KalmanFilterResult,
    RTSSmootherResult,
    kalman_filter,
    lgssm_joint_gaussian,
    log_likelihood_from_filter,
    rts_smoother,
)
from dualflow.pgm.kalman import filter_gradient_recursion as kalman_gradient_recursion

__all__ = [
    "LGSSM",
    "ChainMoments",
    "ChainSmootherResult",
    "GaussianChain",
    "HMMForwardResult",
    "KalmanFilterResult",
    "RTSSmootherResult",
    "canonical_to_moments",
    "chain_filter",
    "chain_log_likelihood",
    "chain_smoother",
    "condition_gaussian",
    "gaussian_chain",
    "gaussian_logpdf",
    "hmm",
    "hmm_forward",
    "hmm_gradient_recursion",
    "hmm_smoother",
    "joint_gaussian",
    "joint_gaussian_smoother",
    "kalman",
    "kalman_filter",
    "kalman_gradient_recursion",
    "lgssm_joint_gaussian",
    "log_likelihood_from_filter",
    "log_likelihood_from_layer",
    "log_likelihood_from_layer_canonical",
    "log_likelihood_from_log_filter",
    "moments_to_canonical",
    "rts_smoother",
    "symmetrize",
]
