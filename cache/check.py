"""Integrity check (``pipeline verify``) and description (``pipeline info``) of a store."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cache import schema
from cache.errors import DamagedShard
from cache.layout import patch_slice
from cache.space import human_bytes
from cache.store import ActivationStore, _is_kind


def _repair_line(path: Path, shards: list[int]) -> str:
    return (f"REPAIR: `pipeline repair {path}` recomputes the {len(shards)} damaged shard"
            f"{'s' if len(shards) > 1 else ''} ({_listing(shards)})")


def _listing(items: list[int], limit: int = 20) -> str:
    return ", ".join(map(str, items[:limit])) + (" ..." if len(items) > limit else "")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found; ``ok`` only when every shard is complete, intact and sane."""

    path: Path
    n_images: int
    n_shards: int
    incomplete_shards: list[int]
    damaged: dict[int, list[str]]  # shard -> why it cannot be trusted (unreadable, checksum mismatch)
    nan_rows: dict[int, list[int]]  # layer -> rows holding NaN inside completed shards
    zero_rows: dict[int, list[int]]  # layer -> valid rows that are all zeros
    bad_labels: list[int]  # valid rows whose label is outside the class list
    row_count_mismatch: str | None  # arrays whose length disagrees with image_ids
    n_invalid: int  # rows of unreadable source images (expected, not an error)

    @property
    def ok(self) -> bool:
        return not (self.incomplete_shards or self.damaged or any(self.nan_rows.values())
                    or any(self.zero_rows.values()) or self.bad_labels or self.row_count_mismatch)

    @property
    def repairable(self) -> list[int]:
        """Shards that recomputing fixes: the damaged ones (NaN or zero rows that match their digests
        were written that way, and would be again)."""
        return sorted(self.damaged)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.n_images} images in {self.n_shards} shards"]
        if self.incomplete_shards:
            out.append(f"INCOMPLETE: {len(self.incomplete_shards)} shards never finished "
                       f"({_listing(self.incomplete_shards)}); rerun the command that wrote the store to finish them")
        for shard, why in self.damaged.items():
            out.append(f"DAMAGED: shard {shard}: {'; '.join(why)}")
        for kind, rows_by_layer in (("NaN", self.nan_rows), ("all-zero", self.zero_rows)):
            for layer, rows in rows_by_layer.items():
                if rows:
                    out.append(f"BAD: layer {layer} has {len(rows)} {kind} rows in completed shards "
                               f"(first: {rows[:10]})")
        if self.bad_labels:
            out.append(f"BAD: {len(self.bad_labels)} rows have labels outside the class list (first: {self.bad_labels[:10]})")
        if self.row_count_mismatch:
            out.append(f"BAD: {self.row_count_mismatch}")
        if self.n_invalid:
            out.append(f"note: {self.n_invalid} rows are unreadable source images, marked invalid and skipped by readers")
        if self.repairable:
            out.append(_repair_line(self.path, self.repairable))
        out.append("OK" if self.ok else "FAILED")
        return out


@dataclasses.dataclass(frozen=True)
class CodeVerifyReport:
    """What ``verify`` found in a sparse code store."""

    path: Path
    n_shards: int
    incomplete_shards: list[int]
    damaged: dict[int, list[str]]  # shard -> what is wrong with it

    @property
    def ok(self) -> bool:
        return not (self.incomplete_shards or self.damaged)

    @property
    def repairable(self) -> list[int]:
        return sorted(self.damaged)

    def lines(self) -> list[str]:
        out = [f"{self.path}: sparse codes in {self.n_shards} shards"]
        if self.incomplete_shards:
            out.append(f"INCOMPLETE: {len(self.incomplete_shards)} shards never encoded "
                       f"({_listing(self.incomplete_shards)}); rerun `pipeline encode`")
        out += [f"DAMAGED: shard {k}: {'; '.join(why)}" for k, why in self.damaged.items()]
        if self.repairable:
            out.append(_repair_line(self.path, self.repairable))
        out.append("OK" if self.ok else "FAILED")
        return out


def verify_codes(path: Path | str) -> CodeVerifyReport:
    """Every completed shard readable and equal to its digest; pointers monotone and sized to the shard,
    latent ids in range, values finite and positive."""
    from cache.codes import CodeStore

    codes = CodeStore(path)
    damaged: dict[int, list[str]] = {}
    for k in map(int, np.flatnonzero(codes.done)):
        n_img = min(codes.images_per_shard, codes.n_images - k * codes.images_per_shard)
        try:
            c = codes.read_shard(k)
        except DamagedShard as err:
            damaged[k] = [err.why]
            continue
        if len(c.token_ptr) != n_img * codes.n_tokens + 1 or c.token_ptr[0] != 0 or np.any(np.diff(c.token_ptr) < 0):
            damaged[k] = [f"token pointers do not describe {n_img} images x {codes.n_tokens} tokens"]
        elif c.token_ptr[-1] != len(c.indices) or len(c.indices) != len(c.values):
            damaged[k] = [f"{c.token_ptr[-1]} entries announced, {len(c.indices)} stored"]
        elif len(c.indices) and (c.indices.min() < 0 or c.indices.max() >= codes.d_sae):
            damaged[k] = [f"latent ids outside 0..{codes.d_sae - 1}"]
        elif not (np.isfinite(c.values).all() and (c.values > 0).all()):
            damaged[k] = ["values that are NaN, inf or not positive"]
    return CodeVerifyReport(path=codes.path, n_shards=codes.n_shards, incomplete_shards=codes.incomplete_shards(),
                            damaged=damaged)


def verify(path: Path | str) -> VerifyReport | CodeVerifyReport:
    """Read every completed shard once, check it against its digests and for NaN/zero rows; memory is
    one shard of one layer."""
    if _is_kind(Path(path), schema.KIND_CODES):
        return verify_codes(path)
    store = ActivationStore(path, mode="r")
    n = store.n_images
    done = store.done
    lengths = {name: store.group[name].shape[0] for name in (schema.LABELS, schema.VALID, schema.IMAGE_IDS)}
    lengths.update({f"acts/{layer}": store.acts(layer).shape[0] for layer in store.layers})
    empty: dict[int, list[int]] = {}
    if any(v != n for v in lengths.values()):  # rows cannot be checked against each other
        return VerifyReport(path=store.path, n_images=n, n_shards=store.n_shards,
                            incomplete_shards=store.incomplete_shards(), damaged={}, nan_rows=empty,
                            zero_rows=empty, bad_labels=[], n_invalid=0,
                            row_count_mismatch=f"row counts disagree with n_images={n}: {lengths}")
    damaged: dict[int, list[str]] = {}
    nan_rows: dict[int, list[int]] = {layer: [] for layer in store.layers}
    zero_rows: dict[int, list[int]] = {layer: [] for layer in store.layers}
    labels = np.full(n, -1, np.int64)
    valid = np.zeros(n, bool)
    for shard in map(int, np.flatnonzero(done)):
        sl = store.shard_slice(shard)
        try:
            labels[sl], valid[sl] = store.group[schema.LABELS][sl], store.group[schema.VALID][sl]
            store.check_labels(shard, labels[sl], valid[sl].astype(np.uint8))
        except Exception as err:  # noqa: BLE001 - zarr/zstd errors of a damaged chunk, or our refusal
            damaged.setdefault(shard, []).append(err.why if isinstance(err, DamagedShard) else
                                                 f"labels or valid flags cannot be read: {type(err).__name__}")
        for layer in store.layers:
            try:
                acts_NTD = store.read(layer, sl.start, sl.stop)
            except DamagedShard as err:
                damaged.setdefault(shard, []).append(err.why)
                continue
            rows = np.arange(sl.start, sl.stop)
            nan_rows[layer] += rows[np.isnan(acts_NTD).any(axis=(1, 2))].tolist()
            zero_rows[layer] += rows[~acts_NTD.any(axis=(1, 2)) & valid[sl]].tolist()
    in_done = np.repeat(done, store.images_per_shard)[:n]
    bad_labels = np.flatnonzero(in_done & valid & ((labels < 0) | (labels >= len(store.class_names)))).tolist()
    return VerifyReport(path=store.path, n_images=n, n_shards=store.n_shards,
                        incomplete_shards=store.incomplete_shards(), damaged=damaged, nan_rows=nan_rows,
                        zero_rows=zero_rows, bad_labels=bad_labels, row_count_mismatch=None,
                        n_invalid=int((in_done & ~valid).sum()))


def _sample_rows(store: ActivationStore, max_chunks: int) -> list[slice]:
    """Whole chunks spread evenly over the completed shards (chunk reads are the fast ones)."""
    c = store.images_per_chunk
    done_rows = np.repeat(store.done, store.images_per_shard)[: store.n_images]
    starts = [s for s in range(0, store.n_images, c) if done_rows[s]]
    if not starts:
        return []
    pick = np.unique(np.linspace(0, len(starts) - 1, min(max_chunks, len(starts))).round().astype(int))
    return [slice(starts[i], min(starts[i] + c, store.n_images)) for i in pick]


def token_norm_stats(store: ActivationStore, max_chunks: int = 16) -> dict[str, Any]:
    """L2 norms of class, patch (and any prompt) tokens per layer on a sample, so outlier tokens show before
    training."""
    layout = store.token_layout
    cls = layout.get("class_token_index")  # None for stores of single tokens (an imported (n, d) array)
    patches = patch_slice(layout, store.n_tokens)
    rows = _sample_rows(store, max_chunks)
    valid = store.valid
    out: dict[str, Any] = {}
    for layer in store.layers:
        chunks = [store.read(layer, sl.start, sl.stop)[valid[sl]] for sl in rows]
        acts_NTD = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 1, 1), np.float32)
        if len(acts_NTD) == 0:
            out[str(layer)] = {"n_images_sampled": 0}
            continue
        norms_NT = np.linalg.norm(acts_NTD, axis=2)
        kinds = {"class": norms_NT[:, int(cls)] if cls is not None else norms_NT[:, :0],
                 "patches": norms_NT[:, patches].ravel(), "prompts": norms_NT[:, patches.stop:].ravel()}
        stats = {k: {"mean": float(v.mean()), "median": float(np.median(v)), "p99": float(np.percentile(v, 99)),
                     "max": float(v.max())} for k, v in kinds.items() if v.size}
        mean_abs_D = np.abs(acts_NTD[:, patches]).mean(axis=(0, 1))
        top = np.argsort(mean_abs_D)[::-1][:3]
        stats["outlier_dims"] = [{"dim": int(d), "mean_abs_over_median": float(mean_abs_D[d] / max(np.median(mean_abs_D), 1e-12))}
                                 for d in top]
        stats["n_images_sampled"] = int(len(acts_NTD))
        out[str(layer)] = stats
    return out


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: Path | str) -> dict[str, Any]:
    """What ``pipeline info`` prints: model, data, layout, completeness, size, token norms."""
    store = ActivationStore(path, mode="r")
    first = store.acts(store.layers[0])
    a = store.attrs
    return {
        "path": str(store.path),
        "model": a[schema.ATTR_MODEL],
        "dataset": a[schema.ATTR_DATASET],
        "n_classes": len(store.class_names),
        "layers": store.layers,
        "shape_NTD": list(first.shape),
        "dtype": str(first.dtype),
        "chunk_images": store.images_per_chunk,
        "shard_images": store.images_per_shard,
        "shards_complete": f"{int(store.done.sum())}/{store.n_shards}",
        "invalid_rows": int((~store.valid).sum()) if store.done.all() else None,
        "token_layout": store.token_layout,
        "size_bytes": _disk_bytes(store.path),
        "config_sha256": store.config_sha256,
        "format_version": a[schema.ATTR_FORMAT_VERSION],
        "token_norms": token_norm_stats(store),
    }


def _class_token(layout: dict[str, Any]) -> str:
    index = layout.get("class_token_index")
    return "no class token" if index is None else f"class token at {index}"


def describe_lines(d: dict[str, Any]) -> list[str]:
    """``describe``'s record as the lines ``pipeline info`` prints."""
    m, ds, t = d["model"], d["dataset"], d["token_layout"]
    lines = [f"store        {d['path']}  (format {d['format_version']}, config {d['config_sha256'][:12]})",
             f"model        {m['name']} / {m['pretrained']}  ({m['n_blocks']} "
             f"{'stages' if m.get('tower') == 'convnext' else 'blocks'}, width {m['d_model']}, {m['dtype']})",
             f"dataset      {ds['name']} split={ds['split']} root={ds['root']}  ({d['n_classes']} classes)",
             f"layers       {d['layers']}  ({m['layer_convention']})",
             f"shape NTD    {d['shape_NTD']} {d['dtype']}; chunks of {d['chunk_images']} images, "
             f"shards of {d['shard_images']}",
             f"tokens       {_class_token(t)}, patch grid {t['patch_grid']} ({t['patch_order']})",
             f"complete     {d['shards_complete']} shards; invalid rows: {d['invalid_rows']}",
             f"size         {human_bytes(d['size_bytes'])}"]
    for layer, s in d["token_norms"].items():
        if not s["n_images_sampled"]:
            continue
        lines.append(f"layer {layer} norms ({s['n_images_sampled']} images sampled):")
        for kind in [k for k in ("class", "patches") if k in s]:
            k = s[kind]
            lines.append(f"  {kind:8s} mean {k['mean']:8.2f}  median {k['median']:8.2f}  p99 {k['p99']:8.2f}  "
                         f"max {k['max']:8.2f}")
        dims = ", ".join(f"{o['dim']} ({o['mean_abs_over_median']:.1f}x)" for o in s["outlier_dims"])
        lines.append(f"  largest patch dims by mean |x| (x median dim): {dims}")
    return lines
