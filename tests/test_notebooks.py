"""The committed notebooks: what a reader sees on the repository page.

Each notebook's outputs come from a real run (``scripts/run_notebook.py``): no
error output, no absolute path, execution counts in order, the shared install
cell unchanged, a first cell naming the runtime and the time.  The checker
itself is tested on notebooks with each defect, and the install cell's logic
(clone / Colab GPU / TPU / CPU) with ``pip`` replaced by a recorder.
``tests/test_notebooks_run.py`` executes every notebook with ``SMALL=1``.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualflow import notebooks

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "quickstart.ipynb",
    "make_your_own_bayesian.ipynb",
    "uci_regression.ipynb",
    "hmc_beliefs.ipynb",
    "cifar100_wrn.ipynb",
    "duality_tour.ipynb",
}
PATHS = notebooks.notebook_paths()


def test_the_six_notebooks_are_there():
    assert {p.name for p in PATHS} == EXPECTED


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_committed_outputs_pass_every_check(path):
    nb = json.loads(path.read_text())
    assert notebooks.problems(nb) == []
    images = sum(
        "image/png" in out.get("data", {})
        for cell in nb["cells"]
        for out in cell.get("outputs", [])
    )
    assert images >= 1, "a notebook keeps at least one figure for the repository page"
    assert path.stat().st_size < 2_000_000, "keep committed notebooks below 2 MB"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_first_cell_links_colab_to_this_notebook(path):
    intro = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert (
        f"colab.research.google.com/github/dualflow/dualflow/blob/main/notebooks/{path.name}"
        in intro
    )


# ------------------------------------------------------------------------------
# the checker finds each defect


def _good() -> dict:
    def code(src, n, outputs=()):
        return {
            "cell_type": "code",
            "source": src,
            "execution_count": n,
            "metadata": {},
            "outputs": list(outputs),
        }

    text = {"output_type": "stream", "name": "stdout", "text": "ok\n"}
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": "# T\n**Runtime:** CPU\n**Time:** 1 s"},
            code(notebooks.INSTALL_CELL, 1, [text]),
            code("x = 1", 2),
            {"cell_type": "markdown", "source": "text"},
            code("print(x)", 3, [text]),
        ],
        "metadata": {"dualflow": {"small": False, "seconds": 1.0}},
    }
    nb["metadata"]["dualflow"]["code_sha256"] = notebooks.code_digest(nb)
    return nb


def _set_code(nb: dict, index: int, source: str) -> None:
    """Edit a code cell as if the notebook had been run with the edit."""
    nb["cells"][index]["source"] = source
    nb["metadata"]["dualflow"]["code_sha256"] = notebooks.code_digest(nb)


def _broken(edit) -> list[str]:
    nb = _good()
    edit(nb)
    return notebooks.problems(nb)


def test_a_good_notebook_has_no_problems():
    assert notebooks.problems(_good()) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda nb: nb["cells"][0].update(source="# T\n**Time:** 1 s"), "runtime"),
        (lambda nb: nb["cells"][0].update(source="# T\n**Runtime:** x"), "time"),
        (lambda nb: nb["cells"].pop(0), "first cell is not a markdown"),
        (
            lambda nb: _set_code(nb, 1, notebooks.INSTALL_CELL + "\n# x"),
            "INSTALL_CELL",
        ),
        (lambda nb: nb["cells"][2].update(execution_count=None), "execution counts"),
        (lambda nb: nb["cells"][4].update(execution_count=2), "execution counts"),
        (
            lambda nb: nb["cells"][2]["outputs"].append(
                {
                    "output_type": "error",
                    "ename": "ValueError",
                    "evalue": "",
                    "traceback": [],
                }
            ),
            "error output (ValueError)",
        ),
        (
            lambda nb: nb["cells"][2]["outputs"].append(
                {"output_type": "stream", "name": "stderr", "text": "Traceback (most"}
            ),
            "traceback on stderr",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {
                    "output_type": "stream",
                    "name": "stdout",
                    "text": "saved /home/u/a.png",
                }
            ),
            "absolute path: '/home/u/a.png'",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {
                    "output_type": "execute_result",
                    "data": {"text/plain": "PosixPath('/work/x/runs')"},
                    "metadata": {},
                    "execution_count": 3,
                }
            ),
            "absolute path: '/work/x/runs'",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {"output_type": "stream", "name": "stdout", "text": "in C:\\Users\\me"}
            ),
            "absolute path",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {
                    "output_type": "stream",
                    "name": "stdout",
                    "text": "see file:///x/y.png",
                }
            ),
            "absolute path: 'file:///x/y.png'",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {"output_type": "stream", "name": "stdout", "text": "at /data/set/a"}
            ),
            "absolute path: '/data/set/a'",
        ),
        (
            lambda nb: nb["cells"][4]["outputs"].append(
                {"output_type": "stream", "name": "stdout", "text": f"in {sys.prefix}"}
            ),
            "absolute path",
        ),
        (lambda nb: nb["cells"][2].update(source="x = 2"), "code cells changed"),
        (
            lambda nb: nb["cells"][0].update(
                source=nb["cells"][0]["source"]
                + f" It has {notebooks.NOT_RUN_AT_FULL_SIZE} here."
            ),
            "update the first cell",
        ),
        (lambda nb: nb["metadata"].pop("dualflow"), "no metadata.dualflow"),
        (lambda nb: nb["metadata"]["dualflow"].update(small=True), "SMALL run"),
    ],
)
def test_the_checker_finds_each_defect(edit, expected):
    found = _broken(edit)
    assert len(found) == 1 and expected in found[0], found


def test_relative_paths_and_urls_are_not_absolute_paths():
    def edit(nb):
        nb["cells"][4]["outputs"].append(
            {
                "output_type": "stream",
                "name": "stdout",
                "text": "runs/cifar/ckpt, https://x.org/home/a, ~/data, 3/4, a/tmp/b\n",
            }
        )

    assert _broken(edit) == []


def test_consecutive_stream_chunks_are_merged_as_jupyter_shows_them():
    chunks = [
        {"output_type": "stream", "name": "stdout", "text": "a\n"},
        {"output_type": "stream", "name": "stdout", "text": "b\n"},
        {"output_type": "stream", "name": "stderr", "text": "w\n"},
        {"output_type": "display_data", "data": {}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "c\n"},
        {"output_type": "stream", "name": "stdout", "text": "d\n"},
    ]
    merged = notebooks._merge_streams(chunks)
    assert [(o["output_type"], o.get("text")) for o in merged] == [
        ("stream", "a\nb\n"),
        ("stream", "w\n"),
        ("display_data", None),
        ("stream", "c\nd\n"),
    ]


def test_small_outputs_are_allowed_when_the_first_cell_says_so():
    def edit(nb):
        nb["metadata"]["dualflow"]["small"] = True
        nb["cells"][0]["source"] += (
            f"\nThis notebook has {notebooks.NOT_RUN_AT_FULL_SIZE} here."
        )

    assert _broken(edit) == []


# ------------------------------------------------------------------------------
# the install cell's decisions, with pip replaced by a recorder


def _run_install_cell(monkeypatch, tmp_path, *, cwd, installed, gpu=False, tpu=False):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        if name == "dualflow" and not installed or name == "libtpu":
            return None
        return real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    real_glob = glob.glob
    monkeypatch.setattr(
        glob,
        "glob",
        lambda pat, *a, **k: (
            ["/dev/accel0"]
            if tpu and pat == "/dev/accel*"
            else []
            if pat.startswith("/dev/")
            else real_glob(pat, *a, **k)
        ),
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SMALL", "1")
    namespace: dict = {}
    exec(compile(notebooks.INSTALL_CELL, "<install cell>", "exec"), namespace)  # noqa: S102
    assert namespace["SMALL"] is True
    return calls


PIP = [sys.executable, "-m", "pip", "install", "-q"]


def test_install_cell_does_nothing_when_dualflow_is_importable(monkeypatch, tmp_path):
    assert _run_install_cell(monkeypatch, tmp_path, cwd=tmp_path, installed=True) == []


@pytest.mark.parametrize(
    "gpu, tpu, extra",
    [(False, False, ""), (True, False, "[cuda]"), (False, True, "[tpu]")],
)
def test_install_cell_in_a_clone_installs_it_editable(
    monkeypatch, tmp_path, gpu, tpu, extra
):
    calls = _run_install_cell(
        monkeypatch, tmp_path, cwd=ROOT / "notebooks", installed=False, gpu=gpu, tpu=tpu
    )
    assert calls == [[*PIP, "-e", f"{ROOT}{extra}"]]
    assert sys.path[0] == str(ROOT)


@pytest.mark.parametrize(
    "gpu, tpu, extra",
    [(False, False, ""), (True, False, "[cuda]"), (False, True, "[tpu]")],
)
def test_install_cell_outside_a_clone_installs_from_the_repository(
    monkeypatch, tmp_path, gpu, tpu, extra
):
    calls = _run_install_cell(
        monkeypatch, tmp_path, cwd=tmp_path, installed=False, gpu=gpu, tpu=tpu
    )
    assert calls == [
        [*PIP, f"dualflow{extra} @ git+https://github.com/dualflow/dualflow"]
    ]


def test_repo_url_is_the_project_repository():
    """The install cell, the Colab links and pyproject's address agree."""
    import tomllib

    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert f'REPO_URL = "{url["Repository"]}"' in notebooks.INSTALL_CELL
    assert url["Repository"] == "https://github.com/dualflow/dualflow"


def test_small_switch_reads_the_environment(monkeypatch):
    for value, small in [
        ("1", True),
        ("yes", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ]:
        monkeypatch.setenv("SMALL", value)
        namespace: dict = {}
        exec(compile(notebooks.INSTALL_CELL, "<install cell>", "exec"), namespace)  # noqa: S102
        assert namespace["SMALL"] is small
    monkeypatch.delenv("SMALL")
    namespace = {}
    exec(compile(notebooks.INSTALL_CELL, "<install cell>", "exec"), namespace)  # noqa: S102
    assert namespace["SMALL"] is False


def test_runner_refuses_to_write_a_notebook_whose_cell_fails(tmp_path):
    """A failing cell: exit 2, one error line, the file byte-identical."""
    nb = copy.deepcopy(_good())
    nb["cells"][2]["source"] = "raise ValueError('boom')"
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"c{i}"
        cell.setdefault("metadata", {})
    nb["metadata"]["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps(nb))
    before = path.read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "run_notebook.py"),
            "--small",
            "--write",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ValueError: boom" in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: bad.ipynb: a cell failed; the file is unchanged"]
    assert path.read_bytes() == before
