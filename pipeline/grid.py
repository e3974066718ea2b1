"""The interpretability grid: SAEs of one block trained from one activation store at several sparsities,
widths and architectures, each scored the same way, so a sparsity and width can be chosen by what the
latents find rather than by reconstruction alone. Definitions (copied into ``grid.json``):

- setting: one SAE, named ``<arch>-x<expansion>-l1<λ>`` (relu) or ``<arch>-x<expansion>-k<k>``.
- fvu, l0: on every token of the evaluation store's valid images, raw units:
  sum |x - x̂|² / sum |x - mean x|², and the mean number of nonzero latents per token.
- dead_fraction: share of latents that are zero on every one of those tokens.
- n_values, n_covered, coverage: attribute values with a defined AUROC, those with a dedicated latent
  (best AUROC >= the threshold), and their ratio (``pipeline.groundtruth``); shapes_covered: of the
  shape values, those covered.
- mean_iou, mean_pointing: over the covered object values, their dedicated latent's IoU and pointing;
  mean_purity: over every covered value, its dedicated latent's purity.
- drop_top, drop_random: the SAE-spliced accuracy with every latent on, minus the accuracy with each
  class's top-k latents zeroed (``pipeline.masking``), and with k random latents zeroed (mean over seeds).
- sane: the paper's sanity check, L0 < 50 with FVU <= 0.15.
- pareto: no other setting has FVU and L0 both at most this one's, one of them lower.
- verdict of a value at a setting: ``covered``; ``SAE's miss`` when the block's linear probe reads it
  (``pipeline.blockprobe``) but no latent covers it; ``model's miss`` when neither does.
  sae_misses, model_misses count them.
- ceiling of a value: its one-token ceiling (``pipeline.groundtruth``), the AUROC of the detector that is
  on exactly at the patches showing it; the same at every setting (it depends on the evaluation images
  only). A value whose ceiling is below the threshold is out of reach of a latent that fires where the
  value is seen, so its "SAE's miss" is a limit of one-token latents rather than of one SAE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write
from cache.errors import UserError

SANE_L0, SANE_FVU = 50.0, 0.15
COVERED, SAE_MISS, MODEL_MISS = "covered", "SAE's miss", "model's miss"
GT_COLUMNS = ("n_values", "n_covered", "coverage", "shapes_covered", "n_shapes", "mean_iou", "mean_pointing",
              "mean_purity", "sae_misses", "model_misses")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One SAE of the grid: its architecture, width and sparsity (l1 for relu, k for the others)."""

    arch: str
    expansion: float
    l1: float | None = None
    k: int | None = None

    @property
    def name(self) -> str:
        sparsity = f"l1{self.l1:g}" if self.arch == "relu" else f"k{self.k}"
        return f"{self.arch}-x{self.expansion:g}-{sparsity}"


def settings(archs: Sequence[str], expansions: Sequence[float], l1s: Sequence[float],
             ks: Sequence[int]) -> list[Setting]:
    """Every architecture × expansion × its own sparsity knob: relu takes the l1s, topk/batchtopk the ks."""
    if not archs or not expansions:
        raise UserError("the grid is empty: give at least one --archs and one --expansions")
    out = []
    for arch in archs:
        knobs = l1s if arch == "relu" else ks
        if not knobs:
            raise UserError(f"--archs {arch} needs {'--l1s' if arch == 'relu' else '--ks'} (its sparsity values)")
        for expansion in expansions:
            for x in knobs:
                out.append(Setting(arch, float(expansion), l1=float(x)) if arch == "relu"
                           else Setting(arch, float(expansion), k=int(x)))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise UserError(f"the grid repeats a setting ({', '.join(n for n in names if names.count(n) > 1)}); "
                        "list each value once")
    return out


def pareto(fvu: np.ndarray, l0: np.ndarray) -> np.ndarray:
    """True where no other setting is at least as good on both FVU and L0 and better on one."""
    fvu, l0 = np.asarray(fvu, float), np.asarray(l0, float)
    no_worse = (fvu[None, :] <= fvu[:, None]) & (l0[None, :] <= l0[:, None])
    better = (fvu[None, :] < fvu[:, None]) | (l0[None, :] < l0[:, None])
    return ~(no_worse & better).any(axis=1)


def verdicts(covered: np.ndarray, readable: np.ndarray) -> np.ndarray:
    """Per value: covered, the SAE's miss (the probe reads it) or the model's miss (it does not)."""
    return np.where(covered, COVERED, np.where(readable, SAE_MISS, MODEL_MISS))


def tables(frame, values) -> list[tuple[list[str], list[list[str]]]]:
    """The grid as text cells: one row per setting; then, with ground truth, one row per value with its
    verdict at each setting. The markdown file and the page show the same cells."""
    gt = values is not None and len(values) > 0
    head = ["setting", "d_sae", "FVU", "L0", "dead", "drop top-k", "drop random"]
    if gt:
        head[5:5] = ["covered", "shapes", "IoU", "pointing", "purity", "SAE's misses", "model's misses"]
    rows = []
    for r in frame.itertuples():
        mark = (" ✓" if r.sane else "") + (" ◆" if r.pareto else "")
        cells = [f"{r.setting}{mark}", f"{r.d_sae:,}", f"{r.fvu:.3f}", f"{r.l0:.1f}", f"{r.dead_fraction:.2f}",
                 f"{r.drop_top:+.3f}", f"{r.drop_random:+.3f}"]
        if gt:
            cells[5:5] = [f"{r.n_covered}/{r.n_values}", f"{r.shapes_covered}/{r.n_shapes}", _maybe(r.mean_iou),
                          _maybe(r.mean_pointing), _maybe(r.mean_purity), str(r.sae_misses), str(r.model_misses)]
        rows.append(cells)
    out = [(head, rows)]
    if gt:
        by = values.set_index(["setting", "attribute", "value"])
        names = list(frame["setting"])
        value_rows = []
        first = values.drop_duplicates(["attribute", "value"])
        for attribute, value, probe, ceiling in zip(first["attribute"], first["value"], first["probe_auroc"],
                                                    first["ceiling"]):
            cells = [f"{attribute}={value}", _maybe(probe), _maybe(ceiling)]
            for name in names:
                auroc, verdict = by.loc[(name, attribute, value), ["auroc", "verdict"]]
                cells.append(f"{_maybe(auroc)} {'' if verdict == COVERED else verdict}".strip())
            value_rows.append(cells)
        out.append((["value", "probe AUROC", "one-token ceiling", *names], value_rows))
    return out


LEGEND = "✓ passes the sanity check (L0 < 50, FVU <= 0.15); ◆ on the FVU-L0 Pareto front."


def markdown(frame, values) -> str:
    """The grid's tables in markdown, the legend after the first."""
    parts = []
    for i, (head, rows) in enumerate(tables(frame, values)):
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        parts.append("\n".join(lines) + ("\n\n" + LEGEND if i == 0 else ""))
    return "\n\n".join(parts) + "\n"


def _maybe(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def plot(path: Path, frame) -> None:
    """FVU against L0 per setting (both log), coloured by ground-truth coverage (grey without it), one marker per
    arch; the Pareto front's settings are named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_gt = "coverage" in frame.columns
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(sorted(set(frame["arch"])), "os^Dv"))
    image = None
    for arch, part in frame.groupby("arch"):
        colour = dict(c=part["coverage"].astype(float), cmap="viridis", vmin=0, vmax=1) if has_gt else \
            dict(color="tab:grey")
        image = ax.scatter(part["l0"], part["fvu"], marker=markers[arch], s=60, edgecolors="black", linewidths=0.6,
                           label=arch, **colour)
    front = frame[frame["pareto"]].sort_values("l0")
    ax.plot(front["l0"], front["fvu"], color="black", lw=0.8, ls="--", label="Pareto front")
    for r in front.itertuples():  # the others are in the table; naming them all would pile labels up
        ax.annotate(r.setting, (r.l0, r.fvu), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.axvline(SANE_L0, color="tab:red", lw=0.6, ls=":")
    ax.axhline(SANE_FVU, color="tab:red", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # plain numbers, not powers of ten
    for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # FVU spans less than a decade
        formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("L0 (active latents per token, log)")
    ax.set_ylabel("FVU (log)")
    ax.set_title("SAE settings: reconstruction against sparsity (dotted: the paper's sanity check)", fontsize=9)
    if has_gt and image is not None:
        fig.colorbar(image, ax=ax, label="ground-truth coverage")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
