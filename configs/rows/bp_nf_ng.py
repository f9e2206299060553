"""Table 1 row ``BP/NF+NG``: belief propagation with the natural gradient, no normalisation.

    python scripts/train.py --config=configs/rows/bp_nf_ng.py  # WRN-28-10, CIFAR-100
    python scripts/train.py --config=configs/rows/bp_nf_ng.py:cifar10_resnet

The argument names a base config in configs/ that takes a row argument
(cifar10_resnet, cifar100_wrn, tinyimagenet_densenet); the row's overrides are
``dualflow.train.config.METHOD_ROWS["bp_nf_ng"]``.
"""

import os

from dualflow.train.config import load_config_file

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(base: str = "cifar100_wrn"):
    return load_config_file(os.path.join(_CONFIGS, base + ".py"), "bp_nf_ng")
