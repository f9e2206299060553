"""scikit-learn's 8x8 handwritten digits (UCI optdigits test set, 1797 images).

Ships with scikit-learn, so it needs no download: the offline default data set.
"""

from __future__ import annotations

import numpy as np

from dualflow.data.validate import check_labels, check_range, data_error
from dualflow.errors import ConfigError

__all__ = ["load_sklearn_digits"]


def load_sklearn_digits(seed: int = 0, test_fraction: float = 0.2):
    """Stratified train/test split of the digits, pixels scaled to [0, 1].

    The arrays scikit-learn returns are checked (shape ``[N, 64]``, finite
    values in 0..16, labels 0..9); a damaged installation raises a
    :class:`~dualflow.errors.DataError` naming the first bad entry.

    Returns:
      ``(x_train [n, 64] float32, y_train [n] int32, x_test, y_test)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    d = load_digits()
    x, y = _checked(np.asarray(d.data), np.asarray(d.target))
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return xtr, ytr, xte, yte


_WHERE = "sklearn.datasets.load_digits()"


def _checked(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate scikit-learn's digits arrays (``[N, 64]`` in 0..16, labels 0..9)."""
    if x.ndim != 2 or x.shape[1] != 64 or len(x) == 0:
        raise data_error(
            "sklearn_digits", _WHERE, f"data has shape {x.shape}, expected [N, 64]"
        )
    check_range(x, "sklearn_digits", _WHERE, "pixel", 0, 16)
    check_labels(y, "sklearn_digits", _WHERE, "the", 10, n=len(x))
    return x, y
