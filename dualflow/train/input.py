"""Host-side input pipeline: deterministic batches, augmentation, sharding.

Batch ``s`` of a run is a pure function of ``(seed, s)``: epoch ``e = s //
steps_per_epoch`` visits the training set in the order
``default_rng([seed, e]).permutation(n)`` and the batch is augmented with
``default_rng([seed, 1, s, host])``.  A resumed run therefore sees exactly the
batches the uninterrupted run would have seen.  Each host prepares only its
slice of the global batch (rows ``[host * B/H, (host + 1) * B/H)``), and
:func:`to_global` assembles the slices into one array sharded over the mesh's
``data`` axis.

:func:`batch_stream` runs :class:`TrainBatches` on grain, the JAX ecosystem's
data loader: a ``grain.MapDataset`` indexed by step, mapped by
:class:`TrainBatches`, read ahead by one background thread (``workers=0``) or
by ``workers`` processes (``mp_prefetch``; worker ``i`` makes steps ``i, i +
workers, ...`` and grain returns them in order).  Because the dataset is
indexed by step, the step number the trainer checkpoints is the whole iterator
state: a stream started at step ``s`` yields bit-for-bit the batches an
uninterrupted stream yields from ``s`` on, for any worker count.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualflow.data.augment import AugmentConfig, augment_batch

__all__ = [
    "Normalizer",
    "TrainBatches",
    "batch_stream",
    "resolve_workers",
    "to_global",
]


class Normalizer:
    """uint8 images -> float32: ``x/255`` (``"unit"``) or per-channel
    standardisation with the training set's mean and std (``"standardize"``)."""

    def __init__(self, x_train: np.ndarray, kind: str):
        if kind not in ("unit", "standardize"):
            raise ValueError(f"normalize must be 'unit' or 'standardize', got {kind!r}")
        self.kind = kind
        c = x_train.shape[-1]
        if kind == "standardize":
            flat = x_train.reshape(-1, c)
            mean = np.zeros(c)
            sq = np.zeros(c)
            for i in range(0, len(flat), 1 << 20):  # chunks: no float64 copy
                chunk = flat[i : i + (1 << 20)].astype(np.float64) / 255.0
                mean += chunk.sum(0)
                sq += (chunk**2).sum(0)
            mean /= len(flat)
            std = np.sqrt(np.maximum(sq / len(flat) - mean**2, 1e-12))
        else:
            mean, std = np.zeros(c), np.ones(c)
        self.mean = mean.astype(np.float32)
        self.std = std.astype(np.float32)

    def __call__(self, x01: np.ndarray) -> np.ndarray:
        """``[..., C]`` floats in [0, 1] -> normalised float32."""
        return ((x01 - self.mean) / self.std).astype(np.float32)

    def images(self, x_uint8: np.ndarray) -> np.ndarray:
        return self(x_uint8.astype(np.float32) / 255.0)


_SHM_DIR = Path("/dev/shm")  # where POSIX shared memory lives on Linux


@dataclasses.dataclass(frozen=True)
class _SharedArray:
    """Pickled stand-in for an array in a shared-memory block: a worker maps
    the block read-only instead of receiving (and keeping) a copy."""

    block: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def attach(self) -> np.ndarray:
        with open(_SHM_DIR / self.block, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(self.shape)
        flat = np.frombuffer(mm, np.dtype(self.dtype), count, self.offset)
        return flat.reshape(self.shape)


@contextlib.contextmanager
def _in_shared_memory(arrays: dict[str, np.ndarray]) -> Iterator[dict | None]:
    """Copy ``arrays`` into one shared-memory block for the life of the
    context; yields their :class:`_SharedArray` handles (``None`` where POSIX
    shared memory is not a file under /dev/shm: the arrays then travel by
    value).  The block is unlinked on exit; workers keep their mappings."""
    if not _SHM_DIR.is_dir():
        yield None
        return
    from multiprocessing import shared_memory

    size = sum(a.nbytes for a in arrays.values())
    block = shared_memory.SharedMemory(create=True, size=max(size, 1))
    try:
        handles, offset = {}, 0
        for key, a in arrays.items():
            a = np.ascontiguousarray(a)
            view = np.ndarray(a.shape, a.dtype, buffer=block.buf, offset=offset)
            view[...] = a
            del view  # no exported buffer may outlive the block
            handles[key] = _SharedArray(
                block.name.lstrip("/"), offset, a.shape, a.dtype.str
            )
            offset += a.nbytes
        yield handles
    finally:
        block.close()
        block.unlink()


class TrainBatches:
    """``batches(step) -> (x [B/H, H, W, C] float32, y)`` for this host.

    ``y`` is int32 ``[B/H]``, or float32 soft labels ``[B/H, K]`` when mixup or
    CutMix is on.  The last partial batch of each epoch is dropped.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        augment: AugmentConfig,
        num_classes: int,
        normalizer: Normalizer,
        process_index: int = 0,
        process_count: int = 1,
    ):
        n = len(x)
        if batch_size > n:
            raise ValueError(
                f"config.train.batch_size={batch_size} is larger than the training"
                f" set ({n} examples)."
            )
        if batch_size % process_count:
            raise ValueError(
                f"config.train.batch_size={batch_size} is not divisible by the"
                f" {process_count} hosts."
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.local_size = batch_size // process_count
        self.steps_per_epoch = n // batch_size
        self.seed = seed
        self.augment = augment
        self.num_classes = num_classes
        self.normalizer = normalizer
        self.process_index = process_index
        self._perm_epoch = -1
        self._perm = None

    def indices(self, step: int) -> np.ndarray:
        """Training-set rows of this host's part of global batch ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.x)
            )
            self._perm_epoch = epoch
        start = i * self.batch_size + self.process_index * self.local_size
        return self._perm[start : start + self.local_size]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_perm"], state["_perm_epoch"] = None, -1  # rebuilt on demand
        shared = state.pop("_shared", None)
        if shared is not None:
            state["x"], state["y"] = shared["x"], shared["y"]
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("x", "y"):
            if isinstance(state[key], _SharedArray):
                state[key] = state[key].attach()
        self.__dict__.update(state)

    @contextlib.contextmanager
    def shared(self) -> Iterator[TrainBatches]:
        """A copy of ``self`` that pickles its training arrays as handles to
        one shared-memory block (while the context lasts): worker processes
        map the images instead of each receiving and holding a copy, and the
        spawn payload stays small enough never to block on a dead worker."""
        with _in_shared_memory({"x": self.x, "y": self.y}) as handles:
            clone = copy.copy(self)
            if handles is not None:
                clone._shared = handles
            yield clone

    def __call__(self, step: int):
        idx = np.sort(self.indices(step))  # sorted: faster gathers, same set
        rng = np.random.default_rng([self.seed, 1, step, self.process_index])
        x, y = augment_batch(
            self.x[idx], self.y[idx], self.augment, self.num_classes, rng
        )
        return self.normalizer(x), y


def resolve_workers(workers: int) -> int:
    """``config.data.workers`` -> a process count: ``-1`` means one per CPU
    core this process may use, ``0`` no worker process (a background thread)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ValueError(
            f"config.data.workers must be an integer >= -1 (-1: one per core,"
            f" 0: a background thread), got {workers!r}."
        )
    if workers == -1:
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    return workers


class _StepBatch:
    """Picklable grain map ``step -> (step, x, y)`` (shipped to each worker)."""

    def __init__(self, make: Callable[[int], tuple]):
        self.make = make

    def __call__(self, step) -> tuple:
        x, y = self.make(int(step))
        return int(step), x, y


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_when_orphaned(parent: int, every: float = 1.0) -> None:
    """A worker whose trainer died (kill -9, a second Ctrl-C's ``os._exit``,
    the OOM killer) exits too instead of polling its queue for ever."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


class _WorkerInit:
    """grain ``worker_init_fn``: a worker ignores SIGINT and SIGTERM (a
    terminal's Ctrl-C and a preemption's SIGTERM reach the whole process group;
    the trainer checkpoints and stops the workers itself) and exits when the
    trainer's process is gone."""

    def __init__(self, parent: int):
        self.parent = parent

    def __call__(self, worker_index: int, worker_count: int) -> None:
        del worker_index, worker_count
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        threading.Thread(
            target=_exit_when_orphaned, args=(self.parent,), daemon=True
        ).start()


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18 reads its absl flags even when the program never parsed
    flags (google/grain#1355, fixed upstream after that release); a program
    without ``absl.app`` gets the flags' declared defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batch_stream(
    make: Callable[[int], tuple],
    steps: range,
    *,
    workers: int = 0,
    prefetch: int = 2,
) -> Iterator[tuple[int, tuple]]:
    """Yield ``(step, make(step))`` for ``steps`` in order, made by grain.

    ``workers=0``: one background thread reads up to ``prefetch`` batches
    ahead (augmentation overlaps device work).  ``workers=N``: ``N`` processes
    each keep ``prefetch`` batches ready; ``make`` is pickled to each of them
    (a :class:`TrainBatches` ships its images as a shared-memory handle).
    ``workers=-1``: one process per core.  The batches do not depend on
    ``workers``.  Workers ignore SIGINT/SIGTERM and exit with their parent;
    the caller's SIGINT/SIGTERM are ignored until the first batch arrives
    (see :func:`_stop_signals_ignored`).
    """
    workers = resolve_workers(workers)
    if prefetch < 1:
        raise ValueError(f"config.data.prefetch must be >= 1, got {prefetch}.")
    if steps.step != 1:
        raise ValueError(f"batch_stream: steps must be consecutive, got {steps}.")
    if len(steps) == 0:
        return
    _allow_unparsed_absl_flags()
    with contextlib.ExitStack() as stack:
        if workers > 0 and isinstance(make, TrainBatches):
            make = stack.enter_context(make.shared())
        yield from _grain_stream(make, steps, workers, prefetch)


def _grain_stream(
    make: Callable[[int], tuple], steps: range, workers: int, prefetch: int
) -> Iterator[tuple[int, tuple]]:
    ds = grain.MapDataset.range(steps.start, steps.stop).map(_StepBatch(make))
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    stream = ds.to_iter_dataset(read)
    if workers > 0:
        # batches travel pickled through grain's queues, not in shared-memory
        # segments: grain 0.2.18 unlinks those asynchronously and leaves the
        # last ones to the resource tracker (a warning at every exit); a
        # CIFAR batch is 1.5 MB, a copy of well under a millisecond
        stream = grain.experimental.WithOptionsIterDataset(
            stream, grain.experimental.DatasetOptions(min_shm_size=1 << 62)
        )
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=prefetch
            ),
            worker_init_fn=_WorkerInit(os.getpid()),
        )
    it = None
    try:
        with _stop_signals_ignored() if workers > 0 else contextlib.nullcontext():
            it = iter(stream)
            first = next(it, None)  # the workers start here
        if first is None:
            return
        step, x, y = first
        del first
        yield step, (x, y)
        for step, x, y in it:
            yield step, (x, y)
    finally:
        if it is not None:
            _close(it)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored while grain spawns its workers, up to the
    first batch.  An ignored disposition survives ``exec``, so the workers
    start immune (a signal in the seconds before :class:`_WorkerInit` runs
    would otherwise kill one half-way through its imports); the price is that
    a signal to the trainer in those seconds is dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _close(it) -> None:
    """Stop grain's threads and workers; best effort, so that an error here
    never replaces the one that ended the loop (e.g. the trainer's interrupt)."""
    close = getattr(it, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as err:  # noqa: BLE001 - reported, not raised
        logging.warning("dualflow: closing the input pipeline failed: %s", err)


def to_global(mesh, *arrays: np.ndarray):
    """Host-local batch slices -> global arrays sharded on the ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    nproc = jax.process_count()
    return tuple(
        jax.make_array_from_process_local_data(
            sharding, a, (a.shape[0] * nproc, *a.shape[1:])
        )
        for a in arrays
    )
