"""Every per-dataset stage on a ConvNeXt store (a random tiny ConvNeXt CLIP, stage 0: an 8 x 8 map of 64
channels, no class token): extract records the layout, train/encode/stats/groundtruth/mask/report run,
the tokens are the map's, and the masking splice with the error term gives back the model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.codes import CodeStore
from cache.store import ActivationStore
from pipeline.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convnext")
    _cli("extract", "--dataset", "synthetic", "--limit", 48, "--model", "tiny-convnext-clip", "--pretrained", "none",
         "--layers", 0, "--out", root / "acts", "--device", "cpu", "--no-progress")
    _cli("train", "--cache", root / "acts", "--layer", 0, "--out", root / "sae", "--tokens", 12000, "--batch-images",
         8, "--warmup-steps", 5, "--expansion", 2, "--arch", "topk", "--k", 4, "--no-progress")
    _cli("encode", "--cache", root / "acts", "--sae", root / "sae", "--out", root / "codes", "--no-progress")
    _cli("stats", "--codes", root / "codes", "--cache", root / "acts", "--out", root / "stats", "--no-progress")
    _cli("groundtruth", "--stats", root / "stats", "--out", root / "gt")
    _cli("mask", "--sae", root / "sae", "--stats", root / "stats", "--cache", root / "acts", "--out", root / "mask",
         "--k", 2, "--seeds", 1, "--no-progress")
    _cli("report", "--stats", root / "stats", "--groundtruth", root / "gt", "--out", root / "report")
    return root


def test_the_store_holds_the_stage_map_as_spatial_tokens(chain):
    store = ActivationStore(chain / "acts", mode="r")
    layout = store.token_layout
    assert (layout["n_tokens"], layout["n_prefix_tokens"], layout["class_token_index"]) == (64, 0, None)
    assert layout["patch_grid"] == [8, 8] and store.d_model == 64
    assert store.attrs["model"]["tower"] == "convnext" and "stage index" in store.attrs["model"]["layer_convention"]
    lm = load_model("tiny-convnext-clip", "none", device="cpu")
    images = torch.stack([store_image for store_image in _images(lm, 4)])
    with torch.inference_mode():
        map_BCHW = lm.visual.trunk.stages[0](lm.visual.trunk.stem(images))
    expected = map_BCHW.permute(0, 2, 3, 1).reshape(4, 64, 64).numpy().astype(np.float16)
    np.testing.assert_array_equal(store.read(0, 0, 48)[:4], expected)
    assert "no class token" in _cli("info", chain / "acts")


def _images(lm, n):
    from pipeline.datasets import open_dataset

    images = open_dataset("synthetic", root=None, split=None, transform=lm.preprocess, limit=48, seed=0,
                          image_size=lm.image_size)
    return [images.dataset[i][0] for i in range(n)]


def test_codes_stats_groundtruth_mask_and_report_read_the_map(chain):
    codes = CodeStore(chain / "codes")
    assert codes.n_tokens == 64 and codes.d_sae == 128
    summary = json.loads((chain / "stats" / "summary.json").read_text())
    assert summary["n_valid_images"] == 48
    record = json.loads((chain / "gt" / "groundtruth.json").read_text())
    assert record["n_images"] == 48 and record["n_values"] > 0
    masking = json.loads((chain / "mask" / "masking.json").read_text())
    assert masking["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-4
    assert masking["accuracy"]["sae_error_term"] == masking["accuracy"]["clip"]
    assert (chain / "report" / "index.html").is_file()
