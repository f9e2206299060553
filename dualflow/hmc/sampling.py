"""NUTS / HMC over a user potential with convergence diagnostics (numpyro).

:func:`run_hmc` evolves several chains in parallel (vectorised on one device,
so it needs no ``numpyro.set_host_device_count``) from given starting points
with step-size and diagonal mass-matrix adaptation during warm-up, and returns
the draws with split Gelman-Rubin R-hat and the effective sample size
(``numpyro.diagnostics``) per coordinate.  :func:`check_converged` refuses
results whose worst R-hat exceeds a threshold.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HMCResult", "NotConvergedError", "check_converged", "run_hmc"]


class NotConvergedError(RuntimeError):
    """The chains have not mixed (split R-hat above the threshold)."""


class HMCResult(NamedTuple):
    samples: np.ndarray  # [chains, draws, dim]
    rhat: np.ndarray  # [dim] split Gelman-Rubin
    ess: np.ndarray  # [dim] effective sample size (all chains)
    accept_prob: float  # mean acceptance probability of the draws
    divergences: int
    seconds: float

    @property
    def max_rhat(self) -> float:
        return float(np.max(self.rhat))

    @property
    def min_ess(self) -> float:
        return float(np.min(self.ess))

    @property
    def flat(self) -> np.ndarray:
        """All draws ``[chains * draws, dim]``."""
        return self.samples.reshape(-1, self.samples.shape[-1])


def run_hmc(
    potential_fn: Callable[[jax.Array], jax.Array],
    init: jax.Array,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    key: jax.Array | int = 0,
    kernel: str = "nuts",
    target_accept_prob: float = 0.8,
    num_steps: int = 16,
    max_tree_depth: int = 8,
    progress: bool = False,
) -> HMCResult:
    """Sample ``exp(-potential_fn(z))`` with one chain per row of ``init``.

    Args:
      potential_fn: ``z [dim] -> scalar`` negative log density (unnormalised).
      init: ``[chains, dim]`` starting points (e.g. perturbed training points).
      kernel: ``"nuts"`` or ``"hmc"`` (fixed ``num_steps`` leapfrog steps).
      max_tree_depth: NUTS tree depth cap (``2**depth`` leapfrog steps).
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import HMC, MCMC, NUTS

    init = jnp.asarray(init)
    if init.ndim != 2:
        raise ValueError(f"init must be [chains, dim], got shape {init.shape}.")
    chains = int(init.shape[0])
    if chains < 2:
        raise ValueError("run_hmc needs >= 2 chains for the Gelman-Rubin diagnostic.")
    if num_samples < 4:
        raise ValueError(f"num_samples must be >= 4, got {num_samples}.")
    if kernel == "nuts":
        k = NUTS(
            potential_fn=potential_fn,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
        )
    elif kernel == "hmc":
        k = HMC(
            potential_fn=potential_fn,
            target_accept_prob=target_accept_prob,
            num_steps=num_steps,
        )
    else:
        raise ValueError(f"kernel must be 'nuts' or 'hmc', got {kernel!r}.")
    mcmc = MCMC(
        k,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=progress,
    )
    if isinstance(key, numbers.Integral):
        key = jax.random.PRNGKey(int(key))
    t0 = time.time()
    mcmc.run(key, init_params=init, extra_fields=("accept_prob", "diverging"))
    samples = np.asarray(mcmc.get_samples(group_by_chain=True))  # [C, S, D]
    seconds = time.time() - t0
    extra = mcmc.get_extra_fields(group_by_chain=True)
    rhat = np.asarray(split_gelman_rubin(samples))
    ess = np.asarray(effective_sample_size(samples))
    return HMCResult(
        samples=samples,
        rhat=rhat,
        ess=ess,
        accept_prob=float(np.mean(extra["accept_prob"])),
        divergences=int(np.sum(extra["diverging"])),
        seconds=seconds,
    )


def check_converged(
    result: HMCResult, max_rhat: float = 1.1, *, force: bool = False, what: str = ""
) -> bool:
    """Raise :class:`NotConvergedError` if ``result.max_rhat > max_rhat``
    (unless ``force``, which only returns False)."""
    ok = bool(np.isfinite(result.max_rhat)) and result.max_rhat <= max_rhat
    if not ok and not force:
        raise NotConvergedError(
            f"{what or 'HMC'}: split R-hat {result.max_rhat:.3f} > {max_rhat} (min ESS"
            f" {result.min_ess:.0f}): the chains have not mixed.  Run longer"
            " (num_warmup / num_samples), start closer to the data, or pass --force"
            " to plot anyway."
        )
    return ok
