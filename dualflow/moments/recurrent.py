"""Recurrent moment maps: Gaussian hidden states carried through ``lax.scan``.

Pure functions over :class:`~dualflow.Gaussian` sequences (batch first,
``[N, T, H]``).  One step of :func:`indrnn` is::

    h_t = f(a_t + u ⊙ h_{t-1})                (a_t = W x_t + b, any Gaussian)

with :func:`~dualflow.moments.multiply` for ``u ⊙ h`` (independent factors),
:func:`~dualflow.moments.add` and the moment activation ``f``; :func:`simple_rnn`
uses :func:`~dualflow.moments.dense` with ``U [H, H]`` instead.  Reverse mode
through the scan runs the ops' custom VJPs step by step: belief propagation
through time.

Optional **observations** ``z [N, T, H]`` with noise variances ``R`` turn the
scan into a filter: after each step the state is conditioned on
``z_t = h_t + v_t``, ``v_t ~ N(0, R)`` (element-wise Kalman update) and the
one-step predictive log-likelihood ``log N(z_t; m_{t|t-1}, P_{t|t-1} + R)`` is
returned.  With ``f = identity``, point ``u`` and ``a_t`` of variance ``q``
this *is* the Kalman filter of the LGSSM ``h_t = diag(u) h_{t-1} + a_t``,
``z_t = h_t + v_t`` (Duality of information flow, App. C.1): diagonal
dynamics and observations keep the covariance diagonal, so nothing is
dropped.  ``state_delta`` adds a zero perturbation to every filtered state;
its gradient is Theorem 3's ``∇_{x̂_{t|t}}, ∇_{P_{t|t}} log p`` and gives the
RTS-smoothed moments through :func:`dualflow.smoothing.smoothed_moments`.
(:func:`simple_rnn` keeps only the diagonal of ``U^T P U``: a mean-field
approximation of the Kalman predict step.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.moments._backward import check_backward
from dualflow.moments.activations import activation as _activation
from dualflow.moments.combine import add, multiply
from dualflow.moments.linear import dense

Array = jax.Array

__all__ = ["indrnn", "kalman_update", "simple_rnn"]


def kalman_update(
    prior: Gaussian, z: Array, noise_var: Array
) -> tuple[Gaussian, Array]:
    """Condition ``N(m, P)`` on ``z = h + v``, ``v ~ N(0, R)`` (element-wise).

    Returns the posterior ``N(m + K (z - m), (1 - K) P)``, ``K = P / (P + R)``,
    and the log-likelihood ``log N(z; m, P + R)`` per element (same shape).
    Exact Gaussian conditioning; differentiated by plain autodiff.
    """
    m, P = prior.mean, prior.var
    S = P + noise_var
    K = P / S
    r = z - m
    ll = -0.5 * (jnp.log(2.0 * jnp.pi * S) + r * r / S)
    return Gaussian(m + K * r, P - K * P), ll


def _time_major(x):
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), x)


def _scan(
    rec: Callable[[Gaussian], Gaussian],
    a,
    *,
    h0,
    activation: str,
    mode: str,
    backward: str,
    observations,
    noise_var,
    state_delta,
    unroll: int,
    where: str,
):
    check_backward(backward, where)
    a = as_gaussian(a, f"{where} input term")
    if a.ndim != 3:
        raise ValueError(f"{where}: expected the input term [N, T, H], got {a.shape}.")
    n, t, hdim = a.shape
    h = Gaussian.point(jnp.zeros((n, hdim), a.dtype)) if h0 is None else h0
    h = as_gaussian(h, f"{where} h0")
    if h.shape != (n, hdim):
        raise ValueError(f"{where}: h0 must be [N, H] = {(n, hdim)}, got {h.shape}.")
    xs: dict = {"a": _time_major(a)}
    if observations is not None:
        z = jnp.asarray(observations, a.dtype)
        if z.shape != a.shape:
            raise ValueError(
                f"{where}: observations must be [N, T, H] = {a.shape}, got {z.shape}."
            )
        if noise_var is None:
            raise ValueError(f"{where}: observations need noise_var (R > 0).")
        xs["z"] = jnp.swapaxes(z, 0, 1)
        r = jnp.asarray(noise_var, a.dtype)
    if state_delta is not None:
        if state_delta.shape != a.shape:
            raise ValueError(
                f"{where}: state_delta must be [N, T, H] = {a.shape}, got"
                f" {state_delta.shape}."
            )
        xs["delta"] = _time_major(state_delta)

    def step(h, inp):
        pre = add(inp["a"], rec(h))
        h = _activation(activation, pre, mode=mode, backward=backward)
        out = {}
        if "z" in inp:
            h, out["ll"] = kalman_update(h, inp["z"], r)
        if "delta" in inp:
            d = inp["delta"]
            h = Gaussian(h.mean + d.mean, h.var + d.var)
        out["h"] = h
        return h, out

    _, out = jax.lax.scan(step, h, xs, unroll=int(unroll))
    states = _time_major(out["h"])
    ll = jnp.swapaxes(out["ll"], 0, 1) if "ll" in out else None
    return states, ll


def indrnn(
    a: Gaussian | Array,
    u_mean: Array,
    u_var: Array,
    *,
    h0: Gaussian | Array | None = None,
    activation: str = "relu",
    mode: str = "linearized",
    backward: str = "bp",
    observations: Array | None = None,
    noise_var: Array | None = None,
    state_delta: Gaussian | None = None,
    unroll: int = 1,
) -> tuple[Gaussian, Array | None]:
    """IndRNN moments ``h_t = f(a_t + u ⊙ h_{t-1})`` over a sequence.

    Args:
      a: input term ``W x_t + b`` as a Gaussian ``[N, T, H]`` (e.g.
        :func:`dualflow.moments.dense` of the inputs).
      u_mean, u_var: moments of the element-wise recurrent weight ``[H]``.
      h0: initial state ``[N, H]`` (default: the point 0).
      activation, mode, backward: as :func:`dualflow.moments.activation`.
      observations, noise_var: optional ``z [N, T, H]`` and ``R`` (broadcastable
        to ``[N, H]``) for the Kalman update (module docstring).
      state_delta: optional zero perturbation ``[N, T, H]`` of the filtered
        states (its gradient is the loss gradient w.r.t. them).
      unroll: ``lax.scan`` unroll factor.

    Returns:
      ``(states, log_lik)``: filtered states ``Gaussian [N, T, H]`` and, with
      observations, the per-element predictive log-likelihoods ``[N, T, H]``
      (``None`` otherwise).
    """
    u = Gaussian(jnp.asarray(u_mean), jnp.asarray(u_var))
    if u.ndim != 1:
        raise ValueError(f"indrnn: u_mean/u_var must be [H], got {u.shape}.")
    return _scan(
        lambda h: multiply(h, u, backward=backward),
        a,
        h0=h0,
        activation=activation,
        mode=mode,
        backward=backward,
        observations=observations,
        noise_var=noise_var,
        state_delta=state_delta,
        unroll=unroll,
        where="indrnn",
    )


def simple_rnn(
    a: Gaussian | Array,
    w_mean: Array,
    w_var: Array,
    *,
    h0: Gaussian | Array | None = None,
    activation: str = "tanh",
    mode: str = "linearized",
    backward: str = "bp",
    observations: Array | None = None,
    noise_var: Array | None = None,
    state_delta: Gaussian | None = None,
    unroll: int = 1,
) -> tuple[Gaussian, Array | None]:
    """Simple recurrent network moments ``h_t = f(a_t + h_{t-1} U)``.

    ``w_mean``, ``w_var``: moments of ``U [H, H]``; the rest as :func:`indrnn`.
    The recurrent product is :func:`dualflow.moments.dense`, which keeps the
    diagonal of the state covariance only (mean-field).
    """
    w_mean, w_var = jnp.asarray(w_mean), jnp.asarray(w_var)
    if w_mean.ndim != 2 or w_mean.shape[0] != w_mean.shape[1]:
        raise ValueError(f"simple_rnn: U must be [H, H], got {w_mean.shape}.")
    return _scan(
        lambda h: dense(h, w_mean, w_var, backward=backward),
        a,
        h0=h0,
        activation=activation,
        mode=mode,
        backward=backward,
        observations=observations,
        noise_var=noise_var,
        state_delta=state_delta,
        unroll=unroll,
        where="simple_rnn",
    )
