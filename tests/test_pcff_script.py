"""scripts/pcff.py --quick: runs end to end and writes sane results."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "dataset",
    "activation",
    "regulariser",
    "rate",
    "seed",
    "test_error",
    "val_error",
    "best_epoch",
    "epochs_run",
}


def test_pcff_quick(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("DUALFLOW_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, "scripts/pcff.py", "--quick", f"--out_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert doc["complete"] and doc["command"].startswith("python scripts/pcff.py")
    assert doc["wall_seconds"] > 0 and doc["commit"]
    assert {"data", "config", "summary", "records"} <= set(doc)
    recs = doc["records"]
    assert {r["regulariser"] for r in recs} == {"none", "dropout", "pcff"}
    chance = 1.0 - 1.0 / 10  # 10 balanced digit classes
    for r in recs:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        for k in ("test_error", "val_error"):
            assert 0.0 <= r[k] <= 1.0
            assert r[k] < 0.5 * chance, (k, r[k])  # far better than chance
        assert 1 <= r["best_epoch"] <= r["epochs_run"] <= doc["config"]["max_epochs"]
    assert len(doc["summary"]) == 3
    assert "| sklearn_digits | relu | pcff (1) |" in md
