"""The workdir lock on file systems without ``flock`` (Google Drive on Colab,
some NFS/FUSE mounts): run unlocked with one warning line, instead of calling
the workdir busy; a lock held by another run still refuses."""

from __future__ import annotations

import errno
import fcntl

import pytest

from dualflow.train.workdir import WorkdirBusyError, WorkdirLock


def _flock_raising(code):
    def flock(fd, op):
        raise OSError(code, "nope")

    return flock


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_no_lock_support_runs_unlocked_with_a_warning(
    monkeypatch, tmp_path, capsys, code
):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(code))
    with WorkdirLock(tmp_path) as lock:
        assert lock._fd is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support file locks" in err[0]


@pytest.mark.parametrize("code", [errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES])
def test_a_held_lock_is_still_refused(monkeypatch, tmp_path, code):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(code))
    with pytest.raises(WorkdirBusyError, match="is in use by another run"):
        with WorkdirLock(tmp_path):
            pass
