"""Atomic writes: the runtime's (service.files) and the library's private copy behave alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import files as service_files
from service.files import point_symlink_atomic, replace_directory
from vqmodel import checkpoint as library_files

WRITERS = [service_files.write_bytes_atomic, library_files.write_bytes_atomic]


@pytest.mark.parametrize("write", WRITERS)
def test_readers_see_old_or_new_and_no_temp_is_left(write, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "file.bin"
    write(target, b"old")
    assert target.read_bytes() == b"old" and oct(target.stat().st_mode & 0o777) == oct(0o644)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


@pytest.mark.parametrize("write", WRITERS)
def test_the_directory_is_fsynced_after_the_rename(write, tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write(tmp_path / "file.bin", b"data")
    assert synced[-1] == str(tmp_path)  # the rename itself is made durable
    assert len(synced) == 2  # the file, then its directory


def test_point_symlink_atomic_moves_a_link(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "latest"
    point_symlink_atomic(link, "a")
    assert os.readlink(link) == "a"
    point_symlink_atomic(link, "b")
    assert os.readlink(link) == "b" and link.resolve() == (tmp_path / "b").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]  # no temp left


def test_replace_directory_swaps_whole_folders(tmp_path: Path) -> None:
    out, new = tmp_path / "model", tmp_path / ".model.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_directory(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old folder is gone
