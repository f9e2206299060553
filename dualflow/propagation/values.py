"""Values the `propagate` interpreter carries between jaxpr equations.

Three kinds of value flow through an interpreted jaxpr:

* plain arrays: values that do not depend on any Gaussian input; they are
  computed exactly as the traced function computes them;
* :class:`Node`: a *materialised* element-wise Gaussian belief (mean and
  variance arrays) with its provenance (which other nodes it was derived
  from, and which nodes it is a reduction statistic of);
* :class:`Lazy`: a pending element-wise function ``f(a)`` of one node ``a``.
  Element-wise equations applied to values of one node are composed into
  ``f`` instead of being evaluated one by one, so that a subgraph such as
  ``h * sigmoid(h)`` or ``x + relu(x)`` is moment-matched as one scalar
  function of ``h`` (the dependence between its parts is kept exactly).

Provenance drives the two dependence rules of the transform (see
``docs/propagate.md``): values of one node fuse; a reduction statistic of a
node that meets that node (or one of its ancestors) element-wise again is a
normaliser and is held at its mean.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np

from dualflow.gaussian import Gaussian

Array = jax.Array

__all__ = ["Lazy", "Node", "NonFloatRandomError", "Op", "Program", "Ref", "is_random"]


class NonFloatRandomError(TypeError):
    """A boolean/integer value depends on a Gaussian and must be materialised."""

_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Node:
    """A materialised Gaussian belief inside the interpreter.

    Attributes:
      g: the belief (``mean``, ``var`` of one shape and floating dtype).
      id: unique integer (per process).
      ancestors: ids of every node this one was derived from, itself included.
      stat_of: ids of nodes this value is a reduction statistic of (empty for
        values that are not statistics).
      same_value: ids of the nodes this one is an element-wise function,
        reshape or broadcast of (itself included): "the same value" for the
        normaliser rule.
      sum_of: for a ``reduce_sum`` (possibly broadcast back), the id of the node
        it sums (the ratio-to-own-sum rule of softmax).
    """

    g: Gaussian
    id: int
    ancestors: frozenset
    stat_of: frozenset
    same_value: frozenset = frozenset()
    sum_of: int | None = None  # id of the node this is a (broadcast) sum of

    @classmethod
    def new(
        cls, g: Gaussian, parents=(), stat_of=frozenset(), same_of=None
    ) -> Node:
        """A node derived from ``parents``; ``same_of``: the parent this one is
        an element-wise function, reshape or broadcast of (if any)."""
        i = next(_ids)
        anc = frozenset({i}).union(*(p.ancestors for p in parents))
        same = frozenset({i})
        if same_of is not None:
            same = same | same_of.same_value
        return cls(g, i, anc, frozenset(stat_of), same)

    @property
    def shape(self):
        return self.g.mean.shape

    @property
    def dtype(self):
        return self.g.mean.dtype


# A reference inside an element-wise program: ("a",) the source node's value,
# ("c", k) the k-th constant, ("v", j) the j-th op's output, ("lit", x) a literal.
Ref = tuple


@dataclasses.dataclass(frozen=True)
class Op:
    """One element-wise equation of a program: ``prim.bind(*refs, **params)``."""

    prim: Any
    params: tuple  # sorted (name, value) items
    refs: tuple[Ref, ...]

    @property
    def param_dict(self) -> dict:
        return dict(self.params)


@dataclasses.dataclass(frozen=True)
class Program:
    """An element-wise function of one source value and some constants."""

    ops: tuple[Op, ...] = ()
    out: Ref = ("a",)

    @property
    def is_identity(self) -> bool:
        return self.out == ("a",)


@dataclasses.dataclass(eq=False)
class Lazy:
    """``f(src)`` for an element-wise program ``f`` (not yet moment-matched).

    ``consts`` are plain arrays the program reads; ``shape``/``dtype`` are those
    of the program's output (constants may broadcast the source).
    """

    src: Node
    prog: Program
    consts: tuple
    shape: tuple
    dtype: Any
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def ancestors(self) -> frozenset:
        return self.src.ancestors

    @property
    def stat_of(self) -> frozenset:
        return self.src.stat_of

    @property
    def same_value(self) -> frozenset:
        return self.src.same_value


def is_random(x) -> bool:
    """Whether an interpreter value depends on a Gaussian input."""
    return isinstance(x, Node | Lazy)


def lazy_of(node: Node) -> Lazy:
    """The identity program of ``node``."""
    return Lazy(node, Program(), (), tuple(node.shape), node.dtype)


def is_float_dtype(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)
