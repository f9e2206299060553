"""Sine-regression study of the VI report (issue 7): reparam vs bp across beta.

    python scripts/sine_vi.py                       # full run -> results/sine_vi
    python scripts/sine_vi.py --quick --out_dir=/tmp/sine_vi

Section 4 of "Bayesian neural networks and variational inference"
(``../shared/papers/003_8297dee864a545ef.txt``): an MLP 1-10-10-1 with tanh
and mean-field Gaussian
weights, trained for each beta in {1, 0.1, 0.01, 1e-3, 1e-4} by
Bayes-by-backprop (``Method("reparam")``, one weight sample per step) and by
``Method("bp")`` (moment forward, linearised tanh, BP backward); both with
Adam, full batch, the same initialisation.

The report does not state the data, the noise model, the optimiser settings or
the batch size.  Choices here: ``n_train`` points ``x ~ U(-3, 3)``,
``y = sin(x) + N(0, 0.1^2)``; test ``n_test`` fresh points from the same
distribution; the figure covers ``[-5, 5]`` (extrapolation beyond the data);
Gaussian likelihood with the noise variance fixed to the true 0.01 (the
report's "L2 loss" is ``-MSE``, i.e. a fixed noise variance 1/2 up to a
constant); prior N(0, 1), initial log-variance -7 unscaled and LeCun means
as in its MNIST set-up (this reproduces its initial "KL" of ~76, Table 2);
Adam lr ``--lr``; ``--iterations`` full-batch steps (the report: 50000).

The objective is dualflow's tempered per-example ELBO
``mean NLL + beta KL(q || p) / n_train``.  Predictive: ``bp`` closed form
(output moments + noise), ``reparam`` ``--samples`` sampled networks (mixture
mean / variance incl. noise); ``*_mc`` metrics evaluate any method's ``q`` by
sampled networks.  Records also carry the report's Table 2 quantities:
``l2 = -mean squared error`` of sampled networks, its ``report_kl``,
``elbo_report = l2 - beta report_kl`` and ``mean_evidence =
exp(elbo_report / 10)`` (:mod:`dualflow.vi`).
"""

from __future__ import annotations

import functools
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

flags.DEFINE_string("out_dir", "results/sine_vi", "Output folder.")
flags.DEFINE_integer("iterations", 50_000, "Full-batch Adam steps per run.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_list("betas", ["1", "0.1", "0.01", "0.001", "0.0001"], "KL weights.")
flags.DEFINE_integer("n_train", 100, "Training points.")
flags.DEFINE_integer("n_test", 1000, "Test points (same distribution).")
flags.DEFINE_float("noise_std", 0.1, "Observation noise std (also the model's).")
flags.DEFINE_float("x_max", 3.0, "Training inputs x ~ U(-x_max, x_max).")
flags.DEFINE_float("plot_max", 5.0, "The figure covers [-plot_max, plot_max].")
flags.DEFINE_float("init_logvar", -7.0, "Initial weight log-variance (unscaled).")
flags.DEFINE_integer("samples", 200, "Sampled networks per MC prediction.")
flags.DEFINE_integer("seed", 0, "Seed (data, initialisation, sampling).")
flags.DEFINE_bool("quick", False, "Tiny run for tests (default out: results/tmp/).")

METHODS = ("reparam", "bp")


def make_data(n_train: int, n_test: int, x_max: float, noise_std: float, seed: int):
    """``(x, y, x_test, y_test)`` float32 ``[N, 1]``: ``y = sin x + noise``."""
    import numpy as np

    rng = np.random.default_rng([seed, 7])

    def draw(n):
        x = rng.uniform(-x_max, x_max, (n, 1))
        return x, np.sin(x) + noise_std * rng.standard_normal((n, 1))

    (x, y), (xt, yt) = draw(n_train), draw(n_test)
    return tuple(a.astype(np.float32) for a in (x, y, xt, yt))


def _model(init_logvar: float, seed: int):
    from flax import nnx

    from dualflow import nn as dnn

    return dnn.MLP(
        (1, 10, 10, 1),
        activation="tanh",
        init_var=math.exp(init_logvar),
        prior_var=1.0,
        var_scaling="none",
        mean_init="lecun",
        rngs=nnx.Rngs(seed),
    )


def _evaluate(model, method_name, lik, beta, n_train, x, y, xg, key, samples, x_max):
    """Metrics of one model on test ``(x, y)`` and its predictive on grid ``xg``
    (one jitted program per method; ``beta`` and the parameters are traced)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    far = jnp.asarray(np.abs(np.asarray(xg[:, 0])) > x_max)
    fn = _metrics_fn(graphdef, method_name, lik, n_train, samples)
    rec, (gm, gv) = fn(state, x, y, xg, far, key, jnp.float32(beta))
    curve = {"mean": np.asarray(gm[:, 0]), "std": np.asarray(np.sqrt(gv[:, 0]))}
    return {k: float(v) for k, v in rec.items()}, curve


@functools.cache
def _metrics_fn(graphdef, method_name, lik, n_train, samples):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dualflow import metrics, vi
    from dualflow import nn as dnn

    sampled = dnn.Method("reparam")
    own = sampled if method_name == "reparam" else dnn.Method("bp")

    @jax.jit
    def fn(state, x, y, xg, far, key, beta):
        model = nnx.merge(graphdef, state)
        k1, k2 = jax.random.split(key)

        def pred(xx, method):
            return dnn.predict(
                model,
                xx,
                method=method,
                likelihood=lik,
                key=k1,
                num_samples=samples,
                jit=False,
            )

        p, p_mc, g = pred(x, own), pred(x, sampled), pred(xg, own)
        outs = vi.sample_outputs(model, x, k2, samples)  # [S, N, 1]
        ll = vi.log_likelihood(outs, y, likelihood=lik)
        kl = dnn.kl_divergence(model)
        terms = vi.elbo_terms(ll, kl, n_data=n_train, kl_weight=beta)
        l2 = -jnp.mean((outs - y[None]) ** 2)
        kl_rep = vi.report_kl(model)
        elbo_rep = l2 - beta * kl_rep
        std_g = jnp.sqrt(g.var[:, 0])
        rec = {
            "test_rmse": metrics.rmse(p.mean, y),
            "test_nll": -jnp.mean(dnn.predictive_log_likelihood(p, y)),
            "mean_predictive_std": jnp.mean(jnp.sqrt(p.var)),
            "mean_epistemic_std": jnp.mean(
                jnp.sqrt(jnp.maximum(p.var - lik.noise_var, 0.0))
            ),
            "mean_predictive_std_extrapolation": jnp.sum(std_g * far) / far.sum(),
            "test_rmse_mc": metrics.rmse(p_mc.mean, y),
            "test_nll_mc": -jnp.mean(dnn.predictive_log_likelihood(p_mc, y)),
            "mean_predictive_std_mc": jnp.mean(jnp.sqrt(p_mc.var)),
            **terms,
            "l2": l2,
            "kl_report": kl_rep,
            "elbo_report": elbo_rep,
            "mean_evidence": vi.mean_approximate_evidence(elbo_rep),
        }
        return rec, (g.mean, g.var)

    return fn


def _train_all(method_name, lik, betas, x, y, iterations, lr, init_logvar, seed):
    """Full-batch Adam, ``iterations`` steps in one ``lax.scan``, all betas at
    once (``vmap`` over the KL weight; the same initialisation and keys).

    Returns ``([model per beta], final losses [B], seconds)``.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.train.scan import make_scan_fit

    graphdef, params, rest = nnx.split(_model(init_logvar, seed), nnx.Param, ...)
    xj, yj, key = jnp.asarray(x), jnp.asarray(y), jax.random.key(seed + 1)

    def one(beta):
        run = make_scan_fit(
            graphdef,
            optax.adam(lr),
            method=dnn.Method(method_name),
            likelihood=lik,
            n_data=len(x),
            batch_size=len(x),
            epochs=iterations,
            kl_weight=beta,
        )
        p, r, hist = run(params, rest, xj, yj, key)
        return p, r, hist["loss"][-1]

    t0 = time.perf_counter()
    ps, rs, loss = jax.jit(jax.vmap(one))(jnp.asarray(betas, jnp.float32))
    loss = jax.block_until_ready(loss)
    seconds = time.perf_counter() - t0
    models = [
        nnx.merge(graphdef, *jax.tree.map(lambda a, i=i: a[i], (ps, rs)))
        for i in range(len(betas))
    ]
    return models, [float(v) for v in loss], seconds


def _plot(curves, data, betas, path: Path, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x, y, xg = data
    fig, axes = plt.subplots(
        len(METHODS),
        len(betas),
        figsize=(3.2 * len(betas), 2.8 * len(METHODS)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, m in enumerate(METHODS):
        for j, b in enumerate(betas):
            ax = axes[i, j]
            c = curves[(m, b)]
            ax.fill_between(
                xg, c["mean"] - 2 * c["std"], c["mean"] + 2 * c["std"], alpha=0.3
            )
            ax.plot(xg, c["mean"], lw=1.5, label="predictive mean")
            ax.plot(xg, np.sin(xg), "k--", lw=1, label="sin(x)")
            ax.plot(x[:, 0], y[:, 0], ".", ms=3, color="C3", label="training data")
            ax.set_ylim(-3, 3)
            ax.set_title(f"{m}, beta={b:g}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "MLP 1-10-10-1 tanh, predictive mean +/- 2 std (incl. noise"
        f" {cfg['noise_std']:g}); {cfg['iterations']} Adam steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    """Train both methods for every beta; write records, table and figure."""
    del argv
    F = flags.FLAGS
    t_start = time.time()
    import jax
    import numpy as np

    from dualflow import nn as dnn
    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    if F.quick:  # explicit flags win over the quick settings
        cli.quick_defaults(
            F,
            {"iterations": 200, "samples": 32, "n_test": 200, "betas": ["1", "0.0001"]},
        )
    if F.quick and F.out_dir == flags.FLAGS["out_dir"].default:
        F.out_dir = "results/tmp/sine_vi_quick"  # never overwrites a full run
    betas = cli.parse_list(F.betas, "betas", type=float)
    if any(b < 0 for b in betas):
        cli.fail(f"--betas: KL weights must be >= 0, got {','.join(F.betas)}")
    for name in ("iterations", "n_train", "n_test", "samples"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    out = Path(F.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y, xt, yt = make_data(F.n_train, F.n_test, F.x_max, F.noise_std, F.seed)
    xg = np.linspace(-F.plot_max, F.plot_max, 201, dtype=np.float32)[:, None]
    lik = dnn.Likelihood("gaussian", noise_var=F.noise_std**2)
    records, curves = [], {}
    ekey = jax.random.key(F.seed + 2)
    for m in METHODS:
        models, losses, secs = _train_all(
            m, lik, betas, x, y, F.iterations, F.lr, F.init_logvar, F.seed
        )
        print(f"{m}: {len(betas)} betas trained together in {secs:.1f} s")
        for b, model, loss in zip(betas, models, losses, strict=True):
            model0 = _model(F.init_logvar, F.seed)
            rec0, _ = _evaluate(
                model0, m, lik, b, len(x), xt, yt, xg, ekey, F.samples, F.x_max
            )
            rec, curves[(m, b)] = _evaluate(
                model, m, lik, b, len(x), xt, yt, xg, ekey, F.samples, F.x_max
            )
            common = {"method": m, "beta": b}
            records.append({**common, "iteration": 0, **rec0})
            records.append(
                {
                    **common,
                    "iteration": F.iterations,
                    **rec,
                    "final_loss": loss,
                    "train_seconds_all_betas": secs,
                    "seconds_per_iteration_all_betas": secs / F.iterations,
                }
            )
            print(
                f"{m:8s} beta={b:<7g} RMSE {rec['test_rmse']:.4f} NLL"
                f" {rec['test_nll']:.3f} std {rec['mean_predictive_std']:.3f}"
                f" (extrapolation {rec['mean_predictive_std_extrapolation']:.3f})"
                f" KL {rec['kl']:.1f}"
            )
    _plot(
        curves,
        (x, y, xg[:, 0]),
        betas,
        out / "predictive.png",
        {"noise_std": F.noise_std, "iterations": F.iterations},
    )
    wall = time.time() - t_start
    commit = git_commit(_REPO)
    meta = {
        "study": "VI report (003) section 4: sine regression, MLP 1-10-10-1 tanh",
        "data": (
            f"x ~ U(-{F.x_max:g}, {F.x_max:g}), y = sin(x) + N(0, {F.noise_std:g}^2);"
            f" {F.n_train} training, {F.n_test} test points (our choice: the report"
            " does not state its data)"
        ),
        "noise_var": F.noise_std**2,
        "noise_note": "fixed to the true noise variance (not learned)",
        "iterations": F.iterations,
        "optimizer": f"Adam lr {F.lr:g}, full batch",
        "betas": betas,
        "prior": "N(0, 1) (var_scaling='none')",
        "init": f"LeCun-normal means, biases 0, log-variance {F.init_logvar:g}",
        "bp_mode": "linearized (Algorithm 1)",
        "samples": F.samples,
        "seed": F.seed,
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": commit,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "wall_seconds": wall,
    }
    write_json_atomic(out / "results.json", {**meta, "records": records})
    head = (
        "| method | beta | test RMSE | test NLL | mean pred. std | epistemic std |"
        " std |x|>3 | MC RMSE | MC NLL | KL (nats) | ELBO/ex | L2 (report) |"
        " report KL | report ELBO | mean evidence |\n" + "|---" * 16 + "|\n"
    )
    rows = "\n".join(
        f"| {r['method']} | {r['beta']:g} | {r['test_rmse']:.4f} |"
        f" {r['test_nll']:.3f} | {r['mean_predictive_std']:.3f} |"
        f" {r['mean_epistemic_std']:.3f} |"
        f" {r['mean_predictive_std_extrapolation']:.3f} | {r['test_rmse_mc']:.4f} |"
        f" {r['test_nll_mc']:.3f} | {r['kl']:.1f} | {r['elbo']:.3f} |"
        f" {r['l2']:.4f} | {r['kl_report']:.2f} | {r['elbo_report']:.4f} |"
        f" {r['mean_evidence']:.4f} |"
        for r in records
        if r["iteration"] == F.iterations
    )
    r0 = [r for r in records if r["iteration"] == 0 and r["method"] == "reparam"]
    init = ""
    for r in r0:
        if r["beta"] == 1e-3:
            init = (
                f"At initialisation (beta 0.001): L2 {r['l2']:.4f}, report KL"
                f" {r['kl_report']:.2f}, report ELBO {r['elbo_report']:.4f}, mean"
                f" evidence {r['mean_evidence']:.4f} (report, Table 2: -0.60035,"
                " 76.00, -0.67635, 0.93460).\n"
            )
    md = (
        "# VI report, sine regression\n\n"
        f"{meta['data']}; noise variance fixed to {F.noise_std**2:g}; MLP 1-10-10-1"
        f" tanh; {F.iterations} full-batch Adam steps (lr {F.lr:g}); prior N(0,1),"
        f" initial log-variance {F.init_logvar:g}.  Predictive std includes the"
        " noise; `std |x|>3`: mean predictive std on the plot grid outside the"
        f" training range; MC: q by {F.samples} sampled networks.\n\n"
        + head
        + rows
        + "\n\n"
        + init
        + f"\nCommit {commit}; wall time {wall:.0f} s; command `{meta['command']}`.\n"
    )
    write_text_atomic(out / "results.md", md)
    print(md)
    print(f"wrote {out}/results.json, results.md, predictive.png ({wall:.0f} s)")


if __name__ == "__main__":
    cli.run(main, allow_args=False)
