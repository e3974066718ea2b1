"""Issue #18: bad input and a hostile disk end in one `error:` line (exit status 2) and leave nothing behind.

The disk faults run on a small tmpfs mounted for the test (read-only, or too small); where mounting is
not allowed (not root) those tests are skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
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
WRITERS = ("extract", "import", "train", "encode", "stats")


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


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(size, mode="rw")`` mounts a fresh tmpfs of ``size`` (e.g. "64k") and returns its folder."""
    mounted: list[Path] = []

    def mount(size: str, mode: str = "rw") -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},{mode}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


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


# ---------------------------------------------------------------------------------------
# 2, 3. --out that is a file, under a file, or on a read-only file system


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
@pytest.mark.parametrize("command", WRITERS)
def test_out_that_is_a_file_or_under_one(made, tmp_path, command, under):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious")
    code, output = _cli(*_writer(made, command), "--out", blocker / "store" if under else blocker)
    assert_one_line_error(code, output, f"{blocker} is a file", "--out")
    assert blocker.read_text() == "precious" and list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("command", WRITERS)
def test_out_on_a_read_only_file_system(made, tmpfs, command):
    disk = tmpfs("1m", "ro")
    code, output = _cli(*_writer(made, command), "--out", disk / "out")
    assert_one_line_error(code, output, f"{disk / 'out'} cannot be written", "read-only", "another --out")
    assert list(disk.iterdir()) == []
