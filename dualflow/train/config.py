"""The training configuration: defaults, the paper's Table-1 method rows, checks.

Every training config (``configs/<name>.py``) starts from :func:`base_config`
and overrides a few fields; :func:`validate_config` checks a finished config
and raises :class:`ConfigError` naming the offending field, before any data is
read or any model is built.

Schema (``ml_collections.ConfigDict``)::

    seed, dataset, data_dir, row (the Table-1 row, when one was applied)
    data:      fallback, download, normalize ("standardize" | "unit"),
               max_train, max_test
    model:     name, norm ("published" | "none" | "batch" | "layer"), kwargs
    method:    name, mode, backward, num_samples, dropout_rate, ensemble_size, member
    likelihood.head                       ("probit" | "second_order" | "mean")
    loss:      kl_weight (beta), kl_anneal_steps
    optimizer: name ("sgd" | "adam" | "adamw" | "von"), lr, momentum, nesterov,
               b1, b2, weight_decay, natural_gradient, ng_damping,
               ng_variance_update, ng_other_lr, grad_clip, von_b2,
               von_init_hessian, von_likelihood, von_n_data
    schedule:  name ("cosine" | "constant"), warmup_steps, end_factor
    augment:   crop_pad, flip, randaugment_ops, randaugment_magnitude,
               mixup_alpha, cutmix_alpha, switch_prob
    train:     batch_size (global), num_epochs | num_steps, log_every,
               eval_every, checkpoint_every, keep_checkpoints, eval_batch_size,
               eval_samples, progress, plot
    mesh:      num_devices (0 = all), distributed (call jax.distributed.initialize)
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from dualflow.nn.context import METHODS

__all__ = [
    "ConfigError",
    "METHOD_ROWS",
    "apply_method_row",
    "base_config",
    "image_recipe",
    "load_config_file",
    "validate_config",
]


from dualflow.errors import ConfigError  # noqa: E402  (re-exported here)


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every field (a BP MLP on MNIST); configs override a few."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "mnist"
    c.data_dir = ""  # "" -> $DUALFLOW_DATA_DIR
    # float32 matmul/conv precision of every product (jax.default_matmul_precision):
    # "" keeps JAX's default (fast TF32/bf16 paths on GPU/TPU), "highest" = full fp32,
    # "bf16_compute": bfloat16 operands, float32 accumulation of the moment products
    c.precision = ""

    c.data = ml_collections.ConfigDict()
    c.data.fallback = ""  # dataset to use when `dataset` is not found ("" = fail)
    c.data.download = False  # let tfds download + prepare (needs TensorFlow, net)
    c.data.normalize = "standardize"  # per-channel train mean/std, or "unit" [0,1]
    c.data.max_train = 0  # > 0: use the first n training examples (smoke tests)
    c.data.max_test = 0
    # input pipeline (grain): 0 = one background thread, N = N worker
    # processes, -1 = one per core; prefetch = batches read ahead per worker
    c.data.workers = 0
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.norm = "none"  # "published" (BN/LN), "none" (NF), "batch", "layer"
    c.model.kwargs = ml_collections.ConfigDict()  # family + Bayesian layer options

    c.method = ml_collections.ConfigDict()
    c.method.name = "bp"
    c.method.mode = "linearized"
    c.method.backward = "bp"
    c.method.num_samples = 1  # weight samples per step (sampling methods)
    c.method.dropout_rate = 0.1  # mc_dropout
    c.method.ensemble_size = 5
    c.method.member = "deterministic"  # how ensemble members train

    c.likelihood = ml_collections.ConfigDict()
    c.likelihood.head = "probit"

    c.loss = ml_collections.ConfigDict()
    c.loss.kl_weight = 1.0  # beta in  NLL + beta * KL / N
    c.loss.kl_anneal_steps = 0  # linear warm-up of beta from 0 over these steps

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.nesterov = True  # sgd
    c.optimizer.b1 = 0.9  # adam / adamw
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0  # on weight means and deterministic params
    c.optimizer.natural_gradient = False  # dualflow.optim.natural_gradient first
    c.optimizer.ng_damping = 0.0
    c.optimizer.ng_variance_update = "app_d"  # or "fixed_point" (see natural_gradient)
    # rate of the leaves without a variance partner (normalisation-free gains, BN)
    # under the natural gradient; 0 = optimizer.lr.  apply_method_row keeps the
    # recipe's rate here when it raises optimizer.lr to the natural-gradient rate.
    c.optimizer.ng_other_lr = 0.0
    c.optimizer.grad_clip = 0.0  # global-norm clipping of the update (0 = off)
    # name = "von": dualflow.optim.variational_online_newton on the Bayesian
    # weights (lr = its Newton step, scale-free, e.g. 0.1; b1 = its momentum),
    # Adam at ng_other_lr (0 = lr) on leaves without a variance partner.
    c.optimizer.von_b2 = 0.999  # curvature averaging (precision step 1 - b2)
    c.optimizer.von_init_hessian = 1.0  # initial per-example precision h_0
    c.optimizer.von_likelihood = "auto"  # bp: "predictive", else "expected"
    c.optimizer.von_n_data = 0  # data-set size n; 0 = the training-set size

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 0
    c.schedule.end_factor = 0.0  # final lr = end_factor * lr

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_pad = 0
    c.augment.flip = False
    c.augment.randaugment_ops = 0
    c.augment.randaugment_magnitude = 9.0
    c.augment.mixup_alpha = 0.0
    c.augment.cutmix_alpha = 0.0
    c.augment.switch_prob = 0.5

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, over all devices and hosts
    c.train.num_epochs = 10
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.log_every = 50  # steps between train-metric records
    c.train.eval_every = 0  # steps between evaluations (0 = once per epoch)
    c.train.checkpoint_every = 0  # steps between checkpoints (0 = once per epoch)
    c.train.keep_checkpoints = 3
    c.train.eval_batch_size = 512  # divisible by 8 devices (v2-8/v3-8 TPU)
    c.train.eval_samples = 16  # predictive samples of sampling methods
    c.train.progress = True
    c.train.plot = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0  # 0: all devices (of all hosts)
    c.mesh.distributed = False  # multi-host: jax.distributed.initialize()
    return c


def image_recipe(
    dataset: str,
    model: str,
    *,
    batch_size: int,
    num_epochs: int,
    weight_decay: float,
    warmup_steps: int,
    kl_anneal_steps: int,
    crop_pad: int = 4,
    paper_augment: bool = True,
) -> ml_collections.ConfigDict:
    """The image-classification recipe shared by the CIFAR / Tiny ImageNet
    configs: Bayesian layers with He-scale priors (``init_var`` 1e-3,
    ``prior_var`` 2 per fan-in), beta 1 annealed over ``kl_anneal_steps``, SGD +
    Nesterov at 0.1 with clipping at 5, linear warm-up then cosine, crop +
    flip, and with ``paper_augment`` the duality paper's RandAugment (N=2, M=9),
    mixup (0.8) and CutMix (1.0).  Apply a Table-1 row on top
    (:func:`apply_method_row`)."""
    c = base_config()
    c.dataset = dataset
    c.model.name = model
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.loss.kl_weight = 1.0
    c.loss.kl_anneal_steps = kl_anneal_steps
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = weight_decay
    c.optimizer.grad_clip = 5.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = warmup_steps
    c.augment.crop_pad = crop_pad
    c.augment.flip = True
    if paper_augment:
        c.augment.randaugment_ops = 2
        c.augment.randaugment_magnitude = 9.0
        c.augment.mixup_alpha = 0.8
        c.augment.cutmix_alpha = 1.0
    c.train.batch_size = batch_size
    c.train.num_epochs = num_epochs
    c.train.eval_batch_size = 512  # divisible by 8 devices (v2-8/v3-8 TPU)
    return c


#: The method rows of the duality paper's Table 1, as overrides of a config.
#: ``vanilla``: SGD with normalisation layers; ``reparam``: Bayes-by-backprop with
#: normalisation; ``reparam_nf_ng_ensemble``: Bayes-by-backprop, several networks
#: per mini-batch, no normalisation, natural gradient; ``bp_nf``: Algorithm 1
#: without normalisation; ``bp_nf_ng``: with the natural gradient.
METHOD_ROWS: dict[str, dict] = {
    "vanilla": {
        "method.name": "deterministic",
        "model.norm": "published",
        "optimizer.natural_gradient": False,
    },
    "reparam": {
        "method.name": "reparam",
        "model.norm": "published",
        "optimizer.natural_gradient": False,
    },
    "reparam_nf_ng_ensemble": {
        "method.name": "ensemble",
        "method.member": "reparam",
        "method.ensemble_size": 4,
        "model.norm": "none",
        "optimizer.natural_gradient": True,
    },
    "bp_nf": {
        "method.name": "bp",
        "model.norm": "none",
        "optimizer.natural_gradient": False,
    },
    "bp_nf_ng": {
        "method.name": "bp",
        "model.norm": "none",
        "optimizer.natural_gradient": True,
    },
}


def apply_method_row(
    cfg: ml_collections.ConfigDict, row: str, ng_lr: float | None = None
) -> ml_collections.ConfigDict:
    """Apply Table-1 row ``row`` (a key of :data:`METHOD_ROWS`) to ``cfg``.

    Natural-gradient rows use ``ng_lr`` as the learning rate (the natural
    gradient scales mean gradients by the tiny weight variances, so its rate is
    orders of magnitude above SGD's) and no weight decay (the KL is the
    regulariser of variational methods).  Leaves without a variance partner
    (the residual gains of normalisation-free networks) are not
    preconditioned, so they keep the recipe's rate (``optimizer.ng_other_lr``):
    at the natural-gradient rate they would diverge within a few steps.
    """
    if row not in METHOD_ROWS:
        raise ConfigError(f"method row {row!r} is not one of {sorted(METHOD_ROWS)}.")
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # unlocked copy
    for path, value in METHOD_ROWS[row].items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    if cfg.method.name != "deterministic":
        cfg.optimizer.weight_decay = 0.0
    if cfg.optimizer.natural_gradient and ng_lr is not None:
        cfg.optimizer.ng_other_lr = cfg.optimizer.lr  # unpaired leaves keep it
        cfg.optimizer.lr = ng_lr
    cfg.row = row
    return cfg


def load_config_file(
    path: str | os.PathLike, arg: str | None = None
) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (``arg=None``: no
    argument), so that config files can build on each other."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(
        "_dualflow_config_" + os.path.basename(path).removesuffix(".py"), path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def _field(cfg, path: str):
    node = cfg
    for p in path.split("."):
        if p not in node:
            raise ConfigError(
                f"config.{path} is missing; start configs from"
                " dualflow.train.config.base_config()."
            )
        node = node[p]
    return node


def _choice(cfg, path: str, allowed) -> None:
    value = _field(cfg, path)
    if value not in allowed:
        raise ConfigError(
            f"config.{path}={value!r} is not one of {sorted(map(str, allowed))}."
        )


def _positive(cfg, path: str, *, zero_ok: bool = False) -> None:
    value = _field(cfg, path)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"config.{path} must be {bound}, got {value!r}.")


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None):
    """Raise :class:`ConfigError` (naming the field) for an invalid config.

    ``num_devices``: size of the data-parallel mesh, to check that the global
    batch divides evenly (skipped when ``None``).
    """
    from dualflow.data.info import IMAGE_DATASETS
    from dualflow.models import MODELS
    from dualflow.moments.linear import PRECISIONS

    _choice(cfg, "method.name", METHODS)
    if cfg.get("precision", ""):
        _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "method.member", [m for m in METHODS if m != "ensemble"])
    _choice(cfg, "method.mode", ("linearized", "matched"))
    _choice(cfg, "method.backward", ("bp", "autodiff", "bp_fixed_noise"))
    _positive(cfg, "method.num_samples")
    _positive(cfg, "method.ensemble_size")
    rate = _field(cfg, "method.dropout_rate")
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"config.method.dropout_rate must be in [0, 1), got {rate}.")
    _choice(cfg, "dataset", IMAGE_DATASETS)
    if cfg.data.fallback:
        _choice(cfg, "data.fallback", IMAGE_DATASETS)
    _choice(cfg, "data.normalize", ("standardize", "unit"))
    _positive(cfg, "data.max_train", zero_ok=True)
    _positive(cfg, "data.max_test", zero_ok=True)
    _positive(cfg, "data.prefetch")
    workers = _field(cfg, "data.workers")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(
            "config.data.workers must be an integer >= -1 (0: a background thread,"
            f" N: N worker processes, -1: one per core), got {workers!r}."
        )
    _choice(cfg, "model.name", MODELS)
    _choice(cfg, "model.norm", ("published", "none", "batch", "layer"))
    kwargs = _field(cfg, "model.kwargs")
    for key in ("init_var", "prior_var"):
        if key in kwargs and not (
            key == "prior_var" and kwargs[key] == "empirical_bayes"
        ):
            _positive(cfg, f"model.kwargs.{key}")
    layer_method = (
        cfg.method.member if cfg.method.name == "ensemble" else cfg.method.name
    )
    if layer_method == "bp" and _model_norm(cfg) is not None:
        raise ConfigError(
            f"config.model.norm={cfg.model.norm!r} gives model {cfg.model.name!r}"
            " normalisation layers, which method 'bp' cannot propagate moments"
            " through; use config.model.norm='none' (the NF variant)."
        )
    _choice(cfg, "likelihood.head", ("probit", "second_order", "mean"))
    _positive(cfg, "loss.kl_weight", zero_ok=True)
    _positive(cfg, "loss.kl_anneal_steps", zero_ok=True)
    _choice(cfg, "optimizer.name", ("sgd", "adam", "adamw", "von"))
    if cfg.optimizer.name == "von":
        _validate_von(cfg)
    _positive(cfg, "optimizer.lr")
    _positive(cfg, "optimizer.weight_decay", zero_ok=True)
    _positive(cfg, "optimizer.grad_clip", zero_ok=True)
    _positive(cfg, "optimizer.ng_damping", zero_ok=True)
    _positive(cfg, "optimizer.ng_other_lr", zero_ok=True)
    _choice(cfg, "schedule.name", ("cosine", "constant"))
    _positive(cfg, "schedule.warmup_steps", zero_ok=True)
    _positive(cfg, "schedule.end_factor", zero_ok=True)
    for key in ("crop_pad", "randaugment_ops", "randaugment_magnitude"):
        _positive(cfg, f"augment.{key}", zero_ok=True)
    for key in ("mixup_alpha", "cutmix_alpha"):
        _positive(cfg, f"augment.{key}", zero_ok=True)
    if not 0 <= cfg.augment.randaugment_magnitude <= 10:
        raise ConfigError(
            "config.augment.randaugment_magnitude must be in [0, 10] (RandAugment's"
            f" scale), got {cfg.augment.randaugment_magnitude}."
        )
    if not 0 <= cfg.augment.switch_prob <= 1:
        raise ConfigError(
            f"config.augment.switch_prob must be in [0, 1], got"
            f" {cfg.augment.switch_prob}."
        )
    _choice(cfg, "optimizer.ng_variance_update", ("app_d", "fixed_point"))
    for key in ("batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
        _positive(cfg, f"train.{key}")
    for key in ("num_epochs", "num_steps", "eval_every", "checkpoint_every"):
        _positive(cfg, f"train.{key}", zero_ok=True)
    if cfg.train.num_epochs == 0 and cfg.train.num_steps == 0:
        raise ConfigError(
            "config.train.num_epochs and config.train.num_steps are both 0: set one."
        )
    _positive(cfg, "train.eval_samples")
    _positive(cfg, "mesh.num_devices", zero_ok=True)
    if num_devices is not None:
        for key in ("batch_size", "eval_batch_size"):
            b = cfg.train[key]
            if b % num_devices:
                raise ConfigError(
                    f"config.train.{key}={b} is not divisible by the {num_devices}"
                    " devices of the data-parallel mesh; use a multiple of"
                    f" {num_devices} or set config.mesh.num_devices."
                )


def _validate_von(cfg: ml_collections.ConfigDict) -> None:
    """Checks of ``optimizer.name = "von"`` (variational online Newton)."""
    o = cfg.optimizer
    _choice(cfg, "optimizer.von_likelihood", ("auto", "predictive", "expected"))
    _positive(cfg, "optimizer.von_init_hessian")
    _positive(cfg, "optimizer.von_n_data", zero_ok=True)
    for key in ("b1", "von_b2"):
        b = _field(cfg, f"optimizer.{key}")
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"config.optimizer.{key} must be in [0, 1), got {b}.")
    if o.natural_gradient:
        raise ConfigError(
            "config.optimizer.name='von' is itself a natural-gradient method: set"
            " config.optimizer.natural_gradient=False."
        )
    for key in ("weight_decay", "grad_clip"):
        if o[key]:
            raise ConfigError(
                f"config.optimizer.{key}={o[key]} is not supported with"
                " optimizer.name='von' (it would bias the curvature estimate; the"
                " prior, model.kwargs.prior_var, is the regulariser): set it to 0."
            )
    if not o.ng_other_lr > 0:
        raise ConfigError(
            "config.optimizer.name='von' steps the leaves without a variance"
            " partner (normalisation gains, the noise variance) with Adam at"
            " config.optimizer.ng_other_lr, which must be > 0 (e.g. 1e-3; the"
            " VON step optimizer.lr is no Adam rate)."
        )
    if not cfg.loss.kl_weight > 0:
        raise ConfigError(
            "config.optimizer.name='von' sets the posterior variance to"
            " kl_weight / (n h): config.loss.kl_weight must be > 0."
        )
    member = cfg.method.member if cfg.method.name == "ensemble" else cfg.method.name
    if member in ("deterministic", "mc_dropout"):
        raise ConfigError(
            f"config.optimizer.name='von' needs Bayesian (mean/variance) weights;"
            f" method {member!r} has none: use sgd/adam/adamw."
        )
    if o.von_likelihood == "predictive" and member != "bp":
        raise ConfigError(
            "config.optimizer.von_likelihood='predictive' is BP's -log predictive"
            f" density; method {member!r} optimises an expected NLL: use 'expected'"
            " or 'auto'."
        )


def _model_norm(cfg) -> str | None:
    """The normalisation the model is built with (``None``: NF)."""
    from dualflow.models import default_norm

    norm = cfg.model.get("norm", "published")
    if norm == "published":
        return default_norm(cfg.model.name)
    return None if norm in ("none", "None", "", None) else norm
