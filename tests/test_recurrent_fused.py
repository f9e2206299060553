"""BP through time as one custom VJP over the sequence (moments.indrnn /
simple_rnn, ``fuse=True``) equals the per-op BP rules step by step: same
outputs and gradients (float64), while storing only the states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualflow import Gaussian, moments
from dualflow.moments.recurrent import FUSED_ACTIVATIONS


def _case(cell, seed, N=3, T=6, H=4):
    rng = np.random.default_rng(seed)
    a = Gaussian(
        jnp.asarray(rng.normal(size=(N, T, H))),
        jnp.asarray(rng.uniform(0.01, 0.3, (N, T, H))),
    )
    if cell == "indrnn":
        w = (rng.uniform(-1.1, 1.1, H), rng.uniform(0.01, 0.2, H))
    else:
        w = (rng.normal(size=(H, H)) / 2, rng.uniform(0.01, 0.1, (H, H)))
    h0 = Gaussian(
        jnp.asarray(rng.normal(size=(N, H))), jnp.asarray(rng.uniform(0.1, 0.5, (N, H)))
    )
    c = (
        jnp.asarray(rng.normal(size=(N, T, H))),
        jnp.asarray(rng.normal(size=(N, T, H))),
    )
    return a, tuple(map(jnp.asarray, w)), h0, c


CASES = [("indrnn", act, "bp") for act in FUSED_ACTIVATIONS] + [
    ("srn", act, "bp") for act in FUSED_ACTIVATIONS
]
CASES += [("indrnn", "relu", "bp_fixed_noise"), ("srn", "tanh", "bp_fixed_noise")]


@pytest.mark.parametrize(("cell", "act", "backward"), CASES)
def test_fused_bptt_equals_per_op_rules(cell, act, backward, x64):
    a, w, h0, (c1, c2) = _case(cell, 0)
    fn = moments.indrnn if cell == "indrnn" else moments.simple_rnn

    def loss(p, fuse):
        out, _ = fn(
            Gaussian(p[0], p[1]),
            p[2],
            p[3],
            h0=Gaussian(p[4], p[5]),
            activation=act,
            backward=backward,
            fuse=fuse,
        )
        return jnp.sum(c1 * out.mean) + jnp.sum(c2 * out.var), out

    p = (a.mean, a.var, *w, h0.mean, h0.var)
    (_, fused), g_fused = jax.value_and_grad(loss, has_aux=True)(p, True)
    (_, per_op), g_per_op = jax.value_and_grad(loss, has_aux=True)(p, False)
    np.testing.assert_allclose(fused.mean, per_op.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fused.var, per_op.var, rtol=1e-13, atol=1e-15)
    for got, want in zip(g_fused, g_per_op, strict=True):
        scale = float(jnp.abs(want).max())
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale)


def test_fused_path_is_taken_and_stores_two_arrays_per_step():
    """The fused rule's residuals are the states (m_t, P_t) [N, T, H] and the
    weights/h0 -- nothing else of size T."""
    a, w, h0, _ = _case("indrnn", 1, N=2, T=7, H=3)
    a = jax.tree.map(lambda v: v.astype(jnp.float32), a)
    w = tuple(v.astype(jnp.float32) for v in w)

    def loss(w0, fuse):
        out, _ = moments.indrnn(a, w0, w[1], activation="relu", fuse=fuse)
        return out.mean.sum() + out.var.sum()

    for fuse, expected in ((True, 2), (False, 3)):
        _, vjp = jax.vjp(lambda w0, f=fuse: loss(w0, f), w[0])
        # per-op: stacked by the scan [T, N, H]; fused: the states [N, T, H]
        stacked = [x for x in jax.tree.leaves(vjp) if x.shape in ((7, 2, 3), (2, 7, 3))]
        assert len(stacked) == expected, (fuse, [x.shape for x in jax.tree.leaves(vjp)])


def test_not_fused_when_the_rule_cannot_rebuild_the_gain(x64):
    """matched mode / gelu / observations / state_delta use the per-op path;
    fuse has no effect there (identical gradients)."""
    a, w, h0, (c1, _) = _case("indrnn", 2)
    cases = [
        dict(activation="relu", mode="matched"),
        dict(activation="gelu"),
        dict(activation="identity", observations=c1, noise_var=0.5),
    ]
    for kw in cases:

        def loss(u, fuse, kw=kw):
            out, ll = moments.indrnn(a, u, w[1], h0=h0, fuse=fuse, **kw)
            return out.mean.sum() + (0.0 if ll is None else ll.sum())

        g1 = jax.grad(loss)(w[0], True)
        g2 = jax.grad(loss)(w[0], False)
        np.testing.assert_array_equal(g1, g2)
