"""Atomic file writes: the one implementation every store, checkpoint and run file goes through.

A crash (even SIGKILL or power loss) leaves either the old or the new file, never a torn
one: the bytes go to a temporary file in the same folder, which is fsync'd, moved onto the
target with ``os.replace``, and the folder is fsync'd so the rename itself is durable.
Temporary files are named ``.<name>.tmp-<random>``; a writer killed mid-write leaves one
behind, which the next writer of the folder deletes (``cache.store.StoreLock``).

A write that fails because the disk is full raises ``OSError(ENOSPC)`` whatever the writing library
said (torch.save reports it as a RuntimeError without the cause), so callers test for one thing.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache import jsonfile


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, fsync it, move it onto ``path``, fsync the folder."""
    path = Path(path)
    # the random part after the last dot: torch.save names its archive after the file's stem, so the
    # bytes of a checkpoint (whose sha256 stores record) do not change from run to run
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and (is_disk_full(err) or os.statvfs(path.parent).f_bavail == 0)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_disk_full(err: BaseException) -> bool:
    """True when ``err``, or an error it was raised from, is the file system running out of space
    (safetensors says so only in its message)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def write_json(path: Path, record: Any) -> None:
    """``record`` as indented strict JSON (``cache.jsonfile``: no NaN, a null says why), atomically."""
    text = jsonfile.dumps(record) + "\n"  # before the temporary file: a refusal leaves nothing behind
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
