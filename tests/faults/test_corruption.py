"""Damaged stores: every reader refuses in one line naming the shard, verify reports it, and
`pipeline repair` recomputes exactly the damaged shards, byte-identical to the undamaged store."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from app.cli import main
from cache.codes import CodeStore
from cache.store import ActivationStore
from stages import encode, train
from tests.helpers import TINY, assert_one_line_error, tree_digest

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRACT = ["extract", "--dataset", "synthetic", "--limit", "48", "--model", TINY, "--pretrained", "none",
           "--layers", "1,3", "--batch-size", "8", "--device", "cpu", "--chunk-images", "4",
           "--shard-images", "16", "--no-progress", "--out", "acts"]
TRAIN = ["train", "--cache", "acts", "--layer", "3", "--expansion", "2", "--tokens", "4000", "--batch-images", "8",
         "--warmup-steps", "2", "--device", "cpu", "--no-progress"]
STATS = ["stats", "--codes", "codes", "--cache", "acts", "--out", "stats", "--no-plots", "--scheduler", "synchronous"]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A study folder written with relative paths: acts (tiny ViT, 3 shards of 16 images), an SAE, codes."""
    root = tmp_path_factory.mktemp("pristine")
    with contextlib.chdir(root):
        assert _cli(*EXTRACT)[0] == 0
        train.run(train.Config(cache_dir=Path("acts"), layer=3, out_dir=Path("sae"), expansion=2, total_tokens=4000,
                               batch_images=8, warmup_steps=2, device="cpu", progress=False))
        encode.run(encode.Config(cache_dir=Path("acts"), sae_dir=Path("sae"), out_dir=Path("codes"), device="cpu",
                                 progress=False))
    return root


@pytest.fixture
def study(pristine, tmp_path) -> Path:
    """A private copy of the pristine study, as the working folder."""
    work = tmp_path / "study"
    shutil.copytree(pristine, work)
    with contextlib.chdir(work):
        yield work


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble_index(path: Path) -> None:
    """Overwrite the shard index at the end of the file (the loader's fast path reads it without its CRC)."""
    data = bytearray(path.read_bytes())
    data[-20:] = os.urandom(20)
    path.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": _flip, "truncate": _truncate, "index": _scramble_index,
                                             "delete": Path.unlink}
ACTS_SHARD_1 = Path("acts/acts/3/c/1/0/0")
CODES_SHARD_2 = Path("codes/shards/000002/indices/c/0")


def _assert_repaired(store: str, before: dict[str, str]) -> None:
    code, out = _cli("repair", store)
    assert code == 0 and "recomputed 1 damaged shard(s) [" in out and out.rstrip().endswith("OK"), out
    assert tree_digest(Path(store)) == before


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_activation_shard_is_refused_by_readers_and_repaired(study, damage):
    before = tree_digest(study / "acts")
    DAMAGE[damage](study / ACTS_SHARD_1)
    code, out = _cli("verify", "acts")
    assert code == 1 and "DAMAGED: shard 1:" in out and "layer 3" in out and "Traceback" not in out, out
    assert "`pipeline repair acts` recomputes the 1 damaged shard (1)" in out
    assert_one_line_error(*_cli(*TRAIN, "--out", "sae2"), "shard 1 is damaged", "pipeline repair")
    assert_one_line_error(*_cli("encode", "--cache", "acts", "--sae", "sae", "--out", "codes2", "--no-progress"),
                          "shard 1 is damaged", "pipeline repair")
    _assert_repaired("acts", before)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_code_shard_is_refused_by_statistics_and_repaired(study, damage):
    before = tree_digest(study / "codes")
    DAMAGE[damage](study / CODES_SHARD_2)
    code, out = _cli("verify", "codes")
    assert code == 1 and "DAMAGED: shard 2:" in out and "Traceback" not in out, out
    assert_one_line_error(*_cli(*STATS), "shard 2 is damaged", "pipeline repair")
    assert not (study / "stats").exists()
    _assert_repaired("codes", before)
    assert _cli(*STATS)[0] == 0


def test_damaged_labels_and_checksums_are_found_and_repaired(study):
    before = tree_digest(study / "acts")
    _flip(study / "acts/labels/c/2")
    (study / "acts/checksums/c/0/0").unlink()
    code, out = _cli("verify", "acts")
    assert code == 1 and "DAMAGED: shard 0:" in out and "DAMAGED: shard 2:" in out, out
    assert_one_line_error(*_cli(*TRAIN, "--out", "sae2"), "is damaged", "pipeline repair")
    code, out = _cli("repair", "acts")
    assert code == 0 and "recomputed 2 damaged shard(s) [0, 2]" in out, out
    assert tree_digest(study / "acts") == before


def test_repair_runs_the_writer_from_its_own_folder(study, tmp_path):
    """The store's settings hold relative paths (acts, sae): repair reruns them where they were given."""
    before = tree_digest(study / "codes")
    _flip(study / CODES_SHARD_2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with contextlib.chdir(elsewhere):
        _assert_repaired(str(study / "codes"), before)


def test_repair_of_an_intact_store_changes_nothing(study):
    before = tree_digest(study / "acts")
    code, out = _cli("repair", "acts")
    assert code == 0 and "nothing to repair" in out
    assert tree_digest(study / "acts") == before


def test_checksums_are_the_digests_of_what_readers_get(study):
    """The recorded digest of a chunk is recomputable from the rows a reader gets (FORMAT.md)."""
    from cache.digest import digest

    store = ActivationStore("acts", mode="r")
    c = store.images_per_chunk
    rows = store.acts(3)[4 * c:5 * c]
    assert store.checksums[4, store.layers.index(3)] == digest(rows)
    assert store.checksums[4, -1] == digest(store.labels[4 * c:5 * c], store.valid[4 * c:5 * c].astype(np.uint8))
    codes = CodeStore("codes")
    shard = codes.read_shard(1)
    assert int(codes.group["checksums"][1]) == digest(shard.token_ptr, shard.indices, shard.values)
