"""Stage one: stream CLIP ViT token activations of chosen blocks into a sharded Zarr store.

Resumable: shards already marked done are skipped, so rerunning the same command after a
crash finishes the store, and the result is bit-identical to an uninterrupted run.

With ``adapter`` (a MaPLe folder from ``pipeline adapt``) the store holds the adapted model's
activations under the same protocol: the base model's token positions, then, with
``prompt_tokens: keep`` (the paper's reference), the n_ctx vision prompt tokens MaPLe appends
(``token_layout.prompt_token_indices``); with ``drop`` they are left out and the store has the
base layout. The base model's SAE encodes either; the adapter's prompts sha256 (and ``keep``)
is part of the store's config. An adapted ConvNeXt has no prompt tokens (its prompts are
channel offsets inside the stages), so its store has the base layout and ``keep`` is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache import schema, space
from cache.check import token_norm_stats
from cache.errors import UserError, require_threads
from cache.store import ActivationStore, StoreLock, StoreSpec, create_or_resume, plan_layout
from cache.writer import BackgroundWriter
from pipeline import maple
from pipeline.configs import Option, Stage, writer_record
from pipeline.datasets import ImageSet, open_dataset
from pipeline.models import LoadedModel, load_model
from pipeline.progress import Progress, already, announce, next_steps
from pipeline.threads import in_share, sized, worker_share
from pipeline.world import TASKS, held_out_of

log = logging.getLogger(__name__)

PROMPT_TOKENS = ("drop", "keep")

Tap = Callable[[torch.Tensor, tuple[int, ...]], dict[int, torch.Tensor]]  # images_BRHW, layers -> acts_BTD per layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """What to extract and where; fields marked 'identity' define the store's identity (sha256)."""

    OPTIONS: ClassVar = {"synthetic_task": Option("--task"), "images_per_chunk": Option("--chunk-images"),
                         "images_per_shard": Option("--shard-images")}

    dataset: str  # identity: synthetic, imagefolder, eurosat, imagenet, caltech101, oxfordpets, stanfordcars,
                  # flowers102, food101, fgvcaircraft, sun397, dtd, ucf101 (pipeline.datasets)
    out_dir: Path  # store directory to create or resume
    root: str | None = None  # identity: local dataset folder (nothing is downloaded; not needed for synthetic)
    split: str | None = None  # identity: dataset split; default depends on the dataset (e.g. 'all' for folders, 'test')
    limit: int | None = None  # identity: keep this many images: a seeded random subset, in dataset order;
                              # for synthetic: the number of generated images (default 1000)
    seed: int = 0  # identity: seed of --limit's subset, of the synthetic images and of random init (--pretrained none)
    model: str = "ViT-B-16"  # identity: open_clip model name, or a registered config such as tiny-vit
    pretrained: str = "openai"  # identity: open_clip pretrained tag, a local checkpoint file, or 'none' for random weights
    layers: tuple[int, ...] = (10,)  # identity: block indices to store, 0-based, residual output, e.g. 6,10,11;
                                     # the forward stops after the last
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # identity: model compute precision (store: float16)
    batch_size: int = 32  # images per forward
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    workers: int = 0  # image-decoding processes (0 = main process)
    overwrite: bool = False  # replace a store that was written with another config
    images_per_chunk: int | None = None  # identity: rows per Zarr chunk (default: ~3 MB chunks)
    images_per_shard: int | None = None  # identity: rows per shard file (default: ~64 MB shards)
    adapter: Path | None = None  # identity: MaPLe adapter folder (pipeline adapt --out): store the adapted model's
                                 # activations at the base model's token positions (see --prompt-tokens)
    prompt_tokens: Literal["drop", "keep"] = "drop"  # identity: with --adapter, keep MaPLe's vision prompt tokens after
                                                     # the patches (the paper: encoded, counted and masked like every
                                                     # token) or drop them (the base layout); no effect without one
    synthetic_task: str = "shape_colour"  # identity: synthetic dataset only: which attributes make the classes
                                          # (shape_colour, shape, colour, size, texture, background)
    allow_held_out: bool = False  # identity: synthetic dataset only: allow values the model's pretraining held out
                                  # (its config.json says which), e.g. for a concept-addition test
    scheduler: str | None = None  # run one Dask task per shard: 'local' starts a local cluster (see --n-workers),
                                  # or a scheduler address tcp://HOST:PORT whose workers see --out on a shared disk
    n_workers: int = 2  # worker processes of --scheduler local
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        require_threads(self.threads)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", Path(self.adapter))
        object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more (got {self.workers})")
        if self.prompt_tokens not in PROMPT_TOKENS:
            raise UserError(f"unknown --prompt-tokens '{self.prompt_tokens}'; use one of {', '.join(PROMPT_TOKENS)}")
        if self.synthetic_task not in TASKS:
            raise UserError(f"unknown --task '{self.synthetic_task}'; choose one of: {', '.join(TASKS)}")
        if self.dataset != "synthetic" and (self.synthetic_task != "shape_colour" or self.allow_held_out):
            raise UserError("--task and --allow-held-out choose classes of the synthetic world; "
                            f"dataset '{self.dataset}' has its own classes, leave them out")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run wrote, for the CLI summary and DVC."""

    store_dir: Path
    n_images: int  # rows in the store
    n_computed: int  # rows computed by this run (the rest were already complete)
    n_skipped: int  # unreadable source images (rows marked invalid)
    n_tokens: int
    layers: tuple[int, ...]
    bytes_written: int
    seconds: float  # wall time of the whole run, model loading included
    stream_seconds: float  # time from the first batch to the last shard written
    norms: dict[str, Any]  # per-layer L2-norm statistics per token kind


UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a corrupt file or one that is no image


class _SafeImages(Dataset):
    """Yields ``(image, label, ok)``; an unreadable image gives a zero image and ok=False."""

    def __init__(self, data: Dataset, image_size: int):
        self.data, self.image_size = data, image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            image, label = self.data[i]
            return image, int(label), True
        except UNREADABLE as err:
            log.warning("skipping unreadable image %d: %s", i, str(err).splitlines()[0])
            return torch.zeros(3, self.image_size, self.image_size), -1, False


def _require_a_readable_image(images: ImageSet) -> None:
    """Refuse, before anything is written, a dataset none of whose images can be read (a store of
    invalid rows would only fail later, in train). Stops at the first good image, so a usual dataset
    costs one read; unreadable images among good ones stay rows marked invalid."""
    for i in range(len(images)):
        try:
            images.dataset[i]
            return
        except UNREADABLE:
            continue
    raise UserError(f"none of the {len(images)} images under {images.root} can be read (corrupt files, or files that "
                    "are not images); check them, e.g. open one with PIL, or point --root at another folder")


def _shard_batches(store: ActivationStore, shards: list[int], batch_size: int) -> Iterator[list[int]]:
    """Batches of row indices that never cross a shard boundary, so a shard's numbers never
    depend on which other shards are still pending."""
    for shard in shards:
        sl = store.shard_slice(shard)
        for start in range(sl.start, sl.stop, batch_size):
            yield list(range(start, min(start + batch_size, sl.stop)))


def _versions() -> dict[str, str]:
    names = ("torch", "open_clip_torch", "zarr", "numpy", "numcodecs")
    return {n: importlib.metadata.version(n) for n in names}


def keeps_prompts(cfg: Config) -> bool:
    """True when the store holds the adapted model's vision prompt tokens."""
    return cfg.adapter is not None and cfg.prompt_tokens == "keep"


def _content_config(cfg: Config, model: LoadedModel, images: ImageSet, chunk: int, shard: int) -> dict[str, Any]:
    """The store's identity; ``adapter`` appears only for adapted models and ``prompt_tokens`` only when they are
    kept, so base stores and adapted stores that drop them keep their sha256."""
    adapted = {"adapter": maple.adapter_identity(cfg.adapter)} if cfg.adapter is not None else {}
    if keeps_prompts(cfg):
        adapted["prompt_tokens"] = "keep"
    return {
        "format_version": schema.FORMAT_VERSION,
        "dataset": images.name, "split": images.split, "root": images.root,
        "limit": cfg.limit, "seed": cfg.seed, "n_images": len(images),
        "model": model.name, "pretrained": model.pretrained,
        "checkpoint_sha256": model.checkpoint_sha256,
        "layers": list(cfg.layers), "dtype": cfg.dtype,
        "images_per_chunk": chunk, "images_per_shard": shard,
        "preprocess": model.preprocess_cfg(),
        **({"world": images.world} if images.world is not None else {}),
        **adapted,
    }


def _adapter_attrs(cfg: Config) -> dict[str, Any] | None:
    if cfg.adapter is None:
        return None
    identity = maple.adapter_identity(cfg.adapter)
    return {**identity, "dir": str(cfg.adapter.resolve()), "prompt_tokens": cfg.prompt_tokens,
            "stored_tokens": maple.stored_tokens(identity["method"], keep_prompts=keeps_prompts(cfg))}


def _spec(cfg: Config, model: LoadedModel, images: ImageSet, layout: dict[str, Any]) -> StoreSpec:
    n_tokens, width = int(layout["n_tokens"]), model.width(cfg.layers[0])  # check_layers: one shape for all
    bytes_per_image = n_tokens * width * 2  # of one layer's array
    chunk, shard = plan_layout(bytes_per_image, len(images), images_per_chunk=cfg.images_per_chunk,
                               images_per_shard=cfg.images_per_shard)
    content = _content_config(cfg, model, images, chunk, shard)
    attrs = {
        schema.ATTR_MODEL: {"name": model.name, "pretrained": model.pretrained,
                            "checkpoint_sha256": model.checkpoint_sha256, "n_blocks": model.n_blocks,
                            "d_model": width, "dtype": cfg.dtype, "tower": model.tower.kind,
                            "layer_convention": model.tower.layer_meaning,
                            "adapter": _adapter_attrs(cfg)},
        schema.ATTR_TOKEN_LAYOUT: layout,
        schema.ATTR_PREPROCESS: model.preprocess_cfg(),
        schema.ATTR_DATASET: {"name": images.name, "split": images.split, "root": images.root,
                              "limit": cfg.limit, "seed": cfg.seed,
                              **({"world": images.world} if images.world is not None else {})},
        schema.ATTR_VERSIONS: _versions(),
        schema.ATTR_WRITER: writer_record("extract", cfg),
    }
    return StoreSpec(layers=cfg.layers, n_tokens=n_tokens, d_model=width,
                     image_ids=images.image_ids, class_names=images.class_names,
                     images_per_chunk=chunk, images_per_shard=shard, config=content, attrs=attrs)


def _to_store_dtype(layer: int, acts_BTD: torch.Tensor, first_row: int) -> np.ndarray:
    """float16 copy on the host; NaN/inf (from the model or float16 overflow) is refused."""
    acts16 = acts_BTD.to(torch.float16)
    if not torch.isfinite(acts16).all():
        bad_row = first_row + int((~torch.isfinite(acts16)).flatten(1).any(1).nonzero()[0])
        if torch.isfinite(acts_BTD).all():
            raise UserError(
                f"layer {layer} activations of image {bad_row} exceed the float16 range "
                f"(max |x| = {acts_BTD.abs().max().item():.3g}); this model cannot be stored in float16")
        raise UserError(
            f"the model produced NaN/inf activations at layer {layer} for image {bad_row}; "
            "check the weights (--pretrained) and --dtype; completed shards were kept")
    return acts16.cpu().numpy()


def _fill_shard(model: LoadedModel, tap: Tap, batches: Iterator[Any], store: ActivationStore, shard: int,
                layers: tuple[int, ...], bar: Progress | None) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Compute one shard from the next batches of ``batches`` (which never cross shards)."""
    sl = store.shard_slice(shard)
    n = sl.stop - sl.start
    acts = {layer: np.empty((n, store.n_tokens, store.d_model), np.float16) for layer in layers}
    labels_N = np.empty(n, np.int64)
    valid_N = np.empty(n, bool)
    row = 0
    while row < n:
        images_BRHW, labels_B, ok_B = next(batches)
        b = len(labels_B)
        for layer, acts_BTD in tap(images_BRHW, layers).items():
            acts_BTD = acts_BTD * ok_B.to(acts_BTD.device)[:, None, None]  # unreadable rows -> 0
            acts[layer][row:row + b] = _to_store_dtype(layer, acts_BTD, sl.start + row)
        labels_N[row:row + b] = labels_B.numpy()
        valid_N[row:row + b] = ok_B.numpy()
        row += b
        if bar is not None:
            bar.update(b)
    return acts, labels_N, valid_N


def _loader(model: LoadedModel, images: ImageSet, store: ActivationStore, shards: list[int], cfg: Config,
            workers: int) -> DataLoader:
    return DataLoader(_SafeImages(images.dataset, model.image_size),
                      batch_sampler=list(_shard_batches(store, shards, cfg.batch_size)),
                      num_workers=workers, pin_memory=model.device.startswith("cuda"))


def _open(cfg: Config) -> tuple[LoadedModel, ImageSet, Tap, dict[str, Any]]:
    """The model, the images, the tap (the base model's, or the adapted model's: base positions, then the prompt
    tokens when kept) and the token layout it gives."""
    model = load_model(cfg.model, cfg.pretrained, device=cfg.device, dtype=cfg.dtype, init_seed=cfg.seed)
    model.check_layers(cfg.layers)
    tap, layout = model.tap, model.token_layout(cfg.layers[0])
    if cfg.adapter is not None:
        adapted = maple.load_adapter(cfg.adapter, model)
        tap = functools.partial(adapted.tap, keep_prompts=keeps_prompts(cfg))
        layout = adapted.token_layout(cfg.layers[0], keep_prompts=keeps_prompts(cfg))
    images = open_dataset(cfg.dataset, root=cfg.root, split=cfg.split, transform=model.preprocess,
                          limit=cfg.limit, seed=cfg.seed, image_size=model.image_size, synthetic_task=cfg.synthetic_task,
                          held_out=held_out_of(cfg.pretrained), allow_held_out=cfg.allow_held_out)
    return model, images, tap, layout


_WORKER_CACHE: dict[str, tuple[LoadedModel, ImageSet, Tap, dict[str, Any]]] = {}


def extract_shard_task(cfg: Config, shard: int) -> int:
    """One Dask task: compute and write one whole shard. The model is loaded once per worker.

    Idempotent: a task rerun after its shard was completed (e.g. after a worker died just
    after writing) returns at once.
    """
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = _open(cfg)
    model, images, tap, _ = _WORKER_CACHE[key]
    store = ActivationStore(cfg.out_dir)
    if store.done[shard]:
        return shard
    batches = iter(_loader(model, images, store, [shard], cfg, workers=0))
    store.write_shard(shard, *_fill_shard(model, tap, batches, store, shard, cfg.layers, None))
    return shard


def _run_local(cfg: Config, model: LoadedModel, tap: Tap, images: ImageSet, store: ActivationStore,
               pending: list[int], bar: Progress) -> None:
    batches = iter(_loader(model, images, store, pending, cfg, workers=cfg.workers))
    with BackgroundWriter(store.write_shard) as writer:
        for shard in pending:
            writer.submit(shard, *_fill_shard(model, tap, batches, store, shard, cfg.layers, bar))


def _run_dask(cfg: Config, store: ActivationStore, pending: list[int], bar: Progress) -> None:
    from pipeline.scale import dask_client

    share = worker_share(cfg.threads, cfg.n_workers) if cfg.scheduler == "local" else None
    with dask_client(cfg.scheduler, cfg.n_workers) as client:
        futures = client.map(in_share(extract_shard_task, share), [cfg] * len(pending), pending, pure=False,
                             retries=2)
        from distributed import as_completed

        for future in as_completed(futures):
            shard = future.result()
            sl = store.shard_slice(shard)
            bar.update(sl.stop - sl.start)


@sized
def run(cfg: Config) -> Outputs:
    """Extract (or finish extracting) the store described by ``cfg``."""
    started = time.perf_counter()
    model, images, tap, layout = _open(cfg)
    _require_a_readable_image(images)
    spec = _spec(cfg, model, images, layout)
    with StoreLock(cfg.out_dir), space.room_for(cfg.out_dir, spec.nbytes, resumes="the last complete shard"):
        store = create_or_resume(cfg.out_dir, spec, overwrite=cfg.overwrite)
        pending = store.incomplete_shards()
        n_pending = sum(store.shard_slice(s).stop - store.shard_slice(s).start for s in pending)
        announce("extract",
                 f"{store.n_images:,} images of {cfg.dataset} ({images.split}) through {cfg.model} ({cfg.pretrained}), "
                 f"{model.tower.unit}s {', '.join(map(str, cfg.layers))}, {spec.n_tokens} tokens each",
                 f"into {store.path}: {space.human_bytes(spec.nbytes)} in {store.n_shards} "
                 f"shard{'s' * (store.n_shards != 1)}; {n_pending:,} images to compute"
                 + already(store.n_images - n_pending, "stored"))
        bar = Progress(total=n_pending, unit="img", desc=f"extract {store.path.name}", enabled=cfg.progress)
        streaming = time.perf_counter()
        if cfg.scheduler is None:
            _run_local(cfg, model, tap, images, store, pending, bar)
        else:
            _run_dask(cfg, store, pending, bar)
        bar.close()
        stream_seconds = time.perf_counter() - streaming
        store.require_complete()
        skipped = [str(i) for i in np.asarray(store.image_ids)[~store.valid]]
        store.set_attrs(**{schema.ATTR_SKIPPED: skipped})
        if skipped:
            log.warning("%d unreadable images were skipped (rows marked invalid, listed in attrs '%s')",
                        len(skipped), schema.ATTR_SKIPPED)
        bytes_written = n_pending * spec.n_tokens * spec.d_model * 2 * len(cfg.layers)
        norms = token_norm_stats(store)
    return Outputs(store_dir=store.path, n_images=store.n_images, n_computed=n_pending,
                   n_skipped=len(skipped), n_tokens=store.n_images * spec.n_tokens,
                   layers=cfg.layers, bytes_written=bytes_written,
                   seconds=time.perf_counter() - started, stream_seconds=stream_seconds, norms=norms)


def summary(out: Outputs) -> str:
    lines = [f"extracted {out.n_computed} of {out.n_images} images ({out.n_skipped} unreadable, skipped) "
             f"x {out.n_tokens // max(out.n_images, 1)} tokens, layers {list(out.layers)}: "
             f"{space.human_bytes(out.bytes_written)} in {out.seconds:.1f} s "
             f"({out.n_computed / max(out.seconds, 1e-9):.1f} images/s) -> {out.store_dir}"]
    for layer, stats in out.norms.items():
        if "class" in stats:
            lines.append(f"  layer {layer} token norms: class mean {stats['class']['mean']:.2f}, "
                         f"patches mean {stats['patches']['mean']:.2f} (max {stats['patches']['max']:.2f})")
    lines.append(next_steps(f"pipeline info {out.store_dir}",
                            f"pipeline train --cache {out.store_dir} --layer {out.layers[-1]} --out SAE_DIR"))
    return "\n".join(lines)


STAGE = Stage(
    name="extract", config=Config, run=run, summary=summary, reads=("adapter",), writes=("out_dir",),
    persist=True, cached=False,
    help="""Stream patch-token activations of chosen blocks into a resumable Zarr store.

    Rerunning the same command finishes an interrupted store; a different config is refused
    unless --overwrite. Unreadable images are skipped, counted and listed in the store.""")
