"""Issue #18: bad input and a hostile disk end in one `error:` line (exit status 2) and leave nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from app.cli import main
from pipeline.sae.io import TRAINER_NAME
from tests.helpers import TINY_ARGS, assert_one_line_error, with_options

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_ARGS = ["--layer", "1", "--expansion", "2", "--tokens", "2000", "--batch-images", "4", "--device", "cpu",
              "--no-progress"]


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _writer(made: dict[str, Path], command: str) -> list[object]:
    """A writing command with its inputs, but no --out."""
    return {"extract": ["extract", *TINY_ARGS],
            "import": ["import", made["npy"]],
            "train": ["train", "--cache", made["store"], *TRAIN_ARGS],
            "encode": ["encode", "--cache", made["store"], "--sae", made["sae"], "--device", "cpu", "--no-progress"],
            "stats": ["stats", "--codes", made["codes"], "--cache", made["store"], "--scheduler", "synchronous",
                      "--no-plots"]}[command]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """The inputs of every writing command: a tiny store, an SAE trained on it, its codes, a .npy."""
    tmp = tmp_path_factory.mktemp("made")
    made = {"store": tmp / "store", "sae": tmp / "sae", "codes": tmp / "codes", "npy": tmp / "acts.npy"}
    np.save(made["npy"], np.ones((8, 3), np.float32))
    for command, out in (("extract", made["store"]), ("train", made["sae"]), ("encode", made["codes"])):
        code, output = _cli(*_writer(made, command), "--out", out)
        assert code == 0, output
    return made


# ---------------------------------------------------------------------------------------
# 1. A --pretrained (or prompts, or trainer state) file that is not a checkpoint


NOT_CHECKPOINTS = {"random.pt": np.random.default_rng(0).bytes(5000), "notes.pt": b"weights are on the cluster\n",
                   "random.safetensors": np.random.default_rng(1).bytes(5000)}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_pretrained_that_is_not_a_checkpoint(tmp_path, name):
    weights = tmp_path / name
    weights.write_bytes(NOT_CHECKPOINTS[name])
    code, output = _cli("extract", *with_options(TINY_ARGS, pretrained=str(weights)), "--out", tmp_path / "s")
    assert_one_line_error(code, output, f"{weights} is not a PyTorch or open_clip checkpoint", "--pretrained")
    assert "weights_only" not in output  # torch's advice to unpickle anyway would run code from the file
    assert not (tmp_path / "s").exists()


def test_maple_weights_that_are_not_a_checkpoint(tmp_path):
    weights = tmp_path / "prompts.pth"
    weights.write_bytes(NOT_CHECKPOINTS["random.pt"])
    code, output = _cli("adapt", "--dataset", "synthetic", "--model", "tiny-clip", "--pretrained", "none", "--shots",
                        "2", "--depth", "2", "--device", "cpu", "--no-progress", "--weights", weights,
                        "--out", tmp_path / "a")
    assert_one_line_error(code, output, f"{weights} is not a PyTorch checkpoint")
    assert "weights_only" not in output and not (tmp_path / "a").exists()


def test_a_corrupt_trainer_state_is_one_safe_line(made, tmp_path):
    run = tmp_path / "sae"
    shutil.copytree(made["sae"], run)
    (run / "checkpoint" / TRAINER_NAME).write_bytes(NOT_CHECKPOINTS["random.pt"])
    code, output = _cli(*_writer(made, "train"), "--out", run)
    assert_one_line_error(code, output, TRAINER_NAME, "--overwrite")
    assert "weights_only" not in output
