"""The run-folder protocol shared by the training stages (train, pretrain, adapt)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cache.errors import UserError
from pipeline import runfiles


def _run(out_dir, lr=0.1, overwrite=False):
    return runfiles.RunFolder(out_dir, {"training": {"lr": lr}}, kind="test", our_files=("model.pt",),
                              overwrite=overwrite, format_version=1)


def test_trainer_state_absent_current_and_foreign(tmp_path):
    path = tmp_path / runfiles.TRAINER_NAME
    assert runfiles.load_state(path, 1) is None
    runfiles.save_state(path, {"step": 7, "weights": torch.arange(3.0)}, 1)
    state = runfiles.load_state(path, 1)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(3.0))

    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=r"trainer_state.pt has format version 1, this code writes 2; pass --overwrite"):
        runfiles.load_state(path, 2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # refused, not touched


def test_nothing_is_written_before_the_first_save_and_a_refusal_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="bad settings"):
        with _run(out):
            raise UserError("bad settings")
    assert not out.exists()
    with _run(out) as run:
        assert not run.resumes and run.load_state() is None
        run.save_state({"step": 1})
    assert sorted(p.name for p in out.iterdir()) == [".lock", runfiles.CONFIG_NAME, runfiles.TRAINER_NAME]


def test_same_identity_resumes_another_is_refused_in_one_line_or_replaced(tmp_path):
    out = tmp_path / "run"
    with _run(out) as run:
        run.save_state({"step": 3})
        (out / "model.pt").write_text("weights")
    with _run(out) as run:
        assert run.resumes and run.load_state()["step"] == 3
    with pytest.raises(UserError, match=r"^\S+ holds another test run \(training.lr is 0.1 there, 0.2 now\)[^\n]*$"):
        with _run(out, lr=0.2):
            pass
    assert (out / "model.pt").exists()  # refused, not touched
    with _run(out, lr=0.2, overwrite=True) as run:
        assert not run.resumes and run.load_state() is None
        assert (out / "model.pt").exists()  # cleared only when the new run writes
        run.start()
        assert not (out / "model.pt").exists()


def test_foreign_files_and_a_second_writer_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        with _run(out):
            pass
    (out / "notes.txt").unlink()
    with _run(out):
        with pytest.raises(UserError, match="being written by another process"):
            with _run(out):
                pass
