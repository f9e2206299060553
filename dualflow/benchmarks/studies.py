"""Small shared pieces of the study scripts (``scripts/gradient_variance.py``,
``scripts/convergence.py``): data with an offline fallback, image arrays for
dense and convolutional models, and a plain validation split."""

from __future__ import annotations

import dataclasses

import numpy as np

from dualflow.data.images import ImageDataset, load_image_dataset
from dualflow.data.paths import DataNotFoundError, resolve_data_dir

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "StudyData",
    "fixed_subset",
    "load_study_data",
]

# one look for every study figure; labels follow Fig. 1 of the duality paper
METHOD_COLORS = {
    "bp": "C3",
    "reparam": "C0",
    "local_reparam": "C1",
    "flipout": "C2",
    "deterministic": "k",
}
METHOD_LABELS = {
    "bp": "BP",
    "reparam": "R",
    "local_reparam": "L",
    "flipout": "F",
    "deterministic": "vanilla",
}


@dataclasses.dataclass(frozen=True)
class StudyData:
    """Float32 arrays ready for a model, and where they came from.

    ``x_*``: ``[N, D]`` (flattened) or ``[N, H, W, C]``, standardised with the
    training set's pixel mean and std; ``y_*``: int32 labels.  ``note`` says
    when the requested data set was replaced by the fallback.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    note: str

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def split_validation(
        self, fraction: float, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_val, y_val)``: a random ``fraction`` of the
        training set held out (stratification is not needed at these sizes)."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}.")
        n = len(self.x_train)
        perm = np.random.default_rng(seed).permutation(n)
        n_val = int(round(fraction * n))
        val, tr = perm[:n_val], perm[n_val:]
        return (
            self.x_train[tr],
            self.y_train[tr],
            self.x_train[val],
            self.y_train[val],
        )


def load_study_data(
    name: str,
    fallback: str | None = "mnist_5k",
    data_dir: str | None = None,
    *,
    flatten: bool = True,
    pad_to: int | None = None,
) -> StudyData:
    """Load ``name`` (``fallback`` when its files are absent) as float arrays.

    Args:
      name, fallback: :func:`dualflow.data.load_image_dataset` names.
      data_dir: data folder; ``None`` uses ``$DUALFLOW_DATA_DIR``.
      flatten: ``[N, H*W*C]`` for dense models, else ``[N, H, W, C]``.
      pad_to: zero-pad (before standardising) images to ``pad_to x pad_to``,
        e.g. 28x28 MNIST to VGG's 32x32.
    """
    note = ""
    root = resolve_data_dir(data_dir)
    try:
        data: ImageDataset = load_image_dataset(name, root)
    except DataNotFoundError as err:
        if not fallback:
            raise
        note = f"{name} not found ({str(err).splitlines()[0]}); used {fallback} instead"
        print(f"dualflow: {note}")
        data = load_image_dataset(fallback, root)

    def prep(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        if pad_to is not None:
            h, w = x.shape[1:3]
            if h > pad_to or w > pad_to:
                raise ValueError(f"cannot pad {h}x{w} images to {pad_to}x{pad_to}.")
            ph, pw = pad_to - h, pad_to - w
            x = np.pad(
                x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
            )
        return x

    xtr, xte = prep(data.x_train), prep(data.x_test)
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if flatten:
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    return StudyData(
        name=data.name,
        x_train=xtr,
        y_train=data.y_train.astype(np.int32),
        x_test=xte,
        y_test=data.y_test.astype(np.int32),
        source=data.source,
        note=note,
    )


def fixed_subset(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` of ``n`` examples, the same for every call
    with the same ``seed``.  Use it instead of a prefix: the image files here
    (e.g. ``mnist_5k``) are sorted by class, so ``x[:size]`` holds few classes."""
    if not 0 < size <= n:
        raise ValueError(f"subset size must be in [1, {n}], got {size}.")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])
