"""UCI regression benchmark (the duality paper's Table 2) on the standard splits.

    python scripts/uci.py --config=configs/uci.py                 # full table
    python scripts/uci.py --config=configs/uci.py --config.quick=True
    python scripts/uci.py --config=configs/uci.py \\
        --config.datasets=boston,yacht --config.methods=bp,ensemble --config.splits=0,1

Each (data set, method) group searches ``config.search_budget`` hyper-parameter
candidates per split on an inner validation split of the training rows,
retrains the chosen one and evaluates the test rows once
(``dualflow/benchmarks/uci_search.py``); records carry the ``chosen`` setting.

Resumable: finished (data set, method, split) records in
``<workdir>/results.json`` with the same config fingerprint are skipped; the
file is rewritten atomically after every (data set, method) group.  At the
end ``table.md``, ``table.json`` and ``uci.png`` are written next to it.

Every record stores the fingerprint of the data and split it was computed on.
If the data on disk changed since (or a record predates fingerprints), the run
refuses before writing anything and says which data sets changed: move the
workdir away, or pass ``--config.rerun_changed=True`` to rerun exactly those
records (their old versions are replaced).  Records written before
fingerprints existed can instead be stamped with the current data's
fingerprint by ``--config.adopt_unfingerprinted=True`` -- only when you know
the data is unchanged (e.g. ``sha256sum -c SHA256SUMS`` in the data folder).

``--config.quick=True`` shrinks the fields of :data:`QUICK` that were not given
on the command line (explicit ``datasets``/``methods``/``splits``/budgets win)
and writes to ``results/uci_quick`` unless a workdir is given.

Every user mistake (an unknown data set, method or split, an invalid
results.json, missing or malformed data, changed data, a diverged group) ends
in one ``error:`` line (and a ``hint:``) with exit code 2.  A diverged group is
stored as such, marked "diverged" in the tables (never "best"), and the run
exits with 2 after writing them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dualflow import cli

_REPO = Path(__file__).resolve().parents[1]
_CONFIG = cli.define_config_file(
    "config",
    str(_REPO / "configs" / "uci.py"),
    "UCI benchmark config (configs/uci.py).",
)
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
FLAGS = flags.FLAGS


def _explicit_fields() -> set[str]:
    """Config fields given on the command line (``--config.<field>=...``)."""
    try:
        return set(config_flags.get_override_values(FLAGS["config"]))
    except (AttributeError, KeyError):  # older ml_collections: read argv
        return {
            a[len("--config.") :].split("=")[0]
            for a in sys.argv[1:]
            if a.startswith("--config.")
        }


def _command() -> str:
    """The command as run, the script relative to the repo root when inside it."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(_REPO):
        script = script.relative_to(_REPO)
    return "python " + " ".join([script.as_posix(), *sys.argv[1:]])


def main(argv: list[str]) -> int:
    """Run the benchmark of ``--config`` (:mod:`dualflow.benchmarks.uci_run`)."""
    if len(argv) > 1:
        cli.fail(
            f"unexpected arguments: {' '.join(argv[1:])}",
            "config fields are set as --config.<field>=<value>",
        )
    # imports after flag parsing: keep --help fast
    from dualflow.benchmarks.uci_run import run_uci_benchmark
    from dualflow.io import git_commit

    return run_uci_benchmark(
        FLAGS.config,
        explicit=_explicit_fields(),
        workdir=FLAGS.workdir,
        command=_command(),
        commit=lambda: git_commit(_REPO),  # the code that ran
    )


if __name__ == "__main__":
    cli.run(main)
