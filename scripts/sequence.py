"""Recurrent networks (issue 20): the adding problem and row-by-row MNIST.

    python scripts/sequence.py                                  # full study
    python scripts/sequence.py --studies=adding --seq_lens=100  # one part
    python scripts/sequence.py --quick --out_dir=/tmp/seq       # CI smoke run

The committed ``results/sequence`` came from (each call adds to or replaces
records of the previous ones)::

    python scripts/sequence.py
    python scripts/sequence.py --studies=adding --seq_lens=100 --adding_seeds=0,1,2
    python scripts/sequence.py --studies=mnist --epochs=25 --rerun
    python scripts/sequence.py --studies=adding --seq_lens=1000 --rerun
        --adding_steps=1000:2000 --adding_methods=deterministic,bp    # (one line)
    python scripts/sequence.py --studies=adding --seq_lens=1000 --rerun
        --adding_steps=1000:2000 --adding_methods=reparam             # (one line)
    python scripts/sequence.py --studies=adding --seq_lens=100 --rerun
        --adding_seeds=0,1,2 --adding_methods=reparam                 # (one line)
    python scripts/sequence.py --studies=adding --seq_lens=500 --rerun
        --adding_methods=reparam                                      # (one line)

Study logic: :mod:`dualflow.benchmarks.sequence` (protocols in its
docstrings).  Writes ``<out_dir>/results.json`` (records with ``task``,
``method``, ``seq_len``, ``seed``, ``test_mse`` or ``test_accuracy``,
``test_nll``, ``seconds``, ...; rewritten atomically after every run, finished
records skipped on a rerun unless ``--rerun``), ``results.md`` and the plots
``adding_mse.png`` and ``mnist.png``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_string("studies", "adding,mnist", "Comma-separated: adding, mnist.")
flags.DEFINE_string("out_dir", "results/sequence", "Output folder.")
flags.DEFINE_bool(
    "rerun",
    False,
    "Repeat the selected runs even when results.json has them (their records are"
    " replaced; others kept).",
)
flags.DEFINE_bool("progress", False, "tqdm bars (the one-line logs are always on).")
# adding problem
flags.DEFINE_string("seq_lens", "100,500,1000", "Adding problem: sequence lengths T.")
flags.DEFINE_string("adding_methods", "bp,deterministic,reparam", "Adding: methods.")
flags.DEFINE_string("adding_seeds", "0", "Adding: comma-separated seeds.")
flags.DEFINE_string(
    "adding_steps", "100:2000,500:1000,1000:600", "Adding: T:steps pairs (CPU budget)."
)
flags.DEFINE_integer("eval_every", 100, "Adding: test MSE every this many steps.")
flags.DEFINE_integer("n_test", 1000, "Adding: fixed test sequences.")
flags.DEFINE_float(
    "adding_lr",
    1e-3,
    "Adding: Adam learning rate (IndRNN paper: 2e-4; 1e-3 fits the CPU budget).",
)
flags.DEFINE_float("noise_var", 0.01, "Adding: Gaussian likelihood noise variance.")
# MNIST
flags.DEFINE_string("tasks", "sequential_mnist,permuted_mnist", "MNIST tasks.")
flags.DEFINE_string("mnist_methods", "none,dropout,pcff,bp", "MNIST: methods.")
flags.DEFINE_string("mnist_seeds", "0,1,2", "MNIST: comma-separated seeds.")
flags.DEFINE_integer("epochs", 12, "MNIST: epochs (best validation epoch tested).")
flags.DEFINE_integer("depth", 6, "MNIST: IndRNN layers.")
flags.DEFINE_integer("hidden", 128, "MNIST: units per layer.")
flags.DEFINE_float("mnist_lr", 1e-3, "MNIST: Adam learning rate.")
flags.DEFINE_bool(
    "quick",
    False,
    "Smoke run: adding T=10, 100 steps, 16 units, n_test 100;"
    " MNIST 2 layers x 16, 2 epochs, 1 seed (every method and task).",
)


def _split(value: str, allowed=None, what: str = "") -> list[str]:
    """Comma-separated ``--what``; an empty or unknown item: one error line."""
    return cli.parse_list(value, what, choices=allowed)


def _ints(value: str, what: str) -> tuple[int, ...]:
    """Comma-separated integers of ``--what`` (one error line otherwise)."""
    return tuple(cli.parse_list(value, what, type=int))


def main(argv: list[str]) -> None:
    """Run the chosen studies (usage mistakes: one error line, nothing written)."""
    del argv
    logging.set_verbosity(logging.WARNING)
    from dualflow.benchmarks import sequence as seq
    from dualflow.io import git_commit

    F = flags.FLAGS
    studies = _split(F.studies, ("adding", "mnist"), "studies")
    pairs = _split(F.adding_steps, None, "adding_steps")
    try:
        steps = tuple((int(a), int(b)) for a, b in (p.split(":") for p in pairs))
    except ValueError:
        cli.fail(
            f"--adding_steps: T:steps pairs such as 100:2000, got {F.adding_steps!r}"
        )
    seq_lens = _ints(F.seq_lens, "seq_lens")
    if min(seq_lens) < 2:
        cli.fail(f"--seq_lens: every T must be >= 2, got {F.seq_lens!r}")
    adding = seq.AddingConfig(
        seq_lens=seq_lens,
        methods=tuple(_split(F.adding_methods, seq.ADDING_METHODS, "adding_methods")),
        seeds=_ints(F.adding_seeds, "adding_seeds"),
        steps=steps,
        eval_every=F.eval_every,
        n_test=F.n_test,
        lr=F.adding_lr,
        noise_var=F.noise_var,
    )
    mnist = seq.MnistConfig(
        tasks=tuple(_split(F.tasks, seq.MNIST_TASKS, "tasks")),
        methods=tuple(_split(F.mnist_methods, seq.MNIST_METHODS, "mnist_methods")),
        seeds=_ints(F.mnist_seeds, "mnist_seeds"),
        epochs=F.epochs,
        depth=F.depth,
        hidden=F.hidden,
        lr=F.mnist_lr,
    )
    if F.quick:
        adding, mnist = seq.quick_configs(adding, mnist)
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(_REPO):
        script = script.relative_to(_REPO)
    command = "python " + " ".join([script.as_posix(), *sys.argv[1:]])
    doc = seq.run_study(
        F.out_dir,
        adding=adding if "adding" in studies else None,
        mnist=mnist if "mnist" in studies else None,
        command=command,
        commit=git_commit(_REPO),
        rerun=F.rerun,
        progress=F.progress,
        log=lambda s: print(s, flush=True),
    )
    print((Path(F.out_dir) / "results.md").read_text())
    print(f"wrote {F.out_dir}/results.json ({len(doc['records'])} records)", flush=True)


if __name__ == "__main__":
    cli.run(main, allow_args=False)
