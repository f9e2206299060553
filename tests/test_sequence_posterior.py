"""scripts/sequence_posterior.py --quick: trains, smooths one sequence, writes the
figure and a JSON summary without touching other files in its folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sequence_posterior_quick(tmp_path):
    keep = tmp_path / "results.json"
    keep.write_text('{"records": []}')
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sequence_posterior.py"),
            "--quick",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "posterior.json").read_text())
    assert (tmp_path / "posterior.png").stat().st_size > 10_000
    assert keep.read_text() == '{"records": []}'  # other results untouched
    assert s["layer"] == "rnn0" and len(s["units"]) == 2
    for k in ("test_mse", "predictive_mean", "predictive_var", "seconds"):
        assert math.isfinite(s[k]), k
    assert s["predictive_var"] > 0.0
    assert 0.0 <= s["negative_smoothed_var_fraction"] <= 1.0
    assert "test MSE" in proc.stdout


def test_sequence_posterior_rejects_bad_flags(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sequence_posterior.py"),
            "--seq_len=1",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --seq_len: must be >= 2, got 1"
    assert not list(tmp_path.iterdir())
