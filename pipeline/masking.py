"""The masking results folder and the bookkeeping of a masking sweep (SCIENCE.md "Masking experiments").

This module owns the folder `pipeline mask` writes: ``RESULTS_FILE`` (accuracies, baselines,
config, provenance, ``DEFINITIONS``), ``PER_CLASS_FILE`` (correct counts per variant and class)
and ``PLOT_FILE``; the remap stage reads a results file back through ``read_accuracies``. It
also holds the sweep's plan: which latent sets are masked (``top_latents``, ``random_latents``),
the variants run (``plan_variants``) and how their correct counts become accuracies
(``assemble``). The forwards themselves are ``pipeline.sweep``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache import jsonfile
from cache.errors import UserError
from pipeline import scores

ALL = "all"

RESULTS_FILE = "masking.json"
PER_CLASS_FILE = "per_class.csv"
PLOT_FILE = "accuracy_vs_k.png"
OUR_FILES = (RESULTS_FILE, PER_CLASS_FILE, PLOT_FILE)

DEFINITIONS: dict[str, str] = {
    "splice": "at the tap (block index, 0-based, residual output), every token's residual is replaced by the SAE "
              "reconstruction from the masked codes, then the remaining blocks, ln_post, pooling and proj run "
              "as in open_clip",
    "on": "keep only the latents of the set (the image's class's top-k), zero every other latent; "
          "k=all: the full reconstruction",
    "off": "zero the latents of the set, keep the rest; k=all: only b_dec remains at every token",
    "class": "the ground-truth label of the image (paper protocol: the mask uses the label)",
    "top_k": "the k latents with the highest class-level counts (class_counts.npy of the statistics folder) for the "
             "class; ties go to the lower latent index; zero-count latents fill sets larger than the number of "
             "latents the class activates",
    "error_term": "with the error term the tap holds x_hat_masked + (x - x_hat), computed as "
                  "x - (x_hat - x_hat_masked)",
    "random": "per seed and class a uniformly random ordering of all latents; its first k form the set (nested in k); "
              "masked like the top-k sets; mean and sample standard deviation over seeds; at k=all every set is "
              "every latent",
    "sae_all_on": "the SAE spliced with every latent on and no error term",
    "sae_error_term": "the SAE spliced with the error term and nothing masked (equals plain CLIP)",
    "accuracy": "top-1 accuracy over the evaluation images (valid rows not used to fit the probe)",
    "mean_recall": "mean per-class recall (balanced accuracy): the mean over classes of the fraction of the class's "
                   "evaluation images classified correctly, from the same predictions as accuracy",
    "splice_correction": "added to every splice without the error term: none; mean_error, the SAE's mean "
                         "reconstruction error E[x - x_hat] per dimension (raw units); constant:<value> on every "
                         "element (the paper's code splices x_hat - SAE_BIAS, SAE_BIAS = -0.105131256516992)",
    "class_token_only": "the last block is computed for the class-token query alone, the only row the class-token "
                        "pooling reads (equal to the full block up to float rounding)",
}


def parse_k(value: int | str) -> int | str:
    """An int >= 1 or "all"."""
    if isinstance(value, str):
        if value.strip().lower() == ALL:
            return ALL
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"k must be a positive integer or 'all', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"k must be a positive integer or 'all', got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# Latent sets and variants


def top_latents(counts_CS: np.ndarray, k_max: int) -> np.ndarray:
    """``(C, k_max)`` latents by descending class count, ties to the lower latent index."""
    out = np.empty((counts_CS.shape[0], k_max), np.int64)
    for c in range(counts_CS.shape[0]):
        out[c] = np.argsort(-np.asarray(counts_CS[c], np.int64), kind="stable")[:k_max]
    return out


def random_latents(n_seeds: int, n_classes: int, d_sae: int, k_max: int, seed: int) -> np.ndarray:
    """``(n_seeds, C, k_max)``: per seed and class, the first k_max of a random ordering of the latents."""
    out = np.empty((n_seeds, n_classes, k_max), np.int64)
    for s in range(n_seeds):
        rng = np.random.default_rng([seed, s])
        for c in range(n_classes):
            out[s, c] = rng.permutation(d_sae)[:k_max]
    return out


@dataclasses.dataclass(frozen=True)
class Variant:
    """One masked forward of the sweep."""

    key: str
    family: str  # baseline, topk, random
    mode: str
    k: int | str | None  # None for baselines
    seed: int | None
    error_term: bool


def plan_variants(modes: Sequence[str], ks: Sequence[int | str], n_seeds: int, error_term: bool) -> list[Variant]:
    """The baselines, then every (mode, k), then every (seed, mode, finite k): the rows of the sweep."""
    variants = [Variant("sae_error_term", "baseline", "on", ALL, None, True),
                Variant("sae_all_on", "baseline", "on", ALL, None, False)]
    for mode in modes:
        for k in ks:
            variants.append(Variant(f"{mode}/k={k}", "topk", mode, k, None, error_term))
    for seed in range(n_seeds):
        for mode in modes:
            for k in ks:
                if k != ALL:  # at k=all the random set is every latent: same as the top-k row
                    variants.append(Variant(f"random_{mode}/k={k}/seed={seed}", "random", mode, k, seed,
                                            error_term))
    return variants


def assemble(modes: Sequence[str], ks: Sequence[int | str], n_seeds: int, variants: list[Variant],
             correct_MC: np.ndarray, totals_C: np.ndarray, clip_correct_C: np.ndarray, chance: float) -> dict[str, Any]:
    """Accuracies and mean per-class recalls of every variant (random sets: mean and sample std over seeds),
    and the per-seed accuracies."""
    accuracy, per_seed = _table(modes, ks, n_seeds, variants, [scores.accuracy(c, totals_C) for c in correct_MC],
                                scores.accuracy(clip_correct_C, totals_C), chance)
    recall, _ = _table(modes, ks, n_seeds, variants, [scores.mean_recall(c, totals_C) for c in correct_MC],
                       scores.mean_recall(clip_correct_C, totals_C), None)
    return {"accuracy": accuracy, "mean_recall": recall, "random_per_seed": per_seed}


def _table(modes: Sequence[str], ks: Sequence[int | str], n_seeds: int, variants: list[Variant],
           score_M: list[float], clip: float, chance: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One score of every variant as a results table (baselines, mode -> k, random_<mode> -> k -> mean/std)
    and the random sets' per-seed values."""
    by_key = dict(zip((v.key for v in variants), score_M))
    table: dict[str, Any] = {"clip": clip, "sae_all_on": by_key["sae_all_on"],
                             "sae_error_term": by_key["sae_error_term"]}
    if chance is not None:
        table["chance"] = chance
    for mode in modes:
        table[mode] = {str(k): by_key[f"{mode}/k={k}"] for k in ks}
    per_seed: dict[str, dict[str, list[float]]] = {}
    if n_seeds:
        for mode in modes:
            per_seed[mode] = {}
            table[f"random_{mode}"] = {}
            for k in ks:
                vals = ([by_key[f"{mode}/k={k}"]] * n_seeds if k == ALL else
                        [by_key[f"random_{mode}/k={k}/seed={s}"] for s in range(n_seeds)])
                per_seed[mode][str(k)] = vals
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                table[f"random_{mode}"][str(k)] = {"mean": float(np.mean(vals)), "std": std}
    return table, per_seed


# ---------------------------------------------------------------------------------------
# The results folder


def write_results(out_dir: Path, record: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(jsonfile.dumps(record))
    return out_dir / RESULTS_FILE


def write_per_class(out_dir: Path, variants: list[Variant], correct_MC: np.ndarray, totals_C: np.ndarray,
                    clip_correct_C: np.ndarray, class_names: list[str]) -> Path:
    """One row per (variant, class), plain CLIP first."""
    with open(out_dir / PER_CLASS_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "family", "mode", "k", "seed", "error_term", "class_index", "class_name", "n_images",
                    "n_correct", "accuracy"])
        rows = [("clip", "baseline", "", "", "", "", clip_correct_C)]
        rows += [(v.key, v.family, v.mode, v.k, "" if v.seed is None else v.seed, v.error_term, correct_MC[i])
                 for i, v in enumerate(variants)]
        for key, family, mode, k, seed, err, correct_C in rows:
            for c, name in enumerate(class_names):
                n = int(totals_C[c])
                acc = "" if n == 0 else f"{correct_C[c] / n:.6g}"
                w.writerow([key, family, mode, k, seed, err, c, name, n, int(correct_C[c]), acc])
    return out_dir / PER_CLASS_FILE


def write_plot(out_dir: Path, modes: Sequence[str], ks: Sequence[int | str], n_seeds: int, acc: dict[str, Any],
               d_sae: int, chance: float, *, title: str, recall: dict[str, Any] | None = None) -> Path:
    """Accuracy against k per mode, beside the random sets, the baselines and (dotted) the top-k sets' mean
    per-class recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [d_sae if k == ALL else k for k in ks]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    colours = {"on": "tab:blue", "off": "tab:red"}
    for mode in modes:
        ys = [acc[mode][str(k)] for k in ks]
        ax.plot(xs, ys, marker="o", color=colours[mode], label=f'"{mode}": class top-k latents')
        if recall is not None:
            ax.plot(xs, [recall[mode][str(k)] for k in ks], ls=":", marker="x", color=colours[mode], alpha=0.8,
                    label=f'"{mode}": top-k, mean per-class recall')
        if n_seeds:
            r = acc[f"random_{mode}"]
            mean = np.array([r[str(k)]["mean"] for k in ks])
            std = np.array([r[str(k)]["std"] for k in ks])
            ax.plot(xs, mean, ls="--", marker=".", color=colours[mode], alpha=0.7,
                    label=f'"{mode}": random latents ({n_seeds} seeds, ±1 sd)')
            ax.fill_between(xs, mean - std, mean + std, color=colours[mode], alpha=0.12)
    ax.axhline(acc["clip"], color="k", lw=1, label=f"plain CLIP ({acc['clip']:.3f})")
    ax.axhline(acc["sae_all_on"], color="tab:gray", lw=1, ls=":",
               label=f"SAE, all latents on ({acc['sae_all_on']:.3f})")
    ax.axhline(chance, color="tab:gray", lw=0.8, ls="-.", label=f"chance ({chance:.3f})")
    if len(set(xs)) > 1:
        ax.set_xscale("log")
    ax.set_xticks(xs, [("all" if k == ALL else str(k)) for k in ks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("k (latents in the class's set; ground-truth class)")
    ax.set_ylabel("top-1 accuracy" + (" / mean per-class recall" if recall is not None else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILE, dpi=110)
    plt.close(fig)
    return out_dir / PLOT_FILE


def results_file(path: Path) -> Path:
    """The results file of a masking folder, or ``path`` itself when it is not a folder."""
    return path / RESULTS_FILE if path.is_dir() else path


def read_accuracies(path: Path, sae_sha: str, class_names: list[str], side: str) -> dict[str, Any]:
    """The accuracies of one results file, flattened (``on_k10``, ``random_on_k10``, ...; mean per-class recalls
    as ``mean_recall_on_k10``, ...), after checks that
    it masked the SAE of weights ``sae_sha`` on ``class_names`` (``side`` names the model in messages)."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the masking.json (or folder) written by `pipeline mask` "
                        f"for the {side} model")
    try:
        record = json.loads(path.read_text())
        accuracy = record["accuracy"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a masking.json of `pipeline mask` (no accuracy table)") from None
    sha = (record.get("provenance") or {}).get("sae_weights_sha256")
    if sha != sae_sha:
        raise UserError(f"the {side} masking {path} used another SAE (weights {str(sha)[:12]}, the statistics' SAE is "
                        f"{sae_sha[:12]}); mask the {side} model with the base model's SAE")
    if record.get("class_names") is not None and list(record["class_names"]) != class_names:
        raise UserError(f"the {side} masking {path} was evaluated on other classes than the statistics; mask the "
                        "same dataset")
    flat = _flatten(accuracy, "")
    flat.update(_flatten(record.get("mean_recall") or {}, "mean_recall_"))  # absent before mean recall was reported
    return {"path": str(path.resolve()), "accuracy": flat, "n_images": record.get("n_images"),
            "config": record.get("config")}


def _flatten(table: dict[str, Any], prefix: str) -> dict[str, float]:
    """A results table as flat keys: ``clip``, ``on_k10``, ``random_on_k10`` and ``random_on_k10_std``."""
    flat: dict[str, float] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, dict):
                    flat[f"{prefix}{key}_k{k}"] = v["mean"]
                    flat[f"{prefix}{key}_k{k}_std"] = v["std"]
                else:
                    flat[f"{prefix}{key}_k{k}"] = v
        else:
            flat[f"{prefix}{key}"] = value
    return flat
