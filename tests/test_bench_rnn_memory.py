"""Residual-memory benchmark of BP through time (issue 20): runs, and the
residuals of the recurrent scan grow linearly in T with a fixed count of
``[N, H]`` arrays per step."""

from __future__ import annotations

import pytest

from dualflow.benchmarks import rnn_memory as rm

N, H = 3, 5  # distinct from every T below, so the time axis is unambiguous


def _cfg(t: int) -> rm.Config:
    return rm.Config(seq_len=t, batch=N, hidden=H, num_classes=4)


def _stats(cell, variant, t, vjp=False):
    loss, params = rm.make_loss("moments", cell, variant, _cfg(t))
    return rm.residual_stats(loss, params, t, vjp=vjp)


@pytest.mark.parametrize("cell", rm.CELLS)
@pytest.mark.parametrize("variant", ["bp", "bp_per_op", "autodiff"])
def test_residuals_linear_in_seq_len(cell, variant):
    unit = N * H * 4
    s = {t: _stats(cell, variant, t) for t in (8, 16, 24)}
    # per-step part exactly linear, nothing else grows with T
    for t in s:
        assert s[t]["scan_per_step"] % (t * unit) == 0
    per_step = {t: s[t]["scan_per_step"] // (t * unit) for t in s}
    assert per_step[8] == per_step[16] == per_step[24] > 0
    d1 = s[16]["total"] - s[8]["total"]
    d2 = s[24]["total"] - s[16]["total"]
    assert d1 == d2 > 0
    # the loop-invariant weight moments are not stacked over time
    assert s[8]["scan_once"] == s[16]["scan_once"]


@pytest.mark.parametrize("cell", rm.CELLS)
def test_bp_keeps_fewer_arrays_per_step_than_autodiff(cell):
    """BP through time keeps the states (m_t, P_t) per step, the per-op rules
    (m_{t-1}, P_{t-1}, J_t), autodiff 5 (IndRNN/ReLU) or 11 (SRN/tanh) arrays
    (docs/benchmarks.md, issue 20 section: update both if this changes)."""
    t = 8
    unit = t * N * H * 4
    counts = tuple(
        _stats(cell, v, t)["scan_per_step"] // unit
        for v in ("bp", "bp_per_op", "autodiff")
    )
    assert counts == (2, 3, 5 if cell == "indrnn" else 11)
    names = rm.identify_step_residuals(cell, "bp", _cfg(t))
    # linearised: P_t is J_t^2 times the pre-activation variance by definition
    assert [n.split(" = ") for n in names][0] == ["m_t"]
    assert "P_t" in names[1].split(" = ") and len(names) == 2
    names = rm.identify_step_residuals(cell, "bp_per_op", _cfg(t))
    gain = "J_t = J_t^2" if cell == "indrnn" else "J_t"
    assert names == ["m_{t-1}", "P_{t-1}", gain]


def test_measure_returns_positive_numbers():
    recs = rm.measure(
        "moments", "indrnn", _cfg(6), repeats=1, variants=("bp",), identify=False
    )
    assert [r["variant"] for r in recs] == ["bp"]
    # the vjp closure holds at least the scan's stacked residuals
    assert recs[0]["vjp_leaf_bytes"] >= recs[0]["scan_per_step_bytes"]
    for r in recs:
        assert r["residual_bytes"] > 0 and r["scan_per_step_bytes"] > 0
        assert r["arrays_per_step"] > 0 and r["step_s"] > 0
        assert r["temp_bytes"] is None or r["temp_bytes"] > 0
    assert "| moments | indrnn (relu) | bp |" in rm.markdown_table(recs)
