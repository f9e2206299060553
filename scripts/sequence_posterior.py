"""Smoothed hidden states of a trained bp IndRNN (issue 20: the duality for sequences).

    python scripts/sequence_posterior.py            # T=50, ~1 min on 2 CPU cores
    python scripts/sequence_posterior.py --quick --out_dir=/tmp/post   # seconds

Trains a 2-layer bp IndRNN on the adding problem, then reads the filtered
and smoothed hidden-state moments of one test sequence off the BP backward
pass (:func:`dualflow.nn.hidden_state_posterior`) and plots them.  Writes
``<out_dir>/posterior.png`` and ``<out_dir>/posterior.json``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_integer("seq_len", 50, "Sequence length T of the adding problem.")
flags.DEFINE_integer("epochs", 20, "Epochs over the training sequences.")
flags.DEFINE_integer("seed", 0, "Seed (data, initialisation, batches).")
flags.DEFINE_string("out_dir", "results/sequence", "Output folder.")
flags.DEFINE_bool("quick", False, "Tiny run for tests (seconds).")


def main(argv: list[str]) -> None:
    """Train, read off the smoothed states, plot (mistakes: one error line)."""
    del argv  # positional arguments are refused by cli.run
    from dualflow.benchmarks.rnn_posterior import PosteriorConfig, run_posterior_study

    F = flags.FLAGS
    if F.seq_len < 2:
        cli.fail(f"--seq_len: must be >= 2, got {F.seq_len}")
    if F.epochs < 1:
        cli.fail(f"--epochs: must be >= 1, got {F.epochs}")
    cfg = PosteriorConfig(seq_len=F.seq_len, epochs=F.epochs, seed=F.seed)
    if F.quick:
        cfg = dataclasses.replace(
            cfg,
            seq_len=min(cfg.seq_len, 8),
            hidden=4,
            depth=1,
            n_train=100,
            n_test=20,
            epochs=1,
            units=2,
        )
    try:
        s = run_posterior_study(cfg, F.out_dir, progress=not F.quick)
    except FloatingPointError as err:  # training diverged (dualflow.train.fit)
        cli.diverged(err)
    print(
        f"test MSE {s['test_mse']:.4f} (predict-1.0 baseline ~0.167), train"
        f" {s['train_seconds']:.0f} s; sequence target {s['target']:.3f}, predictive"
        f" {s['predictive_mean']:.3f} ± {s['predictive_var'] ** 0.5:.3f}"
    )
    for u in s["units"]:
        print(
            f"  unit {u['unit']}: max |smoothed - filtered| mean"
            f" {u['max_mean_shift']:.4f},"
            f" mean var ratio smoothed/filtered {u['mean_var_ratio']:.3f}"
        )
    print(f"wrote {os.path.join(F.out_dir, 'posterior.png')} and posterior.json")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
