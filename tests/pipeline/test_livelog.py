"""dvclive curves: one row per logged step, also after a resume from an earlier checkpoint."""

from __future__ import annotations

import csv
import logging

from cache import jsonfile
from pipeline import livelog


def _steps(path):
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f, delimiter="\t")]


def test_a_resumed_run_logs_each_step_once_and_skips_non_finite_values(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="dvclive")
    live = livelog.open_live(tmp_path / "live", None)
    for step in (10, 20, 30):  # the killed run logged 30, but its last checkpoint was at step 20
        livelog.log_step(live, step, {"loss": 1.0 / step, "dead_fraction": None})
    resumed = livelog.open_live(tmp_path / "live", 20)
    for step in (30, 40):
        livelog.log_step(resumed, step, {"loss": 2.0 / step, "fvu": float("nan")})
    resumed.end()
    plots = tmp_path / "live" / livelog.PLOTS_DIR
    assert sorted(p.name for p in plots.iterdir()) == ["loss.tsv"]
    assert _steps(plots / "loss.tsv") == [10, 20, 30, 40]
    summary = jsonfile.loads((tmp_path / "live" / livelog.METRICS_FILE).read_text())
    assert summary == {"loss": 2.0 / 40, "step": 40}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_fresh_run_starts_the_curves_over(tmp_path):
    livelog.log_step(livelog.open_live(tmp_path, None), 5, {"loss": 1.0})
    livelog.log_step(livelog.open_live(tmp_path, None), 7, {"l0": 3.0})
    assert [p.name for p in (tmp_path / livelog.PLOTS_DIR).iterdir()] == ["l0.tsv"]


def test_logging_inside_a_git_repository_without_dvc_leaves_it_alone(tmp_path, monkeypatch):
    """dvclive on its own would `dvc init` the user's repository."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    live = livelog.open_live(tmp_path / "run" / "live", None)
    livelog.log_step(live, 1, {"loss": 1.0})
    live.end()
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / ".dvcignore").exists()
    assert _steps(tmp_path / "run" / "live" / livelog.PLOTS_DIR / "loss.tsv") == [1]
