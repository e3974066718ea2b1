"""The ground-truth stage: a real extract -> train -> encode -> stats chain, a planted code store, the
report section, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from app.cli import main
from pipeline import groundtruth as gt
from pipeline.world import SyntheticWorld, WorldConfig, object_coverage
from stages import encode, extract, groundtruth, report, stats
from stages import train as train_stage
from tests.helpers import TINY, assert_one_line_error
from tests.stages.test_stats import build_stores, run_stats

pytestmark = pytest.mark.usefixtures("one_thread")

N_VALUES = sum(len(v) for v in gt.ATTRIBUTE_VALUES.values())


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """48 synthetic images through a random tiny ViT (block 3), a briefly trained SAE, its codes and statistics."""
    root = tmp_path_factory.mktemp("groundtruth")
    ext = extract.Config(dataset="synthetic", out_dir=root / "store", limit=48, model=TINY, pretrained="none",
                         layers=(3,), batch_size=16, device="cpu", images_per_chunk=8, images_per_shard=16,
                         progress=False)
    extract.run(ext)
    sae = train_stage.run(train_stage.Config(cache_dir=ext.out_dir, layer=3, out_dir=root / "sae", expansion=2,
                                             total_tokens=48 * 17 * 3, batch_images=8, warmup_steps=5, lr=1e-3,
                                             dead_window_tokens=2000, log_every=20, checkpoint_every=1000,
                                             device="cpu", progress=False))
    enc = encode.run(encode.Config(cache_dir=ext.out_dir, sae_dir=sae.sae_dir, out_dir=root / "codes", device="cpu",
                                   progress=False))
    st = stats.run(stats.Config(codes_dir=enc.codes_dir, cache_dir=ext.out_dir, out_dir=root / "stats",
                                scheduler="synchronous", plots=False))
    return {"root": root, "store": ext.out_dir, "codes": enc.codes_dir, "stats": st.stats_dir}


def test_cli_on_a_real_chain_writes_valid_outputs_and_the_report_shows_them(chain, tmp_path):
    out = tmp_path / "gt"
    code, output = _cli("groundtruth", "--stats", chain["stats"], "--out", out, "--world", "seed=0,image_size=32")
    assert code == 0, output
    assert "attribute values have a dedicated latent" in output
    record = json.loads((out / gt.GROUNDTRUTH_FILE).read_text())
    assert record["n_images"] == 48 and record["n_latents"] == 128 and record["n_values"] == N_VALUES
    assert 0 <= record["n_values_covered"] <= N_VALUES and 0 < record["n_alive"] <= 128
    assert len(record["best_auroc"]) == N_VALUES and all(0 <= x <= 1 for x in record["best_auroc"].values())
    assert record["provenance"]["world"] == WorldConfig(seed=0, image_size=32).to_dict()
    assert set(record["definitions"]) == set(gt.DEFINITIONS)
    latents = pd.read_csv(out / gt.LATENTS_FILE)
    assert latents["latent"].tolist() == list(range(128))
    alive = latents[~latents["dead"]]
    assert alive["auroc"].between(0, 1).all() and alive["purity"].between(0, 1).all()
    background = alive["best_attribute"].isin(["texture", "background"])
    assert alive.loc[background, "iou"].isna().all()
    assert alive.loc[~background & (alive["n_localised"] > 0), "iou"].between(0, 1).all()
    values = pd.read_csv(out / gt.VALUES_FILE)
    assert len(values) == N_VALUES and values["n_images"].sum() == 48 * len(gt.ATTRIBUTE_VALUES)
    assert (out / gt.PLOT_FILE).stat().st_size > 10_000

    code, output = _cli("groundtruth", "--stats", chain["stats"], "--out", out, "--score", "mean", "--attributes",
                        "shape,colour", "--no-plots")  # an earlier ground-truth folder is replaced
    assert code == 0, output
    assert len(pd.read_csv(out / gt.VALUES_FILE)) == 9 and not (out / gt.PLOT_FILE).exists()

    rep = report.run(report.Config(stats_dir=chain["stats"], out_dir=tmp_path / "r", n_latents=3, n_low_entropy=0,
                                   image_px=32, groundtruth_dir=out))
    index = rep.index_path.read_text()
    assert "Ground truth (synthetic world)" in index and index.count("<th") > 12
    assert '<table id="values">' in index and "ground truth: auroc" in index


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """Hand-made codes over 60 images of a 64-px world on a 16 x 16 grid: latent 0 is the object mask on
    circle images, latent 1 random, latent 2 dead."""
    tmp = tmp_path_factory.mktemp("groundtruth-planted")
    n, size, grid = 60, 64, 16
    world = SyntheticWorld(WorldConfig(seed=0, image_size=size), n_images=n)
    scenes = [world.scene(i) for i in range(n)]
    masks = np.stack([object_coverage(sc, size) >= 0.5 for sc in scenes])
    object_NP = gt.patch_object_masks(masks, (grid, grid), 0.5)
    circle = np.array([sc["shape"] == "circle" for sc in scenes])
    assert circle.sum() >= 10 and object_NP[circle].any(1).all()
    rng = np.random.default_rng(0)
    f = np.zeros((n, 1 + grid * grid, 3), np.float32)
    f[:, 1:, 0] = 2.0 * (object_NP & circle[:, None])
    f[:, 1:, 1] = rng.random((n, grid * grid)) * (rng.random((n, grid * grid)) < 0.05)
    acts, codes = build_stores(
        tmp, f, np.arange(n) % 20, np.ones(n, bool), class_names=world.class_names, images_per_shard=16,
        image_ids=[world.image_id(i) for i in range(n)],
        dataset={"name": "synthetic", "split": "train", "root": None, "limit": n, "seed": 0},
        preprocess={"size": [size, size], "resize_mode": "shortest", "interpolation": "bicubic"})
    run_stats(acts, codes, tmp / "stats")
    return {"root": tmp, "store": acts, "codes": codes, "stats": tmp / "stats"}


def test_planted_mask_latent_through_the_stage(planted, tmp_path):
    """Acceptance 3 end to end: codes on disk, world regenerated from the store's attributes."""
    out = groundtruth.run(groundtruth.Config(stats_dir=planted["stats"], out_dir=tmp_path / "gt"))
    latents = pd.read_csv(out.latents_path).set_index("latent")
    row = latents.loc[0]
    assert (row["best_attribute"], row["best_value"]) == ("shape", "circle")
    assert row["auroc"] == 1.0 and row["purity"] == 1.0 and row["iou"] == 1.0 and row["pointing"] == 1.0
    assert latents.loc[2, "dead"] and pd.isna(latents.loc[2, "best_value"])
    assert 0.25 < latents.loc[1, "auroc"] < 0.95  # 60 images: chance level, loosely
    values = pd.read_csv(out.values_path).set_index(["attribute", "value"])
    assert values["dedicated"].sum() == 1 and values.loc[("shape", "circle"), "best_latent"] == 0
    record = json.loads(out.groundtruth_path.read_text())
    assert record["n_values_covered"] == 1 and record["mean_iou_dedicated"] == 1.0
    assert record["mean_pointing_dedicated"] == 1.0
    assert record["one_token_ceiling"]["shape=circle"] == values.loc[("shape", "circle"), "ceiling"] == 1.0
    assert 0.5 < record["one_token_ceiling"]["position=top-left"] == values.loc[("position", "top-left"), "ceiling"] < 1

    rep = report.run(report.Config(stats_dir=planted["stats"], out_dir=tmp_path / "r", n_latents=1, n_low_entropy=0,
                                   image_px=32, groundtruth_dir=out.out_dir))
    index = rep.index_path.read_text()
    assert "dedicated to shape=circle" in index and 'href="latents/latent_000000.html">0</a>' in index
    page = (tmp_path / "r" / "latents" / "latent_000000.html").read_text()
    assert "best value shape=circle: AUROC 1.000, purity 1.000" in page and "IoU 1.000, pointing 1.000" in page
    assert "one-token ceiling" in index


def test_a_folder_of_the_previous_format_is_refused_in_one_line(planted, tmp_path):
    """Format 1 had no ceiling column: the report must ask for a rerun rather than fail on the missing column."""
    out = groundtruth.run(groundtruth.Config(stats_dir=planted["stats"], out_dir=tmp_path / "gt", plots=False))
    record = json.loads(out.groundtruth_path.read_text())
    out.groundtruth_path.write_text(json.dumps({**record, "groundtruth_format_version": 1}))
    code, output = _cli("report", "--stats", planted["stats"], "--groundtruth", out.out_dir, "--out", tmp_path / "r")
    assert_one_line_error(code, output, "ground-truth format 1, this pipeline reads 2", "rerun `pipeline groundtruth`")


def test_refusals_are_one_line(chain, planted, tmp_path):
    base = ("groundtruth", "--stats", chain["stats"], "--out", tmp_path / "gt")
    assert_one_line_error(*_cli(*base, "--attributes", "shape,hue"), "unknown attribute 'hue'", "choose from")
    assert_one_line_error(*_cli(*base, "--world", "seed=1"), "--world seed=1 differs", "(seed=0)")
    assert_one_line_error(*_cli(*base, "--world", "image_size=64"), "image_size=64 differs", "(image_size=32)")
    assert_one_line_error(*_cli(*base, "--world", "task=shape"), "task=shape differs")
    world_file = tmp_path / "world.json"
    world_file.write_text(json.dumps({"seed": 0, "held_out": [["shape", "ring"]]}))
    assert_one_line_error(*_cli(*base, "--world", world_file), "held_out=")
    assert_one_line_error(*_cli(*base, "--world", "colour=red"), "unknown world config key 'colour'")
    assert_one_line_error(*_cli(*base, "--codes", planted["codes"]), "not the code store the statistics")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    assert_one_line_error(*_cli("groundtruth", "--stats", chain["stats"], "--out", tmp_path / "busy"), "other files")

    f = np.zeros((8, 5, 2), np.float32)
    f[:, 1, 0] = 1.0
    acts, codes = build_stores(tmp_path / "imported", f, np.arange(8) % 2, np.ones(8, bool), class_names=["a", "b"],
                               images_per_shard=4)
    run_stats(acts, codes, tmp_path / "imported" / "stats")
    assert_one_line_error(*_cli("groundtruth", "--stats", tmp_path / "imported" / "stats", "--out", tmp_path / "g2"),
                          "'imported' images, not the synthetic world")

    good = groundtruth.run(groundtruth.Config(stats_dir=planted["stats"], out_dir=tmp_path / "planted-gt"))
    assert_one_line_error(*_cli("report", "--stats", chain["stats"], "--out", tmp_path / "r", "--groundtruth",
                                good.out_dir), "computed from other codes")


def test_run_stage_reads_its_params_section(chain, tmp_path, monkeypatch):
    """`pipeline run-stage groundtruth` (what dvc.yaml calls): params section, work/ layout, DVC metrics copy."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "work" / "synthetic" / "layer3"
    run.mkdir(parents=True)
    (tmp_path / "work" / "synthetic" / "acts").symlink_to(chain["store"])
    for name in ("codes", "stats"):
        (run / name).symlink_to(chain[name])
    params = tmp_path / "params.yaml"
    study = "data:\n  datasets: [synthetic]\nextract:\n  layers: [3]\n"
    params.write_text(study + "groundtruth:\n  attributes: [shape, size]\n  auroc_threshold: 0.9\n"
                      "report:\n  n_latents: 2\n  n_low_entropy: 0\n")
    where = ("--dataset", "synthetic", "--layer", "3", "--params", params)
    code, output = _cli("run-stage", "groundtruth", *where)
    assert code == 0, output
    metrics = json.loads((tmp_path / "work" / "metrics" / "synthetic" / "layer3" / "groundtruth.json").read_text())
    assert len(metrics["best_auroc"]) == 7 and (run / "groundtruth" / gt.LATENTS_FILE).is_file()
    assert "definitions" not in metrics and "config" not in metrics.get("provenance", {})  # numbers only
    record = json.loads((run / "groundtruth" / gt.GROUNDTRUTH_FILE).read_text())
    assert record["config"]["attributes"] == ["shape", "size"] and record["config"]["auroc_threshold"] == 0.9
    code, output = _cli("run-stage", "report", *where)
    assert code == 0, output
    assert "Ground truth (synthetic world)" in (run / "report" / "index.html").read_text()
    params.write_text(study + "groundtruth:\n  map_treshold: 0.3\n")
    assert_one_line_error(*_cli("run-stage", "groundtruth", *where),
                          "unknown key 'map_treshold' in section 'groundtruth'")
