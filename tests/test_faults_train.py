"""Fault injection for the trainer: signals, kills, corrupt checkpoints, bad runs.

Every test breaks a run on purpose and checks three things: the exit code, the
one line the user sees, and that nothing recorded earlier was lost or
overwritten.  Interrupted and killed runs must then resume to the final
parameters of the uninterrupted run, bit for bit.

Signals are delivered at exact points by the trainer's test hook
(``DUALFLOW_INJECT_FAULT``, see :mod:`dualflow.train.interrupts`) in a
subprocess running ``scripts/train.py`` on scikit-learn digits (real data, no
download): after a given step, 0.2 s into the first step's compilation, at the
start of an evaluation, while orbax writes a checkpoint's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dualflow.errors import CheckpointError, ConfigError, DivergenceError
from dualflow.train.checkpoints import MANIFEST
from dualflow.train.trainer import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from signals import WITH_DEFAULT_SIGNALS  # noqa: E402
from test_train import tiny_config  # noqa: E402

STEPS = 40
# a sampling method with augmentation exercises every random stream; log,
# evaluation and checkpoint cadences differ so resumes continue half windows
ARGS = [
    "--config.train.num_epochs=0",
    f"--config.train.num_steps={STEPS}",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=4",
    "--config.train.eval_every=20",
    "--config.train.progress=False",
    "--config.train.plot=False",
    "--config.method.name=reparam",
    "--config.augment.crop_pad=1",
    "--config.augment.mixup_alpha=0.4",
    "--config.model.kwargs.widths=(32,)",
]


def run_train(workdir, fault: str = "", extra=(), timeout=240, new_session=False):
    env = dict(os.environ)
    env.pop("DUALFLOW_INJECT_FAULT", None)
    if fault:
        env["DUALFLOW_INJECT_FAULT"] = fault
    cmd = [*WITH_DEFAULT_SIGNALS, str(REPO / "scripts" / "train.py"), *ARGS, *extra]
    return subprocess.run(
        [*cmd, f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        start_new_session=new_session,  # a group signal must not reach pytest
    )


def final_params(workdir) -> dict:
    import orbax.checkpoint as ocp

    ckpts = pathlib.Path(workdir) / "checkpoints"
    last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert last == STEPS
    tree = ocp.StandardCheckpointer().restore(ckpts / str(last) / "state")
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def records(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    drop = ("steps_per_sec", "examples_per_sec")  # timing differs between runs
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in lines
    ]


def tree_digest(path) -> dict[str, str]:
    """``{relative path: sha256 or "<dir>"}`` of everything under ``path``."""
    path = pathlib.Path(path)
    return {
        str(p.relative_to(path)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        )
        for p in sorted(path.rglob("*"))
        if p.name != ".lock"
    }


def stderr_lines(out) -> list[str]:
    return [ln for ln in out.stderr.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final parameters and log records."""
    workdir = tmp_path_factory.mktemp("reference")
    out = run_train(workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    return final_params(workdir), records(workdir), workdir


def assert_same_as_reference(workdir, reference) -> None:
    ref_params, ref_records, _ = reference
    got = final_params(workdir)
    assert got.keys() == ref_params.keys()
    for k in ref_params:
        np.testing.assert_array_equal(got[k], ref_params[k], err_msg=k)
    assert records(workdir) == ref_records


# --------------------------------------------------------------------------
# signals and kills at exact moments, then resume bit for bit
# --------------------------------------------------------------------------
GRACEFUL = [  # (fault, checkpoint expected at exit)
    ("SIGINT@step:13", 13),  # between two checkpoints, mid log window
    ("SIGTERM@step:27", 27),  # preemption (cloud VMs, Colab)
    ("SIGINT@compile", 1),  # during the first step's XLA compilation
    ("SIGINT@eval:20", 20),  # at the start of an evaluation (redone on resume)
    ("SIGINT@save-write:30", 30),  # while orbax writes checkpoint 30
]


@pytest.mark.parametrize("fault, saved", GRACEFUL)
def test_signal_checkpoints_exits_130_and_resumes_bitwise(
    fault, saved, reference, tmp_path
):
    out = run_train(tmp_path, fault)
    assert out.returncode == 130, out.stderr[-2000:]
    lines = stderr_lines(out)
    assert lines == [
        f"interrupted at step {saved}; rerun the same command to resume"
    ], lines
    assert "Traceback" not in out.stderr + out.stdout
    steps = sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == saved
    assert (tmp_path / "checkpoints" / str(saved) / MANIFEST).exists()
    again = run_train(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / str(saved)}" in again.stdout
    assert_same_as_reference(tmp_path, reference)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["invocations"] == 2 and summary["steps_run"] == STEPS


@pytest.mark.parametrize(
    "fault, saved",
    [
        ("SIGINT-GROUP@step:13", 13),  # a terminal's Ctrl-C
        ("SIGTERM-GROUP@step:27", 27),  # preemption of the whole job
        # while grain spawns the workers: dropped (the workers must start
        # immune), so the run finishes; nothing may hang or print a traceback
        ("SIGINT-GROUP@compile", None),
    ],
)
def test_signal_to_the_process_group_with_input_workers(
    fault, saved, reference, tmp_path
):
    """The signal reaches the grain worker processes too: they leave it to the
    trainer, which saves, prints its one line and exits 130 (no worker
    traceback, no hang on a half-written queue message); the resumed run
    (workers again) matches the threaded reference bit for bit."""
    workers = ["--config.data.workers=2"]
    out = run_train(tmp_path, fault, workers, new_session=True)
    if saved is None:
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Traceback" not in out.stderr + out.stdout
        assert_same_as_reference(tmp_path, reference)
        return
    assert out.returncode == 130, out.stderr[-2000:]
    assert stderr_lines(out) == [
        f"interrupted at step {saved}; rerun the same command to resume"
    ], out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    again = run_train(tmp_path, extra=workers)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_as_reference(tmp_path, reference)


def test_workers_do_not_outlive_a_hard_exit(reference, tmp_path):
    """A second Ctrl-C exits at once (``os._exit``); the orphaned workers notice
    and exit too, so the pipes they inherited close (``subprocess.run`` would
    otherwise wait for them until its timeout)."""
    workers = ["--config.data.workers=2"]
    out = run_train(tmp_path, "SIGINTx2@step:23", workers, timeout=120)
    assert out.returncode == 130, out.stderr[-2000:]
    again = run_train(tmp_path, extra=workers)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_as_reference(tmp_path, reference)


KILLS = [  # (fault, newest checkpoint left behind, updates executed in all)
    # kill -9 between checkpoints: windows up to 16 were timed, 10..40 redone
    ("SIGKILL@step:17", 10, 16 + 30),
    # kill -9 while orbax writes checkpoint 30 (timed up to 30), 20..40 redone
    ("SIGKILL@save-write:30", 20, 30 + 20),
    # a second Ctrl-C exits at once without saving (timed up to 20)
    ("SIGINTx2@step:23", 20, 20 + 20),
]


@pytest.mark.parametrize("fault, left, steps_run", KILLS)
def test_hard_kill_loses_only_unsaved_steps_and_resumes_bitwise(
    fault, left, steps_run, reference, tmp_path
):
    out = run_train(tmp_path, fault)
    if fault.startswith("SIGKILL"):
        assert out.returncode == -signal.SIGKILL
    else:
        assert out.returncode == 130
        assert stderr_lines(out)[-1].startswith("second interrupt: exiting now")
    steps = sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == left, steps
    again = run_train(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_as_reference(tmp_path, reference)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the steps redone after the kill were run twice, and both are counted
    assert summary["steps_run"] == steps_run and summary["invocations"] == 2


# --------------------------------------------------------------------------
# corrupt checkpoints: fall back to the newest valid one, or refuse
# --------------------------------------------------------------------------
def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
        key=lambda p: p.stat().st_size,
    )


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: pathlib.Path) -> None:
    path.write_bytes(b"{not json" + path.read_bytes()[9:])


CORRUPTIONS = {
    "truncated data file": lambda d: _truncate(_largest_file(d / "state")),
    "garbled _METADATA": lambda d: _garble(d / "state" / "_METADATA"),
    "deleted data file": lambda d: _largest_file(d / "state").unlink(),
    "flipped byte": lambda d: _flip_byte(_largest_file(d / "state")),
}


def _flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def interrupted_at_27(tmp_path_factory):
    """A run stopped after step 27 (checkpoints 10 and 20 kept), in process."""
    workdir = tmp_path_factory.mktemp("interrupted")

    class Stop(Exception):
        pass

    def stop(step):
        if step == 27:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(_cfg(), workdir, on_step=stop)
    return workdir


def _cfg(**over):
    base = dict(train__num_steps=32, train__checkpoint_every=10)
    return tiny_config("bp", train__keep_checkpoints=3, **{**base, **over})


@pytest.fixture(scope="module")
def uninterrupted_32(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(_cfg(), workdir)
    return final_params_at(workdir, 32)


def final_params_at(workdir, step):
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(
        pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    )
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_older(
    corruption, interrupted_at_27, uninterrupted_32, tmp_path, capsys
):
    workdir = tmp_path / "w"
    shutil.copytree(interrupted_at_27, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "20")
    moved = tree_digest(workdir / "checkpoints" / "20")
    train_and_evaluate(_cfg(), workdir)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "unreadable" in ln]
    assert len(lines) == 1, out
    assert lines[0].startswith("dualflow: checkpoint step 20 is unreadable (")
    assert lines[0].endswith("resuming from step 10")
    if corruption != "garbled _METADATA":  # the manifest names the file
        assert "file state/" in lines[0]
    # the unreadable checkpoint is kept, byte for byte, out of the way
    assert tree_digest(workdir / "checkpoints_unreadable" / "20") == moved
    got = final_params_at(workdir, 32)
    for k, v in uninterrupted_32.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_no_readable_checkpoint_refuses_and_changes_nothing(
    interrupted_at_27, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(interrupted_at_27, workdir)
    for step in (10, 20):
        _truncate(_largest_file(workdir / "checkpoints" / str(step) / "state"))
    before = tree_digest(workdir)
    with pytest.raises(CheckpointError) as err:
        train_and_evaluate(_cfg(), workdir)
    msg = str(err.value)
    assert "step 20: file state/" in msg and "step 10: file state/" in msg
    assert err.value.hint.startswith(f"move {workdir} away")
    assert tree_digest(workdir) == before


def test_missing_config_json_with_checkpoints_refuses(interrupted_at_27, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(interrupted_at_27, workdir)
    (workdir / "config.json").unlink()
    before = tree_digest(workdir)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        train_and_evaluate(_cfg(), workdir)
    assert tree_digest(workdir) == before


def test_cli_reports_unreadable_checkpoints_in_one_line(tmp_path):
    """The script form of the refusal: ``error:`` + ``hint:``, exit 2."""
    out = run_train(tmp_path, "SIGINT@step:12")
    assert out.returncode == 130
    _truncate(_largest_file(tmp_path / "checkpoints" / "12" / "state"))
    _truncate(_largest_file(tmp_path / "checkpoints" / "10" / "state"))
    before = tree_digest(tmp_path)
    again = run_train(tmp_path)
    assert again.returncode == 2
    lines = stderr_lines(again)
    assert len(lines) == 2 and lines[0].startswith("error: no checkpoint in ")
    assert lines[1].startswith("hint: move ")
    assert tree_digest(tmp_path) == before


# --------------------------------------------------------------------------
# divergence, finished runs, changed data, timing across resumes
# --------------------------------------------------------------------------
def test_divergence_is_one_line_and_keeps_the_last_finite_checkpoint(tmp_path):
    out = run_train(tmp_path, extra=["--config.optimizer.lr=1e9"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = stderr_lines(out)
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: the training loss became n")
    assert "--config.optimizer.lr" in lines[0]
    assert lines[1] == "hint: no checkpoint was written"
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir()
    )


def test_divergence_is_caught_before_a_checkpoint_is_written(tmp_path):
    """A non-finite loss between log records never reaches a checkpoint."""
    cfg = _cfg(optimizer__lr=1e9, train__log_every=1000)
    with pytest.raises(DivergenceError, match=r"became (nan|inf) by step 10"):
        train_and_evaluate(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert not any(p.name.isdigit() for p in ckpts.iterdir())


def test_rerun_of_a_finished_run_changes_no_file(tmp_path):
    cfg = _cfg(train__num_steps=12)
    first = train_and_evaluate(cfg, tmp_path)
    before = tree_digest(tmp_path)
    again = train_and_evaluate(cfg, tmp_path)
    assert again == first
    assert tree_digest(tmp_path) == before  # wall time is not overwritten


def test_summary_timing_accumulates_across_resumes(tmp_path):
    """After a resume the speed is the steady state of both invocations (the
    first window of each, which holds the compilation, is left out) and the
    wall time is their sum."""

    class Stop(Exception):
        pass

    def stop(step):
        if step == 24:
            raise Stop

    cfg = _cfg(train__num_steps=48, train__log_every=4, train__checkpoint_every=8)
    with pytest.raises(Stop):
        train_and_evaluate(cfg, tmp_path, on_step=stop)
    summary = train_and_evaluate(cfg, tmp_path)
    timing = [
        json.loads(ln) for ln in (tmp_path / "timing.jsonl").read_text().splitlines()
    ]
    windows = [r for r in timing if r["steps"] > 0]
    steady = [r["seconds"] / r["steps"] for r in windows if not r["first"]]
    assert summary["seconds_per_step"] == pytest.approx(float(np.median(steady)))
    assert summary["invocations"] == 2
    assert summary["steps_run"] == 24 + 24  # 24 before the stop, 24 after
    walls = {}
    for r in timing:
        walls[r["invocation"]] = max(walls.get(r["invocation"], 0), r["wall"])
    assert len(walls) == 2
    assert summary["wall_seconds"] == pytest.approx(sum(walls.values()))
    # the compile-bearing windows are the slow ones that were excluded
    first = [r["seconds"] / r["steps"] for r in windows if r["first"]]
    assert min(first) > summary["seconds_per_step"]


def _write_npz(path: pathlib.Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 96).astype(np.int64),
        x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 40).astype(np.int64),
    )


def test_resume_on_changed_data_refuses(tmp_path):
    """Same data set name and size, one pixel changed: the fingerprint differs."""
    data = tmp_path / "data"
    data.mkdir()
    _write_npz(data / "mnist.npz")
    cfg = tiny_config(
        "bp",
        dataset="mnist",
        data_dir=str(data),
        data__max_train=0,
        data__max_test=0,
        train__num_steps=6,
        train__batch_size=32,
    )
    workdir = tmp_path / "w"
    train_and_evaluate(cfg, workdir)
    z = dict(np.load(data / "mnist.npz"))
    z["x_train"][5, 3, 3] ^= 1
    np.savez(data / "mnist.npz", **z)
    before = tree_digest(workdir)
    with pytest.raises(ConfigError, match="data fingerprint"):
        train_and_evaluate(cfg, workdir)
    assert tree_digest(workdir) == before


def test_missing_image_data_is_one_error_line_and_a_hint(tmp_path):
    env = {**os.environ, "DUALFLOW_DATA_DIR": str(tmp_path / "no-data")}
    env.pop("DUALFLOW_INJECT_FAULT", None)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config=configs/cifar10_resnet.py",
        f"--workdir={tmp_path / 'w'}",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    assert out.returncode == 2
    lines = stderr_lines(out)
    assert lines == [
        "error: Could not find the cifar10 data set:"
        f" {tmp_path / 'no-data'} does not exist.",
        lines[1],
    ]
    assert lines[1].startswith("hint: put cifar-10-batches-py/")
    assert "--config.data.download=True" in lines[1]
    assert not (tmp_path / "w").exists()


def test_newest_checkpoint_without_manifest_is_a_cut_short_save(
    interrupted_at_27, uninterrupted_32, tmp_path, capsys
):
    """A kill between orbax's rename and the manifest write leaves a complete
    looking checkpoint that was never verified: the older one is used."""
    workdir = tmp_path / "w"
    shutil.copytree(interrupted_at_27, workdir)
    (workdir / "checkpoints" / "20" / MANIFEST).unlink()
    train_and_evaluate(_cfg(), workdir)
    out = capsys.readouterr().out
    assert f"checkpoint step 20 is unreadable (it has no {MANIFEST}" in out
    got = final_params_at(workdir, 32)
    for k, v in uninterrupted_32.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_restart_without_checkpoints_keeps_the_earlier_outputs(tmp_path, capsys):
    """A workdir whose checkpoints were deleted (or never written) is not
    silently overwritten: its outputs move to previous/<id>/ first, and the
    new run's timing does not count the old one."""
    first = train_and_evaluate(_cfg(train__num_steps=8), tmp_path)
    before = tree_digest(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    second = train_and_evaluate(_cfg(train__num_steps=8, seed=123), tmp_path)
    out = capsys.readouterr().out
    assert "dualflow: no checkpoint; earlier outputs moved to" in out
    (prev,) = (tmp_path / "previous").iterdir()
    for name in ("config.json", "metrics.jsonl", "summary.json", "timing.jsonl"):
        assert hashlib.sha256((prev / name).read_bytes()).hexdigest() == before[name]
    assert json.loads((prev / "summary.json").read_text()) == first
    assert second["invocations"] == 1 and second["steps_run"] == 8


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
    from dualflow.train.workdir import WorkdirBusyError, WorkdirLock

    tmp_path.mkdir(exist_ok=True)
    with WorkdirLock(tmp_path):  # another run holds the workdir
        with pytest.raises(WorkdirBusyError, match="is in use by another run"):
            train_and_evaluate(_cfg(train__num_steps=8), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    train_and_evaluate(_cfg(train__num_steps=8), tmp_path)  # free again


def test_summary_from_before_a_fallback_is_not_returned_as_final(
    uninterrupted_32, tmp_path
):
    """Finished run, newest checkpoint damaged, the redo stopped before the
    end: the old summary must not make the next rerun look finished."""
    cfg = _cfg()
    train_and_evaluate(cfg, tmp_path)
    ref_records = records(tmp_path)
    _truncate(_largest_file(tmp_path / "checkpoints" / "32" / "state"))

    class Stop(Exception):
        pass

    def stop(step):
        if step == 31:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(cfg, tmp_path, on_step=stop)
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "summary.superseded.json").exists()
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["steps"] == 32
    assert records(tmp_path) == ref_records  # the final evaluation is there
    got = final_params_at(tmp_path, 32)
    for k, v in uninterrupted_32.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_non_finite_parameters_are_never_checkpointed(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient makes the parameters NaN; the loss of
    that step is still finite, so only a check of the state itself stops the
    save."""
    import jax.numpy as jnp

    from dualflow.train import trainer

    real = trainer.make_loss_fn

    def nan_gradient_loss_fn(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def loss(params, *rest):
            value, aux = loss_fn(params, *rest)
            s = jnp.sum(jax.tree.leaves(params)[0])
            return value + jnp.sqrt(s - s), aux  # + 0, gradient NaN

        return loss

    monkeypatch.setattr(trainer, "make_loss_fn", nan_gradient_loss_fn)
    cfg = _cfg(train__checkpoint_every=1, train__log_every=1000)
    with pytest.raises(DivergenceError, match="non-finite parameters or metrics"):
        train_and_evaluate(cfg, tmp_path)
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
