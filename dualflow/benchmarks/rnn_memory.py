"""Residual memory of belief propagation through time (issue 20, item 4).

For a recurrent loss over a sequence of length ``T`` this module measures what
reverse mode keeps from the forward pass, for the three ways of computing the
gradient of the same network:

* ``bp``: the moment forward (Gaussian hidden state carried through
  ``lax.scan``) with belief propagation through time (``backward="bp"``):
  one custom VJP over the sequence that stores the states only;
* ``bp_per_op`` (moments level): the same rule assembled from the ops'
  per-step custom VJPs (``fuse=False``), which also store each step's gain;
* ``autodiff``: the same moment forward, plain reverse mode
  (``backward="autodiff"``);
* ``deterministic``: the network of the means (reference).

Two levels, each with an IndRNN (ReLU) and a simple RNN (tanh) cell:

* ``moments``: :func:`dualflow.moments.indrnn` / :func:`~dualflow.moments.simple_rnn`
  on the input term ``dense(x)``, the last state through a dense head, probit
  categorical NLL (deterministic: plain ``lax.scan`` + softmax cross-entropy);
* ``model``: a 2-layer :class:`dualflow.models.SequenceNet` (``head="last"``)
  under :func:`dualflow.nn.objective` (NLL + KL; deterministic:
  ``Method("deterministic")`` of the same model).

Measured per case (:func:`measure`):

* residuals, from ``jax._src.ad_checkpoint.saved_residuals`` (the list of
  values the linearised function closes over, with where each comes from):
  total bytes excluding the function's arguments; the part stacked over time
  by the scan (leading axis ``T``: saved *per step*) with the shapes of one
  step's residuals (a weight-shaped entry would be a loop-invariant saved
  ``T`` times), the part the scan saves once (final carries, loop-invariant
  values), and everything else.  Cross-check: the bytes of the leaves
  of the ``jax.vjp`` closure (a ``jax.tree_util.Partial`` pytree), which also
  count the arguments it keeps;
* per step: total / ``T`` and scan residuals / ``T``, in bytes and in units of
  one ``[N, H]`` array;
* at the moments level, which arrays the scan keeps per step: every
  ``[T, N, H]`` leaf of the vjp closure is matched by value against the
  candidates ``m_{t-1}``, ``P_{t-1}``, ``m_{t-1}^2``, the gain ``J_t`` ... of
  the forward (:func:`identify_step_residuals`);
* XLA's temp buffer size of the compiled ``jax.jit(jax.value_and_grad(loss))``
  (``memory_analysis().temp_size_in_bytes``; the same compiled step is timed);
* step time of the jitted ``value_and_grad`` (median; the three variants take
  turns so machine drift hits all alike).

Used by ``scripts/bench_rnn_memory.py``; figures in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from dualflow import moments, objectives
from dualflow.gaussian import Gaussian

Array = jax.Array

__all__ = [
    "CELLS",
    "LEVELS",
    "VARIANTS",
    "Config",
    "identify_step_residuals",
    "make_loss",
    "markdown_table",
    "measure",
    "residual_stats",
    "run_benchmark",
]

CELLS = ("indrnn", "srn")
LEVELS = ("moments", "model")
VARIANTS = ("bp", "bp_per_op", "autodiff", "deterministic")
#: variants of the model level (the per-op path is a moments-level option)
MODEL_VARIANTS = ("bp", "autodiff", "deterministic")
#: default activation of each cell (the IndRNN papers' ReLU, Elman's tanh)
ACTIVATION = {"indrnn": "relu", "srn": "tanh"}
_PLAIN = {"relu": jax.nn.relu, "tanh": jnp.tanh}
_GAIN = {
    "relu": lambda z: (z > 0).astype(z.dtype),
    "tanh": lambda z: 1 - jnp.tanh(z) ** 2,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one benchmark case (``x [N, T, D]``, ``H`` hidden, ``K`` classes)."""

    seq_len: int = 1000
    batch: int = 32
    hidden: int = 128
    in_features: int = 2
    num_classes: int = 10
    depth: int = 2  # recurrent layers of the model level
    mode: str = "linearized"
    seed: int = 0


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------
def _data(cfg: Config):
    k = jax.random.PRNGKey(cfg.seed)
    kx, ky = jax.random.split(k)
    x = jax.random.normal(kx, (cfg.batch, cfg.seq_len, cfg.in_features))
    y = jax.random.randint(ky, (cfg.batch,), 0, cfg.num_classes)
    return x, y


def _moment_params(cell: str, cfg: Config) -> dict[str, Array]:
    d, h, kk = cfg.in_features, cfg.hidden, cfg.num_classes
    ks = jax.random.split(jax.random.PRNGKey(cfg.seed + 1), 3)
    if cell == "indrnn":
        u_mean = jax.random.uniform(ks[1], (h,), minval=0.0, maxval=1.0)
        u_var = jnp.full((h,), 1e-3)
    else:
        u_mean = jax.nn.initializers.orthogonal()(ks[1], (h, h))
        u_var = jnp.full((h, h), 1e-3 / h)
    return {
        "w_mean": jax.random.normal(ks[0], (d, h)) / math.sqrt(d),
        "w_var": jnp.full((d, h), 1e-3 / d),
        "b_mean": jnp.zeros((h,)),
        "u_mean": u_mean,
        "u_var": u_var,
        "o_mean": jax.random.normal(ks[2], (h, kk)) / math.sqrt(h),
        "o_var": jnp.full((h, kk), 1e-3 / h),
    }


def _moment_loss(cell: str, variant: str, cfg: Config, x, y) -> Callable:
    act = ACTIVATION[cell]
    if variant == "deterministic":
        f = _PLAIN[act]

        def loss(p):
            a = jnp.swapaxes(x @ p["w_mean"] + p["b_mean"], 0, 1)  # [T, N, H]
            u = p["u_mean"]

            def step(h, a_t):
                h = f(a_t + (h * u if cell == "indrnn" else h @ u))
                return h, None

            h, _ = jax.lax.scan(step, jnp.zeros(a.shape[1:], a.dtype), a)
            logits = h @ p["o_mean"]
            return -jnp.take_along_axis(
                jax.nn.log_softmax(logits), y[:, None], 1
            ).mean()

        return loss
    scan = moments.indrnn if cell == "indrnn" else moments.simple_rnn
    fuse = variant != "bp_per_op"
    bw = "bp" if variant == "bp_per_op" else variant

    def loss(p):
        a = moments.dense(x, p["w_mean"], p["w_var"], p["b_mean"], backward=bw)
        states, _ = scan(
            a,
            p["u_mean"],
            p["u_var"],
            activation=act,
            mode=cfg.mode,
            backward=bw,
            fuse=fuse,
        )
        logits = moments.dense(states[:, -1], p["o_mean"], p["o_var"], backward=bw)
        return objectives.categorical_nll(logits, y).mean()

    return loss


def _model_loss(cell: str, variant: str, cfg: Config, x, y):
    from dualflow.models.rnn import SequenceNet
    from dualflow.nn.context import Method
    from dualflow.nn.methods import objective

    model = SequenceNet(
        cfg.in_features,
        cfg.num_classes,
        hidden=cfg.hidden,
        depth=cfg.depth,
        cell=cell,
        head="last",
        rngs=nnx.Rngs(cfg.seed),
    )
    if variant == "deterministic":
        method = Method("deterministic")
    else:
        method = Method("bp", mode=cfg.mode, backward=variant)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return objective(m, x, y, method=method, n_data=10_000)[0]

    return loss, params


def make_loss(level: str, cell: str, variant: str, cfg: Config) -> tuple[Callable, Any]:
    """``(loss(params) -> scalar, params)`` of one case."""
    if level not in LEVELS or cell not in CELLS or variant not in VARIANTS:
        raise ValueError(f"unknown case {(level, cell, variant)}")
    if level == "model" and variant not in MODEL_VARIANTS:
        raise ValueError(f"variant {variant!r} exists at the moments level only")
    x, y = _data(cfg)
    if level == "moments":
        return _moment_loss(cell, variant, cfg, x, y), _moment_params(cell, cfg)
    return _model_loss(cell, variant, cfg, x, y)


# --------------------------------------------------------------------------
# residuals
# --------------------------------------------------------------------------
def _nbytes(aval) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _time_axis(shape, seq_len: int) -> int | None:
    """0 for ``[T, N, ...]``, 1 for ``[N, T, ...]``, else ``None``."""
    for ax in (0, 1):
        if len(shape) > ax and shape[ax] == seq_len:
            return ax
    return None


def residual_stats(
    loss: Callable, params, seq_len: int, *, vjp: bool = True
) -> dict[str, Any]:
    """Bytes of the residuals of ``jax.vjp(loss, params)``, split by origin.

    ``total``: every residual except the function's arguments (which the
    caller holds anyway); ``scan_per_step``: outputs of a ``scan`` stacked over
    time (leading axis ``seq_len``) and the batch-major states ``[N, T, ...]``
    the fused BPTT rule keeps (``N != T`` assumed); ``scan_once``: other
    ``scan`` outputs (saved once: final carries, loop-invariant values
    hoisted out of the loop); ``other``: the rest (input projection, head,
    loss), of which ``other_time`` have a ``seq_len`` axis (e.g. one layer's
    states kept by the next layer's input projection).  ``per_step_shapes``:
    the per-step
    residuals of one step, e.g. ``"3 x float32[32, 128]"`` (a weight-shaped
    entry here would be a loop-invariant saved ``T`` times).
    ``vjp_leaves`` (with ``vjp=True``; shapes via ``jax.eval_shape``): all
    leaves of the ``jax.vjp`` closure, arguments included (cross-check).
    """
    res = saved_residuals(loss, params)
    out = {
        "total": 0,
        "scan_per_step": 0,
        "scan_once": 0,
        "other": 0,
        "other_time": 0,
        "arguments": 0,
    }
    per_step: dict[str, int] = {}
    items = []
    for aval, why in res:
        b = _nbytes(aval)
        if why.startswith("from the argument"):
            kind = "arguments"
        elif "output of scan" in why or "_fused_forward" in why:
            # per step: stacked over time by the scan ([T, ...]) or the
            # batch-major states the fused BPTT rule keeps ([N, T, ...])
            t_axis = _time_axis(aval.shape, seq_len)
            kind = "scan_per_step" if t_axis is not None else "scan_once"
        else:
            kind = "other"
        out[kind] += b
        if kind == "scan_per_step":
            shape = list(aval.shape)
            del shape[_time_axis(aval.shape, seq_len)]
            key = f"{aval.dtype}{shape}"
            per_step[key] = per_step.get(key, 0) + 1
        if kind == "other" and seq_len in aval.shape:
            out["other_time"] += b
        if kind != "arguments":
            out["total"] += b
        items.append(
            {
                "shape": list(aval.shape),
                "dtype": str(aval.dtype),
                "kind": kind,
                "why": why,
            }
        )
    if vjp:  # shapes only: jax.eval_shape traces, nothing runs
        leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
        out["vjp_leaves"] = int(sum(_nbytes(leaf) for leaf in leaves))
    out["per_step_shapes"] = " + ".join(f"{n} x {k}" for k, n in per_step.items())
    out["items"] = items
    return out


def _moment_candidates(cell: str, cfg: Config, params) -> dict[str, Array]:
    """Per-step arrays of the moment forward, time-major ``[T, N, H]``."""
    x, _ = _data(cfg)
    p = params
    a = moments.dense(x, p["w_mean"], p["w_var"], p["b_mean"])
    scan = moments.indrnn if cell == "indrnn" else moments.simple_rnn
    act = ACTIVATION[cell]
    states, _ = scan(a, p["u_mean"], p["u_var"], activation=act, mode=cfg.mode)
    tm = lambda z: jnp.swapaxes(z, 0, 1)  # noqa: E731
    m, P = tm(states.mean), tm(states.var)
    m_prev = jnp.concatenate([jnp.zeros_like(m[:1]), m[:-1]])
    P_prev = jnp.concatenate([jnp.zeros_like(P[:1]), P[:-1]])
    rec = moments.multiply if cell == "indrnn" else None
    if cell == "indrnn":
        r = rec(Gaussian(m_prev, P_prev), Gaussian(p["u_mean"], p["u_var"]))
    else:
        r = moments.dense(Gaussian(m_prev, P_prev), p["u_mean"], p["u_var"])
    pre = Gaussian(tm(a.mean) + r.mean, tm(a.var) + r.var)
    gain = _GAIN[act](pre.mean)
    extra = {}
    if act == "tanh":  # the library's tanh' = 4 sigmoid(2z) sigmoid(-2z)
        sp, sm = jax.nn.sigmoid(2 * pre.mean), jax.nn.sigmoid(-2 * pre.mean)
        extra = {  # factors autodiff keeps from the product rule of tanh'
            "sigmoid(2 z_t)": sp,
            "sigmoid(-2 z_t)": sm,
            "4 sigmoid(2 z_t)": 4 * sp,
            "2 sigmoid(-2 z_t)": 2 * sm,
            "J_t / 4": gain / 4,
        }
    return {
        "m_{t-1}": m_prev,
        "P_{t-1}": P_prev,
        "m_{t-1}^2": m_prev * m_prev,
        "m_t": m,
        "P_t": P,
        "J_t": gain,
        "J_t^2": gain * gain,
        "z_t (pre-activation mean)": pre.mean,
        "pre-activation var": pre.var,
        "J_t^2 * pre-activation var": gain * gain * pre.var,
        **extra,
    }


def identify_step_residuals(cell: str, variant: str, cfg: Config) -> list[str]:
    """Name each ``[T, N, H]`` (or batch-major ``[N, T, H]``) leaf of the vjp
    closure (moments level).

    A leaf is named by every candidate of :func:`_moment_candidates` it
    equals (``rtol 1e-4``, ``atol 1e-6``), joined by ``" = "`` (ReLU gains
    are 0/1, so ``J_t`` and ``J_t^2`` coincide); ``"?"`` if none matches.
    """
    loss, params = make_loss("moments", cell, variant, cfg)
    leaves = jax.jit(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]))(params)
    cands = jax.jit(lambda p: _moment_candidates(cell, cfg, p))(params)
    shape = (cfg.seq_len, cfg.batch, cfg.hidden)
    names = []
    for leaf in leaves:
        if tuple(leaf.shape) == (cfg.batch, cfg.seq_len, cfg.hidden):
            leaf = jnp.swapaxes(leaf, 0, 1)  # the fused rule's batch-major states
        if tuple(leaf.shape) != shape:
            continue
        hit = [
            k
            for k, c in cands.items()
            if c.dtype == leaf.dtype
            and bool(jnp.allclose(leaf, c, rtol=1e-4, atol=1e-6))
        ]
        names.append(" = ".join(hit) if hit else "?")
    return names


# --------------------------------------------------------------------------
# compile and time
# --------------------------------------------------------------------------
def _compile(loss: Callable, params):
    """The compiled ``jax.jit(jax.value_and_grad(loss))`` step and its XLA
    temp bytes (one compilation serves both)."""
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(params))  # warm up
    return (lambda: compiled(params)), (None if temp is None else int(temp))


def _race(steps: dict[str, Callable], repeats: int) -> dict[str, float]:
    ts: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def measure(
    level: str,
    cell: str,
    cfg: Config,
    *,
    repeats: int = 5,
    variants: Sequence[str] | None = None,
    identify: bool = True,
) -> list[dict[str, Any]]:
    """One record per variant of ``(level, cell)`` (see module docstring)."""
    itemsize = 4  # float32 [N, H] unit
    unit = cfg.batch * cfg.hidden * itemsize
    t = cfg.seq_len
    recs, steps = [], {}
    if variants is None:
        variants = VARIANTS if level == "moments" else MODEL_VARIANTS
    for v in variants:
        loss, params = make_loss(level, cell, v, cfg)
        rs = residual_stats(loss, params, t)
        step, temp = _compile(loss, params)
        steps[v] = step
        rec = {
            "level": level,
            "cell": cell,
            "activation": ACTIVATION[cell],
            "variant": v,
            "seq_len": t,
            "batch": cfg.batch,
            "hidden": cfg.hidden,
            "in_features": cfg.in_features,
            "depth": cfg.depth if level == "model" else 1,
            "mode": cfg.mode,
            "residual_bytes": rs["total"],
            "scan_per_step_bytes": rs["scan_per_step"],
            "scan_once_bytes": rs["scan_once"],
            "per_step_shapes": rs["per_step_shapes"],
            "other_time_bytes": rs["other_time"],
            "other_time_arrays_per_step": rs["other_time"] / t / unit,
            "other_bytes": rs["other"],
            "argument_bytes": rs["arguments"],
            "vjp_leaf_bytes": rs["vjp_leaves"],
            "bytes_per_step": rs["total"] / t,
            "arrays_per_step": rs["total"] / t / unit,
            "scan_arrays_per_step": rs["scan_per_step"] / t / unit,
            "temp_bytes": temp,
            "residuals": rs["items"],
        }
        if identify and level == "moments" and v != "deterministic":
            rec["step_residuals"] = identify_step_residuals(cell, v, cfg)
        recs.append(rec)
    times = _race(steps, repeats)
    for r in recs:
        r["step_s"] = times[r["variant"]]
    return recs


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """Rows ``level | cell | variant | ...`` with ratios to ``autodiff``."""
    ad = {(r["level"], r["cell"]): r for r in records if r["variant"] == "autodiff"}
    lines = [
        "| level | cell | backward | resid MB | resid / AD | bytes / step |"
        " [N,H] arrays / step: all (scan) | scan residuals of one step |"
        " temp MB | temp / AD |"
        " ms / step | t / AD |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        a = ad.get((r["level"], r["cell"]))
        rr = (
            f"{r['residual_bytes'] / a['residual_bytes']:.2f}"
            if a and a["residual_bytes"]
            else "-"
        )
        tr = (
            f"{r['temp_bytes'] / a['temp_bytes']:.2f}"
            if a and a["temp_bytes"] and r["temp_bytes"] is not None
            else "-"
        )
        sr = f"{r['step_s'] / a['step_s']:.2f}" if a else "-"
        lines.append(
            f"| {r['level']} | {r['cell']} ({r['activation']}) | {r['variant']} |"
            f" {_mb(r['residual_bytes'])} | {rr} | {r['bytes_per_step']:.0f} |"
            f" {r['arrays_per_step']:.2f} ({r['scan_arrays_per_step']:.2f}) |"
            f" {r['per_step_shapes']} | {_mb(r['temp_bytes'])} | {tr} |"
            f" {r['step_s'] * 1e3:.1f} | {sr} |"
        )
    return "\n".join(lines)


def run_benchmark(
    cfg: Config,
    *,
    levels: Sequence[str] = LEVELS,
    cells: Sequence[str] = CELLS,
    repeats: int = 5,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """All ``(level, cell)`` cases; returns ``{"config", "records", "table"}``."""
    records = []
    for level in levels:
        for cell in cells:
            t0 = time.perf_counter()
            recs = measure(level, cell, cfg, repeats=repeats)
            records += recs
            log(
                f"{level}/{cell}: "
                + ", ".join(
                    f"{r['variant']} {r['residual_bytes'] / 2**20:.2f} MB"
                    f" ({r['arrays_per_step']:.2f} arrays/step)"
                    for r in recs
                )
                + f" [{time.perf_counter() - t0:.0f} s]"
            )
    return {
        "config": dataclasses.asdict(cfg),
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "records": records,
        "table": markdown_table(records),
    }
