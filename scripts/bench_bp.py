"""Memory and speed of the BP backward rule vs autodiff of the same moment forward.

    python scripts/bench_bp.py                  # MLP 784-1024-1024-10 and a conv net
    python scripts/bench_bp.py --batch=256 --repeats=20
    python scripts/bench_bp.py --variance-floor --repeats=30   # issue 22 item 5

Prints, per model and activation mode, measured in one run:
  * residual bytes saved for the backward pass (excluding arguments), from
    ``jax.ad_checkpoint`` bookkeeping: BP / autodiff;
  * XLA temp bytes of the compiled gradient step: BP / autodiff;
  * step time (value_and_grad, jitted, median of repeats; BP, autodiff and the
    plain network take turns so machine-load drift hits all three alike):
    BP / autodiff and BP / plain deterministic network with the same shapes.
``--variance-floor`` instead times only the MLP (linearised ReLU, BP) against
the plain network with the variance computed as before issue 22 (two products,
point-input variance product kept), with one fused product, with the
point-input variance product skipped (the default), and both -- all in one
interleaved loop.
Record the figures in docs/benchmarks.md with the command line.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from dualflow import cli, moments, objectives  # noqa: E402
from dualflow.moments import linear as _linear  # noqa: E402

# --variance-floor variants: (label, dense variance fused, skip point variance)
VARIANCE_VARIANTS = (
    ("two products (before)", False, False),
    ("fused", True, False),
    ("point skip (default)", False, True),
    ("fused + point skip", True, True),
)


def mlp_params(key, sizes):
    ps = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k = jax.random.fold_in(key, i)
        ps.append(
            {
                "w_mean": jax.random.normal(k, (a, b)) * math.sqrt(2 / a),
                "w_var": jnp.full((a, b), 1e-3 / a),
                "b_mean": jnp.zeros(b),
            }
        )
    return ps


def mlp_loss(params, x, y, act, mode, backward):
    h = x
    for i, p in enumerate(params):
        h = moments.dense(h, **p, backward=backward)
        if i < len(params) - 1:
            h = moments.activation(act, h, mode=mode, backward=backward)
    return objectives.categorical_nll(h, y).mean()


def mlp_plain(params, x, y, act, mode, backward):
    del mode, backward
    f = {"relu": jax.nn.relu, "tanh": jnp.tanh}[act]
    h = x
    for i, p in enumerate(params):
        h = h @ p["w_mean"] + p["b_mean"]
        if i < len(params) - 1:
            h = f(h)
    return -jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], 1).mean()


def conv_params(key):
    shapes = [(3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
    ps = []
    for i, s in enumerate(shapes):
        k = jax.random.fold_in(key, i)
        fan = s[0] * s[1] * s[2]
        ps.append(
            {
                "w_mean": jax.random.normal(k, s) * math.sqrt(2 / fan),
                "w_var": jnp.full(s, 1e-3 / fan),
                "b_mean": jnp.zeros(s[-1]),
            }
        )
    k = jax.random.fold_in(key, 99)
    ps.append(
        {
            "w_mean": jax.random.normal(k, (64, 10)) / 8,
            "w_var": jnp.full((64, 10), 1e-3 / 64),
            "b_mean": jnp.zeros(10),
        }
    )
    return ps


def conv_loss(params, x, y, act, mode, backward):
    h = x
    for i, p in enumerate(params[:-1]):
        h = moments.conv(h, **p, backward=backward)
        h = moments.activation(act, h, mode=mode, backward=backward)
        if i < 2:
            h = moments.max_pool(h, 2, backward=backward)
    h = moments.global_avg_pool(h)
    h = moments.dense(h, **params[-1], backward=backward)
    return objectives.categorical_nll(h, y).mean()


def conv_plain(params, x, y, act, mode, backward):
    del mode, backward
    f = {"relu": jax.nn.relu, "tanh": jnp.tanh}[act]
    h = x
    for i, p in enumerate(params[:-1]):
        h = moments.conv(h, p["w_mean"], jnp.zeros_like(p["w_var"]), p["b_mean"]).mean
        h = f(h)
        if i < 2:
            h = jax.lax.reduce_window(
                h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
            )
    h = h.mean(axis=(1, 2)) @ params[-1]["w_mean"] + params[-1]["b_mean"]
    return -jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], 1).mean()


def residual_bytes(loss, params, x, y, *static):
    res = saved_residuals(lambda p: loss(p, x, y, *static), params)
    tot = sum(
        a.size * a.dtype.itemsize
        for a, why in res
        if not why.startswith("from the argument")
    )
    return tot


def compile_step(loss, params, x, y, static):
    """Jitted value_and_grad step and the XLA temp bytes of its compilation."""
    g = jax.jit(jax.value_and_grad(loss), static_argnums=(3, 4, 5))
    compiled = g.lower(params, x, y, *static).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan"))
    step = functools.partial(g, params, x, y, *static)
    jax.block_until_ready(step())  # warm up
    return step, temp


def race(steps: dict, repeats: int) -> dict:
    """Median seconds per step; the steps take turns so drift hits all alike."""
    ts = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(step())
            ts[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def compile_variant(fused: bool, skip_point: bool, *args):
    """``compile_step`` of the BP MLP traced with the variance switches set."""
    old = _linear._FUSE_DENSE_VARIANCE, _linear._SKIP_POINT_VARIANCE
    _linear._FUSE_DENSE_VARIANCE, _linear._SKIP_POINT_VARIANCE = fused, skip_point
    try:
        return compile_step(mlp_loss, *args)[0]
    finally:
        _linear._FUSE_DENSE_VARIANCE, _linear._SKIP_POINT_VARIANCE = old


def variance_floor(batch: int, repeats: int, act: str) -> None:
    """Print BP / plain step time of the MLP for each variance variant."""
    key = jax.random.PRNGKey(0)
    params = mlp_params(key, (784, 1024, 1024, 10))
    x = jax.random.uniform(key, (batch, 784))
    y = jax.random.randint(key, (batch,), 0, 10)
    static = (act, "linearized", "bp")
    steps = {"plain": compile_step(mlp_plain, params, x, y, static)[0]}
    for label, fused, skip in VARIANCE_VARIANTS:
        steps[label] = compile_variant(fused, skip, params, x, y, static)
    t = race(steps, repeats)
    print(
        f"MLP 784-1024-1024-10, batch {batch}, {act} linearized, BP, median of"
        f" {repeats}; plain {t['plain'] * 1e3:.2f} ms"
    )
    for label, *_ in VARIANCE_VARIANTS:
        print(
            f"  {label:24s} {t[label] * 1e3:8.2f} ms  BP/plain"
            f" {t[label] / t['plain']:.3f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the table."""
    ap = cli.argument_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--conv-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--activation", default="relu", choices=["relu", "tanh"])
    ap.add_argument(
        "--variance-floor",
        action="store_true",
        help="only the MLP: BP/plain step time per variance-product variant",
    )
    args = ap.parse_args(argv)
    for flag in ("batch", "conv_batch", "repeats"):
        if getattr(args, flag) < 1:
            name = flag.replace("_", "-")
            ap.error(f"--{name}: must be >= 1, got {getattr(args, flag)}")
    if args.variance_floor:
        variance_floor(args.batch, args.repeats, args.activation)
        return
    key = jax.random.PRNGKey(0)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"batch {args.batch} (MLP), {args.conv_batch} (conv), "
        f"activation {args.activation}, median of {args.repeats}"
    )
    cases = [
        (
            "MLP 784-1024-1024-10",
            mlp_params(key, (784, 1024, 1024, 10)),
            jax.random.uniform(key, (args.batch, 784)),
            jax.random.randint(key, (args.batch,), 0, 10),
            mlp_loss,
            mlp_plain,
        ),
        (
            "conv 32-64-64 on 32x32x3",
            conv_params(key),
            jax.random.normal(key, (args.conv_batch, 32, 32, 3)),
            jax.random.randint(key, (args.conv_batch,), 0, 10),
            conv_loss,
            conv_plain,
        ),
    ]
    header = (
        f"{'model':26s} {'mode':10s} {'resid BP/AD':>12s} {'MB BP':>7s} "
        f"{'MB AD':>7s} {'temp BP/AD':>11s} {'t BP/AD':>8s} {'t BP/plain':>10s}"
        f" {'ms BP':>7s}"
    )
    print(header)
    for name, params, x, y, loss, plain in cases:
        plain_step, _ = compile_step(plain, params, x, y, (args.activation, "-", "-"))
        for mode in ("linearized", "matched"):
            rb = residual_bytes(loss, params, x, y, args.activation, mode, "bp")
            ra = residual_bytes(loss, params, x, y, args.activation, mode, "autodiff")
            bp_step, mb = compile_step(
                loss, params, x, y, (args.activation, mode, "bp")
            )
            ad_step, ma = compile_step(
                loss, params, x, y, (args.activation, mode, "autodiff")
            )
            t = race({"bp": bp_step, "ad": ad_step, "plain": plain_step}, args.repeats)
            print(
                f"{name:26s} {mode:10s} {rb / ra:12.3f} {rb / 2**20:7.2f} "
                f"{ra / 2**20:7.2f} {mb / max(ma, 1):11.3f} {t['bp'] / t['ad']:8.3f} "
                f"{t['bp'] / t['plain']:10.3f} {t['bp'] * 1e3:7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    cli.run_plain(main)
