"""Monte Carlo moment estimates with standard errors, shared by the tests."""

import numpy as np


def mc_stats(samples):
    """Mean, variance and their standard errors from ``[S, ...]`` samples.

    se(mean) = sqrt(var / S); se(var) = sqrt((m4 - var^2) / S) with the
    sample fourth central moment m4.
    """
    s = np.asarray(samples, np.float64)
    n = s.shape[0]
    mean = s.mean(0)
    c = s - mean
    var = (c**2).mean(0)
    m4 = (c**4).mean(0)
    return mean, var, np.sqrt(var / n), np.sqrt(np.maximum(m4 - var**2, 0) / n)
