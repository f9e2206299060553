"""Training entry point: ``python scripts/train.py --config=configs/<name>.py``.

Without ``--config`` it runs ``configs/default.py`` (a Bayesian MLP trained with
belief propagation on scikit-learn digits; no download).  Any config field can be
overridden, e.g. ``--config.optimizer.lr=0.05 --config.method.name=reparam``.

Outputs go to ``--workdir`` (default: a new ``runs/<config>-<time>`` folder);
running again with the same ``--workdir`` resumes from its last checkpoint.
``--describe`` prints the model's parameter counts and exits (no data needed).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

cli.define_config_file(
    "config",
    os.path.join(_REPO, "configs", "default.py"),
    "Path to a config file (configs/<name>.py).",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir",
    "",
    "Output directory (config, metrics.jsonl, summary.json, curves.png,"
    " checkpoints/); an existing one is resumed.  Default: runs/<config>-<time>.",
)
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
    from dualflow.train.config import _model_norm
    from dualflow.train.trainer import model_kwargs

    name = cfg.model.name
    kwargs = model_kwargs(cfg)
    norm = _model_norm(cfg)
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
    cfg = flags.FLAGS.config
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    if flags.FLAGS.describe:
        print(describe(cfg))
        return
    if cfg.get("describe_only", False):
        cli.fail(
            "this config only describes an architecture: add --describe (training"
            " configs are configs/<name>.py with data and optimiser settings)."
        )
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from dualflow.train.trainer import train_and_evaluate

    train_and_evaluate(cfg, flags.FLAGS.workdir or _default_workdir())


def _default_workdir() -> str:
    import time

    path = flags.FLAGS["config"].config_filename or "default"
    stem = os.path.basename(path).removesuffix(".py").replace(":", "-")
    return os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


if __name__ == "__main__":
    cli.run(main)
