"""The one-call device benchmark (scripts/bench_device.py) in its CPU tiny mode."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from dualflow.benchmarks.device import (
    ROWS,
    default_settings,
    device_kind,
    markdown_table,
    run_device_benchmark,
)
from dualflow.errors import ConfigError
from dualflow.io import write_json_atomic

REPO = str(Path(__file__).resolve().parents[1])

_FIELDS = {
    "row",
    "method",
    "compile_seconds",
    "steps_run",
    "seconds_per_step",
    "images_per_sec",
    "ratio_to_vanilla",
    "finite",
    "peak_memory_bytes",
    "peak_memory_source",
    "xla_step_bytes",
    "error",
}


@pytest.fixture(scope="module")
def result():
    """Three rows (deterministic, bp, stacked reparam ensemble) of the CPU
    tiny defaults, two timed steps each."""
    tiny = dataclasses.replace(
        default_settings("cpu"), steps=2, rows=("vanilla", "bp_nf", "ensemble")
    )
    return run_device_benchmark(tiny, REPO, log=lambda _msg: None)


def test_cpu_defaults_are_tiny():
    s = default_settings("cpu")
    assert (s.depth, s.width) == (10, 1) and s.batch <= 16 and s.steps <= 10
    assert s.rows == tuple(ROWS)
    full = default_settings("gpu")
    assert (full.depth, full.width, full.batch, full.steps) == (28, 10, 128, 200)


def test_record_fields_finite_and_ratios(result, tmp_path):
    assert result["device"]["platform"] == "cpu"
    assert result["model"] == "WRN-10-1"
    assert [r["row"] for r in result["rows"]] == ["vanilla", "bp_nf", "ensemble"]
    by = {r["row"]: r for r in result["rows"]}
    for r in result["rows"]:
        assert _FIELDS <= set(r), _FIELDS - set(r)
        assert r["error"] is None
        assert r["finite"] is True
        assert r["steps_run"] == 3  # one warm-up + two timed
        assert r["seconds_per_step"] > 0 and r["images_per_sec"] > 0
        assert r["compile_seconds"] > 0
        assert r["peak_memory_bytes"] > 0
        assert "RSS" in r["peak_memory_source"]  # no device stats on CPU
    assert by["vanilla"]["ratio_to_vanilla"] == 1.0
    assert by["bp_nf"]["method"] == "bp" and by["ensemble"]["method"] == "ensemble"
    assert by["bp_nf"]["ratio_to_vanilla"] > 0
    # JSON-able as written by the script, and a table row per benchmarked row
    path = tmp_path / f"{device_kind()}.json"
    write_json_atomic(path, result)
    assert json.loads(path.read_text())["rows"][0]["row"] == "vanilla"
    table = markdown_table(result)
    assert table.count("\n| ") == 4 and "host RSS peak" in table  # head + 3


def test_bad_settings_are_config_errors():
    base = default_settings("cpu")
    with pytest.raises(ConfigError, match="6n\\+4"):
        dataclasses.replace(base, depth=12).check(1)
    with pytest.raises(ConfigError, match="divisible"):
        dataclasses.replace(base, batch=6).check(4)
    with pytest.raises(ConfigError, match="rows"):
        dataclasses.replace(base, rows=("nosuch",)).check(1)


def test_script_rejects_bad_depth(tmp_path):
    """The script's mistakes end in one ``error:`` line, exit 2."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = os.path.join(REPO, "scripts", "bench_device.py")
    proc = subprocess.run(
        [sys.executable, script, "--depth=12"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[0].startswith("error: --depth") and len(lines) <= 2
    assert not list(tmp_path.iterdir())
