"""How many CPUs this process may really use: affinity and the cgroup quota, not the host's cores.

`os.cpu_count()` reports the host's cores; in a container limited to 2 CPUs on a 64-core host it
would size thread pools 32x too large, and the threads would fight over the quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cpu_quota(
    cpu_max: Path = CGROUP_V2_CPU_MAX,
    v1_quota: Path = CGROUP_V1_QUOTA,
    v1_period: Path = CGROUP_V1_PERIOD,
) -> int:
    """CPUs this process may use: min(affinity mask, ceil(cgroup quota / period)), at least 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        allowed = os.cpu_count() or 1
    quota = _cgroup_cpus(cpu_max, v1_quota, v1_period)
    return max(1, min(allowed, quota) if quota is not None else allowed)


def _cgroup_cpus(cpu_max: Path, v1_quota: Path, v1_period: Path) -> int | None:
    # cgroup v2: "max 100000" (no limit) or "<quota> <period>"; v1: two files, quota -1 = none
    try:
        quota_text, period_text = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota_text, period_text = v1_quota.read_text().strip(), v1_period.read_text().strip()
        except OSError:
            return None
    if quota_text in ("max", "-1"):
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None
