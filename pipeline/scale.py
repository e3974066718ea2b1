"""Dask clients for scale-out: a LocalCluster on this machine or any scheduler address."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from cache.errors import UserError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(scheduler: str, n_workers: int = 2) -> Iterator[object]:
    """``local`` starts a LocalCluster of single-threaded worker processes; anything else is
    a scheduler address (``tcp://host:8786``) whose workers must see the same file system."""
    from distributed import Client, LocalCluster

    if scheduler == "local":
        if n_workers < 1:
            raise UserError(f"--n-workers must be at least 1 (got {n_workers})")
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            log.info("started a local Dask cluster with %d workers", n_workers)
            yield client
        return
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as err:
        raise UserError(f"cannot reach the Dask scheduler at {scheduler} ({err}); start it with "
                        "`dask scheduler` and workers with `dask worker ADDRESS`, or use --cluster local") from None
    with client:
        yield client
