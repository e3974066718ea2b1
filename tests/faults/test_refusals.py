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
import zarr
from click.testing import CliRunner

from app.cli import main
from cache import schema, space
from pipeline.sae.io import TRAINER_NAME
from tests.helpers import TINY, TINY_ARGS, assert_one_line_error, tree_digest, with_options

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


def _fill_after_the_check(monkeypatch, disk: Path, leave: int) -> Path:
    """Another process fills ``disk`` (all but ``leave`` bytes) just after the free-space check passed."""
    real = space.free_bytes
    filler = disk / "filler"

    def free_then_fill(folder: Path) -> int:
        free = real(folder)
        monkeypatch.setattr(space, "free_bytes", real)
        filler.write_bytes(bytes(max(0, real(disk) - leave)))
        return free

    monkeypatch.setattr(space, "free_bytes", free_then_fill)
    return filler


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


def test_stores_on_a_read_only_file_system_are_read_without_writing(made, tmpfs, tmp_path):
    """Inputs on read-only media (a shared dataset disk, an archive): every reader works, nothing is written."""
    disk = tmpfs("4m")
    for name in ("store", "sae", "codes"):
        shutil.copytree(made[name], disk / name)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    store, sae, codes = disk / "store", disk / "sae", disk / "codes"
    for args in (["verify", store], ["verify", codes], ["info", store],
                 ["train", "--cache", store, *TRAIN_ARGS, "--out", tmp_path / "sae"],
                 ["encode", "--cache", store, "--sae", sae, "--device", "cpu", "--no-progress", "--out", tmp_path / "c"],
                 ["stats", "--codes", codes, "--cache", store, "--scheduler", "synchronous", "--no-plots",
                  "--out", tmp_path / "stats"]):
        code, output = _cli(*args)
        assert code == 0, f"{args[0]}: {output}"
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    shard = next(p for p in (store / "acts" / "1").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:100])
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert_one_line_error(*_cli("repair", store), "cannot be written", "read-only")


# ---------------------------------------------------------------------------------------
# 4. Disk full: refused up front when the outputs cannot fit, one line when the disk fills mid-run


@pytest.mark.parametrize("command", ["extract", "train", "encode"])
def test_outputs_that_do_not_fit_are_refused_up_front(made, tmpfs, command):
    disk = tmpfs("64k")
    code, output = _cli(*_writer(made, command), "--out", disk / "out")
    assert_one_line_error(code, output, f"{disk / 'out'} needs about", "free", "another --out")
    assert list(disk.iterdir()) == []


def test_extract_disk_full_mid_run_then_the_rerun_resumes(made, tmpfs, monkeypatch):
    disk = tmpfs("1m")
    out = disk / "store"
    filler = _fill_after_the_check(monkeypatch, disk, leave=160 * 1024)
    code, output = _cli(*_writer(made, "extract"), "--out", out)
    assert_one_line_error(code, output, f"disk full while writing {out}", "free", "rerun the same command",
                          "last complete shard")
    n_done = int(zarr.open_group(out, mode="r")[schema.DONE][:].sum())
    assert 1 <= n_done < 3, f"{n_done} of 3 shards were written; the test needs the disk to fill mid-run"
    filler.unlink()
    code, output = _cli(*_writer(made, "extract"), "--out", out)
    assert code == 0, output
    assert tree_digest(out) == tree_digest(made["store"])


@pytest.mark.parametrize("command, leave", [("encode", 8 * 1024), ("train", 24 * 1024), ("train", 96 * 1024)],
                         ids=["encode", "train-weights", "train-state"])
def test_disk_full_mid_run_is_one_line_and_the_rerun_completes(made, tmpfs, monkeypatch, command, leave):
    """train-weights fills up in safetensors' write of the weights, train-state in torch.save's of the trainer."""
    disk = tmpfs("2m")
    filler = _fill_after_the_check(monkeypatch, disk, leave=leave)
    code, output = _cli(*_writer(made, command), "--out", disk / "out")
    assert_one_line_error(code, output, f"disk full while writing {disk / 'out'}", "rerun the same command")
    filler.unlink()
    code, output = _cli(*_writer(made, command), "--out", disk / "out")
    assert code == 0, output


# ---------------------------------------------------------------------------------------
# 6, 7. pipeline import: pickles, non-numbers, NaN rows, no rows


def _objects_npz(path: Path) -> None:
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))


@pytest.mark.parametrize("name, write, needle", [
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object)), "not a .npy array of numbers"),
    ("objects.npz", _objects_npz, "not a .npz archive of numbers"),
    ("notes.npy", lambda p: p.write_text("0.1 0.2 0.3\n"), "not a .npy array of numbers"),
    ("complex.npy", lambda p: np.save(p, np.ones((4, 3), np.complex64)), "complex64"),
])
def test_import_refuses_pickles_and_values_that_are_not_real_numbers(tmp_path, name, write, needle):
    write(tmp_path / name)
    code, output = _cli("import", tmp_path / name, "--out", tmp_path / "store")
    assert_one_line_error(code, output, needle)
    assert "allow_pickle" not in output and not (tmp_path / "store").exists()


def test_a_refused_nan_import_names_the_bad_rows_and_leaves_nothing(tmp_path):
    acts = np.ones((50, 3), np.float32)
    acts[3, 1] = np.nan
    acts[40, 0] = 1e6  # beyond float16
    np.save(tmp_path / "a.npy", acts)
    code, output = _cli("import", tmp_path / "a.npy", "--out", tmp_path / "store")
    assert_one_line_error(code, output, "2 rows of", "rows 3, 40", "NaN/inf")
    assert not (tmp_path / "store").exists()
    acts[3, 1] = acts[40, 0] = 0
    np.save(tmp_path / "clean.npy", acts)
    code, output = _cli("import", tmp_path / "clean.npy", "--out", tmp_path / "store")
    assert code == 0, output


def test_many_bad_rows_are_counted_and_the_first_ones_named(tmp_path):
    acts = np.ones((100, 3), np.float32)
    acts[10:30] = np.inf
    np.save(tmp_path / "a.npy", acts)
    code, output = _cli("import", tmp_path / "a.npy", "--out", tmp_path / "store")
    assert_one_line_error(code, output, "20 rows of", "rows 10, 11, 12, 13, 14, ...")


def test_importing_no_rows_is_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 8), np.float16))
    code, output = _cli("import", tmp_path / "empty.npy", "--out", tmp_path / "store")
    assert_one_line_error(code, output, "holds no rows")
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------
# 8. A folder none of whose images can be read


def test_a_folder_of_only_unreadable_images_is_refused(tmp_path):
    root = tmp_path / "photos"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(b"not a picture")
    code, output = _cli("extract", "--dataset", "imagefolder", "--root", root, "--model", TINY, "--pretrained", "none",
                        "--layers", "1", "--device", "cpu", "--no-progress", "--out", tmp_path / "store")
    assert_one_line_error(code, output, "none of the 6 images", str(root.resolve()))
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------
# 9. A train refused for a setting that used to be found only at the end


def test_a_refused_train_leaves_nothing_and_the_corrected_command_runs(made, tmp_path):
    out = tmp_path / "sae"
    code, output = _cli(*_writer(made, "train"), "--out", out, "--max-val-tokens", "0")
    assert_one_line_error(code, output, "--max-val-tokens")
    assert not out.exists()
    code, output = _cli(*_writer(made, "train"), "--out", out)
    assert code == 0, output


def test_info_describes_an_imported_store_of_single_tokens(tmp_path):
    """An (n, d) import has no class token: info shows the patch norms instead of failing."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 8)).astype(np.float16))
    assert CliRunner().invoke(main, ["import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s")]).exit_code == 0
    result = CliRunner().invoke(main, ["info", str(tmp_path / "s")])
    assert result.exit_code == 0 and "patches" in result.output and "no class token" in result.output, result.output
