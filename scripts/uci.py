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

import json
import math
import os
import sys
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from dualflow import cli
from dualflow.train.interrupts import InterruptGuard, inject

_CONFIG = cli.define_config_file(
    "config",
    str(Path(__file__).resolve().parents[1] / "configs" / "uci.py"),
    "UCI benchmark config (configs/uci.py).",
)
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
FLAGS = flags.FLAGS

_DEFAULT_WORKDIR = "results/uci"


def _parse_list(value: str, allowed, what: str) -> list[str]:
    from dualflow.errors import ConfigError

    items = list(dict.fromkeys(v.strip() for v in str(value).split(",") if v.strip()))
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ConfigError(
            f"config.{what}: unknown {', '.join(bad)}; choose from"
            f" {', '.join(allowed)}."
        )
    if not items:
        raise ConfigError(f"config.{what} is empty; choose from {', '.join(allowed)}.")
    return items


def _parse_splits(value: str, n_splits: int, name: str) -> list[int]:
    from dualflow.errors import ConfigError

    if not str(value).strip():
        return list(range(n_splits))
    try:
        ids = sorted({int(v) for v in str(value).split(",") if v.strip()})
    except ValueError:
        raise ConfigError(
            f"config.splits={value!r} must be comma-separated integers, e.g. 0,1,2."
        ) from None
    bad = [k for k in ids if not 0 <= k < n_splits]
    if bad:
        raise ConfigError(
            f"config.splits: {name} has splits 0..{n_splits - 1}, got"
            f" {', '.join(map(str, bad))}."
        )
    return ids


def _load_records(path: Path) -> list[dict]:
    """The records of ``results.json`` (``[]`` if absent), checked."""
    from dualflow.errors import DualflowError

    if not path.exists():
        return []
    hint = f"move {path} (or its folder) away to start fresh; this run wrote nothing"
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DualflowError(f"{path} is not valid JSON ({e}).", hint=hint) from None
    if not isinstance(records, list):
        raise DualflowError(
            f"{path} must hold a JSON list of records, not {type(records).__name__}.",
            hint=hint,
        )
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DualflowError(
                f"{path}: record {i} is {type(r).__name__}, not an object.", hint=hint
            )
        for key, kind in (("dataset", str), ("method", str), ("split", int)):
            if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
                raise DualflowError(
                    f"{path}: record {i} has {key}={r.get(key)!r}; expected"
                    f" {kind.__name__}.",
                    hint=hint,
                )
    return records


def _key(r: dict) -> tuple[str, str, int]:
    return r["dataset"], r["method"], r["split"]


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


def _span(ids) -> str:
    """``0-19`` for a run of integers, else ``0,3,7``."""
    ids = sorted(set(ids))
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def _changed_message(stale: dict[str, list[dict]], results_path: Path) -> str:
    """One line: which data sets changed under which records of results.json."""
    changed, legacy = [], []
    for ds, rs in stale.items():
        new = [r for r in rs if "data_fingerprint" in r]
        if new:
            methods = ", ".join(sorted({r["method"] for r in new}))
            splits = _span(r["split"] for r in new)
            changed.append(f"{ds} ({len(new)} records: {methods}; splits {splits})")
        if len(new) < len(rs):
            legacy.append(ds)
    parts = []
    if changed:
        parts.append(
            f"the data changed since {results_path} was written: {', '.join(changed)}"
            " were computed on other data"
        )
    if legacy:
        n = sum("data_fingerprint" not in r for rs in stale.values() for r in rs)
        parts.append(
            f"{results_path} has {n} records of {', '.join(legacy)} without a data"
            " fingerprint (written by an older dualflow): the data they were computed"
            " on is unknown"
        )
    return "; ".join(parts) + "."


def _check_quick(records: list[dict], loaded: dict) -> list[str]:
    """Sanity checks of the quick run: finite metrics; boston and yacht RMSE
    well below predicting the training mean (RMSE of that baseline on the split).
    ``loaded`` maps data set names to their ``UCIData``."""
    import numpy as np

    from dualflow.data.uci import uci_split

    problems = []
    for r in records:
        if not (math.isfinite(r["rmse"]) and math.isfinite(r["test_ll"])):
            problems.append(f"{r['dataset']}/{r['method']}/{r['split']}: not finite")
    for ds in ("boston", "yacht"):
        if ds not in loaded:
            continue
        for r in (r for r in records if r["dataset"] == ds):
            sp = uci_split(loaded[ds], r["split"])
            baseline = float(np.sqrt(np.mean(sp.y_test.astype(float) ** 2))) * sp.y_std
            if not r["rmse"] < 0.6 * baseline:
                problems.append(
                    f"{ds}/{r['method']}/split {r['split']}: RMSE {r['rmse']:.3f} is"
                    f" not below 0.6 x the predict-the-mean RMSE {baseline:.3f}"
                )
    return problems


def _run_groups(groups, loaded, records, results_path, fingerprint, cfg, guard):
    """Run each (data set, method) group; rewrite results.json after each.

    After SIGINT/SIGTERM (``guard``) the current group finishes and is written,
    then :class:`~dualflow.errors.Interrupted` is raised (exit 130).
    """
    from dualflow.benchmarks.uci import diverged_records
    from dualflow.benchmarks.uci_report import is_valid_record, json_safe
    from dualflow.benchmarks.uci_search import run_search_group
    from dualflow.errors import Interrupted
    from dualflow.io import write_json_atomic

    bar = tqdm(groups, unit="group", disable=not cfg.progress, file=sys.stdout)
    for done, (ds, m, todo) in enumerate(bar, 1):
        bar.set_description(f"{ds}/{m}")
        inject("group", done)  # test hook (dualflow.train.interrupts)
        try:
            new = run_search_group(loaded[ds], m, todo, cfg, log=tqdm.write)
        except FloatingPointError as e:  # DivergenceError and numerical checks
            tqdm.write(
                f"DIVERGED {e}" if str(e).startswith(ds) else f"DIVERGED {ds}/{m}: {e}"
            )
            new = diverged_records(
                loaded[ds], m, todo, str(e), getattr(e, "splits", None)
            )
        else:
            bad = [r["split"] for r in new if not is_valid_record(r)]
            if bad:
                tqdm.write(
                    f"DIVERGED {ds}/{m}: non-finite test metrics on splits {bad}"
                )
        for r in new:
            r["config"] = fingerprint
        keys = {_key(r) for r in new}
        records = [r for r in records if _key(r) not in keys] + new
        write_json_atomic(results_path, json_safe(records))
        if guard.requested is not None:
            bar.close()
            raise Interrupted(
                f"interrupted ({guard.requested}) after {ds}/{m}; {done} of"
                f" {len(groups)} groups done and saved in {results_path};"
                " rerun the same command to resume"
            )
    return records


def _check_budget(cfg, methods) -> None:
    """Every method's grid must hold ``search_budget`` candidates (checked
    before the first group runs, not when a small grid is reached)."""
    from dualflow.benchmarks.uci_search import candidates
    from dualflow.errors import ConfigError

    budget = cfg.search_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(
            f"config.search_budget must be an integer >= 1, got {budget!r}."
        )
    for m in methods:
        try:
            candidates(m, cfg, budget, int(cfg.search_seed))
        except ValueError as err:
            raise ConfigError(f"config.search_budget: {err}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(
            f"unexpected arguments: {' '.join(argv[1:])}",
            "config fields are set as --config.<field>=<value>",
        )
    cfg = FLAGS.config

    # imports after flag parsing: keep --help fast
    from dualflow.benchmarks.uci import (
        QUICK,
        apply_quick,
        config_fingerprint,
        stale_records,
    )
    from dualflow.benchmarks.uci_report import (
        chosen_table,
        json_safe,
        markdown_table,
        plot_summary,
        summarize,
    )
    from dualflow.benchmarks.uci_search import search_methods
    from dualflow.data.uci import UCI_DATASETS, load_uci
    from dualflow.errors import ConfigError, DataError, DivergenceError
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    explicit = _explicit_fields()
    if cfg.quick:
        applied = apply_quick(cfg, explicit)
        kept = [k for k in QUICK if k not in applied]
        if kept:
            print(f"quick: keeping the explicit {', '.join(kept)}", flush=True)
        if cfg.workdir == _DEFAULT_WORKDIR and "workdir" not in explicit:
            cfg.workdir = "results/uci_quick"
    if FLAGS.workdir:
        cfg.workdir = FLAGS.workdir

    # --- everything a run can be refused for is checked before anything is written
    datasets = _parse_list(cfg.datasets, UCI_DATASETS, "datasets")
    methods = _parse_list(cfg.methods, search_methods(), "methods")
    _check_budget(cfg, methods)
    workdir = Path(cfg.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} exists and is not a folder.")
    results_path = workdir / "results.json"
    records = _load_records(results_path)
    loaded = {ds: load_uci(ds, cfg.data_dir or None) for ds in datasets}
    split_ids = {
        ds: _parse_splits(cfg.splits, loaded[ds].n_splits, ds) for ds in datasets
    }
    fingerprint = config_fingerprint(cfg)
    wanted = {(ds, m, k) for ds in datasets for m in methods for k in split_ids[ds]}
    reusable = [
        r for r in records if r.get("config") == fingerprint and _key(r) in wanted
    ]
    stale = stale_records(reusable, loaded)
    adopted = 0
    if cfg.adopt_unfingerprinted:  # the user vouches the data is unchanged
        for rs in stale.values():
            for r in rs:
                if "data_fingerprint" not in r:
                    r["data_fingerprint"] = loaded[r["dataset"]].fingerprint(r["split"])
                    adopted += 1
        stale = stale_records(reusable, loaded)
    if stale and not cfg.rerun_changed:
        legacy = any("data_fingerprint" not in r for rs in stale.values() for r in rs)
        raise DataError(
            _changed_message(stale, results_path),
            hint=f"move {workdir} away to start fresh, or pass"
            " --config.rerun_changed=True to rerun those records (the old ones are"
            " replaced)"
            + (
                "; if you know the data is the one they were computed on, pass"
                " --config.adopt_unfingerprinted=True to stamp them"
                if legacy
                else ""
            )
            + "; this run wrote nothing",
        )
    stale_keys = {_key(r) for rs in stale.values() for r in rs}
    done = {_key(r) for r in reusable} - stale_keys

    groups = []
    for ds in datasets:
        for m in methods:
            todo = [k for k in split_ids[ds] if (ds, m, k) not in done]
            if todo:
                groups.append((ds, m, todo))
    n_todo = sum(len(g[2]) for g in groups)
    print(
        f"UCI benchmark: {len(datasets)} data sets x {len(methods)} methods;"
        f" {len(wanted) - n_todo} finished records reused, {n_todo} to run"
        f" -> {results_path} (reused records match the data's fingerprints)",
        flush=True,
    )
    if stale_keys:
        print(
            f"rerunning {len(stale_keys)} records whose data changed"
            f" ({', '.join(sorted(stale))}; --config.rerun_changed=True)",
            flush=True,
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if adopted:
        write_json_atomic(results_path, json_safe(records))
        print(
            f"stamped {adopted} records without a data fingerprint with the"
            " fingerprint of the data on disk (--config.adopt_unfingerprinted=True)",
            flush=True,
        )
    commit = git_commit(Path(__file__).resolve().parents[1])  # the code that ran
    t0 = time.time()
    guard = InterruptGuard(
        second_message="second interrupt: exiting now; results.json keeps every"
        " finished group",
        first_notice="finishing the current group, then stopping (Ctrl-C again"
        " to stop at once)",
    )
    with guard:
        records = _run_groups(
            groups, loaded, records, results_path, fingerprint, cfg, guard
        )
    wall = time.time() - t0

    # report over the requested data sets, methods and splits with this config
    current = [
        r for r in records if r.get("config") == fingerprint and _key(r) in wanted
    ]
    left_stale = {_key(r) for rs in stale_records(current, loaded).values() for r in rs}
    current = [r for r in current if _key(r) not in left_stale]
    summary = summarize(current)
    script = Path(sys.argv[0]).resolve()
    repo = Path(__file__).resolve().parents[1]
    if script.is_relative_to(repo):  # the command as run from the repo root
        script = script.relative_to(repo)
    command = "python " + " ".join([script.as_posix(), *sys.argv[1:]])
    compute = sum(r.get("seconds") or 0.0 for r in current)
    header = (
        f"# UCI regression benchmark\n\n"
        f"Command: `{command}`  \n"
        f"Commit: {commit}; wall time of this invocation {wall / 60:.1f} min;"
        f" summed training time of the reported records {compute / 60:.1f} min"
        f" ({os.cpu_count()} CPU cores).  \n"
        f"Protocol and hyper-parameter rule: dualflow/benchmarks/uci_search.py and"
        f" configs/uci.py ({cfg.search_budget} candidates per data set and method,"
        f" and the epochs, chosen per split by the log-likelihood on an inner 80/20"
        f" validation split of its training rows; nothing is tuned on test rows;"
        f" test rows evaluated once).\n\n"
    )
    table = header + markdown_table(summary, methods)
    chosen = chosen_table(current, methods)
    if chosen:
        table += "\n" + chosen
    write_text_atomic(workdir / "table.md", table)
    write_json_atomic(
        workdir / "table.json",
        json_safe(
            {
                "command": command,
                "commit": commit,
                "wall_seconds": wall,
                "config": fingerprint,
                "data_fingerprints": {ds: loaded[ds].fingerprint() for ds in datasets},
                "summary": summary,
            }
        ),
    )
    plot_summary(summary, methods, str(workdir / "uci.png"))
    print(table)
    print(f"wrote {workdir}/table.md, table.json, uci.png ({wall:.0f} s)")
    diverged = [
        f"{ds}/{m} ({v['n_diverged']} of {v['n']} splits)"
        for ds, row in summary.items()
        for m, v in row.items()
        if v["status"] != "ok"
    ]
    if diverged:
        raise DivergenceError(
            f"{len(diverged)} groups diverged: {', '.join(diverged)}; they are"
            f" marked 'diverged' in {workdir}/table.md and stored in results.json",
            hint="lower config.lr (config.ng.rho for bp_ng) or config.init_var; a"
            " changed config reruns them",
        )
    if cfg.quick:
        top = {k.split(".")[0] for k in explicit}
        tuned = sorted((top & (set(fingerprint) | set(QUICK))) - {"datasets", "splits"})
        if tuned:
            print(
                "quick check skipped: its thresholds are for the quick methods and"
                f" budget, and {', '.join('--config.' + k for k in tuned)} given"
            )
            return
        problems = _check_quick(current, loaded)
        if problems:
            print("QUICK CHECK FAILED:\n  " + "\n  ".join(problems))
            sys.exit(1)
        print(
            "quick check passed: all metrics finite; boston/yacht RMSE < 0.6 x baseline"
        )


if __name__ == "__main__":
    cli.run(main)
