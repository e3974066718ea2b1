"""Store layout planning, verify on damaged stores, info."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main
from cache import schema
from cache.check import describe, verify
from cache.codes import CodeStore
from cache.errors import UserError
from cache.store import ActivationStore, StoreLock, StoreSpec, create_or_resume, plan_layout
from tests.helpers import tree_digest


@given(bytes_per_image=st.integers(100, 5_000_000), n_images=st.integers(1, 2_000_000))
def test_plan_layout_sizes(bytes_per_image, n_images):
    chunk, shard = plan_layout(bytes_per_image, n_images)
    assert shard % chunk == 0 and chunk >= 1
    assert chunk <= max(1, n_images)
    if bytes_per_image < 1_000_000 and n_images * bytes_per_image > 200e6:  # large sets: ~3 MB chunks, ~64 MB shards
        assert 1.5e6 <= chunk * bytes_per_image <= 4.5e6
        assert 30e6 <= shard * bytes_per_image <= 100e6


@given(bytes_per_image=st.integers(100, 5_000_000), n_images=st.integers(1, 100_000),
       shard=st.integers(1, 5000))
def test_plan_layout_with_a_given_shard_size(bytes_per_image, n_images, shard):
    chunk, got = plan_layout(bytes_per_image, n_images, images_per_shard=shard)
    assert got == shard and shard % chunk == 0


def test_plan_layout_for_vit_b16():
    chunk, shard = plan_layout(197 * 768 * 2, 27_000)
    assert (chunk, shard) == (10, 220)  # 3.0 MB chunks, 66.6 MB shards


def test_verify_flags_nan_and_zero_rows_and_bad_labels_the_writer_wrote(tiny_store):
    """Rows that match their digests were written that way: reported, but not as damage to repair."""
    assert verify(tiny_store).ok
    store = ActivationStore(tiny_store)
    sl = store.shard_slice(1)
    acts = {layer: store.read(layer, sl.start, sl.stop) for layer in store.layers}
    acts[3][21 - sl.start] = np.nan
    acts[3][20 - sl.start] = 0
    labels = store.labels[sl].copy()
    labels[30 - sl.start] = 99
    store.write_shard(1, acts, labels, store.valid[sl])
    report = verify(tiny_store)
    assert not report.ok and report.damaged == {} and report.repairable == []
    assert report.nan_rows[3] == [21] and report.zero_rows[3] == [20] and report.bad_labels == [30]
    assert report.nan_rows[1] == [] and report.zero_rows[1] == []
    result = CliRunner().invoke(main, ["verify", str(tiny_store)])
    assert result.exit_code == 1 and "NaN rows" in result.output and "FAILED" in result.output


def test_verify_reports_rows_changed_behind_the_writer_as_damaged(tiny_store):
    group = zarr.open_group(tiny_store, mode="r+")
    group[schema.acts_path(3)][21] = np.zeros(group[schema.acts_path(3)].shape[1:], np.float16)
    group[schema.LABELS][40] = 1 - group[schema.LABELS][40]
    report = verify(tiny_store)
    assert sorted(report.damaged) == [1, 2] and report.repairable == [1, 2]
    assert "layer 3, images 20..23 do not match their checksum" in report.damaged[1][0]
    assert "labels or valid flags do not match" in report.damaged[2][0]
    assert f"pipeline repair {tiny_store}" in report.lines()[-2]


def test_verify_flags_incomplete_shards(tiny_store):
    zarr.open_group(tiny_store, mode="r+")[schema.DONE][1] = 0
    report = verify(tiny_store)
    assert report.incomplete_shards == [1] and not report.ok
    with pytest.raises(UserError, match="pipeline verify"):
        ActivationStore(tiny_store).require_complete()


def test_verify_flags_row_count_mismatch(tiny_store):
    group = zarr.open_group(tiny_store, mode="r+")
    group[schema.LABELS].resize((40,))
    assert "row counts disagree" in verify(tiny_store).row_count_mismatch


def test_info_reports_norms_per_token_kind(tiny_store):
    d = describe(tiny_store)
    assert d["shape_NTD"] == [48, 17, 64] and d["shards_complete"] == "3/3"
    acts = ActivationStore(tiny_store).acts(1)[:].astype(np.float32)
    norms = np.linalg.norm(acts, axis=2)
    stats = d["token_norms"]["1"]
    assert stats["n_images_sampled"] == 48
    assert stats["class"]["mean"] == pytest.approx(norms[:, 0].mean(), rel=1e-5)
    assert stats["patches"]["max"] == pytest.approx(norms[:, 1:].max(), rel=1e-5)
    out = CliRunner().invoke(main, ["info", str(tiny_store)])
    assert out.exit_code == 0 and "class" in out.output and "patches" in out.output and "3/3 shards" in out.output


def test_store_of_another_format_version_is_refused(tiny_store):
    zarr.open_group(tiny_store, mode="r+").attrs[schema.ATTR_FORMAT_VERSION] = 99
    with pytest.raises(UserError, match="format 99"):
        ActivationStore(tiny_store)


def test_not_a_store(tmp_path):
    with pytest.raises(UserError, match="not an activation store"):
        ActivationStore(tmp_path)


_HOLD_THEN_FORK = """
import os, sys, time
from cache.store import StoreLock
StoreLock(sys.argv[1]).__enter__()
if os.fork() == 0:  # the child reports once fork() returned in it, i.e. after the at-fork handlers ran
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_killed_writers_lock(tmp_path):
    """DataLoader workers are forked children; after a SIGKILLed writer, its rerun must get the lock."""
    root = Path(__file__).resolve().parents[2]
    writer = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_FORK, str(tmp_path)], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    child = int(writer.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"being written by another process \\(pid {writer.pid}\\)"):
            StoreLock(tmp_path).__enter__()
        writer.kill()
        writer.wait()
        os.kill(child, 0)  # the child is still alive ...
        with StoreLock(tmp_path):  # ... and the lock is free
            pass
    finally:
        writer.kill()
        os.kill(child, signal.SIGKILL)


def _spec(n_images=6) -> StoreSpec:
    return StoreSpec(layers=(0,), n_tokens=2, d_model=3, image_ids=[f"img/{i}" for i in range(n_images)],
                     class_names=["a"], images_per_chunk=2, images_per_shard=4, config={"n": n_images},
                     attrs={"model": {"name": "test"}})


def _create_codes(path: Path) -> CodeStore:
    return CodeStore.create_or_resume(path, n_images=4, n_tokens=2, d_sae=5, images_per_shard=2, attrs={},
                                      identity="test", overwrite=False)


@pytest.mark.parametrize("create", [lambda path: create_or_resume(path, _spec()), _create_codes],
                         ids=["activations", "codes"])
def test_the_lock_holds_through_creating_a_store(tmp_path, create):
    """Creating the group must not remove the held lock file, or a second writer is admitted."""
    out = tmp_path / "new"
    with StoreLock(out) as lock:
        create(out)
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(UserError, match="being written by another process"):
            StoreLock(out).__enter__()


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("create", [lambda path: create_or_resume(path, _spec()), _create_codes],
                         ids=["activations", "codes"])
def test_a_store_cut_short_while_being_created_is_created_again(tmp_path, monkeypatch, create):
    with StoreLock(tmp_path / "fresh"):
        create(tmp_path / "fresh")
    with monkeypatch.context() as patch:  # stop right after the group appeared, as a SIGKILL would
        patch.setattr(zarr.Group, "create_array", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed), StoreLock(tmp_path / "cut"):
            create(tmp_path / "cut")
    assert zarr.open_group(tmp_path / "cut", mode="r").attrs.asdict() == {}  # the state the issue reports
    with StoreLock(tmp_path / "cut"):
        create(tmp_path / "cut")
    assert tree_digest(tmp_path / "cut") == tree_digest(tmp_path / "fresh")


def test_a_zarr_group_that_is_not_ours_is_still_refused(tmp_path):
    zarr.create_group(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path)
    with pytest.raises(UserError, match="is not an activation store"), StoreLock(tmp_path):
        create_or_resume(tmp_path, _spec(), overwrite=True)
    with pytest.raises(UserError, match="is not a code store"), StoreLock(tmp_path):
        _create_codes(tmp_path)
    assert tree_digest(tmp_path) == before


def test_a_lock_that_guarded_nothing_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="refused"), StoreLock(tmp_path / "new" / "store"):
        raise UserError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # only the folder it made is removed
    with StoreLock(tmp_path / "new"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # it existed before: kept, without the lock file
    assert not any((tmp_path / "new").iterdir())


def test_a_released_lock_leaves_an_empty_file(tmp_path):
    """The holder's pid is only written while the lock is held, so a finished folder's bytes do not
    depend on which process wrote it (DVC hashes outputs whole)."""
    with StoreLock(tmp_path):
        assert (tmp_path / schema.LOCK_FILE).read_text() == str(os.getpid())
        (tmp_path / "x").write_text("written under the lock")
    assert (tmp_path / schema.LOCK_FILE).read_text() == ""
