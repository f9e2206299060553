"""A whole training run as one pure, jit- and vmap-able function.

:func:`make_scan_fit` compiles epochs and mini-batch steps into nested
``lax.scan`` loops over data that lives on the device, so many small runs
(UCI splits, hyper-parameter grids, seeds) train together under ``jax.vmap``
in one compiled program -- on a CPU this removes the per-step Python dispatch
that dominates small models.  Use :func:`dualflow.train.fit` for large data
that streams from the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dualflow.nn.context import Method
from dualflow.nn.methods import Likelihood
from dualflow.train.fit import make_pure_step

__all__ = ["make_scan_fit"]

Array = jax.Array


def make_scan_fit(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    method: Method,
    likelihood: Likelihood,
    n_data: int,
    batch_size: int,
    epochs: int,
    kl_weight: float = 1.0,
    eval_fn: Callable[..., dict[str, Array]] | None = None,
    eval_every: int = 1,
) -> Callable[..., tuple[Any, Any, dict[str, Array]]]:
    """Build ``run(params, rest, x, y, key, eval_data) -> (params, rest, history)``.

    ``x [n_data, ...]``, ``y [n_data, ...]`` are the whole training set; each
    epoch takes a fresh random permutation (from ``key``) and runs
    ``n_data // batch_size`` steps (the remainder is skipped that epoch).
    ``history["loss"]`` is the mean training loss per epoch ``[epochs]``; with
    ``eval_fn(model, eval_data, key) -> dict of scalars`` every
    ``eval_every``-th epoch (1-based: epochs ``eval_every, 2*eval_every, ...``)
    adds ``history[name]`` of shape ``[epochs // eval_every]``.

    ``run`` is pure (no Python side effects), so ``jax.vmap(run)`` trains
    independent copies (different data, initial parameters or keys) together.
    """
    if not 1 <= batch_size <= n_data:
        raise ValueError(f"batch_size must be in [1, {n_data}], got {batch_size}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if eval_fn is not None and not 1 <= eval_every <= epochs:
        raise ValueError(f"eval_every must be in [1, {epochs}], got {eval_every}.")
    steps = n_data // batch_size

    train_step = make_pure_step(
        graphdef,
        tx,
        method=method,
        likelihood=likelihood,
        n_data=n_data,
        kl_weight=kl_weight,
    )

    def run(params, rest, x, y, key, eval_data=None):
        if x.shape[0] != n_data:
            raise ValueError(f"run: x has {x.shape[0]} rows, built for {n_data}.")
        opt_state = tx.init(params)

        def step(carry, inp):
            idx, k = inp
            *carry, metrics = train_step(*carry, x[idx], y[idx], k)
            return tuple(carry), metrics["loss"]

        def epoch(carry, k):
            k_perm, k_steps = jax.random.split(k)
            perm = jax.random.permutation(k_perm, n_data)[: steps * batch_size]
            batches = perm.reshape(steps, batch_size)
            carry, losses = jax.lax.scan(
                step, carry, (batches, jax.random.split(k_steps, steps))
            )
            return carry, losses.mean()

        def block(carry, k):
            """``eval_every`` epochs, then one evaluation."""
            k_train, k_eval = jax.random.split(k)
            carry, losses = jax.lax.scan(
                epoch, carry, jax.random.split(k_train, eval_every)
            )
            params, rest, _ = carry
            metrics = eval_fn(nnx.merge(graphdef, params, rest), eval_data, k_eval)
            return carry, (losses, metrics)

        carry = (params, rest, opt_state)
        if eval_fn is None:
            carry, losses = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
            history = {"loss": losses}
        else:
            n_blocks, tail = divmod(epochs, eval_every)
            k_blocks, k_tail = jax.random.split(key)
            carry, (losses, metrics) = jax.lax.scan(
                block, carry, jax.random.split(k_blocks, n_blocks)
            )
            losses = losses.reshape(-1)
            if tail:
                carry, tail_losses = jax.lax.scan(
                    epoch, carry, jax.random.split(k_tail, tail)
                )
                losses = jnp.concatenate([losses, tail_losses])
            history = {"loss": losses, **metrics}
        params, rest, _ = carry
        return params, rest, history

    return run
