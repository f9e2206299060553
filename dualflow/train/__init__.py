"""Training code: a small loop for any learning method, and the digits demo."""

from dualflow.train.fit import fit, make_train_step

__all__ = ["fit", "make_train_step"]
