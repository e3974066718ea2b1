"""The grid stage on a small grid over a real extracted store of the synthetic world: every column of its
table against a direct computation from the SAEs and the activations, the verdicts against the block
probe, reuse of finished settings, the table without ground truth on another dataset, and refusals."""

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
from pipeline import grid as gd
from pipeline import groundtruth as gt
from pipeline.sae.io import load_sae
from pipeline.world import SyntheticWorld, WorldConfig, object_coverage
from app import grid
from stages import blockprobe, extract
from tests.helpers import TINY, assert_one_line_error, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 60
GRID = ("--archs", "relu,topk", "--expansions", "2", "--l1s", "0.001", "--ks", "4", "--total-tokens", "12000",
        "--batch-images", "10", "--warmup-steps", "5", "--mask-k", "3", "--mask-seeds", "2", "--device", "cpu",
        "--no-progress")


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """60 synthetic images through a random tiny ViT, block 3."""
    out = tmp_path_factory.mktemp("grid") / "store"
    extract.run(extract.Config(dataset="synthetic", out_dir=out, limit=N_IMAGES, model=TINY, pretrained="none",
                               layers=(3,), batch_size=20, device="cpu", images_per_chunk=8, images_per_shard=24,
                               progress=False))
    return out


@pytest.fixture(scope="module")
def ran(store, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("grid-out") / "grid"
    code, output = _cli("grid", "--cache", store, "--out", out, *GRID)
    assert code == 0, output
    return out, output


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean())


def _shows(attribute: str, value: str, truth: dict[str, str], object_P: np.ndarray, grid: int = 4) -> bool:
    """Does some patch of the image show the value (the one-token ceiling's detector), patch by patch."""
    for p, on_object in enumerate(object_P):
        row, col = divmod(p, grid)
        if attribute == "position":
            quadrant = ("top" if row < grid / 2 else "bottom") + "-" + ("left" if col < grid / 2 else "right")
            if on_object and quadrant == value:
                return True
        elif truth[attribute] == value and on_object == (attribute in gt.OBJECT_ATTRIBUTES):
            return True
    return False


def test_every_column_equals_a_direct_computation(store, ran):
    out, output = ran
    frame = pd.read_parquet(out / grid.TABLE_FILE)
    values = pd.read_parquet(out / grid.VALUES_FILE)
    assert list(frame["setting"]) == ["relu-x2-l10.001", "topk-x2-k4"]
    assert "2 settings" in output and "relu-x2-l10.001" in output

    acts = ActivationStore(store, mode="r")
    x_NTD = torch.from_numpy(acts.read(3, 0, N_IMAGES).astype(np.float32))
    x_BD = x_NTD.reshape(-1, x_NTD.shape[-1])
    world = SyntheticWorld(WorldConfig(seed=0, image_size=32), n_images=N_IMAGES)
    scenes = [world.scene(i) for i in range(N_IMAGES)]
    truth = [gt.scene_values(s) for s in scenes]
    object_NP = np.stack([gt.patch_object_masks((object_coverage(s, 32) >= 0.5)[None], (4, 4), 0.5)[0]
                          for s in scenes])
    probe = pd.read_parquet(out / grid.PROBE_DIR / blockprobe.TABLE_FILE)
    for row in frame.itertuples():
        folder = out / grid.SETTINGS_DIR / row.setting
        sae = load_sae(folder / "sae")
        with torch.no_grad():
            x_hat_BD, codes = sae(x_BD)
            f_BS = codes.dense()
        assert row.d_sae == 2 * x_BD.shape[1] == sae.config.d_sae
        fvu = ((x_BD - x_hat_BD).double().pow(2).sum() / (x_BD.double() - x_BD.double().mean(0)).pow(2).sum()).item()
        assert row.fvu == pytest.approx(fvu, rel=1e-4)
        assert row.l0 == pytest.approx((f_BS > 0).sum(1).double().mean().item(), rel=1e-6)
        assert row.dead_fraction == pytest.approx(((f_BS > 0).sum(0) == 0).double().mean().item())
        if row.arch == "topk":
            assert row.l0 <= 4 and row.k == 4 and np.isnan(row.l1)
        assert row.sane == (row.l0 < 50 and row.fvu <= 0.15)

        masking = json.loads((folder / "masking" / "masking.json").read_text())["accuracy"]
        assert row.drop_top == pytest.approx(masking["sae_all_on"] - masking["off"]["3"])
        assert row.drop_random == pytest.approx(masking["sae_all_on"] - masking["random_off"]["3"]["mean"])

        # ground truth from the dense codes: image score = max over patches; AUROC by pairwise comparison
        f_NTS = f_BS.reshape(N_IMAGES, -1, sae.config.d_sae).numpy()
        s_NS = f_NTS[:, 1:].max(1)
        mine = values[values["setting"] == row.setting]
        covered, ious, points, purities, shapes = 0, [], [], [], 0
        for r in mine.itertuples():
            has = np.array([t[r.attribute] == r.value for t in truth])
            aurocs = np.array([_auroc(s_NS[has, j], s_NS[~has, j]) for j in range(sae.config.d_sae)])
            best = int(aurocs.argmax())
            assert r.auroc == pytest.approx(aurocs[best])
            assert r.covered == (aurocs[best] >= 0.95)
            seen = np.array([_shows(r.attribute, r.value, t, object_NP[i]) for i, t in enumerate(truth)])
            assert r.ceiling == pytest.approx(_auroc(seen[has].astype(float), seen[~has].astype(float)))
            readable = bool(probe.set_index(["attribute", "value"]).loc[(r.attribute, r.value), "readable"])
            assert r.verdict == ("covered" if r.covered else "SAE's miss" if readable else "model's miss")
            if not r.covered:
                continue
            covered += 1
            shapes += r.attribute == "shape"
            purities.append(s_NS[has, best].sum() / s_NS[:, best].sum())
            if r.attribute in gt.OBJECT_ATTRIBUTES:
                iou, point = [], []
                for i in range(N_IMAGES):
                    m = f_NTS[i, 1:, best]
                    if m.max() <= 0 or not object_NP[i].any():
                        continue
                    on = (m > 0) & (m >= 0.5 * m.max())
                    iou.append((on & object_NP[i]).sum() / (on | object_NP[i]).sum())
                    point.append(float(object_NP[i][int(m.argmax())]))
                ious.append(np.mean(iou))
                points.append(np.mean(point))
        assert row.n_values == len(mine) and row.n_covered == covered
        assert row.coverage == pytest.approx(covered / len(mine))
        assert row.shapes_covered == shapes and row.n_shapes == (mine["attribute"] == "shape").sum()
        for column, expected in (("mean_iou", ious), ("mean_pointing", points), ("mean_purity", purities)):
            got = getattr(row, column)
            assert (np.isnan(got) and not expected) or got == pytest.approx(np.mean(expected), rel=1e-5), column
        assert row.sae_misses == (mine["verdict"] == "SAE's miss").sum()
        assert row.model_misses == (mine["verdict"] == "model's miss").sum()

    fvu, l0 = frame["fvu"].to_numpy(), frame["l0"].to_numpy()
    for i in range(len(frame)):
        dominated = any(fvu[j] <= fvu[i] and l0[j] <= l0[i] and (fvu[j] < fvu[i] or l0[j] < l0[i])
                        for j in range(len(frame)) if j != i)
        assert frame["pareto"].iloc[i] == (not dominated)


def test_writes_the_table_plot_and_page_and_reuses_finished_settings(store, ran, tmp_path):
    out, _ = ran
    for name in (grid.RECORD_FILE, grid.MARKDOWN_FILE, grid.PLOT_FILE, grid.PAGE_FILE):
        assert (out / name).is_file(), name
    record = json.loads((out / grid.RECORD_FILE).read_text())
    assert record["ground_truth"] and record["layer"] == 3 and len(record["rows"]) == 2
    assert "fvu, l0" in record["definitions"]
    text = (out / grid.MARKDOWN_FILE).read_text()
    assert "| setting | d_sae | FVU | L0 | dead | covered |" in text and "| shape=circle |" in text
    page = (out / grid.PAGE_FILE).read_text()
    assert "topk-x2-k4" in page and "grid.png" in page and "Pareto" in page

    before = pd.read_parquet(out / grid.TABLE_FILE)
    code, output = _cli("grid", "--cache", store, "--out", out, *GRID)
    assert code == 0, output
    assert "2 reused" in output
    pd.testing.assert_frame_equal(pd.read_parquet(out / grid.TABLE_FILE), before)


def test_without_ground_truth_the_table_has_no_ground_truth_columns(tmp_path):
    folder = make_image_folder(tmp_path / "images", n_classes=3, per_class=8)
    store = tmp_path / "store"
    extract.run(extract.Config(dataset="imagefolder", root=str(folder), out_dir=store, model=TINY, pretrained="none",
                               layers=(3,), batch_size=8, device="cpu", images_per_chunk=4, images_per_shard=8,
                               progress=False))
    code, output = _cli("grid", "--cache", store, "--out", tmp_path / "grid", "--archs", "topk", "--ks", "4",
                        *GRID[2:4], *GRID[8:])
    assert code == 0, output
    assert "no ground truth" in output
    frame = pd.read_parquet(tmp_path / "grid" / grid.TABLE_FILE)
    assert not set(gd.GT_COLUMNS) & set(frame.columns)
    assert {"fvu", "l0", "dead_fraction", "drop_top", "drop_random", "pareto"} <= set(frame.columns)
    assert not (tmp_path / "grid" / grid.VALUES_FILE).exists()


@pytest.mark.parametrize("args, needles", [
    (("--archs", "gelu"), ("unknown architecture", "relu, topk, batchtopk")),
    (("--ks", "4,4", "--archs", "topk"), ("repeats a setting", "topk-x8-k4")),
    (("--mask-k", "0"), ("--mask-k",)),
    (("--layer", "2"), ("2",)),
])
def test_refusals_are_one_line_and_write_nothing(store, tmp_path, args, needles):
    code, output = _cli("grid", "--cache", store, "--out", tmp_path / "grid", "--no-progress", *args)
    assert_one_line_error(code, output, *needles)
    assert not (tmp_path / "grid").exists()


def test_settings_and_pareto_and_verdicts():
    names = [s.name for s in gd.settings(["relu", "batchtopk"], [4, 8], [1e-3], [16, 32])]
    assert names == ["relu-x4-l10.001", "relu-x8-l10.001", "batchtopk-x4-k16", "batchtopk-x4-k32",
                     "batchtopk-x8-k16", "batchtopk-x8-k32"]
    assert list(gd.pareto(np.array([0.1, 0.2, 0.1, 0.3]), np.array([10, 5, 20, 5]))) == [True, True, False, False]
    assert list(gd.verdicts(np.array([True, False, False]), np.array([False, True, False]))) == [
        "covered", "SAE's miss", "model's miss"]


def _cut_short(text: str) -> str:
    return text[:40]


def _previous_format(text: str) -> str:
    """A row.json as the grid wrote it before value rows carried the ceiling."""
    row = json.loads(text)
    row["identity"]["row_version"] = 1
    for value in row["values"]:
        del value["ceiling"]
    return json.dumps(row)


@pytest.mark.parametrize("damage", [_cut_short, _previous_format])
def test_a_damaged_or_older_row_is_computed_again_not_trusted(store, tmp_path, damage):
    args = ("grid", "--cache", store, "--out", tmp_path / "grid", "--archs", "topk", "--ks", "4", *GRID[2:4],
            *GRID[8:])
    code, output = _cli(*args)
    assert code == 0, output
    before = pd.read_parquet(tmp_path / "grid" / grid.TABLE_FILE)
    row = tmp_path / "grid" / grid.SETTINGS_DIR / "topk-x2-k4" / grid.ROW_FILE
    row.write_text(damage(row.read_text()))
    code, output = _cli(*args)
    assert code == 0, output
    assert "reused" not in output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "grid" / grid.TABLE_FILE).drop(columns="train_seconds"),
                                  before.drop(columns="train_seconds"))
    assert pd.read_parquet(tmp_path / "grid" / grid.VALUES_FILE)["ceiling"].notna().all()


def test_an_evaluation_store_of_another_width_is_refused(store, tmp_path):
    other = tmp_path / "convnext"
    extract.run(extract.Config(dataset="synthetic", out_dir=other, limit=8, model="tiny-convnext-clip",
                               pretrained="none", layers=(3,), batch_size=8, device="cpu", progress=False))
    code, output = _cli("grid", "--cache", store, "--eval-cache", other, "--out", tmp_path / "grid", "--layer", 3)
    assert_one_line_error(code, output, "512 wide", "64", "same model")
    assert not (tmp_path / "grid").exists()
