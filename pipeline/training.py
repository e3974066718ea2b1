"""The one training loop and learning-rate schedule of every trainer (SAE, pretrain, MaPLe).

``fit`` runs a caller's step function over batches and owns what all trainers share:
the step count, when metrics become floats (only at log steps, checkpoints and the end, so
the device is not synced every step), the checkpoint cadence (every ``checkpoint_every``
steps and after the last one) and nothing else: what a step does and what a checkpoint
holds stay with the caller. Resume is the caller's ``start_step`` plus batches that start
at that step; with state saved atomically (``pipeline.runfiles``) a run killed at any
moment continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

Metrics = dict[str, torch.Tensor]  # a step's 0-dim metric tensors, still on the device


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """Learning rate per step (0-based): a warm-up, then constant or a cosine to 0.

    Warm-up (steps ``0 … warmup_steps − 1``): ``warmup_lr`` if given, else a linear ramp
    ``lr · (step + 1) / warmup_steps``. After it: ``lr`` when ``total_steps`` is None, else
    ``lr · ½ (1 + cos(π · (step − warmup_steps) / max(total_steps − warmup_steps, 1)))``.

    The SAE uses the linear ramp then constant, pretraining the ramp then the cosine, MaPLe
    a constant warm-up then the cosine. The three schedules this replaces rounded in
    different orders; ``ratio_first_ramp`` / ``ratio_first_cosine`` keep each one's order,
    so runs started before the merge resume bit-identically: True divides step counts
    before multiplying (``lr · ((step + 1) / warmup_steps)``, ``π · ((step − w) / n)``),
    False multiplies first.
    """

    lr: float  # peak learning rate
    warmup_steps: int = 0
    warmup_lr: float | None = None  # constant learning rate of the warm-up; None = linear ramp to lr
    total_steps: int | None = None  # cosine to 0 at this step; None = constant lr after warm-up
    ratio_first_ramp: bool = False
    ratio_first_cosine: bool = False

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based)."""
        w = self.warmup_steps
        if step < w:
            if self.warmup_lr is not None:
                return self.warmup_lr
            return self.lr * ((step + 1) / w) if self.ratio_first_ramp else self.lr * (step + 1) / w
        if self.total_steps is None:
            return self.lr
        n = max(self.total_steps - w, 1)
        angle = math.pi * ((step - w) / n) if self.ratio_first_cosine else math.pi * (step - w) / n
        return self.lr * 0.5 * (1.0 + math.cos(angle))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _floats(pending: list[Metrics]) -> list[dict[str, float]]:
    """The pending steps' metrics as floats: one host sync per key, not per step."""
    columns = {key: torch.stack([m[key] for m in pending]).tolist() for key in pending[0]}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def fit(batches: Iterable[Any], step: Callable[[int, Any], Metrics], *, start_step: int, log_every: int,
        checkpoint_every: int, record: Callable[[list[dict[str, float]]], None] | None = None,
        on_log: Callable[[int], None] | None = None, save: Callable[[int], None] | None = None) -> int:
    """Run ``step(i, batch)`` for steps ``start_step, start_step + 1, …`` until ``batches`` ends.

    ``step`` returns its metrics as tensors; they become floats (``record(floats)``, every
    step's once, in order) before each log and each save. ``on_log(n)`` runs after every
    ``log_every``-th step and after the last step; ``save(n)`` after every
    ``checkpoint_every``-th step and after the last step (``n``: steps done). Returns the
    number of steps done.
    """
    n, pending, logged, saved = start_step, [], start_step, start_step

    def flush() -> None:
        if pending and record is not None:
            record(_floats(pending))
        pending.clear()

    for batch in batches:
        pending.append(step(n, batch))
        n += 1
        due_log, due_save = n % log_every == 0, n % checkpoint_every == 0
        if due_log or due_save:
            flush()
        if due_log and on_log is not None:
            on_log(n)
            logged = n
        if due_save and save is not None:
            save(n)
            saved = n
    flush()
    if logged != n and on_log is not None:
        on_log(n)
    if saved != n and save is not None:
        save(n)
    return n


def steps_until(batches: Iterable[Any], stop: Callable[[], bool]) -> Iterator[Any]:
    """``batches`` until ``stop()`` is true before a batch (token budgets, early stopping)."""
    for batch in batches:
        if stop():
            return
        yield batch

