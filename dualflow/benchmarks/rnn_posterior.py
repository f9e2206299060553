"""Smoothed hidden states of a trained Bayesian IndRNN (issue 20, item 2).

Trains a ``bp`` IndRNN on the adding problem and reads the filtered and
smoothed hidden-state moments of one test sequence with
:func:`dualflow.nn.hidden_state_posterior`: the forward pass is the filter
``p(h_t | x_{1:t})``, the BP backward pass through time turns it into the
posterior given the target, ``p(h_t | x_{1:T}, y)`` (Theorem 3 of "Duality
of information flow"; exact for a Gaussian-linear IndRNN, the posterior
implied by the BP rule otherwise).  The figure shows, for the units whose
beliefs the target moves most, filtered and smoothed mean ± 2 sd over time,
with the two marked positions of the sequence.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualflow.benchmarks.sequence import adding_problem
from dualflow.io import write_json_atomic
from dualflow.models.rnn import SequenceNet
from dualflow.nn import (
    Likelihood,
    Method,
    default_bound,
    hidden_state_posterior,
    predict,
)
from dualflow.train.fit import fit

__all__ = ["PosteriorConfig", "plot_hidden_states", "run_posterior_study"]


@dataclasses.dataclass(frozen=True)
class PosteriorConfig:
    """Adding problem, one bp IndRNN; ``epochs`` over ``n_train`` sequences."""

    seq_len: int = 50
    hidden: int = 32
    depth: int = 2
    n_train: int = 5000
    n_test: int = 500
    epochs: int = 20
    batch_size: int = 50
    lr: float = 1e-3
    noise_var: float = 0.01
    units: int = 4
    seed: int = 0


def _train(cfg: PosteriorConfig, progress: bool):
    rng = np.random.default_rng(cfg.seed)
    x, y = adding_problem(cfg.n_train, cfg.seq_len, rng)
    xt, yt = adding_problem(cfg.n_test, cfg.seq_len, rng)
    model = SequenceNet(
        2,
        1,
        hidden=cfg.hidden,
        depth=cfg.depth,
        recurrent_bound=default_bound(cfg.seq_len),
        rngs=nnx.Rngs(cfg.seed),
    )
    method = Method("bp")
    lik = Likelihood("gaussian", noise_var=cfg.noise_var)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.lr))
    hist = fit(
        model,
        tx,
        x,
        y,
        method=method,
        likelihood=lik,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
    )
    pred = predict(model, jnp.asarray(xt), method=method, likelihood=lik)
    mse = float(np.mean((np.asarray(pred.mean) - yt) ** 2))
    return model, method, lik, (xt, yt), mse, hist


def plot_hidden_states(
    filtered, smoothed, x: np.ndarray, units, path: str | os.PathLike, title: str
) -> None:
    """Filtered vs smoothed mean ± 2 sd ``[T]`` of ``units`` of one sequence.

    ``filtered``/``smoothed``: Gaussians ``[T, H]``; ``x [T, 2]`` the adding
    input (markers drawn as vertical lines).  A negative implied smoothed
    variance (possible away from the Gaussian-linear case) is drawn as 0.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves its backend alone

    t = np.arange(1, x.shape[0] + 1)
    fig = Figure(figsize=(8, 1.9 * len(units)))
    axes = fig.subplots(len(units), 1, sharex=True)
    axes = np.atleast_1d(axes)
    marks = np.flatnonzero(x[:, 1] > 0) + 1
    for ax, u in zip(axes, units, strict=True):
        for g, c, lab in ((filtered, "C0", "filtered"), (smoothed, "C3", "smoothed")):
            m = np.asarray(g.mean[:, u])
            s = np.sqrt(np.maximum(np.asarray(g.var[:, u]), 0.0))  # see below
            ax.plot(t, m, c, lw=1.2, label=lab)
            ax.fill_between(t, m - 2 * s, m + 2 * s, color=c, alpha=0.2, lw=0)
        for k in marks:
            ax.axvline(k, color="k", ls=":", lw=0.8)
        ax.set_ylabel(f"unit {u}")
    axes[0].legend(loc="upper left", fontsize=8, ncol=2)
    axes[0].set_title(title, fontsize=9)
    axes[-1].set_xlabel("time step t (dotted: the two marked positions)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def run_posterior_study(
    cfg: PosteriorConfig, out_dir: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Train, smooth one test sequence, write ``posterior.png`` and ``posterior.json``.

    Returns the summary written to JSON: test MSE, the sequence's target and
    predictive, and per plotted unit the largest |smoothed - filtered| mean
    shift and the mean ratio of smoothed to filtered variance.
    """
    t0 = time.time()
    model, method, lik, (xt, yt), mse, hist = _train(cfg, progress)
    train_s = time.time() - t0
    x1, y1 = jnp.asarray(xt[:1]), jnp.asarray(yt[:1])
    res = hidden_state_posterior(model, x1, y1, method=method, likelihood=lik)
    layer = sorted(res.filtered)[-1]  # the last recurrent layer feeds the head
    f, s = res.filtered[layer], res.smoothed[layer]
    f1 = jax.tree.map(lambda a: np.asarray(a[0]), f)
    s1 = jax.tree.map(lambda a: np.asarray(a[0]), s)
    shift = np.abs(s1.mean - f1.mean).max(axis=0)
    units = [int(u) for u in np.argsort(-shift)[: cfg.units]]
    pred = predict(model, x1, method=method, likelihood=lik)
    out = Path(out_dir)
    plot_hidden_states(
        f1,
        s1,
        np.asarray(xt[0]),
        units,
        out / "posterior.png",
        f"bp IndRNN, adding problem T={cfg.seq_len}: layer {layer}, target"
        f" {float(y1[0, 0]):.3f}, predictive {float(pred.mean[0, 0]):.3f}"
        f" ± {float(np.sqrt(pred.var[0, 0])):.3f}",
    )
    ratio = s1.var / np.maximum(f1.var, 1e-30)
    summary = {
        "config": dataclasses.asdict(cfg),
        "test_mse": mse,
        "final_train_loss": hist[-1]["loss"],
        "train_seconds": train_s,
        "layer": layer,
        "target": float(y1[0, 0]),
        "predictive_mean": float(pred.mean[0, 0]),
        "predictive_var": float(pred.var[0, 0]),
        "units": [
            {
                "unit": u,
                "max_mean_shift": float(shift[u]),
                "mean_var_ratio": float(np.mean(ratio[:, u])),
            }
            for u in units
        ],
        # away from the Gaussian-linear case the implied variance
        # P - 2 P^2 dJ/dP - (P dJ/dm)^2 is not guaranteed to be >= 0
        "negative_smoothed_var_fraction": float(np.mean(np.asarray(s.var) < 0)),
        "smoothed_over_filtered_var_median": float(
            np.median(np.asarray(s.var) / np.maximum(np.asarray(f.var), 1e-30))
        ),
        "seconds": time.time() - t0,
    }
    write_json_atomic(out / "posterior.json", summary, indent=1)
    return summary
