"""What a training run and an export record about where and how they ran.

Every field comes from the running process or the machine (no typed figures): the git revision
(and whether the tree had uncommitted changes), the command line, the hardware, UTC timestamps.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it: the program's name (not its full path) and its args."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


# the code a training run or an export executes (service/ lends only its torch-free contract)
CODE_PATHS = (
    "training",
    "vqmodel",
    "service/images.py",
    "service/model_dir.py",
    "service/files.py",
)


def git_state() -> dict[str, Any]:
    """{"git_rev": HEAD or None, "git_dirty": uncommitted changes to the tracked CODE_PATHS (what
    training and export run), or None without git}."""
    rev = _git("rev-parse", "HEAD")
    status = (
        _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) if rev else None
    )
    return {"git_rev": rev or None, "git_dirty": None if status is None else bool(status.strip())}


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def hardware() -> dict[str, Any]:
    """CPU model, logical CPUs usable by this process, machine architecture, OS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpus": cpus,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
