"""float32 error of reduced matmul precision in the moment products (issue 22).

    # the docs/benchmarks.md table (5 models, init + 200 steps; ~10 min, 2 CPUs)
    python scripts/bench_precision.py
    # one small model, a few steps: a functional check in under a minute
    python scripts/bench_precision.py --models=mlp --train_steps=5 --n_eval=64
        --out=results/tmp/precision_quick

For each model: the bp logit means and variances under emulated TF32 (GPU
DEFAULT), bf16 (TPU DEFAULT) and bf16x3 (TPU HIGH) products, float32 HIGHEST
and the real ``precision="bf16_compute"`` option, against float64 and against
float32 HIGHEST (:mod:`dualflow.benchmarks.precision`).  Writes
``<out>/table.md`` and ``<out>/table.json`` (atomic).  Accelerator modes are
*emulated* on the CPU (operand rounding exact; accumulation order and XLA's
device fusion choices not captured).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_list(
    "models", [], "Row labels' first words to keep (e.g. mlp,resnet20); all if empty."
)
flags.DEFINE_integer(
    "train_steps", 200, "Adam steps before the 'trained' rows (0: none)."
)
flags.DEFINE_integer("batch", 32, "Training batch size.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("kl_weight", 0.1, "Weight of the KL term in training.")
flags.DEFINE_integer("n_eval", 360, "Test images the errors are measured on (<= 360).")
flags.DEFINE_string("out", "results/precision", "Output folder (table.md, table.json).")


def main(argv: list[str]) -> None:
    """Check the flags, run the table, print it and write it."""
    del argv
    from dualflow.benchmarks.precision import (
        PRECISION_MODELS,
        markdown_table,
        precision_error_table,
    )
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    F = flags.FLAGS
    names = {spec[0].split()[0]: spec for spec in PRECISION_MODELS}
    keep = cli.parse_list(F.models, "models", choices=list(names), allow_empty=True)
    specs = [names[k] for k in keep] if keep else list(PRECISION_MODELS)
    if F.train_steps < 0:
        cli.fail(f"--train_steps: must be >= 0, got {F.train_steps}")
    for name in ("batch", "n_eval"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    t0 = time.perf_counter()
    result = precision_error_table(
        specs,
        train_steps=F.train_steps,
        batch=F.batch,
        lr=F.lr,
        kl_weight=F.kl_weight,
        n_eval=F.n_eval,
        log=lambda s: print(s, flush=True),
    )
    command = ("python scripts/bench_precision.py " + " ".join(sys.argv[1:])).strip()
    result["command"] = command
    result["commit"] = git_commit(_REPO)
    result["seconds"] = time.perf_counter() - t0
    s = result["setup"]
    note = (
        f"`{command}`: {s['data']}; errors on {s['n_eval']} test images, at init"
        f" and after {s['train_steps']} Adam steps (batch {s['batch']}, lr"
        f" {s['lr']:g}, KL weight {s['kl_weight']:g}); jax"
        f" {s['jax']} on {s['backend']} ({s['machine']}), commit"
        f" {result['commit']}, {result['seconds']:.0f} s.  tf32/bf16/bf16x3 are"
        " emulated on the CPU; bf16_compute runs for real.\n\n"
    )
    table = markdown_table(result)
    print(note + table)
    out = F.out if os.path.isabs(F.out) else os.path.join(os.getcwd(), F.out)
    write_json_atomic(os.path.join(out, "table.json"), result)
    write_text_atomic(os.path.join(out, "table.md"), note + table + "\n")
    print(f"wrote {out}/table.md and table.json")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
