"""The sparse code store (``codes.zarr``): every token's nonzero SAE latents, CSR-like.

Layout (format described in FORMAT.md, "Sparse code store"): image shards of the source
activation store map one to one onto code shards. Shard ``k`` is a group
``shards/<k>`` with three zstd-compressed arrays:

- ``token_ptr`` int64 ``(n_images_in_shard * T + 1,)``: token ``t`` of local image ``i`` owns
  entries ``token_ptr[i*T + t] : token_ptr[i*T + t + 1]``;
- ``indices`` int32 ``(nnz,)``: latent ids, ascending within a token;
- ``values`` float32 ``(nnz,)``: their activations (the SAE's ``encode`` output).

Since the number of nonzeros is unknown until a shard is encoded, each shard's arrays are
created by the one process that writes it, then its digest is recorded in ``checksums[k]``
and ``done[k]`` is set; a killed shard is rewritten whole by the next run, and every read of
a shard is checked against its digest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from cache import schema
from cache.digest import digest
from cache.errors import DamagedShard, UserError
from cache.store import _clear_dir, _creating, _cut_short, _is_kind


def shard_group(k: int) -> str:
    return f"{schema.CODES_SHARDS}/{k:06d}"


@dataclasses.dataclass(frozen=True)
class ShardCodes:
    """One shard's CSR codes."""

    token_ptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    def dense(self, d_sae: int, token_start: int = 0, token_stop: int | None = None) -> np.ndarray:
        """Dense ``(tokens, S)`` float32 codes of local tokens ``token_start:token_stop``."""
        stop = len(self.token_ptr) - 1 if token_stop is None else token_stop
        lo, hi = self.token_ptr[token_start], self.token_ptr[stop]
        out = np.zeros((stop - token_start, d_sae), np.float32)
        rows = np.repeat(np.arange(stop - token_start), np.diff(self.token_ptr[token_start:stop + 1]))
        out[rows, self.indices[lo:hi]] = self.values[lo:hi]
        return out


class CodeStore:
    """Read (and, for the encode stage, write) a sparse code store."""

    def __init__(self, path: Path | str, *, mode: str = "r"):
        self.path = Path(path)
        if not _is_kind(self.path, schema.KIND_CODES):
            raise UserError(f"{self.path} is not a sparse code store; write one with `pipeline encode`")
        self.group = zarr.open_group(self.path, mode=mode)
        self.attrs: dict[str, Any] = self.group.attrs.asdict()
        if self.attrs.get(schema.ATTR_FORMAT_VERSION) != schema.FORMAT_VERSION:
            raise UserError(f"{self.path} uses code-store format {self.attrs.get(schema.ATTR_FORMAT_VERSION)}, "
                            f"this pipeline reads {schema.FORMAT_VERSION}; re-encode it")

    @classmethod
    def create_or_resume(cls, path: Path, *, n_images: int, n_tokens: int, d_sae: int, images_per_shard: int,
                         attrs: Mapping[str, Any], identity: str, overwrite: bool) -> CodeStore:
        """Resume a store with the same ``identity`` (sha256 of what defines its content), else create."""
        path = Path(path)
        existing = [p for p in path.iterdir() if p.name != schema.LOCK_FILE] if path.exists() else []
        if _cut_short(path):
            _clear_dir(path)
        elif existing:
            if not _is_kind(path, schema.KIND_CODES):
                raise UserError(f"{path} exists and is not a code store; choose a new --out path")
            store = cls(path, mode="r+")
            if store.attrs[schema.ATTR_CONFIG_SHA256] == identity:
                return store
            if not overwrite:
                raise UserError(f"{path} holds codes of another SAE or store; pass --overwrite or choose a new --out")
            _clear_dir(path)
        n_shards = -(-n_images // images_per_shard)
        with _creating(path) as group:
            group.create_array(schema.DONE, shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                               compressors=None)
            group.create_array(schema.CHECKSUMS, shape=(n_shards,), chunks=(1,), dtype="uint64", fill_value=0,
                               compressors=None)
            group.attrs.update({**attrs, schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
                                schema.ATTR_KIND: schema.KIND_CODES, schema.ATTR_CONFIG_SHA256: identity,
                                schema.ATTR_N_IMAGES: n_images, "n_tokens": n_tokens, "d_sae": d_sae,
                                schema.ATTR_IMAGES_PER_SHARD: images_per_shard})
        return cls(path, mode="r+")

    @property
    def n_images(self) -> int:
        return int(self.attrs[schema.ATTR_N_IMAGES])

    @property
    def n_tokens(self) -> int:
        return int(self.attrs["n_tokens"])

    @property
    def d_sae(self) -> int:
        return int(self.attrs["d_sae"])

    @property
    def images_per_shard(self) -> int:
        return int(self.attrs[schema.ATTR_IMAGES_PER_SHARD])

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.images_per_shard)

    @property
    def done(self) -> np.ndarray:
        return self.group[schema.DONE][:].astype(bool)

    def incomplete_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]

    def require_complete(self) -> None:
        missing = self.incomplete_shards()
        if missing:
            raise UserError(f"{self.path} is incomplete ({len(missing)} of {self.n_shards} shards missing); "
                            f"rerun `pipeline encode` to finish it, and see `pipeline verify {self.path}`")

    def write_shard(self, k: int, codes: ShardCodes) -> None:
        """Write shard ``k``'s arrays (replacing any half-written ones), then mark it done."""
        g = self.group.require_group(shard_group(k))
        for name in schema.CODES_ARRAYS:
            arr = getattr(codes, name)
            g.create_array(name, shape=arr.shape, chunks=(max(1, min(len(arr), 2**20)),), dtype=arr.dtype,
                           compressors=ZstdCodec(level=3), overwrite=True)[:] = arr
        self.group[schema.CHECKSUMS][k] = digest(*(getattr(codes, name) for name in schema.CODES_ARRAYS))
        self.group[schema.DONE][k] = 1

    def invalidate(self, shards: list[int]) -> None:
        """Mark shards incomplete, so the next `pipeline encode` into this store recomputes them."""
        for k in shards:
            self.group[schema.DONE][int(k)] = 0

    def read_shard(self, k: int) -> ShardCodes:
        """Shard ``k``'s codes, checked against the digest recorded when it was written."""
        try:
            g = self.group[shard_group(k)]
            codes = ShardCodes(*(g[name][:] for name in schema.CODES_ARRAYS))
            recorded = int(self.group[schema.CHECKSUMS][k])
        except Exception as err:  # noqa: BLE001 - a damaged chunk raises anything from zarr or zstd
            self._damaged(k, f"it cannot be read: {type(err).__name__}: {err}")
        if digest(codes.token_ptr, codes.indices, codes.values) != recorded:
            self._damaged(k, "its content does not match its checksum")
        return codes

    def _damaged(self, k: int, why: str) -> NoReturn:
        raise DamagedShard(self.path, k, why)

    def image(self, i: int) -> np.ndarray:
        """Dense ``(T, S)`` float32 codes of image ``i``: one shard's pointers and one slice read."""
        if not 0 <= i < self.n_images:
            raise UserError(f"image {i} is out of range (the store holds {self.n_images} images)")
        k, local = divmod(i, self.images_per_shard)
        if not self.done[k]:
            raise UserError(f"image {i} is in shard {k}, which was never encoded; rerun `pipeline encode`")
        g = self.group[shard_group(k)]
        t = self.n_tokens
        ptr = g["token_ptr"][local * t: (local + 1) * t + 1]
        part = ShardCodes(ptr - ptr[0], g["indices"][ptr[0]:ptr[-1]], g["values"][ptr[0]:ptr[-1]])
        return part.dense(self.d_sae)

    def shards(self) -> Iterator[tuple[int, ShardCodes]]:
        self.require_complete()
        for k in range(self.n_shards):
            yield k, self.read_shard(k)

    def latent(self, j: int) -> np.ndarray:
        """Latent ``j``'s activation on every token of every image, ``(N, T)`` float32."""
        if not 0 <= j < self.d_sae:
            raise UserError(f"latent {j} is out of range (the SAE has {self.d_sae} latents)")
        out = np.zeros((self.n_images, self.n_tokens), np.float32)
        flat = out.reshape(-1)
        for k, codes in self.shards():
            hit = np.flatnonzero(codes.indices == j)
            tokens = np.searchsorted(codes.token_ptr, hit, side="right") - 1
            flat[k * self.images_per_shard * self.n_tokens + tokens] = codes.values[hit]
        return out
