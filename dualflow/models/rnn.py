"""Deep recurrent networks: plain and residual IndRNN / SRN stacks.

``SequenceNet`` maps ``x [N, T, D]`` to a label head ``[N, K]`` (the last
state through a dense layer, ``head="last"``) or to a sequence head
``[N, T, K]`` (the dense layer applied at every step, ``head="sequence"``).
Under every learning method of :class:`~dualflow.nn.Method`; dropout between
recurrent layers is the chain-graph paper's auxiliary Bernoulli node
(marginalised under ``bp``), PCFF is the recurrent layers' ``pcff_rate``.

The residual variant follows the deep IndRNN of Li et al. (2019) without
batch normalisation (the BP networks are normalisation-free): an input
layer, then ``depth - 1`` recurrent layers grouped in residual blocks of two,
each block ending in a learned gain initialised at ``residual_gain``
(SkipInit) so the stack starts close to the identity.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dualflow.nn.context import Context
from dualflow.nn.layers import Dense, Dropout, Gain, Residual, Sequential
from dualflow.nn.recurrent import IndRNN, LastStep, SimpleRNN

__all__ = ["CELLS", "SequenceNet"]

CELLS = {"indrnn": IndRNN, "srn": SimpleRNN}


class SequenceNet(nnx.Module):
    """Stack of recurrent layers and a dense head.

    Args:
      in_features: ``D`` of the input ``[N, T, D]``.
      num_outputs: ``K`` of the head.
      hidden: units per recurrent layer.
      depth: number of recurrent layers (>= 1).
      cell: ``"indrnn"`` or ``"srn"``.
      residual: residual blocks of two layers after the first (``depth`` odd).
      residual_gain: initial value of each block's gain.
      head: ``"last"`` (sequence to label, ``[N, K]``) or ``"sequence"``
        (sequence to sequence, ``[N, T, K]``).
      dropout: rate of a :class:`~dualflow.nn.Dropout` (0: none) after every
        recurrent layer whose output feeds another layer directly: every layer
        of a plain stack; in a residual stack the input layer and the first
        layer of each block (the block's output joins the skip path).
      **cell_kw: passed to every recurrent layer (``activation``,
        ``recurrent_bound``, ``pcff_rate``, ``init_var``, ``prior_var``, ...;
        not ``return_sequences``: the stack always passes sequences on).
    """

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        *,
        hidden: int = 128,
        depth: int = 2,
        cell: str = "indrnn",
        residual: bool = False,
        residual_gain: float = 0.0,
        head: str = "last",
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        **cell_kw,
    ):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}.")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        if residual and depth % 2 == 0:
            raise ValueError(
                f"residual stacks are one input layer plus blocks of two: depth must"
                f" be odd, got {depth}."
            )
        if "return_sequences" in cell_kw:
            raise ValueError(
                "SequenceNet: return_sequences is set by the stack (layers pass"
                " sequences on; head='last' takes the last step): drop it."
            )
        if head not in ("last", "sequence"):
            raise ValueError(f"head must be 'last' or 'sequence', got {head!r}.")
        rnn = CELLS[cell]
        dtype = cell_kw.get("param_dtype", jnp.float32)

        def layer(d_in):
            return rnn(d_in, hidden, rngs=rngs, **cell_kw)

        def drop():
            return [Dropout(dropout)] if dropout > 0 else []

        layers = [layer(in_features), *drop()]
        if residual:
            for _ in range((depth - 1) // 2):
                block = Sequential(
                    layer(hidden),
                    *drop(),
                    layer(hidden),
                    Gain(residual_gain, param_dtype=dtype),
                )
                layers.append(Residual(block))
        else:
            for _ in range(depth - 1):
                layers += [layer(hidden), *drop()]
        if head == "last":
            layers.append(LastStep())
        layers.append(
            Dense(hidden, num_outputs, mean_init="lecun", param_dtype=dtype, rngs=rngs)
        )
        self.net = Sequential(*layers)
        self.head = head

    def __call__(self, x, ctx: Context):
        return self.net(x, ctx)
