"""Element-wise fusion: one scalar function of one Gaussian, moment-matched whole.

An element-wise subgraph fed by one Gaussian value ``a`` (``h * sigmoid(h)``,
the tanh formula of ``jax.nn.gelu``, ``x + relu(x)``) is a scalar function
``f(a)``.  Its parts are *not* independent, so the interpreter composes the
equations into one :class:`~dualflow.propagation.values.Program` and matches the
moments of ``f(a)`` for ``a ~ N(m, v)`` as a whole:

* ``mode="linearized"`` (Duality of information flow, Algorithm 1): first-order
  expansion at the mean, ``mean = f(m)``, ``gain = f'(m)`` (forward-mode
  derivative of the program, so custom JVP rules such as ``relu'(0) = 0`` are
  honoured), ``var = gain^2 v``.  Exact for affine ``f``.
* ``mode="matched"``: exact moments ``E[f(a)]``, ``Var[f(a)]`` and the
  statistical-linearisation gain ``E[f'(a)]``, chosen in this order:

  1. ``f`` affine: exact (same as linearized);
  2. ``f = P + R a + Q g(p + q a)`` with ``g`` one of relu (from ``max``/
     ``min`` with a constant, ``abs``), ``exp`` (log-normal), ``integer_pow``
     (Gaussian raw moments), ``sin``/``cos``, ``erf`` (closed forms),
     ``tanh``/``logistic`` (quadrature): closed form, with the covariance of
     the affine and nonlinear parts from Stein's lemma
     ``Cov(a, g(u)) = q v E[g'(u)]``;
  3. ``f`` equal, on a probe grid, to one of dualflow's activations (silu,
     gelu, softplus, leaky relu, probit, heaviside, ...; only when every
     constant of the program is a concrete scalar): that activation's
     closed form / quadrature from :mod:`dualflow.moments`, so a model
     transformed by ``propagate`` and the same model written with the moment
     ops agree exactly;
  4. otherwise a 48-point sinh-mapped quadrature of ``f`` (scale 1.0).

Backward (``backward="bp"``): a ``jax.custom_vjp`` with the smoothing-gain rule
of :mod:`dualflow.moments.activations` (``dJ/dm = gain dJ/dmean``,
``dJ/dv = gain^2 dJ/dvar``); gradients w.r.t. traced constants of the program
(e.g. a deterministic bias inside it) are those of the forward (autodiff).
Affine programs use plain autodiff (it is the exact transpose; BP == autodiff).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from dualflow.gaussian import Gaussian
from dualflow.moments import _closed_forms as cf
from dualflow.moments import activations as acts
from dualflow.propagation.piecewise import (
    PiecewiseLinear,
    pl_max_const,
    pl_moments,
    pl_select,
    relu_term,
)
from dualflow.propagation.values import (
    Lazy,
    Node,
    NonFloatRandomError,
    Op,
    Program,
    is_float_dtype,
)

Array = jax.Array

__all__ = ["ELEMENTWISE", "fuse", "materialize", "run_program"]

#: Primitives the interpreter fuses into element-wise programs.
ELEMENTWISE = frozenset(
    """add sub mul div neg max min abs sign exp exp2 log log1p expm1 tanh logistic
    sin cos tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt
    integer_pow pow erf erfc erf_inv lgamma digamma square select_n
    convert_element_type eq ne gt ge lt le and or not is_finite floor ceil round
    clamp nextafter copy copy_p reduce_precision stop_gradient atan2 rem
    real imag""".split()
)
# Call-like primitives whose body may be fused when it is element-wise.
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})


# --------------------------------------------------------------------------
# building programs
# --------------------------------------------------------------------------
def _hashable_params(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def fuse(prim, params: dict, invals: list, shape, dtype) -> Lazy:
    """Compose one element-wise equation into a program over one source.

    ``invals`` are `Lazy` values of one source node or plain constants.
    """
    src = next(v.src for v in invals if isinstance(v, Lazy))
    ops: list[Op] = []
    index: dict = {}
    consts: list = []

    def add_op(op: Op) -> tuple:
        try:
            key = (op.prim, op.params, op.refs)
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in index:
            return ("v", index[key])
        ops.append(op)
        if key is not None:
            index[key] = len(ops) - 1
        return ("v", len(ops) - 1)

    def embed(lz: Lazy) -> tuple:
        cmap = []
        for c in lz.consts:
            consts.append(c)
            cmap.append(len(consts) - 1)
        vmap: list = []

        def remap(r):
            if r[0] == "v":
                return vmap[r[1]]
            if r[0] == "c":
                return ("c", cmap[r[1]])
            return r

        for op in lz.prog.ops:
            vmap.append(add_op(Op(op.prim, op.params, tuple(map(remap, op.refs)))))
        return remap(lz.prog.out)

    refs = []
    for v in invals:
        if isinstance(v, Lazy):
            refs.append(embed(v))
        else:
            consts.append(v)
            refs.append(("c", len(consts) - 1))
    out = add_op(Op(prim, _hashable_params(params), tuple(refs)))
    return Lazy(src, Program(tuple(ops), out), tuple(consts), tuple(shape), dtype)


def _broadcast_scalars(args: list) -> list:
    """0-d constants (scalars kept from ``jnp.where``'s broadcasts) broadcast
    to the shape of the array operands (``select_n`` needs equal shapes)."""
    shapes = [jnp.shape(x) for x in args if jnp.ndim(x) > 0]
    if not shapes or all(jnp.ndim(x) > 0 for x in args):
        return args
    shape = jnp.broadcast_shapes(*shapes)
    return [jnp.broadcast_to(x, shape) if jnp.ndim(x) == 0 else x for x in args]


# Saturating primitives evaluated through dualflow's custom-JVP versions: same
# values, but their derivatives (the linearized gain, the quadrature's f' and
# every autodiff gradient of the moments) avoid JAX's 1 - tanh^2 and
# sigma (1 - sigma), which lose all relative accuracy where f saturates
# (|x| >~ 10); see dualflow.moments.activations._sigmoid.
_STABLE_PRIMS: dict[str, Callable[[Array], Array]] = {
    "tanh": acts._tanh,
    "logistic": acts._sigmoid,
}


def _stable_substitute(op: Op) -> Callable[[Array], Array] | None:
    """The stable replacement of ``op`` if it is a default-accuracy tanh/logistic."""
    fn = _STABLE_PRIMS.get(op.prim.name)
    if fn is None or op.param_dict.get("accuracy") is not None:
        return None
    return fn


def run_program(prog: Program, a, consts) -> Array:
    """Evaluate the program at ``a`` (same shape as the source, or broadcast)."""
    vals: list = []

    def get(r):
        if r[0] == "a":
            return a
        if r[0] == "c":
            return consts[r[1]]
        return vals[r[1]]

    for op in prog.ops:
        if op.prim.name == "stop_gradient":
            # Moments are those of the values: identity.  (Binding it made the
            # program's JVP zero, so mode="linearized" gave var = 0 for
            # stop_gradient(x); gradients of the moments are not stopped.)
            vals.append(get(op.refs[0]))
            continue
        stable = _stable_substitute(op)
        if stable is not None:
            vals.append(stable(get(op.refs[0])))
            continue
        bind_params = op.prim.get_bind_params(op.param_dict)
        args = _broadcast_scalars([get(r) for r in op.refs])
        out = op.prim.bind(*args, **bind_params)
        vals.append(out[0] if op.prim.multiple_results else out)
    return get(prog.out)


# --------------------------------------------------------------------------
# kernels: (m, v, traced consts) -> (mean, var, gain)
# --------------------------------------------------------------------------
def _split_consts(consts) -> tuple[tuple, Callable]:
    """Traced constants become arguments; concrete ones are baked in."""
    traced_idx = [
        i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)
    ]
    fixed = list(consts)

    def full(traced):
        out = list(fixed)
        for i, c in zip(traced_idx, traced, strict=True):
            out[i] = c
        return out

    return tuple(consts[i] for i in traced_idx), full


def _linearized_kernel(prog: Program, full) -> Callable:
    def kernel(m, v, traced):
        consts = full(traced)
        mean, gain = jax.jvp(
            lambda a: run_program(prog, a, consts), (m,), (jnp.ones_like(m),)
        )
        return mean, gain * gain * v, gain

    return kernel


def _quadrature_kernel(prog: Program, full, scale: float = 1.0) -> Callable:
    def kernel(m, v, traced):
        consts = full(traced)

        def f1(a):
            return run_program(prog, a, consts)

        def df1(a):
            return jax.jvp(f1, (a,), (jnp.ones_like(a),))[1]

        # The quadrature calls f on nodes [*m.shape, order] (map the node axis
        # so that constants of the source's shape broadcast) and also on m
        # itself (its v == 0 branch): there, no axis to map.  (Mapping the
        # last axis of m broke programs with array constants, e.g. jax.nn.elu.)
        def on_nodes(g1):
            vg = jax.vmap(g1, in_axes=-1, out_axes=-1)
            return lambda a: g1(a) if jnp.ndim(a) == jnp.ndim(m) else vg(a)

        f, df = on_nodes(f1), on_nodes(df1)
        return cf.sinh_quadrature_moments(f, df, m, v, order=48, scale=scale)

    return kernel


# -- closed forms of g(u), u ~ N(mu, s2): (E g, Var g, E g') ----------------
def _exp_moments(mu, s2):
    mean = jnp.exp(mu + 0.5 * s2)
    return mean, mean * mean * jnp.expm1(s2), mean


def _pow_moments(n: int):
    def moments(mu, s2):
        raw = [jnp.ones_like(mu), mu]  # E[u^k] = mu E[u^(k-1)] + (k-1) s2 E[u^(k-2)]
        for k in range(2, 2 * n + 1):
            raw.append(mu * raw[k - 1] + (k - 1) * s2 * raw[k - 2])
        mean = raw[n]
        var = jnp.maximum(raw[2 * n] - mean * mean, 0.0)
        return mean, var, n * raw[n - 1]

    return moments


def _sin_moments(mu, s2):
    d = jnp.exp(-0.5 * s2)
    mean = jnp.sin(mu) * d
    second = 0.5 * (1.0 - jnp.cos(2 * mu) * jnp.exp(-2.0 * s2))
    return mean, jnp.maximum(second - mean * mean, 0.0), jnp.cos(mu) * d


def _cos_moments(mu, s2):
    d = jnp.exp(-0.5 * s2)
    mean = jnp.cos(mu) * d
    second = 0.5 * (1.0 + jnp.cos(2 * mu) * jnp.exp(-2.0 * s2))
    return mean, jnp.maximum(second - mean * mean, 0.0), -jnp.sin(mu) * d


def _named_kernel(name: str):
    kern = acts._Kernel(name, "matched")
    return lambda mu, s2: kern(mu, s2)


_G_MOMENTS = {
    "relu": cf.relu_moments,
    "exp": _exp_moments,
    "sin": _sin_moments,
    "cos": _cos_moments,
    "erf": cf.erf_moments,
    "tanh": _named_kernel("tanh"),
    "logistic": _named_kernel("sigmoid"),
}


# -- symbolic analysis: f = P + R a + Q g(p + q a) -------------------------
class _Aff:
    def __init__(self, P, R):
        self.P, self.R = P, R


class _NL:
    def __init__(self, P, R, Q, g, p, q):
        self.P, self.R, self.Q, self.g, self.p, self.q = P, R, Q, g, p, q

    def shifted(self, c):
        return _NL(self.P + c, self.R, self.Q, self.g, self.p, self.q)

    def scaled(self, c):
        return _NL(c * self.P, c * self.R, c * self.Q, self.g, self.p, self.q)


class _Cmp:
    """A comparison of the source with a threshold: true for ``a > t``
    (``right``) or ``a < t`` (ties have probability 0)."""

    def __init__(self, t: float, right: bool):
        self.t, self.right = t, right


def _sym_compare(name: str, x, y):
    if isinstance(x, _Const) and isinstance(y, _Aff):  # c > x  <=>  x < c
        x, y = y, x
        name = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}[name]
    if not (isinstance(x, _Aff) and isinstance(y, _Const)):
        return None
    try:
        p, q, c = (float(np.asarray(t)) for t in (x.P, x.R, y.value))
    except (TypeError, jax.errors.ConcretizationTypeError, ValueError):
        return None
    if q == 0.0:
        return None
    greater = name in ("gt", "ge")  # p + q a > c  <=>  a > (c - p) / q if q > 0
    return _Cmp((c - p) / q, greater == (q > 0))


class _Const:
    def __init__(self, value):
        self.value = value


def _as_pl(x) -> PiecewiseLinear | None:
    """A relu-form or affine symbolic value as a piecewise-linear one (concrete)."""
    if isinstance(x, PiecewiseLinear):
        return x
    if isinstance(x, _NL) and x.g == "relu":
        return relu_term(x.P, x.R, x.Q, x.p, x.q)
    if isinstance(x, _Aff | _Const):
        P, R = (x.P, x.R) if isinstance(x, _Aff) else (x.value, 0.0)
        return relu_term(P, R, 0.0, 0.0, 0.0)
    return None


def _lin_combo(x, y, sign):
    """``x + sign * y`` for symbolic values; ``None`` where not representable."""
    if isinstance(x, PiecewiseLinear) or isinstance(y, PiecewiseLinear) or (
        isinstance(x, _NL) and isinstance(y, _NL)
    ):
        px, py = _as_pl(x), _as_pl(y)
        return None if px is None or py is None else px + py.scaled(sign)
    if isinstance(y, _Const):
        y = _Aff(y.value, 0.0)
    if isinstance(x, _Const):
        x = _Aff(x.value, 0.0)
    if isinstance(x, _Aff) and isinstance(y, _Aff):
        return _Aff(x.P + sign * y.P, x.R + sign * y.R)
    if isinstance(x, _NL) and isinstance(y, _Aff):
        return _NL(x.P + sign * y.P, x.R + sign * y.R, x.Q, x.g, x.p, x.q)
    if isinstance(x, _Aff) and isinstance(y, _NL):
        y = y.scaled(sign)
        return _NL(x.P + y.P, x.R + y.R, y.Q, y.g, y.p, y.q)
    return None


def _scale(x, c):
    if isinstance(x, _Aff):
        return _Aff(c * x.P, c * x.R)
    if isinstance(x, _NL):
        return x.scaled(c)
    if isinstance(x, PiecewiseLinear):
        try:
            return x.scaled(float(np.asarray(c)))
        except (TypeError, jax.errors.ConcretizationTypeError, ValueError):
            return None
    return None


def _sym_apply(name: str, params: dict, xs: list, prim):
    """Symbolic value of one equation (see module doc)."""
    if all(isinstance(x, _Const) for x in xs):
        bp = prim.get_bind_params(params)
        out = prim.bind(*[x.value for x in xs], **bp)
        return _Const(out[0] if prim.multiple_results else out)
    if name in _CALLS or name == "custom_vjp_call":
        inner = params.get("call_jaxpr", params.get("jaxpr", params.get("fun_jaxpr")))
        if inner is None:
            return None
        return _sym_jaxpr(inner, xs)
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision",
                "stop_gradient"):  # stop_gradient: identity on values (run_program)
        if name == "convert_element_type" and not is_float_dtype(params["new_dtype"]):
            return None
        return xs[0]
    if name == "add":
        return _lin_combo(xs[0], xs[1], 1.0)
    if name == "sub":
        return _lin_combo(xs[0], xs[1], -1.0)
    if name == "neg":
        return _scale(xs[0], -1.0)
    if name == "mul":
        x, y = xs
        if isinstance(y, _Const):
            return _scale(x, y.value)
        if isinstance(x, _Const):
            return _scale(y, x.value)
        return None
    if name == "div" and isinstance(xs[1], _Const):
        return _scale(xs[0], 1.0 / xs[1].value)
    if name in ("gt", "ge", "lt", "le"):
        return _sym_compare(name, *xs)
    if name == "select_n" and len(xs) == 3 and isinstance(xs[0], _Cmp):
        pred, false, true = xs
        fp, tp = _as_pl(false), _as_pl(true)
        if fp is None or tp is None:
            return None
        if pred.right:  # true for a > t
            return pl_select(fp, tp, pred.t)
        return pl_select(tp, fp, pred.t)
    if name in ("max", "min"):
        x, y = xs
        if isinstance(x, _Const):
            x, y = y, x
        if isinstance(y, _Const) and isinstance(x, _NL | PiecewiseLinear):
            # a max/min of a relu form: piecewise linear with several kinks
            px = _as_pl(x)
            try:
                c = float(np.asarray(y.value))
            except (TypeError, jax.errors.ConcretizationTypeError, ValueError):
                return None
            if px is None or not math.isfinite(c):
                return None
            return pl_max_const(px, c, name == "max")
        if not (isinstance(x, _Aff) and isinstance(y, _Const)):
            return None
        c = y.value
        # max(x, -inf) = min(x, +inf) = x (jnp.max's initial=-inf, e.g. in
        # jax.nn.softmax): the relu form would give inf - inf = NaN.
        if not isinstance(c, jax.core.Tracer) and np.all(
            np.asarray(c) == (-np.inf if name == "max" else np.inf)
        ):
            return x
        if name == "max":  # c + relu(x - c)
            return _NL(c, 0.0, 1.0, "relu", x.P - c, x.R)
        return _NL(x.P, x.R, -1.0, "relu", x.P - c, x.R)  # x - relu(x - c)
    x = xs[0]
    if not isinstance(x, _Aff):
        return None
    if name == "abs":  # 2 relu(x) - x
        return _NL(-x.P, -x.R, 2.0, "relu", x.P, x.R)
    if name in _G_MOMENTS:
        return _NL(0.0, 0.0, 1.0, name, x.P, x.R)
    if name == "integer_pow" and params["y"] >= 1:
        return _NL(0.0, 0.0, 1.0, ("pow", int(params["y"])), x.P, x.R)
    if name == "square":
        return _NL(0.0, 0.0, 1.0, ("pow", 2), x.P, x.R)
    return None


def _sym_jaxpr(closed, xs):
    jaxpr = getattr(closed, "jaxpr", closed)
    consts = getattr(closed, "consts", ())
    env = {}
    for var, c in zip(jaxpr.constvars, consts, strict=True):
        env[var] = _Const(c)
    for var, x in zip(jaxpr.invars, xs, strict=True):
        env[var] = x

    def read(v):
        return _Const(v.val) if hasattr(v, "val") else env[v]

    for eqn in jaxpr.eqns:
        if len(eqn.outvars) != 1 and eqn.primitive.name not in _CALLS:
            return None
        ins = [read(v) for v in eqn.invars]
        if any(x is None for x in ins):
            return None
        out = _sym_apply(eqn.primitive.name, eqn.params, ins, eqn.primitive)
        if out is None:
            return None
        env[eqn.outvars[0]] = out
    if len(jaxpr.outvars) != 1:
        return None
    return read(jaxpr.outvars[0])


def _analyse(prog: Program, consts):
    """Symbolic form of the program (affine, one-nonlinearity template,
    piecewise linear) or ``None``.  Coefficient arithmetic on concrete
    constants is done at trace time, so the forms that need concrete
    coefficients are found under an outer ``jit`` too."""
    with jax.ensure_compile_time_eval():
        return _analyse_ops(prog, consts)


def _analyse_ops(prog: Program, consts):
    vals: list = []

    def sym(r):
        if r[0] == "a":
            return _Aff(0.0, 1.0)
        if r[0] == "c":
            return _Const(consts[r[1]])
        return vals[r[1]]

    for op in prog.ops:
        xs = [sym(r) for r in op.refs]
        if any(x is None for x in xs):
            return None
        vals.append(_sym_apply(op.prim.name, op.param_dict, xs, op.prim))
    out = sym(prog.out)
    return out if isinstance(out, _Aff | _NL | PiecewiseLinear) else None


def _is_concrete_zero(c) -> bool:
    """Whether a program coefficient is a known (not traced) scalar 0."""
    return not isinstance(c, jax.core.Tracer) and np.ndim(c) == 0 and float(c) == 0.0


def _form_kernel(coeffs) -> Callable:
    def kernel(m, v, traced):
        s = coeffs(traced)
        if isinstance(s, _Aff):
            return s.P + s.R * m, s.R * s.R * v, s.R * jnp.ones_like(m)
        if isinstance(s, PiecewiseLinear):
            return pl_moments(s, m, v)
        g = s.g
        gm = _pow_moments(g[1]) if isinstance(g, tuple) else _G_MOMENTS[g]
        mu = s.p + s.q * m
        s2 = s.q * s.q * v
        mu, s2 = jnp.broadcast_arrays(mu, s2)
        eg, vg, gu = gm(mu, s2)
        if _is_concrete_zero(s.R):
            # f = P + Q g(p + q a) (relu = max(a, 0), exp, ...): same values as
            # below (every g moment function returns var >= 0, so the clamp is
            # a no-op), without the 0 * m, 0 * v terms and the clamp.  Perf:
            # with the clamp XLA:CPU re-fused the whole matched relu moment
            # kernel into each channel-major transpose feeding a conv filter
            # gradient (matched ResNet-20 train step 2.3x slower than the
            # hand-written model; issue 17, docs/benchmarks.md).
            return s.P + s.Q * eg, s.Q * s.Q * vg, s.Q * s.q * gu
        mean = s.P + s.R * m + s.Q * eg
        gain = s.R + s.Q * s.q * gu
        var = s.R * s.R * v + s.Q * s.Q * vg + 2.0 * s.R * s.Q * s.q * v * gu
        return mean, jnp.maximum(var, 0.0), gain

    return kernel


# -- identification by values against dualflow's activations --------------
def _reference_functions() -> dict[str, Callable]:
    return {
        "relu": lambda t: jnp.maximum(t, 0),
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": lambda t: t * ndtr(t),
        "silu": lambda t: t * jax.nn.sigmoid(t),
        "erf": jax.scipy.special.erf,
        "probit": ndtr,
        "heaviside": lambda t: (t > 0).astype(t.dtype),
    }


# Probe grid: wide range plus a fine grid near the origin, where the kinks and
# steps of activations sit (a step at 0.05 differs from heaviside at 0.03).
_PROBES = np.concatenate(
    [
        np.linspace(-7.0, 7.0, 57),
        np.linspace(-1.5, 1.5, 301),
        [-0.3137, 0.2718, -1.7, 1.7, 9.5],
    ]
)


def _has_nested_jit(steps) -> bool:
    """Whether program ops (or equations), or a custom_jvp body in them, bind a
    shape-specific ``jit`` (re-binding it on the probe grid fails and XLA logs
    the error)."""
    for step in steps:
        if isinstance(step, Op):
            name, params = step.prim.name, step.param_dict
        else:  # a jaxpr equation
            name, params = step.primitive.name, step.params
        if name in ("jit", "pjit"):
            return True
        body = params.get("call_jaxpr")
        if body is not None and _has_nested_jit(getattr(body, "jaxpr", body).eqns):
            return True
    return False


def _identify(prog: Program, consts, dtype) -> tuple[str, float] | None:
    """Name (and leaky slope) of the dualflow activation equal to the program."""
    if any(isinstance(c, jax.core.Tracer) for c in consts):
        return None
    if any(np.size(c) != 1 for c in consts) or _has_nested_jit(prog.ops):
        return None
    try:
        with jax.ensure_compile_time_eval():
            scal = [jnp.reshape(jnp.asarray(c), ()) for c in consts]
            t = jnp.asarray(_PROBES, dtype)
            y = np.asarray(run_program(prog, t, scal), np.float64)
            tol = 64 * float(jnp.finfo(dtype).eps)
            refs = _reference_functions()
            for name, fn in refs.items():
                r = np.asarray(fn(t), np.float64)
                if np.allclose(y, r, rtol=tol, atol=tol):
                    return name, 0.0
            slope = float(y[0] / _PROBES[0])
            leaky = np.asarray(jnp.where(t >= 0, t, slope * t), np.float64)
            if 0.0 < slope < 1.0 and np.allclose(y, leaky, rtol=tol, atol=tol):
                return "leaky_relu", slope
    except Exception:  # noqa: BLE001 - identification is an optimisation only
        return None
    return None


def _matched_kernel(prog: Program, form, consts, full, dtype) -> Callable:
    """``form``: :func:`_analyse` of the program with its constants."""
    if form is not None:
        return _form_kernel(lambda traced: _analyse(prog, full(traced)))
    ident = _identify(prog, consts, dtype)
    if ident is not None:
        name, slope = ident
        kern = acts._Kernel(name, "matched", negative_slope=slope)
        return lambda m, v, traced: kern(m, v)
    return _quadrature_kernel(prog, full)


# --------------------------------------------------------------------------
# materialisation
# --------------------------------------------------------------------------
def _bp_call(kernel: Callable, traced: tuple, m: Array, v: Array):
    @jax.custom_vjp
    def f(traced, m, v):
        mean, var, _ = kernel(m, v, traced)
        return mean, var

    def fwd(traced, m, v):
        mean, var, gain = kernel(m, v, traced)
        return (mean, var), (traced, m, v, gain)

    def bwd(res, cot):
        traced, m, v, gain = res
        g_mean, g_var = cot
        if traced:
            _, vjp = jax.vjp(lambda t: kernel(m, v, t)[:2], traced)
            (g_traced,) = vjp((g_mean, g_var))
        else:
            g_traced = ()
        return g_traced, gain * g_mean, gain * gain * g_var

    f.defvjp(fwd, bwd)
    return f(traced, m, v)


def materialize(lz: Lazy, mode: str, backward: str) -> Node:
    """Moments of ``lz.prog(lz.src)`` as a new node (cached on ``lz``)."""
    if "node" in lz.cache:
        return lz.cache["node"]
    if lz.prog.is_identity:
        return lz.src
    if not is_float_dtype(lz.dtype):
        raise NonFloatRandomError(
            f"a {np.dtype(lz.dtype).name} value depends on a Gaussian"
        )
    m, v = lz.src.g.mean, lz.src.g.var
    shape = tuple(lz.shape)
    if m.shape != shape:
        m = jnp.broadcast_to(m, shape)
        v = jnp.broadcast_to(v, shape)
    consts = lz.consts
    traced, full = _split_consts(consts)
    form = _analyse(lz.prog, consts)  # once: affine? which matched kernel?
    affine = isinstance(form, _Aff)
    # Functions of a reduction statistic (sqrt of a sum of squares: jnp.std,
    # jnp.linalg.norm) are linearised in both modes: a statistic is a sum of
    # many terms with a small relative spread, and integrating sqrt/log over
    # its Gaussian belief would reach outside their domain (NaN).
    if affine or mode == "linearized" or lz.src.stat_of:
        kernel = _linearized_kernel(lz.prog, full)
    else:
        kernel = _matched_kernel(lz.prog, form, consts, full, m.dtype)
    if backward == "autodiff" or affine:
        mean, var, _ = kernel(m, v, traced)
    else:
        mean, var = _bp_call(kernel, traced, m, v)
    mean = mean.astype(lz.dtype)
    var = var.astype(lz.dtype)
    node = Node.new(Gaussian(mean, var), (lz.src,), lz.src.stat_of, same_of=lz.src)
    lz.cache["node"] = node
    return node

