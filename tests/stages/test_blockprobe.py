"""The block-probe stage on a real extracted store of the synthetic world: every column of its table
against a direct computation, the files it writes, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.store import ActivationStore
from pipeline import groundtruth as gt
from pipeline.probe import ProbeConfig, fit_linear_probe
from pipeline.world import SyntheticWorld, WorldConfig
from stages import blockprobe, extract
from tests.helpers import TINY, assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """60 synthetic images through a random tiny ViT, blocks 1 and 3."""
    out = tmp_path_factory.mktemp("blockprobe") / "store"
    extract.run(extract.Config(dataset="synthetic", out_dir=out, limit=60, model=TINY, pretrained="none",
                               layers=(1, 3), batch_size=20, device="cpu", images_per_chunk=10,
                               images_per_shard=20, progress=False))
    return out


def test_every_column_equals_a_direct_computation(store, tmp_path):
    code, output = _cli("block-probe", "--cache", store, "--out", tmp_path / "probe", "--attributes", "shape,size",
                        "--seed", "5")
    assert code == 0, output
    assert "values read by a linear probe" in output
    frame = pd.read_parquet(tmp_path / "probe" / blockprobe.TABLE_FILE)
    record = json.loads((tmp_path / "probe" / blockprobe.RECORD_FILE).read_text())
    assert record["layers"] == [1, 3] and record["n_images"] == 60 and record["n_train"] == 30
    assert record["n_values"] == 7 and list(frame.columns) == ["layer", "attribute", "value", "auroc", "readable",
                                                                 "accuracy", "chance"]

    acts = ActivationStore(store, mode="r")
    world = SyntheticWorld(WorldConfig(seed=0, image_size=32), n_images=60)
    values = [gt.scene_values(world.scene(i)) for i in range(60)]
    train = np.zeros(60, bool)
    train[np.random.default_rng([5, 4]).permutation(60)[:30]] = True
    for layer in (1, 3):
        a = acts.read(layer, 0, 60).astype(np.float32)
        assert acts.token_layout["patch_grid"] == [4, 4]
        g = a[:, 1:].reshape(60, 4, 4, -1)
        quadrants = [g[:, r, c].mean((1, 2)) for r in (slice(0, 2), slice(2, 4)) for c in (slice(0, 2), slice(2, 4))]
        x = np.concatenate([a[:, 0], a[:, 1:].mean(1), a[:, 1:].max(1), *quadrants], axis=1)
        for attribute in ("shape", "size"):
            names = gt.ATTRIBUTE_VALUES[attribute]
            y = np.array([names.index(v[attribute]) for v in values])
            probe = fit_linear_probe(torch.from_numpy(x[train]).double(), torch.from_numpy(y[train]), len(names),
                                     ProbeConfig())
            prob = torch.softmax(probe.logits(torch.from_numpy(x[~train]).double()).double(), 1).numpy()
            rows = frame[(frame["layer"] == layer) & (frame["attribute"] == attribute)]
            assert list(rows["value"]) == list(names)
            assert rows["accuracy"].iloc[0] == pytest.approx((prob.argmax(1) == y[~train]).mean())
            assert rows["chance"].iloc[0] == pytest.approx(np.bincount(y[~train]).max() / 30)
            for v, (auroc, readable) in enumerate(zip(rows["auroc"], rows["readable"])):
                pos, neg = prob[y[~train] == v, v], prob[y[~train] != v, v]
                pairwise = ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean() if len(pos) else np.nan
                assert auroc == pytest.approx(pairwise, abs=1e-9, nan_ok=True)
                assert readable == (auroc >= 0.95)
    md = (tmp_path / "probe" / blockprobe.MARKDOWN_FILE).read_text()
    assert "| attribute | value | block 1 | block 3 |" in md and "| shape | *accuracy* |" in md
    assert (tmp_path / "probe" / blockprobe.PLOT_FILE).stat().st_size > 0
    code, output = _cli("block-probe", "--cache", store, "--out", tmp_path / "probe", "--attributes", "size",
                        "--no-plots")
    assert code == 0, output  # a rerun replaces the result: no plot left from the run before
    assert not (tmp_path / "probe" / blockprobe.PLOT_FILE).exists()
    assert set(pd.read_parquet(tmp_path / "probe" / blockprobe.TABLE_FILE)["attribute"]) == {"size"}


def test_refusals_are_one_line_and_leave_no_output(store, tmp_path):
    out = tmp_path / "probe"
    assert_one_line_error(*_cli("block-probe", "--cache", store, "--out", out, "--layers", "7"), "layer 7")
    assert_one_line_error(*_cli("block-probe", "--cache", store, "--out", out, "--attributes", "smell"),
                          "unknown attribute")
    assert_one_line_error(*_cli("block-probe", "--cache", store, "--out", out, "--train-fraction", "1.5"),
                          "--train-fraction")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(*_cli("block-probe", "--cache", store, "--out", out), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_store_of_another_dataset_is_refused(tmp_path):
    from tests.helpers import make_image_folder

    folder = make_image_folder(tmp_path / "images")
    other = tmp_path / "store"
    extract.run(extract.Config(dataset="imagefolder", root=folder, out_dir=other, model=TINY, pretrained="none",
                               layers=(1,), batch_size=8, device="cpu", progress=False))
    assert_one_line_error(*_cli("block-probe", "--cache", other, "--out", tmp_path / "probe"), "synthetic world")
