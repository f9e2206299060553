"""scikit-learn's 8x8 handwritten digits (UCI optdigits test set, 1797 images).

Ships with scikit-learn, so it needs no download: the offline default data set.
"""

from __future__ import annotations

import numpy as np

__all__ = ["load_sklearn_digits"]


def load_sklearn_digits(seed: int = 0, test_fraction: float = 0.2):
    """Stratified train/test split of the digits, pixels scaled to [0, 1].

    Returns:
      ``(x_train [n, 64] float32, y_train [n] int32, x_test, y_test)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return xtr, ytr, xte, yte
