"""Training curves the DVC way: a dvclive folder that `dvc plots show`, `dvc exp show` and the
VS Code extension read while a run trains (train, pretrain, adapt).

The folder holds ``plots/metrics/<name>.tsv`` (one row per logged step; dvclive's step is the
run's training step) and ``metrics.json`` (the latest value of each curve and ``step``).
A run resumed from its checkpoint at step ``s`` first drops the rows after ``s`` (logged by
the killed run beyond its last checkpoint), so every step is in the curves once; a fresh run
starts the folder over. Non-finite values are left out: dvclive would write the text "nan",
which plots skip and strict JSON parsers refuse. No DVC experiment is saved and no dvc.yaml
written: dvc.yaml (app/dvcfile.py) declares the folder's files itself.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.atomic import atomic_write

LIVE_DIR = "dvclive"  # a run folder's default dvclive folder
METRICS_FILE = "metrics.json"  # dvclive's summary: the latest values
PLOTS_DIR = "plots/metrics"  # dvclive's curves, one .tsv per metric


def open_live(live_dir: Path, resume_step: int | None) -> Any:
    """A ``dvclive.Live`` on ``live_dir``: continuing after ``resume_step``, or a fresh folder when None."""
    from dvclive import Live  # here: importing dvclive imports dvc, which the rest of a stage does not need

    class _Live(Live):
        def _init_dvc(self) -> None:
            """dvclive runs `dvc init` in a Git repository that has no DVC; we only write files, so
            outside a DVC project its DVC set-up is skipped and the user's repository is left alone."""
            if os.environ.get("DVC_ROOT") or _in_dvc_project(Path.cwd()):
                super()._init_dvc()

    live_dir = Path(live_dir)
    if resume_step is not None:
        _drop_after(live_dir / PLOTS_DIR, resume_step)
    return _Live(str(live_dir), resume=resume_step is not None, save_dvc_exp=False, dvcyaml=None, report=None)


def _in_dvc_project(folder: Path) -> bool:
    return any((d / ".dvc").is_dir() for d in (folder, *folder.parents))


def log_step(live: Any, step: int, metrics: Mapping[str, Any]) -> None:
    """The finite numbers of ``metrics`` as the curves' values at ``step``; updates metrics.json."""
    live.step = step
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            live.log_metric(name, value)
    live.next_step()


def _drop_after(plots_dir: Path, step: int) -> None:
    """Rows of every curve with a step after ``step`` removed (atomically, file by file)."""
    for path in sorted(plots_dir.rglob("*.tsv")) if plots_dir.is_dir() else ():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        kept = [row for row in rows if int(row["step"]) <= step]
        if len(kept) == len(rows):
            continue
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(path, lambda tmp, body=text.getvalue(): Path(tmp).write_text(body))
