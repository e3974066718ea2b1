"""``pipeline import``: turn activations made elsewhere into a store of the same protocol.

Accepts ``.npy``, ``.npz`` (one array, or ``--key``) and raw memmaps (``--shape``/``--dtype``),
shaped ``(n, d)`` (each row one token, stored as images of one token) or ``(n, t, d)``
(images × tokens). Reads shard by shard, so memory stays at one shard; resumable and
locked like extraction. Every row is checked before the store is made, so a refused array
leaves nothing; pickled (object) arrays are never loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cache import schema, space
from cache.errors import UserError
from cache.store import StoreLock, StoreSpec, create_or_resume, plan_layout
from pipeline.configs import Option, Stage, writer_record
from pipeline.progress import next_steps

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Where the array is and what it is."""

    OPTIONS: ClassVar = {"source_path": Option("SOURCE"), "n_prefix_tokens": Option("--prefix-tokens"),
                         "images_per_chunk": Option("--chunk-images"), "images_per_shard": Option("--shard-images")}

    source_path: Path  # identity: .npy, .npz or raw file
    out_dir: Path  # store directory to create or resume
    shape: tuple[int, ...] | None = None  # identity: raw files: n,d (tokens) or n,t,d (images x tokens)
    dtype: str = "float16"  # identity: raw files only: element type
    key: str | None = None  # identity: .npz only: which array (default: the only one)
    labels_path: Path | None = None  # identity: .npy of one integer label per row
    class_names: tuple[str, ...] = ()  # identity: comma-separated names of the labels (default: class_0, class_1, ...)
    n_prefix_tokens: int | None = None  # identity: tokens before the patches (default 1 = class token first for n,t,d; 0 for n,d)
    layer: int = 0  # identity: block index to file the activations under
    model: str = "imported"  # identity: name of the model that produced them, recorded in the store
    images_per_chunk: int | None = None  # identity: rows per Zarr chunk (default: ~3 MB chunks)
    images_per_shard: int | None = None  # identity: rows per shard file (default: ~64 MB shards)
    overwrite: bool = False  # replace a store written from another source


@dataclasses.dataclass(frozen=True)
class Outputs:
    store_dir: Path
    n_images: int
    n_tokens: int
    d_model: int
    seconds: float


def _unpickled(path: Path, load: Callable[[], Any], kind: str) -> Any:
    """``load()`` of a numpy file, refusing pickles: unpickling runs code stored in the file, so import never does."""
    try:
        return load()
    except (ValueError, EOFError):  # numpy's errors for object arrays, pickles and files of another format
        raise UserError(f"{path} is not {kind} of numbers (it holds Python objects, which import never unpickles, "
                        "or is not a numpy file at all); save the array with np.save(path, array.astype(np.float32))"
                        ) from None


def _require_real(path: Path, dtype: np.dtype) -> None:
    """Refuse values that are not real numbers rather than cast them (a complex array would lose its imaginary part)."""
    if dtype.kind not in "fiu":
        lost = " (the imaginary part would be lost)" if dtype.kind == "c" else ""
        raise UserError(f"{path} holds {dtype} values, not real numbers{lost}; convert the array to floats "
                        "(e.g. array.astype(np.float32)) before importing")


def _load_npy(path: Path) -> np.ndarray:
    array = _unpickled(path, lambda: np.load(path, mmap_mode="r", allow_pickle=False), "a .npy array")
    _require_real(path, array.dtype)
    return array


def _open_array(cfg: Config) -> np.ndarray:
    path = Path(cfg.source_path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a .npy, .npz or raw array file")
    if path.suffix == ".npy":
        return _load_npy(path)
    if path.suffix == ".npz":
        archive = _unpickled(path, lambda: np.load(path, allow_pickle=False), "a .npz archive")
        keys = list(archive.keys())
        key = cfg.key or (keys[0] if len(keys) == 1 else None)
        if key not in keys:
            raise UserError(f"{path} holds arrays {keys}; choose one with --key")
        array = _unpickled(path, lambda: archive[key], "a .npz archive")
        _require_real(path, array.dtype)
        return array
    if cfg.shape is None:
        raise UserError(f"{path} is a raw file: give its --shape (n,d or n,t,d) and --dtype")
    try:
        dtype = np.dtype(cfg.dtype)
    except TypeError:
        raise UserError(f"--dtype {cfg.dtype} is not a numpy element type; use e.g. float16 or float32") from None
    _require_real(path, dtype)
    expected = int(np.prod(cfg.shape)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise UserError(f"{path} has {path.stat().st_size} bytes, but shape {cfg.shape} of {cfg.dtype} "
                        f"needs {expected}; check --shape and --dtype")
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(cfg.shape))


def _require_finite(array: np.ndarray, rows_per_block: int, path: Path) -> None:
    """Refuse rows holding NaN/inf or values beyond the float16 range, naming them, before anything is written
    (one read of the whole array, a block at a time)."""
    bad = []
    for start in range(0, len(array), rows_per_block):
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, which is refused below
            block = np.asarray(array[start:start + rows_per_block], dtype=np.float32)
        ok = np.isfinite(block) & (np.abs(block) <= np.finfo(np.float16).max)
        bad.extend(start + np.flatnonzero(~ok.reshape(len(block), -1).all(axis=1)))
    if len(bad) == 1:
        raise UserError(f"1 row of {path} (row {bad[0]}) holds NaN/inf or values beyond the float16 range; "
                        "clean the array before importing (nothing was written)")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise UserError(f"{len(bad)} rows of {path} (rows {shown}) hold NaN/inf or values beyond the float16 range; "
                        "clean the array before importing (nothing was written)")


def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    array = _open_array(cfg)
    if array.ndim == 2:
        array = array[:, None, :]
        default_prefix = 0
    elif array.ndim == 3:
        default_prefix = 1
    else:
        raise UserError(f"{cfg.source_path} has shape {array.shape}; expected (n, d) tokens or (n, t, d) images x tokens")
    n, t, d = array.shape
    n_prefix = default_prefix if cfg.n_prefix_tokens is None else cfg.n_prefix_tokens
    if not 0 <= n_prefix <= t:
        raise UserError(f"--prefix-tokens {n_prefix} does not fit {t} tokens per image")
    if n == 0:
        raise UserError(f"{cfg.source_path} holds no rows (shape {array.shape}); nothing to import")
    labels = np.zeros(n, np.int64)
    if cfg.labels_path is not None:
        labels = _load_npy(Path(cfg.labels_path)).astype(np.int64)
        if labels.shape != (n,):
            raise UserError(f"labels in {cfg.labels_path} have shape {labels.shape}, expected ({n},)")
    n_classes = int(labels.max()) + 1
    class_names = list(cfg.class_names) or [f"class_{i}" for i in range(n_classes)]
    if len(class_names) < n_classes:
        raise UserError(f"{len(class_names)} class names given but labels go up to {n_classes - 1}")
    chunk, shard = plan_layout(t * d * 2, n, images_per_chunk=cfg.images_per_chunk,
                               images_per_shard=cfg.images_per_shard)
    src = Path(cfg.source_path).resolve()
    stat = src.stat()
    content: dict[str, Any] = {
        "format_version": schema.FORMAT_VERSION, "source": str(src), "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns, "key": cfg.key, "shape": [n, t, d], "layer": cfg.layer,
        "model": cfg.model, "n_prefix_tokens": n_prefix, "labels": str(cfg.labels_path),
        "images_per_chunk": chunk, "images_per_shard": shard,
    }
    grid = int(round((t - n_prefix) ** 0.5))
    layout = {
        "n_tokens": t, "n_prefix_tokens": n_prefix, "class_token_index": 0 if n_prefix else None,
        "register_token_indices": list(range(1, n_prefix)),
        "patch_grid": [grid, grid] if grid * grid == t - n_prefix else [t - n_prefix],
        "patch_order": "as in the imported array",
    }
    spec = StoreSpec(
        layers=(cfg.layer,), n_tokens=t, d_model=d, image_ids=[f"{src.name}/{i}" for i in range(n)],
        class_names=class_names, images_per_chunk=chunk, images_per_shard=shard, config=content,
        attrs={schema.ATTR_MODEL: {"name": cfg.model, "pretrained": "imported", "checkpoint_sha256": None,
                                   "n_blocks": None, "d_model": d, "dtype": str(array.dtype),
                                   "layer_convention": "as given to pipeline import"},
               schema.ATTR_TOKEN_LAYOUT: layout, schema.ATTR_PREPROCESS: {},
               schema.ATTR_DATASET: {"name": "imported", "split": "all", "root": str(src), "limit": None, "seed": 0},
               schema.ATTR_VERSIONS: {"numpy": np.__version__},
               schema.ATTR_WRITER: writer_record("import", cfg)})
    _require_finite(array, shard, cfg.source_path)
    with StoreLock(cfg.out_dir), space.room_for(cfg.out_dir, spec.nbytes, resumes="the last complete shard"):
        store = create_or_resume(cfg.out_dir, spec, overwrite=cfg.overwrite)
        for s in store.incomplete_shards():
            sl = store.shard_slice(s)
            store.write_shard(s, {cfg.layer: np.asarray(array[sl], dtype=np.float16)}, labels[sl],
                              np.ones(sl.stop - sl.start, bool))
    return Outputs(store_dir=store.path, n_images=n, n_tokens=t, d_model=d, seconds=time.perf_counter() - started)


def summary(out: Outputs) -> str:
    return (f"imported {out.n_images} x {out.n_tokens} x {out.d_model} in {out.seconds:.1f} s -> {out.store_dir}\n"
            + next_steps(f"pipeline info {out.store_dir}", f"pipeline train --cache {out.store_dir} --layer L --out SAE_DIR"))


STAGE = Stage(name="import", config=Config, run=run, summary=summary, reads=("source_path", "labels_path"),
              writes=("out_dir",), persist=True, cached=False,
              help="Turn an (n, d) or (n, t, d) array (.npy, .npz, raw memmap) into an activation store.")
