"""The shared training loop and learning-rate schedule (pipeline/training.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training import Schedule, fit


def test_linear_warmup_then_constant():  # the SAE's schedule
    s = Schedule(lr=0.4, warmup_steps=4, ratio_first_ramp=True)
    assert [s.lr_at(i) for i in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert Schedule(lr=0.4).lr_at(0) == 0.4


def test_linear_warmup_then_cosine_to_zero():  # pretraining's
    s = Schedule(lr=1.0, warmup_steps=2, total_steps=6, ratio_first_cosine=True)
    # after warm-up: ½(1 + cos(π·j/4)) for j = 0..3
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.5 * (1 - math.sqrt(0.5))]
    assert [s.lr_at(i) for i in range(6)] == pytest.approx(want)


def test_constant_warmup_then_cosine():  # MaPLe's
    s = Schedule(lr=2.0, warmup_steps=3, warmup_lr=1e-5, total_steps=5)
    assert [s.lr_at(i) for i in range(5)] == pytest.approx([1e-5, 1e-5, 1e-5, 2.0, 1.0])


def test_fit_defers_floats_and_checkpoints_on_cadence_and_at_the_end():
    events = []
    n = fit(range(3, 10), lambda i, b: {"loss": torch.tensor(float(i * 10 + b))}, start_step=3, log_every=3,
            checkpoint_every=4, record=lambda ms: events.append(("record", [m["loss"] for m in ms])),
            on_log=lambda k: events.append(("log", k)), save=lambda k: events.append(("save", k)))
    assert n == 10
    assert events == [("record", [33.0]), ("save", 4), ("record", [44.0, 55.0]), ("log", 6),
                      ("record", [66.0, 77.0]), ("save", 8), ("record", [88.0]), ("log", 9),
                      ("record", [99.0]), ("log", 10), ("save", 10)]
