"""The duality paper's Figs. 2 and 3 as library code: what a network believes.

The pieces ``scripts/visualize.py`` and ``notebooks/hmc_beliefs.ipynb`` share:

* :func:`sample_with_diagnostics` -- NUTS (:func:`~dualflow.hmc.run_hmc`) from
  given chain starts, split R-hat checked against a threshold, one printed line
  (R-hat, ESS, acceptance, divergences, seconds) and a diagnostics record.
* Fig. 2, Boston housing (:func:`boston_study`, :func:`plot_boston`): a bp BNN
  and two independently trained deterministic networks
  (:func:`train_regressor`).  The joint ``p(x, y) ∝ p(y | x) p0(x)`` has the
  prior ``p0`` as its ``x``-marginal for any network (``p(y | x)`` integrates
  to 1 over ``y``), so what a network believes shows in the conditionals
  ``p(x | y*) ∝ p(y* | x) p0(x)``: :func:`conditional_potential` samples them
  for several labels ``y*`` at once (one block of inputs per label),
  :func:`conditional_init` starts the chains at perturbed training inputs with
  labels near ``y*`` and :func:`prediction_gap` measures how far the
  network's predictions at the sampled inputs fall from ``y*``.
* Fig. 3, a 2-D Gaussian mixture (:func:`mixture_study`,
  :func:`plot_mixture`): a bp BNN classifies the component; HMC samples
  ``p(x | y = k) ∝ p(y = k | x) p0(x)`` for every class at once
  (:func:`class_block_potential`).

The ``plot_*`` functions return a matplotlib figure and leave the backend
alone (inline in a notebook, ``Agg`` in the script).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualflow.hmc.potentials import (
    class_log_prob_fn,
    classification_potential,
    gaussian_log_prior,
    regression_potential,
)
from dualflow.hmc.sampling import HMCResult, check_converged, run_hmc

__all__ = [
    "BOSTON_PERCENTILES",
    "MIXTURE_MEANS",
    "BostonPanel",
    "BostonStudy",
    "MixtureStudy",
    "SampledRun",
    "boston_study",
    "class_block_init",
    "class_block_potential",
    "conditional_init",
    "conditional_potential",
    "label_targets",
    "mixture_data",
    "mixture_study",
    "plot_boston",
    "plot_mixture",
    "predict_means",
    "prediction_gap",
    "sample_with_diagnostics",
    "train_classifier",
    "train_regressor",
]

Array = jax.Array

BOSTON_PERCENTILES = (10, 30, 50, 70, 90)
MIXTURE_MEANS = ((-2.0, -1.0), (2.0, -1.0), (0.0, 2.0))


# --------------------------------------------------------------------------
# sampling with diagnostics
# --------------------------------------------------------------------------
class SampledRun(NamedTuple):
    """One HMC run and its convergence verdict.

    Attributes:
      name: what was sampled (``"boston_bp"``, ``"mixture"``, ...).
      result: the :class:`~dualflow.hmc.HMCResult` (draws, R-hat, ESS).
      converged: split R-hat ``<= max_rhat`` (and finite).
      record: plain-number diagnostics (``figure, max_rhat, min_ess,
        converged, chains, warmup, draws_per_chain, accept_prob, divergences,
        seconds`` and whatever ``extra_fn`` added), as in ``diagnostics.json``.
    """

    name: str
    result: HMCResult
    converged: bool
    record: dict


def sample_with_diagnostics(
    name: str,
    potential: Callable[[Array], Array],
    init: np.ndarray | Array,
    *,
    num_warmup: int,
    num_samples: int,
    key: Array | int = 0,
    max_rhat: float = 1.1,
    extra_fn: Callable[[HMCResult], dict] | None = None,
    verbose: bool = True,
) -> SampledRun:
    """NUTS from ``init`` ``[chains, dim]``; R-hat checked, never raising.

    ``potential`` is jitted here.  Prints one line (split R-hat, min ESS, mean
    acceptance, divergences, seconds) and, to stderr, a warning when there
    were divergent transitions or the smallest ESS is below 100.
    ``extra_fn(result)`` adds numbers to the record (it runs before the line
    is printed).
    """
    init = jnp.asarray(init, jnp.float32)
    res = run_hmc(
        jax.jit(potential),
        init,
        num_warmup=num_warmup,
        num_samples=num_samples,
        key=key,
    )
    ok = check_converged(res, max_rhat, force=True)
    extra = extra_fn(res) if extra_fn else {}
    if verbose:
        print(
            f"{name}: split R-hat {res.max_rhat:.3f}  min ESS {res.min_ess:.0f}  accept"
            f" {res.accept_prob:.2f}  divergences {res.divergences}"
            f"  ({res.seconds:.1f} s)"
        )
        if res.divergences or res.min_ess < 100:
            print(
                f"warning: {name}: {res.divergences} divergent transitions, min ESS"
                f" {res.min_ess:.0f}; treat the figure with care or run longer.",
                file=sys.stderr,
            )
    record = {
        "figure": name,
        "max_rhat": res.max_rhat,
        "min_ess": res.min_ess,
        "converged": ok,
        "chains": int(init.shape[0]),
        "warmup": int(num_warmup),
        "draws_per_chain": int(num_samples),
        "accept_prob": res.accept_prob,
        "divergences": res.divergences,
        "seconds": res.seconds,
        **extra,
    }
    return SampledRun(name, res, ok, record)


# --------------------------------------------------------------------------
# Fig. 2: regression (Boston housing)
# --------------------------------------------------------------------------
def train_regressor(
    method: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    epochs: int = 200,
    kl_weight: float = 1.0,
    hidden: Sequence[int] = (50,),
    noise_var: float = 0.1,
    learning_rate: float = 1e-2,
    batch_size: int = 32,
):
    """A :class:`~dualflow.nn.Regressor` (ReLU, learned homoscedastic noise)
    trained with Adam on ``x [n, d]``, ``y [n]``; returns ``(model, Method)``."""
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.train import fit

    model = dnn.Regressor(
        x.shape[1], tuple(hidden), rngs=nnx.Rngs(seed), noise_var=noise_var
    )
    m = dnn.Method(method)
    fit(
        model,
        optax.adam(learning_rate),
        x,
        y[:, None],
        method=m,
        likelihood=dnn.Likelihood("gaussian"),
        epochs=epochs,
        batch_size=batch_size,
        kl_weight=kl_weight,
        seed=seed,
        progress=False,
    )
    return model, m


def label_targets(
    y: np.ndarray, percentiles: Sequence[float] = BOSTON_PERCENTILES
) -> np.ndarray:
    """The labels ``y*`` to condition on: percentiles of the training labels."""
    return np.percentile(y, list(percentiles)).astype(np.float32)


def conditional_init(
    x: np.ndarray,
    y: np.ndarray,
    y_star: np.ndarray,
    chains: int,
    rng: np.random.Generator,
    *,
    nearest: int = 20,
    jitter: float = 0.1,
) -> np.ndarray:
    """Chain starts ``[chains, K * d]``: per label ``y*_k`` a training input
    drawn from the ``nearest`` ones whose labels are closest, plus
    ``jitter`` times standard normal noise."""
    near = [np.argsort(np.abs(y - t))[:nearest] for t in y_star]
    init = np.stack(
        [np.concatenate([x[rng.choice(idx)] for idx in near]) for _ in range(chains)]
    )
    return init + jitter * rng.standard_normal(init.shape)


def conditional_potential(
    models: Sequence[Any],
    method,
    log_prior_x: Callable[[Array], Array],
    y_star: np.ndarray,
    *,
    key: Array | None = None,
    num_samples: int = 16,
) -> Callable[[Array], Array]:
    """``U(u) = -sum_k [log p(y*_k | x_k) + log p0(x_k)]``, ``u = concat(x_k)``.

    ``p(y | x)`` is the model's predictive density
    (:func:`~dualflow.hmc.regression_potential`; sampling methods need a
    fixed ``key``); with several models the equal-weight mixture of theirs.
    The ``K`` blocks are independent: one chain samples ``p(x | y*_k)`` for
    every label at once.
    """
    models = list(models)
    pot = regression_potential(
        models if len(models) > 1 else models[0],
        method,
        log_prior_x,
        key=key,
        num_samples=num_samples,
    )
    ys = jnp.asarray(y_star)
    k = len(y_star)

    def potential(u):
        xs = u.reshape(k, -1)
        return jnp.sum(jax.vmap(lambda xk, yk: pot(jnp.append(xk, yk)))(xs, ys))

    return potential


def predict_means(models: Sequence[Any], method, xs: np.ndarray) -> list[np.ndarray]:
    """Each model's predictive mean ``[n]`` at inputs ``xs [n, d]``."""
    from dualflow import nn as dnn

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


def prediction_gap(
    models: Sequence[Any],
    method,
    result: HMCResult,
    y_star: np.ndarray,
    y_std: float = 1.0,
) -> float:
    """RMS of ``prediction - y*`` over all draws, labels and models, in the
    units of ``y_std`` (the draws are the ``K`` blocks of
    :func:`conditional_potential`)."""
    k = len(y_star)
    xs = result.flat.reshape(-1, k, result.flat.shape[-1] // k)
    gaps = [
        np.asarray(p) - y_star[j]
        for j in range(k)
        for p in predict_means(models, method, xs[:, j])
    ]
    return float(y_std * np.sqrt(np.mean(np.concatenate(gaps) ** 2)))


class BostonPanel(NamedTuple):
    """One row of the Boston figure: the network(s), their method, the run."""

    title: str
    models: list
    method: Any
    run: SampledRun


@dataclasses.dataclass
class BostonStudy:
    """What :func:`boston_study` computed (``y_star`` standardised)."""

    split: Any  # dualflow.data.UCISplit
    y_star: np.ndarray
    panels: list[BostonPanel]
    rng: np.random.Generator  # continues after the chain starts (plot jitter)

    @property
    def runs(self) -> list[SampledRun]:
        return [p.run for p in self.panels]

    @property
    def converged(self) -> bool:
        return all(p.run.converged for p in self.panels)


def boston_study(
    split,
    *,
    seed: int = 0,
    epochs: int = 200,
    chains: int = 8,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    prior_scale: float = 2.0,
    max_rhat: float = 1.1,
    percentiles: Sequence[float] = BOSTON_PERCENTILES,
    verbose: bool = True,
) -> BostonStudy:
    """Fig. 2: train a bp BNN and two deterministic networks on ``split`` (a
    :class:`~dualflow.data.UCISplit`) and sample ``p(x | y*)`` for each.

    The prior is ``N(0, prior_scale^2 Σ_train)`` on the standardised inputs;
    both runs start from the same points (:func:`conditional_init`, seeded by
    ``seed``) with keys ``100 * seed`` and ``100 * seed + 1``.  Each run's
    record has ``y_star`` (original units) and
    ``rms_prediction_minus_label``.
    """
    from dualflow import nn as dnn

    x, y = split.x_train, split.y_train
    t0 = time.time()
    bnn, bp = train_regressor("bp", x, y, seed=seed, epochs=epochs)
    nets = [
        train_regressor("deterministic", x, y, seed=seed + i, epochs=epochs)[0]
        for i in (1, 2)
    ]
    if verbose:
        print(
            f"boston: trained 1 bp BNN + 2 networks ({epochs} epochs,"
            f" {time.time() - t0:.1f} s)"
        )
    y_star = label_targets(y, percentiles)
    log_prior = gaussian_log_prior(np.cov(x.T), prior_scale)
    rng = np.random.default_rng(seed)
    init = conditional_init(x, y, y_star, chains, rng)
    panels = []
    for i, (name, title, models, method) in enumerate(
        (
            ("boston_bp", "bp BNN (Algorithm 1)", [bnn], bp),
            (
                "boston_two_networks",
                "two networks (circles: net 1, triangles: net 2)",
                nets,
                dnn.Method("deterministic"),
            ),
        )
    ):

        def rms_gap(res, models=models, method=method, name=name):
            gap = prediction_gap(models, method, res, y_star, split.y_std)
            if verbose:
                print(
                    f"{name}: RMS(prediction - y*) at the sampled inputs"
                    f" {gap:.2f} ($1000s)"
                )
            return {
                "y_star": (split.y_mean + split.y_std * y_star).tolist(),
                "rms_prediction_minus_label": gap,
            }

        run = sample_with_diagnostics(
            name,
            conditional_potential(models, method, log_prior, y_star),
            init,
            num_warmup=num_warmup,
            num_samples=num_samples,
            key=seed * 100 + i,
            max_rhat=max_rhat,
            extra_fn=rms_gap,
            verbose=verbose,
        )
        panels.append(BostonPanel(title, models, method, run))
    return BostonStudy(split, y_star, panels, rng)


def plot_boston(
    x: np.ndarray,
    y_star: np.ndarray,
    panels: Sequence[BostonPanel],
    *,
    y_mean: float = 0.0,
    y_std: float = 1.0,
    rng: np.random.Generator | None = None,
    figsize: tuple[float, float] = (11, 10),
):
    """Fig. 2: per panel (a row) the label ``y*`` vs the prediction at the
    inputs sampled for it, and the samples on the top-2 principal components
    of the training inputs ``x`` (Mahalanobis 1/2/3 ellipses of the samples,
    contour lines of the prediction on the PC plane through the mean).

    ``y_mean``/``y_std`` map standardised labels to original units; ``rng``
    jitters the labels (default ``default_rng(0)``).
    """
    import matplotlib.pyplot as plt

    rng = rng if rng is not None else np.random.default_rng(0)
    k_lab = len(y_star)
    d = x.shape[1]
    cov = np.cov(x.T)
    _, evecs = np.linalg.eigh(cov)
    pcs = evecs[:, ::-1][:, :2]
    cmap = plt.get_cmap("plasma")
    colors = [cmap(k / (k_lab - 1) * 0.85) for k in range(k_lab)]
    y_lab = y_mean + y_std * np.asarray(y_star)
    fig, axes = plt.subplots(len(panels), 2, figsize=figsize, squeeze=False)
    for row, panel in enumerate(panels):
        models, method, res = panel.models, panel.method, panel.run.result
        xs = res.flat.reshape(-1, k_lab, d)
        ax = axes[row, 0]
        markers = ["o", "^", "s", "D"]
        for k in range(k_lab):
            preds = predict_means(models, method, xs[:, k])
            for j, p in enumerate(preds):
                jitter = 0.25 * rng.standard_normal(len(p))
                ax.scatter(
                    y_lab[k] + jitter,
                    y_mean + y_std * p,
                    s=3,
                    alpha=0.2,
                    color=colors[k],
                    marker=markers[j % len(markers)],
                )
        lo, hi = y_lab[0] - 8, y_lab[-1] + 8
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction = label")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("label y* the inputs are sampled for ($1000s, jittered)")
        ax.set_ylabel("prediction at the sampled x ($1000s)")
        ax.set_title(f"({'abcdefgh'[2 * row]}) {panel.title}", fontsize=10)
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
        for k in range(k_lab):
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
        gp = np.mean(predict_means(models, method, grid), 0)
        cs = ax.contour(
            G0,
            G1,
            (y_mean + y_std * gp).reshape(G0.shape),
            levels=8,
            colors="k",
            linewidths=1,
        )
        ax.clabel(cs, fontsize=7)
        ax.set_xlabel("PC 1 of the training inputs")
        ax.set_ylabel("PC 2")
        ax.set_title(
            f"({'abcdefgh'[2 * row + 1]}) samples on the top-2 PCs; Mahalanobis"
            " 1/2/3 (dotted);\nprediction contours on the PC plane through the mean",
            fontsize=9,
        )
        ax.legend(loc="lower right", markerscale=4, fontsize=7)
    fig.suptitle(
        "Boston housing: inputs a network believes for given prices,"
        " p(x | y*) ∝ p(y* | x) p0(x) (HMC)"
    )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------
# Fig. 3: classification (2-D Gaussian mixture)
# --------------------------------------------------------------------------
def mixture_data(
    rng: np.random.Generator,
    *,
    means: Sequence[Sequence[float]] = MIXTURE_MEANS,
    n_per: int = 200,
    spread: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_per`` points of each isotropic Gaussian component: ``x [n, 2]``
    float32 and the component ``y [n]`` int32."""
    means = np.asarray(means, np.float64)
    x = np.concatenate([m + spread * rng.standard_normal((n_per, 2)) for m in means])
    y = np.repeat(np.arange(len(means)), n_per).astype(np.int32)
    return x.astype(np.float32), y


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    *,
    hidden: Sequence[int] = (32, 32),
    method: str = "bp",
    seed: int = 0,
    epochs: int = 150,
    kl_weight: float = 1.0,
    learning_rate: float = 1e-2,
    batch_size: int = 32,
):
    """A Bayesian ReLU :class:`~dualflow.nn.MLP` classifier trained with Adam;
    returns ``(model, Method)``."""
    import optax
    from flax import nnx

    from dualflow import nn as dnn
    from dualflow.train import fit

    sizes = (x.shape[1], *hidden, int(y.max()) + 1)
    model = dnn.MLP(sizes, rngs=nnx.Rngs(seed))
    m = dnn.Method(method)
    fit(
        model,
        optax.adam(learning_rate),
        x,
        y,
        method=m,
        epochs=epochs,
        batch_size=batch_size,
        kl_weight=kl_weight,
        seed=seed,
        progress=False,
    )
    return model, m


def class_block_potential(
    model, method, labels: Sequence[int], center: np.ndarray, scale: np.ndarray
) -> Callable[[Array], Array]:
    """``U(u) = -sum_l log p(y = l | x_l) + |u|^2 / 2`` with ``x_l = center +
    scale * u_l`` (prior ``N(center, diag(scale^2))`` on every block ``x_l``)."""
    return classification_potential(
        class_log_prob_fn(model, method),
        list(labels),
        origin=center,
        basis=np.diag(np.asarray(scale)).astype(np.float32),
    )


def class_block_init(
    x: np.ndarray,
    y: np.ndarray,
    labels: Sequence[int],
    center: np.ndarray,
    scale: np.ndarray,
    chains: int,
    rng: np.random.Generator,
    *,
    jitter: float = 0.05,
) -> np.ndarray:
    """Chain starts ``[chains, len(labels) * d]`` in the coordinates ``u`` of
    :func:`class_block_potential`: a random training input of each class, plus
    ``jitter`` times standard normal noise."""
    init = []
    for _ in range(chains):
        pts = [x[rng.choice(np.flatnonzero(y == k))] for k in labels]
        init.append(((np.stack(pts) - center) / scale).ravel())
    init = np.asarray(init)
    return init + jitter * rng.standard_normal(init.shape)


@dataclasses.dataclass
class MixtureStudy:
    """What :func:`mixture_study` computed."""

    x: np.ndarray
    y: np.ndarray
    model: Any
    method: Any
    center: np.ndarray
    scale: np.ndarray
    run: SampledRun

    @property
    def samples(self) -> np.ndarray:
        """All draws as inputs ``[draws, classes, 2]``."""
        k = int(self.y.max()) + 1
        return self.run.result.flat.reshape(-1, k, 2) * self.scale + self.center


def mixture_study(
    *,
    seed: int = 0,
    epochs: int = 150,
    chains: int = 8,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    max_rhat: float = 1.1,
    verbose: bool = True,
) -> MixtureStudy:
    """Fig. 3: a 2-32-32-3 bp BNN on a 3-component mixture (200 points each,
    seeded by ``seed``), then HMC over ``p(x | y = k)`` for the three classes
    at once, prior ``N(mean, (2 std)^2)`` of the training inputs."""
    rng = np.random.default_rng(seed)
    x, y = mixture_data(rng)
    model, method = train_classifier(x, y, seed=seed, epochs=epochs)
    center, scale = x.mean(0), 2.0 * x.std(0)
    labels = [0, 1, 2]
    run = sample_with_diagnostics(
        "mixture",
        class_block_potential(model, method, labels, center, scale),
        class_block_init(x, y, labels, center, scale, chains, rng),
        num_warmup=num_warmup,
        num_samples=num_samples,
        key=seed,
        max_rhat=max_rhat,
        verbose=verbose,
    )
    return MixtureStudy(x, y, model, method, center, scale, run)


def plot_mixture(
    x: np.ndarray,
    y: np.ndarray,
    model,
    method,
    samples: np.ndarray,
    *,
    lim: float = 5.0,
    figsize: tuple[float, float] = (11, 5),
):
    """Fig. 3: (left) the training data and the network's decision regions
    (contours of the largest class probability at 0.5/0.9/0.99); (right) the
    HMC draws ``samples [n, classes, 2]`` with kernel density contours."""
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    from dualflow import nn as dnn

    n_cls = samples.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    g = np.linspace(-lim, lim, 120)
    G0, G1 = np.meshgrid(g, g)
    grid = np.stack([G0.ravel(), G1.ravel()], 1).astype(np.float32)
    probs = np.asarray(dnn.predict(model, jnp.asarray(grid), method=method).probs)
    colors = [f"C{k}" for k in range(n_cls)]
    ax = axes[0]
    ax.contourf(
        G0,
        G1,
        probs.argmax(1).reshape(G0.shape),
        levels=np.arange(n_cls + 1) - 0.5,
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
    for k in range(n_cls):
        ax.scatter(*x[y == k].T, s=5, color=colors[k], label=f"component {k}")
    ax.set_title("training data, bp BNN decision regions (max prob 0.5/0.9/0.99)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k in range(n_cls):
        zk = samples[:, k]
        ax.scatter(*zk.T, s=2, alpha=0.15, color=colors[k])
        kde = gaussian_kde(zk.T)
        dens = kde(np.stack([G0.ravel(), G1.ravel()])).reshape(G0.shape)
        ax.contour(G0, G1, dens, levels=4, colors=colors[k], linewidths=1)
    ax.set_title("HMC: p(x | y = k) ∝ p(y = k | x) p0(x)")
    for a in axes:
        a.set_xlim(-lim, lim)
        a.set_ylim(-lim, lim)
        a.set_aspect("equal")
    fig.tight_layout()
    return fig
