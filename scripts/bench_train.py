"""Wall time per epoch of a training config in every learning method.

    python scripts/bench_train.py                       # configs/mnist_mlp.py
    python scripts/bench_train.py --epochs=3 --methods=bp,reparam

Runs ``scripts/train.py``'s engine (``dualflow.train.trainer``) for each method
in one process and prints, per method: the steady-state seconds per epoch on
the data actually used (the first step, which compiles, is excluded), the
same extrapolated to full MNIST (60,000 training images at the config's batch
size), examples/s, the ratio to ``deterministic``, and the test metrics.

Next to the trainer's per-step time it measures, in the same run, the bare
step: the trainer's own jitted step on a device-resident batch, called back to
back (``dualflow.train.trainer.BareStep``) in a burst at every log step of the
trainer run (off the trainer's clock), so trainer windows and bare bursts
alternate every few seconds; it prints both ratios to ``deterministic`` and
the loop's own factor per method ("trainer / bare": per round, trainer over
bare seconds per step, median over rounds) and that relative to
``deterministic``'s ("loop / bare": 1.00 means the loop adds no
method-dependent cost).  With ``--repeats=R`` the methods take turns R times
and the medians are reported.  Writes ``<out>/epoch_times.json`` and ``.md``
(atomically).
"""

from __future__ import annotations

import os
import statistics
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
flags.DEFINE_integer("repeats", 1, "Rounds over the methods (medians reported).")
flags.DEFINE_integer("bare_steps", 20, "Steps per burst of the bare-step timing.")
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


def _train_once(cfg, bare_steps: int) -> tuple[dict, list[float]]:
    """One trainer run of ``cfg`` in a temporary workdir, with a burst of the
    bare step at every log step (off the trainer's clock, so the two
    alternate every few seconds and load drift hits both); (summary, bare
    seconds per step of each burst)."""
    from dualflow.train.trainer import BareStep, train_and_evaluate

    bare = BareStep(cfg)
    bare.burst(bare_steps)  # warm-up
    every = int(cfg.train.log_every)
    bursts: list[float] = []

    def on_step(done: int) -> None:
        if done % every == 0:
            bursts.append(bare.burst(bare_steps))

    with tempfile.TemporaryDirectory() as wd:
        try:
            summary = train_and_evaluate(cfg, wd, on_step=on_step)
        except FloatingPointError as err:
            cli.diverged(err)
    return summary, bursts


def _measure(cfgs: dict, repeats: int, bare_steps: int) -> dict[str, dict]:
    """Per method: trainer summaries and bare-step seconds (median of the
    run's bursts) of every round; methods take turns."""
    out = {m: {"summaries": [], "bare": []} for m in cfgs}
    for _ in range(repeats):
        for method, cfg in cfgs.items():
            summary, bursts = _train_once(cfg, bare_steps)
            out[method]["summaries"].append(summary)
            out[method]["bare"].append(statistics.median(bursts))
    return out


def _row(method: str, cfg, got: dict, full_train_size: int) -> dict:
    s = got["summaries"][-1]
    per_step = statistics.median(x["seconds_per_step"] for x in got["summaries"])
    spe = s["seconds_per_epoch"] / s["seconds_per_step"]  # steps per epoch
    return {
        "method": method,
        "dataset": s["dataset"],
        "n_train": s["n_train"],
        "batch_size": cfg.train.batch_size,
        "epochs": s["epochs"],
        "seconds_per_step": per_step,
        "seconds_per_epoch": per_step * spe,
        "seconds_per_full_epoch": per_step * (full_train_size // cfg.train.batch_size),
        "examples_per_sec": cfg.train.batch_size / per_step,
        "bare_seconds_per_step": statistics.median(got["bare"]),
        "trainer_seconds_per_step_runs": [
            x["seconds_per_step"] for x in got["summaries"]
        ],
        "bare_seconds_per_step_runs": got["bare"],
        "test_accuracy": s["test_accuracy"],
        "test_nll": s["test_nll"],
        "test_ece": s["test_ece"],
    }


def _add_ratios(rows: list[dict]) -> None:
    """Ratios to ``deterministic`` (of the median times) and the loop's own
    factor: ``trainer_over_bare`` = median over rounds of trainer / bare
    seconds per step (paired: measured in the same run), ``loop_over_bare``
    = that divided by deterministic's (1.00: no method-dependent cost)."""
    for r in rows:
        trainer = r["trainer_seconds_per_step_runs"]
        bare = r["bare_seconds_per_step_runs"]
        pairs = zip(trainer, bare, strict=True)
        r["trainer_over_bare"] = statistics.median(t / b for t, b in pairs)
    det = {r["method"]: r for r in rows}.get("deterministic")
    for r in rows:
        r["vs_deterministic"] = (
            r["seconds_per_step"] / det["seconds_per_step"] if det else None
        )
        r["bare_vs_deterministic"] = (
            r["bare_seconds_per_step"] / det["bare_seconds_per_step"] if det else None
        )
        r["loop_over_bare"] = (
            r["trainer_over_bare"] / det["trainer_over_bare"] if det else None
        )


def _table(rows: list[dict]) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    head = (
        "| method | s/epoch here | s/epoch at 60k | examples/s | trainer ms/step |"
        " bare ms/step | x det (trainer) | x det (bare step) | trainer / bare |"
        " loop / bare | test acc | test NLL | ECE |\n" + "|---" * 13 + "|\n"
    )
    return head + "".join(
        f"| {r['method']} | {r['seconds_per_epoch']:.2f} |"
        f" {r['seconds_per_full_epoch']:.1f} | {r['examples_per_sec']:.0f} |"
        f" {1e3 * r['seconds_per_step']:.1f} | {1e3 * r['bare_seconds_per_step']:.1f} |"
        f" {f(r['vs_deterministic'], '.2f')} | {f(r['bare_vs_deterministic'], '.2f')} |"
        f" {r['trainer_over_bare']:.3f} | {f(r['loop_over_bare'], '.3f')} |"
        f" {r['test_accuracy']:.4f} |"
        f" {r['test_nll']:.4f} | {r['test_ece']:.4f} |\n"
        for r in rows
    )


def main(argv: list[str]) -> None:
    """Train the config once per method and tabulate the epoch times."""
    del argv
    logging.set_verbosity(logging.WARNING)
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic
    from dualflow.nn.context import METHODS

    F = flags.FLAGS
    methods = cli.parse_list(F.methods, "methods", choices=METHODS)
    for name in ("epochs", "full_train_size", "repeats", "bare_steps"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    path = os.path.join(_REPO, F.config)
    cfgs = {m: _load(path, m) for m in methods}  # every mistake before training
    for cfg in cfgs.values():
        cfg.train.num_epochs = F.epochs
        cfg.train.num_steps = 0
        cfg.train.plot = False
        cfg.train.progress = False
    got = _measure(cfgs, F.repeats, F.bare_steps)
    rows = [_row(m, cfgs[m], got[m], F.full_train_size) for m in methods]
    _add_ratios(rows)
    table = _table(rows)
    r0 = rows[0]
    note = (
        f"{F.config}, {F.epochs} epochs of {r0['dataset']} ({r0['n_train']} train),"
        f" batch {r0['batch_size']}, {F.repeats} round(s) (medians), bare step:"
        f" median of {F.bare_steps}-call bursts at each log step;"
        f" commit {git_commit(_REPO)}\n\n"
    )
    print(note + table)
    os.makedirs(F.out, exist_ok=True)
    write_json_atomic(
        os.path.join(F.out, "epoch_times.json"),
        {
            "config": F.config,
            "epochs": F.epochs,
            "repeats": F.repeats,
            "commit": git_commit(_REPO),
            "rows": rows,
        },
        indent=2,
    )
    write_text_atomic(os.path.join(F.out, "epoch_times.md"), note + table)


if __name__ == "__main__":
    cli.run(main, allow_args=False)
