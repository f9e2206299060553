"""Per-model cost figures: parameters, forward FLOPs, train-step time bp vs
deterministic on the same (normalisation-free) graph, compiled memory.

Used by ``scripts/bench_models.py``; figures go to ``docs/models.md``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dualflow import models, nn
from dualflow.train.fit import make_pure_step

__all__ = [
    "BENCH_MODELS",
    "TINY",
    "compare_conv_impls",
    "markdown_table",
    "mc_variance_ratios",
    "measure_model",
]

#: (row label, registry name, model kwargs) measured by default
BENCH_MODELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mlp 2x1024", "mlp", {}),
    ("vgg16", "vgg16", {}),
    ("resnet20", "resnet20", {}),
    ("resnet56", "resnet56", {}),
    ("resnet18", "resnet18", {}),
    ("wrn28_10", "wrn28_10", {}),
    ("densenet_bc100", "densenet_bc100", {}),
    ("efficientnet_b0 (32x32)", "efficientnet_b0", {}),
    ("efficientnet_b0 (224)", "efficientnet_b0", {"resize_to": 224}),
    ("mixer_s/4", "mixer_s", {}),
)


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older jax: one dict per computation
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _temp_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    return float(getattr(mem, "temp_size_in_bytes", float("nan")))


def measure_model(
    name: str,
    model_kwargs: dict[str, Any] | None = None,
    *,
    batch: int = 8,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    repeats: int = 3,
    log=print,
) -> dict[str, Any]:
    """Build ``name`` (NF variant) and time one SGD train step for
    ``deterministic`` and ``bp`` (linearised) at ``batch`` inputs.

    Returns parameter counts (published-normalisation variant and NF), forward
    FLOPs per image from XLA's cost analysis, compile seconds, the median step
    seconds of ``repeats`` (the two methods take turns) and XLA temp memory.
    """
    kw = dict(model_kwargs or {})
    shape = tuple(int(s) for s in input_shape)
    pub = nnx.eval_shape(
        lambda: models.build_model(
            name,
            num_classes=num_classes,
            input_shape=shape,
            norm=models.default_norm(name),
            rngs=nnx.Rngs(0),
            **kw,
        )
    )
    model = models.build_model(
        name, num_classes=num_classes, input_shape=shape, rngs=nnx.Rngs(0), **kw
    )
    counts = models.count_params(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, num_classes)
    key = jax.random.key(3)  # dropout layers sample at train time
    tx = optax.sgd(1e-3)
    opt_state = tx.init(params)
    lik = nn.Likelihood()
    out: dict[str, Any] = {
        "model": name,
        "model_kwargs": kw,
        "batch": batch,
        "input_shape": list(shape),
        "num_classes": num_classes,
        "params_published_variant": models.count_params(pub)["deterministic"],
        "params_nf": counts["deterministic"],
        "variational_params_nf": counts["total"],
    }
    steps = {}
    for method in ("deterministic", "bp"):
        m = nn.Method(method)

        def fwd(p, x, m=m):
            return nn.apply(nnx.merge(graphdef, p, rest), x, m)

        fc = jax.jit(fwd).lower(params, x).compile()
        out[f"fwd_flops_per_image_{method}"] = _flops(fc) / batch

        step = make_pure_step(
            graphdef, tx, method=m, likelihood=lik, n_data=50_000, kl_weight=1.0
        )
        t = time.perf_counter()
        compiled = jax.jit(step).lower(params, rest, opt_state, x, y, key).compile()
        out[f"compile_s_{method}"] = time.perf_counter() - t
        out[f"step_temp_mb_{method}"] = _temp_bytes(compiled) / 2**20
        t = time.perf_counter()
        loss = jax.block_until_ready(
            compiled(params, rest, opt_state, x, y, key)[3]["loss"]
        )
        out[f"first_step_s_{method}"] = time.perf_counter() - t
        if not bool(jnp.isfinite(loss)):
            raise FloatingPointError(f"{name} {method}: non-finite loss {loss}.")
        out[f"loss_{method}"] = float(loss)
        steps[method] = compiled
        log(
            f"  {name} {method}: compile {out[f'compile_s_{method}']:.1f} s,"
            f" first step {out[f'first_step_s_{method}']:.2f} s"
        )
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, c in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(c(params, rest, opt_state, x, y, key))
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        out[f"step_s_{k}"] = statistics.median(v)
    out["step_ratio_bp_over_deterministic"] = (
        out["step_s_bp"] / out["step_s_deterministic"]
    )
    out["fwd_flops_ratio_bp_over_deterministic"] = (
        out["fwd_flops_per_image_bp"] / out["fwd_flops_per_image_deterministic"]
    )
    return out


def compare_conv_impls(
    name: str,
    impls: Sequence[str] = ("lax", "im2col"),
    *,
    methods: Sequence[str] = ("deterministic", "bp"),
    batch: int = 8,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    repeats: int = 3,
    unfused_too: bool = False,
) -> dict[str, float]:
    """Median SGD train-step seconds of ``name`` (NF variant) for every
    ``method`` traced under every conv implementation of
    :mod:`dualflow.moments._conv_cpu` (keys ``"<method> <impl>"``; with
    ``unfused_too`` also ``"bp <impl> unfused"``: the two conv variance
    products of before issue 22); all steps take turns in one loop, so the
    ratios are measured in one run."""
    from dualflow.moments import linear
    from dualflow.moments._conv_cpu import using_conv_impl

    shape = tuple(int(s) for s in input_shape)
    model = models.build_model(
        name, num_classes=num_classes, input_shape=shape, rngs=nnx.Rngs(0)
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, num_classes)
    tx = optax.sgd(1e-3)
    args = (params, rest, tx.init(params), x, y, jax.random.key(3))
    variants = [(m, i, True) for i in impls for m in methods]
    if unfused_too:
        variants += [("bp", i, False) for i in impls]
    steps = {}
    fused = linear._FUSE_CONV_VARIANCE
    for method, impl, fuse in variants:
        step = make_pure_step(
            graphdef, tx, method=nn.Method(method), likelihood=nn.Likelihood(),
            n_data=50_000, kl_weight=1.0,
        )  # fmt: skip
        linear._FUSE_CONV_VARIANCE = fuse
        try:
            with using_conv_impl(impl):  # the choices are made while tracing
                compiled = jax.jit(step).lower(*args).compile()
        finally:
            linear._FUSE_CONV_VARIANCE = fused
        jax.block_until_ready(compiled(*args))  # warm-up
        steps[f"{method} {impl}" + ("" if fuse else " unfused")] = compiled
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, c in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown_table(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """The docs/models.md table (one row per record)."""
    head = (
        "| model | params (published norm) | params NF | fwd GFLOPs/img det |"
        " fwd GFLOPs/img bp | step s det | step s bp | bp/det step |"
        " bp step temp MB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for label, r in zip(labels, records, strict=True):
        rows.append(
            f"| {label} | {r['params_published_variant']:,d} | {r['params_nf']:,d}"
            f" | {r['fwd_flops_per_image_deterministic'] / 1e9:.3f}"
            f" | {r['fwd_flops_per_image_bp'] / 1e9:.3f}"
            f" | {r['step_s_deterministic']:.3f} | {r['step_s_bp']:.3f}"
            f" | {r['step_ratio_bp_over_deterministic']:.2f}"
            f" | {r['step_temp_mb_bp']:.0f} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------
# tiny configurations of every family (same code paths, a few hundred weights)
# --------------------------------------------------------------------------
TINY_NUM_CLASSES = 5
TINY_INPUT_SHAPE = (8, 8, 3)

_EFF_BLOCKS = ((3, 1, 8, 8, 1, 1), (5, 1, 8, 12, 6, 2), (3, 1, 12, 12, 6, 1))


def _norm(norm, layer=False):
    return ("layer" if layer else "batch") if norm else None


#: family -> builder(norm: bool, rngs, **kw); norm=True: BatchNorm/LayerNorm variant
TINY = {
    "mlp": lambda norm, rngs, **kw: models.ImageMLP(
        input_shape=TINY_INPUT_SHAPE,
        num_classes=TINY_NUM_CLASSES,
        widths=(16,),
        norm=_norm(norm),
        rngs=rngs,
        **kw,
    ),
    "vgg": lambda norm, rngs, **kw: models.VGG(
        config=(8, "M", 16, "M"),
        input_size=8,
        num_classes=TINY_NUM_CLASSES,
        norm=_norm(norm),
        rngs=rngs,
        **kw,
    ),
    "resnet": lambda norm, rngs, **kw: models.PreActResNet(
        stage_widths=(4, 8),
        blocks_per_stage=1,
        stem_width=4,
        shortcut="A",
        num_classes=TINY_NUM_CLASSES,
        norm=_norm(norm),
        rngs=rngs,
        **kw,
    ),
    "wrn": lambda norm, rngs, **kw: models.wide_resnet(
        10, 1, num_classes=TINY_NUM_CLASSES, norm=_norm(norm), rngs=rngs, **kw
    ),
    "densenet": lambda norm, rngs, **kw: models.DenseNet(
        depth=10,
        growth=4,
        num_classes=TINY_NUM_CLASSES,
        norm=_norm(norm),
        rngs=rngs,
        **kw,
    ),
    "efficientnet": lambda norm, rngs, **kw: models.EfficientNet(
        blocks=_EFF_BLOCKS,
        head_width=16,
        resize_to=12,
        num_classes=TINY_NUM_CLASSES,
        norm=_norm(norm),
        rngs=rngs,
        **kw,
    ),
    "mixer": lambda norm, rngs, **kw: models.MLPMixer(
        image_size=8,
        patch=4,
        width=8,
        depth=2,
        token_hidden=4,
        channel_hidden=16,
        num_classes=TINY_NUM_CLASSES,
        norm=_norm(norm, layer=True),
        rngs=rngs,
        **kw,
    ),
}
# families with residual gains (NF variants)
TINY_RESIDUAL = ("resnet", "wrn", "efficientnet", "mixer")


def mc_variance_ratios(
    family: str, *, init_var: float = 1e-3, samples: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """bp output moments of a :data:`TINY` family vs Monte Carlo (one input).

    Returns the max |z| of the bp mean against weight sampling (``reparam``)
    and the ratio bp variance / MC variance against ``reparam`` and against
    ``local_reparam`` (which samples every output unit independently -- the
    independence bp assumes across units and positions), as min/median/max
    over the logits.  Residual gains are 0.5, dropout off.
    """
    kw: dict[str, Any] = {"init_var": init_var}
    if family in TINY_RESIDUAL:
        kw["residual_init"] = 0.5
    if family == "efficientnet":
        kw["dropout"] = 0.0
    model = TINY[family](False, nnx.Rngs(seed), **kw)
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(seed), (1, *TINY_INPUT_SHAPE))

    @jax.jit
    def run(state, key):
        mdl = nnx.merge(graphdef, state)
        out = {}
        for mode in ("linearized", "matched"):
            g = nn.apply(mdl, x, nn.Method("bp", mode=mode))
            out[mode] = (g.mean, g.var)
        keys = jax.random.split(key, samples)
        for name in ("reparam", "local_reparam"):
            s = jax.vmap(lambda k, name=name: nn.apply(mdl, x, nn.Method(name), k))(
                keys
            )
            out[name] = (s.mean(0), s.var(0))
        return out

    r = run(state, jax.random.key(seed + 1))
    rec: dict[str, Any] = {"family": family, "init_var": init_var, "samples": samples}
    for mode in ("linearized", "matched"):
        m, v = r[mode]
        z = jnp.abs(m - r["reparam"][0]) / jnp.sqrt(r["reparam"][1] / samples)
        rec[f"{mode}_max_abs_z_mean"] = float(z.max())
        for ref in ("reparam", "local_reparam"):
            ratio = v / r[ref][1]
            rec[f"{mode}_var_ratio_{ref}"] = [
                float(ratio.min()),
                float(jnp.median(ratio)),
                float(ratio.max()),
            ]
    return rec
