"""Atomic file writes for everything the runtime and the pipeline write (shards, manifests,
model folders, run files): readers see the old file or the new one, never a part.

vqmodel keeps a private copy for its checkpoints: the model library imports nothing of the
runtime, and the runtime nothing of the (torch) library; both are held to the same test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically and durably.

    Temp file in the same directory (os.replace is only atomic within one file system), fsync of
    the file before the rename and of the directory after it (so the rename itself survives a
    power cut). The temp file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a served model folder must be world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in `directory` survive a power cut (POSIX; no-op elsewhere)."""
    if os.name != "posix":
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def point_symlink_atomic(link: str | os.PathLike[str], target: str) -> None:
    """Make `link` a symlink to `target` (relative to the link's directory) atomically: a new
    link under a temp name, renamed over the old one; readers see the old target or the new."""
    link = Path(link)
    temp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, link)
    fsync_directory(link.parent)


def replace_directory(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Rename the finished directory `new` to `out`; an old `out` is moved aside first, then
    removed (readers see the old directory or the new one, never a mix of files)."""
    new, out = Path(new), Path(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)
