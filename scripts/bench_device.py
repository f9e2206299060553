"""One-call device benchmark: WRN-28-10 on CIFAR-100 shapes, every Table-1 row.

    python scripts/bench_device.py                  # all devices JAX sees, < 8 min
    python scripts/bench_device.py --rows=vanilla,bp_nf --steps=50

Runs the train step of ``scripts/train.py --config=configs/cifar100_wrn.py:<row>``
(vanilla, reparam, bp_nf, bp_nf_ng, ensemble) on synthetic CIFAR-100-shaped
batches, sharded over all devices, and prints per row: images/s, the step-time
ratio to vanilla, compile seconds, peak memory (device, or host RSS where the
backend reports none) and whether every step stayed finite.  Writes
``<out>/<device-kind>.json`` and ``.md`` (atomically).  On CPU the defaults
shrink to a tiny WRN (depth 10, width 1, batch 8, 4 steps); the flags override
them.  See ``dualflow.benchmarks.device``.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_integer("width", 0, "WRN width factor (0: 10, or 1 on CPU).")
flags.DEFINE_integer("depth", 0, "WRN depth, 6n+4 (0: 28, or 10 on CPU).")
flags.DEFINE_integer("steps", 0, "Timed steps per row (0: 200, or 4 on CPU).")
flags.DEFINE_integer("batch", 0, "Global batch size (0: 128, or 8 on CPU).")
flags.DEFINE_string(
    "rows", "vanilla,reparam,bp_nf,bp_nf_ng,ensemble", "Comma-separated rows."
)
flags.DEFINE_float("max_seconds", 480.0, "Time budget of the whole run.")
flags.DEFINE_string("out", "results/device", "Output folder.")


def main(argv: list[str]) -> None:
    """Flags -> :func:`run_device_benchmark` -> table, JSON and markdown."""
    del argv
    logging.set_verbosity(logging.WARNING)
    import dataclasses

    from dualflow.benchmarks.device import (
        ROWS,
        default_settings,
        device_kind,
        markdown_table,
        run_device_benchmark,
    )
    from dualflow.io import write_json_atomic, write_text_atomic

    F = flags.FLAGS
    rows = tuple(cli.parse_list(F.rows, "rows", choices=list(ROWS)))
    given = {k: F[k].value for k in ("width", "depth", "steps", "batch") if F[k].value}
    for k in ("width", "depth", "steps", "batch"):
        if F[k].value < 0:
            cli.fail(f"--{k}: must be >= 1, got {F[k].value}")
    if not F.max_seconds > 0:
        cli.fail(f"--max_seconds: must be > 0, got {F.max_seconds}")
    settings = dataclasses.replace(
        default_settings(), rows=rows, max_seconds=F.max_seconds, **given
    )
    result = run_device_benchmark(settings, _REPO)
    table = markdown_table(result)
    print(table)
    out = os.path.join(_REPO, F.out) if not os.path.isabs(F.out) else F.out
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, device_kind())
    write_json_atomic(stem + ".json", result, indent=2)
    write_text_atomic(stem + ".md", table)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
