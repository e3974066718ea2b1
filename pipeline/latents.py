"""The statistics folder written by ``pipeline stats``: file names, definitions, a reader and the writers.

The stats stage writes it; the report, mask, remap and ground-truth stages and ``pipeline
show-latent`` read it. All go through this module: it alone spells the folder's file names.

Files (``S`` latents, ``K`` reference slots, ``C`` classes, ``H, W`` the patch grid):

- ``latents.parquet``: one row per latent (columns: ``LATENT_COLUMNS``); values that do not
  exist (the mean activation of a dead latent, ...) are nulls, never 0 or NaN.
- ``references.zarr``: ``score`` (S, K) float64, ``image_index`` (S, K) int64,
  ``image_id`` (S, K) str, ``label`` (S, K) int64, ``maps`` (S, K, H, W) float32. Empty slots
  hold score -inf, image index -1, label -1, id "" and a zero map.
- ``class_counts.npy`` (C, S) int64 and ``class_names.json``.
- ``summary.json``: metrics for DVC plus the config and provenance.
- ``meta.json``: provenance, how to re-open the images, token layout, definitions.
  Written last: a folder without it is incomplete.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cache import jsonfile, schema
from cache.errors import UserError
from pipeline import runfiles

if TYPE_CHECKING:
    from cache.store import ActivationStore

STATS_FORMAT_VERSION = 1

LATENTS_FILE = "latents.parquet"
REFERENCES_DIR = "references.zarr"
CLASS_COUNTS_FILE = "class_counts.npy"
CLASS_NAMES_FILE = "class_names.json"
SUMMARY_FILE = "summary.json"
META_FILE = "meta.json"
PLOT_SCATTER = "frequency_vs_activation.png"
PLOT_HISTOGRAMS = "histograms.png"
PLOT_CLASS_TOP = "class_top_latents.png"

REFERENCE_ARRAYS = ("score", "image_index", "image_id", "label", "maps")

LATENT_COLUMNS = (
    "latent", "frequency", "mean_activation", "n_active_images", "dead", "label_entropy", "label_std",
    "top_class", "top_class_name", "top_class_share", "n_references",
    "frequency_cls", "mean_activation_cls", "frequency_max_patch", "mean_activation_max_patch",
    "n_tokens_above_threshold",
)

DEFINITIONS: dict[str, str] = {
    "image_activation": "a_ij = mean of f_j over all T tokens of image i (class token, any registers, the "
                        "patches and an adapted model's kept vision prompt tokens, as the paper's reference); "
                        "variants: f_j on the class token alone (cls) and the maximum of f_j over the patch "
                        "tokens (max_patch; prompt tokens are no patches)",
    "frequency": "fraction of the valid images with a_ij > 0 (likewise for the variants)",
    "mean_activation": "mean of a_ij over the valid images with a_ij > 0; empty for latents that never fire",
    "dead": "a_ij = 0 on every valid image (no token of any image activates the latent)",
    "references": "the top-k valid images by a_ij, ties broken by lower image index; unused slots hold "
                  "score -inf and image index -1, so rare latents have fewer references and dead ones none",
    "maps": "f_j on each patch token of a reference image, laid out on the patch grid (row-major)",
    "label_entropy": "entropy in nats of p_c = sum of a_ij over the references of class c / sum of a_ij over "
                     "all references (activation-weighted class distribution of the top-k references); "
                     "0 = one class, ln(C) = uniform",
    "label_std": "sqrt(sum_c p_c (1 - p_c)) = sqrt(1 - sum_c p_c^2) with p_c as for label_entropy: the "
                 "standard deviation of the one-hot class label of a reference drawn with probability "
                 "proportional to its activation (square root of the total variance of the one-hot vector). "
                 "0 when every reference has one class, at most sqrt(1 - 1/C); its square is the chance "
                 "that two such draws have different classes",
    "top_class": "the class with the largest p_c (ties: the class of the higher-ranked reference); "
                 "top_class_share is that p_c",
    "class_counts": "counts[c, j] = number of tokens (all T tokens, kept prompt tokens too) of the valid images of "
                    "class c with f_j > threshold (compared in the codes' float32 precision: a stored 0.2 is not above 0.2)",
}


def quantiles(values: np.ndarray, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float | None]:
    """Quantiles of the finite values as ``{"q05": ...}``; None when there are none (JSON null)."""
    finite = values[np.isfinite(values)]
    return {f"q{round(q * 100):02d}": (float(np.quantile(finite, q)) if len(finite) else None) for q in qs}


def json_safe(value: Any) -> Any:
    """NaN/inf floats become None so that the JSON is valid and 'missing' is explicit."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class LatentStats:
    """Read access to a statistics folder."""

    def __init__(self, stats_dir: Path | str):
        self.path = Path(stats_dir)
        self.meta: dict[str, Any] = runfiles.read_record(
            self.path, META_FILE, version_key="stats_format_version", version=STATS_FORMAT_VERSION,
            what="statistics", command="pipeline stats")
        self.summary: dict[str, Any] = json.loads((self.path / SUMMARY_FILE).read_text())
        self.class_names: list[str] = json.loads((self.path / CLASS_NAMES_FILE).read_text())
        self._table = None
        self._refs = None

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.meta["patch_grid"]
        return int(h), int(w)

    @property
    def table(self):
        """The per-latent table as a pandas DataFrame (nullable dtypes keep 'missing' explicit)."""
        if self._table is None:
            import pyarrow.parquet as pq

            self._table = pq.read_table(self.path / LATENTS_FILE).to_pandas(types_mapper=_nullable)
        return self._table

    def check_latent(self, j: int) -> int:
        if not 0 <= j < self.d_sae:
            raise UserError(f"latent {j} does not exist: the SAE has latents 0..{self.d_sae - 1}")
        return int(j)

    def row(self, j: int) -> dict[str, Any]:
        """Latent ``j``'s row; missing values are None."""
        j = self.check_latent(j)
        rec = self.table.iloc[j].to_dict()
        return {k: (None if _is_missing(v) else v) for k, v in rec.items()}

    def references(self, j: int) -> dict[str, np.ndarray]:
        """Latent ``j``'s references (filled slots only): score, image_index, image_id, label, maps (K, H, W)."""
        import zarr

        j = self.check_latent(j)
        if self._refs is None:
            self._refs = zarr.open_group(self.path / REFERENCES_DIR, mode="r")
        out = {name: self._refs[name][j] for name in REFERENCE_ARRAYS}
        keep = out["image_index"] >= 0
        return {name: np.asarray(arr)[keep] for name, arr in out.items()}

    def class_counts(self) -> np.ndarray:
        """``(C, S)`` token counts above the threshold (memory-mapped)."""
        return np.load(self.path / CLASS_COUNTS_FILE, mmap_mode="r")

    def top_classes_by_counts(self, j: int, n: int = 5) -> list[tuple[str, int]]:
        col = np.asarray(self.class_counts()[:, self.check_latent(j)])
        order = np.lexsort((np.arange(len(col)), -col))[:n]
        return [(self.class_names[c], int(col[c])) for c in order if col[c] > 0]

    def describe(self, j: int, n_classes: int = 5) -> list[str]:
        """A latent's summary as text lines (for the terminal)."""
        r = self.row(j)
        n_valid = self.meta["n_valid_images"]
        lines = [f"latent {j} of {self.d_sae}  (stats {self.path}, {n_valid} valid images)"]
        if r["dead"]:
            lines.append("  dead: never active on any valid image; no mean activation, entropy or references")
            return lines
        lines += [
            f"  frequency        {r['frequency']:.4g}  ({r['n_active_images']} images with a > 0)",
            f"  mean activation  {_fmt(r['mean_activation'])}  (over active images)",
            f"  cls token        frequency {_fmt(r['frequency_cls'])}, mean {_fmt(r['mean_activation_cls'])}",
            f"  max over patches frequency {_fmt(r['frequency_max_patch'])}, mean {_fmt(r['mean_activation_max_patch'])}",
            f"  label entropy    {_fmt(r['label_entropy'])} nats (uniform over {len(self.class_names)} classes: "
            f"{math.log(max(len(self.class_names), 1)):.3f})",
            f"  label std        {_fmt(r['label_std'])}  (sqrt(1 - sum p_c^2) of the weighted reference labels)",
            f"  top class        {r['top_class_name']} ({_fmt(r['top_class_share'])} of the reference weight)",
        ]
        tops = self.top_classes_by_counts(j, n_classes)
        threshold = self.meta["config"]["threshold"]
        if tops:
            lines.append(f"  top classes by tokens with f > {threshold}: "
                         + ", ".join(f"{name} ({count})" for name, count in tops))
        refs = self.references(j)
        lines.append(f"  references ({len(refs['score'])}, by image-level activation):")
        for rank, (score, idx, iid, lab) in enumerate(zip(refs["score"], refs["image_index"], refs["image_id"],
                                                          refs["label"]), start=1):
            name = self.class_names[lab] if 0 <= lab < len(self.class_names) else "unlabelled"
            lines.append(f"    {rank:2d}. {score:.4g}  image {idx}  {iid}  [{name}]")
        return lines


# ---------------------------------------------------------------------------------------
# Writing a statistics folder (only ``pipeline stats`` writes one)

OUR_FILES = (LATENTS_FILE, REFERENCES_DIR, CLASS_COUNTS_FILE, CLASS_NAMES_FILE, SUMMARY_FILE, META_FILE, PLOT_SCATTER,
             PLOT_HISTOGRAMS, PLOT_CLASS_TOP)


def prepare_dir(out_dir: Path, *, check_only: bool = False) -> None:
    """Create ``out_dir``, or clear earlier statistics from it; refuse a folder holding anything else."""
    runfiles.refuse_foreign_files(out_dir, OUR_FILES)
    if check_only:
        return
    (out_dir / META_FILE).unlink(missing_ok=True)  # incomplete until meta.json is rewritten
    shutil.rmtree(out_dir / REFERENCES_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_tables(out_dir: Path, table, counts_CS: np.ndarray, class_names: list[str]) -> None:
    """The per-latent parquet table, the class counts and the class names."""
    import pyarrow.parquet as pq

    pq.write_table(table, out_dir / LATENTS_FILE)
    np.save(out_dir / CLASS_COUNTS_FILE, counts_CS)
    (out_dir / CLASS_NAMES_FILE).write_text(jsonfile.dumps(class_names, indent=1))


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / SUMMARY_FILE).write_text(jsonfile.dumps(summary))


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    """Written last: it marks the folder complete."""
    (out_dir / META_FILE).write_text(jsonfile.dumps({"stats_format_version": STATS_FORMAT_VERSION, **meta}))


def write_references(out_dir: Path, score_SK: np.ndarray, index_SK: np.ndarray, label_SK: np.ndarray,
                     maps_SKHW: np.ndarray, store: ActivationStore) -> None:
    """References per latent; image ids are looked up in ``store`` (empty slots: index -1, id "")."""
    import zarr

    s, k = index_SK.shape
    ids_SK = np.full((s, k), "", dtype=object)
    filled = index_SK >= 0
    if filled.any():
        wanted = np.unique(index_SK[filled])
        found = store.group[schema.IMAGE_IDS].get_coordinate_selection(wanted)
        ids_SK[filled] = np.asarray(found, dtype=object)[np.searchsorted(wanted, index_SK[filled])]
    group = zarr.open_group(out_dir / REFERENCES_DIR, mode="w")
    block = max(1, min(s, 2**22 // max(1, k * maps_SKHW[0, 0].size)))  # ~16 MB of maps per chunk
    arrays = {"score": score_SK, "image_index": index_SK, "label": label_SK, "maps": maps_SKHW}
    for name, arr in arrays.items():
        group.create_array(name, shape=arr.shape, chunks=(block, *arr.shape[1:]), dtype=arr.dtype)[...] = arr
    ids = group.create_array("image_id", shape=(s, k), chunks=(block, k), dtype=str)
    ids[...] = ids_SK
    group.attrs.update({"definitions": {"maps": DEFINITIONS["maps"],
                                        "references": DEFINITIONS["references"]}})


def write_plots(out: Path, table, counts_CS: np.ndarray, class_names: list[str], plot_classes: int) -> tuple[Path, ...]:
    """The three PNG plots of the per-latent table and class counts; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = table.to_pandas()
    alive = df[~df["dead"]]
    freq = alive["frequency"].to_numpy(float)
    act = alive["mean_activation"].to_numpy(float)
    ent = alive["label_entropy"].to_numpy(float)
    n_dead = int(df["dead"].sum())

    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    if len(alive):
        sc = ax.scatter(np.log10(freq), np.log10(act), c=ent, cmap="viridis", s=6, alpha=0.8,
                        vmin=0, vmax=max(math.log(max(len(class_names), 2)), 1e-9))
        fig.colorbar(sc, ax=ax, label="label entropy (nats)")
    ax.set_xlabel("log10 activation frequency (fraction of images)")
    ax.set_ylabel("log10 mean activation (active images)")
    ax.set_title(f"{len(alive)} alive latents ({n_dead} dead, not shown)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOT_SCATTER, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if len(alive):
        axes[0].hist(np.log10(freq), bins=40, color="tab:blue")
        axes[1].hist(ent[np.isfinite(ent)], bins=40, color="tab:green")
    axes[1].axvline(math.log(max(len(class_names), 1)), color="k", ls="--", lw=1, label="ln(C): uniform")
    axes[1].legend()
    axes[0].set_xlabel("log10 activation frequency")
    axes[1].set_xlabel("label entropy of the references (nats)")
    for ax in axes:
        ax.set_ylabel("latents")
        ax.grid(alpha=0.3)
    fig.suptitle(f"alive latents ({len(alive)} of {len(df)})")
    fig.tight_layout()
    fig.savefig(out / PLOT_HISTOGRAMS, dpi=110)
    plt.close(fig)

    n_show = min(len(class_names), plot_classes)
    cols = min(5, max(n_show, 1))
    rows = max(1, -(-n_show // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    for c in range(rows * cols):
        ax = axes.flat[c]
        if c >= n_show:
            ax.axis("off")
            continue
        counts = counts_CS[c]
        top = np.lexsort((np.arange(len(counts)), -counts))[:5]
        ax.barh(range(len(top))[::-1], counts[top], color="tab:orange")
        ax.set_yticks(range(len(top))[::-1], [str(j) for j in top], fontsize=7)
        ax.set_title(class_names[c][:28], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    shown = f"first {n_show} of {len(class_names)} classes" if n_show < len(class_names) else "every class"
    fig.suptitle(f"top-5 latents per class by tokens above the threshold ({shown})", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.04, top=1 - 0.5 / (2.4 * rows), wspace=0.35,
                        hspace=0.45)  # tight_layout costs seconds on a large grid
    fig.savefig(out / PLOT_CLASS_TOP, dpi=100)
    plt.close(fig)
    return out / PLOT_SCATTER, out / PLOT_HISTOGRAMS, out / PLOT_CLASS_TOP


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _is_missing(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _nullable(arrow_type):
    import pandas as pd
    import pyarrow as pa

    mapping = {pa.float64(): pd.Float64Dtype(), pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype(),
               pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype()}
    return mapping.get(arrow_type)
