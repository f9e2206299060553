"""Per-(data set, method) hyper-parameter search on validation data (UCI).

Protocol (issue 19 items 1, 2 and 4), applied to every split ``k`` separately:

1. **Search.**  The training rows of split ``k`` are divided 80/20 (fixed
   seed; :func:`dualflow.data.uci.uci_split` with ``validation_fraction``).
   Each of the method's ``budget`` candidates (:func:`candidates`) is trained
   on the 80% for the epoch budget and its validation log-likelihood is
   recorded every ``eval_every`` epochs.  The (candidate, epoch) pair with the
   best validation log-likelihood is chosen (:func:`select`).  Test rows are
   never read in this phase.
2. **Final training.**  The chosen candidate is retrained from a fresh
   initialisation on all training rows of the split for the chosen number of
   epochs and the test rows are evaluated exactly once, on that snapshot.

Search space (:data:`SPACE`; a dimension applies where the method has it):

* ``lr`` -- the method's own step: Adam's learning rate, except ``bp_von``'s
  Newton step ``von.lr`` and ``bp_ng``'s ``ng.rho`` (:data:`OWN_STEP`; their
  noise variance keeps Adam at ``config.lr``);
* ``init_var`` -- initial posterior variance x 1/fan_in (variational methods);
* ``prior_var`` -- prior variance x 1/fan_in, or ``"empirical_bayes"``
  (variational methods);
* ``noise`` -- homoscedastic or heteroscedastic observation noise (``bp`` is
  homoscedastic and ``bp_het`` heteroscedastic by definition; every other
  method searches both);
* ``dropout_rate`` -- ``mc_dropout`` only;
* the number of epochs, by early stopping on the validation split (as before).

``config.search_seeds = R > 1`` trains every (candidate, split) R times with
independent keys in the search and scores the mean of the R validation curves
(R x the search cost): one training's validation LL varies with the seed by
more than the candidates differ on the small data sets, and the argmax over
candidates otherwise rewards the luckiest run.

**Budget.**  Every method gets the same number of candidates
(``config.search_budget``): the config's global setting first, then distinct
points of the method's grid in a fixed random order (random search on a grid,
seeded per method, the same for every data set and split).  Budget 1 is the
old single-setting protocol.

**Cost** (2 cores; whole groups timed against the old protocol,
``uci.run_uci_group``, under the same load): 6 candidates cost 3.0x (boston bp; power
bp 3.0x, protein bp 3.3x, boston reparam 2.3x, boston mc_dropout 2.7x -- the
sampling methods gain from evaluating test rows once), 4 candidates 2.1x
(boston bp).  The old full table took 53 min; with ``bp_het``, ``bp_von`` and a
``bp_ng`` that no longer stops early, the full run at budget 4 (the default)
was extrapolated at 2.3 h but measured 76 min (2026-12-02, ``results/uci/``),
so about 1.8 h at 6.

**Grid, not Optuna** (``pip index versions optuna``: 5.0.0; not a dependency).
Measured on this 2-core machine (boston, bp, 20 splits, 6 candidates of one
structure, 912 epochs): compiling one structure's program takes ~4-7 s, and
training is compute-bound -- all 120 runs vmapped in one call took 35.3 s, one
candidate (20 runs) per call of the same compiled program 36.6 s.  So what
matters is compiling once per *structure* (noise model, prior, dropout rate:
the fields that change the program) rather than once per trial, and reusing
that program for every candidate of the structure with the traced values
(learning rate, initial variance) as arguments -- which needs the candidates
known up front, i.e. a grid.  Optuna's ask/tell loop would build a program per
trial (~5 s x budget x 81 groups, ~30 min more on a full run), its TPE sampler
draws its first ``n_startup_trials=10`` trials at random (so for a budget
<= 10 it *is* the random search done here), and its pruners need per-trial
intermediate reports that a vmapped scan does not give.
``config.search_chunk`` sets how many candidates go through one call (1:
least memory, same speed).

Heteroscedastic ``bp`` (``bp_het``) evaluates its predictive log-likelihood
sampling-free: :func:`heteroscedastic_bp_log_likelihood` integrates the
Gaussian scale mixture over the log-noise belief by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualflow.data.uci import UCIData, uci_split
from dualflow.data.validate import check_finite
from dualflow.errors import DivergenceError
from dualflow.gaussian import Gaussian
from dualflow.nn.methods import (
    Likelihood,
    apply,
)
from dualflow.train.scan import make_scan_fit

from . import uci as _uci

__all__ = [
    "SPACE",
    "Candidate",
    "candidates",
    "heteroscedastic_bp_log_likelihood",
    "run_search_group",
    "search_methods",
    "search_seeds_of",
    "search_spec",
    "select",
    "select_group",
]

# The declared grid; a dimension enters a method's space where it applies.
SPACE: dict[str, tuple] = {
    "lr": (3e-3, 1e-2, 3e-2),
    "init_var": (1e-4, 1e-3, 1e-2),
    "prior_var": (1.0, "empirical_bayes"),
    "noise": ("homoscedastic", "heteroscedastic"),
    "dropout_rate": (0.005, 0.05),
}
# (config section, field, grid) of the step of methods not trained by Adam
OWN_STEP = {
    "von": ("von", "lr", (0.01, 0.03, 0.1)),
    "natural_gradient": ("ng", "rho", (1e-3, 3e-3, 1e-2)),
}
# methods whose noise model is part of their definition
FIXED_NOISE = {"bp": "homoscedastic", "bp_het": "heteroscedastic"}
EXTRA_METHODS = ("bp_het",)  # methods the search adds to UCI_METHODS
GH_ORDER = 32  # Gauss-Hermite nodes of the heteroscedastic bp predictive
SMOOTH = 3  # validation points averaged (trailing) before the argmax
# ``hook(program, *args) -> outputs`` replaces each call of a compiled program
# when set (used to time compilation and running separately)
_PROGRAM_HOOK = None


def search_methods() -> tuple[str, ...]:
    """:data:`~dualflow.benchmarks.uci.UCI_METHODS` (read now) plus ``bp_het``."""
    return (*_uci.UCI_METHODS, *(m for m in EXTRA_METHODS if m not in _uci.UCI_METHODS))


class _Overlay:
    """``cfg`` with some fields replaced (attribute and item access)."""

    def __init__(self, base: Any, **over: Any):
        self._base, self._over = base, over

    def __getattr__(self, k: str) -> Any:
        over = self.__dict__["_over"]
        return over[k] if k in over else getattr(self.__dict__["_base"], k)

    def __getitem__(self, k: str) -> Any:
        return self.__getattr__(k)


def search_spec(name: str, cfg: Any) -> _uci.MethodSpec:
    """:func:`~dualflow.benchmarks.uci.method_spec`, plus ``bp_het``."""
    if name == "bp_het":
        return dataclasses.replace(_uci.method_spec("bp", cfg), name="bp_het")
    return _uci.method_spec(name, cfg)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space (``None``: the dimension does not apply)."""

    lr: float
    noise: str
    init_var: float | None = None
    prior_var: float | str | None = None
    dropout_rate: float | None = None

    @property
    def structure(self) -> tuple:
        """The fields that change the compiled program (not traceable)."""
        return (self.noise, self.prior_var, self.dropout_rate)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def overlay(self, cfg: Any, **traced: Any) -> _Overlay:
        """``cfg`` with this candidate's structural fields (and ``traced``)."""
        over: dict[str, Any] = {"heteroscedastic": self.noise == "heteroscedastic"}
        if self.prior_var is not None:
            over["prior_var"] = self.prior_var
        if self.dropout_rate is not None:
            over["dropout_rate"] = self.dropout_rate
        return _Overlay(cfg, **over, **traced)


def _space(name: str, cfg: Any) -> dict[str, tuple]:
    """The dimensions of :data:`SPACE` that apply to method ``name``."""
    spec = search_spec(name, cfg)
    own = _own_step(spec)
    dims: dict[str, tuple] = {"lr": own[2] if own else SPACE["lr"]}
    dims["noise"] = (FIXED_NOISE[name],) if name in FIXED_NOISE else SPACE["noise"]
    if spec.method.is_variational:
        dims["init_var"] = SPACE["init_var"]
        dims["prior_var"] = SPACE["prior_var"]
    if spec.method.name == "mc_dropout":
        dims["dropout_rate"] = SPACE["dropout_rate"]
    return dims


def _own_step(spec: _uci.MethodSpec) -> tuple | None:
    """The :data:`OWN_STEP` entry of a method trained by its own step rule."""
    for flag, entry in OWN_STEP.items():
        if getattr(spec, flag, False):
            return entry
    return None


def _with_step(spec: _uci.MethodSpec, cfg: Any, step: Any) -> _Overlay:
    """``cfg`` whose method step (Adam's ``lr``, or the :data:`OWN_STEP`
    field) is ``step``."""
    own = _own_step(spec)
    if own is None:
        return _Overlay(cfg, lr=step)
    section, field, _ = own
    return _Overlay(cfg, **{section: _Overlay(cfg[section], **{field: step})})


def candidates(name: str, cfg: Any, budget: int, seed: int = 0) -> list[Candidate]:
    """``budget`` distinct candidates of method ``name``: the config's setting
    first, then the method's grid in a random order fixed by ``seed`` and
    ``name`` (the same for every data set and split)."""
    dims = _space(name, cfg)
    own = _own_step(search_spec(name, cfg))
    default = {
        "lr": float(cfg[own[0]][own[1]] if own else cfg.lr),
        "noise": FIXED_NOISE.get(
            name, "heteroscedastic" if cfg.heteroscedastic else "homoscedastic"
        ),
        "init_var": float(cfg.init_var),
        "prior_var": cfg.prior_var,
        "dropout_rate": float(cfg.dropout_rate),
    }
    first = Candidate(**{k: default[k] for k in dims})
    grid = [
        Candidate(**dict(zip(dims, v, strict=True)))
        for v in itertools.product(*dims.values())
    ]
    random.Random(f"{seed}/{name}").shuffle(grid)
    out = [first] + [c for c in grid if c != first]
    if len(out) < budget:
        raise ValueError(
            f"{name}: the search space has {len(out)} points, fewer than the"
            f" budget {budget}; lower config.search_budget or widen SPACE."
        )
    return out[:budget]


def select(val_ll: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (candidate, evaluation point) per split of ``val_ll [C, S, E]``.

    Non-finite values never win; a candidate whose curve on a split has any
    non-finite point loses to every candidate whose curve has none; each point
    is scored by the trailing mean of :data:`SMOOTH` points (``best_ll`` is
    that mean).  Returns ``(candidate [S], point [S],
    best_ll [S])``; ``best_ll`` is ``-inf`` where every value is non-finite.
    """
    v = np.where(np.isfinite(val_ll), val_ll, -np.inf)
    # a candidate whose curve went non-finite on a split is unstable there: it
    # loses to every stable one (its early best point may sit just before a
    # blow-up that the retraining, on 25 % more steps per epoch, runs into)
    stable = np.isfinite(val_ll).all(axis=2)  # [C, S]
    some = stable.any(axis=0)  # [S]
    v = np.where((stable | ~some[None, :])[:, :, None], v, -np.inf)
    v = _trailing_mean(v, SMOOTH)
    c, s, e = v.shape
    flat = v.transpose(1, 0, 2).reshape(s, c * e)
    idx = flat.argmax(axis=1)
    return idx // e, idx % e, flat[np.arange(s), idx]


def _trailing_mean(v: np.ndarray, width: int) -> np.ndarray:
    """Mean over the last ``width`` evaluation points (fewer at the start):
    a point is judged with its neighbours, so the argmax over ~50 points x
    candidates does not pick one lucky noisy evaluation.  ``-inf`` stays."""
    if width <= 1:
        return v
    out = np.empty_like(v)
    for j in range(v.shape[-1]):
        out[..., j] = v[..., max(0, j - width + 1) : j + 1].mean(axis=-1)
    return out


def heteroscedastic_bp_log_likelihood(
    out: Gaussian, y: jax.Array, order: int = GH_ORDER, min_var: float = 0.0
) -> jax.Array:
    """Log predictive density ``[N]`` of a heteroscedastic bp output.

    ``out [N, 2d]`` holds beliefs over the means and the log noise variances
    ``z``; the predictive of ``y`` is ``E_z N(y; m, P + exp z)`` with
    ``z ~ N(m_z, P_z)`` (a Gaussian scale mixture; ``min_var`` is the noise
    floor of :class:`~dualflow.nn.methods.Likelihood`), integrated by
    ``order``-point Gauss-Hermite quadrature per output dim, then summed over
    the dims (independent beliefs).
    """
    d = out.shape[-1] // 2
    m, p = out.mean[..., :d], out.var[..., :d]
    mz, pz = out.mean[..., d:], out.var[..., d:]
    t, w = np.polynomial.hermite_e.hermegauss(order)
    logw = jnp.asarray(np.log(w / math.sqrt(2 * math.pi)), m.dtype)
    t = jnp.asarray(t, m.dtype).reshape(-1, *([1] * m.ndim))
    var = p[None] + min_var + jnp.exp(mz[None] + jnp.sqrt(pz)[None] * t)
    y = y.reshape(m.shape)
    lp = -0.5 * (jnp.log(2 * math.pi * var) + (y - m) ** 2 / var)
    logw = logw.reshape(-1, *([1] * m.ndim))
    ll = jax.nn.logsumexp(lp + logw, axis=0)  # per output dim (independent z)
    return ll.reshape(ll.shape[0], -1).sum(-1)


def _eval_fn(spec: _uci.MethodSpec, lik: Likelihood, num_samples: int, se: bool):
    """``ev(model, (x, y), key) -> {"ll"[, "se"]}`` in standardised units:
    :func:`dualflow.benchmarks.uci._eval_fn` (closed form for bp, no samples;
    ``num_samples`` passes otherwise), except heteroscedastic bp, whose
    predictive is the quadrature mixture of
    :func:`heteroscedastic_bp_log_likelihood`."""
    bp_het = spec.method.layer_method == "bp" and lik.kind == "heteroscedastic"
    plain = _uci._eval_fn(spec, lik, num_samples)

    def ev(model, data, key):
        if bp_het:
            x, y = data
            out = apply(model, x, spec.method)
            mean = out.mean[..., : out.shape[-1] // 2]
            metrics = {
                "ll": heteroscedastic_bp_log_likelihood(
                    out, y, min_var=lik.min_noise_var
                ).mean(),
                "se": ((mean - y.reshape(mean.shape)) ** 2).mean(),
            }
        else:
            metrics = plain(model, data, key)
        return metrics if se else {"ll": metrics["ll"]}  # jit drops unused work

    return ev


def _freeze_after(steps: jax.Array) -> optax.GradientTransformation:
    """Zero every update from step ``steps`` on (the parameters stay at the
    snapshot after ``steps`` steps)."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        keep = count < steps
        # where, not a product: a non-finite update after the snapshot must not
        # reach it (NaN * 0 is NaN)
        frozen = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
        return frozen, count + 1

    return optax.GradientTransformation(init, update)


def _scale_logvar(params, log_ratio: jax.Array):
    """Add ``log_ratio`` to every ``*_logvar`` leaf (a traced ``init_var``)."""

    def f(path, leaf):
        names = [str(getattr(k, "key", "")) for k in path]
        hit = any(n.endswith("_logvar") for n in names)
        return leaf + log_ratio.astype(leaf.dtype) if hit else leaf

    return jax.tree_util.tree_map_with_path(f, params)


def _group_key(cfg: Any, dataset: str, method: str) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(cfg.seed), _uci._stable_hash(dataset))
    return jax.random.fold_in(key, _uci._stable_hash(method))


def search_seeds_of(cfg: Any) -> int:
    """``config.search_seeds``, checked (absent in older configs: 1).

    Raises:
      ValueError: not an integer >= 1.
    """
    reps = _uci._field(cfg, "search_seeds", 1)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"config.search_seeds must be an integer >= 1, got {reps!r}.")
    return reps


def _run_key(key: jax.Array, split: int, cand: int, rep: int) -> jax.Array:
    """The training key of one search run; repetition 0 is the key protocol 3
    used (so ``search_seeds=1`` reproduces its records)."""
    k = jax.random.fold_in(jax.random.fold_in(key, split), cand)
    return k if rep == 0 else jax.random.fold_in(k, 1_000_003 + rep)


def _by_structure(cands: Sequence[Candidate], idx: Sequence[int]) -> dict:
    """``{structure: [positions in idx]}`` for the candidates ``cands[idx]``."""
    out: dict[tuple, list[int]] = {}
    for p, c in enumerate(idx):
        out.setdefault(cands[c].structure, []).append(p)
    return out


def _run_structure(
    name: str,
    rep: Candidate,
    cfg: Any,
    n_hidden: int,
    stacked: tuple,
    runs: Mapping[str, jax.Array],
    *,
    epochs: int,
    eval_every: int,
    num_samples: int,
    final: bool,
    chunk: int = 0,
) -> dict[str, np.ndarray]:
    """Train ``len(runs["pos"])`` models of one structure with one program.

    The runs go through one compiled, vmapped program ``chunk`` at a time (the
    last chunk padded by repeating a run; ``0``: all at once), so the
    structure compiles once whatever the chunk size.

    ``runs`` holds per-run ``pos`` (row of ``stacked``), ``lr``, ``init_var``,
    ``cutoff`` (steps before the snapshot; final only) and ``key``.  Search:
    returns the validation history ``{"ll" [B, E]}``.  Final: the test metrics
    ``{"ll", "se" [B]}`` of the snapshot, evaluated once.
    """
    n_train, d_in = stacked[0].shape[1:]
    ocfg = rep.overlay(cfg)
    spec = search_spec(name, ocfg)
    lik = _uci._likelihood(ocfg)
    factory = _uci._factory(spec, ocfg, d_in, n_hidden)
    graphdef, _, _ = nnx.split(factory(jax.random.key(0)), nnx.Param, ...)
    ev = _eval_fn(spec, lik, num_samples, se=final)
    base_iv = float(cfg.init_var)

    def one(data, pos, lr, init_var, cutoff, key):
        x, y, xe, ye = (a[pos] for a in data)
        tx = _uci._optimizer(spec, _with_step(spec, rep.overlay(cfg), lr), n_train)
        if final:
            tx = optax.chain(tx, _freeze_after(cutoff))
        run = make_scan_fit(
            graphdef,
            tx,
            method=spec.method,
            likelihood=lik,
            n_data=n_train,
            batch_size=min(cfg.batch_size, n_train),
            epochs=epochs,
            kl_weight=cfg.kl_weight,
            eval_fn=None if final else ev,
            eval_every=eval_every,
        )
        k_init, k_run, k_eval = jax.random.split(key, 3)
        _, params, rest = nnx.split(factory(k_init), nnx.Param, ...)
        if rep.init_var is not None:
            params = _scale_logvar(params, jnp.log(init_var / base_iv))
        params, rest, hist = run(params, rest, x, y, k_run, (xe, ye))
        if final:
            out = ev(nnx.merge(graphdef, params, rest), (xe, ye), k_eval)
            # divergence is judged on the parameters, never on test rows
            leaves = jax.tree.leaves(params)
            out["finite"] = jnp.all(jnp.stack([jnp.isfinite(a).all() for a in leaves]))
            return out
        return {"ll": hist["ll"]}

    program = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0)))
    call = program if _PROGRAM_HOOK is None else partial(_PROGRAM_HOOK, program)
    names = ("pos", "lr", "init_var", "cutoff", "key")
    b = len(runs["pos"])
    size = b if chunk <= 0 else min(chunk, b)
    outs = []
    for start in range(0, b, size):
        idx = np.minimum(np.arange(start, start + size), b - 1)  # pad: repeat
        out = call(stacked, *(runs[k][idx] for k in names))
        outs.append(jax.tree.map(np.asarray, out))
    return jax.tree.map(lambda *a: np.concatenate(a)[:b], *outs)


def _runs(cands, cidx, pos, keys, cutoff=None) -> dict[str, jax.Array]:
    return {
        "pos": jnp.asarray(pos, jnp.int32),
        "lr": jnp.asarray([cands[c].lr for c in cidx], jnp.float32),
        "init_var": jnp.asarray([cands[c].init_var or 1.0 for c in cidx], jnp.float32),
        "cutoff": jnp.asarray(
            np.zeros(len(pos)) if cutoff is None else cutoff, jnp.int32
        ),
        "key": jnp.stack(keys),
    }


def select_group(
    data: UCIData,
    name: str,
    split_ids: Sequence[int],
    cfg: Any,
    cands: Sequence[Candidate] | None = None,
) -> dict[str, Any]:
    """Phase 1: search on inner validation splits of the training rows only.

    ``cands`` default to :func:`candidates` of ``name`` (``config.search_budget``).
    Returns ``candidates``, per split ``candidate``, ``epochs`` and ``val_ll``
    (standardised units), and ``epoch_budget``.

    Raises:
      DivergenceError: every candidate diverged on some split (``.splits``).
    """
    inner = [
        uci_split(data, k, validation_fraction=cfg.validation_fraction, seed=cfg.seed)
        for k in split_ids
    ]
    for k in split_ids:  # the training rows only: test rows are never read
        check_finite(data.x[data.train_index[k]], data.name, "UCIData.x", "input")
        check_finite(data.y[data.train_index[k]], data.name, "UCIData.y", "target")
    budget = _uci._epoch_budget(cfg, data, inner[0].x_train.shape[0])
    every = max(1, math.ceil(budget / cfg.eval_points))
    budget = every * math.ceil(budget / every)
    if cands is None:
        cands = candidates(name, cfg, cfg.search_budget, cfg.search_seed)
    stacked = _uci._stack_splits(inner)
    key = jax.random.fold_in(_group_key(cfg, data.name, name), 0)
    s, reps = len(split_ids), search_seeds_of(cfg)
    val = np.full((len(cands), s, reps, budget // every), -np.inf)
    for cpos in _by_structure(cands, range(len(cands))).values():
        cidx = np.repeat(cpos, s * reps)
        pos = np.tile(np.repeat(np.arange(s), reps), len(cpos))
        rep = np.tile(np.arange(reps), s * len(cpos))
        keys = [
            _run_key(key, split_ids[p], c, r)
            for c, p, r in zip(cidx, pos, rep, strict=True)
        ]
        hist = _run_structure(
            name, cands[cpos[0]], cfg, data.n_hidden, stacked,
            _runs(cands, cidx, pos, keys),
            epochs=budget, eval_every=every, num_samples=cfg.val_samples, final=False,
            chunk=cfg.search_chunk * s * reps,
        )  # fmt: skip
        val[cpos] = hist["ll"].reshape(len(cpos), s, reps, -1)
    # a candidate's curve is the mean over its independent trainings (any
    # non-finite one makes the point non-finite: the candidate is unstable)
    val = val.mean(axis=2)  # one training: its curve, bit for bit
    best_c, best_e, best_ll = select(val)
    if not np.all(np.isfinite(best_ll)):
        bad = [k for k, v in zip(split_ids, best_ll, strict=True) if not np.isfinite(v)]
        err = DivergenceError(
            f"{data.name}/{name}: every candidate diverged (validation"
            f" log-likelihood not finite on splits {bad})",
            hint="narrow dualflow.benchmarks.uci_search.SPACE or lower config.lr",
        )
        err.splits = bad  # type: ignore[attr-defined]
        raise err
    return {
        "candidates": cands,
        "candidate": best_c,
        "epochs": (best_e + 1) * every,
        "val_ll": best_ll,
        "epoch_budget": budget,
        "n_finite": np.isfinite(val).any(axis=2).sum(axis=0),
        "val": val,
    }


def _final(
    data: UCIData, name: str, split_ids: Sequence[int], cfg: Any, sel: dict
) -> tuple[np.ndarray, np.ndarray, list]:
    """Phase 2: retrain each split's chosen candidate on all its training rows
    for its chosen epochs; evaluate the test rows once.  Returns test ``ll``,
    ``se`` ``[S]`` (standardised units) and the splits."""
    full = [uci_split(data, k) for k in split_ids]
    stacked = _uci._stack_splits(full)
    n_train = full[0].x_train.shape[0]
    steps = n_train // min(cfg.batch_size, n_train)
    cands, chosen = sel["candidates"], sel["candidate"]
    key = jax.random.fold_in(_group_key(cfg, data.name, name), 1)
    ll, se = np.full(len(split_ids), np.nan), np.full(len(split_ids), np.nan)
    finite = np.zeros(len(split_ids), bool)
    for pos in _by_structure(cands, chosen).values():
        pos = np.asarray(pos)
        epochs = sel["epochs"][pos]
        keys = [jax.random.fold_in(key, split_ids[p]) for p in pos]
        out = _run_structure(
            name, cands[chosen[pos[0]]], cfg, data.n_hidden, stacked,
            _runs(cands, chosen[pos], pos, keys, cutoff=epochs * steps),
            epochs=int(epochs.max()), eval_every=1, num_samples=cfg.test_samples,
            final=True,
        )  # fmt: skip
        ll[pos], se[pos], finite[pos] = out["ll"], out["se"], out["finite"]
    return ll, se, finite, full


def _final_with_fallback(
    data: UCIData,
    name: str,
    split_ids: Sequence[int],
    cfg: Any,
    sel: dict,
    tries: int = 2,
) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """:func:`_final`; a split whose retrained parameters went non-finite is
    retrained with its next-best validation (candidate, epoch), up to
    ``tries`` times (``sel`` is updated).  Returns ``ll, se, full`` and the
    number of fallbacks per split."""  # fmt: skip
    ll, se, finite, full = _final(data, name, split_ids, cfg, sel)
    fallbacks = np.zeros(len(split_ids), int)
    val = sel["val"].copy()
    every = sel["epoch_budget"] // val.shape[2]
    for _ in range(tries):
        bad = np.flatnonzero(~finite)
        if not bad.size:
            break
        for i in bad:
            val[sel["candidate"][i], i, :] = -np.inf
        c, e, best = select(val[:, bad])
        ok = np.isfinite(best)
        bad, c, e, best = bad[ok], c[ok], e[ok], best[ok]
        if not bad.size:
            break
        sel["candidate"][bad], sel["epochs"][bad], sel["val_ll"][bad] = (
            c,
            (e + 1) * every,
            best,
        )
        fallbacks[bad] += 1
        sub = {**sel, "candidate": c, "epochs": sel["epochs"][bad]}
        sll, sse, sfin, _ = _final(data, name, [split_ids[i] for i in bad], cfg, sub)
        ll[bad], se[bad], finite[bad] = sll, sse, sfin
    return ll, se, full, fallbacks


def run_search_group(
    data: UCIData,
    name: str,
    split_ids: Sequence[int],
    cfg: Any,
    log=print,
    cands: Sequence[Candidate] | None = None,
) -> list[dict]:
    """Search on validation data, retrain the chosen setting, test once.

    One record per split with ``dataset, method, split, status, rmse, test_ll``
    (original units), ``seconds`` (group wall time / splits), ``chosen`` (the
    selected hyper-parameters and ``epochs``), ``candidate`` (its index),
    ``search_budget``, ``candidates_finite``, ``epochs``, ``epoch_budget``,
    ``val_ll`` (standardised), ``n_train``, ``n_test``, ``data_fingerprint``.

    Raises:
      DataError: the split's rows hold non-finite values.
      DivergenceError: every candidate diverged on a split (``.splits``).
    """
    split_ids = [int(k) for k in split_ids]
    if not split_ids:
        return []
    for k in split_ids:  # before the search: the final phase reads the test rows
        rows = np.concatenate([data.train_index[k], data.test_index[k]])
        check_finite(data.x[rows], data.name, "UCIData.x", "input")
        check_finite(data.y[rows], data.name, "UCIData.y", "target")
    t0 = time.time()
    sel = select_group(data, name, split_ids, cfg, cands)
    ll, se, full, fallbacks = _final_with_fallback(data, name, split_ids, cfg, sel)
    seconds = (time.time() - t0) / len(split_ids)
    records = []
    for i, k in enumerate(split_ids):
        sp = full[i]
        cand = sel["candidates"][sel["candidate"][i]]
        test_ll = float(ll[i]) - math.log(sp.y_std)
        rmse = math.sqrt(se[i]) * sp.y_std if se[i] >= 0 else float("nan")
        ok = math.isfinite(test_ll) and math.isfinite(rmse)
        epochs = int(sel["epochs"][i])
        records.append(
            {
                "dataset": data.name,
                "method": name,
                "split": k,
                "status": "ok" if ok else "diverged",
                "rmse": rmse,
                "test_ll": test_ll,
                "seconds": seconds,
                "chosen": {**cand.as_dict(), "epochs": epochs},
                "candidate": int(sel["candidate"][i]),
                "search_budget": len(sel["candidates"]),
                "candidates_finite": int(sel["n_finite"][i]),
                "epochs": epochs,
                "epoch_budget": int(sel["epoch_budget"]),
                "val_ll": float(sel["val_ll"][i]),
                # retrainings that went non-finite before this one (each time
                # the next-best validation setting was taken)
                "fallbacks": int(fallbacks[i]),
                "n_train": int(sp.x_train.shape[0]),
                "n_test": int(sp.x_test.shape[0]),
                "data_fingerprint": data.fingerprint(k),
            }
        )
        if not ok:
            records[-1]["error"] = "test metrics not finite"
    picks = np.bincount(sel["candidate"], minlength=len(sel["candidates"]))
    log(
        f"{data.name:9s} {name:13s} splits={len(split_ids):2d}"
        f" picks={picks.tolist()} epochs~{int(np.median(sel['epochs']))}"
        f"/{sel['epoch_budget']}"
        f" rmse={np.mean([r['rmse'] for r in records]):.3f}"
        f" ll={np.mean([r['test_ll'] for r in records]):.3f}"
        f" ({seconds * len(split_ids):.1f} s)"
    )
    return records
