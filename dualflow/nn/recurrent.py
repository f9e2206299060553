"""Recurrent layers with Bayesian weights: IndRNN and the simple recurrent network.

Both map a sequence ``x [N, T, D]`` to hidden states ``[N, T, H]`` (or the
last state ``[N, H]``) with ``lax.scan`` over time::

    IndRNN:     h_t = f(W x_t + b + u ⊙ h_{t-1})     u: [H]   (element-wise)
    SimpleRNN:  h_t = f(W x_t + b + h_{t-1} U)        U: [H, H] (dense)

The chain-graph paper (Sec. 4.2) derives both: the SRN from dense pairwise
connections between ``X^{l,t-1}`` and ``X^{l,t}``, the IndRNN (Li et al. 2018)
from additionally assuming that each node depends through time only on its
own past, ``P(X_i^{l,t} | X^{l-1,t}, X_i^{l,t-1})``.

Every learning method of :class:`~dualflow.nn.Method` runs the same layer:

* ``bp``: a Gaussian hidden state is carried through the scan.  The input
  term ``W x_t + b`` is :func:`dualflow.moments.dense` for all steps at once;
  the recurrent term is :func:`dualflow.moments.multiply` (IndRNN: the
  product of two independent Gaussians ``u`` and ``h_{t-1}``) or
  :func:`dualflow.moments.dense` (SRN), and ``f`` is the moment activation.
  Reverse mode through the scan uses the ops' custom VJPs, so the backward
  pass *is* belief propagation through time.  Approximation: like every
  moment op, each step treats its inputs as independent -- the same ``W`` /
  ``u`` enters every step, so the noise they contribute is in truth
  correlated across time; that correlation is dropped (it is exact when the
  weights are points, see :func:`dualflow.pgm.kalman_filter` and the
  sequence-duality tests).
* ``reparam``: one sample of ``W, b, u`` per call, shared by all steps.
* ``local_reparam``: every pre-activation drawn from its Gaussian given the
  (sampled) state, independently per example and step.
* ``flipout``: one shared perturbation of ``W`` and ``u``, decorrelated
  across sequences by random signs drawn once per sequence (not per step, so
  every sequence sees one effective weight).
* ``mc_dropout``: the weight means, with the inputs of both weights dropped
  by one mask per sequence, shared by all steps (Gal & Ghahramani's
  variational RNN dropout): ``x_t`` before ``W`` and ``h_{t-1}`` before ``u`` /
  ``U``.  ``deterministic`` / ensemble members: the means.
* ``pcff_rate > 0`` (point methods, training only): the activation is
  partially collapsed feed-forward (:func:`dualflow.chain.pcff`) at every
  step, each node sampled with probability ``pcff_rate``.

``recurrent_bound`` keeps ``|u|`` (IndRNN) within a bound, the IndRNN
constraint that lets a ReLU IndRNN keep long-range memory without exploding
(Li et al. 2018 use ``2^(1/T)``, and ``u >= 0`` initial values in ``[0, 1]``):
the forward clips the mean (and, under ``reparam`` / ``flipout``, the sampled
``u`` each sequence uses: a sample beyond the bound would make a ReLU state
grow like ``|u|^T``), and :func:`constrain_recurrent` projects the parameters
after an optimiser step so they do not drift past it.  ``local_reparam``
samples pre-activations, not ``u``, and ``bp`` propagates ``E[u^2] = m^2 + v``:
neither is clipped beyond the mean.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dualflow import moments
from dualflow.chain.nodes import NODES
from dualflow.gaussian import Gaussian, as_gaussian
from dualflow.nn.context import Context
from dualflow.nn.layers import _PLAIN, BayesianModule, Dense, _point, _safe_sqrt

Array = jax.Array

__all__ = ["IndRNN", "LastStep", "SimpleRNN", "constrain_recurrent"]


def _per_sequence(shape) -> tuple[int, ...]:
    """``[N, T, ..., D] -> [N, 1, ..., D]``: one draw per sequence and feature."""
    return (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)


class _SequenceDense(Dense):
    """The input projection ``W x_t + b`` of a recurrent layer.

    The sequence is the example: flipout's sign flips and ``mc_dropout``'s
    input mask are drawn once per sequence and feature and shared by all steps
    (one effective weight per sequence; Gal & Ghahramani's variational RNN
    dropout), not per step.
    """

    def _in_sign_shape(self, x):
        return _per_sequence(x.shape)

    def _out_sign_shape(self, y):
        return _per_sequence(y.shape)

    def _drop_shape(self, x):
        return _per_sequence(x.shape)


class _Recurrent(BayesianModule):
    """Shared scan of :class:`IndRNN` and :class:`SimpleRNN`.

    Subclasses define the recurrent map of a point state ``_rec(h, w)`` and its
    moment scan ``_moment_scan`` (:func:`dualflow.moments.indrnn` or
    :func:`dualflow.moments.simple_rnn`).
    """

    activation: str
    pcff_rate: float
    return_sequences: bool
    recurrent_bound: float | None
    unroll: int

    def _setup(
        self,
        in_features,
        hidden_features,
        *,
        activation,
        pcff_rate,
        return_sequences,
        unroll,
        use_bias,
        layer_kw,
        rngs,
    ):
        if activation not in _PLAIN:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_PLAIN)}."
            )
        if not 0.0 <= pcff_rate <= 1.0:
            raise ValueError(f"pcff_rate must be in [0, 1], got {pcff_rate}.")
        if pcff_rate > 0 and activation not in NODES:
            raise ValueError(
                f"pcff_rate > 0 samples the activation's node distribution, which"
                f" exists for {NODES}; got activation {activation!r}."
            )
        if isinstance(unroll, bool) or int(unroll) < 1:
            raise ValueError(f"unroll must be an integer >= 1, got {unroll!r}.")
        self.in_features, self.hidden_features = int(in_features), int(hidden_features)
        self.activation = activation
        self.pcff_rate = float(pcff_rate)
        self.return_sequences = bool(return_sequences)
        self.unroll = int(unroll)
        self.input = _SequenceDense(
            in_features, hidden_features, use_bias=use_bias, rngs=rngs, **layer_kw
        )

    # -- subclass hooks -------------------------------------------------
    def _rec(self, h: Array, w: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    _moment_scan = staticmethod(moments.indrnn)  # pure moment scan (subclasses)

    def _bound(self, w: Array) -> Array:
        if self.recurrent_bound is None:
            return w
        return jnp.clip(w, -self.recurrent_bound, self.recurrent_bound)

    def _recurrent_weights(self) -> tuple[Array, Array]:
        m, v = self.moments_of("recurrent")
        return self._bound(m), v

    # -- forward --------------------------------------------------------
    def __call__(self, x, ctx: Context, h0=None):
        """``x [N, T, D]`` (array or, under ``bp``, a Gaussian) -> ``[N, T, H]``
        (``[N, H]`` with ``return_sequences=False``).  ``h0 [N, H]``: initial
        state (default 0; a Gaussian under ``bp``)."""
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input [N, T, {self.in_features}],"
                f" got shape {tuple(x.shape)}."
            )
        n, t = x.shape[0], x.shape[1]
        a = self.input(x, ctx)  # W x_t + b for all steps at once: [N, T, H]
        wm, wv = self._recurrent_weights()
        if ctx.name == "bp":
            hs = self._scan_bp(a, wm, wv, ctx, h0, n)
        else:
            hs = self._scan_point(a, wm, wv, ctx, h0, n, t)
        return hs if self.return_sequences else hs[:, -1]

    def _h0(self, h0, n, dtype):
        if h0 is None:
            return jnp.zeros((n, self.hidden_features), dtype)
        return h0

    def _scan_bp(self, a, wm, wv, ctx, h0, n) -> Gaussian:
        if self.pcff_rate > 0:
            raise ValueError(
                f"{type(self).__name__}: pcff_rate > 0 has no Gaussian moment rule;"
                " build the layer with pcff_rate=0 for method 'bp'."
            )
        a = as_gaussian(a, f"{type(self).__name__} input term")
        taps = getattr(ctx, "state_taps", None)
        name, delta = (None, None) if taps is None else taps.request(a.shape, a.dtype)
        states, _ = self._moment_scan(
            a,
            wm,
            wv,
            h0=h0,
            activation=self.activation,
            mode=ctx.method.mode,
            backward=ctx.method.backward,
            state_delta=delta,
            unroll=self.unroll,
        )
        if taps is not None:
            taps.filtered[name] = states
        return states

    def _act(self, pre: Array, key: Array | None) -> Array:
        if key is not None:
            from dualflow.chain.pcff import pcff  # chain.pcff imports dualflow.nn

            return pcff(self.activation, pre, key, self.pcff_rate)
        if self.activation == "leaky_relu":
            return jax.nn.leaky_relu(pre)
        return _PLAIN[self.activation](pre)

    def _scan_point(self, a, wm, wv, ctx, h0, n, t) -> Array:
        name = ctx.name
        a = _point(a, type(self).__name__, wm.dtype)
        h = jnp.asarray(self._h0(h0, n, a.dtype), a.dtype)
        xs: dict[str, Array] = {"a": jnp.swapaxes(a, 0, 1)}
        w = wm
        sign = dw = mask = None
        if name == "reparam":
            eps = jax.random.normal(ctx.next_key(), wm.shape, wm.dtype)
            w = self._bound(wm + _safe_sqrt(wv) * eps)
        elif name == "local_reparam":
            xs["eps"] = jax.random.normal(ctx.next_key(), (t, *h.shape), h.dtype)
        elif name == "flipout":
            kw, ks, kr = jax.random.split(ctx.next_key(), 3)
            dw = _safe_sqrt(wv) * jax.random.normal(kw, wm.shape, wm.dtype)
            sign = (
                jax.random.rademacher(ks, h.shape, h.dtype),
                jax.random.rademacher(kr, h.shape, h.dtype),
            )
            if self.recurrent_bound is not None:  # IndRNN: u per sequence, bounded
                w, dw = self._bound(wm + dw * sign[0] * sign[1]), None
        elif name == "mc_dropout" and self.input.dropout_inputs:
            # the recurrent weight's input h_{t-1}: one mask per sequence
            rate = ctx.method.dropout_rate
            keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, h.shape)
            mask = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(h.dtype)
        if ctx.train and self.pcff_rate > 0:
            xs["key"] = jax.random.split(ctx.next_key(), t)

        def step(h, inp):
            if mask is not None:  # mc_dropout: the input of the recurrent weight
                h = h * mask
            pre = inp["a"] + self._rec(h, w)
            if "eps" in inp:
                pre = pre + _safe_sqrt(self._rec(h * h, wv)) * inp["eps"]
            if dw is not None:
                pre = pre + self._rec(h * sign[0], dw) * sign[1]
            h = self._act(pre, inp.get("key"))
            return h, h

        _, hs = jax.lax.scan(step, h, xs, unroll=self.unroll)
        return jnp.swapaxes(hs, 0, 1)


class IndRNN(_Recurrent):
    """Independently recurrent layer ``h_t = f(W x_t + b + u ⊙ h_{t-1})``.

    Shapes: ``x [N, T, in_features] -> [N, T, hidden_features]`` (or
    ``[N, hidden_features]`` with ``return_sequences=False``).

    Args:
      in_features, hidden_features: sizes.
      activation: ``f`` (any :class:`~dualflow.nn.Activation` name; ReLU by
        default, as in the IndRNN papers).
      recurrent_init: ``(low, high)``: the means of ``u`` start uniform in it.
      recurrent_bound: ``|u| <= bound`` (``None``: unconstrained); for a
        sequence of length ``T`` the IndRNN papers use ``2 ** (1 / T)``.  The
        forward clips the mean of ``u``; the KL reads the stored parameter, so
        call :func:`constrain_recurrent` after each update to keep them equal.
      recurrent_init_var, recurrent_prior_var: variance of ``u`` at
        initialisation and under the prior (``u`` has fan-in 1, so they are
        not rescaled).
      pcff_rate: PCFF sampling rate of the activation (point methods, training).
      return_sequences: all states (default) or the last one.
      unroll: ``lax.scan`` unroll factor.
      **layer_kw: ``init_var``, ``prior_var``, ``var_scaling``, ``mean_init``,
        ``dropout_inputs``, ``param_dtype`` of the input projection
        (a :class:`~dualflow.nn.Dense`).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        activation: str = "relu",
        recurrent_init: tuple[float, float] = (0.0, 1.0),
        recurrent_bound: float | None = None,
        recurrent_init_var: float = 1e-3,
        recurrent_prior_var: float = 1.0,
        pcff_rate: float = 0.0,
        return_sequences: bool = True,
        unroll: int = 1,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kw,
    ):
        self.param_dtype = param_dtype
        self._setup(
            in_features,
            hidden_features,
            activation=activation,
            pcff_rate=pcff_rate,
            return_sequences=return_sequences,
            unroll=unroll,
            use_bias=use_bias,
            layer_kw=dict(layer_kw, param_dtype=param_dtype),
            rngs=rngs,
        )
        if recurrent_bound is not None and not recurrent_bound > 0:
            raise ValueError(f"recurrent_bound must be > 0, got {recurrent_bound}.")
        self.recurrent_bound = (
            None if recurrent_bound is None else float(recurrent_bound)
        )
        lo, hi = (float(v) for v in recurrent_init)
        self._init_weights(
            None,
            "recurrent",
            (hidden_features,),
            1,
            mean_std=0.0,
            zero_mean=True,
            init_var=recurrent_init_var,
            prior_var=recurrent_prior_var,
            var_scaling="none",
        )
        u = jax.random.uniform(rngs.params(), (hidden_features,), param_dtype, lo, hi)
        if self.recurrent_bound is not None:
            u = jnp.clip(u, -self.recurrent_bound, self.recurrent_bound)
        self.recurrent_mean = nnx.Param(u)

    def _rec(self, h, w):
        return h * w

    _moment_scan = staticmethod(moments.indrnn)


class SimpleRNN(_Recurrent):
    """Simple recurrent (Elman) layer ``h_t = f(W x_t + b + h_{t-1} U)``.

    Shapes as :class:`IndRNN`; ``U [H, H]`` is a mean-field Gaussian weight
    with fan-in ``H`` (means ``recurrent_gain * orthogonal``).  ``tanh`` by
    default.  Other arguments as :class:`IndRNN`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        activation: str = "tanh",
        recurrent_gain: float = 1.0,
        pcff_rate: float = 0.0,
        return_sequences: bool = True,
        unroll: int = 1,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kw,
    ):
        self.param_dtype = param_dtype
        self._setup(
            in_features,
            hidden_features,
            activation=activation,
            pcff_rate=pcff_rate,
            return_sequences=return_sequences,
            unroll=unroll,
            use_bias=use_bias,
            layer_kw=dict(layer_kw, param_dtype=param_dtype),
            rngs=rngs,
        )
        self.recurrent_bound = None
        kw = {
            k: layer_kw[k]
            for k in ("init_var", "prior_var", "var_scaling")
            if k in layer_kw
        }
        self._init_weights(
            None,
            "recurrent",
            (hidden_features, hidden_features),
            hidden_features,
            mean_std=0.0,
            zero_mean=True,
            **{"init_var": 1e-3, "prior_var": 1.0, "var_scaling": "fan_in", **kw},
        )
        q = jax.nn.initializers.orthogonal(scale=float(recurrent_gain))(
            rngs.params(), (hidden_features, hidden_features), param_dtype
        )
        self.recurrent_mean = nnx.Param(q)

    def _rec(self, h, w):
        return h @ w

    _moment_scan = staticmethod(moments.simple_rnn)


class LastStep(nnx.Module):
    """``[N, T, ...] -> [N, ...]``: the last time step (sequence-to-label heads)."""

    def __call__(self, x, ctx: Context):
        if x.ndim < 2:
            raise ValueError(f"LastStep: expected [N, T, ...], got shape {x.shape}.")
        return x[:, -1]


def constrain_recurrent(model) -> None:
    """Project every bounded IndRNN's ``u`` means into ``[-bound, bound]`` in place.

    Call it after each optimiser update (the IndRNN papers' weight clipping);
    the forward already clips, so this only stops the parameters drifting.
    """
    for _, m in nnx.iter_modules(model):
        if isinstance(m, IndRNN) and m.recurrent_bound is not None:
            b = m.recurrent_bound
            m.recurrent_mean[...] = jnp.clip(m.recurrent_mean[...], -b, b)


def default_bound(seq_len: int) -> float:
    """The IndRNN papers' ReLU bound ``2 ** (1 / T)`` for sequences of length ``T``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    return math.pow(2.0, 1.0 / seq_len)


class _StateTaps:
    """Zero perturbations of recurrent states, one per bp recurrent layer call."""

    def __init__(self, deltas: dict[str, Gaussian] | None = None):
        self.deltas = deltas
        self.filtered: dict[str, Gaussian] = {}
        self._count = 0

    def request(self, shape, dtype) -> tuple[str, Gaussian]:
        name = f"rnn{self._count}"
        self._count += 1
        if self.deltas is None:
            zero = jnp.zeros(shape, dtype)
            return name, Gaussian(zero, zero)
        return name, self.deltas[name]


def hidden_state_posterior(
    model,
    x,
    y,
    *,
    method,
    likelihood=None,
):
    """Filtered and smoothed hidden-state moments of every recurrent layer.

    The sequence analogue of :func:`dualflow.smoothing.posterior_moments`:
    each bp recurrent layer (call order ``"rnn0"``, ``"rnn1"``, ...) adds a
    zero perturbation to its filtered state at every step *inside* the scan,
    so the gradient of ``J = sum_n NLL(y_n)`` w.r.t. it is the total
    derivative through all later steps (Theorem 3 of "Duality of information
    flow").  The smoothed moments follow from
    :func:`dualflow.smoothing.smoothed_moments`; they are the exact
    ``p(h_t | y)`` marginals for a Gaussian-linear IndRNN (identity
    activation, point recurrent weights) and otherwise the posterior implied
    by the backward rule in use (``method.backward``).

    Args:
      model: an ``nnx`` model called as ``model(x, ctx)``.
      x, y: inputs ``[N, T, D]`` and targets (as for :func:`dualflow.nn.objective`).
      method: a ``bp`` :class:`~dualflow.nn.Method`.
      likelihood: :class:`~dualflow.nn.Likelihood` (default categorical).

    Returns:
      :class:`dualflow.smoothing.DualityResult` with dicts keyed by layer
      name: ``filtered`` / ``smoothed`` ``Gaussian [N, T, H]`` and ``grads``.
    """
    from dualflow.nn.methods import Likelihood, _nll
    from dualflow.smoothing import DualityResult, smoothed_moments

    if method.name != "bp":
        raise ValueError(
            f"hidden_state_posterior needs Method('bp'), got {method.name!r}: only"
            " moment propagation has filtered states to smooth (for an ensemble,"
            " call it on each member)."
        )
    likelihood = Likelihood() if likelihood is None else likelihood

    def run(deltas):
        ctx = Context(method, train=False)
        ctx.state_taps = taps = _StateTaps(deltas)
        out = model(x, ctx)
        return _nll(model, out, y, method, likelihood).sum(), taps.filtered

    _, shapes = jax.eval_shape(lambda: run(None))
    if not shapes:
        raise ValueError("hidden_state_posterior: the model has no recurrent layer.")
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, filtered), grads = jax.value_and_grad(run, has_aux=True)(zeros)
    smoothed = {k: smoothed_moments(filtered[k], grads[k]) for k in filtered}
    return DualityResult(loss, filtered, smoothed, grads)
