"""One-call device benchmark: the Table-1 rows of WRN-28-10 / CIFAR-100.

``python scripts/bench_device.py`` runs, on whatever devices JAX sees, the
train step of ``scripts/train.py --config=configs/cifar100_wrn.py:<row>``
(:func:`dualflow.train.trainer.build_train_step`: the same model, loss,
optimiser, schedule, KL annealing, donation and data-parallel mesh) on
CIFAR-100-shaped synthetic batches (32x32x3 float32 images, mixup-style soft
labels over 100 classes, as the config's augmentation produces) for each row
and records

* images/s and seconds per step (steady state: compilation and the first
  steps excluded), and the step-time ratio to ``vanilla``;
* compile seconds (lowering + XLA compilation of the step);
* peak memory: the device's ``peak_bytes_in_use`` where JAX reports it (a
  process-wide high-water mark, so a row's figure includes earlier rows'
  peaks when they were higher), else the host process's peak RSS, labelled;
  and XLA's own estimate for the compiled step (arguments + outputs +
  temporaries - aliased), which is per row;
* whether every step stayed finite (the summed loss and gradient norm over
  all steps, and every parameter and optimiser leaf at the end).

The run is bounded by ``max_seconds`` (default 8 minutes): each row gets an
equal share of the time left and stops early (recording how many steps it
ran) when its share is spent.  On CPU the defaults shrink to a tiny WRN
(depth 10, width 1, batch 8, a few steps) so that CI exercises it.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualflow.errors import ConfigError
from dualflow.moments.linear import precision_context

__all__ = [
    "ROWS",
    "BenchSettings",
    "default_settings",
    "device_kind",
    "markdown_table",
    "run_device_benchmark",
]

#: Table-1 rows benchmarked: short name -> ``METHOD_ROWS`` key.
ROWS: dict[str, str] = {
    "vanilla": "vanilla",
    "reparam": "reparam",
    "bp_nf": "bp_nf",
    "bp_nf_ng": "bp_nf_ng",
    "ensemble": "reparam_nf_ng_ensemble",
}

_CONFIG = "configs/cifar100_wrn.py"
_N_TRAIN = 50_000  # CIFAR-100's training set: the KL's 1/N
_NUM_CLASSES = 100
_IMAGE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to run: WRN-``depth``-``width`` at global ``batch`` for ``steps``
    timed steps (after ``warmup`` untimed ones) per row, all rows within
    ``max_seconds``."""

    width: int
    depth: int
    batch: int
    steps: int
    rows: tuple[str, ...] = tuple(ROWS)
    warmup: int = 2
    max_seconds: float = 480.0

    def check(self, num_devices: int) -> None:
        """Raise :class:`ConfigError` for settings that cannot run."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ConfigError(
                f"--depth: a WRN depth is 6n+4 with n >= 1 (10, 16, 22, 28, ...),"
                f" got {self.depth}"
            )
        for name in ("width", "batch", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or not self.max_seconds > 0:
            raise ConfigError("--max_seconds must be > 0 (and warm-up steps >= 0)")
        if self.batch % num_devices:
            raise ConfigError(
                f"--batch={self.batch} is not divisible by the {num_devices}"
                " devices of the data-parallel mesh"
            )
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise ConfigError(
                f"--rows: unknown {', '.join(map(repr, bad)) or 'empty list'};"
                f" choose from {', '.join(ROWS)}"
            )


def default_settings(backend: str | None = None) -> BenchSettings:
    """The full benchmark on an accelerator; a tiny WRN on CPU (for CI)."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return BenchSettings(width=1, depth=10, batch=8, steps=4, warmup=1)
    return BenchSettings(width=10, depth=28, batch=128, steps=200)


def device_kind() -> str:
    """File-name-safe kind of the first device (``cpu``, ``nvidia-h100-80gb-hbm3``)."""
    kind = str(jax.devices()[0].device_kind).strip().lower()
    return re.sub(r"[^a-z0-9._-]+", "-", kind).strip("-") or jax.default_backend()


# --------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------
def row_config(row: str, settings: BenchSettings, repo: str):
    """``configs/cifar100_wrn.py:<row>`` at the benchmark's batch size."""
    from dualflow.train.config import load_config_file

    cfg = load_config_file(os.path.join(repo, _CONFIG), ROWS[row])
    cfg.train.batch_size = settings.batch
    return cfg


def synthetic_batches(mesh, batch: int, count: int = 2, seed: int = 0) -> list[tuple]:
    """``count`` CIFAR-100-shaped batches on the mesh (images standardised
    normal, soft labels mixing two classes like mixup/CutMix)."""
    rng = np.random.default_rng(seed)
    sharding = NamedSharding(mesh, P("data"))
    out = []
    for _ in range(count):
        x = rng.standard_normal((batch, *_IMAGE), dtype=np.float32)
        a, b = rng.integers(0, _NUM_CLASSES, (2, batch))
        lam = rng.uniform(0.0, 1.0, batch).astype(np.float32)
        y = np.zeros((batch, _NUM_CLASSES), np.float32)
        y[np.arange(batch), a] += lam
        y[np.arange(batch), b] += 1.0 - lam
        out.append((jax.device_put(x, sharding), jax.device_put(y, sharding)))
    return out


def _xla_bytes(compiled) -> int | None:
    """XLA's memory estimate of a compiled step (None where unavailable)."""
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        return int(total)
    except Exception:  # noqa: BLE001  (backends without the analysis)
        return None


def peak_memory() -> tuple[int | None, str]:
    """(bytes, source): the devices' summed ``peak_bytes_in_use`` or, where
    JAX reports none (CPU), the host process's peak RSS."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001  (not implemented on this backend)
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return sum(peaks), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux: KiB
    return int(rss * scale), "host process peak RSS (no device memory stats)"


def _finite(state) -> bool:
    """The run stayed finite: the metric sums over every step (a NaN or inf in
    any step's loss or gradient norm stays in the sum) and every float leaf."""
    from dualflow.train.trainer import _all_finite

    sums = jax.device_get(state.metric_sums)
    return bool(
        math.isfinite(float(sums["loss"]))
        and math.isfinite(float(sums["grad_norm"]))
        and bool(jax.jit(_all_finite)(state))
    )


def _build_row(row: str, settings: BenchSettings, mesh, repo: str):
    """(config, state, jitted step) of ``row`` as the trainer builds them."""
    from dualflow.nn.methods import Likelihood
    from dualflow.train import trainer as T

    cfg = row_config(row, settings, repo)
    method = T.method_from_config(cfg)
    # the registry's generic WRN at the benchmark's size (stacked members for
    # an ensemble row), built exactly as the trainer builds its model
    cfg.model.name = "wrn"
    cfg.model.kwargs.depth, cfg.model.kwargs.width = settings.depth, settings.width
    model = T.make_model(cfg, "cifar100", method)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    total = int(cfg.train.num_epochs) * (_N_TRAIN // int(cfg.train.batch_size))
    schedule = T.make_schedule(cfg, total)
    tx = T.make_optimizer(cfg, schedule)
    replicated = NamedSharding(mesh, P())
    state = T.init_train_state(params, rest, tx, replicated)
    step = T.build_train_step(
        cfg,
        graphdef,
        tx,
        schedule,
        method=method,
        likelihood=Likelihood(head=cfg.likelihood.head),
        n_data=_N_TRAIN,
        sharding=replicated,
    )
    return cfg, state, step


def _timed_steps(run: Callable, state, batches, steps: int, deadline: float):
    """Run up to ``steps`` steps in chunks of 10 (one device sync per chunk)
    until ``deadline`` (the first chunk always runs); return (state, steps
    run, seconds)."""
    done, seconds = 0, 0.0
    chunk = max(1, min(10, steps))
    while done < steps and (done == 0 or time.perf_counter() < deadline):
        n = min(chunk, steps - done)
        t0 = time.perf_counter()
        for i in range(n):
            x, y = batches[(done + i) % len(batches)]
            state = run(state, x, y)
        jax.block_until_ready(state)
        seconds += time.perf_counter() - t0
        done += n
    return state, done, seconds


def measure_row(row: str, settings: BenchSettings, mesh, repo: str, budget: float):
    """One row's record (see the module docstring); ``budget`` seconds."""
    deadline = time.perf_counter() + budget
    cfg, state, step = _build_row(row, settings, mesh, repo)
    batches = synthetic_batches(mesh, settings.batch, seed=int(cfg.seed))
    with precision_context(cfg.get("precision", "")):
        t0 = time.perf_counter()
        compiled = step.lower(state, *batches[0]).compile()
        compile_s = time.perf_counter() - t0
        for i in range(settings.warmup):
            state = compiled(state, *batches[i % len(batches)])
        jax.block_until_ready(state)
        state, ran, seconds = _timed_steps(
            compiled, state, batches, settings.steps, deadline
        )
    per_step = seconds / ran if ran else None
    peak, source = peak_memory()
    return {
        "row": row,
        "config": f"{_CONFIG}:{ROWS[row]}",
        "method": cfg.method.name,
        "member": cfg.method.member if cfg.method.name == "ensemble" else None,
        "norm": cfg.model.norm,
        "natural_gradient": bool(cfg.optimizer.natural_gradient),
        "compile_seconds": compile_s,
        "steps_requested": settings.steps,
        "steps_run": ran + settings.warmup,
        "timed_steps": ran,
        "seconds_per_step": per_step,
        "images_per_sec": settings.batch / per_step if per_step else None,
        "finite": _finite(state),
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "xla_step_bytes": _xla_bytes(compiled),
        "error": None,
    }


def _failed_row(row: str, err: BaseException) -> dict:
    text = " ".join(str(err).split())[:300]
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return {
        "row": row,
        "config": f"{_CONFIG}:{ROWS[row]}",
        "error": ("out of memory: " if oom else f"{type(err).__name__}: ") + text,
        "finite": None,
        "seconds_per_step": None,
        "images_per_sec": None,
    }


# --------------------------------------------------------------------------
# all rows
# --------------------------------------------------------------------------
def run_device_benchmark(
    settings: BenchSettings, repo: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every row of ``settings`` in turn on all devices; the JSON record."""
    from dualflow.io import git_commit
    from dualflow.train.trainer import make_mesh

    mesh = make_mesh(0)
    settings.check(mesh.size)
    t_start = time.perf_counter()
    rows = []
    for i, row in enumerate(settings.rows):
        left = settings.max_seconds - (time.perf_counter() - t_start)
        budget = max(left / (len(settings.rows) - i), 1.0)
        log(f"bench_device: {row} (budget {budget:.0f} s)")
        try:
            rec = measure_row(row, settings, mesh, repo, budget)
        except Exception as err:  # noqa: BLE001  (e.g. OOM: record, go on)
            if isinstance(err, ConfigError | KeyboardInterrupt):
                raise
            rec = _failed_row(row, err)
        rows.append(rec)
        gc.collect()  # free the row's state before the next one
    _add_ratios(rows)
    d = jax.devices()[0]
    return {
        "device": {
            "platform": d.platform,
            "kind": str(d.device_kind),
            "count": mesh.size,
            "hosts": jax.process_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
        "settings": dataclasses.asdict(settings),
        "model": f"WRN-{settings.depth}-{settings.width}",
        "data": "synthetic CIFAR-100 shape (32x32x3, 100 classes, soft labels)",
        "wall_seconds": time.perf_counter() - t_start,
        "commit": git_commit(repo),
        "rows": rows,
    }


def _add_ratios(rows: Sequence[dict]) -> None:
    base = next((r["seconds_per_step"] for r in rows if r["row"] == "vanilla"), None)
    for r in rows:
        s = r.get("seconds_per_step")
        r["ratio_to_vanilla"] = s / base if (s and base) else None


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def markdown_table(result: dict) -> str:
    """The record as a note line and a markdown table."""
    d, s = result["device"], result["settings"]
    src = next(
        (r.get("peak_memory_source") for r in result["rows"] if r.get("error") is None),
        "",
    )
    mem_head = "device peak GiB" if src.startswith("device") else "host RSS peak GiB"
    head = (
        f"{result['model']}, batch {s['batch']}, {d['count']} x {d['kind']}"
        f" ({d['platform']}), jax {d['jax']}; commit {result['commit']}\n\n"
        f"| row | images/s | s/step | x vanilla | compile s | {mem_head} |"
        " XLA step GiB | finite (steps) |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['row']} | {r['error']} | | | | | | |\n")
            continue
        gib = 1 << 30
        peak = r["peak_memory_bytes"] / gib if r["peak_memory_bytes"] else None
        xla = r["xla_step_bytes"] / gib if r["xla_step_bytes"] else None
        lines.append(
            f"| {r['row']} | {_fmt(r['images_per_sec'], '.1f')} |"
            f" {_fmt(r['seconds_per_step'], '.4f')} |"
            f" {_fmt(r['ratio_to_vanilla'], '.2f')} | {r['compile_seconds']:.1f} |"
            f" {_fmt(peak, '.2f')} | {_fmt(xla, '.2f')} |"
            f" {'yes' if r['finite'] else 'NO'} ({r['steps_run']}) |\n"
        )
    return head + "".join(lines)
