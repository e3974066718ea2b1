"""Per-latent statistics as mergeable partials: the algebra behind `pipeline stats`.

Definitions: SCIENCE.md "Per-latent statistics", written out in ``pipeline.latents.DEFINITIONS``.

A shard of codes becomes a ``Partial`` whose size depends on the number of latents and classes,
never on the number of images; ``merge`` of partials of disjoint shards is the partial of their
union, so any reduction tree gives the same statistics. All per-image work is sparse: image-level
activations exist only for the (image, latent) pairs that occur in the codes. The Dask graph
lives here too, so that its module-level tasks can be pickled by every scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.callbacks import Callback

from cache import schema
from cache.codes import CodeStore, ShardCodes
from cache.errors import UserError
from cache.store import ActivationStore
from pipeline.latents import LATENT_COLUMNS
from pipeline.progress import Progress
from pipeline.threads import available_cpus, use_threads, worker_share

VARIANTS = ("mean", "cls", "max_patch")

@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What every shard task needs to know (small and picklable)."""

    n_tokens: int  # T
    d_sae: int  # S
    n_classes: int  # C
    class_token_index: int | None  # None when the tokens have no class token
    n_prefix_tokens: int  # patches are tokens n_prefix_tokens .. T - n_prompt_tokens - 1
    top_k: int  # K
    threshold: float
    n_prompt_tokens: int = 0  # an adapted model's vision prompt tokens kept after the patches: in the image mean and
                              # the class counts (every token, as the paper's reference), never patches

    @property
    def n_patches(self) -> int:
        return self.n_tokens - self.n_prefix_tokens - self.n_prompt_tokens


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
    count_classes: np.ndarray  # int64 sorted class ids; row r of counts_CS is class count_classes[r]
    counts_CS: np.ndarray  # int64 tokens with f_j > threshold, only the rows of the classes seen
    top: TopK

    @property
    def nbytes(self) -> int:
        arrays = [self.images_C, self.count_classes, self.counts_CS, *self.n_active.values(),
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
    counts_CS = np.bincount(row * s + latent[above][labelled],
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
    pos = pos[order]
    val, patch = val[order], (pos >= plan.n_prefix_tokens) & (pos < plan.n_prefix_tokens + plan.n_patches)
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
                   count_classes=count_classes.astype(np.int64), counts_CS=counts_CS.astype(np.int64), top=top)


def merge(parts: list[Partial], *, d_sae: int, top_k: int) -> Partial:
    """One partial for the union of ``parts`` (whose shards must be disjoint)."""
    if len(parts) == 1:
        return parts[0]
    shards = tuple(sorted(k for p in parts for k in p.shards))
    if len(set(shards)) != len(shards):
        raise ValueError(f"shards merged twice: {shards}")
    classes = np.unique(np.concatenate([p.count_classes for p in parts]))
    counts_CS = np.zeros((len(classes), d_sae), np.int64)
    for p in parts:
        counts_CS[np.searchsorted(classes, p.count_classes)] += p.counts_CS
    cand = [(np.nonzero(p.top.index_SK >= 0), p.top) for p in parts]
    top = select_top(np.concatenate([at[0] for at, _ in cand]),
                     np.concatenate([t.score_SK[at] for at, t in cand]),
                     np.concatenate([t.index_SK[at] for at, t in cand]),
                     np.concatenate([t.label_SK[at] for at, t in cand]), d_sae, top_k)
    return Partial(shards=shards, n_valid=sum(p.n_valid for p in parts),
                   images_C=sum(p.images_C for p in parts),
                   n_active={v: sum(p.n_active[v] for p in parts) for v in VARIANTS},
                   sum_active={v: sum(p.sum_active[v] for p in parts) for v in VARIANTS},
                   count_classes=classes, counts_CS=counts_CS, top=top)


def reference_maps(codes: ShardCodes, local_images: np.ndarray, latents: np.ndarray, *, plan: Plan) -> np.ndarray:
    """``(m, P)`` float32: f of latent ``latents[r]`` on each patch token of local image ``local_images[r]``."""
    t, p0, p = plan.n_tokens, plan.n_prefix_tokens, plan.n_patches
    out = np.zeros((len(latents), p), np.float32)
    ptr = codes.token_ptr
    for i in np.unique(local_images):
        rows = np.flatnonzero(local_images == i)
        lo, hi = ptr[i * t + p0], ptr[i * t + p0 + p]
        idx = codes.indices[lo:hi]
        patch = np.repeat(np.arange(p), np.diff(ptr[i * t + p0:i * t + p0 + p + 1]))
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


def compute(objs: list, scheduler: str, n_workers: int | None, desc: str | None = None, bar: bool = True,
            threads: int | None = None) -> tuple:
    """``dask.compute`` on a local scheduler or a dask.distributed address. With ``desc``, the local
    scheduler's tasks are counted: a progress bar (unless not ``bar``) and the time estimate (a
    cluster shows its progress on its dashboard). A local scheduler's ``n_workers`` (default: one per
    thread) share ``threads`` (default: the CPUs this process may use): each worker thread or process
    runs torch, OpenMP and BLAS at its share, so together they fill the CPUs and no more."""
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
    workers = 1 if scheduler == "synchronous" else n_workers or (threads or available_cpus())
    kwargs = {} if scheduler == "synchronous" else {"num_workers": workers}
    with use_threads(worker_share(threads, workers)), _TaskProgress(desc, bar) if desc else contextlib.nullcontext():
        return dask.compute(*objs, scheduler=scheduler, **kwargs)  # spawned processes inherit the share's environment


class _TaskProgress(Callback):
    """Our progress bar (and its time estimate) over the tasks of a local Dask computation."""

    def __init__(self, desc: str, enabled: bool):
        super().__init__()
        self.desc, self.enabled, self.bar = desc, enabled, None

    def _start_state(self, dsk, state) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self.bar = Progress(total=total, desc=self.desc, unit="task", enabled=self.enabled)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.bar.update(1)

    def _finish(self, dsk, state, errored) -> None:
        self.bar.close()



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



def latent_table(part: Partial, labels: dict[str, np.ndarray], class_names: list[str], has_cls: bool,
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
    return pa.table({name: cols[name] for name in LATENT_COLUMNS})
