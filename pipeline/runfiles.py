"""Resumable runs: the folder protocol shared by every stage that trains (train, pretrain, adapt).

A run folder holds an identity file, a trainer state and the run's outputs.

- ``RunFolder`` is entered before anything is read or written: it takes the folder's
  writer lock (``cache.store.StoreLock``), refuses files that are not the run's, and
  compares the identity with the one on disk. The same identity resumes; another one is
  refused in one line unless ``overwrite``.
- Nothing is written until the run writes its first file (``RunFolder.start``, called by
  ``save_state``): only then is a replaced run's folder cleared and the identity written,
  so a run refused at any point before (bad settings, a model that does not fit) leaves no
  file behind — not even the lock file in a folder it created.
- Every file goes through ``cache.atomic.atomic_write`` (fsync'd), so a run killed at any
  moment leaves the old or the new version of each file, never a torn one.
- A trainer state is a torch.save'd dict with ``format_version``; another version is
  refused (resuming from it would silently mix two versions of the training code).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache import schema
from cache.atomic import atomic_write, write_json
from cache.errors import UserError
from cache.store import StoreLock

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"  # the run's identity, compared on every rerun
TRAINER_NAME = "trainer_state.pt"  # what a resume reads


def save_state(path: Path, state: dict[str, Any], format_version: int) -> None:
    """``state`` plus its ``format_version``, torch.save'd atomically."""
    import torch  # here, not at the top: stats (and each of its Dask workers) imports this module without torch

    record = {"format_version": format_version, **state}
    atomic_write(path, lambda tmp: torch.save(record, tmp))


def load_state(path: Path, format_version: int, device: str = "cpu") -> dict[str, Any] | None:
    """The trainer state at ``path`` on ``device``, or None when there is none; other versions are refused."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises several types for corrupt files; its text would advise
        # weights_only=False, which runs whatever code the file holds
        raise UserError(f"{path} is not a readable trainer state (cut short or damaged); pass --overwrite to start "
                        "over") from None
    if state.get("format_version") != format_version:
        raise UserError(f"{path} has format version {state.get('format_version')}, this code writes "
                        f"{format_version}; pass --overwrite to start over")
    return state


def plot_losses(path: Path, losses: Sequence[float], title: str, *, ylabel: str, window: int) -> None:
    """Per-step losses and their running mean over ``window`` steps, as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="per step")
    window = max(1, min(window, len(losses)))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def refuse_foreign_files(out_dir: Path, our_files: Sequence[str], *, ignore_hidden: bool = False) -> None:
    """A stage's output folder may hold only the stage's own files and its writer lock: anything else is
    refused, never touched.

    ``ignore_hidden`` lets a run folder keep the temporary files of atomic writes.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a folder for --out")
    if out_dir.exists():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in (*our_files, schema.LOCK_FILE)
                         and not (ignore_hidden and p.name.startswith(".")))
        if foreign:
            raise UserError(f"{out_dir} holds other files ({foreign[0]}, ...); choose an empty or new --out")


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for section in new:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{section}.{key} is {a.get(key)!r} there, {b.get(key)!r} now"
        elif a != b:
            return f"{section} is {a!r} there, {b!r} now"
    return "identity differs"


class RunFolder:
    """The folder of one resumable run, held under its writer lock (use as a context manager).

    ``identity`` (a JSON-ready dict) is the run's identity, stored in ``identity_name``
    with package versions; ``our_files`` are the names (files or folders) the run may write.
    ``resumes`` says whether the files on disk belong to this run (so its state may be read).
    """

    def __init__(self, out_dir: Path, identity: dict[str, Any], *, kind: str, our_files: Sequence[str],
                 overwrite: bool, identity_name: str = CONFIG_NAME, state_name: str = TRAINER_NAME,
                 format_version: int):
        self.out_dir, self.identity, self.kind = Path(out_dir), identity, kind
        self.our_files = tuple(dict.fromkeys((identity_name, state_name, *our_files)))
        self.overwrite, self.identity_name, self.state_name = overwrite, identity_name, state_name
        self.format_version = format_version
        self.resumes = False
        self._started = False
        self._lock = StoreLock(self.out_dir)

    def __enter__(self) -> RunFolder:
        self._lock.__enter__()
        try:
            self._check()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__()  # a run that wrote nothing leaves nothing, not even the lock file

    def _check(self) -> None:
        """Decide resume / refuse / replace; nothing is written here."""
        refuse_foreign_files(self.out_dir, self.our_files, ignore_hidden=True)
        identity_path = self.out_dir / self.identity_name
        if identity_path.is_file():
            try:
                old = json.loads(identity_path.read_text())
            except json.JSONDecodeError:
                old = {}
            old_identity = {k: old.get(k) for k in self.identity}
            if old_identity == self.identity:
                self.resumes = self._started = True
                return
            if not self.overwrite:
                raise UserError(f"{self.out_dir} holds another {self.kind} run "
                                f"({_first_difference(old_identity, self.identity)}); rerun with its options to "
                                "resume, pass --overwrite to start over, or use another --out")
            log.info("overwriting the %s run in %s", self.kind, self.out_dir)
        elif (self.out_dir / self.state_name).exists() and not self.overwrite:
            raise UserError(f"{self.out_dir} has a {self.state_name} but no {self.identity_name}; pass --overwrite "
                            "to start over or use another --out")

    def start(self) -> None:
        """Before the run's first write: clear a replaced run's files and write the identity."""
        if self._started:
            return
        for name in self.our_files:
            path = self.out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        versions = {n: importlib.metadata.version(n) for n in ("torch", "open_clip_torch", "numpy")}
        write_json(self.out_dir / self.identity_name, {**self.identity, "versions": versions})
        self._started = True

    def load_state(self, device: str = "cpu") -> dict[str, Any] | None:
        """The run's trainer state, or None for a fresh (or replaced) run."""
        return load_state(self.out_dir / self.state_name, self.format_version, device) if self.resumes else None

    def save_state(self, state: dict[str, Any]) -> None:
        """Write the trainer state (a checkpoint), atomically."""
        self.start()
        save_state(self.out_dir / self.state_name, state, self.format_version)


def read_record(folder: Path, name: str, *, version_key: str, version: int, what: str, command: str) -> dict[str, Any]:
    """A results folder's record file, refused in one line when it is missing (the folder was never
    finished) or written by another format version."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder} is not a complete {what} folder (no {name}); write one with `{command}`")
    record = json.loads(path.read_text())
    found = record.get(version_key)
    if found != version:
        raise UserError(f"{folder} holds {what} format {found}, this pipeline reads {version}; rerun `{command}`")
    return record
