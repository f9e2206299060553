"""Host-side input pipeline: deterministic batches, augmentation, sharding.

Batch ``s`` of a run is a pure function of ``(seed, s)``: epoch ``e = s //
steps_per_epoch`` visits the training set in the order
``default_rng([seed, e]).permutation(n)`` and the batch is augmented with
``default_rng([seed, 1, s, host])``.  A resumed run therefore sees exactly the
batches the uninterrupted run would have seen.  Each host prepares only its
slice of the global batch (rows ``[host * B/H, (host + 1) * B/H)``), and
:func:`to_global` assembles the slices into one array sharded over the mesh's
``data`` axis.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualflow.data.augment import AugmentConfig, augment_batch

__all__ = ["Normalizer", "TrainBatches", "prefetch", "to_global"]


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

    def __call__(self, step: int):
        idx = np.sort(self.indices(step))  # sorted: faster gathers, same set
        rng = np.random.default_rng([self.seed, 1, step, self.process_index])
        x, y = augment_batch(
            self.x[idx], self.y[idx], self.augment, self.num_classes, rng
        )
        return self.normalizer(x), y


def prefetch(
    make: Callable[[int], tuple], steps: range, depth: int = 2
) -> Iterator[tuple[int, tuple]]:
    """Yield ``(step, make(step))`` for ``steps``, preparing up to ``depth``
    batches ahead in a background thread (augmentation overlaps device work)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = []
        it = iter(steps)
        for s in it:
            pending.append((s, pool.submit(make, s)))
            if len(pending) >= depth:
                break
        while pending:
            s, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(make, nxt)))
            yield s, fut.result()


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
