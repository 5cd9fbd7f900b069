"""`write_atomic`: the new file appears whole, or the old one stays and no temp file is left."""
from __future__ import annotations

from pathlib import Path

import pytest

from sdrun.atomic import write_atomic


def test_success_replaces_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    written = []

    def write(temp: Path) -> None:
        assert temp.parent == tmp_path and temp != path
        temp.write_text("new")
        written.append(temp)

    write_atomic(path, write)
    assert path.read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [path] and not written[0].exists()


def test_success_creates_a_missing_file(tmp_path):
    write_atomic(tmp_path / "new.bin", lambda temp: temp.write_bytes(b"\x00\x01"))
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["new.bin"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_previous_file_and_removes_the_temp(tmp_path, failure):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"previous")

    def write(temp: Path) -> None:
        temp.write_bytes(b"half of the new")
        raise failure

    with pytest.raises(type(failure)):
        write_atomic(path, write)
    assert path.read_bytes() == b"previous"
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_writer_that_writes_nothing_fails_and_leaves_the_file(tmp_path):
    path = tmp_path / "engine.plan"
    path.write_bytes(b"previous")
    with pytest.raises(FileNotFoundError):
        write_atomic(path, lambda temp: None)
    assert path.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [path]
