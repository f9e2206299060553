"""Results are written atomically: a failed write keeps the previous file."""

import json

import pytest

from dualflow.io import write_json_atomic


def test_write_then_failed_write_keeps_previous(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp left


def test_atomic_json_gets_the_usual_file_permissions(tmp_path):
    import os
    import stat

    from dualflow.io import write_json_atomic

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", [1])
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
