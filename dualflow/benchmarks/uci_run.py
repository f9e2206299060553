"""A resumable run of the UCI benchmark: what ``scripts/uci.py`` does.

:func:`run_uci_benchmark` takes the config of ``configs/uci.py`` and

* refuses, before writing anything, every run it cannot do: unknown data sets,
  methods or splits, a ``search_budget`` larger than a method's grid, a
  ``search_seeds`` below 1, an invalid ``results.json``, missing or malformed
  data, and records computed on data that changed since (or that carry no
  data fingerprint) -- unless ``rerun_changed`` (rerun those records) or
  ``adopt_unfingerprinted`` (stamp the old records with the current data's
  fingerprint);
* skips the (data set, method, split) records of ``<workdir>/results.json``
  with the same config fingerprint and runs the rest, one (data set, method)
  group at a time (:func:`~dualflow.benchmarks.uci_search.run_search_group`),
  rewriting ``results.json`` atomically after every group; a SIGINT/SIGTERM
  finishes the current group, saves it and raises
  :class:`~dualflow.errors.Interrupted`;
* writes ``table.md``, ``table.json`` and ``uci.png`` over the requested
  records, raises :class:`~dualflow.errors.DivergenceError` if a group
  diverged, and runs the sanity check of a quick run (:func:`quick_check`).

User mistakes are :class:`~dualflow.errors.DualflowError` with a hint, for
:func:`dualflow.cli.run` to print as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dualflow.benchmarks.uci import (
    QUICK,
    apply_quick,
    config_fingerprint,
    diverged_records,
    stale_records,
)
from dualflow.benchmarks.uci_report import (
    chosen_table,
    is_valid_record,
    json_safe,
    markdown_table,
    plot_summary,
    summarize,
)
from dualflow.benchmarks.uci_search import (
    candidates,
    run_search_group,
    search_methods,
    search_seeds_of,
)
from dualflow.data.uci import UCI_DATASETS, UCIData, load_uci, uci_split
from dualflow.errors import (
    ConfigError,
    DataError,
    DivergenceError,
    DualflowError,
    Interrupted,
)
from dualflow.io import write_json_atomic, write_text_atomic
from dualflow.train.interrupts import InterruptGuard, inject

__all__ = [
    "DEFAULT_WORKDIR",
    "QUICK_WORKDIR",
    "RunPlan",
    "load_records",
    "plan_run",
    "quick_check",
    "resolve_config",
    "run_uci_benchmark",
]

DEFAULT_WORKDIR = "results/uci"  # configs/uci.py's workdir
QUICK_WORKDIR = "results/uci_quick"  # a quick run's, unless a workdir is given

Key = tuple[str, str, int]  # (data set, method, split)


# --------------------------------------------------------------------------------
# config and results.json


def _parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """The comma-separated names of ``config.<what>`` (unique, in order)."""
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
    """The split ids of ``config.splits`` for data set ``name`` (empty: all)."""
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


def _check_budget(cfg: Any, methods: Sequence[str]) -> None:
    """Every method's grid must hold ``search_budget`` candidates, and
    ``search_seeds`` must be >= 1 (checked before the first group runs, not
    when a small grid is reached)."""
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
    try:
        search_seeds_of(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_config(
    cfg: Any, explicit: Collection[str], workdir: str | None = None
) -> None:
    """Apply ``cfg.quick`` and a ``workdir`` override to ``cfg`` in place.

    A quick run shrinks the :data:`~dualflow.benchmarks.uci.QUICK` fields not
    in ``explicit`` (the fields given on the command line; it prints which
    explicit ones it keeps) and writes to :data:`QUICK_WORKDIR` unless the
    workdir was given; ``workdir`` (e.g. ``--workdir``) wins over both.
    """
    if cfg.quick:
        applied = apply_quick(cfg, explicit)
        kept = [k for k in QUICK if k not in applied]
        if kept:
            print(f"quick: keeping the explicit {', '.join(kept)}", flush=True)
        if cfg.workdir == DEFAULT_WORKDIR and "workdir" not in explicit:
            cfg.workdir = QUICK_WORKDIR
    if workdir:
        cfg.workdir = workdir


def load_records(path: Path) -> list[dict]:
    """The records of ``results.json`` (``[]`` if absent), checked."""
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


def _key(r: dict) -> Key:
    return r["dataset"], r["method"], r["split"]


# --------------------------------------------------------------------------------
# resume planning


def _span(ids: Iterable[int]) -> str:
    """``0-19`` for a run of integers, else ``0,3,7``."""
    ids = sorted(set(ids))
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def _changed_message(stale: Mapping[str, list[dict]], results_path: Path) -> str:
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


def _changed_error(
    stale: Mapping[str, list[dict]], results_path: Path, workdir: Path
) -> DataError:
    """The refusal of records computed on other (or unknown) data."""
    legacy = any("data_fingerprint" not in r for rs in stale.values() for r in rs)
    return DataError(
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


def _adopt(stale: Mapping[str, list[dict]], loaded: Mapping[str, UCIData]) -> int:
    """Stamp the stale records without a fingerprint with the current data's
    (in place); returns how many."""
    adopted = 0
    for rs in stale.values():
        for r in rs:
            if "data_fingerprint" not in r:
                r["data_fingerprint"] = loaded[r["dataset"]].fingerprint(r["split"])
                adopted += 1
    return adopted


@dataclasses.dataclass
class RunPlan:
    """What a run does, worked out by :func:`plan_run` before anything is written.

    ``records`` are those of ``results.json`` (stamped ones included when
    ``adopted``); ``groups`` are the (data set, method, splits to run) left;
    ``wanted`` are the keys the tables report on; ``stale`` the reusable
    records computed on other data (rerun, as ``config.rerun_changed`` asked).
    """

    datasets: list[str]
    methods: list[str]
    workdir: Path
    records: list[dict]
    loaded: dict[str, UCIData]
    fingerprint: dict
    wanted: set[Key]
    stale: dict[str, list[dict]]
    stale_keys: set[Key]
    adopted: int
    groups: list[tuple[str, str, list[int]]]

    @property
    def results_path(self) -> Path:
        """``<workdir>/results.json``."""
        return self.workdir / "results.json"


def plan_run(cfg: Any) -> RunPlan:
    """Check everything a run of ``cfg`` can be refused for and work out what
    is left to run (resuming ``<cfg.workdir>/results.json``); writes nothing."""
    datasets = _parse_list(cfg.datasets, UCI_DATASETS, "datasets")
    methods = _parse_list(cfg.methods, search_methods(), "methods")
    _check_budget(cfg, methods)
    workdir = Path(cfg.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} exists and is not a folder.")
    results_path = workdir / "results.json"
    records = load_records(results_path)
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
        adopted = _adopt(stale, loaded)
        stale = stale_records(reusable, loaded)
    if stale and not cfg.rerun_changed:
        raise _changed_error(stale, results_path, workdir)
    stale_keys = {_key(r) for rs in stale.values() for r in rs}
    done = {_key(r) for r in reusable} - stale_keys
    groups = []
    for ds in datasets:
        for m in methods:
            todo = [k for k in split_ids[ds] if (ds, m, k) not in done]
            if todo:
                groups.append((ds, m, todo))
    return RunPlan(
        datasets=datasets,
        methods=methods,
        workdir=workdir,
        records=records,
        loaded=loaded,
        fingerprint=fingerprint,
        wanted=wanted,
        stale=stale,
        stale_keys=stale_keys,
        adopted=adopted,
        groups=groups,
    )


def _start(plan: RunPlan) -> None:
    """Say what the run does; create the workdir and save adopted records."""
    n_todo = sum(len(g[2]) for g in plan.groups)
    print(
        f"UCI benchmark: {len(plan.datasets)} data sets x {len(plan.methods)} methods;"
        f" {len(plan.wanted) - n_todo} finished records reused, {n_todo} to run"
        f" -> {plan.results_path} (reused records match the data's fingerprints)",
        flush=True,
    )
    if plan.stale_keys:
        print(
            f"rerunning {len(plan.stale_keys)} records whose data changed"
            f" ({', '.join(sorted(plan.stale))}; --config.rerun_changed=True)",
            flush=True,
        )
    plan.workdir.mkdir(parents=True, exist_ok=True)
    if plan.adopted:
        write_json_atomic(plan.results_path, json_safe(plan.records))
        print(
            f"stamped {plan.adopted} records without a data fingerprint with the"
            " fingerprint of the data on disk (--config.adopt_unfingerprinted=True)",
            flush=True,
        )


# --------------------------------------------------------------------------------
# running


def _run_group(ds: str, m: str, todo: list[int], data: UCIData, cfg: Any) -> list[dict]:
    """The records of group (``ds``, ``m``) on splits ``todo``; a divergence
    gives diverged records (and a ``DIVERGED`` line) instead of an error."""
    try:
        new = run_search_group(data, m, todo, cfg, log=tqdm.write)
    except FloatingPointError as e:  # DivergenceError and numerical checks
        tqdm.write(
            f"DIVERGED {e}" if str(e).startswith(ds) else f"DIVERGED {ds}/{m}: {e}"
        )
        return diverged_records(data, m, todo, str(e), getattr(e, "splits", None))
    bad = [r["split"] for r in new if not is_valid_record(r)]
    if bad:
        tqdm.write(f"DIVERGED {ds}/{m}: non-finite test metrics on splits {bad}")
    return new


def _run_groups(plan: RunPlan, cfg: Any, guard: InterruptGuard) -> list[dict]:
    """Run each (data set, method) group; rewrite results.json after each.

    After SIGINT/SIGTERM (``guard``) the current group finishes and is written,
    then :class:`~dualflow.errors.Interrupted` is raised (exit 130).
    """
    records, groups = plan.records, plan.groups
    bar = tqdm(groups, unit="group", disable=not cfg.progress, file=sys.stdout)
    for done, (ds, m, todo) in enumerate(bar, 1):
        bar.set_description(f"{ds}/{m}")
        inject("group", done)  # test hook (dualflow.train.interrupts)
        new = _run_group(ds, m, todo, plan.loaded[ds], cfg)
        for r in new:
            r["config"] = plan.fingerprint
        keys = {_key(r) for r in new}
        records = [r for r in records if _key(r) not in keys] + new
        write_json_atomic(plan.results_path, json_safe(records))
        if guard.requested is not None:
            bar.close()
            raise Interrupted(
                f"interrupted ({guard.requested}) after {ds}/{m}; {done} of"
                f" {len(groups)} groups done and saved in {plan.results_path};"
                " rerun the same command to resume"
            )
    return records


def _run_guarded(plan: RunPlan, cfg: Any) -> list[dict]:
    """:func:`_run_groups` under an :class:`InterruptGuard`."""
    guard = InterruptGuard(
        second_message="second interrupt: exiting now; results.json keeps every"
        " finished group",
        first_notice="finishing the current group, then stopping (Ctrl-C again"
        " to stop at once)",
    )
    with guard:
        return _run_groups(plan, cfg, guard)


# --------------------------------------------------------------------------------
# report


def _reported(plan: RunPlan, records: list[dict]) -> list[dict]:
    """The records of the requested data sets, methods and splits with this
    config, computed on the data on disk."""
    current = [
        r
        for r in records
        if r.get("config") == plan.fingerprint and _key(r) in plan.wanted
    ]
    left = stale_records(current, plan.loaded)
    left_stale = {_key(r) for rs in left.values() for r in rs}
    return [r for r in current if _key(r) not in left_stale]


def _header(cfg: Any, command: str, commit: str, wall: float, compute: float) -> str:
    """The first lines of ``table.md``: command, commit, times, protocol."""
    seeds = search_seeds_of(cfg)
    reps = f", each scored by the mean of {seeds} trainings" if seeds > 1 else ""
    return (
        f"# UCI regression benchmark\n\n"
        f"Command: `{command}`  \n"
        f"Commit: {commit}; wall time of this invocation {wall / 60:.1f} min;"
        f" summed training time of the reported records {compute / 60:.1f} min"
        f" ({os.cpu_count()} CPU cores).  \n"
        f"Protocol and hyper-parameter rule: dualflow/benchmarks/uci_search.py and"
        f" configs/uci.py ({cfg.search_budget} candidates per data set and"
        f" method{reps},"
        f" and the epochs, chosen per split by the log-likelihood on an inner 80/20"
        f" validation split of its training rows; nothing is tuned on test rows;"
        f" test rows evaluated once).\n\n"
    )


def _write_report(
    plan: RunPlan,
    cfg: Any,
    current: list[dict],
    *,
    command: str,
    commit: str,
    wall: float,
) -> dict:
    """Write and print ``table.md``, write ``table.json`` and ``uci.png``;
    returns the summary."""
    summary = summarize(current)
    compute = sum(r.get("seconds") or 0.0 for r in current)
    table = _header(cfg, command, commit, wall, compute)
    table += markdown_table(summary, plan.methods)
    chosen = chosen_table(current, plan.methods)
    if chosen:
        table += "\n" + chosen
    workdir = plan.workdir
    write_text_atomic(workdir / "table.md", table)
    fingerprints = {ds: plan.loaded[ds].fingerprint() for ds in plan.datasets}
    write_json_atomic(
        workdir / "table.json",
        json_safe(
            {
                "command": command,
                "commit": commit,
                "wall_seconds": wall,
                "config": plan.fingerprint,
                "data_fingerprints": fingerprints,
                "summary": summary,
            }
        ),
    )
    plot_summary(summary, plan.methods, str(workdir / "uci.png"))
    print(table)
    print(f"wrote {workdir}/table.md, table.json, uci.png ({wall:.0f} s)")
    return summary


def _check_diverged(summary: Mapping[str, Mapping[str, dict]], workdir: Path) -> None:
    """Raise :class:`~dualflow.errors.DivergenceError` naming the diverged groups."""
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


# --------------------------------------------------------------------------------
# quick check


def quick_check(records: Iterable[dict], loaded: Mapping[str, UCIData]) -> list[str]:
    """Sanity checks of the quick run: finite metrics; boston and yacht RMSE
    well below predicting the training mean (RMSE of that baseline on the split).
    ``loaded`` maps data set names to their ``UCIData``.  Returns the problems
    (one line each; none: passed)."""
    records = list(records)
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


def _quick_outcome(
    plan: RunPlan, explicit: Collection[str], current: list[dict]
) -> int:
    """Run (or skip, when the command line changed what it checks) the quick
    check and print its outcome; returns the exit status (1: failed)."""
    top = {k.split(".")[0] for k in explicit}
    tuned = sorted(
        (top & (set(plan.fingerprint) | set(QUICK))) - {"datasets", "splits"}
    )
    if tuned:
        print(
            "quick check skipped: its thresholds are for the quick methods and"
            f" budget, and {', '.join('--config.' + k for k in tuned)} given"
        )
        return 0
    problems = quick_check(current, plan.loaded)
    if problems:
        print("QUICK CHECK FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("quick check passed: all metrics finite; boston/yacht RMSE < 0.6 x baseline")
    return 0


# --------------------------------------------------------------------------------
# entry point


def run_uci_benchmark(
    cfg: Any,
    *,
    explicit: Collection[str] = (),
    workdir: str | None = None,
    command: str = "run_uci_benchmark (called from Python)",
    commit: str | Callable[[], str] = "unknown",
) -> int:
    """Run (or resume) the benchmark of ``cfg`` (``configs/uci.py``) and write
    its tables; returns the exit status (0, or 1 when the quick check failed).

    ``explicit`` are the config fields given on the command line and
    ``workdir`` a workdir override (:func:`resolve_config`).  ``command`` and
    ``commit`` are recorded in ``table.md`` and ``table.json``; a callable
    ``commit`` is called once the run is planned (after any stamping of
    records, before the first group), so it sees the tree the groups run with.
    Raises :class:`~dualflow.errors.DualflowError` for a refused run (before
    anything is written), :class:`~dualflow.errors.DivergenceError` after the
    tables when a group diverged and :class:`~dualflow.errors.Interrupted` on
    SIGINT/SIGTERM (after saving the group that was running).
    """
    resolve_config(cfg, explicit, workdir)
    plan = plan_run(cfg)
    _start(plan)
    commit = commit() if callable(commit) else commit  # the code that ran
    t0 = time.time()
    records = _run_guarded(plan, cfg)
    wall = time.time() - t0
    current = _reported(plan, records)
    summary = _write_report(
        plan, cfg, current, command=command, commit=commit, wall=wall
    )
    _check_diverged(summary, plan.workdir)
    if cfg.quick:
        return _quick_outcome(plan, explicit, current)
    return 0
