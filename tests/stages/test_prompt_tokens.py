"""MaPLe's vision prompt tokens kept in adapted stores (the paper's reference) or dropped (the base layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.codes import CodeStore, ShardCodes
from cache.errors import UserError
from cache.layout import patch_slice
from cache.loader import token_indices
from cache.store import ActivationStore
from pipeline import maple, masking, splice
from pipeline.datasets import open_dataset
from pipeline.latents import LatentStats
from pipeline.models import load_model
from pipeline.remap import normalised
from pipeline.sae import ReLUConfig, build, load_sae, save_sae
from pipeline.sources import image_source
from pipeline.statistics import Plan, reference_maps, shard_partial
from stages import adapt, encode, extract, groundtruth, stats
from tests.helpers import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

N_CTX = 2
T_BASE = 65  # tiny-clip: class token + 8 x 8 patches


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A random-model adapter (n_ctx 2, depth 2: the prompt tokens pass block 1 into block 2 unreplaced), adapted
    stores that drop and keep the prompt tokens, a base-model SAE, and codes and stats of both stores."""
    root = tmp_path_factory.mktemp("prompt-tokens")
    run = adapt.run(adapt.Config(dataset="synthetic", out_dir=root / "adapter", model="tiny-clip", pretrained="none",
                                 synthetic_task="shape_colour", shots=2, n_ctx=N_CTX, depth=2, epochs=1, batch_size=4,
                                 lr=0.01, warmup_epochs=0, test_limit=16, device="cpu", progress=False))
    common = dict(dataset="synthetic", limit=32, model="tiny-clip", pretrained="none", layers=(1,), batch_size=16,
                  device="cpu", images_per_chunk=8, images_per_shard=16, adapter=run.out_dir, progress=False)
    extract.run(extract.Config(out_dir=root / "drop", **common))
    extract.run(extract.Config(out_dir=root / "keep", prompt_tokens="keep", **common))
    store = ActivationStore(root / "drop", mode="r")
    sae = build(ReLUConfig(d_in=store.d_model, d_sae=64, layer=1, model="tiny-clip/none", norm_scale=1.0), seed=0)
    save_sae(sae, root / "sae")
    for kind in ("drop", "keep"):
        encode.run(encode.Config(cache_dir=root / kind, sae_dir=root / "sae", out_dir=root / f"codes-{kind}",
                                 device="cpu", progress=False))
        stats.run(stats.Config(codes_dir=root / f"codes-{kind}", cache_dir=root / kind, out_dir=root / f"stats-{kind}",
                               plots=False, scheduler="synchronous", threshold=0.0))
    return {"root": root, "adapter": run.out_dir, "drop": root / "drop", "keep": root / "keep", "sae": root / "sae"}


def test_keep_stores_the_prompt_tokens_after_the_drop_stores_tokens(stores):
    drop, keep = ActivationStore(stores["drop"], mode="r"), ActivationStore(stores["keep"], mode="r")
    assert (drop.n_tokens, keep.n_tokens) == (T_BASE, T_BASE + N_CTX)
    assert keep.token_layout["prompt_token_indices"] == [65, 66] and keep.token_layout["n_tokens"] == 67
    assert "prompt_token_indices" not in drop.token_layout
    assert {k: v for k, v in keep.token_layout.items() if k not in ("n_tokens", "prompt_token_indices")} == \
        {k: v for k, v in drop.token_layout.items() if k != "n_tokens"}
    assert keep.attrs["config"]["prompt_tokens"] == "keep" and "prompt_tokens" not in drop.attrs["config"]
    assert keep.attrs["model"]["adapter"]["prompt_tokens"] == "keep"
    assert drop.attrs["model"]["adapter"]["prompt_tokens"] == "drop"
    assert keep.attrs["writer"]["config"]["prompt_tokens"] == "keep"
    assert keep.config_sha256 != drop.config_sha256
    kept, dropped = np.asarray(keep.acts(1)[:]), np.asarray(drop.acts(1)[:])
    np.testing.assert_array_equal(kept[:, :T_BASE], dropped)
    model = load_model("tiny-clip", "none")
    data = open_dataset("synthetic", root=None, split=None, transform=model.preprocess, limit=32, image_size=32)
    images = torch.stack([data.dataset[i][0] for i in range(4)])
    _, prompts_BXD = maple.load_adapter(stores["adapter"], model).tap_with_prompts(images, (1,))[1]
    assert prompts_BXD.shape == (4, N_CTX, 128)
    torch.testing.assert_close(torch.from_numpy(kept[:4, T_BASE:]).float(), prompts_BXD.half().float(), rtol=0,
                               atol=0)
    assert token_indices(keep, "patches") == slice(1, 65) == patch_slice(keep.token_layout, keep.n_tokens)


def test_keep_without_an_adapter_is_the_base_store(tmp_path):
    common = dict(dataset="synthetic", limit=8, model="tiny-clip", pretrained="none", layers=(1,), device="cpu",
                  progress=False)
    a = extract.run(extract.Config(out_dir=tmp_path / "a", **common))
    b = extract.run(extract.Config(out_dir=tmp_path / "b", prompt_tokens="keep", **common))
    assert ActivationStore(a.store_dir).config_sha256 == ActivationStore(b.store_dir).config_sha256
    with pytest.raises(UserError, match="unknown --prompt-tokens 'all'"):
        extract.Config(out_dir=tmp_path / "c", prompt_tokens="all", **common)


def test_encode_codes_every_token_of_a_keep_store(stores):
    codes = CodeStore(stores["root"] / "codes-keep")
    assert codes.n_tokens == T_BASE + N_CTX and codes.attrs["token_layout"]["prompt_token_indices"] == [65, 66]


def test_stats_count_prompt_tokens_in_the_mean_and_counts_but_not_as_class_token_or_patches(stores):
    root = stores["root"]
    drop, keep = LatentStats(root / "stats-drop"), LatentStats(root / "stats-keep")
    assert keep.patch_grid == drop.patch_grid == (8, 8)
    def column(table, name: str) -> np.ndarray:
        return table[name].to_numpy(float, na_value=np.nan)

    # the class token and the patches are the same tokens in both stores: their variants agree exactly
    for col in ("frequency_cls", "mean_activation_cls", "frequency_max_patch", "mean_activation_max_patch"):
        np.testing.assert_array_equal(column(drop.table, col), column(keep.table, col))
    # the image mean and the class counts take the prompt tokens in: counts grow by their above-threshold entries
    codes = CodeStore(root / "codes-keep")
    extra_S = np.zeros(64, np.int64)
    for k in range(codes.n_shards):
        shard = codes.read_shard(k)
        ptr = shard.token_ptr
        for i in range(len(ptr) // (T_BASE + N_CTX)):
            lo, hi = ptr[i * 67 + T_BASE], ptr[(i + 1) * 67]
            np.add.at(extra_S, shard.indices[lo:hi], shard.values[lo:hi] > 0)
    assert extra_S.sum() > 0
    np.testing.assert_array_equal(keep.class_counts().sum(0) - drop.class_counts().sum(0), extra_S)
    assert not np.allclose(column(drop.table, "mean_activation"), column(keep.table, "mean_activation"),
                           equal_nan=True)
    norm_CS, images_C = normalised(keep, "tokens")  # remap: by the keep store's own 67 tokens per image
    np.testing.assert_allclose(norm_CS * images_C[:, None] * (T_BASE + N_CTX), keep.class_counts())


def test_shard_statistics_treat_prompt_tokens_as_neither_class_token_nor_patch():
    """One image, T = 1 + 2 patches + 2 prompt tokens; latent 0 fires only on the prompt tokens."""
    ptr = np.array([0, 1, 2, 3, 4, 5])  # token t holds one entry
    codes = ShardCodes(token_ptr=ptr, indices=np.array([1, 1, 1, 0, 0], np.int32),
                       values=np.array([0.5, 1.0, 2.0, 3.0, 5.0], np.float32))
    plan = Plan(n_tokens=5, d_sae=2, n_classes=1, class_token_index=0, n_prefix_tokens=1, top_k=1, threshold=0.0,
                n_prompt_tokens=2)
    part = shard_partial(codes, np.array([0]), np.array([True]), shard=0, first_image=0, plan=plan)
    assert part.n_active["max_patch"].tolist() == [0, 1] and part.sum_active["max_patch"].tolist() == [0.0, 2.0]
    assert part.n_active["cls"].tolist() == [0, 1] and part.sum_active["cls"].tolist() == [0.0, 0.5]
    assert part.sum_active["mean"].tolist() == pytest.approx([8.0 / 5, 3.5 / 5])
    assert part.counts_CS.tolist() == [[2, 3]]
    maps = reference_maps(codes, np.array([0, 0]), np.array([0, 1]), plan=plan)
    assert maps.tolist() == [[0.0, 0.0], [1.0, 2.0]]  # the patches only: latent 0's prompt-token values are no map


def test_masking_with_keep_replaces_the_prompt_tokens_and_the_error_term_still_gives_the_adapted_logits(stores):
    model = load_model("tiny-clip", "none")
    adapted = maple.load_adapter(stores["adapter"], model)
    sae = load_sae(stores["sae"], device="cpu")
    data = open_dataset("synthetic", root=None, split=None, transform=model.preprocess, limit=8, image_size=32)
    rows = np.arange(8)
    kept = next(image_source(data, model, adapted, 1, 0, keep_prompts=True).batches(rows, 8))
    dropped = next(image_source(data, model, adapted, 1, 0).batches(rows, 8))
    assert kept.x_BTD.shape == (8, 67, 128) and kept.prompts_BXD.shape == (8, 0, 128)
    torch.testing.assert_close(kept.x_BTD, torch.cat([dropped.x_BTD, dropped.prompts_BXD.float()], dim=1))
    enc = splice.encode_tap(sae, kept.x_BTD)
    spliced = splice.splice_input(enc, splice.masked_reconstruction(sae, enc, "on", None), error_term=False)
    # the prompt tokens' residuals are the SAE reconstruction, like every other token
    assert (spliced[:, T_BASE:] - kept.x_BTD[:, T_BASE:]).abs().max() > 1e-2
    torch.testing.assert_close(spliced[:, T_BASE:], enc.xhat_BTD[:, T_BASE:], rtol=0, atol=0)
    images = torch.stack([data.dataset[i][0] for i in range(8)])
    exact = splice.splice_input(enc, enc.xhat_BTD, error_term=True)  # nothing masked, with the error term
    with torch.inference_mode():
        torch.testing.assert_close(adapted.finish(exact, kept.prompts_BXD, 1), adapted.encode_image(images),
                                   rtol=0, atol=1e-5)
        without_prompts_masked = adapted.finish(splice.splice_input(
            splice.encode_tap(sae, dropped.x_BTD), splice.encode_tap(sae, dropped.x_BTD).xhat_BTD, error_term=False),
            dropped.prompts_BXD, 1)
        with_prompts_masked = adapted.finish(spliced, kept.prompts_BXD, 1)
    assert (with_prompts_masked - without_prompts_masked).abs().max() > 1e-4


def test_mask_stage_follows_the_store_and_refuses_a_contradiction(stores, tmp_path):
    common = ["mask", "--sae", stores["sae"], "--stats", stores["root"] / "stats-keep", "--k", "1,all", "--seeds", "0",
              "--head", "zeroshot", "--device", "cpu", "--no-plots", "--no-progress", "--adapter", stores["adapter"]]
    code, output = _cli(*common, "--out", tmp_path / "keep", "--cache", stores["keep"])
    assert code == 0, output
    kept = json.loads((tmp_path / "keep" / masking.RESULTS_FILE).read_text())
    code, output = _cli(*common, "--out", tmp_path / "drop", "--dataset", "synthetic", "--limit", "32")
    assert code == 0, output
    dropped = json.loads((tmp_path / "drop" / masking.RESULTS_FILE).read_text())
    assert kept["config"]["prompt_tokens"] == "keep" and dropped["config"]["prompt_tokens"] == "drop"
    assert kept["accuracy"]["clip"] == dropped["accuracy"]["clip"]
    assert kept["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-3
    assert_one_line_error(*_cli(*common, "--out", tmp_path / "x", "--cache", stores["keep"], "--prompt-tokens",
                                "drop"),
                          "--prompt-tokens drop contradicts the store", "extracted with --prompt-tokens keep")


def test_groundtruth_refuses_a_store_that_keeps_prompt_tokens(stores, tmp_path):
    root = stores["root"]
    with pytest.raises(UserError, match="keeps an adapted model's vision prompt tokens"):
        groundtruth.run(groundtruth.Config(stats_dir=root / "stats-keep", codes_dir=root / "codes-keep",
                                           cache_dir=stores["keep"], out_dir=tmp_path / "gt"))
