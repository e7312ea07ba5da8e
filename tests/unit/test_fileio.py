"""Atomic writes: the old file or the new one, never half of one, and no temporary file left behind."""

import errno
import json
import os
import stat

import pytest

from cvae_pipeline.errors import DiskFullError
from cvae_pipeline.fileio import atomic_path, remove_leftover_temporaries, write_json_atomic
from helpers import file_size_limit


def test_a_write_that_fails_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"elbo": -80.0})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"elbo": -7')  # half written when the writer fails
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"elbo": -80.0}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.json"]


def test_a_write_replaces_the_file_whole_with_the_umask_permissions(tmp_path):
    target = tmp_path / "deep" / "model.keras"  # folders are made, and the temporary ends like the target
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.endswith(".keras") and temporary != target
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_temporaries_a_killed_writer_left_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "checkpoint.npz"
    leftover = tmp_path / ".checkpoint.npz.abc123.tmp.npz"
    other = tmp_path / ".history.csv.abc123.tmp.csv"
    for path in (target, leftover, other):
        path.write_bytes(b"x")
    assert remove_leftover_temporaries(target) == [leftover]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([target.name, other.name])
    assert remove_leftover_temporaries(tmp_path / "absent" / "file.npz") == []


def test_a_write_past_a_file_size_limit_stops_in_one_line_naming_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"elbo": -80.0})
    with file_size_limit(1000), pytest.raises(DiskFullError) as stopped:
        write_json_atomic(target, {"elbo": -75.0, "padding": "x" * 5000})
    assert str(stopped.value).startswith(f"{target}: cannot be written (File too large); the previous metrics.json "
                                         "is kept as it was. Free some space")
    assert json.loads(target.read_text()) == {"elbo": -80.0}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_wrapped_by_a_writer_is_found_and_said_in_one_line(tmp_path, code):
    target = tmp_path / "models" / "cvae.keras"
    with pytest.raises(DiskFullError, match=rf"cvae.keras: cannot be written \({os.strerror(code)}\); nothing was "
                                            "written"), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        try:
            raise OSError(code, os.strerror(code))
        except OSError as error:
            raise ValueError("the writer's own error") from error
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
