"""Training entry point: ``python scripts/train.py --config=configs/<name>.py``.

Without ``--config`` it runs ``configs/default.py`` (a Bayesian MLP trained with
belief propagation on scikit-learn digits; no download).  Any config field can be
overridden, e.g. ``--config.lr=1e-3 --config.backward=autodiff``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, _REPO)

config_flags.DEFINE_config_file(
    "config",
    os.path.join(_REPO, "configs", "default.py"),
    "Path to a config file (configs/<name>.py).",
    lock_config=True,
)
flags.DEFINE_string("workdir", "", "Directory for outputs (metrics JSON).")
flags.DEFINE_bool(
    "describe",
    False,
    "Print the model's parameter counts (last line 'params: N', the"
    " deterministic count) and exit; needs no data.",
)


def describe(cfg) -> str:
    """Build the config's model abstractly and describe its parameters."""
    from flax import nnx

    from dualflow import models
    from dualflow.data import dataset_info

    if "model" in cfg:
        name = cfg.model.name
        kwargs = dict(cfg.model.get("kwargs", {}))
        norm = cfg.model.get("norm", "published")
    else:  # the digits demo: an MLP on the 8x8 digits
        name, norm = "mlp", None
        kwargs = {"widths": tuple(cfg.hidden), "activation": cfg.activation}
    if norm == "published":
        norm = models.default_norm(name)
    elif norm in ("none", "None", "", None):
        norm = None
    info = dataset_info(cfg.dataset)
    model = nnx.eval_shape(
        lambda: models.build_model(
            name,
            num_classes=info.num_classes,
            input_shape=info.input_shape,
            norm=norm,
            rngs=nnx.Rngs(0),
            **kwargs,
        )
    )
    head = (
        f"model {name} (norm={norm}) on {cfg.dataset}: input"
        f" {info.input_shape}, {info.num_classes} classes"
    )
    return head + "\n" + models.describe(model)


def main(argv):
    del argv
    cfg = flags.FLAGS.config
    if flags.FLAGS.describe:
        print(describe(cfg))
        return
    if cfg.get("describe_only", False):
        raise app.UsageError(
            "this config only describes an architecture: add --describe (training"
            " configs are configs/<name>.py with data and optimiser settings)."
        )
    from dualflow.train import digits_demo

    digits_demo.train_and_evaluate(cfg, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
