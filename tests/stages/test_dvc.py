"""`dvc repro` runs the study end to end; an SAE ablation reuses the activation cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cache.check import verify
from tests.helpers import tree_digest

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)  # dvc and pipeline live beside this interpreter (the venv need not be active)
ENV = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}


def _sh(*cmd: str, cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A git + DVC repo holding this project's stage graph, with tiny parameters, reproduced once."""
    assert shutil.which("dvc", path=ENV["PATH"]), "dvc is missing: it is a dependency (pip install -e .)"
    repo = tmp_path_factory.mktemp("study")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("pipeline", "cache", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["limit"] = 48
    params["sae"].update(total_tokens=20_000, batch_images=16, warmup_steps=5)
    params["mask"].update(ks=[1, 10, "all"], n_seeds=1, probe_images=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _sh("git", "init", "-q", cwd=repo)
    _sh("dvc", "init", "-q", cwd=repo)
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "study", cwd=repo)
    log = _sh("dvc", "repro", cwd=repo)
    return repo, log


def test_repro_runs_every_stage_and_writes_valid_outputs(study):
    repo, log = study
    for stage in ("extract", "train", "encode", "stats", "mask", "report"):
        assert f"Running stage '{stage}'" in log
    assert verify(repo / "work" / "acts").ok and verify(repo / "work" / "codes").ok
    summary = json.loads((repo / "work" / "stats-summary.json").read_text())
    assert summary["n_latents"] == 8 * 64
    assert (repo / "work" / "report" / "index.html").stat().st_size > 1000
    masking = json.loads((repo / "work" / "masking-metrics.json").read_text())
    acc = masking["accuracy"]
    assert 0 <= acc["clip"] <= 1 and set(acc["on"]) == set(acc["off"]) == {"1", "10", "all"}
    metrics = json.loads((repo / "work" / "sae-metrics.json").read_text())
    assert metrics["steps"] > 0 and 0 <= metrics["fvu"] < 10 and metrics["l0"] > 0
    shown = _sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert "fvu" in shown


def test_sae_ablation_reuses_the_activation_cache(study):
    repo, _ = study
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "reproduced", cwd=repo)
    acts = repo / "work" / "acts"
    before, mtime = tree_digest(acts), (acts / "zarr.json").stat().st_mtime_ns
    log = _sh("dvc", "exp", "run", "-S", "sae.expansion=4", cwd=repo)
    assert "Running stage 'extract'" not in log and "Running stage 'train'" in log
    assert tree_digest(acts) == before and (acts / "zarr.json").stat().st_mtime_ns == mtime
    assert json.loads((repo / "work" / "sae" / "config.json").read_text())["d_sae"] == 4 * 64
