"""Stage three: per-latent statistics of a sparse code store, out of core with Dask.

Definitions: SCIENCE.md "Per-latent statistics", written out in ``pipeline.latents.DEFINITIONS``
(and into the output's ``meta.json``).

How it scales: one Dask task per code shard turns that shard (plus the shard's labels and
validity flags from the activation store) into a partial result whose size depends on the
number of latents and classes, never on the number of images: per-latent counts and sums,
the shard's class counts, and the shard's top-k candidates per latent. Partials are merged
by a tree of reduction tasks (``split_every`` at a time). All per-image work is sparse:
image-level activations exist only for the (image, latent) pairs that occur in the codes.
A second pass reads only the shards that hold reference images and recomputes those
references' patch maps; no per-latent buffer over all images ever exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import dask
import numpy as np
import zarr

from cache import schema
from cache.codes import CodeStore, ShardCodes
from cache.store import ActivationStore
from pipeline import latents as files
from pipeline import runfiles
from pipeline.configs import Option, Stage
from cache.errors import UserError

log = logging.getLogger(__name__)

VARIANTS = ("mean", "cls", "max_patch")
LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """What to summarise and how."""

    OPTIONS: ClassVar = {"n_workers": Option("--workers")}

    codes_dir: Path  # code store written by `pipeline encode`
    cache_dir: Path  # activation store the codes were encoded from (labels, validity, image ids)
    out_dir: Path  # statistics folder to write (created; earlier statistics in it are replaced)
    top_k: int = 10  # reference images per latent; label entropy/std use all of them (paper: 10)
    threshold: float = 0.2  # class-level counts count tokens with f_j > threshold (paper: 0.2)
    scheduler: str = "threads"  # Dask scheduler: threads, synchronous, processes, or a dask.distributed address
                                # tcp://HOST:PORT
    n_workers: int | None = None  # threads or processes of the local schedulers (default: one per core)
    split_every: int = 4  # partial results merged by one reduction task
    plots: bool = True  # write the PNG plots into the statistics folder
    plot_classes: int = 20  # classes shown in the per-class top-latent grid (the first ones)

    def __post_init__(self) -> None:
        for name in ("codes_dir", "cache_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.top_k < 1:
            raise UserError(f"--top-k must be at least 1 (got {self.top_k})")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise UserError(f"--threshold must be a finite number >= 0 (got {self.threshold})")
        if self.scheduler not in LOCAL_SCHEDULERS and "://" not in self.scheduler:
            raise UserError(f"unknown --scheduler '{self.scheduler}'; use threads, synchronous, processes "
                            "or a dask.distributed scheduler address such as tcp://host:8786")
        if self.n_workers is not None and self.n_workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.n_workers})")
        if self.split_every < 2:
            raise UserError(f"split_every must be at least 2 (got {self.split_every})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    stats_dir: Path
    latents_path: Path
    references_path: Path
    class_counts_path: Path
    class_names_path: Path
    summary_path: Path
    meta_path: Path
    plot_paths: tuple[Path, ...]
    n_latents: int
    n_dead: int
    n_valid_images: int
    n_shards: int
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What every shard task needs to know (small and picklable)."""

    n_tokens: int  # T
    d_sae: int  # S
    n_classes: int  # C
    class_token_index: int | None  # None when the tokens have no class token
    n_prefix_tokens: int  # patches are tokens n_prefix_tokens .. T-1
    top_k: int  # K
    threshold: float

    @property
    def n_patches(self) -> int:
        return self.n_tokens - self.n_prefix_tokens


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top-k references per latent: score desc, then image index asc; -inf / -1 in empty slots."""

    score_SK: np.ndarray  # float64
    index_SK: np.ndarray  # int64 global image index, -1 = empty
    label_SK: np.ndarray  # int64 class label, -1 = empty or unlabelled

    @property
    def nbytes(self) -> int:
        return self.score_SK.nbytes + self.index_SK.nbytes + self.label_SK.nbytes


@dataclasses.dataclass(frozen=True)
class Partial:
    """Statistics of some shards; merging two partials gives the statistics of their union."""

    shards: tuple[int, ...]  # the shards folded in (each exactly once)
    n_valid: int  # valid images
    images_C: np.ndarray  # int64 valid images per class
    n_active: dict[str, np.ndarray]  # per variant: int64 (S,) images whose variant score is > 0
    sum_active: dict[str, np.ndarray]  # per variant: float64 (S,) sum of those scores
    count_classes: np.ndarray  # int64 sorted class ids of the rows of counts_cS
    counts_cS: np.ndarray  # int64 tokens with f_j > threshold, for the classes in count_classes
    top: TopK

    @property
    def nbytes(self) -> int:
        arrays = [self.images_C, self.count_classes, self.counts_cS, *self.n_active.values(),
                  *self.sum_active.values()]
        return sum(a.nbytes for a in arrays) + self.top.nbytes


# ---------------------------------------------------------------------------------------
# Per-shard work (pure functions of one shard's data)


def select_top(latent: np.ndarray, score: np.ndarray, index: np.ndarray, label: np.ndarray,
               d_sae: int, k: int, *, index_ascending: bool = False) -> TopK:
    """The top ``k`` candidates per latent from flat candidate lists (score desc, then index asc).

    ``index_ascending``: the candidates come in ascending ``index`` order, so two stable
    one-key sorts give the order of the three-key lexsort, faster.
    """
    score_SK = np.full((d_sae, k), -np.inf)
    index_SK = np.full((d_sae, k), -1, np.int64)
    label_SK = np.full((d_sae, k), -1, np.int64)
    if len(latent):
        if index_ascending:
            by_score = np.argsort(-score, kind="stable")
            narrow = latent.astype(np.int16 if d_sae <= 2**15 else np.int32)[by_score]
            order = by_score[np.argsort(narrow, kind="stable")]
        else:
            order = np.lexsort((index, -score, latent))
        latent, score, index, label = latent[order], score[order], index[order], label[order]
        rank = np.arange(len(latent)) - np.searchsorted(latent, latent, side="left")
        keep = rank < k
        at = (latent[keep], rank[keep])
        score_SK[at], index_SK[at], label_SK[at] = score[keep], index[keep], label[keep]
    return TopK(score_SK, index_SK, label_SK)


def shard_partial(codes: ShardCodes, labels_N: np.ndarray, valid_N: np.ndarray, *, shard: int,
                  first_image: int, plan: Plan) -> Partial:
    """Statistics of one shard: ``codes`` of its ``len(labels_N)`` images, the first being ``first_image``.

    Works on the nonzero entries only (narrow dtypes, temporaries dropped early): its memory
    is a small multiple of the shard's compressed-away CSR arrays.
    """
    t, s, c = plan.n_tokens, plan.d_sae, plan.n_classes
    n = len(labels_N)
    if len(codes.token_ptr) != n * t + 1:
        raise UserError(f"code shard {shard} holds {len(codes.token_ptr) - 1} tokens but its activation shard "
                        f"has {n} images x {t} tokens; re-encode the store with `pipeline encode`")
    valid_N = np.asarray(valid_N, bool)
    labels_N = np.where(valid_N & (labels_N >= 0) & (labels_N < c), labels_N, -1).astype(np.int64)
    pos = np.repeat(np.arange(n * t, dtype=np.int32), np.diff(codes.token_ptr))  # token of each entry ...
    img = pos // t
    pos -= img * t  # ... and its position within the image
    latent, val = codes.indices, codes.values
    keep = valid_N[img] & (val > 0)  # encode writes nothing for invalid images and only values > 0
    if not keep.all():
        img, latent, pos, val = img[keep], latent[keep], pos[keep], val[keep]
    del keep

    # class-level counts: tokens with f_j > threshold, by the image's class
    count_classes = np.unique(labels_N[labels_N >= 0])
    above = val > np.float32(plan.threshold)  # in the codes' precision: a stored 0.2 is not above 0.2
    lab = labels_N[img[above]]
    labelled = lab >= 0
    row = np.searchsorted(count_classes, lab[labelled])
    counts_cS = np.bincount(row * s + latent[above][labelled],
                            minlength=len(count_classes) * s).reshape(len(count_classes), s)
    del above, lab, labelled, row

    n_active, sum_active = {}, {}
    if plan.class_token_index is not None:
        on_cls = pos == plan.class_token_index  # one entry per (image, latent) at most
        n_active["cls"] = np.bincount(latent[on_cls], minlength=s)
        sum_active["cls"] = np.bincount(latent[on_cls], weights=val[on_cls], minlength=s)
        del on_cls
    else:
        n_active["cls"] = np.zeros(s, np.int64)
        sum_active["cls"] = np.zeros(s)

    # image-level scores of the (image, latent) pairs that occur; every other pair scores 0
    key = img.astype(np.int64) * s + latent
    del img, latent
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    pair_key = key[starts]
    del key
    val, patch = val[order], pos[order] >= plan.n_prefix_tokens
    del order, pos
    pair_img, pair_lat = pair_key // s, pair_key % s
    del pair_key
    if len(val):
        mean_score = np.add.reduceat(val, starts, dtype=np.float64) / t
        max_score = np.maximum.reduceat(np.where(patch, val, np.float32(0)), starts)
    else:
        mean_score, max_score = np.zeros(0), np.zeros(0, np.float32)
    del val, patch, starts

    n_active["mean"] = np.bincount(pair_lat, minlength=s)
    sum_active["mean"] = np.bincount(pair_lat, weights=mean_score, minlength=s)
    hit = max_score > 0
    n_active["max_patch"] = np.bincount(pair_lat[hit], minlength=s)
    sum_active["max_patch"] = np.bincount(pair_lat[hit], weights=max_score[hit], minlength=s)
    del hit, max_score

    top = select_top(pair_lat, mean_score, first_image + pair_img, labels_N[pair_img], s, plan.top_k,
                     index_ascending=True)  # pairs are sorted by image, then latent
    return Partial(shards=(shard,), n_valid=int(valid_N.sum()),
                   images_C=np.bincount(labels_N[labels_N >= 0], minlength=c).astype(np.int64),
                   n_active={v: n_active[v].astype(np.int64) for v in VARIANTS},
                   sum_active={v: sum_active[v].astype(np.float64) for v in VARIANTS},
                   count_classes=count_classes.astype(np.int64), counts_cS=counts_cS.astype(np.int64), top=top)


def merge(parts: list[Partial], *, d_sae: int, top_k: int) -> Partial:
    """One partial for the union of ``parts`` (whose shards must be disjoint)."""
    if len(parts) == 1:
        return parts[0]
    shards = tuple(sorted(k for p in parts for k in p.shards))
    if len(set(shards)) != len(shards):
        raise ValueError(f"shards merged twice: {shards}")
    classes = np.unique(np.concatenate([p.count_classes for p in parts]))
    counts_cS = np.zeros((len(classes), d_sae), np.int64)
    for p in parts:
        counts_cS[np.searchsorted(classes, p.count_classes)] += p.counts_cS
    cand = [(np.nonzero(p.top.index_SK >= 0), p.top) for p in parts]
    top = select_top(np.concatenate([at[0] for at, _ in cand]),
                     np.concatenate([t.score_SK[at] for at, t in cand]),
                     np.concatenate([t.index_SK[at] for at, t in cand]),
                     np.concatenate([t.label_SK[at] for at, t in cand]), d_sae, top_k)
    return Partial(shards=shards, n_valid=sum(p.n_valid for p in parts),
                   images_C=sum(p.images_C for p in parts),
                   n_active={v: sum(p.n_active[v] for p in parts) for v in VARIANTS},
                   sum_active={v: sum(p.sum_active[v] for p in parts) for v in VARIANTS},
                   count_classes=classes, counts_cS=counts_cS, top=top)


def reference_maps(codes: ShardCodes, local_images: np.ndarray, latents: np.ndarray, *, plan: Plan) -> np.ndarray:
    """``(m, P)`` float32: f of latent ``latents[r]`` on each patch token of local image ``local_images[r]``."""
    t, p0 = plan.n_tokens, plan.n_prefix_tokens
    out = np.zeros((len(latents), plan.n_patches), np.float32)
    ptr = codes.token_ptr
    for i in np.unique(local_images):
        rows = np.flatnonzero(local_images == i)
        lo, hi = ptr[i * t + p0], ptr[(i + 1) * t]
        idx = codes.indices[lo:hi]
        patch = np.repeat(np.arange(t - p0), np.diff(ptr[i * t + p0:(i + 1) * t + 1]))
        order = np.argsort(latents[rows])
        wanted = latents[rows][order]
        at = np.minimum(np.searchsorted(wanted, idx), len(wanted) - 1)
        hit = wanted[at] == idx
        out[rows[order][at[hit]], patch[hit]] = codes.values[lo:hi][hit]
    return out


# ---------------------------------------------------------------------------------------
# Dask tasks (module-level, so the processes and distributed schedulers can pickle them)


def _shard_task(codes_dir: str, cache_dir: str, shard: int, plan: Plan) -> Partial:
    codes = CodeStore(codes_dir)
    store = ActivationStore(cache_dir, mode="r")
    sl = store.shard_slice(shard)
    labels_N = store.group[schema.LABELS][sl]
    valid_N = store.group[schema.VALID][sl].astype(bool)
    return shard_partial(codes.read_shard(shard), labels_N, valid_N, shard=shard, first_image=sl.start, plan=plan)


def _merge_task(parts: list[Partial], d_sae: int, top_k: int) -> Partial:
    return merge(parts, d_sae=d_sae, top_k=top_k)


def _maps_task(codes_dir: str, shard: int, slots: np.ndarray, local_images: np.ndarray, latents: np.ndarray,
               plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    codes = CodeStore(codes_dir)
    return slots, reference_maps(codes.read_shard(shard), local_images, latents, plan=plan)


def statistics_graph(codes_dir: Path, cache_dir: Path, n_shards: int, plan: Plan, split_every: int):
    """The Dask graph: one task per shard, then a tree of merges; returns the final delayed Partial."""
    parts = [dask.delayed(_shard_task, pure=True)(str(codes_dir), str(cache_dir), k, plan,
                                                  dask_key_name=f"stats-shard-{k:06d}")
             for k in range(n_shards)]
    level = 0
    while len(parts) > 1:
        parts = [dask.delayed(_merge_task, pure=True)(parts[i:i + split_every], plan.d_sae, plan.top_k,
                                                      dask_key_name=f"stats-merge-{level}-{i // split_every}")
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts[0]


def maps_graph(codes_dir: Path, top: TopK, images_per_shard: int, plan: Plan) -> list:
    """One task per shard holding reference images, each recomputing those references' patch maps."""
    lat, rank = np.nonzero(top.index_SK >= 0)
    index = top.index_SK[lat, rank]
    slot = lat * plan.top_k + rank
    shard_of = index // images_per_shard
    tasks = []
    for k in np.unique(shard_of):
        m = shard_of == k
        tasks.append(dask.delayed(_maps_task, pure=True)(
            str(codes_dir), int(k), slot[m], index[m] - k * images_per_shard, lat[m], plan,
            dask_key_name=f"stats-maps-{int(k):06d}"))
    return tasks


def compute(objs: list, scheduler: str, n_workers: int | None) -> tuple:
    """``dask.compute`` on a local scheduler or a dask.distributed address."""
    if "://" in scheduler:
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - distributed is a dependency
            raise UserError("--scheduler with an address needs dask.distributed; pip install distributed") from None
        try:
            client = Client(scheduler, timeout="10s", set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise UserError(f"could not reach the Dask scheduler at {scheduler} ({err}); start it or use "
                            "--scheduler threads") from None
        with client:
            return dask.compute(*objs, scheduler=client)
    kwargs = {"num_workers": n_workers} if n_workers and scheduler != "synchronous" else {}
    return dask.compute(*objs, scheduler=scheduler, **kwargs)


# ---------------------------------------------------------------------------------------
# Final statistics


def label_statistics(top: TopK, n_classes: int) -> dict[str, np.ndarray]:
    """Activation-weighted class distribution of each latent's references: entropy, std, top class.

    Only the K reference slots are touched (an ``(S, K, K)`` comparison), never an ``(S, C)`` array.
    """
    score = np.where((top.index_SK >= 0) & (top.label_SK >= 0), top.score_SK, 0.0)
    label = top.label_SK
    same_SKK = (label[:, :, None] == label[:, None, :]) & (label[:, :, None] >= 0)
    weight_SK = (same_SKK * score[:, None, :]).sum(-1)  # weight of the class of slot r
    earlier = np.tril(np.ones(same_SKK.shape[1:], bool), k=-1)
    first_SK = (label >= 0) & ~(same_SKK & earlier).any(-1)  # first slot of each distinct class
    total_S = score.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_SK = np.where(first_SK, weight_SK / total_S[:, None], 0.0)
        plogp = np.where(p_SK > 0, p_SK * np.log(np.where(p_SK > 0, p_SK, 1.0)), 0.0)
    has = total_S > 0
    entropy = np.where(has, np.maximum(-plogp.sum(1), 0.0), np.nan)
    std = np.where(has, np.sqrt(np.clip(1.0 - (p_SK ** 2).sum(1), 0.0, None)), np.nan)
    best = p_SK.argmax(1)  # first maximum: ties go to the class of the higher-ranked reference
    rows = np.arange(len(best))
    top_class = np.where(has, label[rows, best], -1)
    share = np.where(has, p_SK[rows, best], np.nan)
    return {"label_entropy": entropy, "label_std": std, "top_class": top_class, "top_class_share": share}


def _latent_table(part: Partial, labels: dict[str, np.ndarray], class_names: list[str], has_cls: bool,
                  counts_S: np.ndarray):
    import pyarrow as pa

    s = len(part.n_active["mean"])
    n_valid = part.n_valid
    dead = part.n_active["mean"] == 0
    cols: dict[str, Any] = {"latent": pa.array(np.arange(s, dtype=np.int64))}

    def ratio(num: np.ndarray, den: np.ndarray, missing: np.ndarray) -> pa.Array:
        with np.errstate(invalid="ignore", divide="ignore"):
            return pa.array(np.where(missing, 0.0, num / np.maximum(den, 1)), mask=missing)

    none = np.zeros(s, bool)
    cols["frequency"] = ratio(part.n_active["mean"].astype(float), np.full(s, n_valid), none)
    cols["mean_activation"] = ratio(part.sum_active["mean"], part.n_active["mean"], dead)
    cols["n_active_images"] = pa.array(part.n_active["mean"])
    cols["dead"] = pa.array(dead)
    for name in ("label_entropy", "label_std", "top_class_share"):
        cols[name] = pa.array(np.nan_to_num(labels[name]), mask=~np.isfinite(labels[name]))
    no_top = labels["top_class"] < 0
    cols["top_class"] = pa.array(labels["top_class"], mask=no_top)
    cols["top_class_name"] = pa.array([None if c < 0 else class_names[c] for c in labels["top_class"]],
                                      type=pa.string())
    cols["n_references"] = pa.array((part.top.index_SK >= 0).sum(1).astype(np.int64))
    for v in ("cls", "max_patch"):
        absent = np.full(s, v == "cls" and not has_cls)
        cols[f"frequency_{v}"] = ratio(part.n_active[v].astype(float), np.full(s, n_valid), absent)
        cols[f"mean_activation_{v}"] = ratio(part.sum_active[v], part.n_active[v], absent | (part.n_active[v] == 0))
    cols["n_tokens_above_threshold"] = pa.array(counts_S.astype(np.int64))
    return pa.table({name: cols[name] for name in files.LATENT_COLUMNS})


OUR_FILES = (files.LATENTS_FILE, files.REFERENCES_DIR, files.CLASS_COUNTS_FILE, files.CLASS_NAMES_FILE,
             files.SUMMARY_FILE, files.META_FILE, files.PLOT_SCATTER, files.PLOT_HISTOGRAMS, files.PLOT_CLASS_TOP)


def _prepare_out_dir(out_dir: Path, *, check_only: bool = False) -> None:
    """Create ``out_dir``, or clear earlier statistics from it; refuse a folder holding anything else."""
    runfiles.refuse_foreign_files(out_dir, OUR_FILES)
    if check_only:
        return
    (out_dir / files.META_FILE).unlink(missing_ok=True)  # incomplete until meta.json is rewritten
    shutil.rmtree(out_dir / files.REFERENCES_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def open_inputs(cfg: Config) -> tuple[CodeStore, ActivationStore]:
    """Open both stores and refuse a pair that does not belong together, or an incomplete/empty one."""
    codes = CodeStore(cfg.codes_dir)
    store = ActivationStore(cfg.cache_dir, mode="r")
    if codes.attrs.get("acts_config_sha256") != store.config_sha256:
        raise UserError(f"{cfg.codes_dir} was encoded from another activation store (config "
                        f"{str(codes.attrs.get('acts_config_sha256'))[:12]}, {cfg.cache_dir} is "
                        f"{store.config_sha256[:12]}); pass the --cache the codes were encoded from")
    if (codes.n_images, codes.images_per_shard, codes.n_tokens) != (store.n_images, store.images_per_shard,
                                                                    store.n_tokens):
        raise UserError(f"{cfg.codes_dir} and {cfg.cache_dir} disagree on images, shard size or tokens; "
                        "re-encode the store with `pipeline encode`")
    codes.require_complete()
    store.require_complete()
    if store.n_images == 0 or not store.valid.any():
        raise UserError(f"{cfg.cache_dir} holds no valid images (all {store.n_images} unreadable); "
                        "nothing to summarise: re-extract it from readable images")
    return codes, store


def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    codes, store = open_inputs(cfg)
    layout = dict(codes.attrs.get("token_layout") or store.token_layout)
    class_names = list(codes.attrs.get("class_names") or store.class_names)
    n_prefix = int(layout.get("n_prefix_tokens", 1))
    cls_index = layout.get("class_token_index")
    plan = Plan(n_tokens=codes.n_tokens, d_sae=codes.d_sae, n_classes=len(class_names),
                class_token_index=None if cls_index is None else int(cls_index), n_prefix_tokens=n_prefix,
                top_k=cfg.top_k, threshold=cfg.threshold)
    grid = [int(g) for g in layout.get("patch_grid") or [plan.n_patches]]
    grid_hw = (grid[0], grid[1]) if len(grid) == 2 else (1, int(np.prod(grid)))
    if grid_hw[0] * grid_hw[1] != plan.n_patches:
        raise UserError(f"the token layout's patch grid {grid} does not match {plan.n_patches} patch tokens; "
                        "fix the store's token_layout attribute")
    _prepare_out_dir(cfg.out_dir, check_only=True)  # refuse before computing; write only after
    log.info("statistics of %d latents over %d images in %d shards (scheduler %s)", plan.d_sae, codes.n_images,
             codes.n_shards, cfg.scheduler)

    (part,) = compute([statistics_graph(codes.path, store.path, codes.n_shards, plan, cfg.split_every)],
                      cfg.scheduler, cfg.n_workers)
    if part.shards != tuple(range(codes.n_shards)):
        raise RuntimeError(f"the reduction folded shards {part.shards}, expected 0..{codes.n_shards - 1}")
    maps_SKP = np.zeros((plan.d_sae * plan.top_k, plan.n_patches), np.float32)
    for slots, maps in compute(maps_graph(codes.path, part.top, codes.images_per_shard, plan),
                               cfg.scheduler, cfg.n_workers):
        maps_SKP[slots] = maps

    _prepare_out_dir(cfg.out_dir)
    counts_CS = np.zeros((plan.n_classes, plan.d_sae), np.int64)
    counts_CS[part.count_classes] = part.counts_cS
    labels = label_statistics(part.top, plan.n_classes)
    table = _latent_table(part, labels, class_names, plan.class_token_index is not None, counts_CS.sum(0))

    import pyarrow.parquet as pq

    out = cfg.out_dir
    pq.write_table(table, out / files.LATENTS_FILE)
    _write_references(out / files.REFERENCES_DIR, part.top, maps_SKP.reshape(plan.d_sae, plan.top_k, *grid_hw),
                      store)
    np.save(out / files.CLASS_COUNTS_FILE, counts_CS)
    (out / files.CLASS_NAMES_FILE).write_text(json.dumps(class_names, indent=1))

    frequency = table.column("frequency").to_numpy(zero_copy_only=False)
    dead = table.column("dead").to_numpy(zero_copy_only=False)
    mean_act = np.asarray(table.column("mean_activation").to_numpy(zero_copy_only=False), float)
    config = {"top_k": cfg.top_k, "threshold": cfg.threshold, "scheduler": cfg.scheduler,
              "split_every": cfg.split_every}
    provenance = {"acts_config_sha256": store.config_sha256, "codes_config_sha256": codes.attrs["config_sha256"],
                  "acts_store": str(store.path.resolve()), "codes_store": str(codes.path.resolve()),
                  "layer": codes.attrs.get("layer"), "sae_weights_sha256": codes.attrs.get("sae_weights_sha256")}
    n_dead = int(dead.sum())
    summary = {
        "n_latents": plan.d_sae, "n_dead": n_dead, "fraction_dead": n_dead / plan.d_sae,
        "n_images": codes.n_images, "n_valid_images": part.n_valid, "n_classes": plan.n_classes,
        "frequency_quantiles": files.quantiles(frequency[~dead]),
        "mean_activation_quantiles": files.quantiles(mean_act[~dead]),
        "label_entropy_quantiles": files.quantiles(labels["label_entropy"]),
        "label_std_quantiles": files.quantiles(labels["label_std"]),
        "config": config, "provenance": provenance,
    }
    (out / files.SUMMARY_FILE).write_text(json.dumps(files.json_safe(summary), indent=2))

    plot_paths: tuple[Path, ...] = ()
    if cfg.plots:
        plot_paths = _plots(out, table, counts_CS, class_names, cfg.plot_classes)

    meta = {
        "stats_format_version": files.STATS_FORMAT_VERSION, "config": config, "provenance": provenance,
        "image_source": {"dataset": store.attrs.get(schema.ATTR_DATASET),
                         "preprocess": store.attrs.get(schema.ATTR_PREPROCESS),
                         "model": store.attrs.get(schema.ATTR_MODEL)},
        "token_layout": layout, "patch_grid": list(grid_hw), "d_sae": plan.d_sae, "top_k": plan.top_k,
        "n_images": codes.n_images, "n_valid_images": part.n_valid, "n_classes": plan.n_classes,
        "images_per_class": part.images_C.tolist(), "definitions": files.DEFINITIONS,
        "sae_values": codes.attrs.get("values"),
    }
    (out / files.META_FILE).write_text(json.dumps(files.json_safe(meta), indent=2))
    return Outputs(stats_dir=out, latents_path=out / files.LATENTS_FILE, references_path=out / files.REFERENCES_DIR,
                   class_counts_path=out / files.CLASS_COUNTS_FILE, class_names_path=out / files.CLASS_NAMES_FILE,
                   summary_path=out / files.SUMMARY_FILE, meta_path=out / files.META_FILE, plot_paths=plot_paths,
                   n_latents=plan.d_sae, n_dead=n_dead, n_valid_images=part.n_valid, n_shards=codes.n_shards,
                   seconds=time.perf_counter() - started)


def _write_references(path: Path, top: TopK, maps_SKHW: np.ndarray, store: ActivationStore) -> None:
    s, k = top.index_SK.shape
    ids_SK = np.full((s, k), "", dtype=object)
    filled = top.index_SK >= 0
    if filled.any():
        wanted = np.unique(top.index_SK[filled])
        found = store.group[schema.IMAGE_IDS].get_coordinate_selection(wanted)
        ids_SK[filled] = np.asarray(found, dtype=object)[np.searchsorted(wanted, top.index_SK[filled])]
    group = zarr.open_group(path, mode="w")
    block = max(1, min(s, 2**22 // max(1, k * maps_SKHW[0, 0].size)))  # ~16 MB of maps per chunk
    arrays = {"score": top.score_SK, "image_index": top.index_SK, "label": top.label_SK, "maps": maps_SKHW}
    for name, arr in arrays.items():
        group.create_array(name, shape=arr.shape, chunks=(block, *arr.shape[1:]), dtype=arr.dtype)[...] = arr
    ids = group.create_array("image_id", shape=(s, k), chunks=(block, k), dtype=str)
    ids[...] = ids_SK
    group.attrs.update({"definitions": {"maps": files.DEFINITIONS["maps"],
                                        "references": files.DEFINITIONS["references"]}})


# ---------------------------------------------------------------------------------------
# Plots


def _plots(out: Path, table, counts_CS: np.ndarray, class_names: list[str], plot_classes: int) -> tuple[Path, ...]:
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
    fig.savefig(out / files.PLOT_SCATTER, dpi=110)
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
    fig.savefig(out / files.PLOT_HISTOGRAMS, dpi=110)
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
    fig.savefig(out / files.PLOT_CLASS_TOP, dpi=100)
    plt.close(fig)
    return out / files.PLOT_SCATTER, out / files.PLOT_HISTOGRAMS, out / files.PLOT_CLASS_TOP


def summary(out: Outputs) -> str:
    return (f"statistics of {out.n_latents} latents ({out.n_dead} dead) over {out.n_valid_images} valid images "
            f"in {out.n_shards} shards, {out.seconds:.1f} s -> {out.stats_dir}")


STAGE = Stage(name="stats", config=Config, run=run, summary=summary, reads=("codes_dir", "cache_dir"),
              writes=("out_dir",),
              help="""Per-latent statistics (frequency, mean activation, references, label entropy, class counts).

    Out of core: one Dask task per code shard, partial results merged in a tree.""")
