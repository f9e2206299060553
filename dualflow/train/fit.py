"""A small, readable mini-batch training loop for any learning method.

``fit`` trains an ``nnx`` model on in-memory arrays: the model is split into
parameters and the rest (e.g. BatchNorm statistics), and one jitted pure
function does a step -- objective, gradient (the BP custom_vjp where the method
is ``bp``), optax update.  Larger jobs (data pipelines, checkpoints, sharding)
go through ``scripts/train.py`` (:mod:`dualflow.train.trainer`), whose step
uses the same loss (:func:`make_loss_fn`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from dualflow.errors import DivergenceError
from dualflow.nn.context import Method
from dualflow.nn.methods import Likelihood, objective

__all__ = ["fit", "make_loss_fn", "make_pure_step", "make_train_step"]


def make_loss_fn(graphdef, *, method: Method, likelihood: Likelihood, n_data: int):
    """``loss_fn(params, rest, x, y, key, kl_weight) -> (loss, (parts, rest))``.

    The per-batch objective of :func:`dualflow.nn.objective` as a pure function
    of the split model; ``kl_weight`` may be traced (KL annealing).  ``rest``
    comes back updated (BatchNorm statistics).
    """

    def loss_fn(params, rest, x, y, key, kl_weight):
        # copy: the objective may mutate state (BatchNorm statistics) under grad
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss, parts = objective(
            model,
            x,
            y,
            key,
            method=method,
            likelihood=likelihood,
            n_data=n_data,
            kl_weight=kl_weight,
            train=True,
        )
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss, (parts, new_rest)

    return loss_fn


def make_pure_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    method: Method,
    likelihood: Likelihood,
    n_data: int,
    kl_weight: float,
):
    """Un-jitted ``step(params, rest, opt_state, x, y, key)`` (for use inside
    other transformations, e.g. ``lax.scan``; :func:`make_train_step` jits it).

    Returns ``(params, rest, opt_state, metrics)`` with ``metrics`` =
    ``{"loss", "nll", "kl"}`` of the batch before the update.  ``params`` are the
    ``nnx.Param`` state, ``rest`` everything else (``nnx.split(model, nnx.Param,
    ...)``).
    """
    loss_fn = make_loss_fn(
        graphdef, method=method, likelihood=likelihood, n_data=n_data
    )

    def step(params, rest, opt_state, x, y, key):
        (loss, (parts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, rest, x, y, key, kl_weight
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, rest, opt_state, {"loss": loss, **parts}

    return step


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    method: Method,
    likelihood: Likelihood,
    n_data: int,
    kl_weight: float,
):
    """Jitted :func:`make_pure_step`."""
    return jax.jit(
        make_pure_step(
            graphdef,
            tx,
            method=method,
            likelihood=likelihood,
            n_data=n_data,
            kl_weight=kl_weight,
        )
    )


def fit(
    model,
    tx: optax.GradientTransformation,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: Method,
    likelihood: Likelihood | None = None,
    epochs: int,
    batch_size: int,
    kl_weight: float = 1.0,
    seed: int = 0,
    eval_fn: Callable[[Any, int], dict] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place; return the per-epoch history.

    Args:
      model: ``nnx.Module`` (stacked for ``ensemble``).
      tx: optax optimiser (e.g. ``optax.chain(dualflow.optim.natural_gradient(),
        optax.sgd(...))``); it receives parameters, so param-aware transforms work.
      x, y: training arrays (numpy); shuffled each epoch, last partial batch
        dropped (static shapes: one compilation).
      eval_fn: ``eval_fn(model, epoch) -> dict`` called every ``eval_every``
        epochs and at the end; its numbers are added to the history.
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"fit: x has {n} rows but y has {len(y)}.")
    if not 1 <= batch_size <= n:
        raise ValueError(f"fit: batch_size must be in [1, {n}], got {batch_size}.")
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}.")
    likelihood = Likelihood() if likelihood is None else likelihood
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step = make_train_step(
        graphdef,
        tx,
        method=method,
        likelihood=likelihood,
        n_data=n,
        kl_weight=kl_weight,
    )
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    steps = n // batch_size
    history: list[dict] = []
    t0 = time.time()
    bar = tqdm(
        range(1, epochs + 1),
        desc=method.name,
        unit="ep",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        perm = rng.permutation(n)
        sums: dict[str, Any] = {}
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            key, sub = jax.random.split(key)
            params, rest, opt_state, m = step(
                params, rest, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]), sub
            )
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
        record = {
            "epoch": epoch,
            **{k: float(v) / steps for k, v in sums.items()},
            "seconds": time.time() - t0,
        }
        if not np.isfinite(record["loss"]):
            raise DivergenceError(
                f"fit: loss became {record['loss']} in epoch {epoch} ({method.name});"
                " lower the learning rate or the initial variance."
            )
        if eval_fn is not None and (
            (eval_every and epoch % eval_every == 0) or epoch == epochs
        ):
            nnx.update(model, params, rest)
            record.update(eval_fn(model, epoch))
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        history.append(record)
    nnx.update(model, params, rest)
    return history
