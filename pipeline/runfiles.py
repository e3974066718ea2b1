"""Files of resumable training runs: atomic writes, the run folder's identity, the loss-curve plot.

Shared by the stages that train (pretrain, adapt): a run killed at any moment must leave
either the old or the new version of every file, never a torn one.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import UserError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"  # the run's identity, compared on every rerun
TRAINER_NAME = "trainer_state.pt"  # what a resume reads


def load_trainer_state(out_dir: Path, format_version: int, device: str) -> dict[str, Any] | None:
    """The run's ``trainer_state.pt`` on ``device``, or None when there is none yet.

    A state written by another format version is refused: resuming from it would silently
    mix two versions of the training code.
    """
    import torch  # here, not at the top: stats (and each of its Dask workers) imports this module without torch

    path = out_dir / TRAINER_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format_version") != format_version:
        raise UserError(f"{path} has format version {state.get('format_version')}, this code writes "
                        f"{format_version}; pass --overwrite to start over")
    return state


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then move it onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


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
    """A stage's output folder may hold only the stage's own files: anything else is refused, never touched.

    ``ignore_hidden`` lets a run folder keep its lock file and temporary files of atomic writes.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a folder for --out")
    if out_dir.exists():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in our_files and not (ignore_hidden and p.name.startswith(".")))
        if foreign:
            raise UserError(f"{out_dir} holds other files ({foreign[0]}, ...); choose an empty or new --out")


def run_locked(out_dir: Path, threads: int | None, work: Callable[[], Any]) -> Any:
    """``work()`` holding ``out_dir``'s writer lock, with ``threads`` torch CPU threads (restored after)."""
    import torch

    from cache.store import StoreLock

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with StoreLock(out_dir):
            return work()
    finally:
        torch.set_num_threads(previous_threads)


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


def prepare_run_folder(out_dir: Path, identity: dict[str, Any], overwrite: bool, *, kind: str,
                       our_files: Sequence[str]) -> None:
    """Resume, refuse or replace the run in ``out_dir``; config.json holds ``identity``.

    The same identity resumes. Another identity is refused unless ``overwrite`` (then
    ``our_files`` are deleted); so is a trainer state without config.json. Files that are
    not ours are never touched: the folder is refused.
    """
    config_path = out_dir / CONFIG_NAME
    refuse_foreign_files(out_dir, our_files, ignore_hidden=True)
    if config_path.is_file():
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            old = {}
        old_identity = {k: old.get(k) for k in identity}
        if old_identity == identity:
            return
        if not overwrite:
            raise UserError(f"{out_dir} holds another {kind} run ({_first_difference(old_identity, identity)}); "
                            "rerun with its options to resume, pass --overwrite to start over, or use another --out")
        log.info("overwriting the run in %s", out_dir)
    elif (out_dir / TRAINER_NAME).exists() and not overwrite:
        raise UserError(f"{out_dir} has a {TRAINER_NAME} but no {CONFIG_NAME}; pass --overwrite to start over "
                        "or use another --out")
    for name in our_files:
        (out_dir / name).unlink(missing_ok=True)
    versions = {n: importlib.metadata.version(n) for n in ("torch", "open_clip_torch", "numpy")}
    write_json(config_path, {**identity, "versions": versions})
