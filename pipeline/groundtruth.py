"""Ground-truth evaluation of SAE latents on the synthetic world: what each latent detects, and where.

The synthetic world (``pipeline.world``) knows every image's attribute values and its object
mask, so a latent can be scored against them directly. Definitions (the same text goes into
``groundtruth.json`` as ``DEFINITIONS``):

- Image-level score ``s_ij`` of latent j on image i: by default the maximum of f_j over the
  image's patch tokens (``max_patch``; class and register tokens excluded). The maximum, not
  the mean, because an attribute belongs to one object covering anywhere from a few patches
  (small) to many (large): a mean would scale with the object's area and so mix size into
  every attribute, while the maximum asks "does the latent respond anywhere in the image".
  Alternative ``mean``: the mean of f_j over all T tokens (the statistics stage's a_ij).
- Attribute values: shape, colour, size, texture and background as drawn by the world, plus
  ``position``, the quadrant of the object's centre (top/bottom by its row, left/right by its
  column; the centre line counts as bottom/right). Object attributes: shape, colour, size,
  position; background attributes: texture, background.
- AUROC of latent j for value v: the probability that ``s_ij`` of a random evaluated image
  with v exceeds that of a random evaluated image without v, ties counting one half (the
  Mann-Whitney U statistic over n_pos * n_neg). Undefined (empty) when every or no evaluated
  image has v. Evaluated images: the valid images of the store.
- Best value of a latent: the value with the largest AUROC (ties: the first in attribute
  order). Latents that are zero on every evaluated image are dead and have none.
- Purity: the share of the latent's score mass on images that have its best value,
  ``sum_{i has v} s_ij / sum_i s_ij``; compare with the value's prevalence (its chance level).
- Localisation (object attributes only): the patch map of latent j on image i (f_j on each
  patch token) is thresholded at ``map_threshold`` times its maximum (a patch is on when
  f_j > 0 and f_j >= map_threshold * max). The object mask (pixels at least half covered by
  the object) is reduced to the patch grid: a patch is an object patch when at least
  ``object_fraction`` of its pixels are object pixels. IoU = |on & object| / |on | object|;
  pointing = 1 when the map's maximum patch (the first in row-major order on ties) is an
  object patch. Both are averaged over the images where the latent is nonzero on some patch
  and the object covers at least one patch (``n_localised``); latents whose best value is a
  background attribute get no IoU or pointing (the object mask says nothing about them).
- Dedicated latent of value v: the latent with the largest AUROC for v, when that AUROC is at
  least ``auroc_threshold``; v is then covered. Coverage = covered values / values whose AUROC
  is defined. The mean IoU (pointing) of the dedicated latents is taken over the covered
  object-attribute values.
- One-token ceiling of value v: the AUROC of an ideal detector that is on exactly at the patches
  showing v, scored like a latent (its maximum over the patches, so 1 or 0 per image). The
  patches showing v: for shape, colour and size, the object patches of an image with v; for
  position, the object patches whose centre lies in quadrant v; for texture and background, the
  patches that are not object patches, of an image with v. A latent that responds where v is seen
  cannot beat it; a value whose ceiling is below ``auroc_threshold`` can only be covered by a
  latent that fires on something no single patch shows (for position: where the whole object's
  centre lies, when the object straddles two quadrants).

All metrics work on the sparse (image, latent) pairs where a latent is nonzero; every other
pair scores 0 and enters the AUROC as a tie at the bottom. Memory grows with the number of
such pairs, never with images x latents.

Files of a ground-truth folder (written by ``pipeline groundtruth``, read by the report):
``groundtruth.json`` (metrics, config, provenance, definitions; written last),
``latents.csv`` (one row per latent), ``values.csv`` (one row per attribute value) and
``groundtruth.png``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cache import jsonfile
from cache.errors import UserError
from pipeline import runfiles
from pipeline.world import ATTRIBUTES, TASKS, SyntheticWorld, WorldConfig

GROUNDTRUTH_FORMAT_VERSION = 2  # 2: values.csv has the one-token ceiling
GROUNDTRUTH_FILE = "groundtruth.json"
LATENTS_FILE = "latents.csv"
VALUES_FILE = "values.csv"
PLOT_FILE = "groundtruth.png"

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {**ATTRIBUTES, "position": POSITIONS}
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
SCORES = ("max_patch", "mean")

DEFINITIONS: dict[str, str] = {
    "score": "s_ij = max of f_j over the patch tokens of image i (max_patch; class/register tokens excluded), "
             "or the mean of f_j over all T tokens (mean); see config.score",
    "attributes": "the world's shape, colour, size, texture, background, plus position = quadrant of the object "
                  "centre (centre line: bottom/right); object attributes: shape, colour, size, position",
    "auroc": "P(s_ij of an evaluated image with value v > s_ij of one without v), ties count 1/2 (Mann-Whitney U "
             "/ (n_pos n_neg)); empty when all or no evaluated images have v; evaluated = valid images",
    "best_value": "the value with the largest AUROC for the latent (ties: first in attribute order); dead "
                  "latents (zero on every evaluated image) have none",
    "purity": "sum of s_ij over images having the latent's best value / sum of s_ij over all evaluated images; "
              "chance level = the value's prevalence",
    "localisation": "object attributes only: patch on = f_j > 0 and f_j >= map_threshold * max over the image's "
                    "patches; object patch = at least object_fraction of its pixels in the object mask (pixels "
                    ">= half covered); IoU = |on & object| / |on | object|; pointing = the max patch (first in "
                    "row-major order on ties) is an object patch; both averaged over images where the latent is "
                    "nonzero on some patch and the object covers at least one patch (n_localised)",
    "dedicated": "value v is covered when its best latent (largest AUROC for v) has AUROC >= auroc_threshold; "
                 "coverage = covered / values with a defined AUROC; mean IoU and pointing of the dedicated latents "
                 "over the covered object-attribute values",
    "ceiling": "one-token ceiling of v: AUROC of the detector that is on exactly at the patches showing v, max over "
               "patches; showing v = object patches of an image with v (shape, colour, size), object patches whose "
               "centre lies in quadrant v (position), non-object patches of an image with v (texture, background)",
}


def check_attributes(names: Sequence[str]) -> tuple[str, ...]:
    """The attribute names, refused one by one when unknown; in the canonical order."""
    names = tuple(names)
    for name in names:
        if name not in ATTRIBUTE_VALUES:
            raise UserError(f"unknown attribute '{name}'; choose from: {', '.join(ATTRIBUTE_VALUES)}")
    if not names:
        raise UserError(f"no attributes given; choose from: {', '.join(ATTRIBUTE_VALUES)}")
    return tuple(name for name in ATTRIBUTE_VALUES if name in names)


def scene_values(scene: dict[str, Any]) -> dict[str, str]:
    """Every attribute value of a scene (``SyntheticWorld.scene``), position as a quadrant."""
    cy, cx = scene["position"]
    quadrant = ("top" if cy < 0.5 else "bottom") + "-" + ("left" if cx < 0.5 else "right")
    return {**{name: scene[name] for name in ATTRIBUTES}, "position": quadrant}


# ---------------------------------------------------------------------------------------
# Which world a store was extracted from


@dataclasses.dataclass(frozen=True)
class StoreWorld:
    """The world, split and image indices behind a store's rows."""

    config: WorldConfig
    split: str
    index_N: np.ndarray  # int64 world index of each store row
    allow_held_out: bool = False  # the images may show the world's held-out values


def store_world(dataset: dict[str, Any], preprocess: dict[str, Any], class_names: Sequence[str],
                image_ids: Sequence[str], where: str) -> StoreWorld:
    """Rebuild the world of a ``pipeline extract --dataset synthetic`` store from what it records.

    Extraction renders at the model's input size (``preprocess.size``) with the dataset seed; the
    task is the one whose class names are the store's. ``where`` names the store in messages.
    """
    name = dataset.get("name")
    if name != "synthetic":
        raise UserError(f"{where} holds '{name}' images, not the synthetic world; ground truth exists only "
                        "for stores of `pipeline extract --dataset synthetic`")
    size = (preprocess or {}).get("size")
    if size is None:
        raise UserError(f"{where} does not record its image size (preprocess.size); re-extract it")
    image_size = int(size if isinstance(size, (int, float)) else size[0])
    seed = int(dataset.get("seed") or 0)
    split = str(dataset.get("split"))
    recorded = dataset.get("world")
    if recorded:  # stores record their world; older ones are rebuilt from seed, size and class names
        recorded = dict(recorded)
        allow = bool(recorded.pop("allow_held_out", False))
        config = WorldConfig.from_dict(recorded)
        if list(SyntheticWorld(config, n_images=1, allow_held_out=allow).class_names) != list(class_names):
            raise UserError(f"{where}'s class names differ from those of the world it records; re-extract it")
        return StoreWorld(config, split, _world_indices(image_ids, split, where), allow)
    task = next((t for t in TASKS if list(SyntheticWorld(WorldConfig(seed=seed, image_size=image_size, task=t),
                                                         n_images=1).class_names) == list(class_names)), None)
    if task is None:
        raise UserError(f"{where}'s class names are those of no synthetic world task; re-extract it")
    return StoreWorld(WorldConfig(seed=seed, image_size=image_size, task=task), split,
                      _world_indices(image_ids, split, where))


def _world_indices(image_ids: Sequence[str], split: str, where: str) -> np.ndarray:
    index = []
    for image_id in image_ids:
        parts = str(image_id).split("/")
        if len(parts) != 3 or parts[0] != "synthetic" or parts[1] != split or not parts[2].isdigit():
            raise UserError(f"{where} holds image id '{image_id}', not synthetic/{split}/<index>; re-extract it")
        index.append(int(parts[2]))
    return np.asarray(index, np.int64)


def check_world(given: dict[str, Any], actual: WorldConfig) -> None:
    """Refuse a world setting that differs from the store's; keys not given are the store's."""
    record = {**actual.to_dict(), **given}
    expected = actual.to_dict()
    config = WorldConfig.from_dict(record)  # refuses unknown keys, bad values, another render version
    for key, value in config.to_dict().items():
        if value != expected[key]:
            raise UserError(f"--world {key}={_show(value)} differs from the world the store was extracted from "
                            f"({key}={_show(expected[key])}); pass the store's world or extract a store of yours")


def _show(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------------------
# Per-image ground truth


def value_codes(values: Sequence[dict[str, str]], attributes: Sequence[str]) -> dict[str, np.ndarray]:
    """Per attribute, int64 ``(N,)``: the index of each image's value in ``ATTRIBUTE_VALUES[attribute]``."""
    return {a: np.asarray([ATTRIBUTE_VALUES[a].index(v[a]) for v in values], np.int64) for a in attributes}


def patch_object_masks(mask_NHW: np.ndarray, grid_hw: tuple[int, int], object_fraction: float) -> np.ndarray:
    """bool ``(N, P)``: patches (row-major) with at least ``object_fraction`` of their pixels in the mask."""
    n, h, w = mask_NHW.shape
    gh, gw = grid_hw
    rows, cols = np.arange(gh) * h // gh, np.arange(gw) * w // gw
    sums = np.add.reduceat(np.add.reduceat(mask_NHW.astype(np.int64), rows, axis=1), cols, axis=2)
    area = np.outer(np.diff(np.r_[rows, h]), np.diff(np.r_[cols, w]))
    return (sums >= object_fraction * area).reshape(n, gh * gw)


# ---------------------------------------------------------------------------------------
# Sparse (image, latent) pairs


@dataclasses.dataclass(frozen=True)
class Pairs:
    """One entry per (image, latent) pair with a nonzero score; every other pair scores 0."""

    image: np.ndarray  # int64 image index
    latent: np.ndarray  # int64
    score: np.ndarray  # float64 s_ij > 0
    n_on: np.ndarray  # int64 patches on in the thresholded map (0: no patch is nonzero)
    n_hit: np.ndarray  # int64 of those, object patches
    point: np.ndarray  # bool the map's maximum patch is an object patch

    def select(self, keep: np.ndarray) -> Pairs:
        return Pairs(*(getattr(self, f.name)[keep] for f in dataclasses.fields(Pairs)))

    @staticmethod
    def concat(parts: Sequence[Pairs]) -> Pairs:
        return Pairs(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Pairs)))


def image_pairs(token_ptr: np.ndarray, indices: np.ndarray, values: np.ndarray, object_NP: np.ndarray, *,
                n_tokens: int, n_prefix: int, d_sae: int, score: str = "max_patch",
                map_threshold: float = 0.5, first_image: int = 0) -> Pairs:
    """The pairs of ``n`` images from their CSR codes (as a code shard stores them).

    ``object_NP``: bool object patches of each image of the shard. Image indices start at ``first_image``.
    """
    if score not in SCORES:
        raise UserError(f"unknown score '{score}'; choose one of: {', '.join(SCORES)}")
    n = len(object_NP)
    t, p0 = n_tokens, n_prefix
    pos = np.repeat(np.arange(n * t, dtype=np.int64), np.diff(token_ptr))
    img, tok = np.divmod(pos, t)
    lat, val = indices.astype(np.int64), values.astype(np.float64)
    keep = val > 0
    if score == "max_patch":
        keep &= tok >= p0
    img, tok, lat, val = img[keep], tok[keep], lat[keep], val[keep]
    order = np.argsort(img * d_sae + lat, kind="stable")  # by pair, tokens ascending within a pair
    img, tok, lat, val = img[order], tok[order], lat[order], val[order]
    if not len(val):
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty, np.zeros(0), empty, empty, np.zeros(0, bool))
    new = np.r_[True, (img[1:] != img[:-1]) | (lat[1:] != lat[:-1])]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    if score == "max_patch":
        pair_score = np.maximum.reduceat(val, starts)
    else:
        pair_score = np.add.reduceat(val, starts) / t

    patch = tok >= p0
    patch_val = np.where(patch, val, 0.0)
    top = np.maximum.reduceat(patch_val, starts)  # 0 when no patch is nonzero
    on = patch & (patch_val >= map_threshold * top[group])
    obj = np.zeros(len(val), bool)
    obj[patch] = object_NP[img[patch], tok[patch] - p0]
    n_pairs = len(starts)
    n_on = np.bincount(group, weights=on, minlength=n_pairs).astype(np.int64)
    n_hit = np.bincount(group, weights=on & obj, minlength=n_pairs).astype(np.int64)
    is_max = patch & (patch_val == top[group]) & (top[group] > 0)
    first_max = np.minimum.reduceat(np.where(is_max, np.arange(len(val)), len(val)), starts)
    point = np.zeros(n_pairs, bool)
    found = first_max < len(val)
    point[found] = obj[first_max[found]]
    return Pairs(img[starts] + first_image, lat[starts], pair_score, n_on, n_hit, point)


# ---------------------------------------------------------------------------------------
# Metrics over pairs


def pair_ranks(latent: np.ndarray, score: np.ndarray, n_images: int, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each pair's score among its latent's ``n_images`` scores (1-based, ties averaged), and
    the rank shared by each latent's implicit zeros, ``(n_zero + 1) / 2`` per latent."""
    n_zero_S = n_images - np.bincount(latent, minlength=d_sae)
    order = np.lexsort((score, latent))
    lat, sc = latent[order], score[order]
    first_of_latent = np.searchsorted(lat, lat, side="left")
    new = np.r_[True, (lat[1:] != lat[:-1]) | (sc[1:] != sc[:-1])] if len(lat) else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(lat)]
    tie = np.cumsum(new) - 1
    position = np.arange(len(lat)) - first_of_latent  # 0-based among the latent's nonzero scores
    average = ((position[starts] + position[ends - 1]) / 2 + 1)[tie]  # 1-based, ties averaged
    ranks = np.empty(len(lat))
    ranks[order] = n_zero_S[lat] + average
    return ranks, (n_zero_S + 1) / 2


def auroc_by_value(pairs: Pairs, codes_N: np.ndarray, n_values: int, d_sae: int,
                   ranks: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``(S, V)`` AUROC of each latent's score for "image has value v" (``codes_N`` values of one attribute).

    NaN for values that all or none of the images have. ``ranks`` from ``pair_ranks`` may be passed
    to reuse them across attributes.
    """
    n = len(codes_N)
    rank, zero_rank_S = ranks if ranks is not None else pair_ranks(pairs.latent, pairs.score, n, d_sae)
    key = pairs.latent * n_values + codes_N[pairs.image]
    rank_SV = np.bincount(key, weights=rank, minlength=d_sae * n_values).reshape(d_sae, n_values)
    count_SV = np.bincount(key, minlength=d_sae * n_values).reshape(d_sae, n_values)
    pos_V = np.bincount(codes_N, minlength=n_values).astype(np.float64)
    neg_V = n - pos_V
    rank_SV += (pos_V[None, :] - count_SV) * zero_rank_S[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_SV - pos_V * (pos_V + 1) / 2) / (pos_V * neg_V)
    return np.where((pos_V > 0) & (neg_V > 0), auc, np.nan)


def mass_by_value(pairs: Pairs, codes_N: np.ndarray, n_values: int, d_sae: int) -> np.ndarray:
    """``(S, V)`` sum of each latent's scores over the images with value v."""
    key = pairs.latent * n_values + codes_N[pairs.image]
    return np.bincount(key, weights=pairs.score, minlength=d_sae * n_values).reshape(d_sae, n_values)


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Per latent, over its localised images (see the module docstring)."""

    iou_S: np.ndarray  # float64 mean IoU, NaN when n_localised is 0
    pointing_S: np.ndarray  # float64 mean pointing hit, NaN when n_localised is 0
    n_localised_S: np.ndarray  # int64


def localisation(pairs: Pairs, n_object_N: np.ndarray, d_sae: int) -> Localisation:
    """Mean IoU and pointing per latent; ``n_object_N`` = object patches of each image."""
    n_obj = n_object_N[pairs.image]
    use = (pairs.n_on > 0) & (n_obj > 0)
    lat = pairs.latent[use]
    iou = pairs.n_hit[use] / (pairs.n_on[use] + n_obj[use] - pairs.n_hit[use])
    count = np.bincount(lat, minlength=d_sae)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_S = np.bincount(lat, weights=iou, minlength=d_sae) / count
        pointing_S = np.bincount(lat, weights=pairs.point[use], minlength=d_sae) / count
    return Localisation(iou_S, pointing_S, count.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything the ground-truth stage reports, as arrays (``V`` = all values of the attributes, in order)."""

    value_names: list[tuple[str, str]]  # (attribute, value) of each column
    auroc_SV: np.ndarray
    purity_SV: np.ndarray  # score mass share on images with v; NaN for dead latents
    prevalence_V: np.ndarray  # share of evaluated images with v
    n_positive_V: np.ndarray
    n_active_S: np.ndarray  # images with s_ij > 0
    best_V_of_S: np.ndarray  # int64 best value column per latent, -1 for dead latents
    loc: Localisation
    best_latent_V: np.ndarray  # int64 alive latent with the largest AUROC for v, -1 when there is none
    dedicated_V: np.ndarray  # bool


def evaluate(pairs: Pairs, codes: dict[str, np.ndarray], n_object_N: np.ndarray, d_sae: int,
             auroc_threshold: float) -> Evaluation:
    """All ground-truth metrics from the pairs of ``len(n_object_N)`` evaluated images."""
    n = len(n_object_N)
    ranks = pair_ranks(pairs.latent, pairs.score, n, d_sae)
    names, aurocs, masses, positives = [], [], [], []
    for attribute, codes_N in codes.items():
        values = ATTRIBUTE_VALUES[attribute]
        names += [(attribute, v) for v in values]
        aurocs.append(auroc_by_value(pairs, codes_N, len(values), d_sae, ranks))
        masses.append(mass_by_value(pairs, codes_N, len(values), d_sae))
        positives.append(np.bincount(codes_N, minlength=len(values)))
    auroc_SV = np.concatenate(aurocs, axis=1)
    mass_SV = np.concatenate(masses, axis=1)
    n_positive_V = np.concatenate(positives).astype(np.int64)
    n_active_S = np.bincount(pairs.latent, minlength=d_sae).astype(np.int64)
    total_S = np.bincount(pairs.latent, weights=pairs.score, minlength=d_sae)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity_SV = mass_SV / total_S[:, None]
    # dead latents score 0.5 on every value (all ties) but are nobody's best latent
    filled = np.where(np.isnan(auroc_SV) | (n_active_S == 0)[:, None], -np.inf, auroc_SV)
    best_V_of_S = np.where(np.isfinite(filled.max(1)), filled.argmax(1), -1)
    best_latent_V = np.where(np.isfinite(filled.max(0)), filled.argmax(0), -1)
    return Evaluation(value_names=names, auroc_SV=auroc_SV, purity_SV=purity_SV,
                      prevalence_V=n_positive_V / max(n, 1), n_positive_V=n_positive_V, n_active_S=n_active_S,
                      best_V_of_S=best_V_of_S.astype(np.int64), loc=localisation(pairs, n_object_N, d_sae),
                      best_latent_V=best_latent_V.astype(np.int64), dedicated_V=filled.max(0) >= auroc_threshold)


def auroc(score_N: np.ndarray, positive_N: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``score_N`` for the boolean ``positive_N`` (ties one half); NaN when one side is empty."""
    n_pos = int(positive_N.sum())
    n_neg = len(positive_N) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    ordered = np.sort(score_N)
    rank_N = (np.searchsorted(ordered, score_N, "left") + np.searchsorted(ordered, score_N, "right") + 1) / 2
    return float((rank_N[positive_N].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_token_ceiling(codes: dict[str, np.ndarray], object_NP: np.ndarray,
                      grid_hw: tuple[int, int]) -> np.ndarray:
    """``(V,)`` one-token ceiling of each value (DEFINITIONS["ceiling"]) over the images of ``object_NP``, in
    ``evaluate``'s value order: how far a latent that fires where the value is seen can go at all."""
    gh, gw = grid_hw
    top_P = np.repeat(np.arange(gh) < gh // 2, gw)  # a middle row or column counts as bottom or right, like a centre
    left_P = np.tile(np.arange(gw) < gw // 2, gh)
    quadrant_P = {"top-left": top_P & left_P, "top-right": top_P & ~left_P,
                  "bottom-left": ~top_P & left_P, "bottom-right": ~top_P & ~left_P}
    has_object_N, has_ground_N = object_NP.any(1), (~object_NP).any(1)
    out = []
    for attribute, codes_N in codes.items():
        for v, name in enumerate(ATTRIBUTE_VALUES[attribute]):
            if attribute == "position":
                seen_N = (object_NP & quadrant_P[name]).any(1)
            else:
                seen_N = (codes_N == v) & (has_object_N if attribute in OBJECT_ATTRIBUTES else has_ground_N)
            out.append(auroc(seen_N.astype(np.float64), codes_N == v))
    return np.array(out)


# ---------------------------------------------------------------------------------------
# Writing a ground-truth folder (only `pipeline groundtruth` writes one)


OUR_FILES = (GROUNDTRUTH_FILE, LATENTS_FILE, VALUES_FILE, PLOT_FILE)


def prepare_dir(out_dir: Path, *, check_only: bool) -> None:
    """Refuse a folder holding other files; unless ``check_only``, create it and remove an earlier result."""
    runfiles.refuse_foreign_files(out_dir, OUR_FILES)
    if not check_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUR_FILES:  # groundtruth.json first: the folder is incomplete until it is rewritten
            (out_dir / name).unlink(missing_ok=True)


def write_tables(out_dir: Path, latents, values) -> tuple[Path, Path]:
    latents.to_csv(out_dir / LATENTS_FILE, index=False, na_rep="")
    values.to_csv(out_dir / VALUES_FILE, index=False, na_rep="")
    return out_dir / LATENTS_FILE, out_dir / VALUES_FILE


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Written last: it marks the folder complete."""
    (out_dir / GROUNDTRUTH_FILE).write_text(jsonfile.dumps(record))
    return out_dir / GROUNDTRUTH_FILE


def latent_table(result: Evaluation):
    """One row per latent: its best attribute value, AUROC, purity and, for object attributes, localisation."""
    import pandas as pd

    s = len(result.n_active_S)
    best = result.best_V_of_S
    has = best >= 0
    rows = np.arange(s)
    col = np.where(has, best, 0)
    attribute = np.array([result.value_names[v][0] if h else None for v, h in zip(col, has)], dtype=object)
    value = np.array([result.value_names[v][1] if h else None for v, h in zip(col, has)], dtype=object)
    on_object = np.array([a in OBJECT_ATTRIBUTES for a in attribute])
    return pd.DataFrame({
        "latent": rows, "dead": result.n_active_S == 0, "n_active_images": result.n_active_S,
        "best_attribute": attribute, "best_value": value,
        "auroc": np.where(has, result.auroc_SV[rows, col], np.nan),
        "purity": np.where(has, result.purity_SV[rows, col], np.nan),
        "prevalence": np.where(has, result.prevalence_V[col], np.nan),
        "iou": np.where(on_object, result.loc.iou_S, np.nan),
        "pointing": np.where(on_object, result.loc.pointing_S, np.nan),
        "n_localised": np.where(on_object, result.loc.n_localised_S, 0),
    })


def value_table(result: Evaluation, ceiling_V: np.ndarray):
    """One row per attribute value: its best latent, whether that one is dedicated, its localisation, and the
    value's one-token ceiling."""
    import pandas as pd

    best = result.best_latent_V
    has = best >= 0
    lat = np.where(has, best, 0)
    cols = np.arange(len(best))
    on_object = np.array([a in OBJECT_ATTRIBUTES for a, _ in result.value_names])
    localised = has & on_object
    return pd.DataFrame({
        "attribute": [a for a, _ in result.value_names], "value": [v for _, v in result.value_names],
        "object": on_object, "n_images": result.n_positive_V, "prevalence": result.prevalence_V,
        "best_latent": pd.Series(best, dtype="Int64").mask(~has),
        "auroc": np.where(has, result.auroc_SV[lat, cols], np.nan),
        "dedicated": result.dedicated_V,
        "purity": np.where(has, result.purity_SV[lat, cols], np.nan),
        "iou": np.where(localised, result.loc.iou_S[lat], np.nan),
        "pointing": np.where(localised, result.loc.pointing_S[lat], np.nan),
        "n_localised": np.where(localised, result.loc.n_localised_S[lat], 0),
        "ceiling": ceiling_V,
    })


def defined_values(values, n_images: int):
    """The value table's rows whose AUROC is defined: shown by some but not every one of the ``n_images``."""
    return (values["n_images"] > 0) & (values["n_images"] < n_images)


def write_plot(out_dir: Path, values, latents, threshold: float) -> Path:
    """AUROC of each value's best latent against its one-token ceiling, and the IoU of the object latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.6, 0.22 * len(values) + 1)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    attributes = list(dict.fromkeys(values["attribute"]))
    colours = {a: plt.get_cmap("tab10")(k % 10) for k, a in enumerate(attributes)}
    y = np.arange(len(values))[::-1]
    left.barh(y, values["auroc"].fillna(0).to_numpy(float), color=[colours[a] for a in values["attribute"]])
    left.set_yticks(y, [f"{a}={v}" for a, v in zip(values["attribute"], values["value"])], fontsize=7)
    left.scatter(values["ceiling"].to_numpy(float), y, marker="|", s=120, color="k", zorder=3,
                 label="one-token ceiling")
    left.axvline(threshold, color="k", ls="--", lw=1, label=f"dedicated: AUROC >= {threshold:g}")
    left.axvline(0.5, color="grey", ls=":", lw=1, label="chance")
    left.set_xlim(0, 1)
    left.set_xlabel("AUROC of the best latent")
    left.legend(loc="lower right", fontsize=7)
    iou = latents["iou"].dropna().to_numpy(float)
    right.hist(iou, bins=np.linspace(0, 1, 21), color="tab:purple")
    right.set_xlabel("mean IoU with the object mask")
    right.set_ylabel("latents")
    right.set_title(f"{len(iou)} latents whose best value is an object attribute", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILE, dpi=110)
    plt.close(fig)
    return out_dir / PLOT_FILE


# ---------------------------------------------------------------------------------------
# Reading a ground-truth folder


class GroundTruthResults:
    """Read access to a folder written by ``pipeline groundtruth``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.record: dict[str, Any] = runfiles.read_record(
            self.path, GROUNDTRUTH_FILE, version_key="groundtruth_format_version",
            version=GROUNDTRUTH_FORMAT_VERSION, what="ground-truth", command="pipeline groundtruth")

    @property
    def latents(self):
        """Per-latent table (pandas), one row per latent in latent order."""
        import pandas as pd

        return pd.read_csv(self.path / LATENTS_FILE, keep_default_na=False, na_values=[""])

    @property
    def values(self):
        """Per-value table (pandas), one row per attribute value."""
        import pandas as pd

        return pd.read_csv(self.path / VALUES_FILE, keep_default_na=False, na_values=[""])


def write_not_applicable(out_dir: Path, why: str) -> Path:
    """A ground-truth folder saying there is none (a dataset other than the synthetic world), so a
    study over several datasets has the same files for each; returns its record's path."""
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    path = out_dir / GROUNDTRUTH_FILE
    path.write_text(jsonfile.dumps({"applicable": 0, "why": why}) + "\n")
    return path
