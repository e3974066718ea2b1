"""How many CPUs this process may use, and keeping torch (and the processes it starts) to them.

torch starts one thread per core of the machine. Beside other stages, Dask workers or jobs on a
shared node, or inside a container with a CPU quota, those threads outnumber the CPUs the process
really has and wait on each other: measured in issue 19, `pipeline pretrain` among four other jobs
on 2 cores ran 18x slower than alone. So every compute stage sizes torch to ``available_cpus()``
(or ``--threads``), Dask workers to their share of it, and OpenMP threads sleep instead of spinning
when they wait (``quiet_openmp``, set by the CLI before torch is first imported).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")
log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # read by the processes we start
QUIET_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}  # a waiting OpenMP thread sleeps instead of spinning on a core
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``), at least 1. A quota of 1.5 CPUs gives 1 thread: a second would be throttled."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, n if quota is None else min(n, math.floor(quota)))


def _cgroup_quota(root: Path) -> float | None:
    """The smallest CPU quota (in CPUs) on the way from this process's cgroup up to ``root``."""
    quotas = []
    for own in _own_cgroups():
        for folder in (root / own, root / "cpu" / own, root / "cpu,cpuacct" / own):
            for d in (folder, *folder.parents):
                if not d.is_relative_to(root):
                    break
                quota = _read_quota(d)
                if quota is not None:
                    quotas.append(quota)
    return min(quotas, default=None)


def _own_cgroups() -> set[str]:
    """This process's cgroup paths (relative), from /proc/self/cgroup; '' when it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {""}
    return {""} | {line.split(":", 2)[2].lstrip("/") for line in lines if line.count(":") >= 2}


def _read_quota(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "150000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 is no quota
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def quiet_openmp() -> None:
    """OpenMP threads sleep while they wait, unless the user chose otherwise; must run before torch is
    imported (OpenMP reads it once). Spinning threads take cores from the other processes on them."""
    for name, value in QUIET_OPENMP.items():
        os.environ.setdefault(name, value)


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory it frees and serve large blocks from it, once per process.

    By default glibc gives every block above a (moving) threshold its own fresh mmap and returns it on
    free, so each forward pass pays for its large temporaries again in page faults, the kernel zeroing
    the pages while torch's threads wait. Measured in issue 19 (ViT-B-16, 32 images, 2 threads): inside
    ``pipeline extract`` the forward took 703K minor page faults and 18 % more CPU time than the same
    forward called bare; with this setting 484 faults and 4 %. The cost: freed memory stays with the
    process (its peak), which a stage reaches anyway. Left alone when the user set any MALLOC_* variable
    or the C library is not glibc. Returns whether the setting was applied.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    libc = ctypes.CDLL(None)
    # trim threshold first: setting it also stops glibc from moving the mmap threshold on its own
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_MMAP_MAX, 0))


@contextlib.contextmanager
def use_threads(threads: int | None) -> Iterator[int]:
    """Inside the block, torch's CPU threads (and the OpenMP, MKL and OpenBLAS threads of the processes
    this one starts) are ``threads``, default ``available_cpus()``; restored after. Freed memory is
    reused from then on (``reuse_freed_memory``)."""
    import torch

    reuse_freed_memory()

    n = available_cpus() if threads is None else int(threads)
    previous, environ = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op work; intra-op is what counts
        torch.set_num_interop_threads(n)
    os.environ.update({name: str(n) for name in THREAD_VARIABLES})
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sized(run: Callable[[Any], R]) -> Callable[[Any], R]:
    """A stage's ``run(cfg)`` inside ``use_threads(cfg.threads)``: every compute stage sizes torch alike."""
    @functools.wraps(run)
    def sized_run(cfg: Any) -> R:
        with use_threads(cfg.threads) as n:
            log.debug("torch uses %d CPU threads", n)
            return run(cfg)
    return sized_run


def worker_share(threads: int | None, n_workers: int) -> int:
    """Each of ``n_workers`` Dask workers' share of the threads: ``threads // n_workers``, at least 1."""
    return max(1, (available_cpus() if threads is None else threads) // n_workers)


def in_share(fn: Callable[..., R], share: int | None) -> Callable[..., R]:
    """``fn`` to run on a Dask worker with torch at ``share`` threads; None: the worker's own share of
    its CPUs (a worker of a remote cluster, whose size only it knows)."""
    return functools.partial(_call_in_share, fn, share)


def _call_in_share(fn: Callable[..., R], share: int | None, *args: Any, **kwargs: Any) -> R:
    if share is None:
        from distributed import get_worker

        share = max(1, available_cpus() // get_worker().state.nthreads)
    with use_threads(share):
        return fn(*args, **kwargs)
