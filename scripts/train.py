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


def main(argv):
    del argv
    from dualflow.train import digits_demo

    digits_demo.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
