"""The report stage: a static HTML site over a statistics folder, readable from disk with no server.

``index.html`` holds the stats plots and a table of the shown latents, then of some dead ones
(hidden until asked for), that sorts by any column and filters by a search box (latent id, class
name, attribute value) and by dead, ground-truth covered and top class: plain inline JavaScript,
no network. Each shown latent gets ``latents/latent_<id>.html`` with its summary and its
reference images, the patch heatmap drawn over each (PNG files in ``latents/img/``). Images are
re-opened by their store id (``pipeline.heatmaps``); when that is impossible the page shows the
heatmaps alone and says why. The pages are Jinja2 templates in ``stages/templates/``
(autoescaped: class names and attribute values are text, never markup).

With a ground-truth folder (``pipeline groundtruth`` over the same codes) the index also
shows each latent's best attribute value, AUROC, purity, IoU and pointing, a per-value
table of dedicated latents and the ground-truth plot; every value's dedicated latent gets
a page too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import numpy as np

from cache.errors import UserError
from cache.schema import LOCK_FILE
from cache.store import one_writer
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
TEMPLATES_DIR = "templates"  # in the stages package: index.html, latent.html and what they include


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Which latents to show and where the images are."""

    OPTIONS: ClassVar = {"n_latents": Option("--latents"), "n_low_entropy": Option("--low-entropy"),
                         "n_dead": Option("--dead")}

    stats_dir: Path  # statistics folder written by `pipeline stats`
    out_dir: Path  # report folder to write (index.html, latents/, plots/); an earlier report there is replaced
    n_latents: int = 100  # the most frequent alive latents get a page
    n_low_entropy: int = 10  # also show this many of the lowest-entropy alive latents
    n_dead: int = 100  # list this many dead latents (lowest ids) in the table too, without a page
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
        if self.n_latents < 0 or self.n_low_entropy < 0 or self.n_dead < 0 or self.min_references < 1:
            raise UserError("--latents, --low-entropy and --dead must be >= 0, and min_references >= 1")
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


def dedicated_latents(truth: GroundTruthResults) -> dict[int, list[str]]:
    """Each covered value's dedicated latent, with the values it is dedicated to ('shape=circle')."""
    values = truth.values
    names: dict[int, list[str]] = {}
    for r in values[values["dedicated"]].itertuples():
        names.setdefault(int(r.best_latent), []).append(f"{r.attribute}={r.value}")
    return names


def _prepare(out: Path) -> None:
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"{out} is not empty and holds no report; choose an empty or new --out")
        for sub in (PAGES_DIR, PLOTS_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / PAGES_DIR / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    (out / MARKER).write_text("written by `pipeline report`; the folder is replaced on the next run\n")


@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    stats = LatentStats(cfg.stats_dir)
    table = stats.table
    frequent, low_entropy = choose_latents(table, cfg.n_latents, cfg.n_low_entropy, cfg.min_references)
    truth = open_groundtruth(cfg.groundtruth_dir, stats) if cfg.groundtruth_dir is not None else None
    dedicated = dedicated_latents(truth) if truth is not None else {}
    why = {**{j: "frequent" for j in frequent}, **{j: "low entropy" for j in low_entropy}}
    why.update({j: f"dedicated to {', '.join(names)}" for j, names in dedicated.items() if j not in why})
    shown = list(why)
    dead = [int(j) for j in table.loc[table["dead"].astype(bool), "latent"].sort_values().head(cfg.n_dead)]
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
    index.write_text(_index_html(stats, table, why, dead, plots, problem, cfg.min_references, truth, truth_rows,
                                 dedicated), encoding="utf-8")
    return Outputs(report_dir=out, index_path=index, latent_pages=tuple(pages), n_pictures=n_pictures,
                   n_without_image=n_without, image_problem=problem, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------
# HTML: the pages are Jinja2 templates (stages/templates/); this part only gathers their values

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


def _fmt(value: Any, fmt: str = ".4g") -> str:
    return "–" if _missing(value) else format(value, fmt)


@functools.cache
def _templates() -> jinja2.Environment:
    """Autoescaping templates that fail on a missing value instead of printing nothing."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("stages", TEMPLATES_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.globals["page_name"] = _page_name
    return env


def _render(template: str, **values: Any) -> str:
    return _templates().get_template(template).render(**values) + "\n"


def _cell(value: Any, kind: str, fmt: str, link: str | None = None) -> dict:
    """One table cell: the text shown (None when missing) and the value it sorts by."""
    if _missing(value):
        return {"kind": kind, "sort": "", "text": None, "link": None}
    text = format(value, fmt) if fmt != "s" else str(value)
    sort_value = (str(int(value)) if fmt == "d" else repr(float(value))) if kind == "num" else str(value)
    return {"kind": kind, "sort": sort_value, "text": text, "link": link}


def _page_name(j: int) -> str:
    return f"latent_{j:06d}.html"


def _definitions(stats: LatentStats, truth: GroundTruthResults | None = None) -> list[tuple[str, str]]:
    defs = dict(stats.meta.get("definitions", files.DEFINITIONS))
    if truth is not None:
        defs.update({f"ground truth: {k}": v for k, v in truth.record["definitions"].items()})
    return [(k.replace("_", " "), v) for k, v in defs.items()]


def _index_html(stats: LatentStats, table, why: dict[int, str], dead: list[int], plots: list[str],
                problem: str | None, min_references: int, truth: GroundTruthResults | None, truth_rows,
                dedicated: dict[int, list[str]]) -> str:
    """``why`` maps each latent with a page, in display order, to the reason it is shown; ``dead`` are
    the dead latents listed after them; ``truth_rows`` is the ground-truth latent table indexed by
    latent (None without ground truth)."""
    meta = stats.meta
    prov = meta["provenance"]
    ds = (meta.get("image_source") or {}).get("dataset") or {}
    columns = COLUMNS + (GT_COLUMNS if truth is not None else ())
    by_id = table.set_index("latent", drop=False)
    rows = []
    for j in [*why, *dead]:
        r = by_id.loc[j].to_dict()
        if truth_rows is not None:
            g = truth_rows.loc[j]
            r.update({col: g[col] for col in ("auroc", "purity", "iou", "pointing")},
                     best=None if _missing(g["best_value"]) else f"{g['best_attribute']}={g['best_value']}")
        link = f"{PAGES_DIR}/{_page_name(j)}" if j in why else None
        cells = [_cell(r[col], kind, fmt, link if col == "latent" else None) for col, _, kind, fmt in columns]
        cells.append(_cell(why.get(j, "dead: no page"), "text", "s"))
        top = "" if _missing(r["top_class_name"]) else str(r["top_class_name"])
        names = [top, r.get("best") or "", *dedicated.get(j, ())]
        rows.append({"latent": j, "cells": cells, "dead": bool(r["dead"]), "covered": j in dedicated,
                     "top_class": top, "names": "\t".join(n for n in names if n)})  # words never hold a tab
    return _render(
        "index.html", layer=prov.get("layer"), dataset=ds.get("name", "?"), split=ds.get("split", "?"),
        s=stats.summary, top_k=meta["top_k"], threshold=meta["config"]["threshold"],
        acts_sha=prov["acts_config_sha256"], codes_sha=prov["codes_config_sha256"],
        sae_sha=str(prov.get("sae_weights_sha256")), problem=problem, plots=plots, plots_dir=PLOTS_DIR,
        truth=None if truth is None else _groundtruth(truth, set(why)), n_pages=len(why), n_dead_listed=len(dead),
        min_references=min_references, columns=[(label, kind) for _, label, kind, _ in columns]
        + [("shown for", "text")], rows=rows, classes=sorted({row["top_class"] for row in rows} - {""}),
        definitions=_definitions(stats, truth))


def _groundtruth(truth: GroundTruthResults, shown: set[int]) -> dict:
    """The ground-truth summary: coverage, and one row per attribute value with its best latent."""
    rec = truth.record
    world = rec["provenance"]["world"]
    values = []
    for _, r in truth.values.iterrows():
        j = None if _missing(r["best_latent"]) else int(r["best_latent"])
        values.append({**{k: r[k] for k in ("attribute", "value", "auroc", "purity", "prevalence", "iou",
                                             "pointing", "ceiling")},
                       "n_images": int(r["n_images"]), "latent": j, "dedicated": bool(r["dedicated"]),
                       "link": f"{PAGES_DIR}/{_page_name(j)}" if j in shown else None})
    return {"n_values_covered": rec["n_values_covered"], "n_values": rec["n_values"],
            "auroc_threshold": rec["config"]["auroc_threshold"], "iou": rec["mean_iou_dedicated"],
            "pointing": rec["mean_pointing_dedicated"], "score": rec["config"]["score"],
            "n_images": rec["n_images"], "seed": world["seed"], "image_size": world["image_size"],
            "task": world["task"], "rows": values}


def _latent_page(stats: LatentStats, j: int, source: ImageSource, cache: dict, out: Path, image_px: int,
                 prev_j: int | None, next_j: int | None, truth_row=None) -> tuple[Path, int, int]:
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
        unavailable = isinstance(opened, ImageUnavailable)
        picture = render_heatmap(map_HW, vmax, image_HWR=None if unavailable else opened, size=image_px)
        file_name = f"latent_{j:06d}_r{rank:02d}.png"
        picture.save(out / PAGES_DIR / IMAGES_DIR / file_name, compress_level=1)  # level 6 is 4x slower
        if unavailable:
            reasons.append(str(opened))
        figures.append({"src": f"{IMAGES_DIR}/{file_name}", "width": picture.width, "height": picture.height,
                        "rank": rank, "score": float(score), "image_id": image_id, "index": int(index),
                        "cls": names[label] if 0 <= label < n_classes else "unlabelled", "unavailable": unavailable})

    weights: dict[int, float] = {}
    for score, label in zip(refs["score"], refs["label"]):
        if label >= 0:
            weights[int(label)] = weights.get(int(label), 0.0) + float(score)
    total = sum(weights.values())
    dist = [(names[c], w / total) for c, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))] \
        if total > 0 else []
    g = None
    if truth_row is not None and not _missing(truth_row["best_value"]):
        localised = not _missing(truth_row["iou"])
        g = {**truth_row.to_dict(), "localised": localised,
             "n_localised": int(truth_row["n_localised"]) if localised else None}
    page = out / PAGES_DIR / _page_name(j)
    page.write_text(_render(
        "latent.html", j=j, prev_j=prev_j, next_j=next_j, r=stats.row(j), n_valid=stats.meta["n_valid_images"],
        n_classes=n_classes, entropy_max=math.log(max(n_classes, 1)),
        std_max=math.sqrt(max(0.0, 1 - 1 / max(n_classes, 1))), dist=dist,
        tops=stats.top_classes_by_counts(j, 5), threshold=stats.meta["config"]["threshold"], g=g,
        figures=figures, reason=reasons[0] if reasons else None, vmax=vmax, definitions=_definitions(stats)),
        encoding="utf-8")
    return page, len(figures), sum(f["unavailable"] for f in figures)


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
              writes=("out_dir",), cached=False,
              help="Static HTML report (open index.html from disk): latent table to sort, search and filter, "
                   "reference heatmaps.")
