"""--threads on every compute command, and OpenMP threads that sleep while they wait."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import stages
from app.cli import main
from cache.errors import UserError
from pipeline.configs import fields

ROOT = Path(__file__).resolve().parents[2]
COMPUTE = ("extract", "train", "encode", "stats", "mask", "groundtruth", "pretrain", "adapt")


@pytest.mark.parametrize("name", COMPUTE)
def test_every_compute_stage_runs_at_its_threads(name):
    stage = stages.load(name)
    (threads,) = [f for f in fields(stage.config) if f.name == "threads"]
    assert threads.default is None and threads.help == "torch CPU threads; default: the CPUs this process may use"
    assert stage.run.__wrapped__, f"{name}'s run does not size torch (pipeline.threads.sized)"


def test_threads_1_is_what_torch_uses_during_the_run(tmp_path, monkeypatch):
    from stages import extract

    seen = []

    def first_step(cfg):
        seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]))
        raise UserError("stopped here")

    monkeypatch.setattr(extract, "_open", first_step)
    before = torch.get_num_threads()
    result = CliRunner().invoke(main, ["extract", "--dataset", "synthetic", "--out", str(tmp_path / "s"),
                                       "--threads", "1"])
    assert result.exit_code == 2 and "stopped here" in result.output
    assert seen == [(1, "1")] and torch.get_num_threads() == before


def test_threads_0_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--cache", "c", "--layer", "0", "--out", str(tmp_path),
                                       "--threads", "0"])
    assert result.exit_code == 2 and result.output.strip() == "error: --threads must be at least 1 (got 0)"


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_waits_passively_before_torch_is_imported_unless_the_user_chose(given, expected):
    """A child runs `pipeline pretrain --help`; an import hook reads the setting when torch is first imported."""
    code = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
from app.cli import main
assert "torch" not in sys.modules
main(["pretrain", "--help"], standalone_mode=False)
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip().splitlines()[-1] == repr([expected])
