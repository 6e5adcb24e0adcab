"""`_durable.atomic_write`: the file appears complete or not at all."""

import errno
import os

import pytest

from keras_reptile import _durable


def test_the_file_appears_once_the_block_has_written_it(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with _durable.atomic_write(str(path)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        # Until the block ends, `path` still holds the previous contents.
        assert path.read_text() == "old"
        assert os.path.dirname(tmp) == str(tmp_path)
        assert tmp.endswith(".json")
    assert path.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with _durable.atomic_write(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_given_temporary_name_is_used(tmp_path):
    path = tmp_path / "latest.weights.h5"
    given = str(tmp_path / "latest.tmp.weights.h5")
    with _durable.atomic_write(str(path), given) as tmp:
        assert tmp == given
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert not os.path.exists(given)


def test_a_full_disk_is_named_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest.weights.h5"
    path.write_bytes(b"intact")
    given = str(tmp_path / "latest.tmp.weights.h5")
    # How h5py reports a full disk: its own words, the errno in the text.
    full = OSError(
        "Unable to synchronously close file (file write failed: errno = 28, "
        "error message = 'No space left on device')"
    )
    with pytest.raises(OSError) as raised:
        with _durable.atomic_write(str(path), given) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"torn")
            raise full
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value).startswith(
        f"[Errno 28] Could not write {path}: no space left on {tmp_path}."
    )
    assert raised.value.__cause__ is full
    assert path.read_bytes() == b"intact"
    assert sorted(os.listdir(tmp_path)) == ["latest.weights.h5"]


def test_other_errors_pass_through_unchanged(tmp_path):
    path = tmp_path / "state.json"
    denied = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError) as raised:
        with _durable.atomic_write(str(path)):
            raise denied
    assert raised.value is denied
    assert os.listdir(tmp_path) == []
