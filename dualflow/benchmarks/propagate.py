"""Overhead of :func:`dualflow.propagate` against the hand-written ``bp`` models.

One jitted train step (probit categorical NLL + KL / n, gradient w.r.t. the
weight means and log-variances, an optax Adam update) is built twice on the
same model and the same data:

* ``A`` (``propagate``): the model's *deterministic* forward (``Method
  ("deterministic")``) transformed by ``dualflow.propagate`` and evaluated on a
  parameter tree whose ``<name>_mean`` leaves are ``Gaussian(mean,
  exp(<name>_logvar))`` (the Gaussian tree is built inside the loss, so the
  gradient reaches the log-variances through ``exp``);
* ``B`` (hand-written): the same model called with ``Method("bp")``.

Both give identical outputs (checked), so any difference in cost is the
transform's.  :func:`measure_case` records the step-time ratio A/B (median of
alternating repeats), the dot/convolution counts of the compiled HLO and of the
lowered StableHLO, XLA's cost analysis, and the trace / lowering / compile
seconds.  Used by ``scripts/bench_propagate.py``; figures in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dualflow
from dualflow import models, objectives
from dualflow.gaussian import Gaussian
from dualflow.io import git_commit, write_json_atomic, write_text_atomic
from dualflow.nn.context import Context, Method
from dualflow.nn.methods import kl_divergence

__all__ = [
    "CASES",
    "QUICK_CASES",
    "Case",
    "Steps",
    "VARIANTS",
    "count_ops",
    "gaussian_tree",
    "make_steps",
    "markdown_table",
    "measure_case",
    "run_benchmark",
]

#: the two steps compared: A = propagate(deterministic forward), B = bp model
VARIANTS = ("propagate", "handwritten")


@dataclasses.dataclass(frozen=True)
class Case:
    """A model and batch to benchmark.

    Attributes:
      name: row label.
      build: ``build(rngs) -> nnx.Module``.
      input_shape: one example's shape.
      batch: examples per step.
      num_classes: classes of the labels.
      point_input_layers: weight layers fed by the (deterministic) input.
        Neither side computes their zero-variance product ``op(0, mu^2 + s2)``
        (the transform carries no zero variance; the NNX layers keep a point
        input an array), so dense networks run the same dots.  The
        hand-written conv layers compute their two variance products as one
        convolution over concatenated channels (``dualflow.moments.linear``),
        which the transform's generic bilinear rule does not, so on conv
        networks they run fewer convolutions.
    """

    name: str
    build: Callable[[nnx.Rngs], nnx.Module]
    input_shape: tuple[int, ...]
    batch: int
    num_classes: int = 10
    point_input_layers: int = 1


def _registry(name: str, input_shape: Sequence[int], **kw) -> Callable:
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return models.build_model(
            name, num_classes=10, input_shape=input_shape, norm=None, rngs=rngs, **kw
        )

    return build


def _tiny_resnet(rngs: nnx.Rngs) -> nnx.Module:
    # same code paths as ResNet-20 (stem, identity and option-A shortcuts,
    # gains, head), a few thousand weights; nonzero gains exercise the branches
    return models.PreActResNet(
        stage_widths=(4, 8),
        blocks_per_stage=1,
        stem_width=4,
        num_classes=10,
        in_channels=3,
        norm=None,
        residual_init=0.5,
        rngs=rngs,
    )


#: the full benchmark: MLP 784-1024-1024-10 (batch 128), ResNet-20 NF (batch 64)
CASES: dict[str, Case] = {
    "mlp": Case("mlp", _registry("mlp", (28, 28, 1)), (28, 28, 1), 128),
    "resnet20": Case("resnet20", _registry("resnet20", (32, 32, 3)), (32, 32, 3), 64),
}

#: tiny versions of the same code paths (for tests: seconds, not minutes)
QUICK_CASES: dict[str, Case] = {
    "mlp": Case("mlp", _registry("mlp", (8, 8, 1), widths=(32, 32)), (8, 8, 1), 8),
    "resnet20": Case("resnet20", _tiny_resnet, (8, 8, 3), 4),
}


# --------------------------------------------------------------------------
# the two train steps
# --------------------------------------------------------------------------
def gaussian_tree(pure: Any) -> Any:
    """``<name>_mean`` leaves -> ``Gaussian(mean, exp(<name>_logvar))``.

    Other leaves (the log-variances themselves, gains) are kept unchanged; the
    deterministic forward never reads the log-variances.
    """
    if not isinstance(pure, dict):
        return pure
    out = {}
    for k, v in pure.items():
        lv = f"{k[:-5]}_logvar" if isinstance(k, str) and k.endswith("_mean") else None
        if lv is not None and lv in pure and not isinstance(v, dict):
            out[k] = Gaussian(v, jnp.exp(pure[lv]))
        else:
            out[k] = gaussian_tree(v)
    return out


@dataclasses.dataclass(frozen=True)
class Steps:
    """The two variants of one model (see :func:`make_steps`).

    Attributes:
      forward: ``forward[v]() -> fwd(params, x) -> Gaussian`` (fresh each call).
      step: ``step[v]() -> step(params, opt_state, x, y) -> (params, opt_state,
        loss)``, un-jitted, fresh each call (a new ``propagate`` object and new
        functions, so tracing is measured from scratch).
      params: pure dict of the model's state (means, log-variances, gains).
      opt_state: Adam state of ``params``.
    """

    forward: dict[str, Callable[[], Callable]]
    step: dict[str, Callable[[], Callable]]
    params: Any
    opt_state: Any


def make_steps(
    model: nnx.Module,
    *,
    mode: str = "linearized",
    n_data: int = 60_000,
    learning_rate: float = 1e-3,
) -> Steps:
    """Forward and train-step factories of both :data:`VARIANTS` of ``model``.

    Loss (both): ``categorical_nll(out, y, method="probit").mean() + KL / n_data``
    with the KL of the model's Bayesian layers; gradient w.r.t. the whole pure
    state dict (means and log-variances); ``optax.adam`` update.
    """
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optax.adam(learning_rate)

    def merged(pd) -> nnx.Module:
        st = nnx.State(state)
        nnx.replace_by_pure_dict(st, pd)
        return nnx.merge(graphdef, st)

    def det_forward(pd, x):
        return merged(pd)(x, Context(Method("deterministic")))

    def fwd_propagate() -> Callable:
        prop = dualflow.propagate(det_forward, mode=mode)
        return lambda pd, x: prop(gaussian_tree(pd), x)

    def fwd_handwritten() -> Callable:
        method = Method("bp", mode=mode)
        return lambda pd, x: merged(pd)(x, Context(method))

    def make(fwd_factory) -> Callable[[], Callable]:
        def factory() -> Callable:
            fwd = fwd_factory()

            def loss_fn(pd, x, y):
                nll = objectives.categorical_nll(fwd(pd, x), y, method="probit")
                return nll.mean() + kl_divergence(merged(pd)) / n_data

            def step(pd, opt_state, x, y):
                loss, grads = jax.value_and_grad(loss_fn)(pd, x, y)
                updates, opt_state = tx.update(grads, opt_state, pd)
                return optax.apply_updates(pd, updates), opt_state, loss

            return step

        return factory

    forward = {"propagate": fwd_propagate, "handwritten": fwd_handwritten}
    step = {v: make(f) for v, f in forward.items()}
    return Steps(forward, step, params, tx.init(params))


# --------------------------------------------------------------------------
# HLO op counts
# --------------------------------------------------------------------------
_HLO_DOT = re.compile(r"\sdot\(")
_HLO_CONV = re.compile(r"\sconvolution\(")
_HLO_CUSTOM = re.compile(r'custom_call_target="([^"]*)"')


def count_ops(hlo_text: str, stablehlo_text: str = "") -> dict[str, int]:
    """Dot and convolution instructions of a compiled HLO module (and StableHLO).

    HLO: ``dot(`` / ``convolution(`` instructions (each counted once, inside
    fusions too) plus library calls (``custom-call`` targets naming a GEMM /
    matmul or a convolution, as on GPU).  StableHLO (before inlining, so a
    function called twice counts once): ``stablehlo.dot_general`` /
    ``stablehlo.convolution``.
    """
    targets = _HLO_CUSTOM.findall(hlo_text)
    gemm = sum(1 for t in targets if re.search(r"gemm|matmul", t, re.I))
    conv = sum(1 for t in targets if re.search(r"conv", t, re.I))
    return {
        "hlo_dot": len(_HLO_DOT.findall(hlo_text)) + gemm,
        "hlo_conv": len(_HLO_CONV.findall(hlo_text)) + conv,
        "stablehlo_dot": stablehlo_text.count("stablehlo.dot_general"),
        "stablehlo_conv": stablehlo_text.count("stablehlo.convolution"),
    }


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    ca = ca or {}
    mem = compiled.memory_analysis()
    return {
        "flops": float(ca.get("flops", float("nan"))),
        "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
        "temp_mb": float(getattr(mem, "temp_size_in_bytes", float("nan"))) / 2**20,
    }


# --------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------
def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def measure_case(
    case: Case,
    *,
    mode: str = "linearized",
    repeats: int = 10,
    trace_repeats: int = 3,
    warmup: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build both steps of ``case`` in ``mode`` and measure them (module doc).

    Trace seconds (``jax.make_jaxpr`` of a fresh step) and lowering seconds
    (``jax.jit(step).lower``: trace + StableHLO) are medians of
    ``trace_repeats`` alternating runs; XLA compile seconds are measured once
    per variant.  Step seconds: after
    ``warmup`` calls of each, ``repeats`` rounds in which the two compiled steps
    take turns (the order alternates between rounds); ``ratio`` is A/B per
    round, summarised by its median, quartiles and range.
    """
    model = case.build(nnx.Rngs(seed))
    steps = make_steps(model, mode=mode)
    params = steps.params
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (case.batch, *case.input_shape), jnp.float32)
    y = jax.random.randint(ky, (case.batch,), 0, case.num_classes)
    args = (params, steps.opt_state, x, y)
    rec: dict[str, Any] = {
        "model": case.name,
        "mode": mode,
        "batch": case.batch,
        "input_shape": list(case.input_shape),
        "point_input_layers": case.point_input_layers,
        "variational_params": int(
            sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
        ),
    }

    # forward outputs agree (the transform reproduces the bp model)
    fwds = [steps.forward[v]() for v in VARIANTS]
    oa, ob = jax.jit(lambda p, x: [f(p, x) for f in fwds])(params, x)  # one compile
    rec["forward_max_abs_diff_mean"] = float(jnp.max(jnp.abs(oa.mean - ob.mean)))
    rec["forward_max_abs_diff_var"] = float(jnp.max(jnp.abs(oa.var - ob.var)))

    # trace (make_jaxpr) and lowering (trace + StableHLO) of fresh steps: warm
    # the shared caches once, then alternate; the last lowering is compiled
    for v in VARIANTS:
        jax.make_jaxpr(steps.step[v]())(*args)
    traces: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lowers: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lowered: dict[str, Any] = {}
    jaxpr_eqns: dict[str, int] = {}
    for r in range(trace_repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            step = steps.step[v]()
            t = time.perf_counter()
            jp = jax.make_jaxpr(step)(*args)
            traces[v].append(time.perf_counter() - t)
            jaxpr_eqns[v] = len(jp.jaxpr.eqns)
            step = steps.step[v]()
            t = time.perf_counter()
            lowered[v] = jax.jit(step).lower(*args)
            lowers[v].append(time.perf_counter() - t)

    compiled = {}
    for v in VARIANTS:
        t = time.perf_counter()
        compiled[v] = comp = lowered[v].compile()
        compile_s = time.perf_counter() - t
        rec[f"trace_s_{v}"] = statistics.median(traces[v])
        rec[f"lower_s_{v}"] = statistics.median(lowers[v])
        rec[f"jaxpr_eqns_{v}"] = jaxpr_eqns[v]
        rec[f"compile_s_{v}"] = compile_s
        for k, n in count_ops(comp.as_text(), lowered[v].as_text()).items():
            rec[f"{k}_{v}"] = n
        for k, c in _cost(comp).items():
            rec[f"{k}_{v}"] = c
        log(
            f"  {case.name} {mode} {v}: trace {rec[f'trace_s_{v}']:.2f} s, lower"
            f" {rec[f'lower_s_{v}']:.2f} s, compile {compile_s:.2f} s, dots"
            f" {rec[f'hlo_dot_{v}']}, convs {rec[f'hlo_conv_{v}']}"
        )

    # one step each: the same loss; warm-up
    outs = {}
    for v in VARIANTS:
        for _ in range(max(1, warmup)):
            outs[v] = jax.block_until_ready(compiled[v](*args))
    la, lb = (float(outs[v][2]) for v in VARIANTS)
    if not (np.isfinite(la) and np.isfinite(lb)):
        raise FloatingPointError(f"{case.name} {mode}: non-finite loss {la}, {lb}.")
    rec["loss_propagate"], rec["loss_handwritten"] = la, lb
    rec["updated_params_max_abs_diff"] = float(
        max(
            jnp.max(jnp.abs(a - b))
            for a, b in zip(
                jax.tree_util.tree_leaves(outs["propagate"][0]),
                jax.tree_util.tree_leaves(outs["handwritten"][0]),
                strict=True,
            )
        )
    )

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            t = time.perf_counter()
            jax.block_until_ready(compiled[v](*args))
            times[v].append(time.perf_counter() - t)
    ratios = [
        a / b for a, b in zip(times["propagate"], times["handwritten"], strict=True)
    ]
    for v in VARIANTS:
        rec[f"step_s_{v}"] = statistics.median(times[v])
        rec[f"step_times_{v}"] = times[v]
    rec["repeats"] = repeats
    rec["ratio"] = statistics.median(ratios)
    rec["ratio_p25"] = _percentile(ratios, 25)
    rec["ratio_p75"] = _percentile(ratios, 75)
    rec["ratio_min"] = min(ratios)
    rec["ratio_max"] = max(ratios)
    rec["ratios"] = ratios
    rec["ops_propagate"] = rec["hlo_dot_propagate"] + rec["hlo_conv_propagate"]
    rec["ops_handwritten"] = rec["hlo_dot_handwritten"] + rec["hlo_conv_handwritten"]
    return rec


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per (model, mode): ratio, op counts, trace/lower/compile seconds."""
    head = (
        "| model | mode | step A/B median [p25, p75] (min-max) | ms A | ms B |"
        " HLO dot A / B | HLO conv A / B | StableHLO dot+conv A / B |"
        " trace s A / B | lower s A / B | compile s A / B |\n"
        "|---|---|---|---:|---:|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in records:
        rows.append(
            f"| {r['model']} | {r['mode']} | {r['ratio']:.3f}"
            f" [{r['ratio_p25']:.3f}, {r['ratio_p75']:.3f}]"
            f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            f" | {1e3 * r['step_s_propagate']:.1f}"
            f" | {1e3 * r['step_s_handwritten']:.1f}"
            f" | {r['hlo_dot_propagate']} / {r['hlo_dot_handwritten']}"
            f" | {r['hlo_conv_propagate']} / {r['hlo_conv_handwritten']}"
            f" | {r['stablehlo_dot_propagate'] + r['stablehlo_conv_propagate']} /"
            f" {r['stablehlo_dot_handwritten'] + r['stablehlo_conv_handwritten']}"
            f" | {r['trace_s_propagate']:.2f} / {r['trace_s_handwritten']:.2f}"
            f" | {r['lower_s_propagate']:.2f} / {r['lower_s_handwritten']:.2f}"
            f" | {r['compile_s_propagate']:.1f} / {r['compile_s_handwritten']:.1f} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------
# the whole benchmark (scripts/bench_propagate.py)
# --------------------------------------------------------------------------
def _is_full_result(path: str) -> bool:
    try:
        with open(path) as f:
            return not json.load(f).get("meta", {}).get("quick", True)
    except (OSError, ValueError):
        return False


def run_benchmark(
    *,
    models: Sequence[str] = ("mlp", "resnet20"),
    modes: Sequence[str] = ("linearized", "matched"),
    repeats: int = 15,
    trace_repeats: int = 3,
    quick: bool = False,
    out: str | None = None,
    command: str = "",
    repo: str = ".",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every (model, mode); write ``out`` (JSON) and ``out``'s ``.md``.

    ``quick`` uses :data:`QUICK_CASES`; a quick run refuses to replace a full
    result file.  Returns ``{"meta", "records", "table"}``.
    """
    cases = QUICK_CASES if quick else CASES
    unknown = [m for m in models if m not in cases]
    if unknown or not models:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(cases)}.")
    if out is not None and quick and _is_full_result(out):
        raise FileExistsError(
            f"{out} holds a full result; a quick run won't replace it."
        )
    dev = jax.devices()[0]
    log(
        f"jax {jax.__version__} on {dev.platform} ({os.cpu_count()} cores);"
        f" {'quick, ' if quick else ''}{repeats} alternating repeats"
    )
    t0 = time.perf_counter()
    records = []
    for name in models:
        for mode in modes:
            log(f"[{name} {mode}]")
            rec = measure_case(
                cases[name],
                mode=mode,
                repeats=repeats,
                trace_repeats=trace_repeats,
                log=log,
            )
            log(
                f"  ratio A/B {rec['ratio']:.3f} [{rec['ratio_p25']:.3f},"
                f" {rec['ratio_p75']:.3f}]; ops A {rec['ops_propagate']},"
                f" B {rec['ops_handwritten']}"
            )
            records.append(rec)
    table = markdown_table(records)
    meta = {
        "command": command,
        "commit": git_commit(repo),
        "jax": jax.__version__,
        "platform": dev.platform,
        "cpu_count": os.cpu_count(),
        "quick": bool(quick),
        "repeats": repeats,
        "wall_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }
    if out is not None:
        write_json_atomic(out, {"meta": meta, "records": records})
        write_text_atomic(
            os.path.splitext(out)[0] + ".md",
            f"`{command}` (commit {meta['commit']}, jax {meta['jax']},"
            f" {meta['platform']}, {meta['cpu_count']} cores,"
            f" {meta['wall_s'] / 60:.1f} min). A = propagate(deterministic"
            " forward), B = hand-written bp model.\n\n" + table + "\n",
        )
    return {"meta": meta, "records": records, "table": table}
