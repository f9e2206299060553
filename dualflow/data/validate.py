"""Checks of data read from disk: each failure is one :class:`DataError` line.

Every message has the form ``"<data set>: <file> <what is wrong>"`` and names
the first bad row or entry, e.g.::

    boston: /data/uci/boston/data.txt line 17 has 3 columns, expected 14
    boston: /data/uci/boston/data.txt line 5, column 2 is nan
    mnist: /data/mnist.npz test label 31 is 12, expected 0..9

Line and column numbers of text files count from 1 (as an editor shows them);
array entries are 0-based numpy indices.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dualflow.errors import DataError

__all__ = [
    "check_finite",
    "check_images",
    "check_labels",
    "check_range",
    "data_error",
    "read_int_list",
    "read_table",
]

Where = str | os.PathLike


def data_error(dataset: str, where: Where, detail: str) -> DataError:
    """``DataError("<dataset>: <where> <detail>")`` (to ``raise``)."""
    return DataError(f"{dataset}: {where} {detail}")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", errors="replace")
    return open(path, errors="replace")


def _data_lines(path: Path, delimiter: str | None) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-blank lines (``#`` starts a comment)."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if delimiter is None:
                yield lineno, text.split()
            else:
                yield lineno, [t.strip() for t in text.split(delimiter)]


def _parse(tok: str, dtype) -> float | int:
    return int(tok) if np.issubdtype(dtype, np.integer) else float(tok)


def _scan_table(
    path: Path, dataset: str, ncols: int | None, delimiter: str | None, dtype
) -> None:
    """Find the first malformed line of a table and raise its :class:`DataError`."""
    kind = "an integer" if np.issubdtype(dtype, np.integer) else "a number"
    for lineno, fields in _data_lines(path, delimiter):
        if ncols is None:
            ncols = len(fields)
        if len(fields) != ncols:
            raise data_error(
                dataset,
                path,
                f"line {lineno} has {len(fields)} columns, expected {ncols}"
                " (truncated or malformed file?)",
            )
        for col, tok in enumerate(fields, 1):
            try:
                value = _parse(tok, dtype)
            except ValueError:
                raise data_error(
                    dataset, path, f"line {lineno}, column {col} is {tok!r}, not {kind}"
                ) from None
            if not np.isfinite(value):
                raise data_error(dataset, path, f"line {lineno}, column {col} is {tok}")


def _line_of_row(path: Path, row: int, delimiter: str | None) -> int:
    """The 1-based line number of the ``row``-th (0-based) data line."""
    for i, (lineno, _) in enumerate(_data_lines(path, delimiter)):
        if i == row:
            return lineno
    return -1


def read_table(
    path: Where,
    dataset: str,
    *,
    ncols: int | None = None,
    delimiter: str | None = None,
    dtype=np.float64,
) -> np.ndarray:
    """A numeric text table (``.gz`` allowed) as ``[rows, cols]``, checked.

    Every non-blank line must have the same number of columns (``ncols`` if
    given, else that of the first line) and every entry must parse as ``dtype``
    and be finite; the file must have at least one row.  Fast path
    ``np.loadtxt``; on any failure the file is scanned line by line so the
    :class:`DataError` names the first bad line and column.
    """
    path = Path(path)
    failure: BaseException | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data"
            table = np.loadtxt(path, dtype=dtype, ndmin=2, delimiter=delimiter)
    except (ValueError, IndexError, EOFError, OSError) as err:
        failure = err
    if failure is not None:
        # outside the except block: the DataError carries no numpy traceback
        if isinstance(failure, OSError) and not isinstance(failure, gzip.BadGzipFile):
            raise data_error(dataset, path, f"cannot be read ({failure})")
        try:
            _scan_table(path, dataset, ncols, delimiter, dtype)
        except (OSError, EOFError) as err:
            raise data_error(dataset, path, f"cannot be read ({err})") from None
        raise data_error(dataset, path, f"cannot be parsed ({failure})")
    if table.size == 0:
        raise data_error(dataset, path, "is empty (no data rows)")
    if ncols is not None and table.shape[1] != ncols:
        line = _line_of_row(path, 0, delimiter)
        raise data_error(
            dataset, path, f"line {line} has {table.shape[1]} columns, expected {ncols}"
        )
    bad = np.argwhere(~np.isfinite(table)) if table.dtype.kind == "f" else []
    if len(bad):
        r, c = (int(v) for v in bad[0])
        line = _line_of_row(path, r, delimiter)
        raise data_error(dataset, path, f"line {line}, column {c + 1} is {table[r, c]}")
    return table


def read_int_list(
    path: Where,
    dataset: str,
    *,
    low: int | None = None,
    high: int | None = None,
    what: str = "value",
) -> np.ndarray:
    """All integers of a whitespace-separated text file, each in ``[low, high)``.

    The :class:`DataError` names the first entry that is not an integer or is
    out of range (by line number), or says the file is empty.
    """
    path = Path(path)
    values: list[int] = []
    lines: list[int] = []
    try:
        for lineno, fields in _data_lines(path, None):
            for tok in fields:
                try:
                    values.append(int(tok))
                except ValueError:
                    raise data_error(
                        dataset, path, f"line {lineno}: {tok!r} is not an integer"
                    ) from None
                lines.append(lineno)
    except OSError as err:
        raise data_error(dataset, path, f"cannot be read ({err})") from None
    if not values:
        raise data_error(dataset, path, "is empty (expected integers)")
    a = np.asarray(values, dtype=np.int64)
    lo = low if low is not None else np.iinfo(np.int64).min
    hi = high if high is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((a < lo) | (a >= hi))
    if bad.size:
        i = int(bad[0])
        if low is not None and high is not None:
            span = f"{low}..{high - 1}"
        else:
            span = f">= {low}" if low is not None else f"< {high}"
        raise data_error(
            dataset,
            path,
            f"line {lines[i]}: {what} {a[i]} is outside {span}",
        )
    return a


def check_finite(a: np.ndarray, dataset: str, where: Where, what: str) -> None:
    """Raise a :class:`DataError` naming the first non-finite entry of ``a``."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        idx = tuple(int(v) for v in bad[0])
        raise data_error(
            dataset,
            where,
            f"{what} entry {idx if len(idx) > 1 else idx[0]} is {a[idx]}",
        )


def check_range(
    a: np.ndarray, dataset: str, where: Where, what: str, low: float, high: float
) -> None:
    """Raise a :class:`DataError` naming the first entry outside ``[low, high]``
    (non-finite entries included)."""
    a = np.asarray(a)
    check_finite(a, dataset, where, what)
    bad = np.argwhere((a < low) | (a > high))
    if len(bad):
        idx = tuple(int(v) for v in bad[0])
        raise data_error(
            dataset,
            where,
            f"{what} entry {idx if len(idx) > 1 else idx[0]} is {a[idx]},"
            f" expected {low:g}..{high:g}",
        )


def check_labels(
    y: np.ndarray,
    dataset: str,
    where: Where,
    split: str,
    num_classes: int,
    n: int | None = None,
) -> None:
    """Labels: shape ``[n]``, integer dtype, values in ``0..num_classes - 1``."""
    y = np.asarray(y)
    if n is not None and y.shape != (n,):
        raise data_error(
            dataset,
            where,
            f"{split} labels have shape {y.shape}, expected ({n},) to match the images",
        )
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise data_error(
            dataset, where, f"{split} labels have dtype {y.dtype}; expected integers"
        )
    if y.size == 0:
        return
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise data_error(
            dataset,
            where,
            f"{split} labels span [{y.min()}, {y.max()}], expected"
            f" 0..{num_classes - 1}; first bad: label {i} is {y[i]}",
        )


def check_images(
    x: np.ndarray, dataset: str, where: Where, split: str, shape: Sequence[int]
) -> None:
    """Images: ``[N, *shape]`` uint8 with ``N > 0``."""
    x = np.asarray(x)
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != tuple(shape):
        raise data_error(
            dataset,
            where,
            f"{split} images have shape {x.shape}, expected"
            f" [N, {', '.join(map(str, shape))}]",
        )
    if x.dtype != np.uint8:
        raise data_error(
            dataset, where, f"{split} images have dtype {x.dtype}, expected uint8"
        )
    if len(x) == 0:
        raise data_error(dataset, where, f"has an empty {split} split (0 images)")
