"""The statistics folder written by ``pipeline stats``: file names, definitions, and a reader.

The stats stage writes it; the report stage and ``pipeline show-latent`` read it. Both go
through this module, so a stage never reaches into another stage's code.

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
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import UserError

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
    "image_activation": "a_ij = mean of f_j over all T tokens of image i (class token, any registers and "
                        "the patches); variants: f_j on the class token alone (cls) and the maximum of f_j "
                        "over the patch tokens (max_patch)",
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
    "class_counts": "counts[c, j] = number of tokens (all T tokens) of the valid images of class c with "
                    "f_j > threshold (compared in the codes' float32 precision: a stored 0.2 is not above 0.2)",
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
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a complete statistics folder (no {META_FILE}); "
                            "write one with `pipeline stats`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        version = self.meta.get("stats_format_version")
        if version != STATS_FORMAT_VERSION:
            raise UserError(f"{self.path} holds statistics format {version}, this pipeline reads "
                            f"{STATS_FORMAT_VERSION}; rerun `pipeline stats`")
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
