"""Backward-rule names shared by every moment op.

* ``"bp"``: the belief-propagation (smoothing-gain) rule, as ``jax.custom_vjp``;
* ``"autodiff"``: plain reverse mode through the moment forward;
* ``"bp_fixed_noise"``: the paper's literal App. A rule for weight layers (the
  weight noise is held fixed when propagating input sensitivities); ops
  without weights treat it as ``"bp"``.
"""

from __future__ import annotations

BACKWARDS = ("bp", "autodiff", "bp_fixed_noise")

__all__ = ["BACKWARDS", "check_backward"]


def check_backward(backward: str, where: str, allowed=BACKWARDS) -> str:
    if backward not in allowed:
        raise ValueError(
            f"{where}: backward={backward!r} is not one of {allowed}. Use 'bp' for the"
            " belief-propagation rule (Algorithm 1) or 'autodiff' for plain reverse"
            " mode through the moment forward."
        )
    return backward
