"""Adaptation analysis: which latents does adaptation keep, drop or remap per class? (SCIENCE.md "Adaptation
analysis (MaPLe)", the paper's Table 1)

Two statistics folders of one SAE, on a base model and on its adapted version, are grouped by
``pipeline.remap`` (its docstring and ``DEFINITIONS`` give the rule); optionally the masking
results of both models are shown side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import ClassVar, Literal

from cache.errors import UserError
from cache.store import one_writer
from pipeline import masking
from pipeline.configs import Option, Stage
from pipeline.latents import LatentStats, json_safe
from pipeline.progress import next_steps
from pipeline.remap import (
    DEFINITIONS,
    GROUPS,
    NORMALISATIONS,
    check_pair,
    group_latents,
    masking_side_by_side,
    normalised,
    sae_of,
    summarise,
    table_lines,
    write_plot,
    write_results,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Two statistics folders of one SAE, and the grouping thresholds."""

    OPTIONS: ClassVar = {"tau_high": Option("--high"), "tau_low": Option("--low")}

    base_dir: Path  # statistics folder (`pipeline stats`) of the base model
    adapted_dir: Path  # statistics folder of the adapted model, computed with the same SAE on the same classes
    out_dir: Path  # results folder: remap.json, remap_table.md, remap.png
    tau_high: float = 0.5  # a latent is high for a class when its normalised count is >= tau_high
    tau_low: float = 0.1  # ... and low when it is <= tau_low
    normalise: Literal["max", "tokens"] = "max"  # per class, max: by the class's most counted latent; tokens: by the class's token count
    base_masking: Path | None = None  # masking.json (or its folder) of the base model with this SAE, shown beside
                                      # the adapted one
    adapted_masking: Path | None = None  # masking.json (or its folder) of the adapted model with the base model's SAE
    plots: bool = True  # write remap.png
    plot_classes: int = 30  # classes shown in the bar panel (the first ones) beside the overall bar

    def __post_init__(self) -> None:
        for name in ("base_dir", "adapted_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("base_masking", "adapted_masking"):
            path = getattr(self, name)
            if path is not None:
                path = Path(path)
                object.__setattr__(self, name, masking.results_file(path))
        for name in ("tau_high", "tau_low"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} must be a number in [0, 1] (got {value!r})")
        if not 0 <= self.tau_low < self.tau_high <= 1:
            raise UserError(f"the thresholds need 0 <= tau_low < tau_high <= 1 (got tau_low {self.tau_low}, "
                            f"tau_high {self.tau_high})")
        if self.normalise not in NORMALISATIONS:
            raise UserError(f"unknown normalisation '{self.normalise}'; use {' or '.join(NORMALISATIONS)}")
        if self.plot_classes < 0:
            raise UserError(f"plot_classes must be >= 0 (got {self.plot_classes})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    results_path: Path
    table_path: Path
    plot_path: Path | None
    table_lines: tuple[str, ...]  # the per-class table with the thresholds, as printed
    overall: dict[str, float | None]  # group -> pooled fraction of the relevant latents
    n_classes: int
    d_sae: int
    seconds: float


@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    base, adapted = LatentStats(cfg.base_dir), LatentStats(cfg.adapted_dir)
    check_pair(base, adapted)
    sae_sha = sae_of(base)
    masked = {side: masking.read_accuracies(path, sae_sha, base.class_names, side)
              for side, path in (("base", cfg.base_masking), ("adapted", cfg.adapted_masking)) if path is not None}

    class_names = base.class_names
    norm_base_CS, images_base_C = normalised(base, cfg.normalise)
    norm_adapted_CS, images_adapted_C = normalised(adapted, cfg.normalise)
    group_CS = group_latents(norm_base_CS, norm_adapted_CS, cfg.tau_high, cfg.tau_low)
    s = summarise(group_CS)

    thresholds = {"tau_high": cfg.tau_high, "tau_low": cfg.tau_low, "normalise": cfg.normalise,
                  "count_threshold": base.meta.get("config", {}).get("threshold")}
    side_by_side = masking_side_by_side(masked.get("base"), masked.get("adapted"))
    lines = table_lines(class_names, s, thresholds, images_base_C, images_adapted_C, side_by_side)
    record = {
        "thresholds": thresholds,
        "overall": s["overall"],
        "latents_per_class": s["latents_per_class"],
        "n_relevant": s["n_relevant"], "n_classes": len(class_names), "d_sae": base.d_sae,
        "per_class": {name: {"relevant": int(s["relevant_C"][c]),
                             **{g: s["fraction_C"][g][c] for g in GROUPS}}
                      for c, name in enumerate(class_names)},
        "masking": side_by_side,
        "definitions": DEFINITIONS,
        "provenance": {
            "base_stats": str(base.path.resolve()), "adapted_stats": str(adapted.path.resolve()),
            "sae_weights_sha256": sae_sha, "layer": base.meta.get("provenance", {}).get("layer"),
            "base_model": (base.meta.get("image_source") or {}).get("model"),
            "adapted_model": (adapted.meta.get("image_source") or {}).get("model"),
            "masking": {side: {k: v for k, v in m.items() if k != "accuracy"} for side, m in masked.items()},
        },
    }
    results_path, table_path = write_results(cfg.out_dir, record, lines)
    plot_path = None
    if cfg.plots:
        plot_path = write_plot(cfg.out_dir, norm_base_CS, norm_adapted_CS, group_CS, s, class_names,
                               thresholds, cfg.plot_classes)
    return Outputs(out_dir=cfg.out_dir, results_path=results_path, table_path=table_path, plot_path=plot_path,
                   table_lines=tuple(lines), overall=json_safe(s["overall"]), n_classes=len(class_names),
                   d_sae=base.d_sae, seconds=time.perf_counter() - started)


def summary(out: Outputs) -> str:
    lines = [*out.table_lines, f"-> {out.results_path}, {out.table_path}" + (f", {out.plot_path}" if out.plot_path else ""),
             next_steps(f"open {out.plot_path or out.table_path}")]
    return "\n".join(lines)


STAGE = Stage(name="remap", config=Config, run=run, summary=summary,
              reads=("base_dir", "adapted_dir", "base_masking", "adapted_masking"), writes=("out_dir",),
              help="Adaptation analysis: per class, latents high in both models, high->low and low->high (paper Table 1).")
