"""Learning methods and the per-call context that Bayesian layers read.

One model definition serves every method: each layer looks at
``ctx.method.name`` and either propagates Gaussian moments (``bp``), samples
weights / pre-activations (``reparam``, ``local_reparam``, ``flipout``), applies
dropout (``mc_dropout``) or uses the means (``deterministic``, ``ensemble``
members).
"""

from __future__ import annotations

import dataclasses

import jax

from dualflow.moments import BACKWARDS, MODES

__all__ = ["METHODS", "SAMPLING_METHODS", "Context", "Method"]

METHODS = (
    "bp",
    "reparam",
    "local_reparam",
    "flipout",
    "deterministic",
    "ensemble",
    "mc_dropout",
)
# methods whose forward pass is random (predictions average samples)
SAMPLING_METHODS = ("reparam", "local_reparam", "flipout", "mc_dropout")
# methods with a variational posterior over weights (KL term in the loss)
VARIATIONAL_METHODS = ("bp", "reparam", "local_reparam", "flipout")


@dataclasses.dataclass(frozen=True)
class Method:
    """How a model is trained and evaluated (hashable: usable as a jit static).

    Attributes:
      name: one of :data:`METHODS`.
      mode: activation moments for ``bp``: ``"linearized"`` (Algorithm 1) or
        ``"matched"``.
      backward: backward rule of the moment ops for ``bp``: ``"bp"`` (default),
        ``"autodiff"`` or ``"bp_fixed_noise"``.
      num_samples: weight samples averaged per mini-batch when training a
        sampling method (``K`` of Bayes-by-backprop).
      dropout_rate: drop probability of ``mc_dropout`` (inputs of every
        weight layer that allows it).
      ensemble_size: members ``M`` of ``ensemble``.
      member: how each ensemble member is trained (``"deterministic"`` by
        default; any non-ensemble method).
    """

    name: str = "bp"
    mode: str = "linearized"
    backward: str = "bp"
    num_samples: int = 1
    dropout_rate: float = 0.1
    ensemble_size: int = 5
    member: str = "deterministic"

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"method {self.name!r} is not one of {METHODS}.")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}.")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward {self.backward!r} is not one of {BACKWARDS}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"dropout_rate must be in [0, 1), got {self.dropout_rate}."
            )
        if self.member not in METHODS or self.member == "ensemble":
            raise ValueError(
                f"ensemble member method {self.member!r} must be one of"
                f" {[m for m in METHODS if m != 'ensemble']}."
            )
        if self.name == "ensemble" and self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}.")

    @property
    def layer_method(self) -> str:
        """The method individual layers run (ensemble members run ``member``)."""
        return self.member if self.name == "ensemble" else self.name

    @property
    def is_variational(self) -> bool:
        return self.layer_method in VARIATIONAL_METHODS

    @property
    def is_sampling(self) -> bool:
        return self.layer_method in SAMPLING_METHODS


class Context:
    """Per-forward-pass state: the method, train/eval flag and a key stream.

    ``next_key()`` returns ``fold_in(key, i)`` for the i-th request in call
    order, so every layer gets its own key and the pass is a pure function of
    ``key`` (layers are called in a fixed order under tracing).
    """

    def __init__(self, method: Method, key: jax.Array | None = None, *, train=False):
        self.method = method
        self.train = bool(train)
        self._key = key
        self._count = 0
        # set by dualflow.nn.hidden_state_posterior: recurrent layers add a zero
        # perturbation to their filtered states and record them (bp only)
        self.state_taps = None

    @property
    def name(self) -> str:
        return self.method.layer_method

    def next_key(self) -> jax.Array:
        if self._key is None:
            raise ValueError(
                f"method {self.name!r} samples during the forward pass: pass a PRNG"
                " key (e.g. jax.random.key(0)) to the model call."
            )
        self._count += 1
        return jax.random.fold_in(self._key, self._count)
