"""How many CPUs a process may use, and Dask workers running torch at their share of them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import torch

from pipeline import threads
from pipeline.statistics import compute

ROOT = Path(__file__).resolve().parents[2]


def test_available_cpus_follows_the_affinity_not_the_machine():
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); from pipeline.threads import available_cpus; "
            "print(available_cpus())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: a second thread would be throttled
    ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "100000000 100000\n"}, None),  # a quota above the affinity: the affinity
])
def test_available_cpus_honours_a_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.available_cpus(tmp_path) == (expected or len(os.sched_getaffinity(0)))


def test_use_threads_sets_torch_and_the_children_environment_then_restores_them(monkeypatch):
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with threads.use_threads(3) as n:
        assert n == 3 and torch.get_num_threads() == 3
        assert all(os.environ[name] == "3" for name in threads.THREAD_VARIABLES)
    assert torch.get_num_threads() == before and "MKL_NUM_THREADS" not in os.environ


def test_worker_share():
    assert [threads.worker_share(t, 2) for t in (1, 2, 4, 5)] == [1, 1, 2, 2]
    assert threads.worker_share(None, 1) == threads.available_cpus()


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_a_local_dask_worker_runs_torch_at_its_share(scheduler):
    """stats' schedulers: 4 threads over 2 workers, so each worker's torch uses 2."""
    counts = compute([dask.delayed(lambda i: torch.get_num_threads(), pure=False)(i) for i in range(4)],
                     scheduler, n_workers=2, threads=4)
    assert set(counts) == {2}


def test_a_local_cluster_worker_runs_torch_at_its_share():
    """extract --scheduler local: the task runs under ``in_share`` (the workers start at 1 thread)."""
    from pipeline.scale import dask_client

    with dask_client("local", n_workers=2) as client:
        share = threads.worker_share(4, 2)
        counts = client.gather(client.map(threads.in_share(lambda i: torch.get_num_threads(), share), range(4),
                                          pure=False))
        remote = client.submit(threads.in_share(lambda: torch.get_num_threads(), None), pure=False).result()
    assert set(counts) == {2}
    assert remote == threads.available_cpus()  # a cluster's worker of one thread takes all its CPUs


_FAULTS = """
import resource, sys, torch
from pipeline.threads import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
def churn():  # what a forward pass does: large temporaries, written, then freed
    for _ in range(3):
        x = torch.empty(40 * 2**20 // 4)  # above glibc's largest mmap threshold (32 MiB), like a ViT-B MLP's hidden
        x.fill_(1.0)
        del x
for _ in range(3):  # glibc settles after a few rounds
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    def faults(mode: str, **env: str) -> tuple[str, int]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=environ,
                             check=True).stdout.split()
        return out[0], int(out[1])

    pages = 3 * 40 * 2**20 // 4096  # 3 blocks of 40 MiB: 30,720 pages
    applied, default = faults("default")
    assert default > 0.9 * pages  # glibc maps every block afresh and the kernel zeroes it again
    applied, reused = faults("reuse")
    assert applied == "True" and reused < 0.02 * pages
    applied, chosen = faults("reuse", MALLOC_ARENA_MAX="2")  # the user's own malloc settings win
    assert applied == "False" and chosen > 0.9 * pages
