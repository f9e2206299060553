"""Quick mode of the propagate-overhead benchmark (scripts/bench_propagate.py)."""

from __future__ import annotations

import json
import os

import pytest

from dualflow.benchmarks.propagate import count_ops, run_benchmark

_VARIANTS = ("propagate", "handwritten")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = str(tmp_path_factory.mktemp("bench") / "bench.json")
    res = run_benchmark(
        models=("mlp", "resnet20"),
        modes=("linearized",),
        repeats=2,
        trace_repeats=1,
        quick=True,
        out=out,
        command="test",
        log=lambda s: None,
    )
    return res, out


def test_json_fields(quick):
    res, out = quick
    with open(out) as f:
        data = json.load(f)
    assert data["meta"]["quick"] is True and data["meta"]["command"] == "test"
    assert os.path.exists(os.path.splitext(out)[0] + ".md")
    assert [(r["model"], r["mode"]) for r in data["records"]] == [
        ("mlp", "linearized"),
        ("resnet20", "linearized"),
    ]
    for r in data["records"]:
        for v in _VARIANTS:
            for k in ("trace_s", "lower_s", "compile_s", "step_s"):
                assert r[f"{k}_{v}"] > 0, (k, v)
            assert len(r[f"step_times_{v}"]) == 2
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert len(r["ratios"]) == 2
    assert "| mlp | linearized |" in res["table"]


def test_same_outputs_and_loss(quick):
    for r in quick[0]["records"]:
        assert r["forward_max_abs_diff_mean"] <= 1e-5, r["model"]
        assert r["forward_max_abs_diff_var"] <= 1e-6, r["model"]
        assert r["loss_propagate"] == pytest.approx(r["loss_handwritten"], rel=1e-5)


def test_op_counts(quick):
    """Same dots; convolution counts differ only by the fused variance product.

    Neither side computes the zero-variance product of a point input (the
    transform carries no zero variance; the NNX layers keep a point input an
    array until the first weight layer, which then runs ``op(x^2, s2)``
    alone), so a dense network runs exactly the same dots.  The hand-written
    conv layers compute ``op(m^2, s2) + op(P, mu^2 + s2)`` as one convolution
    over concatenated channels (forward and BP backward) where the
    transform's bilinear rule keeps two, so they run fewer convolutions.
    """
    for r in quick[0]["records"]:
        assert r["hlo_dot_propagate"] == r["hlo_dot_handwritten"], r
        if r["model"] == "mlp":
            assert r["hlo_conv_propagate"] == r["hlo_conv_handwritten"] == 0
        else:
            assert r["hlo_conv_handwritten"] < r["hlo_conv_propagate"], r


def test_count_ops_parses_hlo():
    hlo = (
        "  %dot.1 = f32[2,3]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n"
        "  %convolution.2 = f32[1,4,4,2]{3,2,1,0} convolution(%x, %w), window={}\n"
        '  %cc = f32[2] custom-call(%a), custom_call_target="__cublas$gemm"\n'
        "  %dot_fusion = f32[2] fusion(%a), calls=%fused_dot\n"
    )
    shlo = "stablehlo.dot_general %a, %b\nstablehlo.convolution(%x, %w)\n"
    assert count_ops(hlo, shlo) == {
        "hlo_dot": 2,
        "hlo_conv": 1,
        "stablehlo_dot": 1,
        "stablehlo_conv": 1,
    }


def test_quick_never_replaces_full(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"meta": {"quick": False}, "records": []}))
    with pytest.raises(FileExistsError):
        run_benchmark(models=("mlp",), quick=True, out=str(out), log=lambda s: None)
