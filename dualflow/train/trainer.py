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
import uuid
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
    fingerprint,
    load_image_dataset,
    resolve_data_dir,
)
from dualflow.data.augment import AugmentConfig
from dualflow.errors import CheckpointError, DivergenceError, Interrupted
from dualflow.io import (
    append_jsonl,
    git_commit,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from dualflow.models import build_model
from dualflow.nn.context import Method
from dualflow.nn.methods import Likelihood, make_ensemble, predict
from dualflow.optim import (
    mean_variance_labels,
    natural_gradient,
    variational_online_newton,
)
from dualflow.train.checkpoints import CheckpointStore
from dualflow.train.config import (
    ConfigError,
    _model_norm,
    base_config,
    validate_config,
)
from dualflow.train.fit import make_loss_fn
from dualflow.train.input import Normalizer, TrainBatches, batch_stream, to_global
from dualflow.train.interrupts import InterruptGuard, inject
from dualflow.train.timing import TimingLog
from dualflow.train.timing import summarize as timing_summary
from dualflow.train.workdir import WorkdirLock, archive_outputs

__all__ = [
    "METRIC_NAMES",
    "BareStep",
    "TrainState",
    "build_train_step",
    "init_train_state",
    "kl_weight_at",
    "load_data",
    "make_mesh",
    "make_model",
    "make_optimizer",
    "make_schedule",
    "time_train_step",
    "train_and_evaluate",
]

_REPO = Path(__file__).resolve().parents[2]  # for the commit hash in outputs

# fields that may change between a run and its resumption
_RESUMABLE_CHANGES = (
    "data_dir",
    "precision",  # speed vs float32 accuracy of the products, like the mesh
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
    "data.workers",  # the batches do not depend on how they are made
    "data.prefetch",
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


def _ng_labels(params):
    """``"ng"`` for the leaves of mean/variance pairs, ``"other"`` for the rest."""
    return jax.tree.map(
        lambda label: "other" if label == "other" else "ng",
        mean_variance_labels(params),
    )


def make_optimizer(
    cfg, schedule: optax.Schedule, n_data: int | None = None
) -> optax.GradientTransformation:
    """``[weight decay] -> [natural_gradient] -> [clip] -> sgd | adam | adamw``,
    or ``optimizer.name = "von"``.

    Weight decay (never on variances) is added to the gradient as an L2 term,
    so the natural gradient (App. D of the duality paper) preconditions it like
    the rest of the loss; the natural gradient sees both leaves of each
    mean/variance pair; clipping bounds the preconditioned update's global
    norm.  ``adamw`` applies its decoupled decay itself.  With the natural
    gradient, leaves without a variance partner (normalisation-free gains, BN
    parameters) get the same chain without it, at ``optimizer.ng_other_lr``
    (same schedule shape; ``0`` = ``optimizer.lr``): unpreconditioned, the
    natural-gradient rate would be orders of magnitude too large for them.

    ``"von"``: :func:`dualflow.optim.variational_online_newton` on the
    mean/variance pairs (step ``schedule``, momentum ``b1``, ``von_b2``,
    ``von_init_hessian``; data-set size ``optimizer.von_n_data`` or else
    ``n_data``; ``train.batch_size``; ``loss.kl_weight``) and Adam at
    ``ng_other_lr`` (same schedule shape; must be > 0 under von) on the
    other leaves.  During a KL warm-up (``loss.kl_anneal_steps``) its curvature
    estimate assumes the final ``kl_weight`` and is too large by
    ``(beta - beta_t) / (n v)`` (smaller, safer steps).
    """
    o = cfg.optimizer
    if o.name == "von":
        return _von_optimizer(cfg, schedule, n_data)
    if not o.natural_gradient:
        return _optimizer_chain(cfg, schedule, natural=False)
    other_lr = float(o.get("ng_other_lr", 0.0)) or float(o.lr)
    scale = other_lr / float(o.lr)

    def other_schedule(step):
        return schedule(step) * scale

    return optax.partition(
        {
            "ng": _optimizer_chain(cfg, schedule, natural=True),
            "other": _optimizer_chain(cfg, other_schedule, natural=False),
        },
        _ng_labels,
    )


def _von_optimizer(
    cfg, schedule: optax.Schedule, n_data: int | None
) -> optax.GradientTransformation:
    """``optimizer.name = "von"``: VON on the pairs, Adam on the rest."""
    o = cfg.optimizer
    n = int(o.get("von_n_data", 0) or 0) or (int(n_data) if n_data else 0)
    if not n:
        raise ConfigError(
            "optimizer.name='von' needs the training-set size: set"
            " config.optimizer.von_n_data or pass n_data to make_optimizer."
        )
    likelihood = o.get("von_likelihood", "auto")
    if likelihood == "auto":
        member = cfg.method.member if cfg.method.name == "ensemble" else cfg.method.name
        likelihood = "predictive" if member == "bp" else "expected"
    try:
        von = variational_online_newton(
            n,
            schedule,
            batch_size=int(cfg.train.batch_size),
            likelihood=likelihood,
            kl_weight=float(cfg.loss.kl_weight),
            b1=float(o.b1),
            b2=float(o.get("von_b2", 0.999)),
            init_hessian=float(o.get("von_init_hessian", 1.0)),
        )
    except ValueError as err:
        raise ConfigError(f"optimizer.name='von': {err}") from None
    scale = (float(o.get("ng_other_lr", 0.0)) or float(o.lr)) / float(o.lr)

    def other_schedule(step):
        return schedule(step) * scale

    return optax.partition(
        {
            "ng": von,
            "other": optax.adam(other_schedule, b1=float(o.b1), b2=float(o.b2)),
        },
        _ng_labels,
    )


def _optimizer_chain(
    cfg, schedule: optax.Schedule, *, natural: bool
) -> optax.GradientTransformation:
    """One ``[decay] -> [natural gradient] -> [clip] -> optimiser`` chain."""
    o = cfg.optimizer
    parts = []
    wd = float(o.weight_decay)
    if wd and o.name != "adamw":  # an L2 term of the loss: preconditioned by NG
        parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
    if natural:
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


#: training metrics summed on the device between log records
METRIC_NAMES = ("loss", "nll", "kl", "kl_weight", "lr", "grad_norm")


def init_train_state(
    params: Any, rest: Any, tx: optax.GradientTransformation, sharding
) -> TrainState:
    """Step 0 of a run: ``params``/``rest`` of ``nnx.split(model, nnx.Param,
    ...)``, a fresh optimiser state and zero metric sums, placed by
    ``sharding`` (the trainer replicates the state over its mesh)."""
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        rest,
        tx.init(params),
        {k: jnp.zeros((), jnp.float32) for k in METRIC_NAMES},  # distinct buffers
    )
    return jax.device_put(state, sharding)


def build_train_step(
    cfg,
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    method: Method,
    likelihood: Likelihood,
    n_data: int,
    sharding,
) -> Callable[[TrainState, jax.Array, jax.Array], TrainState]:
    """The trainer's jitted ``step(state, x, y) -> state``: objective and
    gradient at the step's key and KL weight, optimiser update, metric sums.

    ``state`` is donated; the new state is placed by ``sharding`` (replicated
    over the mesh; ``x``, ``y`` come sharded on its ``data`` axis).  Benchmarks
    (``scripts/bench_train.py``, ``scripts/bench_device.py``) time this
    function, so their figures are the trainer's."""
    loss_fn = make_loss_fn(
        graphdef, method=method, likelihood=likelihood, n_data=n_data
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

    return jax.jit(train_step, donate_argnums=0, out_shardings=sharding)


def _config_diff(
    old: dict, new: dict, prefix: str = "", defaults: dict | None = None
) -> list[str]:
    """Fields that differ between a run's recorded config and this one.  A
    field the recorded run did not have (added to dualflow since) counts as
    unchanged when it holds its default, which keeps the old behaviour."""
    if defaults is None:
        defaults = _jsonable(base_config())
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        path = f"{prefix}{k}"
        if any(path == r or path.startswith(r + ".") for r in _RESUMABLE_CHANGES):
            continue
        a, b = old.get(k), new.get(k)
        d = defaults.get(k) if isinstance(defaults, dict) else None
        known = isinstance(defaults, dict) and k in defaults
        if known and k not in old and k in new and b == d:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, path + ".", d if isinstance(d, dict) else {})
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
    run; at log, evaluation and checkpoint steps its time is not counted as
    training time, so ``scripts/bench_train.py`` times the bare step there).
    Raises :class:`ConfigError` for an invalid config (before loading
    anything), ``DataNotFoundError``/``DataError`` for missing or malformed
    data, :class:`~dualflow.errors.CheckpointError` when the workdir holds
    checkpoints none of which can be restored, ``DivergenceError`` when the
    loss stops being finite, and :class:`~dualflow.errors.Interrupted` after
    SIGINT/SIGTERM (the current step finishes and is checkpointed first; see
    :mod:`dualflow.train.interrupts`).  Rerunning a finished run returns its
    recorded summary unchanged.
    """
    t_start = time.time()
    with InterruptGuard() as guard:
        run = _Run(cfg, workdir, t_start, guard)  # validates cfg.precision too
        with _precision_context(cfg):
            return run.execute(on_step)


def _precision_context(cfg):
    """The context of ``config.precision`` (``moments.precision_context``):
    ``jax.default_matmul_precision(name)`` for JAX's names, bfloat16 operands
    of the moment products for ``"bf16_compute"``; ``""``: JAX's own."""
    from dualflow.moments.linear import precision_context

    return precision_context(cfg.get("precision", ""))  # "": nullcontext


class BareStep:
    """The trainer's jitted step alone, for timing against the loop.

    The run's own step (:func:`build_train_step`), state and first batch,
    built as :func:`train_and_evaluate` builds them (nothing is written), on
    the device; construction compiles the step.  :meth:`burst` times
    back-to-back calls on the device-resident batch ended by one device sync,
    like the trainer's timing windows, so against the trainer's
    ``seconds_per_step`` it isolates the loop's own cost."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self._run = _Run(cfg, ".", time.time(), guard=None)
        self._xy = to_global(self._run.mesh, *self._run.batches(0))
        with _precision_context(cfg):
            self._state = self._run.train_step(self._run.state, *self._xy)
            jax.block_until_ready(self._state)

    def burst(self, steps: int = 20) -> float:
        """Seconds per step of ``steps`` back-to-back calls."""
        step, state = self._run.train_step, self._state
        with _precision_context(self._run.cfg):
            t0 = time.perf_counter()
            for _ in range(steps):
                state = step(state, *self._xy)
            jax.block_until_ready(state)
        self._state = state
        return (time.perf_counter() - t0) / steps


def time_train_step(
    cfg: ml_collections.ConfigDict, *, steps: int = 20, repeats: int = 5
) -> float:
    """Median seconds per step of :class:`BareStep` bursts (one untimed)."""
    bare = BareStep(cfg)
    bare.burst(steps)
    return float(np.median([bare.burst(steps) for _ in range(repeats)]))


def _all_finite(state: TrainState) -> jax.Array:
    """True iff every float leaf of the state is finite (one fused reduction)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(state)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class _Run:
    """One invocation of a training run (setup, resume, loop, summary)."""

    def __init__(self, cfg, workdir, t_start: float, guard: InterruptGuard | None):
        self.cfg, self.t_start, self.guard = cfg, t_start, guard
        if cfg.mesh.distributed and not jax.distributed.is_initialized():
            jax.distributed.initialize()  # before anything else touches JAX
        self.mesh = make_mesh(int(cfg.mesh.num_devices))
        validate_config(cfg, num_devices=self.mesh.size)
        self.workdir = Path(workdir).expanduser().resolve()
        self.is_main = jax.process_index() == 0
        self.method = method_from_config(cfg)
        self.likelihood = Likelihood(head=cfg.likelihood.head)
        self.data = load_data(cfg)
        self.n_train = len(self.data.x_train)
        if cfg.train.batch_size > self.n_train:
            raise ConfigError(
                f"config.train.batch_size={cfg.train.batch_size} is larger than the"
                f" training set ({self.n_train} examples of {self.data.name})."
            )
        self._setup_batches()
        self._setup_state()
        self.run_info = {
            "config": _jsonable(cfg),
            "data": {
                "name": self.data.name,
                "source": self.data.source,
                "n_train": self.n_train,
                "fingerprint": fingerprint(
                    x_train=self.data.x_train,
                    y_train=self.data.y_train,
                    x_test=self.data.x_test,
                    y_test=self.data.y_test,
                ),
            },
        }

    # ---- setup ------------------------------------------------------------
    def _setup_batches(self) -> None:
        cfg, data = self.cfg, self.data
        augment = AugmentConfig(
            crop_pad=int(cfg.augment.crop_pad),
            flip=bool(cfg.augment.flip),
            randaugment_ops=int(cfg.augment.randaugment_ops),
            randaugment_magnitude=float(cfg.augment.randaugment_magnitude),
            mixup_alpha=float(cfg.augment.mixup_alpha),
            cutmix_alpha=float(cfg.augment.cutmix_alpha),
            switch_prob=float(cfg.augment.switch_prob),
        )
        self.normalizer = Normalizer(data.x_train, cfg.data.normalize)
        self.batches = TrainBatches(
            data.x_train,
            data.y_train,
            batch_size=int(cfg.train.batch_size),
            seed=int(cfg.seed),
            augment=augment,
            num_classes=dataset_info(data.name).num_classes,
            normalizer=self.normalizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        spe = self.spe = self.batches.steps_per_epoch
        self.total_steps = int(cfg.train.num_steps) or int(cfg.train.num_epochs) * spe
        self.eval_every = int(cfg.train.eval_every) or spe
        self.ckpt_every = int(cfg.train.checkpoint_every) or spe
        self.log_every = int(cfg.train.log_every)

    def _setup_state(self) -> None:
        cfg = self.cfg
        model = make_model(cfg, self.data.name, self.method)
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.schedule = make_schedule(cfg, self.total_steps)
        self.tx = make_optimizer(
            cfg, self.schedule, n_data=int(self.data.x_train.shape[0])
        )
        self.replicated = NamedSharding(self.mesh, P())
        self.state = init_train_state(params, rest, self.tx, self.replicated)
        self.train_step = build_train_step(
            cfg,
            self.graphdef,
            self.tx,
            self.schedule,
            method=self.method,
            likelihood=self.likelihood,
            n_data=self.n_train,
            sharding=self.replicated,
        )
        self._all_finite = jax.jit(_all_finite)
        self.evaluate = _make_evaluator(
            cfg, self.mesh, self.graphdef, self.method, self.likelihood, self.normalizer
        )

    # ---- resume -----------------------------------------------------------
    def _resume(self) -> int:
        """Restore the newest readable checkpoint; return the step it holds."""
        self.store = CheckpointStore(
            self.workdir / "checkpoints",
            keep=int(self.cfg.train.keep_checkpoints),
            is_main=self.is_main,
        )
        if not self.store.steps():
            return 0
        _check_same_run(self.workdir / "config.json", self.run_info, self.workdir)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            self.state,
        )
        report = print if self.is_main else (lambda _msg: None)
        state, latest = self.store.restore_newest(abstract, report=report)
        self.state = state
        start = int(state.step)
        self._say(
            f"dualflow: resumed from {self.store.directory / str(latest)}"
            f" (step {start})"
        )
        return start

    def _say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _stop_requested(self, boundary: bool = True) -> bool:
        """Whether to stop now.  One process: its own SIGINT/SIGTERM flag.
        Several: the processes agree at step boundaries where they all stop
        anyway (log/evaluation/checkpoint steps), so all stop at the same
        step; a host's signal counts for all."""
        local = self.guard.requested is not None
        if jax.process_count() == 1:
            return local
        if not boundary:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

    def _interrupt(self, step: int) -> None:
        """Checkpoint ``step`` and raise Interrupted (after SIGINT/SIGTERM)."""
        if step > 0:
            self._save()
        self.timing.finish(step, time.time())
        raise Interrupted(
            f"interrupted at step {step}; rerun the same command to resume", step
        )

    def _save(self) -> None:
        step = int(self.state.step)
        if self.store.latest_step() == step:
            return
        if not bool(self._all_finite(self.state)):  # never checkpoint divergence
            sums = jax.device_get(self.state.metric_sums)
            self._diverged(step, float(sums["loss"]), "parameters or metrics")
        inject("save", step)
        inject("save-write", step, directory=self.store.directory)
        self.store.save(step, self.state)

    def _diverged(self, step: int, value, what: str = "loss") -> None:
        last = self.store.latest_step()
        detail = "" if what == "loss" else f" (non-finite {what})"
        raise DivergenceError(
            f"the training loss became {value} by step {step}{detail}"
            f" ({self.method.name}); lower --config.optimizer.lr or the initial"
            " variance (--config.model.kwargs.init_var)",
            hint=(
                f"the last finite checkpoint (step {last}) is kept"
                if last is not None
                else "no checkpoint was written"
            ),
        )

    # ---- the loop ---------------------------------------------------------
    def execute(self, on_step) -> dict:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tag = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.t_start))
        self.invocation = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.timing = TimingLog(
            self.workdir / "timing.jsonl",
            invocation=self.invocation,
            t_start=self.t_start,
            enabled=self.is_main,
        )
        with WorkdirLock(self.workdir, enabled=self.is_main):
            if self._stop_requested():  # during setup: nothing to save yet
                raise Interrupted(
                    "interrupted before training started; rerun the same command"
                )
            try:
                return self._execute(on_step)
            finally:
                self.store.close()

    def _execute(self, on_step) -> dict:
        start = self._resume()
        log_path = self.workdir / "metrics.jsonl"
        summary_path = self.workdir / "summary.json"
        self.records = _read_records(log_path, upto=start)
        previous = _read_json(summary_path)
        if self._finished(start, previous):
            self._say(f"dualflow: run already finished ({start} steps); {summary_path}")
            return previous  # nothing is recomputed or rewritten
        if self._stop_requested():
            self._interrupt(start)
        if start == 0 and self.is_main:  # an attempt that left no checkpoint
            moved = archive_outputs(self.workdir, self.invocation)
            if moved is not None:
                self._say(f"dualflow: no checkpoint; earlier outputs moved to {moved}")
        elif previous is not None and self.is_main:  # from before a fallback
            os.replace(summary_path, self.workdir / "summary.superseded.json")
        if self.is_main:
            write_json_atomic(
                self.workdir / "config.json",
                {**self.run_info, "commit": git_commit(_REPO)},
                indent=2,
            )
            write_text_atomic(
                log_path, "".join(json.dumps(r) + "\n" for r in self.records)
            )
        self._announce()
        bar = tqdm(
            total=self.total_steps,
            initial=start,
            unit="step",
            desc=f"{self.method.name}",
            disable=not (self.cfg.train.progress and self.is_main),
            dynamic_ncols=True,
        )
        self.last_eval: dict = {}
        try:
            if start > 0 and self._eval_due(start) and not self._has_eval(start):
                self._evaluate(start, bar, log_path)  # one cut short by an interrupt
                if self._stop_requested():
                    self._interrupt(start)
            self._train(start, bar, log_path, on_step)
        finally:
            bar.close()
        return self._finish(previous)

    def _finished(self, start: int, previous: dict | None) -> bool:
        """A finished run whose summary matches its checkpoint, log and config
        (a changed evaluation setting re-evaluates instead)."""
        if start < self.total_steps or not previous:
            return False
        old = _read_json(self.workdir / "config.json") or {}
        return (
            previous.get("steps") == start
            and self._has_eval(start)
            and old.get("config") == self.run_info["config"]
        )

    def _announce(self) -> None:
        cfg, data, method = self.cfg, self.data, self.method
        members = (
            f" [{method.member} x{method.ensemble_size}]"
            if method.name == "ensemble"
            else ""
        )
        self._say(
            f"dualflow: {data.name} ({self.n_train} train / {len(data.x_test)} test,"
            f" {data.source}); model {cfg.model.name} (norm={_model_norm(cfg)});"
            f" method {method.name}{members}; {self.mesh.size} device(s) x"
            f" {jax.process_count()} host(s); {self.total_steps} steps of"
            f" {cfg.train.batch_size} ({self.spe} per epoch)"
        )

    def _eval_due(self, done: int) -> bool:
        return done % self.eval_every == 0 or done == self.total_steps

    def _has_eval(self, step: int) -> bool:
        return any(
            r.get("kind") == "eval" and r.get("step") == step for r in self.records
        )

    def _train(self, start: int, bar, log_path: Path, on_step) -> None:
        # speed: training time only (evaluation and saving excluded); each
        # window ends with a host read of the metric sums, which waits for the
        # device; windows go to timing.jsonl as they close
        window_time, window_steps = 0.0, 0
        t_mark = time.time()
        inject("compile")
        steps = range(start, self.total_steps)
        stream = batch_stream(
            self.batches,
            steps,
            workers=int(self.cfg.data.workers),
            prefetch=int(self.cfg.data.prefetch),
        )
        try:
            for step, host_xy in stream:
                x, y = to_global(self.mesh, *host_xy)  # async on accelerators
                self.state = self.train_step(self.state, x, y)
                done = step + 1
                inject("step", done)  # test hook: a signal arriving during the step
                window_steps += 1
                bar.update(1)
                log_now = done % self.log_every == 0 or done == self.total_steps
                eval_now = self._eval_due(done)
                ckpt_now = done % self.ckpt_every == 0 or done == self.total_steps
                stop = self._stop_requested(boundary=log_now or eval_now or ckpt_now)
                if log_now or eval_now or ckpt_now or stop:
                    jax.block_until_ready(self.state)
                    window_time += time.time() - t_mark
                    self.timing.window(done, window_steps, window_time, time.time())
                if log_now:
                    self._log(done, window_steps, window_time, bar, log_path)
                if log_now or eval_now or ckpt_now or stop:
                    window_time, window_steps = 0.0, 0
                if eval_now:
                    self._evaluate(done, bar, log_path)
                if ckpt_now:
                    self._save()
                if stop or (self.guard.requested and jax.process_count() == 1):
                    self._interrupt(done)  # a signal during the evaluation or save
                if on_step is not None:
                    on_step(done)  # at a window's end: off the clock
                if log_now or eval_now or ckpt_now:
                    t_mark = time.time()
        finally:
            stream.close()  # stop the input workers, free their buffers

    def _log(self, done, window_steps, window_time, bar, log_path) -> None:
        sums = jax.device_get(self.state.metric_sums)
        n_logged = _steps_since_log(self.records, done)
        rec = {
            "kind": "train",
            "step": done,
            "epoch": done / self.spe,
            **{k: float(v) / n_logged for k, v in sums.items()},
            "steps_per_sec": window_steps / window_time,
            "examples_per_sec": window_steps
            * int(self.cfg.train.batch_size)
            / window_time,
        }
        if not math.isfinite(rec["loss"]):
            self._diverged(done, rec["loss"])
        if not math.isfinite(rec["grad_norm"]):
            self._diverged(done, rec["loss"], "gradients")
        self.state = self.state._replace(
            metric_sums=jax.device_put(
                jax.tree.map(jnp.zeros_like, self.state.metric_sums), self.replicated
            )
        )
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        self.records.append(rec)
        _append(log_path, rec, self.is_main)

    def _evaluate(self, done: int, bar, log_path: Path) -> None:
        inject("eval", done)
        result = self.evaluate(
            self.state,
            self.data.x_test,
            self.data.y_test,
            should_stop=lambda: self._stop_requested(boundary=False),
        )
        if result is None:  # interrupted: evaluated again on resume
            return
        self.last_eval = result
        rec = {"kind": "eval", "step": done, "epoch": done / self.spe, **result}
        self.records.append(rec)
        _append(log_path, rec, self.is_main)
        if self.is_main:
            bar.write(
                f"step {done:6d}  epoch {done / self.spe:6.2f}  test acc"
                f" {result['accuracy']:.4f}  nll {result['nll']:.4f}"
                f"  ece {result['ece']:.4f}  brier {result['brier']:.4f}"
            )

    # ---- summary ----------------------------------------------------------
    def _finish(self, previous: dict | None) -> dict:
        cfg, data, state = self.cfg, self.data, self.state
        if not self.last_eval:  # e.g. summary.json was lost after the last save
            self.last_eval = self.evaluate(state, data.x_test, data.y_test)
        self._save()
        self.timing.finish(int(state.step), time.time())
        timing = timing_summary(self.workdir / "timing.jsonl")
        sec_per_step = timing["seconds_per_step"]
        if sec_per_step is None and previous:  # no timing file (older runs)
            sec_per_step = previous.get("seconds_per_step")
        bs = int(cfg.train.batch_size)
        summary = {
            "dataset": data.name,
            "data_source": data.source,
            "data_fingerprint": self.run_info["data"]["fingerprint"],
            "model": cfg.model.name,
            "norm": str(_model_norm(cfg)),
            "method": self.method.name,
            "row": cfg.get("row", ""),
            "steps": int(state.step),
            "epochs": int(state.step) / self.spe,
            "n_train": self.n_train,
            "n_test": len(data.x_test),
            "devices": self.mesh.size,
            "hosts": jax.process_count(),
            **{f"test_{k}": v for k, v in self.last_eval.items()},
            "seconds_per_step": sec_per_step,
            "seconds_per_epoch": sec_per_step * self.spe if sec_per_step else None,
            "examples_per_sec": bs / sec_per_step if sec_per_step else None,
            "wall_seconds": timing["wall_seconds"],
            "train_seconds": timing["train_seconds"],
            "steps_run": timing["steps_run"],
            "invocations": timing["invocations"],
            "commit": git_commit(_REPO),
        }
        if self.is_main:
            write_json_atomic(self.workdir / "summary.json", summary, indent=2)
            if cfg.train.plot:
                plot_curves(self.records, self.workdir / "curves.png", _title(summary))
            self._print_summary(summary)
        return summary

    def _print_summary(self, s: dict) -> None:
        speed = (
            f"{s['seconds_per_epoch']:.2f} s/epoch,"
            f" {s['examples_per_sec']:.0f} examples/s"
            if s["seconds_per_step"]
            else "speed n/a"
        )
        print(
            f"summary: {s['dataset']} {s['model']} {s['method']}"
            f" | test acc {s['test_accuracy']:.4f} nll"
            f" {s['test_nll']:.4f} ece {s['test_ece']:.4f} brier"
            f" {s['test_brier']:.4f} | {s['steps']} steps, {speed} |"
            f" wall {s['wall_seconds']:.1f} s | {self.workdir}"
        )


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
    """Refuse to resume a checkpointed run with a different config or data.

    The data are compared by name, size and fingerprint (runs recorded before
    fingerprints existed are compared by name and size only)."""
    old = _read_json(cfg_path)
    if old is None:
        raise CheckpointError(
            f"workdir {workdir} holds checkpoints but its config.json is missing or"
            " unreadable, so it cannot be checked that they belong to this config.",
            hint=(
                f"restore {cfg_path}, or move {workdir / 'checkpoints'} away to"
                " start over (or pass a new --workdir)"
            ),
        )
    diff = _config_diff(old.get("config", {}), run_info["config"])
    old_data, new_data = old.get("data", {}), run_info["data"]
    for k in ("name", "n_train", "fingerprint"):
        if k in old_data and old_data.get(k) != new_data[k]:
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

    def evaluate(
        state: TrainState,
        x_test: np.ndarray,
        y_test: np.ndarray,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict | None:
        """Metrics over the test set; ``None`` if ``should_stop()`` turned true
        between batches (an interrupt: the evaluation is redone on resume)."""
        n = len(x_test)
        nproc, pid = jax.process_count(), jax.process_index()
        local = bs // nproc
        out = []
        for i, start in enumerate(range(0, n, bs)):
            if should_stop is not None and should_stop() and nproc == 1:
                return None
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
    return [r for r in read_jsonl(path) if r.get("step", 0) <= upto]


def _append(path: Path, rec: dict, is_main: bool) -> None:
    if is_main:
        append_jsonl(path, rec)


def _title(s: dict) -> str:
    return f"{s['dataset']} / {s['model']} / {s['method']}"


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Training loss, test NLL and test accuracy against steps (PNG, atomic)."""
    from matplotlib.figure import Figure  # no pyplot: leaves its backend alone

    tr = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
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
    os.replace(tmp, path)
