"""Cost of every model: parameters, forward FLOPs, bp / deterministic step time.

    python scripts/bench_models.py                       # all models, batch 8
    python scripts/bench_models.py --models=resnet20,mlp --repeats=1 \
        --out=/tmp/bench.json                            # a quick subset
    python scripts/bench_models.py --models=resnet20 --conv-impls=lax,im2col
        # instead: step times per conv implementation (issue 22), one run

For each model (normalisation-free variant, CIFAR shape 32x32x3, 10 classes)
one SGD train step is compiled and timed for ``deterministic`` and ``bp`` on
the same graph (median of ``--repeats``; the two take turns).  Writes the
records (JSON) and a markdown table next to them; paste the table into
docs/models.md with the command line.
"""

from __future__ import annotations

import os
import platform
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import jax  # noqa: E402

from dualflow import cli  # noqa: E402
from dualflow.benchmarks.models import (  # noqa: E402
    BENCH_MODELS,
    TINY,
    compare_conv_impls,
    markdown_table,
    mc_variance_ratios,
    measure_model,
)
from dualflow.io import (  # noqa: E402
    git_commit,
    write_json_atomic,
    write_text_atomic,
)


def _mc(args) -> int:
    print(
        f"bp vs Monte Carlo, tiny models, init_var {args.init_var} / fan_in,"
        f" {args.samples} samples; var ratio = bp / MC (min, median, max)"
    )
    print(
        "| family | max abs z of mean (lin / matched) | var ratio vs reparam |"
        " var ratio vs local reparam |\n|---|---|---|---|"
    )
    for fam in TINY:
        r = mc_variance_ratios(fam, init_var=args.init_var, samples=args.samples)

        def f(v):
            return "{:.2f} / {:.2f} / {:.2f}".format(*v)

        print(
            f"| {fam} | {r['linearized_max_abs_z_mean']:.1f} /"
            f" {r['matched_max_abs_z_mean']:.1f} |"
            f" {f(r['matched_var_ratio_reparam'])} |"
            f" {f(r['matched_var_ratio_local_reparam'])} |",
            flush=True,
        )
    return 0


def _conv_impls(args, rows) -> int:
    from dualflow.moments._conv_cpu import CONV_IMPLS

    impls = cli.parse_list(args.conv_impls, "conv-impls", choices=CONV_IMPLS)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch},"
        f" median of {args.repeats}; step ms (ratio to the first impl)"
    )
    for label, name, kw in rows:
        if kw:
            continue  # the registry defaults only
        t = compare_conv_impls(
            name,
            impls,
            batch=args.batch,
            repeats=args.repeats,
            unfused_too=args.unfused_variance,
        )
        for method in ("deterministic", "bp"):
            base = t[f"{method} {impls[0]}"]
            cells = [
                f"{i} {t[f'{method} {i}'] * 1e3:.1f} ({t[f'{method} {i}'] / base:.2f})"
                for i in impls
            ]
            print(f"  {label} {method}: " + ", ".join(cells), flush=True)
        print(
            f"  {label} bp/det: "
            + ", ".join(
                f"{i} {t[f'bp {i}'] / t[f'deterministic {i}']:.2f}" for i in impls
            ),
            flush=True,
        )
        for i in impls if args.unfused_variance else ():
            r = t[f"bp {i} unfused"] / t[f"bp {i}"]
            print(f"  {label} bp {i}: unfused / fused conv variance {r:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure the models, write JSON and markdown."""
    ap = cli.argument_parser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="",
        help="comma-separated row labels or registry names (default: all rows)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", default=os.path.join(_REPO, "results", "models", "bench.json")
    )
    ap.add_argument(
        "--mc",
        action="store_true",
        help="instead: bp output moments of the tiny model of every family vs"
        " Monte Carlo",
    )
    ap.add_argument(
        "--conv-impls",
        default="",
        help="instead: time deterministic and bp steps of --models under each of"
        " these conv implementations (e.g. lax,im2col; DUALFLOW_CONV_IMPL values)"
        " in one interleaved loop",
    )
    ap.add_argument(
        "--unfused-variance",
        action="store_true",
        help="with --conv-impls: also time bp with the two conv variance products"
        " of before issue 22",
    )
    ap.add_argument("--init_var", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=4000)
    args = ap.parse_args(argv)
    for flag in ("batch", "repeats", "samples"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.mc:
        return _mc(args)
    want = cli.parse_list(args.models, "models", allow_empty=True)
    rows = [r for r in BENCH_MODELS if not want or r[0] in want or r[1] in want]
    unknown = [w for w in want if not any(w in (r[0], r[1]) for r in BENCH_MODELS)]
    if unknown or not rows:
        known = ", ".join(r[0] for r in BENCH_MODELS)
        bad = ", ".join(map(repr, unknown))
        cli.fail(f"--models: unknown {bad}; choose from {known}")
    if args.conv_impls:
        return _conv_impls(args, rows)
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({platform.processor() or '?'},"
        f" {os.cpu_count()} cores); batch {args.batch}, median of {args.repeats}",
        flush=True,
    )
    records, labels = [], []
    t0 = time.perf_counter()
    for i, (label, name, kw) in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {label}", flush=True)
        try:
            r = measure_model(
                name,
                kw,
                batch=args.batch,
                repeats=args.repeats,
                log=lambda s: print(s, flush=True),
            )
        except FloatingPointError as err:  # a diverged step: one line, exit 2
            cli.diverged(err)
        r["label"] = label
        records.append(r)
        labels.append(label)
        print(
            f"  params {r['params_published_variant']:,d}; step det"
            f" {r['step_s_deterministic']:.3f} s, bp {r['step_s_bp']:.3f} s,"
            f" ratio {r['step_ratio_bp_over_deterministic']:.2f}",
            flush=True,
        )
    table = markdown_table(records, labels)
    cmd = "python scripts/bench_models.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = {
        "command": cmd.strip(),
        "commit": git_commit(_REPO),
        "jax": jax.__version__,
        "platform": dev.platform,
        "cpu_count": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
    }
    write_json_atomic(args.out, {"meta": meta, "records": records})
    md = os.path.splitext(args.out)[0] + ".md"
    write_text_atomic(
        md,
        f"`{meta['command']}` (commit {meta['commit']}, {meta['platform']},"
        f" {meta['cpu_count']} cores, {meta['wall_s'] / 60:.1f} min)\n\n"
        + table
        + "\n",
    )
    print(table)
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    cli.run_plain(main)
