"""The masking stage: outputs and baselines, a planted class latent, cached tap vs images, refusals."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.store import ActivationStore, StoreSpec, create_or_resume
from pipeline import masking, splice
from pipeline.latents import LatentStats
from pipeline.models import load_model
from pipeline.sae import ReLUConfig, build, load_sae, save_sae
from stages import encode, extract, mask, stats
from tests.helpers import TINY, assert_one_line_error, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 2
KS = "1,5,50,all"




def _sae_stats(root: Path, store_dir: Path, sae) -> tuple[Path, Path]:
    """Save ``sae``, encode the store with it and compute its statistics (the real stages)."""
    save_sae(sae, root / "sae")
    encode.run(encode.Config(cache_dir=store_dir, sae_dir=root / "sae", out_dir=root / "codes", device="cpu",
                             progress=False))
    stats.run(stats.Config(codes_dir=root / "codes", cache_dir=store_dir, out_dir=root / "stats", plots=False,
                           scheduler="synchronous"))
    return root / "sae", root / "stats"


def _random_sae(store: ActivationStore, *, seed: int = 0, **fields):
    config = dict(d_in=store.d_model, d_sae=256, layer=LAYER, model=f"{TINY}/none", norm_scale=1.5,
                  cache_config_sha256=store.config_sha256)
    config.update(fields)
    sae = build(ReLUConfig(**config), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.copy_(0.1 * torch.randn(store.d_model, generator=torch.Generator().manual_seed(seed)))
    return sae


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """48 synthetic images through a random tiny ViT (layer 2), a random SAE, its codes and statistics."""
    root = tmp_path_factory.mktemp("mask")
    cfg = extract.Config(dataset="synthetic", out_dir=root / "store", limit=48, model=TINY, pretrained="none",
                         layers=(LAYER,), batch_size=16, device="cpu", images_per_chunk=8, images_per_shard=16,
                         progress=False)
    extract.run(cfg)
    store = ActivationStore(cfg.out_dir, mode="r")
    sae_dir, stats_dir = _sae_stats(root, cfg.out_dir, _random_sae(store))
    return {"root": root, "store": cfg.out_dir, "sae": sae_dir, "stats": stats_dir}


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _base_args(world, out: Path) -> list[str]:
    return ["mask", "--sae", world["sae"], "--stats", world["stats"], "--out", out, "--model", TINY,
            "--pretrained", "none", "--k", KS, "--seeds", "2", "--device", "cpu", "--no-progress"]


def test_cli_sweep_from_the_cache_writes_every_number(world, tmp_path):
    out = tmp_path / "masking"
    code, output = _cli(*_base_args(world, out), "--cache", world["store"], "--probe-images", "16")
    assert code == 0, output
    assert "plain CLIP" in output
    result = json.loads((out / masking.RESULTS_FILE).read_text())
    acc = result["accuracy"]
    assert result["n_images"] == 48 - 16 and result["n_probe_images"] == 16
    assert result["source"] == "cache" and result["head"]["kind"] == "probe"
    # k=all: "on" is the SAE with every latent on; with the error term nothing changes from plain CLIP.
    assert acc["on"]["all"] == acc["sae_all_on"]
    assert acc["sae_error_term"] == acc["clip"]
    assert result["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-4
    assert set(acc["on"]) == set(acc["off"]) == {"1", "5", "50", "all"}
    assert acc["random_on"]["all"] == {"mean": acc["on"]["all"], "std": 0.0}
    assert len(result["random_per_seed"]["off"]["5"]) == 2
    assert acc["chance"] == pytest.approx(1 / 20)
    with open(out / masking.PER_CLASS_FILE) as f:
        rows = list(csv.DictReader(f))
    n_variants = 1 + 2 + 2 * 4 + 2 * 2 * 3  # clip, 2 baselines, on/off x 4 k, 2 seeds x on/off x 3 finite k
    assert len(rows) == n_variants * 20
    on1 = [r for r in rows if r["variant"] == "on/k=1"]
    assert sum(int(r["n_correct"]) for r in on1) / 32 == pytest.approx(acc["on"]["1"])
    assert (out / masking.PLOT_FILE).stat().st_size > 0


def test_cached_tap_equals_the_images_path(world, tmp_path):
    # Library level: the same images through both paths, several masks.
    lm = load_model(TINY, "none", device="cpu")
    store = ActivationStore(world["store"], mode="r")
    sae = load_sae(world["sae"])
    from pipeline.datasets import open_dataset

    images = open_dataset("synthetic", root=None, split=None, transform=lm.preprocess, limit=48, seed=0,
                          image_size=lm.image_size)
    rows = [0, 5, 17, 40]
    batch = torch.stack([images.dataset[r][0] for r in rows])
    labels = torch.tensor([images.dataset[r][1] for r in rows])
    x_img = splice.tap_forward(lm.visual, batch, LAYER)
    x_cache = torch.from_numpy(store.acts(LAYER)[rows]).float()
    assert torch.equal(x_cache, x_img.half().float())  # the store holds the tap, rounded to float16
    top_CK = torch.from_numpy(masking.top_latents(np.asarray(LatentStats(world["stats"]).class_counts()), 50))
    for mode, idx, err in [("on", None, True), ("on", None, False), ("on", top_CK[labels, :5], False),
                           ("off", top_CK[labels, :5], False), ("off", top_CK[labels, :50], True)]:
        from_images = splice.spliced_features(lm.visual, sae, LAYER, x_img, mode=mode, idx_BK=idx, error_term=err)
        from_cache = splice.spliced_features(lm.visual, sae, LAYER, x_cache, mode=mode, idx_BK=idx, error_term=err)
        torch.testing.assert_close(from_cache, from_images, rtol=2e-2, atol=2e-3)
        # ... and exactly what the images path gives with the tap rounded like the store.
        torch.testing.assert_close(
            from_cache, splice.spliced_features(lm.visual, sae, LAYER, x_img.half().float(), mode=mode, idx_BK=idx,
                                                error_term=err), rtol=0, atol=0)
    # Stage level: the same sweep from the cache and from the images.
    common = dict(sae_dir=world["sae"], stats_dir=world["stats"], model=TINY, pretrained="none", ks=(1, 5, 50, "all"),
                  n_seeds=1, device="cpu", progress=False, plots=False, probe_images=16)
    a = mask.run(mask.Config(out_dir=tmp_path / "a", cache_dir=world["store"], **common))
    b = mask.run(mask.Config(out_dir=tmp_path / "b", dataset="synthetic", limit=48, **common))
    assert (a.source, b.source) == ("cache", "images")
    assert a.n_images == b.n_images == 32
    ra, rb = (json.loads(o.results_path.read_text())["accuracy"] for o in (a, b))
    for key in ("clip", "sae_all_on", "sae_error_term"):
        assert abs(ra[key] - rb[key]) <= 1 / 32
    for mode in ("on", "off"):
        for k in ra[mode]:
            assert abs(ra[mode][k] - rb[mode][k]) <= 1 / 32


def test_zero_shot_head_and_a_separate_probe_split(world, tmp_path):
    common = dict(sae_dir=world["sae"], stats_dir=world["stats"], cache_dir=world["store"], model=TINY,
                  pretrained="none", ks=(1, "all"), n_seeds=0, device="cpu", progress=False, plots=False)
    zs = mask.run(mask.Config(out_dir=tmp_path / "zs", head="zeroshot", **common))
    head = json.loads(zs.results_path.read_text())["head"]
    assert zs.head == "zeroshot" and zs.n_images == 48  # no probe: every image is evaluated
    assert head["templates"] == "world" and head["prompt_names"][0] == "red circle"
    assert zs.accuracy["on"]["all"] == zs.sae_all_on_accuracy and zs.random_accuracy == {}
    pr = mask.run(mask.Config(out_dir=tmp_path / "pr", head="probe", probe_split="val", probe_images=20, **common))
    head = json.loads(pr.results_path.read_text())["head"]
    assert pr.n_images == 48 and head["split"] == "val" and head["n_train"] == 20
    assert not head["held_out_from_evaluation"]


# ---------------------------------------------------------------------------------------
# Planted: one latent per class carries the class


def _planted(root: Path, n_per_class: int = 20, n_classes: int = 3, amplitude: float = 4.0):
    """A store of tiny-ViT-shaped residuals where class c adds ``amplitude · u_c`` to every token.

    The rest is noise in 5 other directions (each read by one 'noise' latent) plus a little
    isotropic noise. The SAE: latent c reads and writes u_c, latents 3..7 the noise directions.
    """
    lm = load_model(TINY, "none", device="cpu")
    t, d = lm.n_tokens(LAYER), lm.width(LAYER)
    g = torch.Generator().manual_seed(0)
    dirs, _ = torch.linalg.qr(torch.randn(d, n_classes + 5, generator=g, dtype=torch.float64))
    dirs = dirs.T.float()  # (8, D) orthonormal rows
    n = n_classes * n_per_class
    labels = np.arange(n) % n_classes
    z = torch.randn(n, t, 5, generator=g) * 0.7
    x = z @ dirs[n_classes:] + 0.05 * torch.randn(n, t, d, generator=g)
    x += amplitude * dirs[torch.from_numpy(labels)][:, None, :]
    spec = StoreSpec(layers=(LAYER,), n_tokens=t, d_model=d, image_ids=[f"planted/{i}" for i in range(n)],
                     class_names=[f"class_{c}" for c in range(n_classes)], images_per_chunk=20, images_per_shard=20,
                     config={"planted": n},
                     attrs={"token_layout": lm.token_layout(LAYER), "preprocess": {},
                            "model": {"name": TINY, "pretrained": "none"},
                            "dataset": {"name": "planted", "split": "all", "root": None, "limit": None, "seed": 0}})
    store = create_or_resume(root / "store", spec)
    for k in range(store.n_shards):
        sl = store.shard_slice(k)
        store.write_shard(k, {LAYER: x[sl].half().numpy()}, labels[sl], np.ones(sl.stop - sl.start, bool))
    sae = build(ReLUConfig(d_in=d, d_sae=dirs.shape[0], layer=LAYER, model=f"{TINY}/none",
                          cache_config_sha256=store.config_sha256))
    with torch.no_grad():
        sae.W_dec.copy_(dirs)
        sae.W_enc.copy_(dirs.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae_dir, stats_dir = _sae_stats(root, root / "store", sae)
    return root / "store", sae_dir, stats_dir


def test_planted_class_latent_off_drops_to_chance_on_keeps_it(tmp_path):
    store_dir, sae_dir, stats_dir = _planted(tmp_path)
    counts = np.asarray(LatentStats(stats_dir).class_counts())
    assert masking.top_latents(counts, 1)[:, 0].tolist() == [0, 1, 2]  # each class's top latent is its own
    out = mask.run(mask.Config(sae_dir=sae_dir, stats_dir=stats_dir, out_dir=tmp_path / "m", cache_dir=store_dir,
                               model=TINY, pretrained="none", ks=(1, 2, "all"), n_seeds=2, device="cpu",
                               progress=False, plots=False, probe_images=30))
    assert out.n_images == 30 and out.head == "probe"
    assert out.clip_accuracy >= 0.95
    assert out.sae_all_on_accuracy >= 0.95
    assert out.accuracy["on"]["1"] >= 0.95  # the class's own latent alone keeps the class
    assert abs(out.accuracy["off"]["1"] - 1 / 3) <= 0.2  # without it: chance
    assert out.accuracy["off"]["2"] <= 0.55


# ---------------------------------------------------------------------------------------
# Refusals: one line, exit status 2


def test_refuses_another_layer(world, tmp_path):
    code, out = _cli(*_base_args(world, tmp_path / "m"), "--cache", world["store"], "--layer", "1")
    assert_one_line_error(code, out, "trained on layer 2, not layer 1")


def test_refuses_an_sae_of_another_model(world, tmp_path):
    sae = load_sae(world["sae"])
    other = build(dataclasses.replace(sae.config, model="ViT-B-16/openai"))
    other.load_state_dict(sae.state_dict())
    save_sae(other, tmp_path / "sae")
    args = _base_args(world, tmp_path / "m")
    args[args.index("--sae") + 1] = tmp_path / "sae"
    code, out = _cli(*args, "--cache", world["store"])
    assert_one_line_error(code, out, "trained on ViT-B-16/openai, not tiny-vit/none")


def test_refuses_stats_of_another_sae(world, tmp_path):
    store = ActivationStore(world["store"], mode="r")
    save_sae(_random_sae(store, seed=1), tmp_path / "sae")
    args = _base_args(world, tmp_path / "m")
    args[args.index("--sae") + 1] = tmp_path / "sae"
    code, out = _cli(*args, "--cache", world["store"])
    assert_one_line_error(code, out, "computed from another SAE")


def test_refuses_k_larger_than_d_sae(world, tmp_path):
    args = _base_args(world, tmp_path / "m")
    args[args.index("--k") + 1] = "1,257"
    code, out = _cli(*args, "--cache", world["store"])
    assert_one_line_error(code, out, "k=257 exceeds the SAE's 256 latents")


def test_refuses_a_dataset_with_other_classes(world, tmp_path):
    folder = make_image_folder(tmp_path / "folder", n_classes=3, per_class=2)
    code, out = _cli(*_base_args(world, tmp_path / "m"), "--dataset", "imagefolder", "--root", folder)
    assert_one_line_error(code, out, "do not match those of", "3 classes vs 20")


def test_refuses_a_bad_splice_correction_and_an_unmeasurable_mean_error(world, tmp_path):
    code, out = _cli(*_base_args(world, tmp_path / "m"), "--cache", world["store"], "--splice-correction", "median")
    assert_one_line_error(code, out, "unknown splice correction 'median'")
    code, out = _cli(*_base_args(world, tmp_path / "m"), "--dataset", "synthetic", "--limit", "48",
                     "--splice-correction", "mean_error")  # no stored mean error and no store to measure it on
    assert_one_line_error(code, out, "has no mean_error.safetensors", "--cache")
    assert not (tmp_path / "m" / masking.RESULTS_FILE).exists()


def test_refuses_bad_k_and_a_store_without_the_layer(world, tmp_path):
    args = _base_args(world, tmp_path / "m")
    args[args.index("--k") + 1] = "1,zero"
    code, out = _cli(*args, "--cache", world["store"])
    assert code == 2 and "positive integer or 'all'" in out
    other = tmp_path / "store1"
    extract.run(extract.Config(dataset="synthetic", out_dir=other, limit=4, model=TINY, pretrained="none",
                               layers=(1,), batch_size=4, device="cpu", progress=False))
    code, out = _cli(*_base_args(world, tmp_path / "m"), "--cache", other)
    assert_one_line_error(code, out, "holds layers [1], not the SAE's layer 2")
    assert not (tmp_path / "m").exists()


def test_splice_correction_mean_error_restores_a_biased_sae_and_every_table_has_mean_recall(tmp_path):
    from pipeline.sae.io import MEAN_ERROR_NAME, MeanError, load_mean_error, save_mean_error

    store_dir = _planted(tmp_path / "planted")[0]
    store = ActivationStore(store_dir, mode="r")
    d = store.d_model
    sae = _random_sae(store, d_sae=2 * d, norm_scale=1.0)
    offset_D = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(1))  # a large systematic bias
    eye = torch.eye(d)
    with torch.no_grad():  # x_hat = x + offset exactly: latents relu(x + o) and relu(-x - o), decoded as ±1
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.copy_(torch.cat([offset_D, -offset_D]))
        sae.b_dec.zero_()
    sae_dir, stats_dir = _sae_stats(tmp_path, store_dir, sae)
    common = dict(sae_dir=sae_dir, stats_dir=stats_dir, cache_dir=store_dir, model=TINY, pretrained="none",
                  ks=(1, "all"), n_seeds=2, device="cpu", progress=False, plots=False, probe_images=30)
    runs = {c: mask.run(mask.Config(out_dir=tmp_path / c.replace(":", "_"), splice_correction=c, **common))
            for c in ("none", "constant:0.0", "mean_error")}
    records = {c: json.loads(o.results_path.read_text()) for c, o in runs.items()}
    # none is today's sweep; adding 0.0 changes no bit.
    assert records["none"]["accuracy"] == records["constant:0.0"]["accuracy"]
    assert records["none"]["splice_correction"] == {"kind": "none"}
    assert records["constant:0.0"]["config"]["splice_correction"] == "constant:0.0"
    # The SAE folder had no mean error: it was measured on the store (every token of its 60 images), and is -offset.
    fixed = records["mean_error"]["splice_correction"]
    assert fixed["kind"] == "mean_error" and fixed["source"].startswith("measured on the store")
    assert fixed["n_tokens"] == 60 * store.n_tokens
    assert fixed["mean"] == pytest.approx(-float(offset_D.mean()), abs=1e-3)
    acc = {c: r["accuracy"] for c, r in records.items()}
    assert acc["none"]["clip"] == 1.0 and acc["none"]["sae_all_on"] == pytest.approx(11 / 30)  # the bias breaks it
    assert acc["mean_error"]["sae_all_on"] == acc["mean_error"]["clip"]  # ... the correction restores it
    assert acc["mean_error"]["sae_error_term"] == acc["none"]["sae_error_term"] == acc["none"]["clip"]
    # A stored mean error is used as it is.
    save_mean_error(sae_dir, MeanError(mean_error_D=-offset_D, n_tokens=7, token_kind="all",
                                       cache_config_sha256=store.config_sha256))
    assert load_mean_error(sae_dir).n_tokens == 7
    again = json.loads(mask.run(mask.Config(out_dir=tmp_path / "stored", splice_correction="mean_error", **common))
                       .results_path.read_text())
    assert again["splice_correction"]["source"] == f"{MEAN_ERROR_NAME} of the SAE folder"
    assert again["splice_correction"]["n_tokens"] == 7
    # Every accuracy has its mean per-class recall beside it, computed from the same per-class counts.
    rec = records["none"]["mean_recall"]
    assert set(rec) == set(acc["none"]) - {"chance"}
    with open(tmp_path / "none" / masking.PER_CLASS_FILE) as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "sae_all_on" and int(r["n_images"])]
    assert rec["sae_all_on"] == pytest.approx(np.mean([int(r["n_correct"]) / int(r["n_images"]) for r in rows]))
    assert set(rec["on"]) == {"1", "all"} and set(rec["random_off"]["1"]) == {"mean", "std"}
    assert runs["none"].mean_recall["clip"] == rec["clip"]
    flat = masking.read_accuracies(runs["none"].results_path, records["none"]["provenance"]["sae_weights_sha256"],
                                   records["none"]["class_names"], "base")["accuracy"]
    assert flat["mean_recall_on_k1"] == rec["on"]["1"] and flat["on_k1"] == acc["none"]["on"]["1"]
