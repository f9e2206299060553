"""dualflow.cli: every user mistake in scripts/*.py is one ``error:`` line
(plus at most one ``hint:`` line) and exit code 2 (issue 18, item 5).

In-process tests of the helpers, then each script run as a subprocess with a
mistake it rejects before any heavy work (import, flag parsing, flag checks).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from dualflow import cli
from dualflow.errors import ConfigError, DataNotFoundError, DivergenceError, Interrupted

# ml_collections loads config files with the deprecated load_module()
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _assert_one_error(stderr: str, start: str = "error: ") -> list[str]:
    """stderr is one ``error:`` line (starting with ``start``), maybe a hint."""
    lines = _lines(stderr)
    assert lines and lines[0].startswith(start), lines
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), lines
    assert "Traceback" not in stderr
    return lines


def _exit_code(fn, *args, **kwargs) -> int | None:
    with pytest.raises(SystemExit) as info:
        fn(*args, **kwargs)
    return info.value.code


# --------------------------------------------------------------------------------
# helpers, in process


def test_fail_is_one_line_with_an_optional_hint(capsys):
    assert _exit_code(cli.fail, "bad\n  thing", "try\nthis") == cli.EXIT_USAGE == 2
    assert capsys.readouterr().err == "error: bad thing\nhint: try this\n"
    assert _exit_code(cli.fail, "no hint") == 2
    assert capsys.readouterr().err == "error: no hint\n"


def test_diverged_keeps_the_errors_own_hint(capsys):
    assert _exit_code(cli.diverged, FloatingPointError("loss nan"), "lower --lr") == 2
    assert _lines(capsys.readouterr().err) == ["error: loss nan", "hint: lower --lr"]
    err = DivergenceError("loss inf at step 3", hint="lower config.optimizer.lr")
    assert _exit_code(cli.diverged, err, "other") == 2
    assert _lines(capsys.readouterr().err)[1] == "hint: lower config.optimizer.lr"


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "cfg.py").write_text(
        "import ml_collections\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.optimizer = ml_collections.ConfigDict(dict(lr=0.1, name='adam'))\n"
        "    c.seed = 0\n"
        "    return c\n"
    )
    (tmp_path / "broken.py").write_text("def get_config(:\n    pass\n")
    return tmp_path


def _parse(config_dir, monkeypatch, *args: str) -> list[str]:
    """Define a config flag ``--cfg`` on fresh FlagValues and parse ``args``."""
    argv = ["prog", *args]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    cli.define_config_file(
        "cfg", str(config_dir / "cfg.py"), "config", flag_values=fv, lock_config=True
    )
    flags.DEFINE_integer("steps", 1, "steps", flag_values=fv)
    return cli._parse_flags(argv, fv)


def test_parse_flags_accepts_good_flags(config_dir, monkeypatch):
    rest = _parse(config_dir, monkeypatch, "--cfg.optimizer.lr=0.5", "--steps=3", "x")
    assert rest == ["prog", "x"]


@pytest.mark.parametrize(
    "args, error, hint",
    [
        (
            ["--cfg.optimizer.lrr=0.2"],
            "error: --cfg.optimizer.lrr: the config has no field 'lrr'",
            "hint: did you mean 'lr'?",
        ),
        (["--cfg.zzzz=1"], "error: --cfg.zzzz: the config has no field 'zzzz'", None),
        (
            ["--cfg=NOSUCH"],
            "error: config file NOSUCH does not exist; pass --cfg=configs/<name>.py",
            "hint: see --helpshort",
        ),
        (
            ["--cfg=BROKEN"],
            "error: config file BROKEN is not a Python config file (line 1:",
            "hint: see --helpshort",
        ),
        (
            ["--cfg.optimizer.lr=abc"],
            "error: flag --cfg.optimizer.lr=abc: could not convert string to float",
            "hint: see --helpshort",
        ),
        (["--steps=x"], "error: flag --steps=x: invalid literal", "hint: see"),
        (["--nosuch"], "error: Unknown command line flag 'nosuch'", "hint: see"),
    ],
    ids=[
        "did-you-mean",
        "unknown-field",
        "missing",
        "syntax",
        "bad-value",
        "bad-int",
        "unknown-flag",
    ],
)
def test_parse_flags_mistakes_are_one_line(
    config_dir, monkeypatch, capsys, args, error, hint
):
    subst = {
        "NOSUCH": str(config_dir / "nosuch.py"),
        "BROKEN": str(config_dir / "broken.py"),
    }
    args = [
        a.replace("NOSUCH", subst["NOSUCH"]).replace("BROKEN", subst["BROKEN"])
        for a in args
    ]
    error = error.replace("NOSUCH", subst["NOSUCH"]).replace("BROKEN", subst["BROKEN"])
    assert _exit_code(_parse, config_dir, monkeypatch, *args) == 2
    lines = _assert_one_error(capsys.readouterr().err, error)
    if hint is None:
        assert len(lines) == 1, lines
    else:
        assert len(lines) == 2 and lines[1].startswith(hint), lines


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (ConfigError("config.optimizer.lr=-1 must be > 0."), 2, "error: config."),
        (DataNotFoundError("no mnist", hint="put it there"), 2, "error: no mnist"),
        (DivergenceError("loss nan at step 3"), 2, "error: loss nan at step 3"),
        (Interrupted("stopped at step 7; rerun to resume", step=7), 130, "stopped"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
    ids=["config", "data", "divergence", "interrupted", "ctrl-c"],
)
def test_run_plain_maps_errors_to_one_line_and_exit_code(capsys, exc, code, line):
    def main():
        raise exc

    assert _exit_code(cli.run_plain, main) == code
    lines = _lines(capsys.readouterr().err)
    assert lines[0].startswith(line) and len(lines) <= 2, lines
    if isinstance(exc, DataNotFoundError):
        assert lines[1] == "hint: put it there"


def test_run_plain_exits_with_mains_return_and_keeps_bugs(capsys):
    assert _exit_code(cli.run_plain, lambda: 0) == 0
    assert _exit_code(cli.run_plain, lambda: None) is None

    def buggy():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # not a user mistake: traceback kept
        cli.run_plain(buggy)


def test_argument_parser_errors_are_one_line(capsys):
    ap = cli.argument_parser(description="d", prog="tool.py")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--mode", choices=["a", "b"], default="a")
    ap.add_argument("path")
    for argv, start in (
        (["p", "--nosuch"], "error: unrecognized arguments: --nosuch"),
        (["p", "extra"], "error: unrecognized arguments: extra"),
        (["p", "--steps=x"], "error: argument --steps: invalid int value: 'x'"),
        (["p", "--mode=c"], "error: argument --mode: invalid choice: 'c'"),
        ([], "error: the following arguments are required: path"),
    ):
        assert _exit_code(ap.parse_args, argv) == 2
        lines = _assert_one_error(capsys.readouterr().err, start)
        assert lines[1:] == ["hint: see tool.py --help"]
    assert ap.parse_args(["p", "--steps=3"]).steps == 3


def test_parse_list(capsys):
    assert cli.parse_list(" a, b ,,", "x", choices=("a", "b")) == ["a", "b"]
    assert cli.parse_list(["1", "2"], "n", type=int) == [1, 2]
    assert cli.parse_list("", "m", allow_empty=True) == []
    for args, kw, msg in (
        (
            ("a,c,d", "x"),
            {"choices": ("a", "b")},
            "error: --x: unknown 'c', 'd'; choose from a, b",
        ),
        (("1,z", "n"), {"type": int}, "error: --n: 'z' is not an integer"),
        (("0.1,z", "f"), {"type": float}, "error: --f: 'z' is not a number"),
        (
            (" , ", "m"),
            {"choices": ("a",)},
            "error: --m: no value given; choose from a",
        ),
    ):
        assert _exit_code(cli.parse_list, *args, **kw) == 2
        assert _lines(capsys.readouterr().err) == [msg]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, argv, error",
    [
        ("bench.py", ["--models=mlp,foo"], "--models: unknown 'foo'; choose from mlp,"),
        ("bench.py", ["--steps=0"], "--steps: must be >= 1, got 0"),
        ("bench_bp.py", ["--activation=foo"], "argument --activation: invalid choice"),
        ("bench_models.py", ["--models=resnet99"], "--models: unknown 'resnet99'"),
        ("bench_propagate.py", ["--modes=foo"], "--modes: unknown 'foo'; choose from"),
        (
            "run_notebook.py",
            ["--write", "a.ipynb"],
            "--write only applies to --small",
        ),
        ("run_notebook.py", [], "name at least one notebook, or pass --all"),
    ],
)
def test_argparse_scripts_reject_bad_values_in_process(script, argv, error, capsys):
    """The argparse scripts' ``main(argv)``, in this process (no jax import)."""
    assert _exit_code(_load_script(script).main, argv) == 2
    _assert_one_error(capsys.readouterr().err, "error: " + error)


# --------------------------------------------------------------------------------
# the scripts, as subprocesses (each rejects the mistake before any heavy work)


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


SCRIPT_NAMES = [
    "bench.py",
    "bench_bp.py",
    "bench_input.py",
    "bench_device.py",
    "bench_models.py",
    "bench_precision.py",
    "bench_propagate.py",
    "bench_rnn_memory.py",
    "bench_train.py",
    "convergence.py",
    "gradient_variance.py",
    "mnist_vi.py",
    "pcff.py",
    "run_notebook.py",
    "sequence.py",
    "sequence_posterior.py",
    "sine_vi.py",
    "visualize.py",
    "train.py",
    "uci.py",
]


def test_every_script_is_listed():
    assert sorted(SCRIPT_NAMES) == sorted(
        p.name for p in SCRIPTS.glob("*.py")
    )


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_unknown_flag_is_one_error_line(script, tmp_path):
    needs = {"run_notebook.py": ["some.ipynb"]}  # its required positional
    proc = _run(script, "--nosuchflag", *needs.get(script, []), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _assert_one_error(proc.stderr)
    assert "nosuchflag" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "script, args, error",
    [
        (
            "train.py",
            ["--config.optimizer.lrr=0.1"],
            "error: --config.optimizer.lrr: the config has no field 'lrr'",
        ),
        ("train.py", ["--config=configs/nosuch.py"], "error: config file"),
        (
            "bench_train.py",
            ["--methods=bp,nosuch"],
            "error: --methods: unknown 'nosuch'; choose from bp, ",
        ),
        ("convergence.py", ["--widths=10,x"], "error: --widths: 'x' is not an integer"),
        ("sequence_posterior.py", ["extra"], "error: unexpected arguments: extra"),
        (
            "run_notebook.py",
            ["missing.ipynb"],
            "error: notebook missing.ipynb does not exist",
        ),
    ],
    ids=[
        "field",
        "config-file",
        "methods",
        "widths",
        "positional",
        "notebook",
    ],
)
def test_bad_values_are_one_error_line(script, args, error, tmp_path):
    proc = _run(script, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _assert_one_error(proc.stderr, error)
    if "lrr" in args[0]:
        assert lines[1:] == ["hint: did you mean 'lr'?"]
    assert not list(tmp_path.iterdir())


def test_quick_defaults_leave_explicit_flags_alone():
    """--quick fills in what the user did not give; explicit flags win."""
    from absl import flags as absl_flags

    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("epochs", 100, "", flag_values=fv)
    absl_flags.DEFINE_list("widths", ["512"], "", flag_values=fv)
    absl_flags.DEFINE_integer("eval_every", 50, "", flag_values=fv)
    fv(["prog", "--epochs=7"])
    kept = cli.quick_defaults(fv, {"epochs": 2, "widths": ["32"], "eval_every": 5})
    assert kept == ["epochs"]
    assert (fv.epochs, fv.widths, fv.eval_every) == (7, ["32"], 5)
