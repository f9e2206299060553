"""Overhead of ``dualflow.propagate`` vs the hand-written ``bp`` models (issue 17).

    python scripts/bench_propagate.py                    # MLP + ResNet-20, both modes
    python scripts/bench_propagate.py --models=mlp --modes=linearized --repeats=5
    python scripts/bench_propagate.py --quick            # tiny sizes (tests)

Per model and mode: the jitted train step of (A) the transformed deterministic
forward and (B) the hand-written bp model (same objective, Adam), their step
time ratio A/B (median of alternating repeats, quartiles and range), the
dot/convolution counts of the compiled HLO and the lowered StableHLO, and the
trace / lowering / compile seconds (:mod:`dualflow.benchmarks.propagate`).
Writes ``--out`` (JSON, atomic) and a markdown table next to it.  ``--quick``
without ``--out`` writes under ``results/tmp`` so a full result is never
replaced by a quick one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow.benchmarks.propagate import run_benchmark  # noqa: E402

FULL_OUT = os.path.join(_REPO, "results", "propagate_bench", "bench.json")
QUICK_OUT = os.path.join(_REPO, "results", "tmp", "propagate_bench_quick.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,resnet20", help="comma-separated")
    ap.add_argument("--modes", default="linearized,matched", help="comma-separated")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds")
    ap.add_argument("--trace_repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny models (tests)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {FULL_OUT})")
    args = ap.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    result = run_benchmark(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        repeats=args.repeats,
        trace_repeats=args.trace_repeats,
        quick=args.quick,
        out=out,
        command=f"python scripts/bench_propagate.py {argv_s}".strip(),
        repo=_REPO,
        log=lambda s: print(s, flush=True),
    )
    print(result["table"])
    print(
        f"done in {time.perf_counter() - t0:.0f} s; wrote {out} and"
        f" {os.path.splitext(out)[0]}.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
