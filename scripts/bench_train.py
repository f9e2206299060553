"""Wall time per epoch of a training config in every learning method.

    python scripts/bench_train.py                       # configs/mnist_mlp.py
    python scripts/bench_train.py --epochs=3 --methods=bp,reparam

Runs ``scripts/train.py``'s engine (``dualflow.train.trainer``) for each method
in one process and prints, per method: the steady-state seconds per epoch on
the data actually used (the first step, which compiles, is excluded), the
same extrapolated to full MNIST (60,000 training images at the config's batch
size), examples/s, the ratio to ``deterministic``, and the test metrics.
Writes ``<out>/epoch_times.json`` and ``.md`` (atomically).
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_string("config", "configs/mnist_mlp.py", "Config file (takes a method).")
flags.DEFINE_string(
    "methods",
    "deterministic,bp,reparam,local_reparam,flipout,mc_dropout,ensemble",
    "Comma-separated methods.",
)
flags.DEFINE_integer("epochs", 2, "Epochs per method.")
flags.DEFINE_integer("full_train_size", 60_000, "Training-set size to extrapolate to.")
flags.DEFINE_string("out", "results/train", "Output folder.")


def _load(path: str, method: str):
    """The config file's ``get_config(method)``; mistakes end in one line."""
    from dualflow.train.config import load_config_file

    try:
        return load_config_file(path, method)
    except SyntaxError as err:
        cli.fail(
            f"--config: {path} is not a Python config file"
            f" (line {err.lineno}: {err.msg})"
        )
    except (TypeError, AttributeError) as err:  # no get_config(method)
        cli.fail(
            f"--config: {path} has no get_config(method) ({err})",
            "pass a config that takes a method, e.g. configs/mnist_mlp.py",
        )


def main(argv: list[str]) -> None:
    """Train the config once per method and tabulate the epoch times."""
    del argv
    logging.set_verbosity(logging.WARNING)
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic
    from dualflow.nn.context import METHODS
    from dualflow.train.trainer import train_and_evaluate

    F = flags.FLAGS
    methods = cli.parse_list(F.methods, "methods", choices=METHODS)
    for name in ("epochs", "full_train_size"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    path = os.path.join(_REPO, F.config)
    cfgs = {m: _load(path, m) for m in methods}  # every mistake before training
    rows = []
    for method in methods:
        cfg = cfgs[method]
        cfg.train.num_epochs = F.epochs
        cfg.train.num_steps = 0
        cfg.train.plot = False
        cfg.train.progress = False
        with tempfile.TemporaryDirectory() as wd:
            try:
                s = train_and_evaluate(cfg, wd)
            except FloatingPointError as err:
                cli.diverged(err)
        full_steps = F.full_train_size // cfg.train.batch_size
        rows.append(
            {
                "method": method,
                "dataset": s["dataset"],
                "n_train": s["n_train"],
                "batch_size": cfg.train.batch_size,
                "epochs": s["epochs"],
                "seconds_per_step": s["seconds_per_step"],
                "seconds_per_epoch": s["seconds_per_epoch"],
                "seconds_per_full_epoch": s["seconds_per_step"] * full_steps,
                "examples_per_sec": s["examples_per_sec"],
                "test_accuracy": s["test_accuracy"],
                "test_nll": s["test_nll"],
                "test_ece": s["test_ece"],
            }
        )
    det = {r["method"]: r["seconds_per_step"] for r in rows}.get("deterministic")
    for r in rows:
        r["vs_deterministic"] = r["seconds_per_step"] / det if det else None
    head = (
        "| method | s/epoch here | s/epoch at 60k | examples/s | x deterministic |"
        " test acc | test NLL | ECE |\n|---|---|---|---|---|---|---|---|\n"
    )
    table = head + "".join(
        f"| {r['method']} | {r['seconds_per_epoch']:.2f} |"
        f" {r['seconds_per_full_epoch']:.1f} | {r['examples_per_sec']:.0f} |"
        f" {r['vs_deterministic'] or float('nan'):.2f} | {r['test_accuracy']:.4f} |"
        f" {r['test_nll']:.4f} | {r['test_ece']:.4f} |\n"
        for r in rows
    )
    r0 = rows[0]
    note = (
        f"{F.config}, {F.epochs} epochs of {r0['dataset']} ({r0['n_train']} train),"
        f" batch {r0['batch_size']}; commit {git_commit(_REPO)}\n\n"
    )
    print(note + table)
    os.makedirs(F.out, exist_ok=True)
    write_json_atomic(
        os.path.join(F.out, "epoch_times.json"),
        {"config": F.config, "commit": git_commit(_REPO), "rows": rows},
        indent=2,
    )
    write_text_atomic(os.path.join(F.out, "epoch_times.md"), note + table)


if __name__ == "__main__":
    cli.run(main, allow_args=False)
