"""The remap maths and the remap results folder (SCIENCE.md "Adaptation analysis (MaPLe)", the paper's Table 1).

Both statistics folders come from the same SAE (same weights, latents, layer and count threshold)
applied to a base model and to its adapted version on the same classes; ``check_pair`` refuses
anything else, because latent j of one SAE means nothing in another.

The paper does not fully specify its grouping rule; this is the one used here (``DEFINITIONS``):

1. counts[c, j]: the class-level count of each model (``class_counts.npy``: tokens of the valid
   images of class c with f_j > the stats threshold).
2. Normalised per class and model, so that base and adapted are on one scale:
   ``max`` (default): v[c, j] = counts[c, j] / max over j' of counts[c, j'] (the class's most counted
   latent is 1); ``tokens``: v[c, j] = counts[c, j] / (images of class c x tokens per image), the
   fraction of the class's tokens on which latent j is above the threshold (tokens per image of
   each model's own store: an adapted store that keeps MaPLe's prompt tokens counts them too, as
   the paper's reference, so its T is the base T + n_ctx). A class without counts has v = 0.
3. high: v >= tau_high; low: v <= tau_low (0 <= tau_low < tau_high <= 1).
4. A latent is relevant for class c when it is high in either model. Each relevant latent is in
   exactly one group: high->high (high in both), high->low (high in base, low in adapted),
   low->high (low in base, high in adapted), or partial (high in one, between the thresholds in
   the other). Latents low or in between in both models are not counted.
5. Per class: the latents of each group and their fraction of the class's relevant latents
   (empty when the class has none). Dataset level: the pooled fraction (sum over classes of a
   group's latents / sum of relevant latents) and the mean number of latents per class.

Optionally the masking results of the base model and of the adapted model, both spliced with
this SAE, are shown side by side (``masking_side_by_side``).

The results folder (written by `pipeline remap`, read by the concept-addition experiment):
``RESULTS_FILE`` (record with thresholds, overall and per-class fractions, definitions,
provenance), ``TABLE_FILE`` (the per-class table as Markdown) and ``PLOT_FILE``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cache import jsonfile
from cache.errors import UserError
from pipeline.latents import META_FILE, LatentStats

NORMALISATIONS = ("max", "tokens")
GROUPS = ("high_high", "high_low", "low_high", "partial")  # codes 1..4 in group_CS; 0 = not relevant
GROUP_LABELS = {"high_high": "high->high", "high_low": "high->low", "low_high": "low->high", "partial": "partial"}

RESULTS_FILE = "remap.json"
TABLE_FILE = "remap_table.md"
PLOT_FILE = "remap.png"


DEFINITIONS: dict[str, str] = {
    "counts": "counts[c, j] = tokens of the valid images of class c with f_j > the stats threshold "
              "(class_counts.npy of each statistics folder; one SAE, one threshold)",
    "normalise_max": "v[c, j] = counts[c, j] / max_j' counts[c, j'], per class and model (the class's most counted "
                     "latent is 1; 0 for a class without counts)",
    "normalise_tokens": "v[c, j] = counts[c, j] / (images of class c x tokens per image): the fraction of the class's "
                        "tokens on which latent j is above the threshold (tokens per image of that model's store: "
                        "an adapted store's kept prompt tokens count)",
    "high_low": "high: v >= tau_high; low: v <= tau_low",
    "relevant": "latent j is relevant for class c when it is high in the base or in the adapted model",
    "groups": "each relevant latent is in one group: high->high (high in both), high->low (high in base, low in "
              "adapted), low->high (low in base, high in adapted), partial (high in one, between the thresholds in "
              "the other)",
    "per_class": "fraction of a group = the class's latents in the group / the class's relevant latents "
                 "(empty when it has none)",
    "overall": "fraction = sum over classes of a group's latents / sum over classes of relevant latents; "
               "latents_per_class = mean over all classes of the latents in the group",
    "masking": "accuracies from masking.json of `pipeline mask`, base and adapted model, both with this SAE; "
               "difference = adapted - base",
}


# ---------------------------------------------------------------------------------------
# The grouping (pure functions of the count arrays)


def normalise_counts(counts_CS: np.ndarray, images_C: np.ndarray, n_tokens: int, how: str) -> np.ndarray:
    """``(C, S)`` float64 normalised counts (see ``DEFINITIONS``); 0 for a class without counts."""
    counts_CS = np.asarray(counts_CS, np.float64)
    if how == "max":
        den_C = counts_CS.max(1)
    elif how == "tokens":
        den_C = np.asarray(images_C, np.float64) * n_tokens
    else:
        raise ValueError(f"unknown normalisation {how!r}")
    return np.divide(counts_CS, den_C[:, None], out=np.zeros_like(counts_CS), where=den_C[:, None] > 0)


def group_latents(base_CS: np.ndarray, adapted_CS: np.ndarray, tau_high: float, tau_low: float) -> np.ndarray:
    """``(C, S)`` int8 group codes: 0 not relevant, then 1 + the index in ``GROUPS``."""
    high_b, high_a = base_CS >= tau_high, adapted_CS >= tau_high
    low_b, low_a = base_CS <= tau_low, adapted_CS <= tau_low
    group_CS = np.zeros(base_CS.shape, np.int8)
    group_CS[high_b | high_a] = 1 + GROUPS.index("partial")
    group_CS[high_b & high_a] = 1 + GROUPS.index("high_high")
    group_CS[high_b & low_a] = 1 + GROUPS.index("high_low")
    group_CS[low_b & high_a] = 1 + GROUPS.index("low_high")
    return group_CS


def summarise(group_CS: np.ndarray) -> dict[str, Any]:
    """Per-class and pooled group counts and fractions of a ``group_latents`` result (per group: ``(C,)``)."""
    n_C = {g: (group_CS == 1 + i).sum(1) for i, g in enumerate(GROUPS)}
    relevant_C = sum(n_C.values())
    fraction_C = {g: np.where(relevant_C > 0, n / np.maximum(relevant_C, 1), np.nan) for g, n in n_C.items()}
    total = int(relevant_C.sum())
    n_classes = max(len(relevant_C), 1)
    return {
        "n_C": n_C, "relevant_C": relevant_C, "fraction_C": fraction_C,
        "overall": {g: (n.sum() / total if total else None) for g, n in n_C.items()},
        "latents_per_class": {"relevant": relevant_C.sum() / n_classes,
                              **{g: n.sum() / n_classes for g, n in n_C.items()}},
        "n_relevant": total,
    }


def normalised(stats: LatentStats, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised counts (C, S), valid images per class (C,)) of one statistics folder."""
    n_classes = len(stats.class_names)
    images_C = np.asarray(stats.meta.get("images_per_class") or np.zeros(n_classes), np.int64)
    n_tokens = int((stats.meta.get("token_layout") or {}).get("n_tokens") or 0)
    if how == "tokens" and (n_tokens < 1 or len(images_C) != n_classes):
        raise UserError(f"{stats.path} does not record its images per class and tokens per image; rerun "
                        "`pipeline stats` or use normalise=max")
    return normalise_counts(np.asarray(stats.class_counts()), images_C, n_tokens, how), images_C


# ---------------------------------------------------------------------------------------
# Refusals and the masking comparison


def sae_of(stats: LatentStats) -> str:
    """The sha256 of the SAE weights a statistics folder was computed with."""
    sha = (stats.meta.get("provenance") or {}).get("sae_weights_sha256")
    if not sha:
        raise UserError(f"{stats.path} does not say which SAE its codes came from (no sae_weights_sha256 in its "
                        f"{META_FILE}); rerun `pipeline encode` and `pipeline stats`")
    return str(sha)


def check_pair(base: LatentStats, adapted: LatentStats) -> None:
    """Refuse statistics that cannot be compared latent by latent and class by class."""
    if base.d_sae != adapted.d_sae:
        raise UserError(f"{base.path} has {base.d_sae} latents but {adapted.path} has {adapted.d_sae}: they come from "
                        "different SAEs; compute both statistics with the same SAE")
    sha_b, sha_a = sae_of(base), sae_of(adapted)
    if sha_b != sha_a:
        raise UserError(f"{base.path} and {adapted.path} come from different SAEs (weights {sha_b[:12]} vs "
                        f"{sha_a[:12]}); encode the adapted model's activations with the base model's SAE")
    layer_b, layer_a = (s.meta.get("provenance", {}).get("layer") for s in (base, adapted))
    if layer_b != layer_a:
        raise UserError(f"{base.path} was computed at layer {layer_b} but {adapted.path} at layer {layer_a}; "
                        "use statistics of the same layer")
    if base.class_names != adapted.class_names:
        only = sorted(set(base.class_names) ^ set(adapted.class_names))
        detail = f"e.g. '{only[0]}' is in one only" if only else "same names in another order"
        raise UserError(f"{base.path} and {adapted.path} have different classes ({len(base.class_names)} vs "
                        f"{len(adapted.class_names)}, {detail}); compute both on the same dataset")
    t_b, t_a = (s.meta.get("config", {}).get("threshold") for s in (base, adapted))
    if t_b != t_a:
        raise UserError(f"{base.path} counts tokens with f > {t_b} but {adapted.path} with f > {t_a}; rerun "
                        "`pipeline stats` with one --threshold")


def masking_side_by_side(base: dict[str, Any] | None, adapted: dict[str, Any] | None) -> dict[str, Any]:
    """``{"base": {...}, "adapted": {...}, "difference": {...}}`` over the accuracies each side has."""
    out: dict[str, Any] = {}
    if base is not None:
        out["base"] = base["accuracy"]
    if adapted is not None:
        out["adapted"] = adapted["accuracy"]
    if base is not None and adapted is not None:
        out["difference"] = {k: adapted["accuracy"][k] - v for k, v in base["accuracy"].items()
                             if k in adapted["accuracy"] and not k.endswith("_std") and v is not None
                             and adapted["accuracy"][k] is not None}
    return out


# ---------------------------------------------------------------------------------------
# The table


def percent(value: float | None) -> str:
    """A fraction as '12.3%'; 'n/a' when undefined."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def table_lines(class_names: list[str], s: dict[str, Any], thresholds: dict[str, Any], images_base: np.ndarray,
                images_adapted: np.ndarray, masking: dict[str, Any]) -> list[str]:
    """The per-class table as Markdown, with the thresholds above it (what the CLI prints)."""
    norm = ("the class's most counted latent" if thresholds["normalise"] == "max"
            else "the class's tokens (images x tokens per image)")
    lines = [f"thresholds: high = normalised count >= {thresholds['tau_high']}, low = <= {thresholds['tau_low']}; "
             f"counts of tokens with f > {thresholds['count_threshold']}, normalised by {norm}",
             "cells: fraction of the class's relevant latents (high in base or adapted), latent count in brackets",
             "",
             "| class | images base/adapted | relevant | " + " | ".join(GROUP_LABELS[g] for g in GROUPS) + " |",
             "|---|---|---:|" + "---:|" * len(GROUPS)]
    for c, name in enumerate(class_names):
        n_b = int(images_base[c]) if c < len(images_base) else 0
        n_a = int(images_adapted[c]) if c < len(images_adapted) else 0
        cells = [f"{percent(s['fraction_C'][g][c])} ({int(s['n_C'][g][c])})" for g in GROUPS]
        lines.append(f"| {name} | {n_b}/{n_a} | {int(s['relevant_C'][c])} | " + " | ".join(cells) + " |")
    pooled = [f"{percent(s['overall'][g])} ({int(s['n_C'][g].sum())})" for g in GROUPS]
    lines.append(f"| **all classes** | {int(np.sum(images_base))}/{int(np.sum(images_adapted))} | "
                 f"{s['n_relevant']} | " + " | ".join(pooled) + " |")
    per = s["latents_per_class"]
    lines.append(f"| latents per class | | {per['relevant']:.2f} | "
                 + " | ".join(f"{per[g]:.2f}" for g in GROUPS) + " |")
    if masking:
        sides = [side for side in ("base", "adapted", "difference") if side in masking]
        keys = list(dict.fromkeys(k for side in sides for k in masking[side] if not k.endswith("_std")))
        lines += ["", "masking accuracy with the base model's SAE:", "",
                  "| accuracy | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
        for key in keys:
            cells = [masking[side].get(key) for side in sides]
            lines.append(f"| {key} | " + " | ".join("n/a" if v is None else f"{v:+.4f}" if side == "difference"
                                                    else f"{v:.4f}" for side, v in zip(sides, cells)) + " |")
    return lines


# ---------------------------------------------------------------------------------------
# The results folder


def results_path(out_dir: Path) -> Path:
    return out_dir / RESULTS_FILE


def read_results(out_dir: Path) -> dict[str, Any]:
    return json.loads(results_path(out_dir).read_text())


def write_results(out_dir: Path, record: dict[str, Any], lines: list[str]) -> tuple[Path, Path]:
    """The record and the table; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path(out_dir).write_text(jsonfile.dumps(record))
    (out_dir / TABLE_FILE).write_text("\n".join(lines) + "\n")
    return results_path(out_dir), out_dir / TABLE_FILE


COLOURS = {"high_high": "tab:green", "high_low": "tab:red", "low_high": "tab:blue", "partial": "tab:orange"}


def write_plot(out_dir: Path, base_CS: np.ndarray, adapted_CS: np.ndarray, group_CS: np.ndarray, s: dict[str, Any],
               class_names: list[str], thresholds: dict[str, Any], plot_classes: int) -> Path:
    """(class, latent) pairs of both normalised counts by group, and the group fractions per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_show = min(len(class_names), plot_classes)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, max(4.8, 0.28 * (n_show + 2) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.2]})
    shown = np.maximum(base_CS, adapted_CS) > thresholds["tau_low"]  # low in both: the empty corner, not drawn
    mid = shown & (group_CS == 0)
    if mid.any():
        ax.scatter(base_CS[mid], adapted_CS[mid], s=5, c="0.7", alpha=0.6, label="between (not relevant)")
    for i, g in enumerate(GROUPS):
        at = group_CS == 1 + i
        if at.any():
            ax.scatter(base_CS[at], adapted_CS[at], s=7, c=COLOURS[g], alpha=0.7,
                       label=f"{GROUP_LABELS[g]} ({int(at.sum())})")
    for tau, style in ((thresholds["tau_high"], "--"), (thresholds["tau_low"], ":")):
        ax.axvline(tau, color="k", ls=style, lw=0.8)
        ax.axhline(tau, color="k", ls=style, lw=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"base: normalised class count (by {thresholds['normalise']})")
    ax.set_ylabel("adapted: normalised class count")
    ax.set_title(f"(class, latent) pairs; tau_high {thresholds['tau_high']} (--), tau_low {thresholds['tau_low']} (:)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax.grid(alpha=0.3)

    labels = ["all classes"] + [n[:24] for n in class_names[:n_show]]
    y = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    for g in GROUPS:  # one bar per row: all classes, then each shown class; no relevant latents: empty
        overall = np.nan if s["overall"][g] is None else s["overall"][g]
        widths = np.nan_to_num(np.r_[overall, s["fraction_C"][g][:n_show]])
        bars.barh(y, widths, left=left, color=COLOURS[g], label=GROUP_LABELS[g])
        left += widths
    bars.set_yticks(y, labels, fontsize=7)
    bars.set_xlim(0, 1)
    bars.set_xlabel("fraction of the class's relevant latents")
    more = f" (first {n_show} of {len(class_names)} classes)" if n_show < len(class_names) else ""
    bars.set_title(f"groups per class{more}", fontsize=9)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILE, dpi=110)
    plt.close(fig)
    return out_dir / PLOT_FILE
