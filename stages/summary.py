"""One SAE read across datasets, side by side: the paper's Table 1 and its masking drops.

The study publishes every stage's numbers under one metrics folder (app/study.py); this stage
reads, for each dataset and block, the adaptation accuracies (``<dataset>/adapt.json``), the
base model's masking sweep (``<dataset>/layer<L>/masking.json``) and the remap groups
(``<dataset>/layer<L>/remap.json``), and writes one row per (dataset, block):

- remap groups: the fractions of the relevant (class, latent) pairs that stay high (high→high),
  are lost (high→low), appear (low→high) or move partly, pooled over the dataset's classes
  (stages/remap.py defines them; the paper's Table 1);
- accuracy of the base and of the MaPLe-adapted model on the test images, micro and, where
  the stage reports it, mean per-class recall;
- masking: plain CLIP, the SAE spliced in with every latent on, and for each ``ks`` the drop
  when each class's top-k latents are switched off against the drop for k random latents.

Outputs: ``summary.json`` (rows keyed by dataset and block, with the definitions), ``summary.csv``,
``summary.md``, ``summary.png`` and ``index.html`` (the table and the plot on one page).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import time
from pathlib import Path
from typing import Any, ClassVar

from cache.atomic import atomic_write, write_json
from cache.errors import UserError
from cache.store import one_writer
from pipeline.configs import Option, Stage
from pipeline.progress import next_steps

ADAPT_FILE = "{dataset}/adapt.json"
MASKING_FILE = "{dataset}/layer{layer}/masking.json"
REMAP_FILE = "{dataset}/layer{layer}/remap.json"
GROUPS = ("high_high", "partial", "low_high", "high_low")
DEFINITIONS = {
    "high_high, partial, low_high, high_low": "fractions of the relevant (class, latent) pairs in each remap group, "
                                              "pooled over classes (stages/remap.py; the paper's Table 1)",
    "base_accuracy, adapted_accuracy": "accuracy on the dataset's test images of the base model (zero-shot) and of "
                                       "the MaPLe-adapted model (stages/adapt.py)",
    "*_mean_recall": "the same predictions scored by mean per-class recall (balanced accuracy)",
    "clip, sae_all_on": "masking stage: plain CLIP, and CLIP with the SAE reconstruction spliced in, all latents on",
    "drop_off_k": "sae_all_on minus the accuracy with each image's class's top-k latents switched off",
    "drop_random_off_k": "sae_all_on minus the mean accuracy with k random latents switched off (the baseline)",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Where the study published its numbers, which datasets and blocks to lay side by side."""

    OPTIONS: ClassVar = {"datasets": Option("--datasets"), "layers": Option("--layers")}

    metrics_dir: Path  # the study's published metrics (work/metrics)
    datasets: tuple[str, ...]  # dataset keys, one row each (data.datasets)
    layers: tuple[int, ...]  # blocks (extract.layers)
    out_dir: Path  # summary.json, summary.csv, summary.md, summary.png, index.html
    ks: tuple[int, ...] = (10, 50)  # masking drops quoted: top-k latents off (each must be in mask.ks)
    plots: bool = True  # write summary.png

    def __post_init__(self) -> None:
        for name in ("metrics_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not self.datasets or not self.layers:
            raise UserError("the summary needs at least one dataset and one layer")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise UserError(f"summary.ks must be positive integers (got {list(self.ks)})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    results_path: Path
    table_path: Path
    plot_path: Path | None
    page_path: Path
    table_lines: tuple[str, ...]
    seconds: float


def _read(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: run the {stage} stage first (`dvc repro` runs every stage)")
    return json.loads(path.read_text())


def row(metrics_dir: Path, dataset: str, layer: int, ks: tuple[int, ...]) -> dict[str, Any]:
    """One (dataset, block) row from the published metrics."""
    adapt = _read(metrics_dir / ADAPT_FILE.format(dataset=dataset), f"adapt@{dataset}")
    masking = _read(metrics_dir / MASKING_FILE.format(dataset=dataset, layer=layer), f"mask@{dataset}-{layer}")
    remap = _read(metrics_dir / REMAP_FILE.format(dataset=dataset, layer=layer), f"remap@{dataset}-{layer}")
    acc = masking["accuracy"]
    out: dict[str, Any] = {g: remap["overall"].get(g) for g in GROUPS}
    out["n_relevant"] = remap.get("n_relevant")
    out["base_accuracy"], out["adapted_accuracy"] = adapt["base_accuracy"], adapt["adapted_accuracy"]
    for key in ("base_mean_recall", "adapted_mean_recall"):  # where the stage reports it
        if adapt.get(key) is not None:
            out[key] = adapt[key]
    out["clip"], out["sae_all_on"] = acc["clip"], acc["sae_all_on"]
    for k in ks:
        if str(k) not in acc.get("off", {}):
            raise UserError(f"summary.ks has {k}, which the masking run of {dataset} (block {layer}) did not "
                            f"sweep; use ks from mask.ks ({', '.join(acc.get('off', {}))})")
        out[f"drop_off_{k}"] = acc["sae_all_on"] - acc["off"][str(k)]
        random = (acc.get("random_off") or {}).get(str(k))
        out[f"drop_random_off_{k}"] = acc["sae_all_on"] - random["mean"] if random else None
    return out


def _columns(ks: tuple[int, ...]) -> list[str]:
    return [*GROUPS, "base_accuracy", "adapted_accuracy", "clip", "sae_all_on",
            *(f"{kind}_{k}" for k in ks for kind in ("drop_off", "drop_random_off"))]


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def table_lines(rows: dict[str, dict[str, dict[str, Any]]], ks: tuple[int, ...]) -> list[str]:
    """The Markdown table: one line per dataset and block."""
    columns = _columns(ks)
    lines = ["| dataset | block | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for dataset, layers in rows.items():
        for layer, values in layers.items():
            lines.append(f"| {dataset} | {layer.removeprefix('layer')} | "
                         + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return lines


def _csv(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    fields = list(dict.fromkeys(k for layers in rows.values() for values in layers.values() for k in values))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "layer", *fields])
    for dataset, layers in rows.items():
        for layer, values in layers.items():
            writer.writerow([dataset, layer.removeprefix("layer"), *("" if values.get(f) is None else values[f]
                                                                    for f in fields)])
    return buffer.getvalue()


def write_plot(path: Path, rows: dict[str, dict[str, dict[str, Any]]], ks: tuple[int, ...]) -> Path:
    """Left: the remap groups per dataset (stacked); right: base and adapted accuracy and the masking drops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pipeline.remap import COLOURS, GROUP_LABELS

    labels = [f"{d} · {layer}" if len(layers) > 1 else d for d, layers in rows.items() for layer in layers]
    values = [v for layers in rows.values() for v in layers.values()]
    y = np.arange(len(labels))[::-1]
    fig, (groups, bars) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.45 * len(labels)))
    left = np.zeros(len(labels))
    for g in GROUPS:
        widths = np.array([v[g] if v[g] is not None else 0.0 for v in values])
        groups.barh(y, widths, left=left, color=COLOURS[g], label=GROUP_LABELS[g])
        left += widths
    groups.set_yticks(y, labels, fontsize=8)
    groups.set_xlim(0, 1)
    groups.set_xlabel("fraction of the relevant (class, latent) pairs")
    groups.set_title("remap groups, one SAE for every dataset", fontsize=9)
    groups.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
    series = [("base_accuracy", "base model"), ("adapted_accuracy", "MaPLe")]
    series += [(f"drop_off_{k}", f"drop, top-{k} off") for k in ks]
    series += [(f"drop_random_off_{k}", f"drop, {k} random off") for k in ks]
    height = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        widths = np.array([v.get(key) if v.get(key) is not None else np.nan for v in values])
        bars.barh(y + 0.4 - (i + 0.5) * height, widths, height=height, label=label)
    bars.set_yticks(y, labels, fontsize=8)
    bars.set_xlabel("accuracy, or accuracy lost")
    bars.set_title("adaptation and masking", fontsize=9)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    bars.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


@functools.cache
def page_template(name: str):
    """A page template of stages/templates (autoescaped; a missing value is an error, not an empty cell)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("stages", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(name)


@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    rows = {d: {f"layer{layer}": row(cfg.metrics_dir, d, layer, cfg.ks) for layer in cfg.layers}
            for d in cfg.datasets}
    lines = table_lines(rows, cfg.ks)
    record = {"datasets": rows, "ks": list(cfg.ks), "definitions": DEFINITIONS,
              "provenance": {"metrics_dir": str(cfg.metrics_dir.resolve())}}
    write_json(cfg.out_dir / "summary.json", record)
    atomic_write(cfg.out_dir / "summary.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    atomic_write(cfg.out_dir / "summary.csv", lambda tmp: Path(tmp).write_text(_csv(rows)))
    plot_path = write_plot(cfg.out_dir / "summary.png", rows, cfg.ks) if cfg.plots else None
    columns = _columns(cfg.ks)
    page = page_template("summary.html").render(
        columns=[c.replace("_", " ") for c in columns],
        rows=[(d, layer.removeprefix("layer"), [_fmt(v.get(c)) for c in columns])
              for d, layers in rows.items() for layer, v in layers.items()],
        plot=plot_path.name if plot_path else None, definitions=list(DEFINITIONS.items()))
    atomic_write(cfg.out_dir / "index.html", lambda tmp: Path(tmp).write_text(page + "\n"))
    return Outputs(out_dir=cfg.out_dir, results_path=cfg.out_dir / "summary.json",
                   table_path=cfg.out_dir / "summary.md", plot_path=plot_path, page_path=cfg.out_dir / "index.html",
                   table_lines=tuple(lines), seconds=time.perf_counter() - started)


def summary(out: Outputs) -> str:
    return "\n".join([*out.table_lines, f"-> {out.results_path}, {out.table_path}, {out.page_path}",
                      next_steps(f"open {out.page_path}")])


STAGE = Stage(name="summary", config=Config, run=run, summary=summary, reads=("metrics_dir",), writes=("out_dir",),
              help="Lay the datasets read through one SAE side by side: remap groups, base and adapted accuracy, "
                   "masking drops (the paper's Table 1).")
