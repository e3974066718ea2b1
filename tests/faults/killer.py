"""``python -m tests.faults.killer ARGS``: the `pipeline` CLI, SIGKILLed just before its N-th write.

A write is any audit event that changes the file system under one of the paths in ``FAULT_UNDER``
(separated by ``os.pathsep``: the outputs of the command, so making their parent folders does not
count, and a run counts the same writes wherever it starts from): opening a file
for writing, renaming, removing. ``FAULT_KILL_AT=N`` kills the process (all its
threads) before the N-th; without it the run completes and ``FAULT_COUNT_FILE`` receives the
number of writes it made, so a test can kill a later run at its creation, midway or at its last
write. Python's audit hooks see every such call, including zarr's and torch's, without patching.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

UNDER = tuple(os.path.realpath(p) for p in os.environ["FAULT_UNDER"].split(os.pathsep))
KILL_AT = int(os.environ.get("FAULT_KILL_AT", "0"))
COUNT_FILE = os.environ.get("FAULT_COUNT_FILE")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Making folders is not counted: zarr writes chunks from several threads, and how many of them try
# to make the same new folder depends on timing, which would make the count vary under load.
PATH_ARG = {"open": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0, "os.truncate": 0}
n_writes = 0


def _is_write(event: str, args: tuple) -> bool:
    if event != "open":
        return True
    _, mode, flags = args
    return any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)


def _hook(event: str, args: tuple) -> None:
    global n_writes
    if event not in PATH_ARG or not _is_write(event, args):
        return
    path = args[PATH_ARG[event]]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    path = os.path.realpath(os.fsdecode(path))
    if not any(path == top or path.startswith(top + os.sep) for top in UNDER):
        return
    n_writes += 1
    if n_writes == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _report() -> None:
    if COUNT_FILE:
        with open(COUNT_FILE, "w") as f:
            f.write(str(n_writes))


if __name__ == "__main__":
    atexit.register(_report)
    sys.addaudithook(_hook)
    from app.cli import main

    main(sys.argv[1:], prog_name="pipeline")
