"""Training: the config-driven loop of ``scripts/train.py`` and a small ``fit``."""

from dualflow.train.checkpoints import CheckpointStore, verify_checkpoint
from dualflow.train.config import (
    METHOD_ROWS,
    ConfigError,
    apply_method_row,
    base_config,
    image_recipe,
    load_config_file,
    validate_config,
)
from dualflow.train.fit import fit, make_loss_fn, make_pure_step, make_train_step
from dualflow.train.interrupts import InterruptGuard
from dualflow.train.scan import make_scan_fit
from dualflow.train.trainer import TrainState, train_and_evaluate

__all__ = [
    "METHOD_ROWS",
    "CheckpointStore",
    "ConfigError",
    "InterruptGuard",
    "TrainState",
    "apply_method_row",
    "base_config",
    "fit",
    "image_recipe",
    "load_config_file",
    "make_loss_fn",
    "make_pure_step",
    "make_scan_fit",
    "make_train_step",
    "train_and_evaluate",
    "validate_config",
    "verify_checkpoint",
]
