"""The report stage: a static HTML site over a statistics folder, readable from disk with no server.

``index.html`` holds a sortable table of the shown latents (plain inline JavaScript, no
network) and the stats plots; each shown latent gets ``latents/latent_<id>.html`` with its
summary and its reference images, the patch heatmap drawn over each (PNG files in
``latents/img/``). Images are re-opened by their store id (``pipeline.heatmaps``); when
that is impossible the page shows the heatmaps alone and says why.

With a ground-truth folder (``pipeline groundtruth`` over the same codes) the index also
shows each latent's best attribute value, AUROC, purity, IoU and pointing, a per-value
table of dedicated latents and the ground-truth plot; every value's dedicated latent gets
a page too.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cache.errors import UserError
from cache.schema import LOCK_FILE
from cache.store import StoreLock
from pipeline import latents as files
from pipeline.configs import Option, Stage
from pipeline.groundtruth import PLOT_FILE as GT_PLOT
from pipeline.groundtruth import GroundTruthResults
from pipeline.heatmaps import ImageSource, ImageUnavailable, render_heatmap
from pipeline.latents import LatentStats
from pipeline.progress import next_steps

log = logging.getLogger(__name__)

MARKER = ".patchsae-report"
PAGES_DIR = "latents"
IMAGES_DIR = "img"
PLOTS_DIR = "plots"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Which latents to show and where the images are."""

    OPTIONS: ClassVar = {"n_latents": Option("--latents"), "n_low_entropy": Option("--low-entropy")}

    stats_dir: Path  # statistics folder written by `pipeline stats`
    out_dir: Path  # report folder to write (index.html, latents/, plots/); an earlier report there is replaced
    n_latents: int = 100  # the most frequent alive latents get a page
    n_low_entropy: int = 10  # also show this many of the lowest-entropy alive latents
    min_references: int = 5  # low-entropy picks need this many references (a single one always has entropy 0)
    root: Path | None = None  # where the dataset's images are now (default: the root recorded in the store)
    image_px: int = 192  # width of each reference picture in pixels
    groundtruth_dir: Path | None = None  # ground-truth folder (pipeline groundtruth) of the same codes: adds its
                                         # metrics to the report

    def __post_init__(self) -> None:
        for name in ("stats_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("root", "groundtruth_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.n_latents < 0 or self.n_low_entropy < 0 or self.min_references < 1:
            raise UserError("--latents and --low-entropy must be >= 0, and min_references >= 1")
        if self.image_px < 16:
            raise UserError(f"image size must be at least 16 pixels (got {self.image_px})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    report_dir: Path
    index_path: Path
    latent_pages: tuple[Path, ...]
    n_pictures: int  # reference pictures written
    n_without_image: int  # of those, heatmaps drawn without their image
    image_problem: str | None  # why no image could be opened, when that holds for the whole dataset
    seconds: float


def choose_latents(table, n_frequent: int, n_low_entropy: int, min_references: int = 5) -> tuple[list[int], list[int]]:
    """The ``n_frequent`` most frequent alive latents, and the ``n_low_entropy`` lowest-entropy others.

    Low-entropy picks need ``min_references`` references: a latent seen on one image has entropy 0.
    """
    alive = table[~table["dead"].astype(bool)]
    by_freq = alive.sort_values(["frequency", "latent"], ascending=[False, True], kind="stable")
    chosen = [int(j) for j in by_freq["latent"].head(n_frequent)]
    has_entropy = alive[alive["label_entropy"].notna() & (alive["n_references"] >= min_references)]
    by_entropy = has_entropy.sort_values(["label_entropy", "frequency", "latent"], ascending=[True, False, True],
                                         kind="stable")
    taken = set(chosen)
    extra = [int(j) for j in by_entropy["latent"] if int(j) not in taken][:n_low_entropy]
    return chosen, extra


def open_groundtruth(path: Path, stats: LatentStats) -> GroundTruthResults:
    """The ground-truth folder, refused unless it was computed from the statistics' codes."""
    truth = GroundTruthResults(path)
    if truth.record["provenance"]["codes_config_sha256"] != stats.meta["provenance"]["codes_config_sha256"]:
        raise UserError(f"{path} was computed from other codes than the statistics {stats.path}; "
                        "rerun `pipeline groundtruth` with these statistics")
    return truth


def dedicated_latents(truth: GroundTruthResults) -> dict[int, str]:
    """Each covered value's dedicated latent, with the values it is dedicated to ('shape=circle')."""
    values = truth.values
    names: dict[int, list[str]] = {}
    for r in values[values["dedicated"]].itertuples():
        names.setdefault(int(r.best_latent), []).append(f"{r.attribute}={r.value}")
    return {j: ", ".join(v) for j, v in names.items()}


def _prepare(out: Path) -> None:
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"{out} is not empty and holds no report; choose an empty or new --out")
        for sub in (PAGES_DIR, PLOTS_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / PAGES_DIR / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    (out / MARKER).write_text("written by `pipeline report`; the folder is replaced on the next run\n")


def run(cfg: Config) -> Outputs:
    with StoreLock(cfg.out_dir):  # one writer per folder, held from before its first byte
        return _run(cfg)


def _run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    stats = LatentStats(cfg.stats_dir)
    table = stats.table
    frequent, low_entropy = choose_latents(table, cfg.n_latents, cfg.n_low_entropy, cfg.min_references)
    truth = open_groundtruth(cfg.groundtruth_dir, stats) if cfg.groundtruth_dir is not None else None
    dedicated = dedicated_latents(truth) if truth is not None else {}
    why = {**{j: "frequent" for j in frequent}, **{j: "low entropy" for j in low_entropy}}
    why.update({j: f"dedicated to {names}" for j, names in dedicated.items() if j not in why})
    shown = list(why)
    out = cfg.out_dir
    _prepare(out)
    source = ImageSource(stats.meta["image_source"], stats.class_names, root=cfg.root)
    problem = source.problem()
    if problem:
        log.warning("reference images cannot be shown: %s; the report shows heatmaps alone", problem)
    plots = []
    for name in (files.PLOT_SCATTER, files.PLOT_HISTOGRAMS, files.PLOT_CLASS_TOP):
        if (stats.path / name).is_file():
            shutil.copyfile(stats.path / name, out / PLOTS_DIR / name)
            plots.append(name)
    if truth is not None and (truth.path / GT_PLOT).is_file():
        shutil.copyfile(truth.path / GT_PLOT, out / PLOTS_DIR / GT_PLOT)
        plots.append(GT_PLOT)
    truth_rows = truth.latents.set_index("latent", drop=False) if truth is not None else None

    cache: dict[str, np.ndarray | ImageUnavailable] = {}
    pages, n_pictures, n_without = [], 0, 0
    for pos, j in enumerate(shown):
        prev_j = shown[pos - 1] if pos > 0 else None
        next_j = shown[pos + 1] if pos + 1 < len(shown) else None
        page, n_pic, n_missing = _latent_page(stats, j, source, cache, out, cfg.image_px, prev_j, next_j,
                                              None if truth_rows is None else truth_rows.loc[j])
        pages.append(page)
        n_pictures += n_pic
        n_without += n_missing
    index = out / "index.html"
    index.write_text(_index_html(stats, table, why, plots, problem, cfg.min_references, truth, truth_rows),
                     encoding="utf-8")
    return Outputs(report_dir=out, index_path=index, latent_pages=tuple(pages), n_pictures=n_pictures,
                   n_without_image=n_without, image_problem=problem, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------
# HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
table { border-collapse: collapse; font-size: .92em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: right; }
#latents td { white-space: nowrap; }
td.text, th.text { text-align: left; }
#latents th { cursor: pointer; user-select: none; background: #f3f3f3; position: sticky; top: 0; }
#latents th:hover { background: #e4e4e4; }
#latents th[aria-sort=ascending]::after { content: " \\25B2"; }
#latents th[aria-sort=descending]::after { content: " \\25BC"; }
.muted { color: #666; font-size: .9em; }
.warn { background: #fff4d6; border: 1px solid #e5c46b; padding: .5em .8em; }
.plots img { max-width: 32%; margin-right: 1%; vertical-align: top; }
.refs { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: min-content; }
figcaption { font-size: .8em; color: #333; }
dl.defs dt { font-weight: 600; margin-top: .4em; }
dl.defs dd { margin-left: 1.2em; color: #444; }
nav a { margin-right: 1em; }
.bar { display: inline-block; width: 120px; height: .8em; vertical-align: middle; border: 1px solid #999;
       background: linear-gradient(to right, #000004, #420a68, #932667, #dd513a, #fca50a, #fcffa4); }
"""

SORT_JS = """
(function () {
  var table = document.getElementById('latents');
  if (!table) return;
  var heads = table.tHead.rows[0].cells;
  function value(row, col) { return row.cells[col].getAttribute('data-v'); }
  function sortBy(col) {
    var th = heads[col];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    var numeric = th.getAttribute('data-type') === 'num';
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      if (x === '' || y === '') { if (x === y) return 0; return x === '' ? 1 : -1; }  // missing last
      var d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      if (!asc) d = -d;
      return d || Number(value(a, 0)) - Number(value(b, 0));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  }
  for (var i = 0; i < heads.length; i++) {
    (function (col) { heads[col].addEventListener('click', function () { sortBy(col); }); })(i);
  }
})();
"""

COLUMNS = (  # (column, header, type, format)
    ("latent", "latent", "num", "d"),
    ("frequency", "frequency", "num", ".4g"),
    ("mean_activation", "mean activation", "num", ".4g"),
    ("label_entropy", "label entropy", "num", ".3f"),
    ("label_std", "label std", "num", ".3f"),
    ("top_class_name", "top class", "text", "s"),
    ("top_class_share", "top class share", "num", ".2f"),
    ("frequency_cls", "cls frequency", "num", ".4g"),
    ("frequency_max_patch", "max-patch frequency", "num", ".4g"),
)


GT_COLUMNS = (  # ground-truth columns of the latent table, when a ground-truth folder is given
    ("best", "best value", "text", "s"),
    ("auroc", "AUROC", "num", ".3f"),
    ("purity", "purity", "num", ".3f"),
    ("iou", "IoU", "num", ".3f"),
    ("pointing", "pointing", "num", ".3f"),
)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is np.nan or \
        str(value) in ("<NA>", "nan")


def _cell(value: Any, kind: str, fmt: str, link: str | None = None) -> str:
    if _missing(value):
        return f'<td class="{kind}" data-v="">&ndash;</td>'
    text = format(value, fmt) if fmt != "s" else str(value)
    sort_value = (str(int(value)) if fmt == "d" else repr(float(value))) if kind == "num" else str(value)
    shown = f'<a href="{link}">{html.escape(text)}</a>' if link else html.escape(text)
    return f'<td class="{kind}" data-v="{html.escape(sort_value)}">{shown}</td>'


def _page_name(j: int) -> str:
    return f"latent_{j:06d}.html"


def _head(title: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n")


def _definitions(stats: LatentStats, truth: GroundTruthResults | None = None) -> str:
    defs = dict(stats.meta.get("definitions", files.DEFINITIONS))
    if truth is not None:
        defs.update({f"ground truth: {k}": v for k, v in truth.record["definitions"].items()})
    items = "".join(f"<dt>{html.escape(k.replace('_', ' '))}</dt><dd>{html.escape(v)}</dd>" for k, v in defs.items())
    return f'<h2>Definitions</h2><dl class="defs">{items}</dl>'


def _index_html(stats: LatentStats, table, why: dict[int, str], plots: list[str], problem: str | None,
                min_references: int, truth: GroundTruthResults | None, truth_rows) -> str:
    """``why`` maps each shown latent, in display order, to the reason it is shown; ``truth_rows`` is
    the ground-truth latent table indexed by latent (None without ground truth)."""
    shown = list(why)
    s, meta = stats.summary, stats.meta
    prov = meta["provenance"]
    ds = (meta.get("image_source") or {}).get("dataset") or {}
    parts = [_head("PatchSAE latents"),
             f"<h1>PatchSAE latents: layer {html.escape(str(prov.get('layer')))}, "
             f"{html.escape(str(ds.get('name', '?')))} ({html.escape(str(ds.get('split', '?')))})</h1>",
             f'<p>{s["n_latents"]} latents, {s["n_dead"]} dead ({100 * s["fraction_dead"]:.1f}%), over '
             f'{s["n_valid_images"]} valid images of {s["n_classes"]} classes; {meta["top_k"]} references per '
             f'latent; class counts count tokens with f &gt; {meta["config"]["threshold"]}.</p>',
             f'<p class="muted">activation store {html.escape(prov["acts_config_sha256"][:12])}, '
             f'code store {html.escape(prov["codes_config_sha256"][:12])}, SAE weights '
             f'{html.escape(str(prov.get("sae_weights_sha256"))[:12])}</p>']
    if problem:
        parts.append(f'<p class="warn">Reference images cannot be shown: {html.escape(problem)}. '
                     "Latent pages show the patch heatmaps alone.</p>")
    if plots:
        parts.append('<div class="plots">' + "".join(
            f'<a href="{PLOTS_DIR}/{p}"><img src="{PLOTS_DIR}/{p}" alt="{html.escape(p)}"></a>' for p in plots)
            + "</div>")
    if truth is not None:
        parts.append(_groundtruth_html(truth, set(shown)))
    dedicated = ", then each attribute value's dedicated latent" if truth is not None else ""
    parts.append(f"<h2>Shown latents ({len(shown)})</h2>"
                 '<p class="muted">The most frequent alive latents, then the lowest-entropy ones (with at least '
                 f'{min_references} references){dedicated}. '
                 "Click a column header to sort (again to reverse).</p>")
    if not shown:
        parts.append("<p>No latent is alive: nothing to show.</p>")
    columns = COLUMNS + (GT_COLUMNS if truth is not None else ())
    head = "".join(f'<th data-type="{kind}" class="{kind}">{html.escape(label)}</th>'
                   for _, label, kind, _ in columns) + '<th data-type="text" class="text">shown for</th>'
    rows = []
    by_id = table.set_index("latent", drop=False)
    for j in shown:
        r = by_id.loc[j].to_dict()
        if truth_rows is not None:
            g = truth_rows.loc[j]
            r.update({col: g[col] for col in ("auroc", "purity", "iou", "pointing")},
                     best=None if _missing(g["best_value"]) else f"{g['best_attribute']}={g['best_value']}")
        cells = [_cell(r[col], kind, fmt, f"{PAGES_DIR}/{_page_name(j)}" if col == "latent" else None)
                 for col, _, kind, fmt in columns]
        cells.append(_cell(why[j], "text", "s"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(f'<table id="latents"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
                 + "\n</tbody></table>")
    parts.append(_definitions(stats, truth))
    parts.append(f"<script>{SORT_JS}</script></body></html>\n")
    return "\n".join(parts)


def _groundtruth_html(truth: GroundTruthResults, shown: set[int]) -> str:
    """The ground-truth summary: coverage, and one row per attribute value with its best latent."""
    rec = truth.record
    world = rec["provenance"]["world"]
    iou, pointing = rec["mean_iou_dedicated"], rec["mean_pointing_dedicated"]
    parts = ["<h2>Ground truth (synthetic world)</h2>",
             f'<p>{rec["n_values_covered"]} of {rec["n_values"]} attribute values have a dedicated latent '
             f'(AUROC &ge; {rec["config"]["auroc_threshold"]:g}); mean IoU of the dedicated object latents '
             f'{_fmt(iou, ".3f")}, pointing {_fmt(pointing, ".3f")}. Image-level score: '
             f'{html.escape(rec["config"]["score"])}; {rec["n_images"]} images of the world with seed '
             f'{world["seed"]}, {world["image_size"]} px, task {html.escape(str(world["task"]))}.</p>']
    head = "".join(f'<th class="{"text" if i < 2 else "num"}">{h}</th>' for i, h in enumerate(
        ("attribute", "value", "images", "best latent", "AUROC", "dedicated", "purity", "prevalence", "IoU",
         "pointing")))
    rows = []
    for _, r in truth.values.iterrows():
        j = r["best_latent"]
        latent = "&ndash;" if _missing(j) else (f'<a href="{PAGES_DIR}/{_page_name(int(j))}">{int(j)}</a>'
                                                if int(j) in shown else str(int(j)))
        cells = [f'<td class="text">{html.escape(str(r["attribute"]))}</td>',
                 f'<td class="text">{html.escape(str(r["value"]))}</td>', f"<td>{int(r['n_images'])}</td>",
                 f"<td>{latent}</td>", f"<td>{_fmt(r['auroc'], '.3f')}</td>",
                 f"<td>{'yes' if r['dedicated'] else 'no'}</td>", f"<td>{_fmt(r['purity'], '.3f')}</td>",
                 f"<td>{_fmt(r['prevalence'], '.3f')}</td>", f"<td>{_fmt(r['iou'], '.3f')}</td>",
                 f"<td>{_fmt(r['pointing'], '.3f')}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(f'<table id="values"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
                 + "\n</tbody></table>")
    parts.append('<p class="muted">Background attributes (texture, background) get no IoU or pointing: the '
                 "object mask says nothing about them.</p>")
    return "\n".join(parts)


def _fmt(value: Any, fmt: str = ".4g") -> str:
    return "&ndash;" if _missing(value) else html.escape(format(value, fmt))


def _latent_page(stats: LatentStats, j: int, source: ImageSource, cache: dict, out: Path, image_px: int,
                 prev_j: int | None, next_j: int | None, truth_row=None) -> tuple[Path, int, int]:
    r = stats.row(j)
    refs = stats.references(j)
    names = stats.class_names
    n_classes = len(names)
    maps = refs["maps"]
    vmax = float(maps.max()) if maps.size else 0.0
    figures, reasons = [], []
    for rank, (score, index, image_id, label, map_HW) in enumerate(
            zip(refs["score"], refs["image_index"], refs["image_id"], refs["label"], maps), start=1):
        image_id = str(image_id)
        if image_id not in cache:
            try:
                cache[image_id] = source.open(image_id)
            except ImageUnavailable as err:
                cache[image_id] = err
        opened = cache[image_id]
        picture = render_heatmap(map_HW, vmax, image_HWR=None if isinstance(opened, ImageUnavailable) else opened,
                                 size=image_px)
        file_name = f"latent_{j:06d}_r{rank:02d}.png"
        picture.save(out / PAGES_DIR / IMAGES_DIR / file_name, compress_level=1)  # level 6 is 4x slower
        note = ""
        if isinstance(opened, ImageUnavailable):
            reasons.append(str(opened))
            note = '<br><span class="muted">heatmap only: image unavailable</span>'
        cls = names[label] if 0 <= label < n_classes else "unlabelled"
        figures.append(
            f'<figure><img src="{IMAGES_DIR}/{file_name}" width="{picture.width}" height="{picture.height}" '
            f'alt="latent {j}, reference {rank}: {html.escape(image_id)}">'
            f"<figcaption>#{rank} &middot; a = {score:.4g} &middot; {html.escape(cls)}<br>"
            f'<span class="muted">{html.escape(image_id)} (row {int(index)})</span>{note}</figcaption></figure>')

    weights: dict[int, float] = {}
    for score, label in zip(refs["score"], refs["label"]):
        if label >= 0:
            weights[int(label)] = weights.get(int(label), 0.0) + float(score)
    total = sum(weights.values())
    dist = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))
    dist_html = ", ".join(f"{html.escape(names[c])} {w / total:.2f}" for c, w in dist) if total > 0 else "&ndash;"
    tops = stats.top_classes_by_counts(j, 5)
    counts_html = ", ".join(f"{html.escape(name)} ({count})" for name, count in tops) or "none"
    threshold = stats.meta["config"]["threshold"]

    nav = ['<a href="../index.html">&larr; all latents</a>']
    if prev_j is not None:
        nav.append(f'<a href="{_page_name(prev_j)}">previous: {prev_j}</a>')
    if next_j is not None:
        nav.append(f'<a href="{_page_name(next_j)}">next: {next_j}</a>')
    rows = [("frequency", f"{_fmt(r['frequency'])} ({r['n_active_images']} of "
                          f"{stats.meta['n_valid_images']} valid images with a &gt; 0)"),
            ("mean activation", f"{_fmt(r['mean_activation'])} (over active images)"),
            ("class token", f"frequency {_fmt(r['frequency_cls'])}, mean {_fmt(r['mean_activation_cls'])}"),
            ("max over patches", f"frequency {_fmt(r['frequency_max_patch'])}, "
                                 f"mean {_fmt(r['mean_activation_max_patch'])}"),
            ("label entropy", f"{_fmt(r['label_entropy'], '.3f')} nats (uniform over {n_classes} classes: "
                              f"{math.log(max(n_classes, 1)):.3f})"),
            ("label std", f"{_fmt(r['label_std'], '.3f')} (0 = one class; at most "
                          f"{math.sqrt(max(0.0, 1 - 1 / max(n_classes, 1))):.3f})"),
            ("top class", f"{html.escape(str(r['top_class_name'] or '–'))} "
                          f"({_fmt(r['top_class_share'], '.2f')} of the reference weight)"),
            ("reference classes", dist_html),
            (f"tokens with f &gt; {threshold}", f"{r['n_tokens_above_threshold']} in all; most in: {counts_html}")]
    if truth_row is not None and not _missing(truth_row["best_value"]):
        g = truth_row
        where = (f"IoU {_fmt(g['iou'], '.3f')}, pointing {_fmt(g['pointing'], '.3f')} over {int(g['n_localised'])} "
                 "images" if not _missing(g["iou"]) else "no IoU (a background attribute, or never localised)")
        rows.append(("ground truth", f"best value {html.escape(str(g['best_attribute']))}="
                                     f"{html.escape(str(g['best_value']))}: AUROC {_fmt(g['auroc'], '.3f')}, "
                                     f"purity {_fmt(g['purity'], '.3f')} (prevalence {_fmt(g['prevalence'], '.3f')}); "
                                     f"{where}"))
    parts = [_head(f"Latent {j}"), "<nav>" + "".join(nav) + "</nav>", f"<h1>Latent {j}</h1>",
             '<table class="summary">' + "".join(f'<tr><th class="text">{k}</th><td class="text">{v}</td></tr>'
                                                for k, v in rows) + "</table>",
             f"<h2>Reference images ({len(figures)})</h2>"]
    if reasons:
        parts.append(f'<p class="warn">Images could not be opened: {html.escape(reasons[0])}. '
                     "Showing the patch heatmap alone.</p>")
    if figures:
        parts.append(f'<p class="muted">Colour: f<sub>{j}</sub> on each patch, 0 <span class="bar"></span> {vmax:.4g} '
                     "(the largest patch value over these references; stronger patches are also more opaque); "
                     "a = image-level activation (mean over all tokens).</p>")
        parts.append('<div class="refs">' + "".join(figures) + "</div>")
    else:
        parts.append("<p>No references: the latent never fired.</p>")
    parts.append(_definitions(stats))
    parts.append("</body></html>\n")
    page = out / PAGES_DIR / _page_name(j)
    page.write_text("\n".join(parts), encoding="utf-8")
    return page, len(figures), sum(1 for f in figures if "heatmap only" in f)


def summary(out: Outputs) -> str:
    lines = [f"report of {len(out.latent_pages)} latents ({out.n_pictures} reference pictures) "
             f"in {out.seconds:.1f} s -> {out.index_path}"]
    if out.image_problem:
        lines.append(f"  images not shown: {out.image_problem}")
    elif out.n_without_image:
        lines.append(f"  {out.n_without_image} references could not be opened (heatmap only; see their pages)")
    lines.append(next_steps(f"open {out.index_path} in a browser (a static site; no server needed)"))
    return "\n".join(lines)


STAGE = Stage(name="report", config=Config, run=run, summary=summary, reads=("stats_dir", "groundtruth_dir"),
              writes=("out_dir",),
              help="Static HTML report (open index.html from disk): sortable latent table, reference heatmaps.")
