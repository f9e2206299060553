"""The training entry point: every method end to end, resume, configs, sharding."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualflow.nn.context import METHODS
from dualflow.optim import mean_variance_labels
from dualflow.train.config import (
    METHOD_ROWS,
    ConfigError,
    base_config,
    load_config_file,
    validate_config,
)
from dualflow.train.trainer import (
    kl_weight_at,
    make_optimizer,
    make_schedule,
    train_and_evaluate,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(method: str = "bp", **over):
    """An MLP on 256 scikit-learn digits (8x8, real data), a few dozen steps."""
    c = base_config()
    c.dataset = "sklearn_digits"
    c.data.normalize = "unit"
    c.data.max_train = 256
    c.data.max_test = 120
    c.model.name = "mlp"
    c.model.norm = "none"
    c.model.kwargs.widths = (32,)
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.method.name = method
    c.method.ensemble_size = 2
    c.loss.kl_weight = 0.01
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-2
    c.schedule.name = "constant"
    c.train.batch_size = 32  # 8 steps per epoch
    c.train.num_steps = 40
    c.train.log_every = 8
    c.train.eval_every = 20
    c.train.eval_batch_size = 40
    c.train.eval_samples = 4
    c.train.progress = False
    c.train.plot = False
    c.mesh.num_devices = 1
    for path, value in over.items():
        node = c
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def records(workdir, kind="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# --------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_end_to_end(method, tmp_path):
    summary = train_and_evaluate(tiny_config(method), tmp_path)
    train = records(tmp_path)
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in train] == [8, 16, 24, 32, 40]
    assert [r["step"] for r in evals] == [20, 40]
    # loss of the last 8 steps below that of the first 8 (NLL-dominated: beta 0.01)
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, [r["loss"] for r in train]
    assert train[-1]["nll"] < train[0]["nll"]
    # a real classifier after 40 steps on 10-class digits (chance: 0.1)
    assert summary["test_accuracy"] > 0.6, summary
    assert 0 <= summary["test_ece"] <= 1 and 0 <= summary["test_brier"] <= 2
    assert summary["test_nll"] == pytest.approx(evals[-1]["nll"])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["method"] == method and saved["steps"] == 40
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["config"]["method"]["name"] == method
    assert run["data"] == {
        "name": "sklearn_digits",
        "source": summary["data_source"],
        "n_train": 256,
        "fingerprint": summary["data_fingerprint"],
    }
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 7 and {json.loads(r)["kind"] for r in raw} == {"train", "eval"}
    assert summary["seconds_per_step"] > 0


def test_natural_gradient_recipe_end_to_end(tmp_path):
    """bp + natural gradient + SGD/Nesterov + clipping + warm-up/cosine + KL
    annealing + weight decay (the CIFAR recipe's pieces) on real nnx state."""
    cfg = tiny_config(
        "bp",
        optimizer__name="sgd",
        optimizer__natural_gradient=True,
        optimizer__lr=1000.0,  # ~ N x an SGD rate: the mean step is v * grad
        optimizer__grad_clip=50.0,
        optimizer__weight_decay=1e-4,
        schedule__name="cosine",
        schedule__warmup_steps=8,
        loss__kl_anneal_steps=16,
    )
    summary = train_and_evaluate(cfg, tmp_path)
    train = records(tmp_path)
    assert train[-1]["nll"] < train[0]["nll"] - 0.3, [r["nll"] for r in train]
    assert summary["test_accuracy"] > 0.6, summary
    # annealed beta: mean over steps 1..8 of 0.01 * s / 16, then 9..16
    np.testing.assert_allclose(train[0]["kl_weight"], 0.01 * 4.5 / 16, rtol=1e-5)
    np.testing.assert_allclose(train[1]["kl_weight"], 0.01 * 12.5 / 16, rtol=1e-5)
    np.testing.assert_allclose(train[2]["kl_weight"], 0.01, rtol=1e-6)
    # warm-up: lr of steps 0..7 is 1000 * s / 8 -> mean 1000 * 3.5 / 8
    np.testing.assert_allclose(train[0]["lr"], 1000 * 3.5 / 8, rtol=1e-5)


def test_weight_decay_mask_on_model_state():
    from flax import nnx

    from dualflow.train.trainer import _decay_mask, make_model, method_from_config

    cfg = tiny_config("bp")
    model = make_model(cfg, "sklearn_digits", method_from_config(cfg))
    params = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_leaves_with_path(_decay_mask(params))
    names = {jax.tree_util.keystr(k): v for k, v in flat}
    assert names and all(v == ("logvar" not in k) for k, v in names.items()), names
    assert any("logvar" in k for k in names) and any("mean" in k for k in names)


def test_plot_and_augmentation_path(tmp_path):
    """Crop, flip, RandAugment and mixup/CutMix (soft labels) through bp; PNG."""
    cfg = tiny_config(
        "bp",
        augment__crop_pad=1,
        augment__flip=True,
        augment__randaugment_ops=1,
        augment__mixup_alpha=0.4,
        augment__cutmix_alpha=1.0,
        train__plot=True,
        train__num_steps=16,
    )
    summary = train_and_evaluate(cfg, tmp_path)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert np.isfinite(summary["test_nll"])


# --------------------------------------------------------------------------
# kill and resume
# --------------------------------------------------------------------------
def _final_params(workdir) -> dict:
    import orbax.checkpoint as ocp

    ckpts = pathlib.Path(workdir) / "checkpoints"
    last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(ckpts / str(last) / "state")
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, last


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kill_at, workers", [(7, 0), (18, 2)])
def test_kill_and_resume_is_bitwise_identical(kill_at, workers, tmp_path):
    """Interrupt at step ``kill_at`` (no save at the kill, like SIGKILL),
    restart: same batches, keys, log records and final parameters as the
    uninterrupted run, bit for bit.  A sampling method with crop/flip/mixup
    exercises every random stream; log and checkpoint cadences differ, so the
    resumed run continues a half-filled log window.  The reference makes its
    batches in a thread; the interrupted run (and its resumption) with
    ``workers`` grain processes."""
    import shutil

    over = dict(
        train__num_steps=24,
        train__checkpoint_every=5,
        train__log_every=3,
        train__eval_every=12,
        augment__crop_pad=1,
        augment__flip=True,
        augment__mixup_alpha=0.4,
    )
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_summary = train_and_evaluate(tiny_config("reparam", **over), ref_dir)

    def on_step(step):
        if step == kill_at:
            raise Interrupt

    over_run = dict(over, data__workers=workers)
    with pytest.raises(Interrupt):
        train_and_evaluate(tiny_config("reparam", **over_run), run_dir, on_step=on_step)
    ckpts = run_dir / "checkpoints"
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved and saved[-1] == 5 * (kill_at // 5), saved
    # a complete-looking checkpoint under orbax's temporary name (a save that
    # was killed before its final rename) must not be resumed from
    shutil.copytree(ckpts / str(saved[-1]), ckpts / "23.orbax-checkpoint-tmp")
    summary = train_and_evaluate(tiny_config("reparam", **over_run), run_dir)

    ref, ref_step = _final_params(ref_dir)
    got, got_step = _final_params(run_dir)
    assert ref_step == got_step == 24
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

    def strip(recs):  # timing differs between runs; everything else must not
        return [
            {k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in recs
        ]

    for kind in ("train", "eval"):
        assert strip(records(run_dir, kind)) == strip(records(ref_dir, kind)), kind
    for k in ("test_accuracy", "test_nll", "test_ece", "test_brier", "steps"):
        assert summary[k] == ref_summary[k], k


def test_resuming_a_finished_run_only_evaluates(tmp_path):
    cfg = tiny_config("bp", train__num_steps=8)
    first = train_and_evaluate(cfg, tmp_path)
    again = train_and_evaluate(cfg, tmp_path)
    assert again["steps"] == 8 and again["test_nll"] == first["test_nll"]
    # the speed of the run that trained is kept (nothing was trained now)
    assert again["seconds_per_step"] == first["seconds_per_step"] > 0
    json.loads((tmp_path / "summary.json").read_text())  # valid JSON (no NaN)
    assert len(records(tmp_path)) == 1


def test_resume_refuses_a_different_config_or_data(tmp_path):
    train_and_evaluate(tiny_config("bp", train__num_steps=8), tmp_path)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        train_and_evaluate(
            tiny_config("bp", train__num_steps=8, optimizer__lr=0.5), tmp_path
        )
    with pytest.raises(ConfigError, match="n_train"):
        train_and_evaluate(
            tiny_config("bp", train__num_steps=8, data__max_train=128), tmp_path
        )


def test_fields_added_since_a_run_was_recorded_resume_at_their_default(tmp_path):
    """A workdir written before a config field existed (simulated by deleting
    the field and a whole section from its config.json) resumes while the
    field holds its default, and is refused when it does not."""
    import json

    train_and_evaluate(tiny_config("bp", train__num_steps=8), tmp_path)
    path = tmp_path / "config.json"
    info = json.loads(path.read_text())
    del info["config"]["optimizer"]["b2"]
    del info["config"]["augment"]
    path.write_text(json.dumps(info))
    summary = train_and_evaluate(tiny_config("bp", train__num_steps=8), tmp_path)
    assert summary["steps"] == 8
    with pytest.raises(ConfigError, match="optimizer.b2"):
        train_and_evaluate(
            tiny_config("bp", train__num_steps=8, optimizer__b2=0.9), tmp_path
        )
    with pytest.raises(ConfigError, match="augment"):
        train_and_evaluate(
            tiny_config("bp", train__num_steps=8, augment__flip=True), tmp_path
        )


def test_a_run_without_checkpoints_may_change_its_config(tmp_path):
    """A run that died before its first checkpoint (e.g. the loss diverged)
    can be restarted in the same workdir with, say, a lower learning rate."""

    def stop(step):
        raise Interrupt

    with pytest.raises(Interrupt):
        train_and_evaluate(
            tiny_config("bp", train__num_steps=8), tmp_path, on_step=stop
        )
    summary = train_and_evaluate(
        tiny_config("bp", train__num_steps=8, optimizer__lr=1e-3), tmp_path
    )
    assert summary["steps"] == 8


# --------------------------------------------------------------------------
# bad configs fail fast, naming the field
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, field",
    [
        ({"method__name": "sgld"}, "config.method.name"),
        ({"model__kwargs__init_var": -1e-3}, "config.model.kwargs.init_var"),
        ({"dataset": "svhn"}, "config.dataset"),
        ({"optimizer__name": "lamb"}, "config.optimizer.name"),
        ({"train__batch_size": 0}, "config.train.batch_size"),
        ({"augment__mixup_alpha": -1.0}, "config.augment.mixup_alpha"),
        ({"model__norm": "batch"}, "config.model.norm"),  # BN under bp
        (
            {
                "method__name": "ensemble",
                "method__member": "bp",
                "model__norm": "batch",
            },
            "config.model.norm",
        ),
        ({"augment__switch_prob": 1.5}, "config.augment.switch_prob"),
        ({"augment__randaugment_magnitude": 30.0}, "config.augment"),
        ({"loss__kl_weight": float("nan")}, "config.loss.kl_weight"),
        ({"train__batch_size": 512}, "config.train.batch_size"),  # > 256 examples
        ({"data__workers": -2}, "config.data.workers"),
        ({"data__prefetch": 0}, "config.data.prefetch"),
    ],
)
def test_bad_config_names_the_field(over, field, tmp_path):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train_and_evaluate(tiny_config("bp", **over), tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # failed before anything


def test_missing_data_dir_names_the_field(tmp_path):
    cfg = tiny_config("bp", data_dir=str(tmp_path / "no-such-dir"))
    with pytest.raises(ConfigError, match=r"config\.data_dir"):
        train_and_evaluate(cfg, tmp_path / "w")


def test_batch_not_divisible_by_devices():
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=30 .* 8"):
        validate_config(tiny_config("bp", train__batch_size=30), num_devices=8)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--workdir={tmp_path}",
        "--config.method.name=sgld",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "config.method.name='sgld'" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------
CONFIGS = sorted(
    p for p in (REPO / "configs").glob("*.py") if p.stem not in ("arch", "uci")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_files_are_valid(path):
    cfg = load_config_file(path)
    validate_config(cfg, num_devices=1)


@pytest.mark.parametrize("row", sorted(METHOD_ROWS))
def test_table1_rows_are_small_overrides(row):
    cfg = load_config_file(REPO / "configs" / "rows" / f"{row}.py")
    validate_config(cfg, num_devices=1)
    base = load_config_file(REPO / "configs" / "cifar100_wrn.py", "vanilla")
    assert cfg.model.name == base.model.name == "wrn28_10"
    assert cfg.dataset == "cifar100" and cfg.row == row
    assert cfg.augment == base.augment and cfg.schedule == base.schedule
    expected = {
        "vanilla": ("deterministic", "published", False),
        "reparam": ("reparam", "published", False),
        "reparam_nf_ng_ensemble": ("ensemble", "none", True),
        "bp_nf": ("bp", "none", False),
        "bp_nf_ng": ("bp", "none", True),
    }[row]
    assert (cfg.method.name, cfg.model.norm, cfg.optimizer.natural_gradient) == (
        expected
    )


def test_cifar100_wrn_is_the_paper_setting():
    cfg = load_config_file(REPO / "configs" / "cifar100_wrn.py")
    assert (cfg.method.name, cfg.model.norm) == ("bp", "none")
    assert cfg.optimizer.natural_gradient and cfg.schedule.name == "cosine"
    assert cfg.schedule.warmup_steps > 0
    assert cfg.augment.randaugment_ops == 2 and cfg.augment.cutmix_alpha > 0


# --------------------------------------------------------------------------
# optimiser pieces
# --------------------------------------------------------------------------
def test_schedule_warmup_then_cosine():
    cfg = tiny_config("bp", optimizer__lr=0.1, schedule__name="cosine")
    cfg.schedule.warmup_steps = 10
    cfg.schedule.end_factor = 0.01
    s = make_schedule(cfg, 110)
    np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-9)
    np.testing.assert_allclose(float(s(5)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 0.1, rtol=1e-6)
    # half way through the cosine: (lr + end) / 2
    np.testing.assert_allclose(float(s(60)), (0.1 + 0.001) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 0.001, rtol=1e-5)


def test_kl_annealing_is_linear():
    cfg = tiny_config("bp", loss__kl_weight=0.5, loss__kl_anneal_steps=4)
    got = [float(kl_weight_at(cfg, jnp.asarray(s))) for s in range(6)]
    np.testing.assert_allclose(got, [0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_weight_decay_spares_variances_and_clipping_bounds_the_update():
    cfg = tiny_config(
        "bp", optimizer__name="sgd", optimizer__lr=1.0, optimizer__momentum=0.0
    )
    cfg.optimizer.weight_decay = 0.1
    params = {"w_mean": jnp.ones(3), "w_logvar": jnp.full(3, -5.0), "b": jnp.ones(2)}
    tx = make_optimizer(cfg, optax.constant_schedule(1.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    up, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(up["w_mean"], -0.1)
    np.testing.assert_allclose(up["b"], -0.1)
    np.testing.assert_array_equal(up["w_logvar"], 0.0)
    assert mean_variance_labels(params)["w_logvar"] == "variance"
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.grad_clip = 1.0
    tx = make_optimizer(cfg, optax.constant_schedule(1.0))
    big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    up, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(up)), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------
# data parallel: 8 devices == 1 device
# --------------------------------------------------------------------------
_EIGHT_DEVICES = r"""
import json, pathlib, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_train import tiny_config, records
from dualflow.train.trainer import train_and_evaluate
assert jax.device_count() == 8, jax.devices()
out = {{}}
for n in (1, 8):
    wd = pathlib.Path({tmp!r}) / f"dev{{n}}"
    cfg = tiny_config({method!r}, mesh__num_devices=n, train__num_steps=16,
                      train__log_every=1, train__eval_every=16)
    s = train_and_evaluate(cfg, wd)
    out[n] = dict(loss=[r["loss"] for r in records(wd)], nll=s["test_nll"],
                  devices=s["devices"])
from dualflow.train.config import ConfigError
try:
    bad = tiny_config({method!r}, train__batch_size=36, mesh__num_devices=8)
    train_and_evaluate(bad, pathlib.Path({tmp!r}) / "bad")
    out["bad_batch"] = "no error"
except ConfigError as err:
    out["bad_batch"] = str(err)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("method", ["bp", "reparam"])
def test_eight_devices_match_one_device(method, tmp_path):
    """Same global batch on a 1-device and an 8-device mesh (fake CPU devices):
    the same loss curve to float tolerance (only reduction order differs)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    code = _EIGHT_DEVICES.format(
        tests=str(REPO / "tests"), tmp=str(tmp_path), method=method
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    out = json.loads(line[len("RESULT") :])
    one, eight = out["1"], out["8"]
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert len(one["loss"]) == 16
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=2e-5)
    np.testing.assert_allclose(eight["nll"], one["nll"], rtol=1e-4)
    assert "config.train.batch_size=36 is not divisible by the 8" in out["bad_batch"]


# --------------------------------------------------------------------------
# multi-host: two processes (jax.distributed over gloo on CPU) == one process
# --------------------------------------------------------------------------
_HOST = r"""
import json, pathlib, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]))
sys.path.insert(0, {tests!r})
from test_train import tiny_config
from dualflow.train.trainer import train_and_evaluate
assert jax.process_count() == 2 and jax.device_count() == 2
cfg = tiny_config("bp", mesh__num_devices=0, mesh__distributed=True,
                  train__num_steps=8, train__log_every=1, train__eval_every=8)
s = train_and_evaluate(cfg, pathlib.Path({tmp!r}))
print("RESULT" + json.dumps(dict(nll=s["test_nll"], hosts=s["hosts"])))
"""


def test_two_hosts_match_one_host(tmp_path):
    """Each host prepares its half of every global batch; the loss curve and
    the test NLL equal a single-process run's (to float tolerance)."""
    import socket

    with socket.socket() as sock:  # a free local port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = _HOST.format(port=port, tests=str(REPO / "tests"), tmp=str(tmp_path / "mh"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [
        json.loads(next(ln for ln in o.splitlines() if ln.startswith("RESULT"))[6:])
        for o, _ in outs
    ]
    assert results[0] == results[1] and results[0]["hosts"] == 2
    ref = train_and_evaluate(
        tiny_config("bp", train__num_steps=8, train__log_every=1, train__eval_every=8),
        tmp_path / "ref",
    )
    two = [r["loss"] for r in records(tmp_path / "mh")]
    one = [r["loss"] for r in records(tmp_path / "ref")]
    assert len(two) == 8
    np.testing.assert_allclose(two, one, rtol=2e-5)
    np.testing.assert_allclose(results[0]["nll"], ref["test_nll"], rtol=1e-4)
