"""Room on disk for a run's outputs: the one check every stage that writes large files goes through.

A run that cannot fit is refused before its first byte, and a disk that fills up anyway (another
process wrote to it) ends the run in one line instead of a traceback: every shard and checkpoint
is written whole or not at all (``cache.atomic``), so rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from cache.atomic import is_disk_full
from cache.errors import UserError


def human_bytes(n: float) -> str:
    """A size as people read it: 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write on ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def used_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


@contextlib.contextmanager
def room_for(folder: Path, total: int, *, resumes: str) -> Iterator[None]:
    """Refuse up front when ``folder`` (which exists) cannot grow to ``total`` bytes; inside the block,
    turn running out of space into one line saying how to go on.

    What the folder holds already is subtracted, since a resumed run keeps it and a replaced one
    deletes it first. ``resumes`` says where the rerun picks up (e.g. "the last complete shard").
    """
    needed = max(0, total - used_bytes(folder))
    free = free_bytes(folder)
    if needed > free:
        raise UserError(f"{folder} needs about {human_bytes(needed)} but its disk has {human_bytes(free)} free; "
                        "free some space or choose another --out (nothing was written)")
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise UserError(f"disk full while writing {folder}: {human_bytes(needed)} needed, "
                        f"{human_bytes(free_bytes(folder))} free; free space and rerun the same command — "
                        f"it resumes from {resumes}") from None
