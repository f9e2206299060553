"""UCI regression benchmark (the duality paper's Table 2) on the standard splits.

    python scripts/uci.py --config=configs/uci.py                 # full table
    python scripts/uci.py --config=configs/uci.py --config.quick=True
    python scripts/uci.py --config=configs/uci.py \\
        --config.datasets=boston,yacht --config.methods=bp,ensemble --config.splits=0,1

Resumable: finished (data set, method, split) records in
``<workdir>/results.json`` with the same config fingerprint are skipped; the
file is rewritten atomically after every (data set, method) group.  At the
end ``table.md``, ``table.json`` and ``uci.png`` are written next to it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).resolve().parents[1] / "configs" / "uci.py"),
    "UCI benchmark config (configs/uci.py).",
)
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
FLAGS = flags.FLAGS

# quick mode: the three smallest data sets, two splits, a small step budget and
# three methods (each (data set, method) group costs two XLA compilations of
# ~4-8 s on a 2-core CPU, which dominate a quick run)
QUICK = {
    "datasets": "boston,energy,yacht",
    "methods": "bp,bp_matched,ensemble",
    "splits": "0,1",
    "max_steps": 1500,
    "eval_points": 15,
    "test_samples": 50,
}


def _parse_list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ValueError(f"config.{what}: unknown {bad}; choose from {list(allowed)}.")
    if not items:
        raise ValueError(f"config.{what} is empty.")
    return items


def _parse_splits(value: str, n_splits: int, name: str) -> list[int]:
    if not str(value).strip():
        return list(range(n_splits))
    try:
        ids = sorted({int(v) for v in str(value).split(",") if v.strip()})
    except ValueError as e:
        raise ValueError(f"config.splits must be comma-separated integers: {e}") from e
    bad = [k for k in ids if not 0 <= k < n_splits]
    if bad:
        raise ValueError(
            f"config.splits: {name} has splits 0..{n_splits - 1}, got {bad}."
        )
    return ids


def _load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"{path} is not valid JSON ({e}); move it away to start fresh."
        ) from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"{path} must hold a JSON list of records; move it away.")
    return records


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


def main(argv):
    del argv
    cfg = FLAGS.config
    if cfg.quick:
        for k, v in QUICK.items():
            cfg[k] = v
        if cfg.workdir == "results/uci":
            cfg.workdir = "results/uci_quick"
    if FLAGS.workdir:
        cfg.workdir = FLAGS.workdir

    # imports after flag parsing: keep --help fast
    from dualflow.benchmarks.uci import UCI_METHODS, config_fingerprint, run_uci_group
    from dualflow.benchmarks.uci_report import markdown_table, plot_summary, summarize
    from dualflow.data.paths import DataNotFoundError
    from dualflow.data.uci import UCI_DATASETS, load_uci
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    datasets = _parse_list(cfg.datasets, UCI_DATASETS, "datasets")
    methods = _parse_list(cfg.methods, UCI_METHODS, "methods")
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = workdir / "results.json"
    records = _load_records(results_path)
    fingerprint = config_fingerprint(cfg)
    done = {
        (r["dataset"], r["method"], r["split"])
        for r in records
        if r.get("config") == fingerprint
    }

    try:
        loaded = {ds: load_uci(ds, cfg.data_dir or None) for ds in datasets}
    except DataNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    split_ids = {
        ds: _parse_splits(cfg.splits, loaded[ds].n_splits, ds) for ds in datasets
    }
    wanted = {(ds, m, k) for ds in datasets for m in methods for k in split_ids[ds]}
    groups = []
    for ds in datasets:
        for m in methods:
            todo = [k for k in split_ids[ds] if (ds, m, k) not in done]
            if todo:
                groups.append((ds, m, todo))
    n_todo = sum(len(g[2]) for g in groups)
    n_skipped = len(wanted) - n_todo
    print(
        f"UCI benchmark: {len(datasets)} data sets x {len(methods)} methods;"
        f" {n_skipped} finished records reused, {n_todo} to run"
        f" -> {results_path}",
        flush=True,
    )
    commit = git_commit(Path(__file__).resolve().parents[1])  # the code that ran
    t0 = time.time()
    bar = tqdm(groups, unit="group", disable=not cfg.progress, file=sys.stdout)
    failures = []
    for ds, m, todo in bar:
        bar.set_description(f"{ds}/{m}")
        try:
            new = run_uci_group(loaded[ds], m, todo, cfg, log=tqdm.write)
        except FloatingPointError as e:  # diverged: report, keep the other groups
            tqdm.write(f"FAILED {ds}/{m}: {e}")
            failures.append(f"{ds}/{m}: {e}")
            continue
        bad = [r["split"] for r in new if not math.isfinite(r["test_ll"] + r["rmse"])]
        if bad:
            tqdm.write(f"WARNING {ds}/{m}: non-finite test metrics on splits {bad}")
        for r in new:
            r["config"] = fingerprint
        keys = {(r["dataset"], r["method"], r["split"]) for r in new}
        records = [
            r for r in records if (r["dataset"], r["method"], r["split"]) not in keys
        ] + new
        write_json_atomic(results_path, records)
    wall = time.time() - t0

    # report over the requested data sets, methods and splits with this config
    current = [
        r
        for r in records
        if r.get("config") == fingerprint
        and (r["dataset"], r["method"], r["split"]) in wanted
    ]
    summary = summarize(current)
    script = Path(sys.argv[0]).resolve()
    repo = Path(__file__).resolve().parents[1]
    if script.is_relative_to(repo):  # the command as run from the repo root
        script = script.relative_to(repo)
    command = "python " + " ".join([script.as_posix(), *sys.argv[1:]])
    compute = sum(r["seconds"] for r in current)
    header = (
        f"# UCI regression benchmark\n\n"
        f"Command: `{command}`  \n"
        f"Commit: {commit}; wall time of this invocation {wall / 60:.1f} min;"
        f" summed training time of the reported records {compute / 60:.1f} min"
        f" ({os.cpu_count()} CPU cores).  \n"
        f"Protocol and hyper-parameter rule: dualflow/benchmarks/uci.py and"
        f" configs/uci.py (epochs chosen on an inner 80/20 validation split of each"
        f" training set; nothing is tuned on test rows).\n\n"
    )
    table = header + markdown_table(summary, methods)
    write_text_atomic(workdir / "table.md", table)
    write_json_atomic(
        workdir / "table.json",
        {
            "command": command,
            "commit": commit,
            "wall_seconds": wall,
            "config": fingerprint,
            "summary": summary,
        },
    )
    plot_summary(summary, methods, str(workdir / "uci.png"))
    print(table)
    print(f"wrote {workdir}/table.md, table.json, uci.png ({wall:.0f} s)")
    if failures:
        print("FAILED groups (not in the table):\n  " + "\n  ".join(failures))
        sys.exit(1)
    if cfg.quick:
        problems = _check_quick(current, loaded)
        if problems:
            print("QUICK CHECK FAILED:\n  " + "\n  ".join(problems))
            sys.exit(1)
        print(
            "quick check passed: all metrics finite; boston/yacht RMSE < 0.6 x baseline"
        )


if __name__ == "__main__":
    app.run(main)
