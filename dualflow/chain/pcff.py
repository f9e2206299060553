"""Partially collapsed feed-forward (PCFF), §5 of the chain-graph paper.

Each node, independently, is *uncollapsed* with probability ``rate`` -- its
value is a draw from its node distribution (forward sampling) -- and otherwise
*collapsed* to its feed-forward value, the activation (Eq. 14).  ``rate = 0``
is plain feed-forward, ``rate = 1`` full forward sampling.  Gradients reach
``a`` through the collapsed nodes and, for the rectified (ReLU/softplus)
nodes, through the reparameterised samples (§5.1); binary samples carry no
gradient unless ``binary_grad="straight_through"`` (see
:func:`dualflow.chain.node_sample`).

Expected value: ``E[pcff] = (1 - rate) node_mean + rate E[X]``.  For binary
nodes ``E[X] = node_mean`` (unbiased w.r.t. feed-forward); for the rectified
nodes ``E[X]`` exceeds the activation by at most
:data:`~dualflow.chain.nodes.RELU_MAX_ERROR` (ReLU), so PCFF with ReLU shifts
each unit's mean by at most ``rate * 0.037``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dualflow.chain.nodes import NODES, node_mean, node_sample
from dualflow.nn.context import Context

Array = jax.Array

__all__ = ["PCFFActivation", "pcff"]


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"PCFF sampling rate must be in [0, 1], got {rate}.")
    return rate


def pcff(
    name: str, a: Array, key: Array, rate: float, *, binary_grad: str = "none"
) -> Array:
    """Partially collapsed feed-forward of pre-activations ``a [...]`` (Eq. 14).

    Args:
      name: node type, one of :data:`~dualflow.chain.nodes.NODES`.
      a: pre-activations, any shape.
      key: PRNG key; ``key`` itself draws the node samples and
        ``fold_in(key, 1)`` the uncollapse mask (so ``rate=1`` returns exactly
        ``node_sample(name, a, key)``).
      rate: probability (a Python float in ``[0, 1]``) that a node is sampled.
      binary_grad: gradient of binary samples (``"none"`` or
        ``"straight_through"``).

    Returns:
      ``[...]``: ``node_sample`` where uncollapsed, ``node_mean`` elsewhere.
    """
    rate = _check_rate(rate)
    mean = node_mean(name, a)
    if rate == 0.0:
        return mean
    sample = node_sample(name, a, key, binary_grad=binary_grad)
    if rate == 1.0:
        return sample
    mask = jax.random.bernoulli(jax.random.fold_in(key, 1), rate, mean.shape)
    return jnp.where(mask, sample, mean)


class PCFFActivation(nnx.Module):
    """Activation layer ``[...] -> [...]`` trained with PCFF, for ``nn.Sequential``.

    Called as ``layer(x, ctx)``: at train time (``ctx.train``) with ``rate >
    0`` it applies :func:`pcff` with ``ctx.next_key()``; at evaluation it
    returns the activation ``node_mean(name, x)`` (plain feed-forward).  Works
    under every point-valued method (e.g. ``deterministic``); under ``bp``
    it raises, since PCFF has no Gaussian moment rule here.

    Args:
      name: node type / activation (``"tanh"``, ``"sigmoid"``, ``"relu"``,
        ``"softplus"``).
      rate: sampling rate (the paper uses 0.4 for tanh, 1.0 for ReLU, §5.1).
      binary_grad: see :func:`dualflow.chain.node_sample`.
    """

    def __init__(self, name: str, rate: float, *, binary_grad: str = "none"):
        if name not in NODES:
            raise ValueError(f"unknown node {name!r}; choose one of {NODES}.")
        self.name = name
        self.rate = _check_rate(rate)
        self.binary_grad = str(binary_grad)

    def __call__(self, x, ctx: Context):
        if ctx.name == "bp":
            raise ValueError(
                "PCFFActivation has no Gaussian moment rule: use a point-valued"
                " method (e.g. Method('deterministic')) or nn.Activation under bp."
            )
        x = jnp.asarray(x)
        if not ctx.train or self.rate == 0.0:
            return node_mean(self.name, x)
        return pcff(
            self.name, x, ctx.next_key(), self.rate, binary_grad=self.binary_grad
        )
