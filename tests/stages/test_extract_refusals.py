"""Bad input: one line, non-zero exit, existing data untouched (TARGETS.md reliability list)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from app.cli import main
from cache import schema
from cache.store import StoreLock, StoreSpec, create_or_resume
from pipeline.models import load_model
from stages import extract
from tests.helpers import (TINY, TINY_ARGS, assert_one_line_error, make_extract_config, sigkill_when, tree_digest,
                           with_options)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("replace, needles", [
    ({"dataset": "nosuchset"}, ["unknown dataset 'nosuchset'", "eurosat"]),
    ({"model": "ViT-B-17"}, ["unknown model 'ViT-B-17'", "ViT-B-16"]),
    ({"pretrained": "not-a-tag"}, ["unknown pretrained tag 'not-a-tag'"]),
    ({"pretrained": "/nonexistent/weights.pt"}, ["weight file /nonexistent/weights.pt does not exist"]),
    ({"layers": "1,4"}, ["layer 4 is out of range", "0..3"]),
])
def test_refusals_leave_an_existing_store_untouched(tiny_store, replace, needles):
    before = tree_digest(tiny_store)
    code, out = _cli("extract", *with_options(TINY_ARGS, **replace), "--out", str(tiny_store))
    assert_one_line_error(code, out, *needles)
    assert tree_digest(tiny_store) == before


def test_missing_dataset_root_says_how_to_get_it(tmp_path):
    code, out = _cli("extract", *with_options(TINY_ARGS, dataset="eurosat"), "--root", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "s"))
    assert_one_line_error(code, out, "does not exist", "eurosat/2750")
    assert not (tmp_path / "s").exists()


def test_pretrained_tag_that_cannot_be_downloaded(tmp_path):
    code, out = _cli("extract", *with_options(TINY_ARGS, model="ViT-B-16", pretrained="openai"),
                     "--out", str(tmp_path / "s"))
    assert_one_line_error(code, out, "'openai'", "--pretrained /path/to/checkpoint")
    assert not (tmp_path / "s").exists()


def test_other_config_refused_without_overwrite(tiny_store):
    before = tree_digest(tiny_store)
    code, out = _cli("extract", *with_options(TINY_ARGS, layers="2"), "--out", str(tiny_store))
    assert_one_line_error(code, out, "another config", "--overwrite")
    assert tree_digest(tiny_store) == before
    code, out = _cli("extract", *with_options(TINY_ARGS, layers="2"), "--out", str(tiny_store), "--overwrite")
    assert code == 0, out
    assert zarr.open_group(tiny_store, mode="r").attrs[schema.ATTR_LAYERS] == [2]


def test_a_directory_that_is_not_a_store_is_never_touched(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    code, out = _cli("extract", *TINY_ARGS, "--out", str(tmp_path / "thesis"), "--overwrite")
    assert_one_line_error(code, out, "is not an activation store")
    assert sorted(p.name for p in (tmp_path / "thesis").iterdir()) == ["chapter1.tex"]  # not even a lock file


def test_second_concurrent_writer_is_refused(tiny_store):
    before = tree_digest(tiny_store)
    with StoreLock(tiny_store):
        code, out = _cli("extract", *TINY_ARGS, "--out", str(tiny_store))
    assert_one_line_error(code, out, "being written by another process")
    assert tree_digest(tiny_store) == before


def test_a_writer_into_a_new_store_being_created_is_refused(tmp_path):
    """Creating the group once emptied the folder, lock file included, and let a second writer in."""
    out = tmp_path / "s"
    spec = StoreSpec(layers=(1,), n_tokens=2, d_model=3, image_ids=["a", "b"], class_names=["c"], images_per_chunk=1,
                     images_per_shard=2, config={"first": "writer"}, attrs={})
    with StoreLock(out):
        create_or_resume(out, spec)
        before = tree_digest(out)
        code, output = _cli("extract", *TINY_ARGS, "--out", str(out))
        assert_one_line_error(code, output, "being written by another process")
        assert tree_digest(out) == before


def test_nan_activations_are_refused(tmp_path):
    model = load_model(TINY, "none")
    state = model.model.state_dict()
    state["visual.transformer.resblocks.0.mlp.c_fc.weight"][0, 0] = float("nan")
    weights = tmp_path / "nan.pt"
    torch.save(state, weights)
    code, out = _cli("extract", *with_options(TINY_ARGS, pretrained=str(weights)), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, out, "NaN/inf activations", "layer 1")
    store = zarr.open_group(tmp_path / "s", mode="r")
    assert not store[schema.DONE][:].any()  # nothing was marked complete


def _done_count(path: Path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")[schema.DONE][:].sum())
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    args = [sys.executable, "-m", "app.cli", "extract", *with_options(TINY_ARGS, limit="600", batch_size="1")]
    args[args.index("--shard-images") + 1] = "20"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread each, immune to a busy core
    reference = tmp_path / "reference"
    subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    sigkill_when([*args, "--out", str(killed)], lambda: _done_count(killed) >= 3, env=env)
    n_done = _done_count(killed)
    assert 3 <= n_done < 30, f"kill landed after {n_done} of 30 shards; the test needs a mid-run kill"
    check = subprocess.run([sys.executable, "-m", "app.cli", "verify", str(killed)], capture_output=True, text=True)
    assert check.returncode == 1 and "INCOMPLETE" in check.stdout
    subprocess.run([*args, "--out", str(killed)], check=True, capture_output=True, env=env)
    assert tree_digest(killed) == tree_digest(reference)
    check = subprocess.run([sys.executable, "-m", "app.cli", "verify", str(killed)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_config_loader_rejects_bad_numbers(tmp_path):
    from cache.errors import UserError

    with pytest.raises(UserError, match="batch-size"):
        make_extract_config(tmp_path, batch_size=0)
    with pytest.raises(UserError, match="multiple of images per chunk"):
        extract.run(make_extract_config(tmp_path, images_per_chunk=5, images_per_shard=16))
