"""The training loop behind ``scripts/train.py --config=configs/<name>.py``.

One jitted train step and one jitted evaluation over a :class:`TrainState`
pytree; data parallel with ``jax.sharding`` (a 1-D ``Mesh`` over all devices,
batch sharded on its ``data`` axis, state replicated), so the same code runs on
one CPU, several GPUs, a TPU slice or several hosts
(``config.mesh.distributed``: ``jax.distributed.initialize()``).  Orbax
checkpoints every ``checkpoint_every`` steps and at the end (keeping the last
``keep_checkpoints``); a run restarted with the same ``workdir`` resumes from
the newest complete checkpoint and replays the same batches and keys
(:mod:`dualflow.train.input`), so its final parameters equal an uninterrupted
run's.  Orbax writes each checkpoint to a temporary folder and renames it when
complete, so an interrupted save never looks like a checkpoint.

Outputs in ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON record per
train log / evaluation), ``summary.json``, ``curves.png``, ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from dualflow import metrics as M
from dualflow.data import (
    DataNotFoundError,
    ImageDataset,
    dataset_info,
    load_image_dataset,
    resolve_data_dir,
)
from dualflow.data.augment import AugmentConfig
from dualflow.io import git_commit, write_json_atomic, write_text_atomic
from dualflow.models import build_model
from dualflow.nn.context import Method
from dualflow.nn.methods import Likelihood, make_ensemble, predict
from dualflow.optim import mean_variance_labels, natural_gradient
from dualflow.train.config import ConfigError, _model_norm, validate_config
from dualflow.train.fit import make_loss_fn
from dualflow.train.input import Normalizer, TrainBatches, prefetch, to_global

__all__ = [
    "TrainState",
    "kl_weight_at",
    "load_data",
    "make_mesh",
    "make_model",
    "make_optimizer",
    "make_schedule",
    "train_and_evaluate",
]

_REPO = Path(__file__).resolve().parents[2]  # for the commit hash in outputs

# fields that may change between a run and its resumption
_RESUMABLE_CHANGES = (
    "data_dir",
    "mesh",
    "train.progress",
    "train.plot",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "train.eval_samples",
    "data.download",
)


class TrainState(NamedTuple):
    """Everything a step changes (a pytree; checkpointed as is).

    ``metric_sums`` accumulates the per-step training metrics since the last
    log record on the device (no host round trip per step); it is part of the
    checkpoint, so a resumed run logs exactly the uninterrupted run's records.
    """

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # nnx.Param state of the model
    rest: Any  # other model state (BatchNorm statistics)
    opt_state: Any
    metric_sums: dict  # name -> float32 scalar, summed since the last log


# --------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------
def method_from_config(cfg) -> Method:
    m = cfg.method
    return Method(
        name=m.name,
        mode=m.mode,
        backward=m.backward,
        num_samples=int(m.num_samples),
        dropout_rate=float(m.dropout_rate),
        ensemble_size=int(m.ensemble_size),
        member=m.member,
    )


def make_mesh(num_devices: int = 0) -> Mesh:
    """1-D data-parallel mesh over the first ``num_devices`` devices (0: all),
    ordered by host so that each host's devices hold consecutive batch rows."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices:
        if num_devices > len(devices):
            raise ConfigError(
                f"config.mesh.num_devices={num_devices} but only {len(devices)}"
                " devices are visible."
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning rate: linear warm-up, then cosine annealing (or constant)."""
    lr, w = float(cfg.optimizer.lr), int(cfg.schedule.warmup_steps)
    if cfg.schedule.name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if w else lr,
            peak_value=lr,
            warmup_steps=w,
            decay_steps=max(total_steps, w + 1),
            end_value=lr * float(cfg.schedule.end_factor),
        )
    if not w:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w]
    )


def _decay_mask(params):
    """Weight decay on everything but weight variances."""
    return jax.tree.map(lambda label: label != "variance", mean_variance_labels(params))


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``[weight decay] -> [natural_gradient] -> [clip] -> sgd | adam | adamw``.

    Weight decay (never on variances) is added to the gradient as an L2 term,
    so the natural gradient (App. D of the duality paper) preconditions it like
    the rest of the loss; the natural gradient sees both leaves of each
    mean/variance pair; clipping bounds the preconditioned update's global
    norm.  ``adamw`` applies its decoupled decay itself.
    """
    o = cfg.optimizer
    parts = []
    wd = float(o.weight_decay)
    if wd and o.name != "adamw":  # an L2 term of the loss: preconditioned by NG
        parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
    if o.natural_gradient:
        parts.append(
            natural_gradient(
                damping=float(o.ng_damping),
                variance_update=o.ng_variance_update,
            )
        )
    if o.grad_clip:
        parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
    if o.name == "sgd":
        parts.append(
            optax.sgd(schedule, momentum=float(o.momentum) or None, nesterov=o.nesterov)
        )
    elif o.name == "adam":
        parts.append(optax.adam(schedule, b1=float(o.b1), b2=float(o.b2)))
    else:
        parts.append(
            optax.adamw(
                schedule,
                b1=float(o.b1),
                b2=float(o.b2),
                weight_decay=wd,
                mask=_decay_mask,
            )
        )
    return optax.chain(*parts)


def kl_weight_at(cfg, step):
    """``beta`` at update ``step`` (0-based): ``beta * min(1, (step + 1) / n)``
    with ``n = loss.kl_anneal_steps`` (the n-th update uses the full ``beta``)."""
    beta = float(cfg.loss.kl_weight)
    n = int(cfg.loss.kl_anneal_steps)
    if not n:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, (step + 1) / n).astype(jnp.float32)


def load_data(cfg) -> ImageDataset:
    """The config's data set (or ``data.fallback`` when it is not found)."""
    if cfg.data_dir and not Path(cfg.data_dir).expanduser().is_dir():
        raise ConfigError(
            f"config.data_dir={cfg.data_dir!r} does not exist; point it at the"
            " folder holding the data sets (or leave it empty to use"
            " $DUALFLOW_DATA_DIR)."
        )
    data_dir = resolve_data_dir(cfg.data_dir or None)
    try:
        data = load_image_dataset(cfg.dataset, data_dir, download=cfg.data.download)
    except DataNotFoundError as err:
        if not cfg.data.fallback:
            raise
        print(
            f"dualflow: {cfg.dataset} not found ({str(err).splitlines()[0]}); training"
            f" on {cfg.data.fallback} instead (config.data.fallback).",
            file=sys.stderr,
        )
        data = load_image_dataset(
            cfg.data.fallback, data_dir, download=cfg.data.download
        )
    if cfg.data.max_train:
        data = dataclasses.replace(
            data,
            x_train=data.x_train[: cfg.data.max_train],
            y_train=data.y_train[: cfg.data.max_train],
        )
    if cfg.data.max_test:
        data = dataclasses.replace(
            data,
            x_test=data.x_test[: cfg.data.max_test],
            y_test=data.y_test[: cfg.data.max_test],
        )
    return data


def model_kwargs(cfg) -> dict:
    """``config.model.kwargs`` as keyword arguments (lists -> tuples)."""
    kw = cfg.model.get("kwargs", {})
    kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def make_model(cfg, dataset: str, method: Method) -> nnx.Module:
    """The config's model for ``dataset`` (stacked members for ``ensemble``)."""
    info = dataset_info(dataset)
    kwargs = model_kwargs(cfg)
    norm = _model_norm(cfg)

    def factory(rngs):
        return build_model(
            cfg.model.name,
            num_classes=info.num_classes,
            input_shape=info.input_shape,
            norm=norm,
            rngs=rngs,
            **kwargs,
        )

    if method.name == "ensemble":
        return make_ensemble(factory, method.ensemble_size, seed=int(cfg.seed))
    return factory(nnx.Rngs(int(cfg.seed)))


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        path = f"{prefix}{k}"
        if any(path == r or path.startswith(r + ".") for r in _RESUMABLE_CHANGES):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _jsonable(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


# --------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------
def train_and_evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train as ``cfg`` says, resuming from ``workdir``; return the summary.

    ``on_step(step)`` is called after each update (tests use it to interrupt a
    run).  Raises :class:`ConfigError` for an invalid config (before loading
    anything) and ``DataNotFoundError`` when the data set is missing.
    """
    import orbax.checkpoint as ocp

    t_start = time.time()
    if cfg.mesh.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # before anything else touches JAX
    mesh = make_mesh(int(cfg.mesh.num_devices))
    validate_config(cfg, num_devices=mesh.size)
    workdir = Path(workdir).expanduser().resolve()
    is_main = jax.process_index() == 0

    method = method_from_config(cfg)
    likelihood = Likelihood(head=cfg.likelihood.head)
    augment = AugmentConfig(
        crop_pad=int(cfg.augment.crop_pad),
        flip=bool(cfg.augment.flip),
        randaugment_ops=int(cfg.augment.randaugment_ops),
        randaugment_magnitude=float(cfg.augment.randaugment_magnitude),
        mixup_alpha=float(cfg.augment.mixup_alpha),
        cutmix_alpha=float(cfg.augment.cutmix_alpha),
        switch_prob=float(cfg.augment.switch_prob),
    )
    data = load_data(cfg)
    n_train = len(data.x_train)
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"config.train.batch_size={cfg.train.batch_size} is larger than the"
            f" training set ({n_train} examples of {data.name})."
        )
    info = dataset_info(data.name)
    normalizer = Normalizer(data.x_train, cfg.data.normalize)
    batches = TrainBatches(
        data.x_train,
        data.y_train,
        batch_size=int(cfg.train.batch_size),
        seed=int(cfg.seed),
        augment=augment,
        num_classes=info.num_classes,
        normalizer=normalizer,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    spe = batches.steps_per_epoch
    total_steps = int(cfg.train.num_steps) or int(cfg.train.num_epochs) * spe
    eval_every = int(cfg.train.eval_every) or spe
    ckpt_every = int(cfg.train.checkpoint_every) or spe
    log_every = int(cfg.train.log_every)

    model = make_model(cfg, data.name, method)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = make_schedule(cfg, total_steps)
    tx = make_optimizer(cfg, schedule)
    replicated = NamedSharding(mesh, P())
    metric_names = ("loss", "nll", "kl", "kl_weight", "lr", "grad_norm")
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        rest,
        tx.init(params),
        {k: jnp.zeros((), jnp.float32) for k in metric_names},  # distinct buffers
    )
    state = jax.device_put(state, replicated)

    # ---- the run's identity: config + data actually used (fallback!)
    run_info = {
        "config": _jsonable(cfg),
        "data": {"name": data.name, "source": data.source, "n_train": n_train},
    }
    cfg_path = workdir / "config.json"
    ckpt_dir = workdir / "checkpoints"
    workdir.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(cfg.train.keep_checkpoints),
        create=True,
        enable_async_checkpointing=False,
    )
    manager = ocp.CheckpointManager(ckpt_dir, options=options)
    latest = manager.latest_step()
    start = 0
    if latest is not None:
        _check_same_run(cfg_path, run_info, workdir)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            state,
        )
        restored = manager.restore(
            latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        state = restored["state"]
        start = int(state.step)
        if is_main:
            print(f"dualflow: resumed from {ckpt_dir / str(latest)} (step {start})")
    if is_main:
        write_json_atomic(cfg_path, {**run_info, "commit": git_commit(_REPO)}, indent=2)
    log_path = workdir / "metrics.jsonl"
    records = _read_records(log_path, upto=start)
    if is_main:
        write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))

    loss_fn = make_loss_fn(
        graphdef, method=method, likelihood=likelihood, n_data=n_train
    )
    # training keys: a stream of their own (not nnx.Rngs(seed)'s init keys)
    base_key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 0x7A1)
    members = method.ensemble_size if method.name == "ensemble" else 1

    def train_step(state: TrainState, x, y):
        key = jax.random.fold_in(base_key, state.step)
        beta = kl_weight_at(cfg, state.step)
        (loss, (parts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, x, y, key, beta
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            # ensembles: the objective sums members (each gets its own full
            # gradient); log the member mean, comparable to other methods
            "loss": loss / members,
            **parts,
            "kl_weight": beta,
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
        }
        sums = {k: state.metric_sums[k] + jnp.asarray(out[k], jnp.float32) for k in out}
        return TrainState(state.step + 1, params, rest, opt_state, sums)

    train_step = jax.jit(train_step, donate_argnums=0, out_shardings=replicated)
    evaluate = _make_evaluator(cfg, mesh, graphdef, method, likelihood, normalizer)

    def save(state):
        step = int(state.step)
        if manager.latest_step() == step:
            return
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()

    if is_main:
        print(
            f"dualflow: {data.name} ({n_train} train / {len(data.x_test)} test,"
            f" {data.source}); model {cfg.model.name} (norm={_model_norm(cfg)});"
            f" method {method.name}"
            + (
                f" [{method.member} x{method.ensemble_size}]"
                if method.name == "ensemble"
                else ""
            )
            + f"; {mesh.size} device(s) x {jax.process_count()} host(s);"
            f" {total_steps} steps of {cfg.train.batch_size} ({spe} per epoch)"
        )
    bar = tqdm(
        total=total_steps,
        initial=start,
        unit="step",
        desc=f"{method.name}",
        disable=not (cfg.train.progress and is_main),
        dynamic_ncols=True,
    )
    # speed: training time only (evaluation and saving excluded); each window
    # ends with a host read of the metric sums, which waits for the device
    window_time, window_steps = 0.0, 0
    speeds: list[float] = []  # seconds per step of each finished window
    t_mark = time.time()
    last_eval: dict = {}
    for step, (xb, yb) in prefetch(batches, range(start, total_steps)):
        x, y = to_global(mesh, xb, yb)
        state = train_step(state, x, y)
        done = step + 1
        window_steps += 1
        bar.update(1)
        log_now = done % log_every == 0 or done == total_steps
        eval_now = done % eval_every == 0 or done == total_steps
        ckpt_now = done % ckpt_every == 0 or done == total_steps
        if log_now or eval_now or ckpt_now:
            jax.block_until_ready(state)
            window_time += time.time() - t_mark
        if log_now:
            sums = jax.device_get(state.metric_sums)
            n_logged = _steps_since_log(records, done)
            rec = {
                "kind": "train",
                "step": done,
                "epoch": done / spe,
                **{k: float(v) / n_logged for k, v in sums.items()},
                "steps_per_sec": window_steps / window_time,
                "examples_per_sec": window_steps
                * int(cfg.train.batch_size)
                / window_time,
            }
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"the training loss became {rec['loss']} by step {done}"
                    f" ({method.name}); lower config.optimizer.lr or the initial"
                    " variance (config.model.kwargs.init_var)."
                )
            speeds.append(window_time / window_steps)
            window_time, window_steps = 0.0, 0
            state = state._replace(
                metric_sums=jax.device_put(
                    jax.tree.map(jnp.zeros_like, state.metric_sums), replicated
                )
            )
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            records.append(rec)
            _append(log_path, rec, is_main)
        if eval_now:
            last_eval = evaluate(state, data.x_test, data.y_test)
            rec = {"kind": "eval", "step": done, "epoch": done / spe, **last_eval}
            records.append(rec)
            _append(log_path, rec, is_main)
            if is_main:
                bar.write(
                    f"step {done:6d}  epoch {done / spe:6.2f}  test acc"
                    f" {last_eval['accuracy']:.4f}  nll {last_eval['nll']:.4f}"
                    f"  ece {last_eval['ece']:.4f}  brier {last_eval['brier']:.4f}"
                )
        if ckpt_now:
            save(state)
        if log_now or eval_now or ckpt_now:
            t_mark = time.time()
        if on_step is not None:
            on_step(done)
    bar.close()
    previous = _read_json(workdir / "summary.json")
    if not last_eval:  # resumed a finished run: evaluate the restored state
        last_eval = evaluate(state, data.x_test, data.y_test)
    save(state)
    # steady state: the first window of this process includes compilation
    steady = speeds[1:] or speeds
    sec_per_step = float(np.median(steady)) if steady else None
    if sec_per_step is None and previous:  # nothing trained now: keep the record
        sec_per_step = previous.get("seconds_per_step")
    summary = {
        "dataset": data.name,
        "data_source": data.source,
        "model": cfg.model.name,
        "norm": str(_model_norm(cfg)),
        "method": method.name,
        "row": cfg.get("row", ""),
        "steps": int(state.step),
        "epochs": int(state.step) / spe,
        "n_train": n_train,
        "n_test": len(data.x_test),
        "devices": mesh.size,
        "hosts": jax.process_count(),
        **{f"test_{k}": v for k, v in last_eval.items()},
        "seconds_per_step": sec_per_step,
        "seconds_per_epoch": sec_per_step * spe if sec_per_step else None,
        "examples_per_sec": (
            int(cfg.train.batch_size) / sec_per_step if sec_per_step else None
        ),
        "wall_seconds": time.time() - t_start,
        "commit": git_commit(_REPO),
    }
    if is_main:
        write_json_atomic(workdir / "summary.json", summary, indent=2)
        if cfg.train.plot:
            plot_curves(records, workdir / "curves.png", title=_title(summary))
        speed = (
            f"{summary['seconds_per_epoch']:.2f} s/epoch,"
            f" {summary['examples_per_sec']:.0f} examples/s"
            if sec_per_step
            else "speed n/a"
        )
        print(
            f"summary: {summary['dataset']} {summary['model']} {summary['method']}"
            f" | test acc {summary['test_accuracy']:.4f} nll"
            f" {summary['test_nll']:.4f} ece {summary['test_ece']:.4f} brier"
            f" {summary['test_brier']:.4f} | {summary['steps']} steps, {speed} |"
            f" wall {summary['wall_seconds']:.1f} s | {workdir}"
        )
    return summary


def _train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "train"]


def _steps_since_log(records: list[dict], done: int) -> int:
    """Updates summed in the metric accumulators at step ``done``."""
    train = _train_records(records)
    return done - (train[-1]["step"] if train else 0)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_same_run(cfg_path: Path, run_info: dict, workdir: Path) -> None:
    """Refuse to resume a checkpointed run with a different config or data."""
    old = _read_json(cfg_path)
    if old is None:
        return
    diff = _config_diff(old.get("config", {}), run_info["config"])
    old_data, new_data = old.get("data", {}), run_info["data"]
    for k in ("name", "n_train"):
        if old_data.get(k) != new_data[k]:
            diff.append(f"data {k}: {old_data.get(k)!r} -> {new_data[k]!r}")
    if diff:
        raise ConfigError(
            f"workdir {workdir} holds a checkpointed run with a different config"
            " or data (" + "; ".join(diff[:5]) + "); use a new --workdir or"
            " restore those fields."
        )


def _make_evaluator(cfg, mesh, graphdef, method, likelihood, normalizer):
    """``evaluate(state, x_uint8, y) -> {accuracy, nll, ece, brier}`` over the
    whole test set (padded to whole sharded batches; padding is dropped)."""
    bs = int(cfg.train.eval_batch_size)
    samples = int(cfg.train.eval_samples)
    needs_key = method.is_sampling
    key = jax.random.key(int(cfg.seed) + 1)

    @jax.jit
    def probs_fn(params, rest, x, k):
        model = nnx.merge(graphdef, params, rest)
        pred = predict(
            model,
            x,
            method=method,
            likelihood=likelihood,
            key=k if needs_key else None,
            num_samples=samples,
            jit=False,
        )
        return pred.probs

    def evaluate(state: TrainState, x_test: np.ndarray, y_test: np.ndarray) -> dict:
        n = len(x_test)
        nproc, pid = jax.process_count(), jax.process_index()
        local = bs // nproc
        out = []
        for i, start in enumerate(range(0, n, bs)):
            xb = x_test[start : start + bs]
            pad = bs - len(xb)
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            xb = normalizer.images(xb[pid * local : (pid + 1) * local])
            (xg,) = to_global(mesh, xb)
            p = probs_fn(state.params, state.rest, xg, jax.random.fold_in(key, i))
            if nproc > 1:
                from jax.experimental import multihost_utils

                p = multihost_utils.process_allgather(p, tiled=True)
            out.append(np.asarray(jax.device_get(p))[: bs - pad])
        probs = jnp.asarray(np.concatenate(out))
        y = jnp.asarray(y_test)
        return {
            "accuracy": float(M.accuracy(probs, y)),
            "nll": float(M.nll(probs, y)),
            "ece": float(M.ece(probs, y)),
            "brier": float(M.brier(probs, y)),
        }

    return evaluate


def _read_records(path: Path, upto: int) -> list[dict]:
    """Records of an earlier run up to step ``upto`` (later ones are replayed)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("step", 0) <= upto:
            out.append(rec)
    return out


def _append(path: Path, rec: dict, is_main: bool) -> None:
    if is_main:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _title(s: dict) -> str:
    return f"{s['dataset']} / {s['model']} / {s['method']}"


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Training loss, test NLL and test accuracy against steps (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="loss")
    ax.plot([r["step"] for r in tr], [r["nll"] for r in tr], label="train NLL")
    ax.set_xlabel("step")
    ax.set_title("training objective")
    ax.legend()
    axes[1].plot([r["step"] for r in ev], [r["nll"] for r in ev], "o-", label="NLL")
    axes[1].plot([r["step"] for r in ev], [r["ece"] for r in ev], "s-", label="ECE")
    axes[1].plot([r["step"] for r in ev], [r["brier"] for r in ev], "^-", label="Brier")
    axes[1].set_xlabel("step")
    axes[1].set_title("test NLL / ECE / Brier")
    axes[1].legend()
    axes[2].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-")
    axes[2].set_xlabel("step")
    axes[2].set_title("test accuracy")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
