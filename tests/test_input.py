"""The grain input pipeline: batches are a pure function of the step, for any
worker count and any starting step; worker processes leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dualflow.benchmarks.input_pipeline import (
    PAPER_AUGMENT,
    markdown_table,
    measure_workers,
    synthetic_batches,
)
from dualflow.train.input import batch_stream, resolve_workers


@pytest.fixture(scope="module")
def batches():
    # small images keep the worker start-up (pickling the set) cheap
    return synthetic_batches(n=300, batch_size=32, shape=(12, 12, 3), num_classes=7)


def _same(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_equals_the_pure_batches_from_any_start(batches, workers):
    """Steps 5..23 cross an epoch boundary (9 steps per epoch); every batch
    equals ``batches(step)`` bit for bit, in order, and soft labels (mixup /
    CutMix are on) come through unchanged."""
    got = list(batch_stream(batches, range(5, 23), workers=workers, prefetch=3))
    assert [s for s, _ in got] == list(range(5, 23))
    for s, xy in got:
        assert _same(xy, batches(s)), s
    x, y = got[0][1]
    assert x.dtype == np.float32 and x.shape == (32, 12, 12, 3)
    assert y.shape == (32, 7) and np.allclose(y.sum(1), 1.0)


def test_batches_differ_between_steps_and_epochs(batches):
    """A stream that repeated one batch would pass the test above trivially."""
    a, b, c = (batches(s)[0] for s in (0, 1, 9))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_empty_and_bad_arguments(batches):
    assert list(batch_stream(batches, range(4, 4), workers=2)) == []
    with pytest.raises(ValueError, match="data.workers"):
        list(batch_stream(batches, range(3), workers=-2))
    with pytest.raises(ValueError, match="data.prefetch"):
        list(batch_stream(batches, range(3), prefetch=0))
    with pytest.raises(ValueError, match="consecutive"):
        list(batch_stream(batches, range(0, 6, 2)))
    assert resolve_workers(-1) >= 1 and resolve_workers(3) == 3


def test_workers_exit_without_leaks_or_warnings(tmp_path):
    """Closing a stream early or running it out: no process, shared-memory
    segment or resource-tracker warning outlives it."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from dualflow.benchmarks.input_pipeline import synthetic_batches
            from dualflow.train.input import batch_stream
            if __name__ == "__main__":
                b = synthetic_batches(n=200, batch_size=20, shape=(8, 8, 3))
                before = set(os.listdir("/dev/shm"))
                s = batch_stream(b, range(0, 50), workers=2)
                next(s); s.close()                       # closed early
                n = sum(1 for _ in batch_stream(b, range(0, 7), workers=2))
                import multiprocessing
                assert not multiprocessing.active_children(), "workers left"
                # multiprocessing's own semaphores ("sem.mp-*") go with the
                # objects that hold them; data segments must be gone now
                left = {
                    f for f in set(os.listdir("/dev/shm")) - before
                    if not f.startswith("sem.")
                }
                print("consumed", n, "left", sorted(left))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "consumed 7 left []" in out.stdout
    assert "leaked" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_benchmark_rows(batches):
    rows = measure_workers(batches, [0, 1], steps=3, report=lambda _m: None)
    assert [r["workers"] for r in rows] == [0, 1]
    assert all(r["images_per_sec"] > 0 for r in rows)
    assert rows[1]["speedup_vs_1"] == 1.0
    table = markdown_table(rows)
    assert "| 0 (thread) |" in table and "| 1 |" in table


def test_paper_augmentation_is_the_cifar_config():
    import pathlib

    from dualflow.train.config import load_config_file

    repo = pathlib.Path(__file__).resolve().parents[1]
    cfg = load_config_file(str(repo / "configs" / "cifar100_wrn.py"), "bp_nf_ng")
    for field in ("crop_pad", "flip", "randaugment_ops", "mixup_alpha", "cutmix_alpha"):
        assert getattr(PAPER_AUGMENT, field) == cfg.augment[field], field


def test_workers_map_the_images_from_shared_memory(batches):
    """Inside ``shared()`` the pickled batches carry a handle, not the images:
    the unpickled copy maps one read-only block and makes the same batches;
    outside it, pickling is by value again and the block is gone."""
    import pickle
    import sys

    with batches.shared() as shared:
        payload = pickle.dumps(shared)
        twin = pickle.loads(payload)
        if sys.platform.startswith("linux"):
            assert len(payload) < batches.x.nbytes // 10
            assert not twin.x.flags.writeable and not twin.x.flags.owndata
        assert _same(twin(4), batches(4)) and _same(twin(13), batches(13))
    assert len(pickle.dumps(batches)) > batches.x.nbytes
    assert _same(twin(4), batches(4))  # a mapping outlives the unlinked name
