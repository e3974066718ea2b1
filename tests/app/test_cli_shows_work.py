"""Long commands say what they will do, how long it will take, and what to run next."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipeline import progress
from tests.helpers import TINY_ARGS, with_options


def _pipeline(*args: str, cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout


@pytest.mark.slow  # four command-line runs, ~45 s
def test_extract_and_train_print_their_plan_first_and_their_next_step_last(tmp_path):
    out = _pipeline("extract", *with_options(TINY_ARGS, limit="40"), "--out", "acts", cwd=tmp_path)
    plan, summary = out.index("extract: 40 images of synthetic"), out.index("extracted 40 of 40 images")
    assert plan < summary
    assert "blocks 1, 3" in out and "into acts:" in out and "in 3 shards; 40 images to compute" in out
    assert out.rstrip().splitlines()[-1].strip() == "pipeline train --cache acts --layer 3 --out SAE_DIR"

    again = _pipeline("extract", *with_options(TINY_ARGS, limit="40"), "--out", "acts", cwd=tmp_path)
    assert "0 images to compute, 40 already stored" in again  # a rerun says it resumes

    out = _pipeline("train", "--cache", "acts", "--layer", "3", "--out", "sae", "--expansion", "2",
                    "--tokens", "20000", "--batch-images", "4", "--warmup-steps", "2", "--no-progress", cwd=tmp_path)
    plan = re.search(r"(\d+) of \1 steps to go, (\d+) tokens each \(20,000 tokens in all\), into sae", out)
    steps, batch_tokens = int(plan[1]), int(plan[2])
    assert batch_tokens % 4 == 0 and steps == -(-20000 // batch_tokens)
    assert plan.start() < out.index(f"trained {steps} steps")
    assert "next: pipeline encode --cache STORE --sae sae --out CODES_DIR" in out
    assert "INFO" not in out  # plain sentences unless --verbose


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("first_unit_s", [0.1, 30.0])  # a slow first unit (start-up) must not skew the estimate
def test_the_estimate_is_the_steady_pace_after_the_first_unit(monkeypatch, caplog, first_unit_s):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    caplog.set_level("INFO", logger="pipeline.progress")
    bar = progress.Progress(total=1000, initial=100, desc="work", unit="img", enabled=False)
    clock.t = first_unit_s
    bar.update(10)
    for _ in range(9):  # 10 images per 0.5 s = 20 img/s; 5 % of the work after 5 updates
        clock.t += 0.5
        bar.update(10)
    assert bar.estimate_s == pytest.approx((1000 - 160) / 20)
    assert [r.getMessage() for r in caplog.records] == ["work: about 42 s to go (20 img/s)"]


def test_human_seconds():
    assert [progress.human_seconds(s) for s in (4.4, 250, 7500)] == ["4 s", "4 min 10 s", "2 h 05 min"]
