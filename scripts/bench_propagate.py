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

import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402
from dualflow.benchmarks.propagate import (  # noqa: E402
    CASES,
    QUICK_CASES,
    run_benchmark,
)

MODES = ("linearized", "matched")
FULL_OUT = os.path.join(_REPO, "results", "propagate_bench", "bench.json")
QUICK_OUT = os.path.join(_REPO, "results", "tmp", "propagate_bench_quick.json")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table."""
    ap = cli.argument_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,resnet20", help="comma-separated")
    ap.add_argument("--modes", default="linearized,matched", help="comma-separated")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds")
    ap.add_argument("--trace_repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny models (tests)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {FULL_OUT})")
    args = ap.parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    models = cli.parse_list(args.models, "models", choices=tuple(cases))
    modes = cli.parse_list(args.modes, "modes", choices=MODES)
    for flag in ("repeats", "trace_repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    try:
        result = run_benchmark(
            models=models,
            modes=modes,
            repeats=args.repeats,
            trace_repeats=args.trace_repeats,
            quick=args.quick,
            out=out,
            command=f"python scripts/bench_propagate.py {argv_s}".strip(),
            repo=_REPO,
            log=lambda s: print(s, flush=True),
        )
    except FileExistsError as err:  # a quick run aimed at a full result
        cli.fail(str(err), "pass another --out")
    except FloatingPointError as err:  # a diverged step
        cli.diverged(err)
    print(result["table"])
    print(
        f"done in {time.perf_counter() - t0:.0f} s; wrote {out} and"
        f" {os.path.splitext(out)[0]}.md"
    )
    return 0


if __name__ == "__main__":
    cli.run_plain(main)
