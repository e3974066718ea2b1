"""The activation store: create, lock, resume, write whole shards, read back.

Layout and meaning of every array and attribute: FORMAT.md beside this file.
Crash safety comes from three rules: arrays are created full size with a NaN fill, a shard
is written in one write per array, and its ``done`` flag is set only after those writes.
Integrity comes from a fourth: each chunk's content digest is recorded with its shard, and
every read checks the chunks it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from cache import schema
from cache.digest import digest
from cache.errors import DamagedShard, UserError
from cache.shardfile import ShardReader, write_rows

log = logging.getLogger(__name__)
R = TypeVar("R")


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys), the identity of a store's content."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_layout(bytes_per_image: int, n_images: int, *, images_per_chunk: int | None = None,
                images_per_shard: int | None = None) -> tuple[int, int]:
    """Choose (images_per_chunk, images_per_shard): chunks ~3 MB, shards ~64 MB, shard a multiple of chunk."""
    if images_per_chunk is None:
        images_per_chunk = max(1, round(schema.TARGET_CHUNK_BYTES / bytes_per_image))
        images_per_chunk = min(images_per_chunk, max(1, n_images))
        if images_per_shard is not None and images_per_shard >= 1:  # the largest divisor of the shard
            images_per_chunk = min(images_per_chunk, images_per_shard)
            while images_per_shard % images_per_chunk:
                images_per_chunk -= 1
    if images_per_shard is None:
        chunks_per_shard = max(1, round(schema.TARGET_SHARD_BYTES / (images_per_chunk * bytes_per_image)))
        chunks_per_shard = min(chunks_per_shard, max(1, -(-n_images // images_per_chunk)))
        images_per_shard = images_per_chunk * chunks_per_shard
    if images_per_chunk < 1 or images_per_shard < 1:
        raise UserError("images per chunk and per shard must be at least 1")
    if images_per_shard % images_per_chunk:
        raise UserError(
            f"images per shard ({images_per_shard}) must be a multiple of images per chunk "
            f"({images_per_chunk}); change --shard-images or --chunk-images")
    return images_per_chunk, images_per_shard


_HELD_LOCK_FDS: set[int] = set()


def _drop_locks_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) closes its copies of the lock descriptors:
    an flock belongs to the open file, so a child outliving a killed writer would keep the
    store locked. Closing (never unlocking) leaves the parent's lock in place."""
    for fd in _HELD_LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _open_lock_file(path: Path) -> tuple[int, bool] | None:
    """(descriptor, whether this call made the file), or None when the last holder removed the file
    or its folder meanwhile (the caller tries again)."""
    for flags, made in ((os.O_CREAT | os.O_EXCL, True), (0, False)):
        try:
            return os.open(path, os.O_RDWR | flags, 0o644), made
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None
    return None


@contextlib.contextmanager
def _writable(folder: Path) -> Iterator[None]:
    """Refuse in one line a folder that cannot be written (read-only file system, no permission)."""
    try:
        yield
    except OSError as err:
        why = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}.get(err.errno)
        if why is None:
            raise
        raise UserError(f"{folder} cannot be written ({why}); choose another --out") from None


def _stale_temporaries(folder: Path) -> Iterator[Path]:
    """Temporary files of a writer killed mid-write: ours (cache/atomic.py) and zarr's (``<key>.<uuid>.partial``)."""
    yield from folder.rglob(".*.tmp-*")
    yield from (p for p in folder.rglob("*.partial") if re.fullmatch(r".+\.[0-9a-f]{32}\.partial", p.name))


class StoreLock:
    """Exclusive advisory lock on an output folder (a store, a run or a results folder); the kernel
    drops it if the holder dies.

    A second writer gets a UserError instead of interleaving writes with the first. A holder that
    added nothing to the folder (a refused run) removes the lock file and the folder if it made
    them, so a refusal leaves nothing behind. A folder that cannot be written is refused in one line.
    Forked children do not inherit it (``_drop_locks_in_child``).
    """

    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / schema.LOCK_FILE
        self._fd: int | None = None
        self._made_dir = self._made_file = False
        self._found: set[str] = set()

    def __enter__(self) -> StoreLock:
        folder = self.path.parent
        nearest = next(p for p in (folder, *folder.parents) if p.exists())  # the folder, or what it is made in
        if nearest == folder and not folder.is_dir():
            raise UserError(f"{folder} is a file; choose a folder for --out")
        if not nearest.is_dir():
            raise UserError(f"{nearest} is a file, so {folder} cannot be made in it; choose another --out")
        while True:
            self._made_dir = not folder.exists()
            with _writable(folder):
                folder.mkdir(parents=True, exist_ok=True)
                opened = _open_lock_file(self.path)
            if opened is None:
                continue
            fd, self._made_file = opened
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"{folder} is being written by another process (pid {holder}); "
                    "wait for it to finish or write to another --out") from None
            if self._still_linked(fd):
                break
            os.close(fd)  # its holder removed the file between our open and our flock: lock a new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        for stale in _stale_temporaries(folder):
            stale.unlink()
        self._found = self._entries()
        return self

    def _entries(self) -> set[str]:
        return {p.name for p in self.path.parent.iterdir()} - {schema.LOCK_FILE}

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        _HELD_LOCK_FDS.discard(self._fd)
        if self._made_file and self._entries() == self._found:  # nothing added: leave nothing behind
            self.path.unlink()  # while still locked, so no one else locks the file being removed
            if self._made_dir:
                self.path.parent.rmdir()
        else:  # the pid is only news while it is held: a finished folder hashes the same every run (DVC)
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def one_writer(run: Callable[[Any], R]) -> Callable[[Any], R]:
    """A stage's ``run(cfg)`` holding ``StoreLock(cfg.out_dir)`` from before its first byte: one writer per folder."""
    @functools.wraps(run)
    def locked_run(cfg: Any) -> R:
        with StoreLock(cfg.out_dir):
            return run(cfg)
    return locked_run


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """Everything needed to create an empty activation store."""

    layers: tuple[int, ...]  # block indices, 0-based, residual output
    n_tokens: int  # tokens per image (prefix tokens + patches)
    d_model: int  # residual width
    image_ids: Sequence[str]  # stable id of every row, in row order
    class_names: Sequence[str]  # label i names class_names[i]
    images_per_chunk: int
    images_per_shard: int
    config: Mapping[str, Any]  # the content-defining config; its sha256 identifies the store
    attrs: Mapping[str, Any]  # model, token layout, preprocessing, dataset, versions

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def config_sha256(self) -> str:
        return config_sha256(self.config)

    @property
    def nbytes(self) -> int:
        """Bytes of the activations once every shard is written (the other arrays are small beside them)."""
        itemsize = np.dtype(schema.ACTS_DTYPE).itemsize
        return self.n_images * self.n_tokens * self.d_model * itemsize * len(self.layers)


def _is_kind(path: Path, kind: str) -> bool:
    """True when ``path`` is a Zarr group whose ``kind`` attribute is ``kind``."""
    if not (Path(path) / "zarr.json").exists():
        return False
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is "not a store"
        return False
    return group.attrs.get(schema.ATTR_KIND) == kind


def _clear_dir(path: Path) -> None:
    """Remove everything in ``path`` but the lock file, which its writer holds."""
    for child in path.iterdir():
        if child.name == schema.LOCK_FILE:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _cut_short(path: Path) -> bool:
    """True when a writer was killed while creating the store at ``path`` (``_creating``'s marker is
    left): nothing in it is complete, so the next writer recreates it."""
    if not (path / schema.CREATING_FILE).exists():
        return False
    log.warning("%s was cut short while being created; creating it again", path)
    return True


@contextlib.contextmanager
def _creating(path: Path) -> Iterator[zarr.Group]:
    """A new group at ``path``, marked as being created until the caller's block completes.

    ``zarr.create_group`` adds to the folder; ``open_group(mode="w")`` would empty it, lock file
    included, and so admit a second writer.
    """
    marker = path / schema.CREATING_FILE
    path.mkdir(parents=True, exist_ok=True)
    marker.touch()
    yield zarr.create_group(path)
    marker.unlink()


def create_or_resume(path: Path, spec: StoreSpec, *, overwrite: bool = False) -> ActivationStore:
    """Open ``path`` for writing ``spec``: resume a store with the same config, else create it.

    The caller must hold the StoreLock. A store with another config is refused unless
    ``overwrite``; a non-empty directory that is not a store is always refused.
    """
    path = Path(path)
    existing = [p for p in path.iterdir() if p.name != schema.LOCK_FILE] if path.exists() else []
    if _cut_short(path):
        _clear_dir(path)
    elif existing:
        if not _is_kind(path, schema.KIND_ACTIVATIONS):
            raise UserError(
                f"{path} exists and is not an activation store; choose a new --out path "
                "(nothing was written)")
        store = ActivationStore(path)
        if store.config_sha256 == spec.config_sha256:
            n_done = int(store.done.sum())
            log.info("resuming %s: %d of %d shards already complete", path, n_done, store.n_shards)
            return store
        if not overwrite:
            raise UserError(
                f"{path} holds activations from another config (sha256 {store.config_sha256[:12]} vs "
                f"{spec.config_sha256[:12]}); pass --overwrite to replace it or choose a new --out")
        log.warning("--overwrite: deleting the store at %s written with another config", path)
        _clear_dir(path)
    with _creating(path) as group:
        _create(group, spec)
    return ActivationStore(path)


def _create(group: zarr.Group, spec: StoreSpec) -> None:
    n, s, c = spec.n_images, spec.images_per_shard, spec.images_per_chunk
    n_shards = -(-n // s)
    for layer in spec.layers:
        group.create_array(
            schema.acts_path(layer), shape=(n, spec.n_tokens, spec.d_model),
            chunks=(c, spec.n_tokens, spec.d_model), shards=(s, spec.n_tokens, spec.d_model),
            dtype=schema.ACTS_DTYPE, compressors=None, fill_value=np.nan,
            dimension_names=("N", "T", "D"))
    group.create_array(schema.LABELS, shape=(n,), chunks=(s,), dtype="int64", fill_value=-1,
                       compressors=ZstdCodec(), dimension_names=("N",))
    group.create_array(schema.VALID, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0,
                       compressors=ZstdCodec(), dimension_names=("N",))
    group.create_array(schema.DONE, shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                       compressors=None, dimension_names=("shard",))
    group.create_array(schema.CHECKSUMS, shape=(-(-n // c), len(spec.layers) + 1), chunks=(s // c, len(spec.layers) + 1),
                       dtype="uint64", fill_value=0, compressors=None, dimension_names=("chunk", "array"))
    ids = group.create_array(schema.IMAGE_IDS, shape=(n,), chunks=(s,), dtype=str,
                             compressors=ZstdCodec(), dimension_names=("N",))
    ids[:] = np.asarray(list(spec.image_ids), dtype=object)
    group.attrs.update({
        **spec.attrs,
        schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
        schema.ATTR_KIND: schema.KIND_ACTIVATIONS,
        schema.ATTR_CONFIG: dict(spec.config),
        schema.ATTR_CONFIG_SHA256: spec.config_sha256,
        schema.ATTR_LAYERS: list(spec.layers),
        schema.ATTR_CLASS_NAMES: list(spec.class_names),
        schema.ATTR_N_IMAGES: n,
        schema.ATTR_IMAGES_PER_CHUNK: c,
        schema.ATTR_IMAGES_PER_SHARD: s,
        schema.ATTR_SKIPPED: [],
    })


class ActivationStore:
    """Read access to an activation store plus the shard-level write used by extraction."""

    def __init__(self, path: Path | str, *, mode: str = "r+"):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise UserError(f"{self.path} is not an activation store (no zarr.json); "
                            "create one with `pipeline extract` or `pipeline import`")
        self.group = zarr.open_group(self.path, mode=mode)
        attrs = self.group.attrs.asdict()
        if attrs.get(schema.ATTR_KIND) != schema.KIND_ACTIVATIONS:
            raise UserError(f"{self.path} is a Zarr group but not an activation store "
                            f"(kind={attrs.get(schema.ATTR_KIND)!r})")
        version = attrs.get(schema.ATTR_FORMAT_VERSION)
        if version != schema.FORMAT_VERSION:
            raise UserError(
                f"{self.path} uses store format {version}, this pipeline reads format "
                f"{schema.FORMAT_VERSION}; re-extract it with this version")
        self.attrs: dict[str, Any] = attrs
        self._sums: np.ndarray | None = None
        self._meta: tuple[np.ndarray, np.ndarray] | None = None
        self._arrays: dict[int, zarr.Array] = {}
        self._readers: dict[int, ShardReader] = {}

    # -- metadata -----------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.attrs[schema.ATTR_LAYERS])

    @property
    def n_images(self) -> int:
        return int(self.attrs[schema.ATTR_N_IMAGES])

    @property
    def images_per_shard(self) -> int:
        return int(self.attrs[schema.ATTR_IMAGES_PER_SHARD])

    @property
    def images_per_chunk(self) -> int:
        return int(self.attrs[schema.ATTR_IMAGES_PER_CHUNK])

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.images_per_shard)

    @property
    def config_sha256(self) -> str:
        return str(self.attrs[schema.ATTR_CONFIG_SHA256])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs[schema.ATTR_CLASS_NAMES])

    @property
    def token_layout(self) -> dict[str, Any]:
        return dict(self.attrs[schema.ATTR_TOKEN_LAYOUT])

    @property
    def n_tokens(self) -> int:
        return int(self.acts(self.layers[0]).shape[1])

    @property
    def d_model(self) -> int:
        return int(self.acts(self.layers[0]).shape[2])

    def acts(self, layer: int) -> zarr.Array:
        """The ``(N, T, D)`` float16 activation array of one tapped block."""
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in {self.path} (it holds layers "
                            f"{self.layers}); extract it with --layers")
        if layer not in self._arrays:  # opening reads and parses its metadata: once per store object
            self._arrays[layer] = self.group[schema.acts_path(layer)]
        return self._arrays[layer]

    def _reader(self, layer: int) -> ShardReader:
        if layer not in self._readers:
            self._readers[layer] = ShardReader(self.acts(layer))
        return self._readers[layer]

    @property
    def labels(self) -> np.ndarray:
        return self._labels_valid()[0]

    @property
    def valid(self) -> np.ndarray:
        return self._labels_valid()[1].astype(bool)

    def _labels_valid(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's label and valid flag, checked against the digests of completed shards."""
        if self._meta is None:
            try:
                labels, valid = self.group[schema.LABELS][:], self.group[schema.VALID][:]
            except Exception:  # noqa: BLE001 - name the damaged shard
                for k in range(self.n_shards):
                    self.check_labels(k)
                raise
            for k in np.flatnonzero(self.done):
                self.check_labels(int(k), labels[self.shard_slice(int(k))], valid[self.shard_slice(int(k))])
            self._meta = labels, valid
        return self._meta

    def check_labels(self, shard: int, labels_N: np.ndarray | None = None, valid_N: np.ndarray | None = None) -> None:
        """Refuse a shard whose labels or valid flags cannot be read or do not match their digests."""
        sl, c = self.shard_slice(shard), self.images_per_chunk
        try:
            if labels_N is None:
                labels_N, valid_N = self.group[schema.LABELS][sl], self.group[schema.VALID][sl]
        except Exception as err:  # noqa: BLE001 - a truncated or overwritten chunk raises anything
            self._damaged(sl.start // c, f"its labels or valid flags cannot be read: {type(err).__name__}")
        sums = self.checksums[sl.start // c:, -1]
        for i in range(0, len(labels_N), c):
            if digest(labels_N[i:i + c], valid_N[i:i + c]) != sums[i // c]:
                self._damaged(sl.start // c, "its labels or valid flags do not match their checksum")

    @property
    def checksums(self) -> np.ndarray:
        """``(n_chunks, n_layers + 1)`` digests: one column per layer (``layers`` order), then labels+valid."""
        if self._sums is None:
            array = self.group[schema.CHECKSUMS]
            try:
                self._sums = array[:]
            except Exception:  # noqa: BLE001 - a damaged chunk: read shard by shard, its shards' digests
                self._sums = np.zeros(array.shape, np.uint64)  # stay 0 and so never match (p = 2^-64)
                for lo in range(0, array.shape[0], array.chunks[0]):
                    with contextlib.suppress(Exception):
                        self._sums[lo:lo + array.chunks[0]] = array[lo:lo + array.chunks[0]]
        return self._sums

    def _damaged(self, chunk: int, why: str) -> NoReturn:
        raise DamagedShard(self.path, chunk * self.images_per_chunk // self.images_per_shard, why)

    def read(self, layer: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` (whole chunks) of a layer's activations, each chunk checked against its digest.

        With ``out`` (C-contiguous, shaped like the rows) the bytes land there without a copy.
        """
        c = self.images_per_chunk
        if start % c or (stop % c and stop != self.n_images):
            raise ValueError(f"rows {start}:{stop} are not whole chunks of {c} images")
        array, reader, column = self.acts(layer), self._reader(layer), self.layers.index(layer)
        shard_rows = self.images_per_shard
        if out is None:
            out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
        digests: list[int] = []
        lo = start
        while lo < stop:  # one shard (one file) per read
            hi = min(stop, (lo // shard_rows + 1) * shard_rows)
            try:
                reader.read(lo, hi, out=out[lo - start:hi - start], chunk_digests=digests)
            except Exception as err:  # noqa: BLE001 - a truncated or overwritten file raises anything
                self._damaged(lo // c, f"layer {layer} cannot be read: {type(err).__name__}: {err}")
            lo = hi
        sums = self.checksums
        for j, got in enumerate(digests, start=start // c):
            if got != sums[j, column]:
                self._damaged(j, f"layer {layer}, images {j * c}..{min((j + 1) * c, stop) - 1} do not match "
                                 "their checksum")
        return out

    @property
    def done(self) -> np.ndarray:
        return self.group[schema.DONE][:].astype(bool)

    @property
    def image_ids(self) -> np.ndarray:
        return self.group[schema.IMAGE_IDS][:]

    def shard_slice(self, shard: int) -> slice:
        start = shard * self.images_per_shard
        return slice(start, min(start + self.images_per_shard, self.n_images))

    def incomplete_shards(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]

    def require_complete(self) -> None:
        """Refuse to read from a store some of whose shards were never written."""
        missing = self.incomplete_shards()
        if missing:
            raise UserError(
                f"{self.path} is incomplete ({len(missing)} of {self.n_shards} shards missing); "
                f"rerun the extraction to finish it, and see `pipeline verify {self.path}`")

    # -- writing --------------------------------------------------------------------
    def write_shard(self, shard: int, acts_by_layer: Mapping[int, np.ndarray],
                    labels_N: np.ndarray, valid_N: np.ndarray) -> None:
        """Write one whole shard (one write per array) and its chunks' digests, then mark it complete."""
        sl = self.shard_slice(shard)
        n, c = sl.stop - sl.start, self.images_per_chunk
        if set(acts_by_layer) != set(self.layers):
            raise ValueError(f"shard {shard} holds layers {sorted(acts_by_layer)}, the store {self.layers}")
        labels_N, valid_N = np.asarray(labels_N, np.int64), np.asarray(valid_N).astype(np.uint8)
        sums = np.zeros((-(-n // c), len(self.layers) + 1), np.uint64)
        for column, layer in enumerate(self.layers):
            acts_NTD = np.asarray(acts_by_layer[layer], dtype=schema.ACTS_DTYPE)
            if acts_NTD.shape[0] != n:
                raise ValueError(f"shard {shard} of layer {layer} has {acts_NTD.shape[0]} rows, expected {n}")
            write_rows(self.acts(layer), sl.start, acts_NTD)
            sums[:, column] = [digest(acts_NTD[i:i + c]) for i in range(0, n, c)]
        sums[:, -1] = [digest(labels_N[i:i + c], valid_N[i:i + c]) for i in range(0, n, c)]
        self.group[schema.LABELS][sl] = labels_N
        self.group[schema.VALID][sl] = valid_N
        self.group[schema.CHECKSUMS][sl.start // c:sl.start // c + len(sums)] = sums
        self.group[schema.DONE][shard] = 1

    def invalidate(self, shards: Sequence[int]) -> None:
        """Mark shards incomplete, so the next run of the command that wrote the store recomputes them."""
        done = self.group[schema.DONE]
        for k in shards:
            done[int(k)] = 0

    def set_attrs(self, **attrs: Any) -> None:
        """Update group attributes; only the single process holding the lock may call this."""
        self.group.attrs.update(attrs)
        self.attrs.update(attrs)
