"""The resume file shared by the training stages (pretrain, adapt)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline import runfiles
from cache.errors import UserError


def test_trainer_state_absent_current_and_foreign(tmp_path):
    assert runfiles.load_trainer_state(tmp_path, 1, "cpu") is None
    path = tmp_path / runfiles.TRAINER_NAME
    torch.save({"format_version": 1, "step": 7, "weights": torch.arange(3.0)}, path)
    state = runfiles.load_trainer_state(tmp_path, 1, "cpu")
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(3.0))

    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=r"trainer_state.pt has format version 1, this code writes 2; pass --overwrite"):
        runfiles.load_trainer_state(tmp_path, 2, "cpu")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # refused, not touched
