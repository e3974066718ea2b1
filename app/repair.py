"""`pipeline repair STORE`: recompute exactly the damaged shards of a store.

`verify` finds the shards whose content no longer matches its digests (or cannot be read);
repair marks them incomplete and reruns the command that created the store, recorded in its
``writer`` attribute. That command resumes, so it recomputes those shards and nothing else;
the repaired store equals one that was never damaged, byte for byte.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import stages
from cache import schema
from cache.check import verify
from cache.codes import CodeStore
from cache.errors import UserError
from cache.store import ActivationStore, StoreLock, _is_kind
from pipeline.configs import from_section


def run(path: Path) -> list[str]:
    """Repair the store at ``path``; the lines to print (what was wrong, what was recomputed, the new verdict)."""
    path = Path(path).resolve()
    report = verify(path)
    shards = report.repairable
    if not shards and not report.incomplete_shards:
        if report.ok:
            return [f"{path}: every shard is intact; nothing to repair"]
        raise UserError(f"{path} has problems that recomputing shards cannot fix (see `pipeline verify {path}`)")
    store = CodeStore(path, mode="r+") if _is_kind(path, schema.KIND_CODES) else ActivationStore(path, mode="r+")
    writer = store.attrs.get(schema.ATTR_WRITER)
    if not writer:
        raise UserError(f"{path} does not record the command that wrote it; rerun that command with --overwrite")
    stage = stages.load(writer["stage"])
    cfg = from_section(stage.config, f"{path} (its writer record)", writer["config"],
                       bound={stage.writes[0]: path, "overwrite": False})
    if not Path(writer["cwd"]).is_dir():
        raise UserError(f"{path} was written from {writer['cwd']}, which no longer exists, and its settings may hold "
                        "paths relative to it; rerun the command that wrote it")
    with StoreLock(path):
        store.invalidate(shards)
    with contextlib.chdir(writer["cwd"]):
        stage.run(cfg)
    after = verify(path)
    done = f"recomputed {len(shards)} damaged shard(s) {shards}" if shards else "finished the incomplete shards"
    return [f"{path}: {done} with `pipeline {stage.command or stage.name}`", *after.lines()[1:]]
