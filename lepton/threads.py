"""Intra-op threads per process: how many torch may use, from the cores this process may run on
and the processes sharing them (what torchrun does with OMP_NUM_THREADS).

Every role takes ``--threads N``; without it ``LEPTON_THREADS``; without that, the cores this
process may use (CPU affinity and a cgroup v2 CPU quota). ``lepton up`` sets ``LEPTON_THREADS``
for its children to the cores divided among the parameter servers and workers it starts, so
processes sharing a machine do not oversubscribe it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

ENV = "LEPTON_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# What `lepton up` gives its children (unless already set): the glibc allocator keeps freed
# buffers up to 32 MiB in the heap (no page faults for the next step's buffers) and backs the heap
# with transparent huge pages (docs/performance.md).
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def share(processes: int, cores: int | None = None) -> int:
    """Threads for each of ``processes`` processes sharing ``cores`` (default: this machine's)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, processes))


def chosen(flag: int | None, environ: Mapping[str, str] | None = None) -> int:
    """The intra-op threads a role uses: ``flag``, else ``$LEPTON_THREADS``, else the cores it may
    use. Raises ValueError for a count below 1 or an unreadable variable."""
    environ = os.environ if environ is None else environ
    if flag is None and environ.get(ENV, "").strip():
        try:
            flag = int(environ[ENV])
        except ValueError:
            raise ValueError(f"{ENV}={environ[ENV]!r} is not a whole number") from None
    if flag is None:
        return available_cores()
    if flag < 1:
        raise ValueError(f"--threads / {ENV} must be >= 1, got {flag}")
    return flag


def apply(flag: int | None) -> int:
    """Sets torch's intra-op threads for this process (see ``chosen``); returns the count."""
    import torch

    n = chosen(flag)
    torch.set_num_threads(n)
    return n


def child_environment(processes: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What ``lepton up`` adds to its children's environment: ``LEPTON_THREADS`` (the cores shared
    among ``processes``) and ``GLIBC_TUNABLES``, each unless the operator set it."""
    environ = os.environ if environ is None else environ
    extra = {}
    if not environ.get(ENV):
        extra[ENV] = str(share(processes))
    if "GLIBC_TUNABLES" not in environ:
        extra["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return extra
