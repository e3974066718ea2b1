"""Extraction on dask.distributed: one task per shard, bit-identical to one process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zarr
from distributed import Client, LocalCluster

from cache import schema
from stages import extract
from tests.helpers import make_extract_config, tree_digest


def test_local_cluster_equals_single_process(tmp_path):
    single = make_extract_config(tmp_path / "single", limit=40, images_per_shard=8)
    extract.run(single)
    dist = make_extract_config(tmp_path / "dist", limit=40, images_per_shard=8, scheduler="local", n_workers=2)
    out = extract.run(dist)
    assert out.n_computed == 40
    assert tree_digest(dist.out_dir) == tree_digest(single.out_dir)


@pytest.mark.slow
def test_killed_worker_shard_is_redone(tmp_path):
    kw = dict(limit=240, images_per_shard=24, batch_size=1)
    single = make_extract_config(tmp_path / "single", **kw)
    extract.run(single)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        cfg = make_extract_config(tmp_path / "dist", scheduler=cluster.scheduler_address, **kw)
        killed = []

        def kill_one_worker_mid_run() -> None:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    n_done = int(zarr.open_group(cfg.out_dir, mode="r")[schema.DONE][:].sum())
                except Exception:  # noqa: BLE001 - not created yet
                    n_done = 0
                if n_done >= 2:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(n_done)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_one_worker_mid_run)
        killer.start()
        extract.run(cfg)
        killer.join()
    assert killed and killed[0] < 10, "the worker must die while shards were still pending"
    assert tree_digest(cfg.out_dir) == tree_digest(single.out_dir)
