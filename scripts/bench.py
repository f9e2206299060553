"""Train-step time and memory of every learning method, relative to `deterministic`.

    python scripts/bench.py                       # MLP and conv net, all methods
    python scripts/bench.py --steps=30 --models=mlp --out=results/bench.json

For each model and method: one jitted training step (objective, gradient,
Adam update) on a fixed batch, warmed up, then the median wall time of
``--steps`` steps; the methods take turns step by step so machine-load drift
hits all alike.  Memory: XLA's compiled-step estimate (arguments + outputs +
temporaries, minus donated aliases) on every backend, and the device's peak
bytes in use where the backend reports it (GPU/TPU).  Prints a table of
ratios to `deterministic` (and `bp` / `bp autodiff`) and writes JSON.
"""

from __future__ import annotations

import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from dualflow import cli  # noqa: E402
from dualflow import nn as dnn  # noqa: E402
from dualflow.io import write_json_atomic  # noqa: E402
from dualflow.train.fit import make_train_step  # noqa: E402

# (label, Method) rows of the table
METHOD_ROWS = [
    ("deterministic", dnn.Method("deterministic")),
    ("bp", dnn.Method("bp")),
    ("bp autodiff", dnn.Method("bp", backward="autodiff")),
    ("bp matched", dnn.Method("bp", mode="matched")),
    ("reparam", dnn.Method("reparam")),
    ("local_reparam", dnn.Method("local_reparam")),
    ("flipout", dnn.Method("flipout")),
    ("mc_dropout", dnn.Method("mc_dropout")),
    ("ensemble M=5", dnn.Method("ensemble", ensemble_size=5)),
]


class ConvNet(nnx.Module):
    """ResNet-20-width conv net: 16-16-32-64 channels, two residual blocks,
    stride-2 downsampling, global average pool, dense head (32x32x3 input)."""

    def __init__(self, *, rngs: nnx.Rngs):
        c = dict(rngs=rngs)
        self.stem = dnn.Conv(3, 16, 3, **c)
        self.block1 = dnn.Residual(
            dnn.Sequential(
                dnn.Activation("relu"),
                dnn.Conv(16, 16, 3, **c),
                dnn.Activation("relu"),
                dnn.Conv(16, 16, 3, **c),
            )
        )
        self.down = dnn.Sequential(
            dnn.Activation("relu"),
            dnn.Conv(16, 32, 3, strides=2, **c),
            dnn.Activation("relu"),
            dnn.Conv(32, 64, 3, strides=2, **c),
        )
        self.block2 = dnn.Residual(
            dnn.Sequential(
                dnn.Activation("relu"),
                dnn.Conv(64, 64, 3, **c),
                dnn.Activation("relu"),
                dnn.Conv(64, 64, 3, **c),
            )
        )
        self.head = dnn.Sequential(
            dnn.Activation("relu"), dnn.GlobalAvgPool(), dnn.Dense(64, 10, **c)
        )

    def __call__(self, x, ctx):
        for f in (self.stem, self.block1, self.down, self.block2, self.head):
            x = f(x, ctx)
        return x


def build(model_name: str, method: dnn.Method):
    if model_name == "mlp":

        def factory(rngs):
            return dnn.MLP((784, 1024, 1024, 10), rngs=rngs)

    else:

        def factory(rngs):
            return ConvNet(rngs=rngs)

    if method.name == "ensemble":
        return dnn.make_ensemble(factory, method.ensemble_size)
    return factory(nnx.Rngs(0))


def compile_step(model_name, method, x, y):
    model = build(model_name, method)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    step = make_train_step(
        graphdef,
        tx,
        method=method,
        likelihood=dnn.Likelihood(),
        n_data=50_000,
        kl_weight=1.0,
    )
    key = jax.random.key(0)
    t = time.perf_counter()
    compiled = step.lower(params, rest, opt_state, x, y, key).compile()
    compile_s = time.perf_counter() - t
    ma = compiled.memory_analysis()
    xla_bytes = None
    if ma is not None:
        xla_bytes = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
    state = [params, rest, opt_state]

    def run():
        p, r, o, m = compiled(*state, x, y, key)
        state[:] = [p, r, o]
        return m["loss"]

    jax.block_until_ready(run())  # warm-up
    return run, xla_bytes, compile_s


def device_peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_model(model_name, steps, batch):
    key = jax.random.key(1)
    if model_name == "mlp":
        x = jax.random.uniform(key, (batch, 784))
    else:
        x = jax.random.normal(key, (batch, 32, 32, 3))
    y = jax.random.randint(key, (batch,), 0, 10)
    runs, rows = {}, {}
    for label, method in METHOD_ROWS:
        run, xla_bytes, compile_s = compile_step(model_name, method, x, y)
        runs[label] = run
        rows[label] = {"xla_bytes": xla_bytes, "compile_s": compile_s}
        print(
            f"  compiled {model_name:4s} {label:14s} in {compile_s:5.1f} s", flush=True
        )
    times = {k: [] for k in runs}
    for _ in range(steps):
        for k, run in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t)
    for k in runs:
        rows[k]["step_ms"] = 1e3 * float(np.median(times[k]))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, benchmark every model, write the JSON."""
    ap = cli.argument_parser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,conv")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mlp-batch", type=int, default=128)
    ap.add_argument("--conv-batch", type=int, default=64)
    ap.add_argument("--out", default="results/bench.json")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps: must be >= 1, got {args.steps}")
    for flag in ("mlp_batch", "conv_batch"):
        if getattr(args, flag) < 1:
            name = flag.replace("_", "-")
            ap.error(f"--{name}: must be >= 1, got {getattr(args, flag)}")
    models = cli.parse_list(args.models, "models", choices=("mlp", "conv"))
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}),"
        f" median of {args.steps} steps"
    )
    result = {
        "jax": jax.__version__,
        "device": dev.device_kind,
        "platform": dev.platform,
        "steps": args.steps,
        "models": {},
    }
    for model_name in models:
        batch = args.mlp_batch if model_name == "mlp" else args.conv_batch
        rows = bench_model(model_name, args.steps, batch)
        result["models"][model_name] = {"batch": batch, "rows": rows}
        base = rows["deterministic"]
        print(f"\n{model_name} (batch {batch})")
        print(
            f"{'method':15s} {'ms/step':>9s} {'t/det':>7s} {'XLA MB':>8s}"
            f" {'mem/det':>8s}"
        )
        for label, r in rows.items():
            mem = r["xla_bytes"]
            mem_ratio = (
                mem / base["xla_bytes"] if mem and base["xla_bytes"] else float("nan")
            )
            print(
                f"{label:15s} {r['step_ms']:9.2f} {r['step_ms'] / base['step_ms']:7.2f}"
                f" {(mem or 0) / 2**20:8.1f} {mem_ratio:8.2f}"
            )
        ratio = rows["bp"]["step_ms"] / rows["bp autodiff"]["step_ms"]
        print(f"bp custom_vjp / bp autodiff step time: {ratio:.2f}")
    peak = device_peak_bytes()
    if peak is not None:
        result["device_peak_bytes"] = peak
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    cli.run_plain(main)
