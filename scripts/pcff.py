"""None / dropout / PCFF on a 2x1024 dense network (chain-graph paper, §5.1).

    python scripts/pcff.py                                   # full comparison
    python scripts/pcff.py --data_dir=/data                  # MNIST + Fashion-MNIST
    python scripts/pcff.py --quick --out_dir=/tmp/pcff       # CI smoke run (< 30 s)

Network: ``784 -> 1024 -> 1024 -> 10`` (inputs in ``[0, 1]``, the paper's "soft
clamping", §2.3), activation tanh or ReLU, regulariser

* ``none``: plain feed-forward;
* ``dropout``: inverted dropout with drop rate 0.5 on both hidden layers'
  outputs (train time only);
* ``pcff``: the hidden activations replaced by
  :class:`dualflow.chain.PCFFActivation` with sampling rate 0.4 (tanh) or 1.0
  (ReLU), the paper's settings; evaluation is plain feed-forward.

Layers are :class:`dualflow.nn.Dense` under ``Method("deterministic")`` in a
:class:`dualflow.nn.Sequential` (the library's own dropout and context/key
plumbing; only the ``*_mean`` weights are trained, the unused ``*_logvar``
leaves are left out of the optimiser).  Weights: LeCun-normal for tanh,
He-normal for ReLU, zero biases.  Softmax cross-entropy, SGD (lr 0.01,
momentum 0.9), batch size 100 (the paper does not state one), 20% of the
training set held out (fixed split, seed 0, the same for every run) for early
stopping on validation error: training stops after ``--patience`` epochs
without a strict improvement or at ``--max_epochs``; the best-validation
weights are restored and their test error reported.  Seeds change the
initialisation, batch order and dropout/PCFF noise.

Data: ``mnist`` and ``fashion_mnist`` via :func:`dualflow.data.load_image_dataset`
(``--data_dir``, else ``$DUALFLOW_DATA_DIR``).  When they are not found the
script says so and substitutes ``mnist_5k`` (5000 real MNIST digits, fixed
4000/1000 split) for MNIST and ``sklearn_digits`` (8x8 digits, NOT
Fashion-MNIST) for Fashion-MNIST; the JSON records what ran.

Writes ``<out_dir>/results.json`` (records, summary, data sources, command,
commit, wall time; rewritten atomically after every run) and
``<out_dir>/results.md`` (mean ± std over seeds).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from absl import flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from dualflow import cli  # noqa: E402

flags.DEFINE_string(
    "datasets",
    "mnist,fashion_mnist",
    "Comma-separated data sets (any name load_image_dataset accepts); mnist and"
    " fashion_mnist fall back to mnist_5k and sklearn_digits when not found.",
)
flags.DEFINE_string("data_dir", None, "Data folder (else $DUALFLOW_DATA_DIR).")
flags.DEFINE_string("activations", "tanh,relu", "Comma-separated: tanh, relu.")
flags.DEFINE_string(
    "regularisers", "none,dropout,pcff", "Comma-separated: none, dropout, pcff."
)
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated integer seeds.")
flags.DEFINE_integer("width", 1024, "Hidden units per layer.")
flags.DEFINE_integer("depth", 2, "Hidden layers.")
flags.DEFINE_integer("batch_size", 100, "Mini-batch size (not given in the paper).")
flags.DEFINE_float("lr", 0.01, "SGD learning rate (paper: 0.01).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (paper: 0.9).")
flags.DEFINE_float("dropout_rate", 0.5, "Dropout drop rate (paper: 0.5).")
flags.DEFINE_float("pcff_rate_tanh", 0.4, "PCFF sampling rate, tanh (paper: 0.4).")
flags.DEFINE_float("pcff_rate_relu", 1.0, "PCFF sampling rate, ReLU (paper: 1.0).")
flags.DEFINE_float("val_fraction", 0.2, "Held-out share of the training set.")
flags.DEFINE_integer("max_epochs", 60, "Epoch limit per run.")
flags.DEFINE_integer("patience", 10, "Epochs without validation improvement.")
flags.DEFINE_string("out_dir", "results/pcff", "Output folder.")
flags.DEFINE_bool(
    "quick",
    False,
    "Smoke run: sklearn_digits, relu, 1 seed, width 128, 8 epochs (< 30 s).",
)

ACTIVATIONS = ("tanh", "relu")
REGULARISERS = ("none", "dropout", "pcff")
FALLBACK = {"mnist": "mnist_5k", "fashion_mnist": "sklearn_digits"}
QUICK = {
    "datasets": "sklearn_digits",
    "activations": "relu",
    "seeds": "0",
    "width": 128,
    "max_epochs": 8,
    "patience": 4,
    "out_dir": "results/tmp/pcff_quick",
}


def _split(value: str, allowed=None, what: str = "") -> list[str]:
    """Comma-separated ``--what``; an empty or unknown item: one error line."""
    return cli.parse_list(value, what, choices=allowed)


def load_data(name: str, data_dir: str | None, val_fraction: float):
    """Returns ``(used_name, source, note, arrays)`` with ``arrays`` a dict of
    float32 ``[N, D]`` images in ``[0, 1]`` and int32 labels for the train /
    val / test splits (validation: a fixed random ``val_fraction`` of train)."""
    import numpy as np

    from dualflow.data import DataNotFoundError, load_image_dataset

    note = ""
    try:
        ds = load_image_dataset(name, data_dir)
    except DataNotFoundError as e:
        if name not in FALLBACK:
            raise
        sub = FALLBACK[name]
        first = str(e).splitlines()[0]
        note = (
            f"{name} NOT FOUND ({first}); substituted {sub}"
            + (" (NOT Fashion-MNIST)" if name == "fashion_mnist" else "")
            + "."
        )
        print(f"WARNING: {note}", flush=True)
        ds = load_image_dataset(sub)
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float32) / 255.0
    xt = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float32) / 255.0
    perm = np.random.default_rng(0).permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    val, tr = perm[:n_val], perm[n_val:]
    arrays = {
        "x_train": x[tr],
        "y_train": ds.y_train[tr],
        "x_val": x[val],
        "y_val": ds.y_train[val],
        "x_test": xt,
        "y_test": ds.y_test,
        "num_classes": ds.num_classes,
    }
    return ds.name, ds.source, note, arrays


def build_model(d_in, n_out, width, depth, activation, regulariser, rate, seed):
    """``Sequential`` of ``dualflow.nn.Dense`` ``[N, d_in] -> [N, n_out]``."""
    from flax import nnx

    import dualflow.nn as dnn
    from dualflow.chain import PCFFActivation

    rngs = nnx.Rngs(seed)
    init = "he" if activation == "relu" else "lecun"
    layers, d = [], d_in
    for _ in range(depth):
        layers.append(dnn.Dense(d, width, mean_init=init, rngs=rngs))
        if regulariser == "pcff":
            layers.append(PCFFActivation(activation, rate))
        else:
            layers.append(dnn.Activation(activation))
            if regulariser == "dropout":
                layers.append(dnn.Dropout(rate))
        d = width
    layers.append(dnn.Dense(d, n_out, mean_init=init, rngs=rngs))
    return dnn.Sequential(*layers)


def make_fns(graphdef, tx, batch_size):
    """Jitted epoch (scan over shuffled mini-batches) and error functions."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import dualflow.nn as dnn

    method = dnn.Method("deterministic")

    def logits(params, rest, x, key, train):
        model = nnx.merge(graphdef, params, rest)
        return model(x, dnn.Context(method, key, train=train))

    def loss_fn(params, rest, x, y, key):
        out = logits(params, rest, x, key, True)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    @jax.jit
    def epoch(params, rest, opt_state, key, x, y):
        steps = x.shape[0] // batch_size
        kp, key = jax.random.split(key)
        idx = jax.random.permutation(kp, x.shape[0])[: steps * batch_size]
        idx = idx.reshape(steps, batch_size)

        def step(carry, inp):
            params, opt_state = carry
            i, b = inp
            k = jax.random.fold_in(key, i)
            loss, g = jax.value_and_grad(loss_fn)(params, rest, x[b], y[b], k)
            upd, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), (jnp.arange(steps), idx)
        )
        return params, opt_state, losses.mean()

    @jax.jit
    def error(params, rest, x, y):
        pred = jnp.argmax(logits(params, rest, x, None, False), -1)
        return jnp.mean(pred != y)

    return epoch, error


def run_one(cfg, arrays, activation, regulariser, rate, seed, fns_cache, log):
    import jax
    import optax
    from flax import nnx

    t0 = time.time()
    model = build_model(
        arrays["x_train"].shape[1],
        arrays["num_classes"],
        cfg["width"],
        cfg["depth"],
        activation,
        regulariser,
        rate,
        seed,
    )

    def trainable(path, v):
        return isinstance(v, nnx.Param) and str(path[-1]).endswith("_mean")

    graphdef, params, rest = nnx.split(model, trainable, ...)
    tx = optax.sgd(cfg["lr"], momentum=cfg["momentum"])
    key = (activation, regulariser)
    if key not in fns_cache:  # one compilation per configuration, reused by seeds
        fns_cache[key] = make_fns(graphdef, tx, cfg["batch_size"])
    epoch_fn, error_fn = fns_cache[key]
    opt_state = tx.init(params)
    data = {k: jax.numpy.asarray(v) for k, v in arrays.items() if k != "num_classes"}
    rng = jax.random.key(seed)
    best = (math.inf, 0, params)
    history = []
    for ep in range(1, cfg["max_epochs"] + 1):
        params, opt_state, loss = epoch_fn(
            params,
            rest,
            opt_state,
            jax.random.fold_in(rng, ep),
            data["x_train"],
            data["y_train"],
        )
        val = float(error_fn(params, rest, data["x_val"], data["y_val"]))
        history.append({"epoch": ep, "train_loss": float(loss), "val_error": val})
        if not math.isfinite(float(loss)):
            log(f"    non-finite training loss at epoch {ep}; stopping")
            break
        if val < best[0]:
            best = (val, ep, params)
        if ep - best[1] >= cfg["patience"]:
            break
    val_error, best_epoch, best_params = best
    test_error = float(error_fn(best_params, rest, data["x_test"], data["y_test"]))
    train_error = float(error_fn(best_params, rest, data["x_train"], data["y_train"]))
    return {
        "activation": activation,
        "regulariser": regulariser,
        "rate": rate,
        "seed": seed,
        "test_error": test_error,
        "val_error": val_error,
        "train_error": train_error,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "seconds": time.time() - t0,
        "history": history,
    }


def summarize(records):
    """Mean and sample std (ddof=1) over seeds per configuration."""
    import numpy as np

    groups = {}
    for r in records:
        k = (r["dataset"], r["activation"], r["regulariser"])
        groups.setdefault(k, []).append(r)
    out = []
    for (ds, act, reg), rs in groups.items():
        te = np.array([r["test_error"] for r in rs])
        va = np.array([r["val_error"] for r in rs])
        std = float(te.std(ddof=1)) if len(te) > 1 else None  # JSON null
        out.append(
            {
                "dataset": ds,
                "activation": act,
                "regulariser": reg,
                "rate": rs[0]["rate"],
                "n_seeds": len(rs),
                "test_error_mean": float(te.mean()),
                "test_error_std": std,
                "val_error_mean": float(va.mean()),
                "best_epoch_mean": float(np.mean([r["best_epoch"] for r in rs])),
                "epochs_run_mean": float(np.mean([r["epochs_run"] for r in rs])),
                "n_test": rs[0]["n_test"],
            }
        )
    return out


def markdown(summary, meta) -> str:
    lines = [
        "# PCFF vs dropout vs none (chain-graph paper §5.1)\n",
        f"Command: `{meta['command']}`  ",
        f"Commit: {meta['commit']}; wall time {meta['wall_seconds'] / 60:.1f} min"
        f" ({os.cpu_count()} CPU cores).  ",
        f"Network: {meta['config']['depth']}x{meta['config']['width']} dense,"
        f" SGD lr {meta['config']['lr']} momentum {meta['config']['momentum']},"
        f" batch {meta['config']['batch_size']} (not stated in the paper),"
        f" early stopping on a {meta['config']['val_fraction']:.0%} validation"
        f" split (patience {meta['config']['patience']}, max"
        f" {meta['config']['max_epochs']} epochs, best weights restored).\n",
        "Data:\n",
    ]
    for d in meta["data"]:
        lines.append(
            f"- requested `{d['requested']}` -> ran `{d['dataset']}`: {d['source']}"
            f" ({d['n_train']} train / {d['n_val']} val / {d['n_test']} test)"
            + (f". **{d['note']}**" if d["note"] else "")
        )
    lines += [
        "",
        "Test error (%) of the best-validation weights, mean ± std (ddof=1)"
        " over seeds:\n",
        "| data set | activation | regulariser | test error % | val error % |"
        " best epoch | epochs run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reg = s["regulariser"] + (
            f" ({s['rate']:g})" if s["regulariser"] != "none" else ""
        )
        std = s["test_error_std"]
        sd = "n/a" if std is None else f"{100 * std:.2f}"
        lines.append(
            f"| {s['dataset']} | {s['activation']} | {reg} |"
            f" {100 * s['test_error_mean']:.2f} ± {sd} |"
            f" {100 * s['val_error_mean']:.2f} | {s['best_epoch_mean']:.1f} |"
            f" {s['epochs_run_mean']:.1f} | {s['n_seeds']} |"
        )
    n = {s["dataset"]: s["n_test"] for s in summary}
    lines += [
        "",
        "One test error on n images has binomial standard error"
        " sqrt(e(1-e)/n): "
        + ", ".join(
            f"{k}: n={v}, {100 * math.sqrt(0.03 * 0.97 / v):.2f} points at 3%"
            for k, v in n.items()
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Run every (data set, activation, regulariser, seed) and summarise."""
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from dualflow.io import git_commit, write_json_atomic, write_text_atomic

    F = flags.FLAGS
    if F.quick:
        for k, v in QUICK.items():
            if not F[k].present:
                setattr(F, k, v)
    from dualflow.data.images import IMAGE_LOADERS

    datasets = _split(F.datasets, tuple(IMAGE_LOADERS), "datasets")
    acts = _split(F.activations, ACTIVATIONS, "activations")
    regs = _split(F.regularisers, REGULARISERS, "regularisers")
    seeds = cli.parse_list(F.seeds, "seeds", type=int)
    for name in ("width", "depth", "batch_size", "max_epochs", "patience"):
        if F[name].value < 1:
            cli.fail(f"--{name}: must be >= 1, got {F[name].value}")
    if not 0.0 < F.val_fraction < 1.0:
        cli.fail(f"--val_fraction: must be in (0, 1), got {F.val_fraction}")
    rates = {
        ("tanh", "pcff"): F.pcff_rate_tanh,
        ("relu", "pcff"): F.pcff_rate_relu,
        ("tanh", "dropout"): F.dropout_rate,
        ("relu", "dropout"): F.dropout_rate,
    }
    cfg = {
        k: F[k].value
        for k in (
            "width",
            "depth",
            "batch_size",
            "lr",
            "momentum",
            "dropout_rate",
            "pcff_rate_tanh",
            "pcff_rate_relu",
            "val_fraction",
            "max_epochs",
            "patience",
            "quick",
        )
    }
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(_REPO):
        script = script.relative_to(_REPO)
    command = "python " + " ".join([script.as_posix(), *sys.argv[1:]])
    commit = git_commit(_REPO)
    out = Path(F.out_dir)
    t0 = time.time()
    print(
        f"pcff: {datasets} x {acts} x {regs} x seeds {seeds};"
        f" {cfg['depth']}x{cfg['width']}, max {cfg['max_epochs']} epochs,"
        f" patience {cfg['patience']}; jax {jax.__version__} on"
        f" {jax.default_backend()}; commit {commit}",
        flush=True,
    )
    records, data_meta = [], []

    def save(final: bool):
        wall = time.time() - t0
        summary = summarize(records)
        meta = {
            "command": command,
            "commit": commit,
            "wall_seconds": wall,
            "complete": final,
            "config": cfg,
            "data": data_meta,
            "substituted": any(d["note"] for d in data_meta),
        }
        doc = {**meta, "summary": summary, "records": records}
        write_json_atomic(out / "results.json", doc)
        if final:
            write_text_atomic(out / "results.md", markdown(summary, meta))

    for name in datasets:
        used, source, note, arrays = load_data(name, F.data_dir, F.val_fraction)
        sizes = {f"n_{s}": len(arrays[f"y_{s}"]) for s in ("train", "val", "test")}
        data_meta.append(
            {"requested": name, "dataset": used, "source": source, "note": note} | sizes
        )
        print(f"{name}: running {used} ({source}); {sizes}", flush=True)
        fns_cache = {}
        for act in acts:
            for reg in regs:
                rate = rates.get((act, reg), 0.0)
                for seed in seeds:
                    r = run_one(cfg, arrays, act, reg, rate, seed, fns_cache, print)
                    r = {"dataset": used, "requested_dataset": name} | r | sizes
                    records.append(r)
                    print(
                        f"  {used} {act:4s} {reg:7s} seed {seed}: test"
                        f" {100 * r['test_error']:.2f}%  val"
                        f" {100 * r['val_error']:.2f}%  best epoch"
                        f" {r['best_epoch']}/{r['epochs_run']}"
                        f"  ({r['seconds']:.1f} s; total"
                        f" {time.time() - t0:.0f} s)",
                        flush=True,
                    )
                    save(final=False)
    save(final=True)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json and results.md", flush=True)


if __name__ == "__main__":
    cli.run(main, allow_args=False)
