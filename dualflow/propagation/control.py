"""Call-like and control-flow primitives for :func:`dualflow.propagate`.

* ``jit``/``pjit``, ``closed_call``, ``core_call``: the body is interpreted in
  place (inlined; the surrounding ``jit`` compiles it anyway).
  ``jax.nn.softmax`` / ``log_softmax`` bodies get the linearised vector rule
  of :func:`dualflow.propagation.rules.softmax_moments`.
* ``custom_jvp_call`` (``jax.nn.relu``, ``softplus``...): when its operands are
  one Gaussian value and deterministic values and its body is element-wise,
  it joins the element-wise program as one operation, so forward-mode
  derivatives use its custom JVP (``relu'(0) = 0``) and ``mode="matched"``
  analyses its body (``max(x, 0)`` -> the ReLU closed form).  Otherwise the
  body is interpreted.
* ``custom_vjp_call``: the forward body is interpreted; the user's backward
  rule is replaced by BP (or autodiff) through the moments.
* ``remat``/``checkpoint``: the body is interpreted under ``jax.checkpoint``
  with the same policy, so rematerialisation is kept.
* ``scan`` (``lax.scan``, ``fori_loop`` with static bounds), ``while``
  (``while_loop``): carries that depend on a Gaussian are carried as
  ``Gaussian`` pytrees; a loop condition that depends on one raises.
* ``cond`` (``lax.cond``/``switch``): the branch index must be deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dualflow.gaussian import Gaussian
from dualflow.propagation import elementwise as ew
from dualflow.propagation.interpreter import (
    GaussianDependentControlFlowError,
    Interpreter,
    builtin,
)
from dualflow.propagation.rules import softmax_axes, softmax_moments
from dualflow.propagation.values import Lazy, Node, is_random, lazy_of

__all__ = ["random_outputs"]


def _body(params):
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if k in params:
            return params[k]
    raise KeyError("no body jaxpr")


def _is_elementwise_body(closed) -> bool:
    jaxpr = getattr(closed, "jaxpr", closed)
    if len(jaxpr.outvars) != 1:
        return False
    for e in jaxpr.eqns:
        n = e.primitive.name
        if n in ew.ELEMENTWISE:
            continue
        if n in ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call"):
            if _is_elementwise_body(_body(e.params)):
                continue
        return False
    return True


@builtin("jit", "pjit", "closed_call", "core_call", "custom_vjp_call")
def _call(interp: Interpreter, eqn, invals):
    """Interpret the body in place (see module doc)."""
    body = _body(eqn.params)
    name = eqn.params.get("name")
    rand = [x for x in invals if is_random(x)]
    if name in ("softmax", "log_softmax") and len(invals) == 1 and rand:
        axes = softmax_axes(body)
        if axes is not None:
            g = softmax_moments(interp.gaussian(invals[0]), axes, name == "log_softmax")
            return [interp.new(g, rand)]
    return interp.eval_closed(body, invals)


@builtin("custom_jvp_call")
def _custom_jvp(interp: Interpreter, eqn, invals):
    """Fuse as one element-wise operation when possible (module doc)."""
    body = eqn.params["call_jaxpr"]
    srcs = {id(x.src if isinstance(x, Lazy) else x) for x in invals if is_random(x)}
    if len(srcs) == 1 and _is_elementwise_body(body):
        aval = eqn.outvars[0].aval
        vals = [lazy_of(x) if isinstance(x, Node) else x for x in invals]
        return [ew.fuse(eqn.primitive, eqn.params, vals, aval.shape, aval.dtype)]
    return interp.eval_closed(body, invals)


def _boundary(interp: Interpreter, vals):
    """Random values -> `Gaussian` pytrees (for crossing a JAX transform)."""
    return [interp.gaussian(v) if is_random(v) else v for v in vals]


def _inside(vals):
    """`Gaussian` pytrees -> fresh nodes (inside a JAX transform's body)."""
    return [Node.new(v) if isinstance(v, Gaussian) else v for v in vals]


@builtin("remat2", "checkpoint", "remat")
def _remat(interp: Interpreter, eqn, invals):
    """Interpret the body under ``jax.checkpoint`` with the same policy."""
    body = eqn.params["jaxpr"]
    mode, backward = interp.mode, interp.backward

    def fn(*args):
        sub = Interpreter(mode, backward)
        outs = sub.eval_closed(body, _inside(args))
        return _boundary(sub, outs)

    ck = jax.checkpoint(
        fn,
        prevent_cse=eqn.params.get("prevent_cse", True),
        policy=eqn.params.get("policy"),
    )
    outs = ck(*_boundary(interp, invals))
    rand = [x for x in invals if is_random(x)]
    return [interp.new(o, rand) if isinstance(o, Gaussian) else o for o in outs]


# --------------------------------------------------------------------------
# loops and branches
# --------------------------------------------------------------------------
def random_outputs(closed, in_mask) -> list[bool]:
    """Which outputs of a jaxpr depend on inputs flagged in ``in_mask``.

    Data-flow reachability (conservative: every output of an equation with a
    random input is random).
    """
    jaxpr = getattr(closed, "jaxpr", closed)
    rnd: dict = {}
    for v, r in zip(jaxpr.invars, in_mask, strict=True):
        rnd[v] = bool(r)

    def get(v):
        return False if type(v).__name__ == "Literal" else rnd.get(v, False)

    for e in jaxpr.eqns:
        r = any(get(v) for v in e.invars)
        for o in e.outvars:
            rnd[o] = r
    return [get(v) for v in jaxpr.outvars]


def _fix_carry(closed, mask_before, carry_mask, mask_after):
    """Least fixed point of the random-carry mask of a loop body.

    The body's inputs are ``(*before, *carry, *after)`` and its first outputs
    the new carry; a carry is random if it starts random or the body makes it
    random.  Returns ``(carry mask, output mask)``.
    """
    mask = list(carry_mask)
    while True:
        out = random_outputs(closed, [*mask_before, *mask, *mask_after])
        new = [a or b for a, b in zip(mask, out[: len(mask)], strict=True)]
        if new == mask:
            return mask, out
        mask = new


def _promote(interp, vals, mask, avals):
    """Match the carry structure: random where ``mask``, cast to the avals."""
    out = []
    for v, r, aval in zip(vals, mask, avals, strict=True):
        if r:
            if is_random(v):
                g = interp.gaussian(v)
            else:
                x = jnp.asarray(v)
                g = Gaussian(x, jnp.zeros_like(x))
            out.append(Gaussian(g.mean.astype(aval.dtype), g.var.astype(aval.dtype)))
        else:
            out.append(v)
    return out


@builtin("scan")
def _scan(interp: Interpreter, eqn, invals):
    """``lax.scan`` with Gaussian carries / scanned inputs (module doc)."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    consts = _boundary(interp, invals[:nc])
    init, xs = invals[nc : nc + nk], invals[nc + nk :]
    const_mask = [isinstance(c, Gaussian) for c in consts]
    xs_mask = [is_random(x) for x in xs]
    carry_mask, out_mask = _fix_carry(
        body, const_mask, [is_random(c) for c in init], xs_mask
    )
    out_avals = [v.aval for v in getattr(body, "jaxpr", body).outvars]
    init = _promote(interp, init, carry_mask, out_avals[:nk])
    xs = _boundary(interp, xs)
    mode, backward = interp.mode, interp.backward

    def step(carry, x):
        sub = Interpreter(mode, backward)
        outs = sub.eval_closed(body, _inside([*consts, *carry, *x]))
        new_carry = _promote(sub, outs[:nk], carry_mask, out_avals[:nk])
        ys = _promote(sub, outs[nk:], out_mask[nk:], out_avals[nk:])
        return new_carry, ys

    carry, ys = lax.scan(
        step,
        init,
        xs,
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    rand = [x for x in invals if is_random(x)]
    return [
        interp.new(o, rand) if isinstance(o, Gaussian) else o for o in [*carry, *ys]
    ]


@builtin("while")
def _while(interp: Interpreter, eqn, invals):
    """``lax.while_loop``: Gaussian carries; the condition must stay deterministic."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_consts = _boundary(interp, invals[:cn])
    body_consts = _boundary(interp, invals[cn : cn + bn])
    init = invals[cn + bn :]
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]
    carry_mask, _ = _fix_carry(
        body,
        [isinstance(c, Gaussian) for c in body_consts],
        [is_random(c) for c in init],
        [],
    )
    cond_rand = random_outputs(
        cond, [*[isinstance(c, Gaussian) for c in cond_consts], *carry_mask]
    )
    where = interp.where
    if cond_rand[0]:
        raise GaussianDependentControlFlowError(
            f"dualflow.propagate: the condition of the while loop at {where} depends"
            " on a Gaussian value; a loop's trip count must be deterministic (use a"
            " fixed number of steps, e.g. lax.fori_loop with static bounds)."
        )
    avals = [v.aval for v in getattr(body, "jaxpr", body).outvars]
    init = _promote(interp, init, carry_mask, avals)
    mode, backward = interp.mode, interp.backward

    def cond_fn(carry):
        sub = Interpreter(mode, backward)
        (out,) = sub.eval_closed(cond, _inside([*cond_consts, *carry]))
        return out

    def body_fn(carry):
        sub = Interpreter(mode, backward)
        outs = sub.eval_closed(body, _inside([*body_consts, *carry]))
        return _promote(sub, outs, carry_mask, avals)

    outs = lax.while_loop(cond_fn, body_fn, init)
    rand = [x for x in invals if is_random(x)]
    return [interp.new(o, rand) if isinstance(o, Gaussian) else o for o in outs]


@builtin("cond")
def _cond(interp: Interpreter, eqn, invals):
    """``lax.cond``/``switch`` with a deterministic branch index."""
    index, *ops = invals
    if is_random(index):
        raise GaussianDependentControlFlowError(
            f"dualflow.propagate: the branch taken by lax.cond/switch at"
            f" {interp.where} depends on a Gaussian value; a Gaussian has no single"
            " branch. Compute the predicate from deterministic inputs, or write the"
            " choice as an element-wise jnp.where of one value."
        )
    branches = eqn.params["branches"]
    in_mask = [is_random(x) for x in ops]
    out_mask = [False] * len(eqn.outvars)
    for br in branches:
        br_mask = random_outputs(br, in_mask)
        out_mask = [a or b for a, b in zip(out_mask, br_mask, strict=True)]
    avals = [v.aval for v in eqn.outvars]
    ops = _boundary(interp, ops)
    mode, backward = interp.mode, interp.backward

    def make(br):
        def fn(*args):
            sub = Interpreter(mode, backward)
            outs = sub.eval_closed(br, _inside(args))
            return _promote(sub, outs, out_mask, avals)

        return fn

    outs = lax.switch(index, [make(b) for b in branches], *ops)
    rand = [x for x in invals if is_random(x)]
    return [interp.new(o, rand) if isinstance(o, Gaussian) else o for o in outs]
