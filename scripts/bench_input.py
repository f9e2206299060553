"""Augmented CIFAR-shaped images/s of the training input pipeline (grain)
against its worker count.

    python scripts/bench_input.py                    # 0 (thread), 1, 2, ... cores
    python scripts/bench_input.py --workers=0,1,2,4 --steps=200 --repeats=3

The pipeline is the trainer's (``config.data.workers``): batches of 128
synthetic 32x32x3 images through the paper's augmentation (RandAugment N=2
M=9, pad-4 crop, flip, mixup 0.8 / CutMix 1.0, normalisation).  Prints one
line per worker count and writes ``<out>/<host>.json`` and ``.md``
(atomically).  Start-up (process spawn, shipping the images) is timed apart
from the steady rate.
"""

from __future__ import annotations

import os
import socket
import sys

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_string(
    "workers",
    "",
    "Comma-separated worker counts (default: 0, 1, 2, 4, ... cores; -1 = cores).",
)
flags.DEFINE_integer("steps", 100, "Timed batches per worker count (after the first).")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_integer("images", 10_000, "Synthetic training images.")
flags.DEFINE_integer("prefetch", 2, "Batches read ahead per worker.")
flags.DEFINE_integer("repeats", 1, "Runs per worker count (the best is kept).")
flags.DEFINE_string("out", "results/input", "Output folder.")
flags.DEFINE_string("name", "", "Output file stem (default: cpu-<cores>cores).")


def main(argv: list[str]) -> None:
    del argv
    from dualflow.benchmarks import input_pipeline as bench
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    F = flags.FLAGS
    for name in ("steps", "batch_size", "images", "prefetch", "repeats"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    if F.batch_size > F.images:
        cli.fail(f"--batch_size={F.batch_size} is larger than --images={F.images}")
    workers = cli.parse_list(F.workers, "workers", type=int, allow_empty=True) or None
    if workers and min(workers) < -1:
        cli.fail(f"--workers: counts must be >= -1 (-1: one per core), got {workers}")
    batches = bench.synthetic_batches(F.images, F.batch_size)
    rows = bench.measure_workers(
        batches, workers, steps=F.steps, prefetch=F.prefetch, repeats=F.repeats
    )
    info = bench.machine()
    stem = F.name or f"cpu-{info['cores']}cores"
    head = (
        f"{F.images} synthetic 32x32x3 images, batch {F.batch_size}, paper"
        f" augmentation; {F.steps} timed batches, best of {F.repeats};"
        f" {info['cores']} cores ({socket.gethostname()}), 1-min load"
        f" {info['load_1min']:.1f} at the end; commit {git_commit(_REPO)}\n\n"
    )
    table = bench.markdown_table(rows)
    print(head + table)
    os.makedirs(F.out, exist_ok=True)
    write_json_atomic(
        os.path.join(F.out, f"{stem}.json"),
        {
            "machine": info,
            "steps": F.steps,
            "batch_size": F.batch_size,
            "images": F.images,
            "repeats": F.repeats,
            "commit": git_commit(_REPO),
            "rows": rows,
        },
    )
    write_text_atomic(os.path.join(F.out, f"{stem}.md"), head + table + "\n")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
