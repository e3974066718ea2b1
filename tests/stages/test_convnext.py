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


# ---------------------------------------------------------------------------------------
# MaPLe on the ConvNeXt (stage offsets): adapt, the adapted store, its masking splice and the remap


@pytest.fixture(scope="module")
def adapted(chain) -> Path:
    """A few adaptation steps on the random ConvNeXt CLIP, its stage-0 store, codes and statistics through the base
    model's SAE, and its masking with the adapter (from that store)."""
    root = chain
    _cli("adapt", "--dataset", "synthetic", "--model", "tiny-convnext-clip", "--pretrained", "none", "--out",
         root / "adapter", "--shots", 2, "--n-ctx", 2, "--depth", 2, "--epochs", 2, "--batch-size", 8, "--lr", 0.5,
         "--warmup-epochs", 0, "--test-limit", 16, "--device", "cpu", "--no-progress")
    _cli("extract", "--dataset", "synthetic", "--limit", 48, "--model", "tiny-convnext-clip", "--pretrained", "none",
         "--layers", 0, "--adapter", root / "adapter", "--out", root / "adapted-acts", "--device", "cpu",
         "--no-progress")
    _cli("encode", "--cache", root / "adapted-acts", "--sae", root / "sae", "--out", root / "adapted-codes",
         "--no-progress")
    _cli("stats", "--codes", root / "adapted-codes", "--cache", root / "adapted-acts", "--out", root / "adapted-stats",
         "--no-progress")
    _cli("mask", "--sae", root / "sae", "--stats", root / "stats", "--cache", root / "adapted-acts", "--adapter",
         root / "adapter", "--head", "zeroshot", "--out", root / "adapted-mask", "--k", 2, "--seeds", 1,
         "--no-progress")
    return root


def _adapter_on_random_model(root: Path):
    from pipeline import maple

    lm = load_model("tiny-convnext-clip", "none", device="cpu")
    return lm, maple.load_adapter(root / "adapter", lm)


def test_adapt_trains_the_stage_offsets_and_writes_a_loadable_adapter(adapted):
    config = json.loads((adapted / "adapter" / "config.json").read_text())["adapter"]
    assert config["method"] == "maple-stage-offsets" and (config["n_ctx"], config["depth"]) == (2, 2)
    metrics = json.loads((adapted / "adapter" / "metrics.json").read_text())
    assert all(0 <= metrics[f"{head}_accuracy"] <= 1 for head in ("base", "probe", "adapted"))
    lm, model = _adapter_on_random_model(adapted)
    assert all(linear.weight.abs().sum() > 0 for linear in model.prompts.stage_offsets)  # they started at zero
    images = torch.stack(_images(lm, 8))
    with torch.inference_mode():
        assert not torch.allclose(model.encode_image(images), lm.model.encode_image(images), atol=1e-4)


def test_the_adapted_store_has_the_base_layout_and_the_adapted_maps(adapted):
    from pipeline import maple

    base, store = ActivationStore(adapted / "acts", mode="r"), ActivationStore(adapted / "adapted-acts", mode="r")
    assert store.token_layout == base.token_layout and store.n_tokens == 64 and store.d_model == 64
    assert store.attrs["config"]["adapter"] == maple.adapter_identity(adapted / "adapter")
    assert store.attrs["config"]["adapter"]["method"] == "maple-stage-offsets"
    assert "channel offsets, not tokens" in store.attrs["model"]["adapter"]["stored_tokens"]
    lm, model = _adapter_on_random_model(adapted)
    with torch.inference_mode():
        expected = model.tap(torch.stack(_images(lm, 4)), (0,))[0]
    torch.testing.assert_close(torch.from_numpy(store.read(0, 0, 48)[:4]).float(), expected.half().float(), rtol=0,
                               atol=0)
    assert not np.array_equal(store.read(0, 0, 48), base.read(0, 0, 48))


def test_the_masking_splice_of_the_adapted_convnext_gives_back_its_own_logits(adapted):
    masking = json.loads((adapted / "adapted-mask" / "masking.json").read_text())
    assert masking["source"] == "images" and masking["config"]["adapter"]["method"] == "maple-stage-offsets"
    assert masking["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-4
    lm, model = _adapter_on_random_model(adapted)
    from pipeline.datasets import open_dataset

    images = open_dataset("synthetic", root=None, split=None, transform=lm.preprocess, limit=48, seed=0,
                          image_size=lm.image_size)
    x = torch.stack([images.dataset[i][0] for i in range(48)])
    labels = torch.tensor([images.dataset[i][1] for i in range(48)])
    with torch.inference_mode():
        predicted = (model.encode_image(x, normalize=True)
                     @ model.encode_text(images.class_names, normalize=True).T).argmax(1)
    assert masking["accuracy"]["clip"] == pytest.approx(float((predicted == labels).float().mean()))


def test_remap_reads_the_convnext_statistics(adapted):
    _cli("remap", "--base", adapted / "stats", "--adapted", adapted / "adapted-stats", "--base-masking",
         adapted / "mask", "--adapted-masking", adapted / "adapted-mask", "--out", adapted / "remap", "--no-plots")
    record = json.loads((adapted / "remap" / "remap.json").read_text())
    assert record["n_relevant"] > 0 and record["n_classes"] == len(record["per_class"]) and record["d_sae"] == 128
    assert sum(record["overall"].values()) == pytest.approx(1) and all(0 <= f <= 1 for f in record["overall"].values())
    assert record["masking"] is not None


def test_kept_prompt_tokens_and_adapters_of_the_other_tower_are_refused_by_name(adapted, tmp_path):
    from pipeline import maple
    from tests.helpers import assert_one_line_error

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.output

    extract = ["extract", "--dataset", "synthetic", "--limit", 8, "--pretrained", "none", "--layers", 1, "--device",
               "cpu", "--no-progress"]
    assert_one_line_error(*run(*extract, "--model", "tiny-convnext-clip", "--adapter", adapted / "adapter",
                               "--prompt-tokens", "keep", "--out", tmp_path / "keep"), maple.KEEP_REFUSED)
    assert_one_line_error(*run("mask", "--sae", adapted / "sae", "--stats", adapted / "stats", "--adapter",
                               adapted / "adapter", "--dataset", "synthetic", "--limit", 48, "--prompt-tokens", "keep",
                               "--head", "zeroshot", "--k", 2, "--out", tmp_path / "mask", "--no-progress"),
                          maple.KEEP_REFUSED)
    assert_one_line_error(*run(*extract, "--model", "tiny-clip", "--adapter", adapted / "adapter", "--out",
                               tmp_path / "vit"),
                          "is a maple-stage-offsets adapter (per-stage channel offsets, for a ConvNeXt), and tiny-clip "
                          "has a ViT image tower, which takes maple adapters")
    _cli("adapt", "--dataset", "synthetic", "--model", "tiny-clip", "--pretrained", "none", "--out",
         tmp_path / "vit-adapter", "--shots", 1, "--n-ctx", 2, "--depth", 2, "--epochs", 1, "--warmup-epochs", 0,
         "--test-limit", 4, "--device", "cpu", "--no-progress")
    assert_one_line_error(*run(*extract, "--model", "tiny-convnext-clip", "--adapter", tmp_path / "vit-adapter",
                               "--out", tmp_path / "convnext"),
                          "is a maple adapter (vision prompt tokens, for a ViT), and tiny-convnext-clip has a ConvNeXt "
                          "image tower, which takes maple-stage-offsets adapters")
