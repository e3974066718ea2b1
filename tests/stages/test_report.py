"""The report stage: static pages, re-opened images, a real headless browser, refusals."""

from __future__ import annotations

import re
import shutil
import tempfile
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from app.cli import main
from cache.errors import UserError
from pipeline.groundtruth import GroundTruthResults
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
    """``(n, 17, s)`` codes on a 4 x 4 grid: latent 0 dead, latent 1 on class 3's object patches only,
    the last latent on the circles (classes 0-3) only: the dedicated latent of shape=circle."""
    rng = np.random.default_rng(seed)
    f = rng.random((n, 17, s)).astype(np.float32) * (rng.random((n, 17, s)) < 0.2)
    f[:, :, 0] = 0
    f[:, :, 1] = 0
    f[np.arange(n) % 20 == 3, 6, 1] = 2.0  # patch (1, 1)
    f[:, :, s - 1] = 0
    f[np.arange(n) % 20 < 4, 6, s - 1] = 3.0
    return f


@pytest.fixture(scope="module")
def synthetic_stats(tmp_path_factory):
    """Statistics of a hand-made code store over the synthetic world (images re-rendered by id)."""
    tmp = tmp_path_factory.mktemp("report-synthetic")
    n, size = 100, 32
    world = SyntheticWorld(WorldConfig(seed=0, image_size=size), n_images=n)
    acts, codes = build_stores(
        tmp, _synthetic_codes(n, 17), np.arange(n) % 20, np.ones(n, bool), class_names=world.class_names,
        images_per_shard=16, image_ids=[world.image_id(i) for i in range(n)],
        dataset={"name": "synthetic", "split": "train", "root": None, "limit": n, "seed": 0},
        preprocess={"size": [size, size], "resize_mode": "shortest", "interpolation": "bicubic"})
    run_stats(acts, codes, tmp / "stats", plots=True)
    return tmp / "stats"


@pytest.fixture(scope="module")
def synthetic_groundtruth(synthetic_stats, tmp_path_factory):
    """Ground truth of those codes: latent 1 fires on yellow circles (class 3) only, latent 16 on circles."""
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
    assert report.choose_latents(table, 100, 100)[0].__len__() == 16  # every alive latent, never the dead one


def test_report_pages_show_re_rendered_images(synthetic_stats, tmp_path):
    out = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "r", n_latents=4, n_low_entropy=1,
                                   image_px=64))
    assert out.image_problem is None and out.n_without_image == 0
    assert len(out.latent_pages) == 5 and out.n_pictures == 4 * 10 + 5  # latent 1 has 5 references
    index = out.index_path.read_text()
    assert index.count('<tr data-latent="') == 5 + 1 and index.count('data-dead="1"') == 1  # 5 pages, latent 0
    assert "<script>" in index and "http" not in index  # nothing from a network
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
    row = re.search(r'<tr data-latent="1" [^>]*><td class="num" data-v="1">.*?</tr>', index).group(0)
    # circles: 5 of 20 fire, no other image: AUROC (5*80 + 15*80/2) / (20*80); all its mass is on circles
    assert 'data-v="shape=circle"' in row and 'data-v="0.625"' in row and 'data-v="1.0"' in row
    assert re.search(r'<tr data-latent="16" data-dead="0" data-covered="1" [^>]*>.*dedicated to shape=circle</td>',
                     index)  # not among the 3 picked: shown as the dedicated latent of circles
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


class _Tags(HTMLParser):
    """Every element a page opens is closed, in order; keeps each start tag with its (unescaped) attributes."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})

    def __init__(self, text: str):
        super().__init__()
        self.doctype, self.tags, self.open, self.errors = None, [], [], []
        self.feed(text)
        self.close()

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> does not close the last open element")


def _well_formed(page) -> _Tags:
    text = page.read_text(encoding="utf-8")
    tags = _Tags(text)
    assert tags.doctype == "doctype html" and not tags.errors and not tags.open, (page, tags.errors, tags.open)
    assert not re.search(r"\{[{%#]|[}%#]\}", text), f"template syntax left in {page}"
    return tags


def test_pages_are_rendered_from_templates_and_escape_names(synthetic_stats, synthetic_groundtruth, tmp_path):
    source = open(report.__file__, encoding="utf-8").read()
    assert not re.search(r"<(html|body|table|tr|td|th|p|div|h\d|figure|script)\b", source)  # no HTML in strings
    f = np.zeros((12, 5, 3), np.float32)
    f[::2, 2, 1] = 1.0  # latent 1 on class 0, latent 2 on class 1, latent 0 dead
    f[1::2, 3, 2] = 1.0
    names = ["<i>cat</i>", 'dog & "co"']
    acts, codes = build_stores(tmp_path, f, np.arange(12) % 2, np.ones(12, bool), class_names=names,
                               images_per_shard=4)
    run_stats(acts, codes, tmp_path / "stats")
    out = report.run(report.Config(stats_dir=tmp_path / "stats", out_dir=tmp_path / "r"))
    assert len(out.latent_pages) == 2
    for page in (out.index_path, *out.latent_pages):
        assert "<i>" not in page.read_text() and '"co"' not in page.read_text()
        _well_formed(page)
    index = _well_formed(out.index_path)
    rows = [a for tag, a in index.tags if tag == "tr" and "data-latent" in a]
    assert [(a["data-latent"], a["data-dead"], a["data-class"]) for a in rows] == \
        [("1", "0", names[0]), ("2", "0", names[1]), ("0", "1", "")]  # the names, once unescaped
    assert [a["value"] for tag, a in index.tags if tag == "option"] == ["", *sorted(names)]
    assert 'dog &amp; &#34;co&#34;' in out.index_path.read_text()
    assert not any(a.get("id") == "covered-only" for _, a in index.tags)  # no ground truth: no covered filter
    cat, dog = (page.read_text() for page in out.latent_pages)
    # top class, reference classes, the class of most tokens above threshold, 6 captions
    assert cat.count("&lt;i&gt;cat&lt;/i&gt;") == dog.count("dog &amp; &#34;co&#34;") == 1 + 1 + 1 + 6

    truth = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "gt", n_latents=2,
                                     n_low_entropy=1, image_px=16, groundtruth_dir=synthetic_groundtruth))
    for page in (truth.index_path, *truth.latent_pages):
        _well_formed(page)
    with pytest.raises(UserError, match="--dead must be >= 0"):
        report.Config(stats_dir=tmp_path / "stats", out_dir=tmp_path / "r", n_dead=-1)


def _expected_rows(stats_dir, groundtruth_dir, n_latents: int, n_low_entropy: int) -> dict[int, dict]:
    """The latent table's rows as read from the data: the shown latents, the dedicated ones, every dead one
    (fewer than the default --dead), each with its top class and searchable names."""
    table = LatentStats(stats_dir).table.set_index("latent", drop=False)
    truth = GroundTruthResults(groundtruth_dir)
    best = truth.latents.set_index("latent")
    dedicated: dict[int, list[str]] = {}
    for r in truth.values[truth.values["dedicated"]].itertuples():
        dedicated.setdefault(int(r.best_latent), []).append(f"{r.attribute}={r.value}")
    frequent, low = report.choose_latents(table.reset_index(drop=True), n_latents, n_low_entropy)
    dead = sorted(int(j) for j in table["latent"][table["dead"].astype(bool)])
    rows = {}
    for j in dict.fromkeys([*frequent, *low, *dedicated, *dead]):
        top = "" if pd.isna(table.loc[j, "top_class_name"]) else str(table.loc[j, "top_class_name"])
        value = best.loc[j, "best_value"]
        names = [top, "" if pd.isna(value) else f"{best.loc[j, 'best_attribute']}={value}", *dedicated.get(j, ())]
        rows[j] = {"dead": j in dead, "covered": j in dedicated, "top": top, "names": [n.lower() for n in names if n]}
    return rows


def _visible(rows: dict[int, dict], query: str = "", dead: bool = False, covered: bool = False,
             top: str = "") -> list[int]:
    """What the index should show: every word of the query is a latent id or part of a name."""
    return sorted(j for j, r in rows.items()
                  if (dead or not r["dead"]) and (r["covered"] or not covered) and (not top or r["top"] == top)
                  and all(w == str(j) or any(w in n for n in r["names"]) for w in query.lower().split()))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs chromium and its driver: apt-get install chromium chromium-driver")
def test_report_in_headless_chromium(synthetic_stats, synthetic_groundtruth, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    out = report.run(report.Config(stats_dir=synthetic_stats, out_dir=tmp_path / "r", n_latents=8, n_low_entropy=2,
                                   groundtruth_dir=synthetic_groundtruth))
    expected = _expected_rows(synthetic_stats, synthetic_groundtruth, 8, 2)
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
        assert len(rows) == len(expected) == 11 and len(out.latent_pages) == 10  # 8 + 2 + latent 0 (dead)

        def shown() -> list[int]:
            ids = sorted(int(r.get_attribute("data-latent")) for r in rows if r.is_displayed())
            assert driver.find_element(By.ID, "n-visible").text == str(len(ids))
            return ids

        assert shown() == _visible(expected) == sorted(int(p.stem.split("_")[1]) for p in out.latent_pages)

        def column(col: int) -> list[str]:
            return driver.execute_script(
                "return Array.from(document.querySelectorAll('#latents tbody tr')).filter(r => !r.hidden)"
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

        # search: latent ids, class names, attribute values; every word must match
        search = driver.find_element(By.ID, "search")

        def type_in(text: str) -> list[int]:
            search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
            search.send_keys(text)
            return shown()

        yellow_circle = expected[1]["top"]  # latent 1 fires on class 3 only
        first = sorted(expected)[1]
        for query, want in ((str(first), [first]), (yellow_circle, None), (yellow_circle.upper(), None),
                            ("circle", None), ("shape=circle", None), ("circle 16", [16]), ("0", []),
                            ("no-such-class", [])):
            assert type_in(query) == _visible(expected, query), query
            if want is not None:
                assert _visible(expected, query) == want, query
        assert 1 in _visible(expected, yellow_circle) and {1, 16} <= set(_visible(expected, "shape=circle"))
        dead = driver.find_element(By.ID, "show-dead")
        dead.click()  # the dead latent 0 is found once dead latents are shown
        assert type_in("0") == _visible(expected, "0", dead=True) == [0]
        assert type_in("") == _visible(expected, dead=True) == sorted(expected)
        dead.click()
        assert shown() == _visible(expected) and len(shown()) == 10

        # filters: ground-truth covered, top class, and both with a search
        covered = driver.find_element(By.ID, "covered-only")
        covered.click()
        assert shown() == _visible(expected, covered=True) == [16]
        covered.click()
        top = Select(driver.find_element(By.ID, "top-class"))
        options_ = [o.get_attribute("value") for o in top.options]
        assert options_ == ["", *sorted({r["top"] for r in expected.values()} - {""})]
        counts = {name: len(_visible(expected, top=name)) for name in options_[1:]}
        common = max(counts, key=lambda name: (counts[name], name))
        top.select_by_value(common)
        assert shown() == _visible(expected, top=common) and counts[common] >= 1
        top.select_by_value(expected[16]["top"])
        covered.click()
        assert shown() == _visible(expected, covered=True, top=expected[16]["top"]) == [16]
        top.select_by_value(yellow_circle if yellow_circle != expected[16]["top"] else common)
        assert shown() == []
        top.select_by_value("")
        assert type_in("16") == [16] and type_in("1") == _visible(expected, "1", covered=True) == []
        covered.click()
        assert type_in("") == _visible(expected)
        for name in options_[1:]:
            top.select_by_value(name)
            assert shown() == _visible(expected, top=name)
        top.select_by_value("")
        assert shown() == _visible(expected)

        link = driver.find_element(By.CSS_SELECTOR, "#latents tbody tr:not([hidden]) td a")
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
