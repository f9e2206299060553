"""Residual memory of BP through time vs autodiff (issue 20, item 4).

    # T = 1000, N = 32, H = 128: the docs/benchmarks.md figures (~10 min, 2 CPUs)
    python scripts/bench_rnn_memory.py --seq_len=1000 --repeats=7
    # tiny sizes, about a minute
    python scripts/bench_rnn_memory.py --seq_len=16 --batch=4 --hidden=8
        --out=results/tmp/rnn_memory_quick.json

For an IndRNN (ReLU) and a simple RNN (tanh), at the level of the pure moment
scan (``dualflow.moments.indrnn`` / ``simple_rnn`` on ``dense(x)``, dense
head) and of a 2-layer ``SequenceNet`` under ``dualflow.nn.objective``, and
for ``backward="bp"``, ``backward="autodiff"`` and the deterministic network:
residual bytes kept for the backward pass (total, per step, in ``[N, H]``
arrays, what the scan saves once), the XLA temp bytes of the compiled
gradient and the step time (:mod:`dualflow.benchmarks.rnn_memory`).  Prints a
markdown table and writes ``--out`` (JSON, atomic) and the table next to it
(``.md``).  Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_integer("seq_len", 1000, "Sequence length T.")
flags.DEFINE_integer("batch", 32, "Batch size N.")
flags.DEFINE_integer("hidden", 128, "Hidden units H.")
flags.DEFINE_integer("in_features", 2, "Input features D.")
flags.DEFINE_integer("depth", 2, "Recurrent layers of the SequenceNet (model level).")
flags.DEFINE_enum(
    "mode", "linearized", ["linearized", "matched"], "Activation moments."
)
flags.DEFINE_list("levels", ["moments", "model"], "Levels: moments, model.")
flags.DEFINE_list("cells", ["indrnn", "srn"], "Cells: indrnn, srn.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (median; variants take turns).")
flags.DEFINE_string("out", "results/rnn_memory/bench.json", "JSON output path.")


def main(argv: list[str]) -> None:
    """Check the flags, run the benchmark, print and write the table."""
    del argv
    from dualflow.benchmarks.rnn_memory import CELLS, LEVELS, Config, run_benchmark
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    F = flags.FLAGS
    levels = cli.parse_list(F.levels, "levels", choices=LEVELS)
    cells = cli.parse_list(F.cells, "cells", choices=CELLS)
    for name in ("seq_len", "batch", "hidden", "in_features", "depth", "repeats"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    cfg = Config(
        seq_len=F.seq_len,
        batch=F.batch,
        hidden=F.hidden,
        in_features=F.in_features,
        depth=F.depth,
        mode=F.mode,
    )
    t0 = time.perf_counter()
    result = run_benchmark(
        cfg,
        levels=levels,
        cells=cells,
        repeats=F.repeats,
        log=lambda s: print(s, flush=True),
    )
    command = "python scripts/bench_rnn_memory.py " + " ".join(sys.argv[1:])
    result["command"] = command.strip()
    result["commit"] = git_commit(_REPO)
    result["seconds"] = time.perf_counter() - t0
    note = (
        f"`{result['command']}`: T={cfg.seq_len}, N={cfg.batch}, H={cfg.hidden},"
        f" D={cfg.in_features}, {cfg.mode}; jax {result['jax']} on"
        f" {result['platform']}, commit {result['commit']},"
        f" {result['seconds']:.0f} s\n\n"
    )
    print(note + result["table"])
    out = F.out if os.path.isabs(F.out) else os.path.join(os.getcwd(), F.out)
    write_json_atomic(out, result)
    write_text_atomic(os.path.splitext(out)[0] + ".md", note + result["table"] + "\n")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
