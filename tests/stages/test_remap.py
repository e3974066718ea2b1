"""The remap stage: hand-computed fractions, masking side by side, refusals, and the real chain
(extract -> encode -> stats -> remap). The grouping itself: tests/pipeline/test_remap_groups.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.store import ActivationStore
from pipeline.sae import ReLUConfig, build, save_sae
from stages import encode, remap, stats
from tests.helpers import TINY, assert_one_line_error
from tests.stages.test_stats import build_stores, run_stats

T = 5  # tokens per image
PER_CLASS = 4  # images per class: 20 tokens per class

# Planted class-level counts (tokens with f > 0.2), class x latent. With normalise=max, tau 0.5 / 0.1:
# cat (max 20 in both): l0 1->1 high->high; l1 .5->.1 and l2 .6->0 high->low (both bounds inclusive);
#   l3 0->.75 and l4 .05->.8 low->high; l5 .2->.4 between in both (not relevant); l6 1->.3 partial;
#   l7 0->.05 low in both (not relevant).
# dog: the adapted counts are half the base counts (max 8 -> 4): normalised by the class's max they
#   do not move (l2, l3 high->high; l7 .25 is between: not relevant).
BASE_CS = np.array([[20, 10, 12, 0, 1, 4, 20, 0],
                    [0, 0, 8, 8, 0, 0, 0, 0]])
ADAPTED_CS = np.array([[20, 2, 0, 15, 16, 8, 6, 1],
                       [0, 0, 4, 4, 0, 0, 0, 1]])
CLASSES = ["cat", "dog"]


def codes_with_counts(counts_CS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes ``(N, T, S)`` and labels whose class-level counts are ``counts_CS`` (f = 1 on that many tokens)."""
    n_classes, s = counts_CS.shape
    labels_N = np.repeat(np.arange(n_classes), PER_CLASS)
    f_NTS = np.zeros((len(labels_N), T, s), np.float32)
    for c in range(n_classes):
        tokens = f_NTS[labels_N == c].reshape(PER_CLASS * T, s)
        for j, n in enumerate(counts_CS[c]):
            tokens[:n, j] = 1.0
        f_NTS[labels_N == c] = tokens.reshape(PER_CLASS, T, s)
    return f_NTS, labels_N


def planted_stats(root: Path, counts_CS: np.ndarray, class_names=CLASSES, **stats_options) -> Path:
    """A real statistics folder (stats stage over a code store) with the given class-level counts."""
    f_NTS, labels_N = codes_with_counts(counts_CS)
    acts, codes = build_stores(root, f_NTS, labels_N, np.ones(len(labels_N), bool), class_names=class_names,
                               images_per_shard=3, grid=[2, 2])
    return run_stats(acts, codes, root / "stats", **stats_options).stats_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("remap")
    base, adapted = planted_stats(root / "base", BASE_CS), planted_stats(root / "adapted", ADAPTED_CS)
    assert np.load(base / "class_counts.npy").tolist() == BASE_CS.tolist()
    assert np.load(adapted / "class_counts.npy").tolist() == ADAPTED_CS.tolist()
    return base, adapted


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_stage_fractions_by_hand(planted, tmp_path):
    base, adapted = planted
    out = remap.run(remap.Config(base_dir=base, adapted_dir=adapted, out_dir=tmp_path / "r", plots=False))
    record = json.loads(out.results_path.read_text())
    # cat: 6 relevant latents (1 high->high, 2 high->low, 2 low->high, 1 partial); dog: 2, both high->high
    assert record["per_class"]["cat"] == pytest.approx({"relevant": 6, "high_high": 1 / 6, "high_low": 2 / 6,
                                                        "low_high": 2 / 6, "partial": 1 / 6})
    assert record["per_class"]["dog"] == pytest.approx({"relevant": 2, "high_high": 1, "high_low": 0, "low_high": 0,
                                                        "partial": 0})
    assert record["overall"] == pytest.approx({"high_high": 3 / 8, "high_low": 2 / 8, "low_high": 2 / 8,
                                               "partial": 1 / 8})
    assert record["latents_per_class"] == pytest.approx({"relevant": 4, "high_high": 1.5, "high_low": 1,
                                                         "low_high": 1, "partial": 0.5})
    assert record["n_relevant"] == 8 and record["d_sae"] == 8 and record["n_classes"] == 2
    assert record["thresholds"] == {"tau_high": 0.5, "tau_low": 0.1, "normalise": "max", "count_threshold": 0.2}
    assert set(record["definitions"]) >= {"normalise_max", "high_low", "relevant", "groups", "overall"}
    assert record["masking"] == {} and out.plot_path is None

    by_tokens = remap.run(remap.Config(base_dir=base, adapted_dir=adapted, out_dir=tmp_path / "t", plots=False,
                                       normalise="tokens", tau_high=0.3, tau_low=0.25))
    dog = json.loads(by_tokens.results_path.read_text())["per_class"]["dog"]
    assert dog == pytest.approx({"relevant": 2, "high_high": 0, "high_low": 2 / 2, "low_high": 0, "partial": 0})


def test_cli_prints_the_table_beside_its_thresholds(planted, tmp_path):
    base, adapted = planted
    result = _cli("remap", "--base", base, "--adapted", adapted, "--out", tmp_path / "r", "--high", 0.5,
                  "--low", 0.1)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("thresholds: high = normalised count >= 0.5, low = <= 0.1; counts of tokens with "
                               "f > 0.2, normalised by the class's most counted latent")
    assert "| class | images base/adapted | relevant | high->high | high->low | low->high | partial |" in lines
    assert "| cat | 4/4 | 6 | 16.7% (1) | 33.3% (2) | 33.3% (2) | 16.7% (1) |" in lines
    assert "| dog | 4/4 | 2 | 100.0% (2) | 0.0% (0) | 0.0% (0) | 0.0% (0) |" in lines
    assert "| **all classes** | 8/8 | 8 | 37.5% (3) | 25.0% (2) | 25.0% (2) | 12.5% (1) |" in lines
    assert "| latents per class | | 4.00 | 1.50 | 1.00 | 1.00 | 0.50 |" in lines
    table = (tmp_path / "r" / "remap_table.md").read_text().splitlines()
    assert table == lines[:len(table)]  # the file holds what was printed
    assert (tmp_path / "r" / "remap.png").stat().st_size > 5_000


# ---------------------------------------------------------------------------------------
# Masking of both models, side by side


def _masking_json(path: Path, clip: float, on_1: float, sha: str = "0" * 64, classes=CLASSES) -> Path:
    """A masking.json as `pipeline mask` writes it (the fields remap reads)."""
    path.mkdir(parents=True, exist_ok=True)
    record = {"accuracy": {"clip": clip, "sae_all_on": clip - 0.1, "sae_error_term": clip, "chance": 0.5,
                           "on": {"1": on_1, "all": clip - 0.1}, "off": {"1": 0.5, "all": 0.5},
                           "random_on": {"1": {"mean": 0.5, "std": 0.02}, "all": {"mean": clip - 0.1, "std": 0.0}}},
              "n_images": 8, "class_names": list(classes),
              "config": {"model": "tiny-vit", "pretrained": "none", "head": "probe"},
              "provenance": {"sae_weights_sha256": sha}}
    (path / "masking.json").write_text(json.dumps(record))
    return path


def test_masking_of_both_models_side_by_side(planted, tmp_path):
    base, adapted = planted
    base_m = _masking_json(tmp_path / "mb", clip=0.75, on_1=0.625)
    adapted_m = _masking_json(tmp_path / "ma", clip=0.875, on_1=0.75)
    result = _cli("remap", "--base", base, "--adapted", adapted, "--out", tmp_path / "r", "--no-plots",
                  "--base-masking", base_m, "--adapted-masking", adapted_m / "masking.json")
    assert result.exit_code == 0, result.output
    masking = json.loads((tmp_path / "r" / "remap.json").read_text())["masking"]
    assert masking["base"]["clip"] == 0.75 and masking["adapted"]["clip"] == 0.875
    assert masking["base"]["on_k1"] == 0.625 and masking["adapted"]["random_on_k1"] == 0.5
    assert masking["adapted"]["random_on_k1_std"] == 0.02
    assert masking["difference"] == pytest.approx({"clip": 0.125, "sae_all_on": 0.125, "sae_error_term": 0.125,
                                                   "chance": 0, "on_k1": 0.125, "on_kall": 0.125, "off_k1": 0,
                                                   "off_kall": 0, "random_on_k1": 0, "random_on_kall": 0.125})
    assert "| accuracy | base | adapted | difference |" in result.output
    assert "| clip | 0.7500 | 0.8750 | +0.1250 |" in result.output
    assert "| on_k1 | 0.6250 | 0.7500 | +0.1250 |" in result.output
    only_adapted = remap.run(remap.Config(base_dir=base, adapted_dir=adapted, out_dir=tmp_path / "o", plots=False,
                                          adapted_masking=adapted_m))
    assert set(json.loads(only_adapted.results_path.read_text())["masking"]) == {"adapted"}
    assert "| accuracy | adapted |" in only_adapted.table_lines


# ---------------------------------------------------------------------------------------
# Acceptance 5: refusals (one line each)


def _with_meta(stats_dir: Path, dest: Path, **provenance) -> Path:
    """A copy of a statistics folder whose meta.json records other provenance (e.g. another SAE)."""
    shutil.copytree(stats_dir, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["provenance"].update(provenance)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_refusals(planted, tmp_path):
    base, adapted = planted
    other_classes = planted_stats(tmp_path / "cls", ADAPTED_CS, class_names=["cat", "cow"])
    wider = planted_stats(tmp_path / "wide", np.pad(ADAPTED_CS, ((0, 0), (0, 1))))
    other_sae = _with_meta(adapted, tmp_path / "sae", sae_weights_sha256="f" * 64)
    unknown_sae = _with_meta(adapted, tmp_path / "nosae", sae_weights_sha256=None)
    other_threshold = planted_stats(tmp_path / "thr", ADAPTED_CS, threshold=0.5)
    out = tmp_path / "out"
    cases = [
        ((base, other_classes), (), ["different classes", "'cow'"]),
        ((base, wider), (), ["has 8 latents", "has 9", "different SAEs"]),
        ((base, other_sae), (), ["different SAEs", "000000000000 vs ffffffffffff"]),
        ((base, unknown_sae), (), ["does not say which SAE"]),
        ((base, other_threshold), (), ["f > 0.2", "f > 0.5"]),
        ((base, adapted), ("--high", 0.1, "--low", 0.1), ["tau_low < tau_high"]),
        ((base, adapted), ("--high", 1.5), ["tau_high <= 1"]),
        ((base, adapted), ("--adapted-masking", _masking_json(tmp_path / "m1", 0.8, 0.7, sha="e" * 64)),
         ["adapted masking", "another SAE"]),
        ((base, adapted), ("--base-masking", _masking_json(tmp_path / "m2", 0.8, 0.7, classes=["a", "b"])),
         ["base masking", "other classes"]),
        ((base, adapted), ("--base-masking", tmp_path / "missing.json"), ["does not exist"]),
    ]
    for (b, a), extra, needles in cases:
        result = _cli("remap", "--base", b, "--adapted", a, "--out", out, "--no-plots", *extra)
        assert_one_line_error(result.exit_code, result.output, *needles)
        assert not out.exists(), needles  # refused before writing anything


# ---------------------------------------------------------------------------------------
# The real chain on tiny data


def _encode_and_stats(root: Path, store_dir: Path, sae_dir: Path) -> Path:
    encode.run(encode.Config(cache_dir=store_dir, sae_dir=sae_dir, out_dir=root / "codes", device="cpu",
                             progress=False))
    stats.run(stats.Config(codes_dir=root / "codes", cache_dir=store_dir, out_dir=root / "stats", plots=False,
                           scheduler="synchronous"))
    return root / "stats"


def _random_sae(store: ActivationStore, root: Path, seed: int) -> Path:
    sae = build(ReLUConfig(d_in=store.d_model, d_sae=96, layer=3, model=f"{TINY}/none",
                          cache_config_sha256=store.config_sha256), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    save_sae(sae, root)
    return root


@pytest.mark.usefixtures("one_thread")
def test_real_chain_identical_inputs_stay_on_the_diagonal(tiny_store, tmp_path):
    """A tiny ViT store encoded twice with one SAE: every latent is high->high or not relevant."""
    store = ActivationStore(tiny_store, mode="r")
    sae_dir = _random_sae(store, tmp_path / "sae", seed=0)
    first = _encode_and_stats(tmp_path / "a", tiny_store, sae_dir)
    second = _encode_and_stats(tmp_path / "b", tiny_store, sae_dir)
    counts = np.load(first / "class_counts.npy")
    assert counts.sum() > 0 and (counts > 0).sum() > 50  # the SAE is active: the comparison is not vacuous
    out = remap.run(remap.Config(base_dir=first, adapted_dir=second, out_dir=tmp_path / "r"))
    record = json.loads(out.results_path.read_text())
    assert record["overall"] == {"high_high": 1.0, "high_low": 0.0, "low_high": 0.0, "partial": 0.0}
    assert record["n_relevant"] >= len(store.class_names)  # max-normalised: each class's top latent is high
    for name, row in record["per_class"].items():
        if row["relevant"]:
            assert row["high_high"] == 1.0 and row["high_low"] == row["low_high"] == row["partial"] == 0, name
    assert out.plot_path.stat().st_size > 5_000

    other = _encode_and_stats(tmp_path / "c", tiny_store, _random_sae(store, tmp_path / "sae2", seed=1))
    result = _cli("remap", "--base", first, "--adapted", other, "--out", tmp_path / "x")
    assert_one_line_error(result.exit_code, result.output, "different SAEs")
