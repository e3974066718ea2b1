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
references' patch maps; no per-latent buffer over all images ever exists. The partials, their
merge and the graph are ``pipeline.statistics``; the folder's files are ``pipeline.latents``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from cache import schema
from cache.codes import CodeStore
from cache.errors import UserError, require_threads
from cache.layout import n_prompt_tokens
from cache.store import ActivationStore, one_writer
from pipeline import latents as files
from pipeline.configs import Option, Stage
from pipeline.progress import announce, next_steps
from pipeline.statistics import Plan, compute, label_statistics, latent_table, maps_graph, statistics_graph
from pipeline.threads import sized

log = logging.getLogger(__name__)

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
    n_workers: int | None = None  # threads or processes of the local schedulers, sharing --threads
                                  # (default: one per thread)
    split_every: int = 4  # partial results merged by one reduction task
    plots: bool = True  # write the PNG plots into the statistics folder
    plot_classes: int = 20  # classes shown in the per-class top-latent grid (the first ones)
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        require_threads(self.threads)
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


@sized
@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    codes, store = open_inputs(cfg)
    layout = dict(codes.attrs.get("token_layout") or store.token_layout)
    class_names = list(codes.attrs.get("class_names") or store.class_names)
    n_prefix = int(layout.get("n_prefix_tokens", 1))
    cls_index = layout.get("class_token_index")
    plan = Plan(n_tokens=codes.n_tokens, d_sae=codes.d_sae, n_classes=len(class_names),
                class_token_index=None if cls_index is None else int(cls_index), n_prefix_tokens=n_prefix,
                top_k=cfg.top_k, threshold=cfg.threshold, n_prompt_tokens=n_prompt_tokens(layout))
    grid = [int(g) for g in layout.get("patch_grid") or [plan.n_patches]]
    grid_hw = (grid[0], grid[1]) if len(grid) == 2 else (1, int(np.prod(grid)))
    if grid_hw[0] * grid_hw[1] != plan.n_patches:
        raise UserError(f"the token layout's patch grid {grid} does not match {plan.n_patches} patch tokens; "
                        "fix the store's token_layout attribute")
    files.prepare_dir(cfg.out_dir, check_only=True)  # refuse before computing; write only after
    announce("stats",
             f"statistics of {plan.d_sae:,} latents over {codes.n_images:,} images in {codes.n_shards} shards of "
             f"{codes.path} (scheduler {cfg.scheduler})",
             f"into {cfg.out_dir}")

    (part,) = compute([statistics_graph(codes.path, store.path, codes.n_shards, plan, cfg.split_every)],
                      cfg.scheduler, cfg.n_workers, "statistics", cfg.progress, cfg.threads)
    if part.shards != tuple(range(codes.n_shards)):
        raise RuntimeError(f"the reduction folded shards {part.shards}, expected 0..{codes.n_shards - 1}")
    maps_SKP = np.zeros((plan.d_sae * plan.top_k, plan.n_patches), np.float32)
    for slots, maps in compute(maps_graph(codes.path, part.top, codes.images_per_shard, plan),
                               cfg.scheduler, cfg.n_workers, "reference maps", cfg.progress,
                               cfg.threads):
        maps_SKP[slots] = maps

    files.prepare_dir(cfg.out_dir)
    counts_CS = np.zeros((plan.n_classes, plan.d_sae), np.int64)
    counts_CS[part.count_classes] = part.counts_CS
    labels = label_statistics(part.top, plan.n_classes)
    table = latent_table(part, labels, class_names, plan.class_token_index is not None, counts_CS.sum(0))

    out = cfg.out_dir
    files.write_tables(out, table, counts_CS, class_names)
    files.write_references(out, part.top.score_SK, part.top.index_SK, part.top.label_SK,
                           maps_SKP.reshape(plan.d_sae, plan.top_k, *grid_hw), store)

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
    files.write_summary(out, summary)

    plot_paths: tuple[Path, ...] = ()
    if cfg.plots:
        plot_paths = files.write_plots(out, table, counts_CS, class_names, cfg.plot_classes)

    meta = {
        "config": config, "provenance": provenance,
        "image_source": {"dataset": store.attrs.get(schema.ATTR_DATASET),
                         "preprocess": store.attrs.get(schema.ATTR_PREPROCESS),
                         "model": store.attrs.get(schema.ATTR_MODEL)},
        "token_layout": layout, "patch_grid": list(grid_hw), "d_sae": plan.d_sae, "top_k": plan.top_k,
        "n_images": codes.n_images, "n_valid_images": part.n_valid, "n_classes": plan.n_classes,
        "images_per_class": part.images_C.tolist(), "definitions": files.DEFINITIONS,
        "sae_values": codes.attrs.get("values"),
    }
    files.write_meta(out, meta)  # last: the folder is complete
    return Outputs(stats_dir=out, latents_path=out / files.LATENTS_FILE, references_path=out / files.REFERENCES_DIR,
                   class_counts_path=out / files.CLASS_COUNTS_FILE, class_names_path=out / files.CLASS_NAMES_FILE,
                   summary_path=out / files.SUMMARY_FILE, meta_path=out / files.META_FILE, plot_paths=plot_paths,
                   n_latents=plan.d_sae, n_dead=n_dead, n_valid_images=part.n_valid, n_shards=codes.n_shards,
                   seconds=time.perf_counter() - started)


def summary(out: Outputs) -> str:
    return (f"statistics of {out.n_latents} latents ({out.n_dead} dead) over {out.n_valid_images} valid images "
            f"in {out.n_shards} shards, {out.seconds:.1f} s -> {out.stats_dir}\n"
            + next_steps(f"pipeline show-latent --stats {out.stats_dir} --latent ID",
                         f"pipeline report --stats {out.stats_dir} --out REPORT_DIR",
                         f"pipeline mask --sae SAE_DIR --stats {out.stats_dir} --out MASK_DIR"))


STAGE = Stage(name="stats", config=Config, run=run, summary=summary, reads=("codes_dir", "cache_dir"),
              writes=("out_dir",),
              help="""Per-latent statistics (frequency, mean activation, references, label entropy, class counts).

    Out of core: one Dask task per code shard, partial results merged in a tree.""")
