"""Atomic file writes for everything the runtime and the pipeline write (shards, manifests,
model folders, run files): readers see the old file or the new one, never a part.

vqmodel keeps a private copy for its checkpoints: the model library imports nothing of the
runtime, and the runtime nothing of the (torch) library; both are held to the same test.
"""

from __future__ import annotations

import os
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
