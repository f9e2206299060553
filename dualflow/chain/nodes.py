"""Node distributions of the chain-graph view of neural networks.

Reference: "Deriving neural network design and learning from the probabilistic
framework of chain graphs" (the "chain-graph paper").  A hidden node ``X`` is a
random variable whose conditional law given its parent layer depends only on
the pre-activation ``a = b + w^T q`` (Eq. 7-8); the activation function is the
node's expected value given ``a`` (the feed-forward approximation, Eq. 6 / 9).
All functions here are element-wise: ``a`` has any shape ``[...]`` and the
outputs have the same shape and dtype.

Nodes (``name``):

* ``"tanh"``: binary node on ``{-1, +1}`` (Eq. 3 with ``alpha=-1, beta=1``):
  ``P(X=+1 | a) = sigmoid(2a)``, hence ``E[X] = 2 sigmoid(2a) - 1 = tanh(a)``
  and ``Var[X] = 1 - tanh(a)^2``.  The activation is the exact node mean.
* ``"sigmoid"``: binary node on ``{0, 1}``: ``P(X=1 | a) = sigmoid(a)``,
  ``E[X] = sigmoid(a)`` (Eq. 6 with ``alpha=0, beta=1``),
  ``Var[X] = sigmoid(a)(1 - sigmoid(a))``.  Exact.
* ``"relu"``: rectified Gaussian with tanh-modulated standard deviation
  (Eq. 11): ``X = max(0, Y)``, ``Y ~ N(a, tanh(a)^2)``.  Its mean is **not**
  exactly ``relu(a)``; the paper says it "approximates" ReLU.  With
  ``r = a / |tanh(a)|`` the mean is ``a Phi(r) + |tanh a| phi(r)``; the error
  ``E[X] - relu(a)`` is even in ``a``, non-negative, 0 at ``a = 0`` and as
  ``|a| -> inf``, and at most :data:`RELU_MAX_ERROR` (= 0.03706, at
  ``|a| = 0.7475``).  (The sigmoid-modulated std of Nair & Hinton, which the
  paper compares against, is off by ``0.1995`` at ``a = 0``.)
* ``"softplus"``: rectified Gaussian with the constant std
  :data:`SOFTPLUS_STD` ``= 1.776091849725427`` (§3, after Eq. 10), the
  minimax constant for approximating ``softplus(a)``; max error 0.01541.

:func:`node_mean` returns the activation used by feed-forward (``tanh``,
``sigmoid``, ``relu``, ``softplus``): the exact mean for the binary nodes and
the paper's approximation for the rectified ones.  :func:`node_moments` returns
the exact mean and variance of the node distribution (closed forms), which the
Monte Carlo tests check :func:`node_sample` against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

Array = jax.Array

__all__ = [
    "BINARY_GRADS",
    "NODES",
    "RELU_MAX_ERROR",
    "SOFTPLUS_STD",
    "node_mean",
    "node_moments",
    "node_sample",
    "node_std",
    "rectified_gaussian_moments",
]

#: Node types with a distribution (keys of the activation names they induce).
NODES = ("tanh", "sigmoid", "relu", "softplus")
#: How gradients pass through binary samples (see :func:`node_sample`).
BINARY_GRADS = ("none", "straight_through")
#: ``sup_a |E[X] - relu(a)|`` of the Eq. 11 node (numerical, grid step 1e-5).
RELU_MAX_ERROR = 0.0370580604
#: Constant std of the softplus-approximating rectified Gaussian (§3).
SOFTPLUS_STD = 1.776091849725427

_BINARY = ("tanh", "sigmoid")
_RECTIFIED = ("relu", "softplus")
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _check(name: str) -> None:
    if name not in NODES:
        raise ValueError(f"unknown node {name!r}; choose one of {NODES}.")


def node_std(name: str, a: Array) -> Array:
    """Std ``s(a)`` of the Gaussian ``Y`` behind a rectified node ``[...]``.

    ``relu``: ``tanh(a)`` (Eq. 11; signed -- ``N(a, tanh(a)^2)`` only depends
    on its square, and the signed form keeps ``a + s(a) eps`` smooth in ``a``);
    ``softplus``: the constant :data:`SOFTPLUS_STD`.
    """
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))  # integer input: float std
    if name == "relu":
        return jnp.tanh(a)
    if name == "softplus":
        return jnp.full_like(a, SOFTPLUS_STD)
    raise ValueError(f"node {name!r} is not a rectified Gaussian node.")


def rectified_gaussian_moments(mu: Array, s: Array) -> tuple[Array, Array]:
    """Mean and variance of ``max(0, Y)``, ``Y ~ N(mu, s^2)`` (element-wise).

    With ``r = mu / |s|``, ``Phi``/``phi`` the standard normal cdf/pdf:
    ``E = mu Phi(r) + |s| phi(r)``,
    ``E[X^2] = (mu^2 + s^2) Phi(r) + mu |s| phi(r)``, ``Var = E[X^2] - E^2``.
    ``s = 0`` gives the point mass ``relu(mu)`` (variance 0), with finite
    gradients.
    """
    mu, s = jnp.asarray(mu), jnp.abs(jnp.asarray(s))
    pos = s > 0
    r = mu / jnp.where(pos, s, 1.0)  # finite everywhere (no NaN gradients)
    cdf = jnp.where(pos, ndtr(r), (mu > 0).astype(r.dtype))
    pdf = jnp.where(pos, _INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(r)), 0.0)
    s0 = jnp.where(pos, s, 0.0)
    mean = mu * cdf + s0 * pdf
    second = (mu * mu + s0 * s0) * cdf + mu * s0 * pdf
    var = jnp.maximum(second - mean * mean, 0.0)
    return mean, var


def node_mean(name: str, a: Array) -> Array:
    """The activation ``[...]`` of node ``name`` at pre-activation ``a [...]``.

    Exact node mean for ``tanh`` / ``sigmoid`` (Eq. 6); for ``relu`` /
    ``softplus`` the activation the rectified node approximates (Eq. 10-11;
    the exact mean is ``node_moments(name, a)[0]``, within
    :data:`RELU_MAX_ERROR` / 0.0155 of it).
    """
    _check(name)
    a = jnp.asarray(a)
    if name == "tanh":
        return jnp.tanh(a)
    if name == "sigmoid":
        return jax.nn.sigmoid(a)
    if name == "relu":
        return jax.nn.relu(a)
    return jax.nn.softplus(a)


def node_moments(name: str, a: Array) -> tuple[Array, Array]:
    """Exact mean and variance ``[...]`` of the node distribution given ``a``.

    Binary: ``tanh(a), 1 - tanh(a)^2`` and ``sigmoid(a), sigmoid(a)(1 -
    sigmoid(a))``; rectified: :func:`rectified_gaussian_moments` with
    ``s = node_std(name, a)``.
    """
    _check(name)
    a = jnp.asarray(a)
    if name == "tanh":
        t = jnp.tanh(a)
        return t, 1.0 - t * t
    if name == "sigmoid":
        p = jax.nn.sigmoid(a)
        return p, p * (1.0 - p)
    return rectified_gaussian_moments(a, node_std(name, a))


def node_sample(name: str, a: Array, key: Array, *, binary_grad: str = "none") -> Array:
    """One draw ``[...]`` of each node given its pre-activation ``a [...]``.

    * ``relu`` / ``softplus``: reparameterised (§5.1 "we adopt the
      reparameterization trick for ReLU PCFF samples"):
      ``x = max(0, a + s(a) eps)``, ``eps ~ N(0, 1)``, so ``dx/da`` is the
      pathwise derivative ``1[y > 0] (1 + s'(a) eps)`` and ``E[dx/da] =
      d E[x] / da``.
    * ``tanh`` / ``sigmoid``: ``x = alpha`` or ``beta`` with ``P(x = beta) =
      sigmoid((beta - alpha) a)`` (Eq. 3).  A discrete draw has no
      reparameterisation; the paper's answer (§5) is that only the collapsed
      nodes of PCFF carry gradient.  ``binary_grad="none"`` (default, the
      paper's) makes the sample a constant (zero gradient);
      ``"straight_through"`` passes the gradient of the mean, ``d node_mean /
      da`` (value unchanged), a biased estimator offered for comparison.
    """
    _check(name)
    if binary_grad not in BINARY_GRADS:
        raise ValueError(
            f"binary_grad must be one of {BINARY_GRADS}, got {binary_grad!r}."
        )
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if name in _RECTIFIED:
        eps = jax.random.normal(key, a.shape, a.dtype)
        return jax.nn.relu(a + node_std(name, a) * eps)
    if name == "tanh":
        lo, p = -1.0, jax.nn.sigmoid(2.0 * a)
    else:
        lo, p = 0.0, jax.nn.sigmoid(a)
    u = jax.random.uniform(key, a.shape, a.dtype)
    x = jnp.where(u < jax.lax.stop_gradient(p), 1.0, lo).astype(a.dtype)
    if binary_grad == "straight_through":
        m = node_mean(name, a)
        return x + (m - jax.lax.stop_gradient(m))
    return x
