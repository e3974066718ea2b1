"""A background thread that writes finished shards while the next ones are computed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """Runs ``write(*args)`` calls in order on one thread, at most ``depth`` waiting.

    The bounded queue keeps memory at ``depth + 1`` shards; an exception in the thread is
    re-raised by the next ``submit`` or by ``close``, so a failed write never goes unseen.
    """

    def __init__(self, write: Callable[..., None], depth: int = 1):
        self._write = write
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the caller
                    self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, *args: Any) -> None:
        self._raise_if_failed()
        self._queue.put(args)

    def close(self) -> None:
        """Wait for every submitted write; re-raise the first failure."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # finish what was queued (those shards are whole), then let the error through
            self._queue.put(None)
            self._thread.join()
