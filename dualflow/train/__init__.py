"""Training code: a small loop for any learning method, and the digits demo."""

from dualflow.train.fit import fit, make_train_step
from dualflow.train.scan import make_scan_fit

__all__ = ["fit", "make_scan_fit", "make_train_step"]
