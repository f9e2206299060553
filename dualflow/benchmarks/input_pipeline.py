"""Throughput of the training input pipeline (grain) against its worker count.

Used by ``scripts/bench_input.py``.  The pipeline is the trainer's own:
:class:`dualflow.train.input.TrainBatches` (permutation, RandAugment,
pad-and-crop, flip, mixup/CutMix, normalisation) read by
:func:`dualflow.train.input.batch_stream`.  The images are CIFAR-shaped
synthetic ``uint8`` noise: augmentation cost does not depend on content, and
no download is needed.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dualflow.data.augment import AugmentConfig
from dualflow.train.input import Normalizer, TrainBatches, batch_stream, resolve_workers

__all__ = ["PAPER_AUGMENT", "markdown_table", "measure_workers", "synthetic_batches"]

#: the duality paper's CIFAR recipe (configs/cifar100_wrn.py)
PAPER_AUGMENT = AugmentConfig(
    crop_pad=4,
    flip=True,
    randaugment_ops=2,
    randaugment_magnitude=9.0,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
)


def synthetic_batches(
    n: int = 10_000,
    batch_size: int = 128,
    shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 100,
    augment: AugmentConfig = PAPER_AUGMENT,
    seed: int = 0,
) -> TrainBatches:
    """:class:`TrainBatches` over ``n`` random ``uint8`` images of ``shape``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, n)
    return TrainBatches(
        x,
        y,
        batch_size=batch_size,
        seed=seed,
        augment=augment,
        num_classes=num_classes,
        normalizer=Normalizer(x, "unit"),
    )


def _one(batches: TrainBatches, workers: int, steps: int, prefetch: int) -> dict:
    """Time one stream: start-up (to the first batch), then ``steps`` more."""
    t0 = time.perf_counter()
    stream = batch_stream(
        batches, range(0, steps + 1), workers=workers, prefetch=prefetch
    )
    try:
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        t2 = time.perf_counter()
    finally:
        stream.close()
    return {
        "workers": workers,
        "startup_s": t1 - t0,
        "images_per_sec": steps * batches.batch_size / (t2 - t1),
    }


def measure_workers(
    batches: TrainBatches,
    workers: Sequence[int] | None = None,
    *,
    steps: int = 100,
    prefetch: int = 2,
    repeats: int = 1,
    report=print,
) -> list[dict[str, Any]]:
    """Augmented images/s for each worker count, best of ``repeats``.

    ``workers``: counts to measure (``0`` = one background thread in this
    process; ``-1`` = one per core); default ``0, 1, 2, 4, ...`` up to the
    cores.  The first batch (worker start-up: process spawn and unpickling the
    images) is timed separately as ``startup_s``.  ``speedup_vs_1`` divides by
    the one-worker rate.
    """
    cores = resolve_workers(-1)
    if workers is None:
        workers = [0, 1] + [w for w in (2, 4, 8, 16, 32, 64) if w <= cores]
        if cores not in workers:
            workers.append(cores)
    rows = []
    for w in workers:
        w = resolve_workers(w)
        best = max(
            (_one(batches, w, steps, prefetch) for _ in range(repeats)),
            key=lambda r: r["images_per_sec"],
        )
        report(
            f"workers={w}: {best['images_per_sec']:.0f} images/s"
            f" (start-up {best['startup_s']:.1f} s)"
        )
        rows.append(best)
    one = next((r["images_per_sec"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = r["images_per_sec"] / one if one else None
    return rows


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cores": resolve_workers(-1),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per worker count."""
    out = [
        "| workers | images/s | speed-up vs 1 worker | start-up (s) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = "0 (thread)" if r["workers"] == 0 else str(r["workers"])
        sp = r.get("speedup_vs_1")
        out.append(
            f"| {label} | {r['images_per_sec']:.0f} |"
            f" {'' if sp is None else f'{sp:.2f}'} | {r['startup_s']:.1f} |"
        )
    return "\n".join(out)
