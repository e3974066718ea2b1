"""The report stage: static pages, re-opened images, a real headless browser, refusals."""

from __future__ import annotations

import re
import shutil
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from app.cli import main
from pipeline.heatmaps import ImageSource, ImageUnavailable, model_view, render_heatmap
from pipeline.latents import LatentStats
from pipeline.world import SyntheticWorld, WorldConfig
from stages import groundtruth, report
from tests.helpers import make_image_folder
from tests.stages.test_stats import build_stores, run_stats

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1400")


def _synthetic_codes(n: int, s: int, seed: int = 0) -> np.ndarray:
    """``(n, 17, s)`` codes on a 4 x 4 grid: latent 0 dead, latent 1 on class 3's object patches only."""
    rng = np.random.default_rng(seed)
    f = rng.random((n, 17, s)).astype(np.float32) * (rng.random((n, 17, s)) < 0.2)
    f[:, :, 0] = 0
    f[:, :, 1] = 0
    f[np.arange(n) % 20 == 3, 6, 1] = 2.0  # patch (1, 1)
    return f


@pytest.fixture(scope="module")
def synthetic_stats(tmp_path_factory):
    """Statistics of a hand-made code store over the synthetic world (images re-rendered by id)."""
    tmp = tmp_path_factory.mktemp("report-synthetic")
    n, size = 100, 32
    world = SyntheticWorld(WorldConfig(seed=0, image_size=size), n_images=n)
    acts, codes = build_stores(
        tmp, _synthetic_codes(n, 16), np.arange(n) % 20, np.ones(n, bool), class_names=world.class_names,
        images_per_shard=16, image_ids=[world.image_id(i) for i in range(n)],
        dataset={"name": "synthetic", "split": "train", "root": None, "limit": n, "seed": 0},
        preprocess={"size": [size, size], "resize_mode": "shortest", "interpolation": "bicubic"})
    run_stats(acts, codes, tmp / "stats", plots=True)
    return tmp / "stats"


@pytest.fixture(scope="module")
def synthetic_groundtruth(synthetic_stats, tmp_path_factory):
    """Ground truth of those codes: latent 1 fires on yellow circles (class 3) only."""
    out = tmp_path_factory.mktemp("report-groundtruth") / "gt"
    return groundtruth.run(groundtruth.Config(stats_dir=synthetic_stats, out_dir=out)).out_dir


def test_choose_latents(synthetic_stats):
    table = LatentStats(synthetic_stats).table
    frequent, low = report.choose_latents(table, 3, 2)
    alive = table[~table["dead"].astype(bool)]
    assert frequent == alive.sort_values(["frequency", "latent"], ascending=[False, True])["latent"].head(3).tolist()
    assert 0 not in frequent + low and not set(frequent) & set(low) and len(low) == 2
    assert low[0] == 1  # fires on one class only: entropy 0
    assert 1 not in report.choose_latents(table, 3, 2, min_references=6)[1]  # it has 5 references
    assert report.choose_latents(table, 100, 100)[0].__len__() == 15  # every alive latent, never the dead one


def test_report_pages_show_re_rendered_images(synthetic_stats, tmp_path):
    out = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "r", n_latents=4, n_low_entropy=1,
                                   image_px=64))
    assert out.image_problem is None and out.n_without_image == 0
    assert len(out.latent_pages) == 5 and out.n_pictures == 4 * 10 + 5  # latent 1 has 5 references
    index = out.index_path.read_text()
    assert index.count("<tr><td") == 5 and "<script>" in index and "http" not in index  # nothing from a network
    for name in ("frequency_vs_activation.png", "histograms.png", "class_top_latents.png"):
        assert (tmp_path / "r" / "plots" / name).is_file()
    page = (tmp_path / "r" / "latents" / "latent_000001.html").read_text()
    assert "Images could not be opened" not in page and "sqrt(1 - sum_c p_c^2)" in page
    srcs = re.findall(r'<img src="(img/[^"]+)"', page)
    assert len(srcs) == 5  # latent 1 fires on the 5 images of class 3 (100 images, 20 classes)
    refs = LatentStats(synthetic_stats).references(1)
    first = Image.open(tmp_path / "r" / "latents" / srcs[0])
    assert first.size == (64, 64)
    # the picture is the re-rendered image where the map is 0 (patch (0, 0)) and heat where it fires
    world = SyntheticWorld(WorldConfig(seed=0, image_size=32), n_images=100)
    index_0 = int(refs["image_index"][0])
    expected = np.asarray(Image.fromarray(world.render(index_0)[0]).resize((64, 64), Image.BICUBIC), float)
    pixels = np.asarray(first, float)
    assert np.abs(pixels[:16, :16] - expected[:16, :16]).max() <= 1
    assert np.abs(pixels[16:32, 16:32] - expected[16:32, 16:32]).mean() > 20


def test_report_with_ground_truth_columns_and_value_table(synthetic_stats, synthetic_groundtruth, tmp_path):
    out = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "r", n_latents=2, n_low_entropy=1,
                                   image_px=32, groundtruth_dir=synthetic_groundtruth))
    index = out.index_path.read_text()
    heads = re.findall(r'<th data-type="\w+" class="\w+">([^<]+)</th>', index)
    assert heads[-6:] == ["best value", "AUROC", "purity", "IoU", "pointing", "shown for"]
    values = index.split('<table id="values">')[1].split("</table>")[0]
    assert values.count("<tr>") == 1 + 23  # header + every attribute value
    assert "plots/groundtruth.png" in index and (tmp_path / "r" / "plots" / "groundtruth.png").is_file()
    row = re.search(r'<tr><td class="num" data-v="1">.*?</tr>', index).group(0)
    # circles: 5 of 20 fire, no other image: AUROC (5*80 + 15*80/2) / (20*80); all its mass is on circles
    assert 'data-v="shape=circle"' in row and 'data-v="0.625"' in row and 'data-v="1.0"' in row
    page = (tmp_path / "r" / "latents" / "latent_000001.html").read_text()
    assert "best value shape=circle: AUROC 0.625, purity 1.000 (prevalence 0.200)" in page
    plain = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "plain", n_latents=2,
                                     n_low_entropy=1, image_px=32))
    assert "AUROC" not in plain.index_path.read_text()


def test_image_source_folder_with_root_override(tmp_path):
    root = make_image_folder(tmp_path / "photos", n_classes=2, per_class=2, size=40)
    pre = {"size": [32, 32], "resize_mode": "shortest"}
    moved = ImageSource({"dataset": {"name": "imagefolder", "root": "/nowhere"}, "preprocess": pre}, ["a", "b"])
    assert "does not exist here; pass --root" in moved.problem()
    source = ImageSource({"dataset": {"name": "imagefolder", "root": "/nowhere"}, "preprocess": pre}, ["a", "b"],
                         root=root)
    image = source.open("class_1/img_0.png")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    with pytest.raises(ImageUnavailable, match="does not exist"):
        source.open("class_1/missing.png")
    wide = Image.new("RGB", (80, 40), (10, 20, 30))
    assert model_view(wide, pre).shape == (32, 32, 3)
    assert model_view(wide, {"size": 32, "resize_mode": "longest"}).shape == (32, 32, 3)
    imported = ImageSource({"dataset": {"name": "imported"}}, [])
    assert "imported from an array" in imported.problem()


def test_heatmap_without_image():
    picture = render_heatmap(np.array([[0.0, 1.0], [2.0, 0.0]]), 2.0, size=40)
    pixels = np.asarray(picture)
    assert picture.size == (40, 40) and (pixels[:20, 20:] != pixels[:20, :20]).any()


def test_report_without_images_says_why(tmp_path):
    f = np.zeros((12, 5, 3), np.float32)
    f[:, 2, 1] = 1.0
    acts, codes = build_stores(tmp_path, f, np.arange(12) % 2, np.ones(12, bool), class_names=["a", "b"],
                               images_per_shard=4)
    run_stats(acts, codes, tmp_path / "stats")
    result = CliRunner().invoke(main, ["report", "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "images not shown: the activations were imported" in result.output
    page = (tmp_path / "r" / "latents" / "latent_000001.html").read_text()
    assert "Images could not be opened: the activations were imported" in page
    assert "heatmap only" in page and len(list((tmp_path / "r" / "latents" / "img").glob("*.png"))) == 10


def test_report_refusals(synthetic_stats, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    result = CliRunner().invoke(main, ["report", "--stats", str(synthetic_stats), "--out", str(tmp_path / "busy")])
    assert result.exit_code == 2 and "holds no report" in result.output
    result = CliRunner().invoke(main, ["report", "--stats", str(tmp_path / "busy"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a complete statistics folder" in result.output
    ok = CliRunner().invoke(main, ["report", "--stats", str(synthetic_stats), "--out", str(tmp_path / "r"),
                                   "--latents", "1", "--low-entropy", "0"])
    again = CliRunner().invoke(main, ["report", "--stats", str(synthetic_stats), "--out", str(tmp_path / "r"),
                                      "--latents", "2", "--low-entropy", "0"])  # a report folder is replaced
    assert ok.exit_code == 0 and again.exit_code == 0, again.output
    assert len(list((tmp_path / "r" / "latents").glob("*.html"))) == 2


# ---------------------------------------------------------------------------------------
# Acceptance 4: a real headless browser


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs chromium and its driver: apt-get install chromium chromium-driver")
def test_report_in_headless_chromium(synthetic_stats, synthetic_groundtruth, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "r", n_latents=8, n_low_entropy=2,
                                   groundtruth_dir=synthetic_groundtruth))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(out.index_path.resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
        assert len(rows) == len(out.latent_pages) == 10

        def column(col: int) -> list[str]:
            return driver.execute_script(
                "return Array.from(document.querySelectorAll('#latents tbody tr'))"
                ".map(r => r.cells[arguments[0]].getAttribute('data-v'));", col)

        heads = driver.find_elements(By.CSS_SELECTOR, "#latents thead th")
        names = [h.text.strip() for h in heads]
        freq_col, ent_col, class_col = names.index("frequency"), names.index("label entropy"), names.index("top class")
        before = column(0)
        heads[freq_col].click()
        freq = [float(v) for v in column(freq_col)]
        assert freq == sorted(freq) and heads[freq_col].get_attribute("aria-sort") == "ascending"
        ids = [int(v) for v in column(0)]
        assert ids != [int(v) for v in before]
        assert all(a < b for (fa, a), (fb, b) in zip(zip(freq, ids), zip(freq[1:], ids[1:])) if fa == fb)
        heads[freq_col].click()
        assert [float(v) for v in column(freq_col)] == sorted(freq, reverse=True)
        heads[ent_col].click()
        ent = [float(v) for v in column(ent_col)]
        assert ent == sorted(ent) and ent[0] == pytest.approx(0)
        heads[class_col].click()
        classes = column(class_col)
        assert classes == sorted(classes) and heads[freq_col].get_attribute("aria-sort") is None
        auroc_col = names.index("AUROC")
        heads[auroc_col].click()
        heads[auroc_col].click()
        auroc = [float(v) for v in column(auroc_col) if v != ""]
        assert auroc == sorted(auroc, reverse=True) and len(auroc) == 10
        assert len(driver.find_elements(By.CSS_SELECTOR, "#values tbody tr")) == 23

        link = driver.find_element(By.CSS_SELECTOR, "#latents tbody tr td a")
        target = link.text
        link.click()
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Latent {target}"
        images = driver.find_elements(By.CSS_SELECTOR, ".refs img")
        assert len(images) == 10
        for img in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth;", img) > 0
        shot = tmp_path / "latent_page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 800
    finally:
        driver.quit()
