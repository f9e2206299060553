"""Recurrent moment maps: Gaussian hidden states carried through ``lax.scan``.

Pure functions over :class:`~dualflow.Gaussian` sequences (batch first,
``[N, T, H]``).  One step of :func:`indrnn` is::

    h_t = f(a_t + u ⊙ h_{t-1})                (a_t = W x_t + b, any Gaussian)

with :func:`~dualflow.moments.multiply` for ``u ⊙ h`` (independent factors),
:func:`~dualflow.moments.add` and the moment activation ``f``; :func:`simple_rnn`
uses :func:`~dualflow.moments.dense` with ``U [H, H]`` instead.  Reverse mode
is belief propagation through time: the ops' BP rules applied step by step
backwards.  Where the gain ``f'(pre)`` is a function of the output mean
(linearised identity/ReLU/leaky ReLU/tanh/sigmoid) the whole sequence is one
``jax.custom_vjp`` that stores only the states ``(m_t, P_t)`` -- 2 arrays
``[N, H]`` per step, the minimum the rule needs, shared with a next layer
that keeps its input; otherwise each op's custom VJP stores its own residuals
(``m_{t-1}, P_{t-1}`` and the gain: 3 arrays).  Both give the same gradients.

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

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.moments._backward import check_backward
from dualflow.moments.activations import _Kernel
from dualflow.moments.activations import activation as _activation
from dualflow.moments.combine import add
from dualflow.moments.linear import (
    _bilinear_bp_bwd,
    _forward,
    _matmul,
    bilinear_moments,
)
from dualflow.smoothing import perturb

Array = jax.Array

__all__ = ["FUSED_ACTIVATIONS", "indrnn", "kalman_update", "simple_rnn"]


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


# --------------------------------------------------------------------------
# BP through time as one custom VJP over the whole sequence
# --------------------------------------------------------------------------
# Linearised activations whose gain f'(pre) can be rebuilt from the output mean
# f(pre): the fused rule then stores only the states (m_t, P_t) -- 2 arrays
# [N, H] per step -- instead of (m_{t-1}, P_{t-1}, gain_t) of the per-op rules.
# Agreement with f'(pre): exact for identity/relu/leaky_relu; for tanh and
# sigmoid (1 - y)(1 + y) and y (1 - y) differ from f'(pre) by rounding of y
# (absolute, ~eps).
_GAIN_FROM_OUTPUT = {
    "identity": lambda y: jnp.ones_like(y),
    "relu": lambda y: (y > 0).astype(y.dtype),
    "leaky_relu": lambda y: jnp.where(y > 0, 1.0, 0.01).astype(y.dtype),
    "tanh": lambda y: (1.0 - y) * (1.0 + y),
    "sigmoid": lambda y: y * (1.0 - y),
}
FUSED_ACTIVATIONS = tuple(_GAIN_FROM_OUTPUT)


def _fused_forward(op, act, unroll, a_m, a_v, w_m, w_v, h0_m, h0_v):
    kernel = None if act == "identity" else _Kernel(act, "linearized")

    def step(carry, a_t):
        pm, pv = _forward(op, carry[0], carry[1], w_m, w_v)
        pm, pv = pm + a_t[0], pv + a_t[1]
        if kernel is not None:
            pm, pv, _ = kernel(pm, pv)
        return (pm, pv), (pm, pv)

    xs = (jnp.swapaxes(a_m, 0, 1), jnp.swapaxes(a_v, 0, 1))
    _, (M, P) = lax.scan(step, (h0_m, h0_v), xs, unroll=unroll)
    return jnp.swapaxes(M, 0, 1), jnp.swapaxes(P, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_scan(op, act, fixed_noise, unroll, a_m, a_v, w_m, w_v, h0_m, h0_v):
    """Batch-major ``a [N, T, H]`` -> states ``(M, P) [N, T, H]``.

    The residuals are the returned states themselves (batch-major), so a next
    layer that keeps its input for its own backward rule shares them."""
    return _fused_forward(op, act, unroll, a_m, a_v, w_m, w_v, h0_m, h0_v)


def _fused_scan_fwd(op, act, fixed_noise, unroll, a_m, a_v, w_m, w_v, h0_m, h0_v):
    M, P = _fused_forward(op, act, unroll, a_m, a_v, w_m, w_v, h0_m, h0_v)
    return (M, P), (M, P, w_m, w_v, h0_m, h0_v)


def _fused_scan_bwd(op, act, fixed_noise, unroll, res, cot):
    """Reverse scan: per step the activation's BP rule (gain from the stored
    output), the add, and the bilinear BP rule of the recurrent product with
    ``(m_{t-1}, P_{t-1})`` read from the stored states."""
    M, P, w_m, w_v, h0_m, h0_v = res
    M, P = jnp.swapaxes(M, 0, 1), jnp.swapaxes(P, 0, 1)  # time-major
    gM, gP = (jnp.swapaxes(g, 0, 1) for g in cot)
    gain = _GAIN_FROM_OUTPUT[act]
    prev_m = jnp.concatenate([h0_m[None], M[:-1]])
    prev_P = jnp.concatenate([h0_v[None], P[:-1]])

    def step(carry, inp):
        cm, cP, acc_wm, acc_wv = carry  # cotangent reaching h_t from later steps
        m_prev, P_prev, m_t, gm_t, gP_t = inp
        J = gain(m_t)
        c_m, c_P = J * (cm + gm_t), J * J * (cP + gP_t)  # into the pre-activation
        g_m, g_P, g_wm, g_wv = _bilinear_bp_bwd(
            op, fixed_noise, (m_prev, P_prev, w_m, w_v), (c_m, c_P)
        )
        return (g_m, g_P, acc_wm + g_wm, acc_wv + g_wv), (c_m, c_P)

    init = (jnp.zeros_like(h0_m), jnp.zeros_like(h0_v))
    init = (*init, jnp.zeros_like(w_m), jnp.zeros_like(w_v))
    (g_h0m, g_h0v, g_wm, g_wv), (ga_m, ga_v) = lax.scan(
        step, init, (prev_m, prev_P, M, gM, gP), reverse=True, unroll=unroll
    )
    ga_m, ga_v = jnp.swapaxes(ga_m, 0, 1), jnp.swapaxes(ga_v, 0, 1)
    return ga_m, ga_v, g_wm, g_wv, g_h0m, g_h0v


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def _time_major(x):
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), x)


def _scan(
    op,
    w: Gaussian,
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
    fuse: bool,
    where: str,
):
    check_backward(backward, where)
    a = as_gaussian(a, f"{where} input term")
    if a.ndim != 3:
        raise ValueError(f"{where}: expected the input term [N, T, H], got {a.shape}.")
    n, t, hdim = a.shape
    if isinstance(unroll, bool) or int(unroll) < 1:
        raise ValueError(f"{where}: unroll must be an integer >= 1, got {unroll!r}.")
    if w.mean.shape[-1] != hdim or jnp.shape(w.var) != w.mean.shape:
        raise ValueError(
            f"{where}: recurrent weight moments {w.mean.shape} / {jnp.shape(w.var)}"
            f" do not match the {hdim} hidden units of the input term {a.shape}."
        )
    h = Gaussian.point(jnp.zeros((n, hdim), a.dtype)) if h0 is None else h0
    h = as_gaussian(h, f"{where} h0")
    h = Gaussian(h.mean.astype(a.dtype), h.var.astype(a.dtype))  # carry dtype
    if h.shape != (n, hdim):
        raise ValueError(f"{where}: h0 must be [N, H] = {(n, hdim)}, got {h.shape}.")
    w = Gaussian(jnp.asarray(w.mean, a.dtype), jnp.asarray(w.var, a.dtype))
    if (
        fuse
        and backward != "autodiff"
        and mode == "linearized"
        and activation in _GAIN_FROM_OUTPUT
        and observations is None
        and state_delta is None
    ):
        fixed = backward == "bp_fixed_noise"
        M, P = _fused_scan(
            op,
            activation,
            fixed,
            int(unroll),
            a.mean,
            a.var,
            w.mean,
            w.var,
            h.mean,
            h.var,
        )
        return Gaussian(M, P), None
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
        pre = add(inp["a"], bilinear_moments(op, h, w.mean, w.var, backward=backward))
        h = _activation(activation, pre, mode=mode, backward=backward)
        out = {}
        if "z" in inp:
            h, out["ll"] = kalman_update(h, inp["z"], r)
        if "delta" in inp:
            h = perturb(h, inp["delta"])
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
    fuse: bool = True,
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
      fuse: with a BP backward rule, linearised mode, an activation in
        :data:`FUSED_ACTIVATIONS` and neither observations nor state_delta,
        run BP through time as one custom VJP over the sequence, which stores
        only the states ``(m_t, P_t)`` (2 arrays ``[N, H]`` per step); the
        per-op rules also store each step's gain (3 arrays).  Same gradients
        (tested to 1e-12 in float64).  ``False``: the per-op path always.

    Returns:
      ``(states, log_lik)``: filtered states ``Gaussian [N, T, H]`` and, with
      observations, the per-element predictive log-likelihoods ``[N, T, H]``
      (``None`` otherwise).
    """
    u = Gaussian(jnp.asarray(u_mean), jnp.asarray(u_var))
    if u.ndim != 1:
        raise ValueError(f"indrnn: u_mean/u_var must be [H], got {u.shape}.")
    return _scan(
        jnp.multiply,
        u,
        a,
        h0=h0,
        activation=activation,
        mode=mode,
        backward=backward,
        observations=observations,
        noise_var=noise_var,
        state_delta=state_delta,
        unroll=unroll,
        fuse=fuse,
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
    fuse: bool = True,
) -> tuple[Gaussian, Array | None]:
    """Simple recurrent network moments ``h_t = f(a_t + h_{t-1} U)``.

    ``w_mean``, ``w_var``: moments of ``U [H, H]``; the rest as :func:`indrnn`.
    The recurrent product is the rule of :func:`dualflow.moments.dense`, which
    keeps the diagonal of the state covariance only (mean-field).
    """
    w_mean, w_var = jnp.asarray(w_mean), jnp.asarray(w_var)
    if w_mean.ndim != 2 or w_mean.shape[0] != w_mean.shape[1]:
        raise ValueError(f"simple_rnn: U must be [H, H], got {w_mean.shape}.")
    return _scan(
        _matmul,
        Gaussian(w_mean, w_var),
        a,
        h0=h0,
        activation=activation,
        mode=mode,
        backward=backward,
        observations=observations,
        noise_var=noise_var,
        state_delta=state_delta,
        unroll=unroll,
        fuse=fuse,
        where="simple_rnn",
    )
