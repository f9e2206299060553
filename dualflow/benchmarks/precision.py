"""float32 error of reduced matmul precision in the moment products (issue 22).

CPUs compute float32 products exactly at every ``lax.Precision``, so the error
that GPUs and TPUs make at JAX's DEFAULT precision cannot be observed here.
This module *emulates* it: :func:`emulate_precision` traces a function to a
jaxpr and evaluates it with an interpreter that rounds the two float32
operands of every ``dot_general`` and ``conv_general_dilated`` to the
accelerator's input format, then multiplies the rounded operands exactly and
accumulates in float32 (``lax.Precision.HIGHEST``):

* ``"highest"``: unchanged float32 (the float32 reference);
* ``"tf32"``: GPU (Ampere/Hopper) DEFAULT -- operands rounded to TF32, 10
  explicit mantissa bits, round to nearest even (:func:`round_tf32`);
* ``"bf16"``: TPU DEFAULT -- one bfloat16 pass, 7 explicit mantissa bits
  (:func:`round_bf16`);
* ``"bf16x3"``: TPU HIGH (bf16_3x) -- ``x = hi + lo`` with ``hi = bf16(x)``,
  ``lo = bf16(x - hi)``, product ``hi·lo' + lo·hi' + hi·hi'``.

What emulation does not capture: the hardware's accumulation order and
accumulator width inside a tensor-core tile (here XLA:CPU's float32 order),
XLA's fusion and algorithm choices on the device (e.g. Winograd or FFT convs,
split-K reductions), denormal flushing, and the TPU's handling of
``preferred_element_type``.  The rounding of the operands, the dominant
error, is exact.

:func:`precision_error_table` measures, for models of the zoo, the relative
error of the ``bp`` output moments (logit means and variances) of every mode
against a float64 reference and against float32 HIGHEST, plus
``"bf16_compute"`` (dualflow's real bfloat16-operand option,
:func:`dualflow.moments.precision_context`), at initialisation and after a
short training run on scikit-learn's digits.
"""

from __future__ import annotations

import functools
import math
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.extend import core as jcore

from dualflow import metrics, models, nn
from dualflow.gaussian import Gaussian
from dualflow.moments.linear import precision_context
from dualflow.objectives import probit_softmax
from dualflow.train.fit import make_pure_step

Array = jax.Array

__all__ = [
    "EMULATED_MODES",
    "PRECISION_MODELS",
    "TABLE_MODES",
    "emulate_precision",
    "markdown_table",
    "precision_error_table",
    "relative_error",
    "round_bf16",
    "round_mantissa",
    "round_tf32",
    "split_bf16",
]

#: modes of :func:`emulate_precision`
EMULATED_MODES = ("highest", "tf32", "bf16", "bf16x3")
#: rows of the table: emulated modes plus dualflow's real bf16-operand option
TABLE_MODES = ("highest", "tf32", "bf16", "bf16x3", "bf16_compute")
_PRODUCTS = ("dot_general", "conv_general_dilated")
_HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
# call-like primitives whose body is evaluated in place: name -> param
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


# --------------------------------------------------------------------------
# rounding helpers
# --------------------------------------------------------------------------
def round_mantissa(x: Array, bits: int) -> Array:
    """float32 ``x`` (any shape) rounded to ``bits`` explicit mantissa bits
    (same shape, float32), round to nearest, ties to even; the exponent range
    stays float32's (an overflow rounds to inf); inf and NaN pass unchanged."""
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"round_mantissa: needs float32, got {x.dtype}.")
    if not 0 <= bits <= 23:
        raise ValueError(f"round_mantissa: bits must be in 0..23, got {bits}.")
    if bits == 23:
        return x
    drop = 23 - bits
    u = lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (u >> drop) & jnp.uint32(1)  # last kept bit: the tie goes to even
    half = jnp.uint32((1 << (drop - 1)) - 1)
    mask = jnp.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    r = lax.bitcast_convert_type((u + half + lsb) & mask, jnp.float32)
    return jnp.where(jnp.isfinite(x), r, x)


def round_tf32(x: Array) -> Array:
    """float32 -> nearest TF32 value (10 explicit mantissa bits, RNE), as float32."""
    return round_mantissa(x, 10)


def round_bf16(x: Array) -> Array:
    """float32 -> nearest bfloat16 (7 explicit mantissa bits, RNE), as float32."""
    return round_mantissa(x, 7)


def split_bf16(x: Array) -> tuple[Array, Array]:
    """``(hi, lo)`` float32 with ``hi = bf16(x)``, ``lo = bf16(x - hi)`` (bf16_3x)."""
    hi = round_bf16(x)
    return hi, round_bf16(x - hi)


# --------------------------------------------------------------------------
# the emulating interpreter
# --------------------------------------------------------------------------
def _is_f32(a: Any) -> bool:
    return jnp.result_type(a) == jnp.float32


def _product(eqn, lhs: Array, rhs: Array, mode: str) -> Array:
    """One dot/conv of ``eqn`` with its float32 operands rounded for ``mode``
    (exact products of the rounded values, float32 accumulation)."""
    params = dict(eqn.params)
    bind = functools.partial(eqn.primitive.bind, **params)
    if not (_is_f32(lhs) and _is_f32(rhs)):
        return bind(lhs, rhs)  # bf16 / float64 operands: left as they are
    params["precision"] = _HIGHEST  # exact on accelerators too
    bind = functools.partial(eqn.primitive.bind, **params)
    if mode == "highest":
        return bind(lhs, rhs)
    if mode == "tf32":
        return bind(round_tf32(lhs), round_tf32(rhs))
    if mode == "bf16":
        return bind(round_bf16(lhs), round_bf16(rhs))
    (lh, ll), (rh, rl) = split_bf16(lhs), split_bf16(rhs)
    return (bind(lh, rl) + bind(ll, rh)) + bind(lh, rh)  # bf16x3


def _sub_jaxprs(params: dict) -> list[str]:
    found = []
    for k, v in params.items():
        for sub in v if isinstance(v, tuple | list) else [v]:
            if isinstance(sub, jcore.Jaxpr | jcore.ClosedJaxpr):
                found.append(k)
    return found


def _eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any], mode: str) -> list:
    """Evaluate ``jaxpr`` on ``consts`` and ``args`` with emulated products."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val
    for v, val in zip(jaxpr.invars, args, strict=True):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _PRODUCTS:
            outs = [_product(eqn, *invals, mode)]
        elif name in _CALLS:
            body = eqn.params[_CALLS[name]]
            inner, cs = (
                (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
            )
            # custom_vjp/custom_jvp: the primal body (the custom rules only
            # matter for derivatives, which this forward emulator does not take)
            outs = _eval_jaxpr(inner, cs, invals, mode)
        elif _sub_jaxprs(eqn.params):
            raise NotImplementedError(
                f"emulate_precision: primitive {name!r} carries a sub-jaxpr"
                f" ({', '.join(_sub_jaxprs(eqn.params))}) and is not supported;"
                f" handled: {', '.join(sorted(_CALLS))} (the zoo's bp forwards"
                " contain jit, custom_vjp_call and custom_jvp_call only)."
            )
        else:
            out = eqn.primitive.bind(*invals, **eqn.params)
            outs = out if eqn.primitive.multiple_results else [out]
        for v, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def emulate_precision(fn: Callable, mode: str) -> Callable:
    """``fn`` with every float32 ``dot_general`` / ``conv_general_dilated``
    evaluated as an accelerator's ``mode`` would (module doc): operands rounded
    (``"tf32"``, ``"bf16"``) or split (``"bf16x3"``), exact products, float32
    accumulation.  Other operand dtypes are left alone.

    The result takes ``fn``'s arguments (pytrees of arrays), returns the same
    pytree and can be jitted; it is forward-only in spirit (custom derivative
    rules inside ``fn`` are evaluated through their primal bodies).  Sub-jaxprs
    of jit / closed_call / custom_vjp / custom_jvp / remat are interpreted;
    scan, while and cond raise ``NotImplementedError``.
    """
    if mode not in EMULATED_MODES:
        raise ValueError(f"emulate_precision: mode {mode!r} not in {EMULATED_MODES}.")

    @functools.wraps(fn)
    def emulated(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, jax.tree.leaves(args), mode)
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    return emulated


# --------------------------------------------------------------------------
# the error table
# --------------------------------------------------------------------------
_VGG16_QUARTER = (16, 16, "M", 32, 32, "M", 64, 64, 64, "M")
_VGG16_QUARTER += (128, 128, 128, "M", 128, 128, 128, "M")
#: (row label, builder name, kwargs, upsampling of the 8x8 digits) by default
#: (VGG-16 at a quarter of its widths: the 13 convs and 5 pools of VGG-16 on
#: 32x32 inputs, in CPU time; the full widths train too slowly here.)
PRECISION_MODELS: tuple[tuple[str, str, dict[str, Any], int], ...] = (
    ("mlp 2x1024", "mlp", {}, 1),
    ("resnet20", "resnet20", {}, 1),
    ("vgg16 (1/4 width)", "vgg16", {"config": _VGG16_QUARTER}, 4),
    ("wrn16_2", "wrn", {"depth": 16, "width": 2}, 1),
    ("densenet_bc40 k12", "densenet", {"depth": 40, "growth": 12}, 1),
)


def _build(name: str, kw: dict[str, Any], shape: tuple[int, ...], rngs: nnx.Rngs):
    if name == "densenet":  # the registry fixes depth 100; a shallower DenseNet-BC
        return models.DenseNet(
            in_channels=shape[-1],
            num_classes=10,
            rngs=rngs,
            **{"compression": 0.5, **kw},
        )
    return models.build_model(name, num_classes=10, input_shape=shape, rngs=rngs, **kw)


def relative_error(est: Array, ref: Array) -> tuple[float, float]:
    """``(median, max)`` over ``[N, K]`` of ``|est - ref| / RMS_N(ref[:, k])``:
    the error of every entry relative to the reference's root mean square of
    that output (logit ``k``) over the batch, so that means near 0 do not blow
    up the ratio while every output keeps its own scale."""
    est, ref = np.asarray(est, np.float64), np.asarray(ref, np.float64)
    scale = np.sqrt(np.mean(ref * ref, axis=0, keepdims=True))
    r = np.abs(est - ref) / np.maximum(scale, np.finfo(np.float64).tiny)
    return float(np.median(r)), float(np.max(r))


def _digits(upsample: int) -> tuple[np.ndarray, ...]:
    from dualflow.data.digits import load_sklearn_digits

    xtr, ytr, xte, yte = load_sklearn_digits(seed=0)
    mu, sd = xtr.mean(), xtr.std()

    def img(x):
        x = ((x - mu) / sd).reshape(-1, 8, 8, 1).astype(np.float32)
        return np.repeat(np.repeat(x, upsample, 1), upsample, 2)

    return img(xtr), ytr, img(xte), yte


def _predictive(mean: Array, var: Array, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, NLL) of the probit predictive of the logits ``N(mean, var)``
    (evaluated in float64)."""
    with jax.enable_x64(True):
        g = Gaussian(jnp.asarray(mean, jnp.float64), jnp.asarray(var, jnp.float64))
        p = probit_softmax(g)
        return float(metrics.accuracy(p, y)), float(metrics.nll(p, y))


def _train(
    graphdef, params, rest, x, y, steps: int, batch: int, lr: float, kl: float, log
):
    """``steps`` Adam steps of the bp (probit) objective on ``(x, y)``
    (KL term weighted by ``kl``)."""
    tx = optax.adam(lr)
    step = jax.jit(
        make_pure_step(
            graphdef,
            tx,
            method=nn.Method("bp"),
            likelihood=nn.Likelihood(),
            n_data=len(x),
            kl_weight=kl,
        )  # fmt: skip
    )
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    loss = float("nan")
    for i in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        params, rest, opt, m = step(params, rest, opt, x[idx], y[idx], key)
        if i == steps - 1:
            loss = float(m["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: loss {loss}.")
    log(f"    trained {steps} steps, last batch loss {loss:.3f}")
    return params, rest, loss


def _evaluator(graphdef) -> Callable[..., dict[str, tuple]]:
    """``evaluate(params, rest, x)``: logit moments ``(mean, var)`` ``[N, 10]``
    (NumPy) of every mode of :data:`TABLE_MODES` and of float64, compiled once
    per model."""

    def forward(params, rest, x):
        g = nn.apply(nnx.merge(graphdef, params, rest), x, nn.Method("bp"))
        return g.mean, g.var

    fns = {mode: jax.jit(emulate_precision(forward, mode)) for mode in EMULATED_MODES}
    fns["bf16_compute"] = jax.jit(lambda *a: forward(*a))  # traced in the context
    f64 = jax.jit(lambda *a: forward(*a))

    def evaluate(params, rest, x) -> dict[str, tuple]:
        out = {mode: fns[mode](params, rest, x) for mode in EMULATED_MODES}
        with precision_context("bf16_compute"):  # read while tracing
            out["bf16_compute"] = fns["bf16_compute"](params, rest, x)
        with jax.enable_x64(True):
            args = jax.tree.map(
                lambda a: (
                    a.astype(jnp.float64)
                    if jnp.issubdtype(a.dtype, jnp.floating)
                    else a
                ),
                (params, rest, jnp.asarray(x)),
            )
            mean, var = f64(*args)
            if mean.dtype != jnp.float64:
                raise TypeError(f"float64 reference computed in {mean.dtype}.")
            out["float64"] = (np.asarray(mean), np.asarray(var))
        return {k: (np.asarray(m), np.asarray(v)) for k, (m, v) in out.items()}

    return evaluate


def _rows(label: str, stage: str, outs: dict, y: np.ndarray) -> list[dict[str, Any]]:
    ref64, ref32 = outs["float64"], outs["highest"]
    acc64, nll64 = _predictive(*ref64, y)
    rows = []
    for mode in TABLE_MODES:
        mean, var = outs[mode]
        acc, nll = _predictive(mean, var, y)
        rows.append(
            {
                "model": label,
                "stage": stage,
                "mode": mode,
                "mean_vs_f64": relative_error(mean, ref64[0]),
                "var_vs_f64": relative_error(var, ref64[1]),
                "mean_vs_f32": relative_error(mean, ref32[0]),
                "var_vs_f32": relative_error(var, ref32[1]),
                "accuracy": acc,
                "nll": nll,
                "d_accuracy_vs_f64": acc - acc64,
                "d_nll_vs_f64": nll - nll64,
            }
        )
    return rows


def precision_error_table(
    model_specs: Sequence[tuple[str, str, dict[str, Any], int]] = PRECISION_MODELS,
    *,
    train_steps: int = 200,
    batch: int = 32,
    lr: float = 3e-3,
    kl_weight: float = 0.1,
    n_eval: int = 360,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Float32 error of every mode of :data:`TABLE_MODES` for each model.

    Each model (NF variant, ``bp`` linearised, default ``init_var``) is built
    for scikit-learn's digits (8x8x1, standardised, nearest-upsampled by the
    spec's factor), evaluated on the first ``n_eval`` test images at
    initialisation and after ``train_steps`` Adam steps (``batch``, ``lr``) of
    the bp probit objective (KL weighted by ``kl_weight``) in float32.  Per
    row: :func:`relative_error` of the logit means and variances
    ``[n_eval, 10]`` against float64 and against float32 HIGHEST, and the
    probit-predictive accuracy and NLL.

    Returns ``{"rows": [...], "setup": {...}}`` (JSON-ready).
    """
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    timings = {}
    for label, name, kw, up in model_specs:
        t = time.perf_counter()
        xtr, ytr, xte, yte = _digits(up)
        xte, yte = xte[:n_eval], yte[:n_eval]
        model = _build(name, dict(kw), xtr.shape[1:], nnx.Rngs(seed))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        log(f"  {label}: {models.count_params(model)['deterministic']:,d} weights")
        evaluate = _evaluator(graphdef)
        rows += _rows(label, "init", evaluate(params, rest, xte), yte)
        if train_steps > 0:
            params, rest, _ = _train(
                graphdef, params, rest, xtr, ytr, train_steps, batch, lr,
                kl_weight, log,
            )  # fmt: skip
            rows += _rows(label, "trained", evaluate(params, rest, xte), yte)
        timings[label] = time.perf_counter() - t
        log(f"    {timings[label]:.1f} s")
    setup = {
        "data": "scikit-learn digits (UCI optdigits test set): 1437 train / 360 test,"
        " 8x8x1 standardised",
        "n_eval": int(n_eval),
        "train_steps": int(train_steps),
        "batch": int(batch),
        "lr": lr,
        "kl_weight": kl_weight,
        "optimizer": "adam",
        "method": "bp (linearised), probit head, NF models, float32 training",
        "models": [
            {"label": lb, "name": n, "kwargs": repr(k), "upsample": u}
            for lb, n, k, u in model_specs
        ],
        "normalisation": "|est - ref| / RMS over the batch of ref for that logit;"
        " median and max over all [n_eval, 10] entries",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "seconds_per_model": timings,
        "seconds": time.perf_counter() - t0,
    }
    return {"rows": rows, "setup": setup}


def _e(x: float) -> str:
    return f"{x:.1e}"


def markdown_table(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md table of :func:`precision_error_table`'s result."""
    head = (
        "| model | stage | mode | mean vs f64 med / max | var vs f64 med / max |"
        " mean vs f32 med / max | var vs f32 med / max | Δacc vs f64 (pp) |"
        " ΔNLL vs f64 |\n|---|---|---|---|---|---|---|---:|---:|"
    )
    lines = [head]
    for r in result["rows"]:
        cells = [
            f"{_e(r[k][0])} / {_e(r[k][1])}"
            for k in ("mean_vs_f64", "var_vs_f64", "mean_vs_f32", "var_vs_f32")
        ]
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['mode']} | {' | '.join(cells)}"
            f" | {100 * r['d_accuracy_vs_f64']:+.2f} | {r['d_nll_vs_f64']:+.1e} |"
        )
    return "\n".join(lines)
